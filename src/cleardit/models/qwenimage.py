"""Qwen-Image adapter: diffusers' ``QwenImageTransformer2DModel`` (Qwen-Image, Qwen-Image-Edit).

Qwen-Image has double-stream blocks only. Each block's joint attention runs over
``[text | target image | condition images...]``: the image stream holds the target's tokens (raster
order over its (h, w) grid of packed 2x2 latent patches), then the condition images the Edit
pipelines append. The grid comes from the forward's ``img_shapes`` (per sample
``[(1, h, w), (1, h2, w2), ...]``, the target first). RoPE is complex-valued, centred on each
image and applied to each stream separately, inside the processor.

The rule here: the target's tokens get the CLEAR disc; text and condition-image tokens are global
(they see everything, everything sees them). ``encoder_hidden_states_mask`` is honoured as diffusers
does: padded text keys are dropped for every query, while padded text queries still attend to the
kept keys. The processor joins the sequence as ``[text | conditions | target]`` so the global
tokens are one block before the image (``TokenLayout(text_first=True)``) and splits the output back;
the tile-major order of the target is applied once per forward in the hooks (RoPE is permuted alike
in each processor, since the forward computes it from ``img_shapes`` in raster order).

Patch-parallel (``install_strips``): every rank takes the full latents and keeps, where the tile-major
order would be applied, its rows of the target (raster order) and every condition token (global, whole
on every rank); the processors select the same RoPE rows and run their attention (each text-mask group
too) with the band's keys and values from the neighbouring ranks (``ClearProcessor.attention``), and
padded text queries, which attend to every key, merge the ranks' partial softmaxes. The output hook
gathers every rank's target rows, so the transformer returns the whole image stream on every rank.
Zero-cond-t models (Qwen-Image-Edit-2511) get their per-token modulation index cut alike per block.
"""

from __future__ import annotations

import dataclasses
import re
from math import prod, sqrt

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from torch import nn

from ..attention import TokenLayout
from ..attention.strips import StripPlan, dense_attention, merge_text
from ..config import ClearConfig
from .adapter import ModelAdapter, check_teacher_data_fits
from .errors import NotSupportedError
from .flux import FluxAdapter
from .handle import ClearHandle, ForwardGrid, ForwardState, add_hooks, bind_forward_args, replace_sample
from .processor import ClearProcessor
from .strips import StripContext

# The image-stream attention projections (as the reference release trains for FLUX's double-stream
# blocks), plus the pooling weights of the down-sampled variant.
TRAINABLE_PATTERN = re.compile(
    r"^transformer_blocks\.\d+\.attn\.(?:(?:to_q|to_k|to_v|to_out\.0)\.(?:weight|bias)|processor\.spatial_weight)$"
)

# (sample rows, kept text positions, padded text positions) of samples sharing one text mask
KeyGroup = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- reading the inputs
def _image_shapes(sample) -> list[tuple[int, int, int]]:
    """One sample's entry of ``img_shapes`` as a list of (frames, height, width), read the way
    diffusers' ``QwenEmbedRope`` reads it (a single tuple is one image)."""
    entries = sample if isinstance(sample, list) else [sample]
    try:
        shapes = [tuple(int(x) for x in entry) for entry in entries]
    except (TypeError, ValueError):
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise ValueError(
            f"img_shapes entry {sample!r} is not (frames, height, width) or a list of them; pass per sample "
            "[(1, h, w), ...] in packed 2x2 latent tokens, the target image first"
        )
    return shapes


def read_img_shapes(img_shapes, image_tokens: int) -> tuple[int, int, int]:
    """(height, width, condition tokens) of the target grid described by ``img_shapes``.

    ``img_shapes`` is a list with one entry per sample (diffusers' RoPE uses the first); every sample
    must have the same target, and the images must account for all ``image_tokens``.
    """
    if img_shapes is None or (isinstance(img_shapes, list) and not img_shapes):
        raise ValueError(
            "a linearized QwenImageTransformer2DModel needs img_shapes to know the image grid: per sample "
            "[(1, h, w), ...] in packed 2x2 latent tokens, the target image first, then condition images"
        )
    samples = img_shapes if isinstance(img_shapes, list) else [img_shapes]
    images = [_image_shapes(s) for s in samples]
    targets = sorted({shapes[0] for shapes in images})
    if len(targets) > 1:
        raise ValueError(
            f"img_shapes gives the samples different target grids {targets}; CLEAR needs one target "
            "grid per batch (diffusers' RoPE also uses only the first sample's): call the transformer "
            "once per size"
        )
    frames, height, width = images[0][0]
    if frames != 1:
        raise ValueError(
            f"img_shapes target {images[0][0]} has {frames} frames; CLEAR for Qwen-Image handles a "
            "single-frame target image (frames = 1)"
        )
    described = sum(prod(s) for s in images[0])
    if described != image_tokens:
        raise ValueError(
            f"img_shapes {images[0]} describe {described} image tokens but hidden_states has "
            f"{image_tokens}; pass the packed latents' shapes (1, height // vae_scale_factor // 2, "
            "width // vae_scale_factor // 2) of the target and of each condition image, in the order "
            "of hidden_states"
        )
    return height, width, described - height * width


def text_keep(mask: torch.Tensor, batch: int, text_len: int) -> torch.Tensor:
    """``encoder_hidden_states_mask`` [B, T] as bool (non-zero keeps, as diffusers converts it)."""
    if mask.ndim != 2 or tuple(mask.shape) != (batch, text_len):
        raise ValueError(
            f"encoder_hidden_states_mask of shape {tuple(mask.shape)} does not fit {batch} x {text_len} text "
            "tokens; pass [batch, text tokens] with 1 for real tokens and 0 for padding"
        )
    return mask.to(torch.bool)


def key_groups(keep: torch.Tensor) -> list[KeyGroup] | None:
    """Samples grouped by which text tokens they keep, or None when every text token is kept."""
    if bool(keep.all()):
        return None
    by_pattern: dict[tuple[bool, ...], list[int]] = {}
    for b, row in enumerate(keep.cpu().tolist()):
        by_pattern.setdefault(tuple(row), []).append(b)
    device = keep.device
    groups = []
    for pattern, rows in by_pattern.items():
        pattern_t = torch.tensor(pattern)
        kept, padded = pattern_t.nonzero().flatten(), (~pattern_t).nonzero().flatten()
        groups.append(tuple(t.to(device) for t in (torch.tensor(rows), kept, padded)))
    return groups


@dataclasses.dataclass(frozen=True)
class QwenForward:
    """What the processors need of one forward beyond its layout.

    Attributes:
        text_len: text tokens T (the layout's global block is T + condition tokens).
        target_len: target tokens in the image stream: the whole grid, or this rank's rows of it in
            a patch-parallel model.
        image_order: image-stream index [target + conditions]: the token at position i came from
            position ``image_order[i]`` of the input (tile-major target, or this rank's rows of it);
            None for the input order.
        groups: ``key_groups`` of the text mask; None when every text token is kept.
    """

    text_len: int
    target_len: int
    image_order: torch.Tensor | None = None
    groups: list[KeyGroup] | None = None


class QwenGrid(ForwardGrid):
    """ForwardGrid plus the ``QwenForward`` of the forward in flight."""

    def __init__(self, config: ClearConfig):
        super().__init__(config)
        self.forward: QwenForward | None = None
        self.inverse: torch.Tensor | None = None  # the tile-major permutation to undo on the output

    def snapshot(self) -> ForwardState:
        return ForwardState(self.require_layout(), self.forward)


class QwenStripContext(StripContext):
    """StripContext plus the ``QwenForward`` of the forward in flight (as ``QwenGrid``)."""

    forward: QwenForward | None = None
    inverse = None  # the strips keep raster order: nothing to undo

    def snapshot(self) -> ForwardState:
        return ForwardState(self.require_layout(), self.forward)


# ----------------------------------------------------------------------------- the processor
class ClearQwenAttnProcessor(ClearProcessor):
    """Replaces ``QwenDoubleStreamAttnProcessor2_0``: the same projections, norms and per-stream RoPE;
    CLEAR attention over ``[text | conditions | target]`` instead of full attention."""

    _attention_backend = None  # what diffusers' set_attention_backend writes; CLEAR picks its own
    _parallel_config = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("Qwen-Image attention needs encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError(
                "Qwen-Image attention takes no attention_mask; "
                "pass encoder_hidden_states_mask for padded text"
            )
        state = self.forward_state(image_rotary_emb)
        layout, fwd = state.layout, state.extra
        text_len, image_len = encoder_hidden_states.shape[1], hidden_states.shape[1]
        described = fwd.target_len + layout.text_len - fwd.text_len  # target (own rows) + conditions
        if text_len != fwd.text_len or image_len != described:
            raise ValueError(
                f"attention got {text_len} text + {image_len} image tokens but the forward's inputs describe "
                f"{fwd.text_len} text + {described} image tokens"
            )
        groups = fwd.groups
        if encoder_hidden_states_mask is not None:  # the hook takes it out of a linearized forward
            groups = key_groups(text_keep(encoder_hidden_states_mask, *encoder_hidden_states.shape[:2]))

        head_dim = attn.inner_dim // attn.heads
        img_q, img_k, img_v = (
            f(hidden_states).unflatten(-1, (-1, head_dim)) for f in (attn.to_q, attn.to_k, attn.to_v)
        )
        txt_q, txt_k, txt_v = (
            f(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            if fwd.image_order is not None:  # RoPE comes in input order; the tokens are tile-major
                img_freqs = img_freqs[fwd.image_order]
            img_q = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False)
            img_k = apply_rotary_emb_qwen(img_k, img_freqs, use_real=False)
            txt_q = apply_rotary_emb_qwen(txt_q, txt_freqs, use_real=False)
            txt_k = apply_rotary_emb_qwen(txt_k, txt_freqs, use_real=False)

        # [text | conditions | target]: the global tokens in one block before the target grid
        target_len = fwd.target_len

        def joint(txt, img):
            return torch.cat([txt, img[:, target_len:], img[:, :target_len]], dim=1).transpose(1, 2)

        q, k, v = joint(txt_q, img_q), joint(txt_k, img_k), joint(txt_v, img_v)
        out = self.attend(q, k, v, layout, groups).transpose(1, 2).flatten(2, 3).to(q.dtype)
        global_len = layout.text_len
        txt_out = out[:, :text_len]
        img_out = torch.cat([out[:, global_len:], out[:, text_len:global_len]], dim=1)
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)  # dropout
        return img_out, attn.to_add_out(txt_out.contiguous())

    def attend(self, q, k, v, layout: TokenLayout, groups: list[KeyGroup] | None) -> torch.Tensor:
        """CLEAR over [B, heads, N, d] in the order [text | conditions | target]. Padded text keys are
        dropped for every query; padded text queries (global) attend densely to the kept keys."""
        if groups is None:
            return self.attention(q, k, v, layout)
        seq_len = q.shape[2]  # a patch-parallel model holds this rank's target rows only
        out = torch.zeros_like(q)
        for rows, kept, padded in groups:
            text_len = kept.numel() + padded.numel()
            keys = torch.cat([kept, torch.arange(text_len, seq_len, device=q.device)])
            qg, kg, vg = q[rows], k[rows][:, :, keys], v[rows][:, :, keys]
            kept_layout = dataclasses.replace(layout, text_len=layout.text_len - padded.numel())
            part = self.attention(qg[:, :, keys], kg, vg, kept_layout)
            out[rows[:, None], :, keys[None, :]] = part.transpose(1, 2).to(out.dtype)
            if padded.numel():
                padded_out = self.attend_everything(qg[:, :, padded], kg, vg, kept_layout.text_len)
                out[rows[:, None], :, padded[None, :]] = padded_out.transpose(1, 2).to(out.dtype)
        return out

    def attend_everything(self, q, k, v, global_len: int) -> torch.Tensor:
        """Dense attention of queries that see every key (padded text); the first ``global_len`` keys
        are the global tokens. In a patch-parallel model k/v hold this rank's target rows only: the
        ranks' partial softmaxes are merged as strip attention merges its text queries (the global
        keys counted once, on rank 0, with the exact merge)."""
        scale = self.config.scale
        comm = getattr(self.geometry, "comm", None)
        if comm is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        text_merge = self.geometry.text_merge
        if text_merge == "exact" and comm.rank != 0:
            k, v = k[:, :, global_len:], v[:, :, global_len:]
        out, lse = dense_attention(q, k, v, scale if scale is not None else 1.0 / sqrt(q.shape[-1]))
        return merge_text(out, lse, comm, text_merge)[0].to(q.dtype)


# ----------------------------------------------------------------------------- forward hooks
def _pre_hook(module, args, kwargs):
    """Read the grid from img_shapes and the text mask, publish them, permute the target tile-major."""
    geometry: QwenGrid = module._cleardit_grid
    geometry.check_processors(module)
    bound = bind_forward_args(module, args, kwargs)
    hidden = bound.arguments["hidden_states"]
    text = bound.arguments.get("encoder_hidden_states")
    if text is None:
        raise ValueError("a linearized QwenImageTransformer2DModel needs encoder_hidden_states")
    height, width, cond_len = read_img_shapes(bound.arguments.get("img_shapes"), hidden.shape[1])
    config = geometry.config
    controlnet = bound.arguments.get("controlnet_block_samples") is not None
    comm = getattr(geometry, "comm", None)
    if comm is not None and controlnet:
        raise ValueError(
            "patch-parallel Qwen-Image does not support ControlNet residuals; run them on one device"
        )
    # the original processors (a distillation teacher pass) apply RoPE in input order, controlnet
    # residuals arrive in raster order and strips are cut in raster order: no tile-major permutation
    tile = None if geometry.original_pass or controlnet or comm is not None else config.tile
    layout = TokenLayout(text.shape[1] + cond_len, height, width, down_factor=config.down_factor, tile=tile)
    conditions = torch.arange(layout.image_len, hidden.shape[1], device=hidden.device)
    order = inverse = None
    target_len = layout.image_len
    if comm is not None:  # patch-parallel: this rank's target rows (gathered again in _post_hook)
        geometry.plan = StripPlan(height, width, comm.world, config.radius, config.down_factor)
        y0, y1 = geometry.plan.strip(comm.rank)
        order = torch.cat([torch.arange(y0 * width, y1 * width, device=hidden.device), conditions])
        target_len = (y1 - y0) * width
        if comm.counter is not None:
            comm.counter.next_step()
    elif tile is not None and (height > tile[0] or width > tile[1]):
        order = torch.cat([layout.sequence_to_raster(hidden.device), conditions])
        inverse = torch.cat([layout.raster_to_sequence(hidden.device), conditions])
    if order is not None:
        bound.arguments["hidden_states"] = hidden[:, order]
    groups = None
    mask = bound.arguments.get("encoder_hidden_states_mask")
    if mask is not None and not geometry.original_pass:  # the original processors read the mask
        groups = key_groups(text_keep(mask.to(text.device), *text.shape[:2]))
        bound.arguments["encoder_hidden_states_mask"] = None  # read once; the blocks build no mask
    geometry.layout = layout
    geometry.forward = QwenForward(text.shape[1], target_len, order, groups)
    geometry.inverse = inverse
    bound.arguments.pop("self", None)
    return (), dict(bound.arguments)


def _post_hook(module, args, kwargs, output):
    """Undo the tile-major permutation on the output (target and condition tokens, as it came in);
    patch-parallel: gather every rank's target rows."""
    geometry: QwenGrid = module._cleardit_grid
    inverse, geometry.inverse = geometry.inverse, None
    # layout and forward stay set: gradient checkpointing re-runs the blocks during backward
    if output is None:  # the forward raised
        return output
    if getattr(geometry, "comm", None) is not None:
        return replace_sample(output, lambda sample: _gather_target(sample, geometry))
    if inverse is None:
        return output
    return replace_sample(output, lambda sample: sample[:, inverse])


def _gather_target(sample: torch.Tensor, geometry: QwenStripContext) -> torch.Tensor:
    """[every rank's target rows in raster order | the condition tokens, whole on every rank]."""
    plan, comm, own = geometry.plan, geometry.comm, geometry.forward.target_len
    counts = [plan.rows(r) * plan.width for r in range(comm.world)]
    rows = comm.all_gather(sample[:, :own], counts, 1, "output", "output gather", None)
    return torch.cat([*rows, sample[:, own:]], dim=1)


def _modulate_index_hook(module, args, kwargs):
    """On each block of a zero-cond-t model in a patch-parallel forward: the per-token modulation
    index (target 0, conditions 1), which the forward builds for the whole image stream, for this
    rank's tokens."""
    bound = bind_forward_args(module, args, kwargs)
    index = bound.arguments.get("modulate_index")
    if index is None:
        return None
    bound.arguments["modulate_index"] = index[:, module._cleardit_grid.forward.image_order]
    bound.arguments.pop("self", None)
    return (), dict(bound.arguments)


# ----------------------------------------------------------------------------- the adapter
class QwenImageAdapter(ModelAdapter):
    """Qwen-Image and Qwen-Image-Edit (condition images are global tokens)."""

    family = "qwenimage"
    transformer_classes = ("QwenImageTransformer2DModel",)
    pipeline_classes = ("QwenImagePipeline",)
    img2img_class = "QwenImageImg2ImgPipeline"
    pack_latents = FluxAdapter.pack_latents  # QwenImagePipeline packs 2x2 patches as FluxPipeline does
    grid_class = QwenGrid
    strip_context_class = QwenStripContext
    trainable_pattern = TRAINABLE_PATTERN
    text_conditions = ("prompt_embeds", "prompt_embeds_mask")
    # RoPE is built inside the forward and only CLEAR's processors reorder it: the teacher runs raster
    teacher_keeps_tile_order = False
    default_steps = 50  # QwenImagePipeline's defaults
    default_guidance = None  # no distilled guidance: classifier-free guidance is true_cfg_scale
    default_true_cfg = 4.0

    # -- CLEAR attention ---------------------------------------------------------------------------
    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        return [block.attn for block in transformer.transformer_blocks]

    def strips_unsupported(self) -> str | None:
        return None

    def install_strips(
        self, transformer: nn.Module, config: ClearConfig, context: StripContext
    ) -> ClearHandle:
        handle = super().install_strips(transformer, config, context)
        if getattr(transformer.config, "zero_cond_t", False):  # its blocks index tokens themselves
            for block in transformer.transformer_blocks:
                add_hooks(block, _modulate_index_hook, state=context)
            handle.hooks = (*handle.hooks, _modulate_index_hook)
        return handle

    def install_into(self, transformer: nn.Module, geometry: ForwardGrid, handle) -> ClearHandle:
        config = geometry.config
        if getattr(transformer.config, "use_layer3d_rope", False):
            raise NotSupportedError(
                "Qwen-Image-Layered (use_layer3d_rope) generates several layers of one image at once; CLEAR "
                "supports one target grid (Qwen-Image, Qwen-Image-Edit)"
            )
        geometry.adapter = self
        for attn in self.attention_modules(transformer):
            handle.originals.append((attn, attn.processor))
            attn.set_processor(ClearQwenAttnProcessor(geometry, config, attn.to_q.weight))
        transformer._cleardit_grid = geometry  # the hooks' state: per model, carried by deepcopy
        handle.hooks = add_hooks(transformer, _pre_hook, _post_hook)
        return handle

    def attention_geometry(self, transformer: nn.Module) -> tuple[int, int, int]:
        cfg = transformer.config
        return int(cfg.num_attention_heads), int(cfg.attention_head_dim), int(cfg.num_layers)

    def consistency_modules(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every block's joint attention (Qwen-Image has no single-stream blocks); its first output is
        the image stream's."""
        blocks = transformer.transformer_blocks
        return [(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(blocks)]

    def query_norms(self, transformer: nn.Module) -> list[nn.Module]:
        attention = self.attention_modules(transformer)
        return [n for attn in attention for n in (attn.norm_q, attn.norm_added_q) if n is not None]

    # -- pipelines ---------------------------------------------------------------------------------
    def load_pipeline(self, folder, dtype: torch.dtype):
        from diffusers import QwenImagePipeline

        return QwenImagePipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True)

    def max_text_tokens(self, pipe) -> int:
        return int(pipe.tokenizer_max_length)  # the pipelines refuse a longer max_sequence_length

    def call_options(self, guidance: float, true_cfg: float, negative_prompt: str, text_len: int) -> dict:
        # the pipelines' own default is true_cfg_scale=4: say 1 (off) explicitly
        options = dict(true_cfg_scale=float(max(true_cfg, 1.0)), max_sequence_length=text_len)
        if true_cfg > 1:
            options.update(negative_prompt=negative_prompt)
        return options

    def encode_prompt(self, pipe, prompt, *, images_per_prompt, text_len, true_cfg, negative_prompt) -> dict:
        device = pipe._execution_device
        embeds, mask = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=images_per_prompt, max_sequence_length=text_len
        )
        kwargs = dict(prompt_embeds=embeds, prompt_embeds_mask=mask)
        if true_cfg > 1 and negative_prompt is not None:
            neg, neg_mask = pipe.encode_prompt(
                [negative_prompt] * (embeds.shape[0] // images_per_prompt), device=device,
                num_images_per_prompt=images_per_prompt, max_sequence_length=text_len,
            )  # fmt: skip
            kwargs.update(negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask)
        return kwargs

    def unpack_latents(self, pipe, packed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # the pipelines unpack to video latents [B, C, 1, h, w]: one frame
        return pipe._unpack_latents(packed, size[0], size[1], pipe.vae_scale_factor)[:, :, 0]

    def decode_latents(self, pipe, packed: torch.Tensor, size: tuple[int, int], output_type: str = "pil"):
        vae = pipe.vae
        latents = self.unpack_latents(pipe, packed, size)[:, :, None].to(vae.device, vae.dtype)
        stats = (vae.config.latents_mean, vae.config.latents_std)
        mean, std = (torch.tensor(t).view(1, -1, 1, 1, 1).to(latents) for t in stats)
        with torch.no_grad():
            image = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(image, output_type=output_type)

    # -- training ----------------------------------------------------------------------------------
    def encode_text(self, pipe, prompt: str, text_len: int) -> dict[str, torch.Tensor]:
        embeds, mask = pipe.encode_prompt(prompt, num_images_per_prompt=1, max_sequence_length=text_len)
        embeds = embeds[0]
        mask = (
            torch.ones(embeds.shape[0], dtype=torch.long, device=embeds.device) if mask is None else mask[0]
        )
        # the pipelines pad to the longest prompt of a call; stored samples all have text_len tokens
        # (padding is masked, so the transformer's output does not change)
        pad = text_len - embeds.shape[0]
        return {
            "prompt_embeds": F.pad(embeds, (0, 0, 0, pad)),
            "prompt_embeds_mask": F.pad(mask.long(), (0, pad)),
        }

    def check_conditions(self, transformer: nn.Module, sample: dict) -> None:
        cfg = transformer.config
        checks = [
            ("text embedding width", sample["prompt_embeds"].shape[-1], cfg.joint_attention_dim),
            ("text mask length", sample["prompt_embeds_mask"].shape[-1], sample["prompt_embeds"].shape[0]),
            ("latent channels x 4", sample["latents"].shape[0] * 4, cfg.in_channels),
        ]
        check_teacher_data_fits(checks)

    def training_inputs(self, transformer, noisy, sigma, conditions, guidance) -> dict:
        b, _, h, w = noisy.shape
        return dict(
            hidden_states=self.pack_latents(noisy),
            timestep=sigma,  # the pipelines pass t / 1000 = sigma
            encoder_hidden_states=conditions["prompt_embeds"],
            encoder_hidden_states_mask=conditions["prompt_embeds_mask"],
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )

    def latent_channels(self, transformer: nn.Module) -> int:
        return int(transformer.config.in_channels) // 4
