"""Z-Image adapter: diffusers' ``ZImageTransformer2DModel`` / ``ZImagePipeline``.

The forward takes ``x``, a list of latents (C, F, H, W), one per sample, and ``cap_feats``, a list
of caption embeddings (L, D). It patchifies each image into an (H/p) x (W/p) raster grid of tokens
and pads it to a multiple of 32 with a learned pad token; captions are padded the same way. Then:

* ``noise_refiner`` blocks: attention over ``[grid | image pads]`` only. CLEAR without text: the
  pads are real (unmasked) tokens that lie on no grid, so they are global.
* ``context_refiner`` blocks: caption only; left as they are.
* ``layers``: one sequence ``[grid | image pads | caption | caption pads]`` per sample (image first),
  samples of different lengths padded with zeros to the longest and masked out (a key mask
  [B, S]). Everything after the grid is global, so the layout is one contiguous block of global
  tokens after the image (``text_first=False``); the batch padding is honoured exactly: masked
  keys are dropped, and the padding queries attend to every kept key, as under diffusers' mask.

A forward pre-hook reads the grid from the shapes of ``x`` (one grid per batch) and publishes the
layouts. For tile-major order it rearranges each input latent by whole patches so that diffusers'
patchify already yields the tokens tile-major (every op but attention is token-wise); the RoPE
rows, which diffusers builds in raster order, are permuted once per forward in the first processor
that sees them, and a forward hook puts the output patches back. RoPE has three axes (frame,
row, column); an image is one frame, and multi-frame inputs are refused.

Patch-parallel (``install_strips``): every rank takes the full latents. diffusers pads the image
tokens to a multiple of 32 from the grid's size, so the patches cannot be cut before its patchify;
a pre-hook on the first noise-refiner block keeps ``[this rank's rows | image pads]`` of the embedded
sequence instead (the first point where the image tokens exist), the pad tokens global and whole on
every rank. From there diffusers builds the unified sequence from the kept rows; only the RoPE rows
and the batch key mask it makes still describe the whole grid: the processors take the rank's RoPE
rows, as they permute them for tile-major order, and count the missing rows in the mask's groups
(batch-padding queries see every kept key: their partial softmaxes are merged over the ranks). A hook
on the final layer gathers every rank's rows before diffusers unpatchifies the whole image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import TokenLayout
from ..attention.strips import StripPlan, dense_attention, merge_text
from ..config import ClearConfig
from .adapter import ModelAdapter, check_teacher_data_fits
from .errors import NotSupportedError
from .handle import ClearHandle, ForwardGrid, ForwardState, add_hooks, bind_forward_args, replace_sample
from .processor import ClearProcessor
from .strips import StripContext

SEQ_MULTIPLE = 32  # diffusers pads every part of the sequence to a multiple of this (SEQ_MULTI_OF)

# The image-stream attention projections (the main layers attend to image and caption tokens with
# the same projections, as FLUX's single-stream blocks do), plus the pooling weights.
TRAINABLE_PATTERN = re.compile(
    r"^(?:noise_refiner|layers)\.\d+\.attention\."
    r"(?:(?:to_q|to_k|to_v)\.(?:weight|bias)|processor\.spatial_weight)$"
)
STAGES = ("noise_refiner", "layers")
MAX_TEXT_TOKENS = 512  # ZImagePipeline's default max_sequence_length
DEFAULT_SIZE = 1024  # ZImagePipeline's default height and width


def padded(length: int) -> int:
    """``length`` rounded up to the multiple of 32 diffusers pads each part to."""
    return length + (-length) % SEQ_MULTIPLE


@dataclass(frozen=True)
class ZImageTokens:
    """The token layout of one forward.

    Attributes:
        noise_refiner: ``[grid | image pads]``.
        layers: ``[grid | image pads | caption with its pads]`` of the longest sample.
        kept: unified tokens of each sample (the rest of its row is batch padding, masked out).
        order: the grid's tokens in the sequence (sequence position -> raster cell): tile-major order,
            or patch-parallel this rank's rows; None: the whole grid in raster order.
        patch_size: latent pixels per token side.

    The layouts and ``kept`` always count the whole grid; patch-parallel, the sequences lack the other
    ranks' rows (``missing``).
    """

    noise_refiner: TokenLayout
    layers: TokenLayout
    kept: tuple[int, ...]
    order: torch.Tensor | None
    patch_size: int

    @property
    def inverse(self) -> torch.Tensor:
        """Raster cell -> sequence position (undoes a tile-major ``order``)."""
        return torch.argsort(self.order)

    @property
    def missing(self) -> int:
        """Grid tokens the sequences lack (the other ranks' rows)."""
        return 0 if self.order is None else self.layers.image_len - self.order.numel()


class ZImageGrid(ForwardGrid):
    """ForwardGrid plus the ``ZImageTokens`` of the forward in flight (None outside a forward)."""

    def __init__(self, config: ClearConfig):
        super().__init__(config)
        self.tokens: ZImageTokens | None = None

    def snapshot(self) -> ForwardState:
        if self.tokens is None:
            raise RuntimeError(
                "a CLEAR attention processor of a Z-Image transformer ran outside the transformer's forward, "
                "so the image grid is unknown. Either a ZImageControlNetModel runs the transformer's "
                "noise_refiner itself (ControlNet is not supported with CLEAR: call handle.restore()), or "
                "reentrant gradient checkpointing (use_reentrant=True) re-ran a block with a detached copy "
                "of the RoPE tensor that carries the forward's state: use the default, non-reentrant "
                "checkpointing"
            )
        return ForwardState(self.tokens.layers, self.tokens)


class ZImageStripContext(StripContext):
    """A patch-parallel model's ``StripContext`` plus what ``ZImageGrid`` adds for the processors."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens: ZImageTokens | None = None

    snapshot = ZImageGrid.snapshot


def read_tokens(x, cap_feats, patch_size: int, f_patch_size: int, config: ClearConfig, raster: bool):
    """``ZImageTokens`` of a forward's ``x`` (list of (C, F, H, W) latents) and ``cap_feats``."""
    if torch.is_tensor(x) and x.dim() == 5:
        raise ValueError(
            "a linearized ZImageTransformer2DModel takes x as a list of (C, F, H, W) latents, one per "
            f"sample (as ZImagePipeline passes it), not one stacked tensor {tuple(x.shape)}: pass list(x)"
        )
    if not isinstance(x, (list, tuple)) or not x or not all(torch.is_tensor(t) and t.dim() == 4 for t in x):
        kinds = type(x[0]).__name__ if isinstance(x, (list, tuple)) and x else type(x).__name__
        raise NotSupportedError(
            f"a linearized ZImageTransformer2DModel takes x as a list of (C, F, H, W) latents, one per "
            f"sample (got {kinds}); omni mode (nested lists with condition images) is not supported with "
            "CLEAR: call handle.restore() for it"
        )
    shapes = {tuple(t.shape[1:]) for t in x}
    if len(shapes) != 1:
        raise ValueError(
            f"x holds latents of different sizes {sorted(shapes)} (frames, height, width); CLEAR needs one "
            "image grid per batch: call the transformer once per size"
        )
    frames, height, width = shapes.pop()
    if frames != f_patch_size or height % patch_size or width % patch_size:
        raise ValueError(
            f"CLEAR needs one frame of latents whose height and width are multiples of the patch size "
            f"{patch_size}; x has latents of {frames} frames x {height} x {width} (f_patch_size "
            f"{f_patch_size}): pass images (F = 1) of a size the pipeline accepts"
        )
    if len(cap_feats) != len(x):
        raise ValueError(f"x has {len(x)} samples but cap_feats has {len(cap_feats)}; pass one caption each")
    grid_h, grid_w = height // patch_size, width // patch_size
    image = padded(grid_h * grid_w)
    captions = [padded(len(c)) for c in cap_feats]
    tile = None if raster else config.tile
    common = dict(text_first=False, down_factor=config.down_factor, tile=tile)
    refiner = TokenLayout(image - grid_h * grid_w, grid_h, grid_w, **common)
    layers = TokenLayout(image - grid_h * grid_w + max(captions), grid_h, grid_w, **common)
    order = None
    if tile is not None and (grid_h > tile[0] or grid_w > tile[1]):
        order = layers.sequence_to_raster(x[0].device)
    return ZImageTokens(refiner, layers, tuple(image + c for c in captions), order, patch_size)


def permute_patches(latents: torch.Tensor, patch_size: int, index: torch.Tensor) -> torch.Tensor:
    """One-frame latents (C, 1, H, W) with their p x p patches rearranged: patch cell ``i`` (raster)
    of the result is cell ``index[i]`` of ``latents``."""
    c, f, h, w = latents.shape
    p = patch_size
    patches = latents.reshape(c, f, h // p, p, w // p, p).permute(2, 4, 0, 1, 3, 5).flatten(0, 1)
    patches = patches[index].unflatten(0, (h // p, w // p))
    return patches.permute(2, 3, 0, 4, 1, 5).reshape(c, f, h, w)


def grid_in_order(t: torch.Tensor, order: torch.Tensor, grid_len: int) -> torch.Tensor:
    """Rows [B, S, ...] of a sequence whose first ``grid_len`` are the grid in raster order, with the
    grid's rows taken in ``order`` (tile-major, or this rank's rows); the rows after the grid as they are."""
    index = torch.cat([order.to(t.device), torch.arange(grid_len, t.shape[1], device=t.device)])
    return t[:, index]


def ordered_rope(freqs: torch.Tensor, order: torch.Tensor, grid_len: int) -> torch.Tensor:
    """RoPE rows [B, S, d/2] (diffusers': the whole grid first, raster order) for the tokens' ``order``;
    computed once per forward and kept on the tensor (the forward's other layers pass the same one)."""
    cached = getattr(freqs, "_cleardit_ordered", None)
    if cached is not None:
        return cached
    ordered = grid_in_order(freqs, order, grid_len)
    if not torch.compiler.is_compiling():
        freqs._cleardit_ordered = ordered
    return ordered


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Z-Image's rotary embedding (complex multiply in fp32) of x [B, S, heads, d]."""
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs.unsqueeze(2)
    return torch.view_as_real(rotated).flatten(3).type_as(x)


class ClearZImageAttnProcessor(ClearProcessor):
    """Replaces ZSingleStreamAttnProcessor: same projections, norms and RoPE; CLEAR instead of full
    attention, with the layout of its ``stage`` ("noise_refiner" or "layers")."""

    def __init__(self, geometry: ZImageGrid | None = None, config: ClearConfig | None = None,
                 param_like: torch.Tensor | None = None, stage: str = "layers"):  # fmt: skip
        super().__init__(geometry, config, param_like)
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage = stage

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        state = self.forward_state(freqs_cis)
        tokens: ZImageTokens = state.extra
        layout = getattr(tokens, self.stage)
        query, key, value = (
            f(hidden_states).unflatten(-1, (attn.heads, -1)) for f in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            if tokens.order is not None:
                freqs_cis = ordered_rope(freqs_cis, tokens.order, layout.image_len)
            query, key = apply_rope(query, freqs_cis), apply_rope(key, freqs_cis)
        if query.shape[1] != layout.seq_len - tokens.missing:
            raise ValueError(
                f"{self.stage} attention got {query.shape[1]} tokens but the inputs describe "
                f"{layout.seq_len - tokens.missing} ({layout.height}x{layout.width} grid"
                + (f" less {tokens.missing} of other ranks" if tokens.missing else "")
                + f" + {layout.text_len} global tokens)"
            )
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        kept = tokens.kept if self.stage == "layers" else (layout.seq_len,) * q.shape[0]
        out = self.attend(q, k, v, layout, kept, attention_mask, tokens.missing)
        out = out.transpose(1, 2).flatten(2, 3)
        out = attn.to_out[0](out.to(query.dtype))
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out

    def attend(
        self, q, k, v, layout: TokenLayout, kept: tuple[int, ...], attention_mask, missing: int = 0
    ) -> torch.Tensor:
        """CLEAR over [B, heads, S, d]; sample b keeps its first ``kept[b]`` keys (diffusers' mask).
        Patch-parallel, the sequence lacks ``missing`` grid tokens (other ranks' rows) that ``kept``,
        ``layout`` and the mask count."""
        seq_len = q.shape[2] + missing  # the whole sequence's length
        padding = any(n != seq_len for n in kept)
        if padding != (attention_mask is not None) or (
            padding and tuple(attention_mask.shape) != (q.shape[0], seq_len)
        ):
            shape = None if attention_mask is None else tuple(attention_mask.shape)
            raise RuntimeError(
                f"the attention mask ({shape}) does not match the batch padding read from the inputs "
                f"(kept tokens {kept} of {seq_len})"
            )
        if not padding:
            return self.attention(q, k, v, layout)
        out = torch.empty_like(q)
        for n in sorted(set(kept)):  # the same groups, in the same order, on every rank
            rows = torch.tensor([b for b, m in enumerate(kept) if m == n], device=q.device)
            local = n - missing
            qs, ks, vs = q[rows], k[rows, :, :local], v[rows, :, :local]
            part = dataclasses.replace(layout, text_len=n - layout.image_len)
            out[rows, :, :local] = self.attention(qs[:, :, :local], ks, vs, part)
            if n < seq_len:  # batch-padding queries see every kept key (the mask drops keys only)
                grid_tokens = layout.image_len - missing
                out[rows, :, local:] = self.padding_attention(qs[:, :, local:], ks, vs, grid_tokens)
        return out

    def padding_attention(self, q, k, v, grid_tokens: int) -> torch.Tensor:
        """Batch-padding queries: full attention to the kept keys ``k``/``v`` (this sequence's
        ``grid_tokens`` grid tokens, then the global ones). Patch-parallel, the other ranks hold the
        rest of the grid: each rank's partial softmax, merged over the ranks as the strip attention
        merges its global queries' (the global keys counted on rank 0 only)."""
        comm = getattr(self.geometry, "comm", None)
        if comm is None:
            return F.scaled_dot_product_attention(q, k, v, scale=self.config.scale)
        merge = self.geometry.text_merge
        if merge == "exact" and comm.rank != 0:
            k, v = k[:, :, :grid_tokens], v[:, :, :grid_tokens]
        scale = self.config.scale if self.config.scale is not None else q.shape[-1] ** -0.5
        out, lse = dense_attention(q, k, v, scale)
        return merge_text(out, lse, comm, merge)[0].to(q.dtype)


# ----------------------------------------------------------------------------- forward hooks
def _grid_pre_hook(module, args, kwargs):
    """Read the grid from the shapes of ``x``, publish the layouts, rearrange the latents' patches
    into tile-major order."""
    geometry: ZImageGrid = module._cleardit_grid
    geometry.check_processors(module)
    bound = bind_forward_args(module, args, kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    if arguments["siglip_feats"] is not None or arguments["image_noise_mask"] is not None:
        raise NotSupportedError(
            "omni mode (siglip_feats, image_noise_mask) is not supported with CLEAR; call handle.restore()"
        )
    x = arguments["x"]
    controlnet = arguments["controlnet_block_samples"] is not None
    comm = getattr(geometry, "comm", None)
    if comm is not None and controlnet:
        raise NotSupportedError(
            "patch-parallel Z-Image does not support ControlNet residuals (controlnet_block_samples); "
            "run them on one device"
        )
    # raster order with controlnet residuals (they arrive in raster order) and for the original
    # attention swapped in on purpose (a distillation teacher): only CLEAR's processors permute RoPE
    raster = controlnet or geometry.original_pass
    tokens = read_tokens(
        x, arguments["cap_feats"], arguments["patch_size"], arguments["f_patch_size"], geometry.config, raster
    )
    if comm is not None:  # patch-parallel: this rank's rows, kept at the first noise-refiner block
        config, grid = geometry.config, tokens.layers
        geometry.plan = StripPlan(grid.height, grid.width, comm.world, config.radius, config.down_factor)
        y0, y1 = geometry.plan.strip(comm.rank)
        own_rows = torch.arange(y0 * grid.width, y1 * grid.width, device=x[0].device)
        tokens = dataclasses.replace(tokens, order=own_rows)
        if comm.counter is not None:
            comm.counter.next_step()
    elif tokens.order is not None:
        arguments["x"] = [permute_patches(t, tokens.patch_size, tokens.order) for t in x]
    geometry.tokens, geometry.layout = tokens, tokens.layers
    arguments.pop("self", None)
    return (), dict(arguments)


def _grid_post_hook(module, args, kwargs, output):
    """Put the output's patches back in raster order; the forward is over (its state stays recorded
    on its RoPE tensors for gradient checkpointing's re-runs)."""
    geometry: ZImageGrid = module._cleardit_grid
    tokens, geometry.tokens, geometry.layout = geometry.tokens, None, None
    if output is None or tokens is None or tokens.order is None:  # output is None when forward raised
        return output
    if getattr(geometry, "comm", None) is not None:  # patch-parallel: gathered at the final layer
        return output
    inverse = tokens.inverse.to(tokens.order.device)
    return replace_sample(
        output, lambda sample: [permute_patches(t, tokens.patch_size, inverse) for t in sample]
    )


def _keep_own_rows_hook(module, args, kwargs):
    """On the first noise-refiner block (patch-parallel): keep ``[this rank's rows | image pads]`` of the
    embedded image sequence; diffusers builds the rest of the forward from it."""
    tokens = module._cleardit_grid.tokens
    if tokens is None:  # run outside the transformer's forward: its processors say why that fails
        return None
    bound = bind_forward_args(module, args, kwargs)
    bound.arguments["x"] = grid_in_order(bound.arguments["x"], tokens.order, tokens.noise_refiner.image_len)
    bound.arguments.pop("self", None)
    return (), dict(bound.arguments)


def _gather_rows_hook(module, args, kwargs, output):
    """On the final layer (patch-parallel): every rank's rows, in raster order, in front of the rest of
    the sequence, so diffusers unpatchifies the whole grid."""
    geometry: ZImageStripContext = module._cleardit_grid
    if output is None or geometry.tokens is None:
        return output
    plan, comm = geometry.plan, geometry.comm
    counts = [plan.rows(r) * plan.width for r in range(comm.world)]
    own = counts[comm.rank]
    rows = comm.all_gather(output[:, :own], counts, 1, "output", "output gather", None)
    return torch.cat([*rows, output[:, own:]], dim=1)


# ----------------------------------------------------------------------------- the adapter
class ZImageAdapter(ModelAdapter):
    """Z-Image (Tongyi-MAI/Z-Image-Turbo and relatives)."""

    family = "zimage"
    transformer_classes = ("ZImageTransformer2DModel",)
    pipeline_classes = ("ZImagePipeline",)
    img2img_class = "ZImageImg2ImgPipeline"
    text_token_limit = MAX_TEXT_TOKENS
    grid_class = ZImageGrid
    strip_context_class = ZImageStripContext
    trainable_pattern = TRAINABLE_PATTERN
    text_conditions = ("prompt_embeds", "prompt_attention_mask")
    # diffusers builds the RoPE from the (permuted) patches inside the forward; only CLEAR's processors
    # put it in tile-major order, so the distillation teacher runs in raster order
    teacher_keeps_tile_order = False
    default_steps = 9  # Z-Image-Turbo's recommended steps, guidance off
    default_guidance = None  # no distilled guidance input

    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        return [b.attention for b in transformer.noise_refiner] + [b.attention for b in transformer.layers]

    def strips_unsupported(self) -> str | None:
        return None

    def install_strips(
        self, transformer: nn.Module, config: ClearConfig, context: StripContext
    ) -> ClearHandle:
        if not len(transformer.noise_refiner):
            raise NotSupportedError(
                "patch-parallel Z-Image keeps a rank's rows at the first noise-refiner block, and this "
                "transformer has none"
            )
        handle = super().install_strips(transformer, config, context)
        hooks = add_hooks(transformer.noise_refiner[0], _keep_own_rows_hook, state=context)
        for final_layer in transformer.all_final_layer.values():
            hooks += add_hooks(final_layer, post_hook=_gather_rows_hook, state=context)
        handle.hooks += hooks
        return handle

    def install_into(
        self, transformer: nn.Module, geometry: ZImageGrid | ZImageStripContext, handle
    ) -> ClearHandle:
        config = geometry.config
        geometry.adapter = self
        for stage in STAGES:
            for block in getattr(transformer, stage):
                attn = block.attention
                handle.originals.append((attn, attn.processor))
                attn.set_processor(ClearZImageAttnProcessor(geometry, config, attn.to_q.weight, stage))
        # the hooks' state: per model, carried by deepcopy
        handle.hooks = add_hooks(transformer, _grid_pre_hook, _grid_post_hook, state=geometry)
        return handle

    def attention_geometry(self, transformer: nn.Module) -> tuple[int, int, int]:
        cfg = transformer.config
        layers = int(cfg.n_layers) + int(cfg.n_refiner_layers)  # the noise refiner's and the main layers
        return int(cfg.n_heads), int(cfg.dim) // int(cfg.n_heads), layers

    def consistency_modules(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        """The main layers' attention (image and caption together)."""
        return [(f"layers.{i}.attention", b.attention) for i, b in enumerate(transformer.layers)]

    # -- high-resolution hooks ---------------------------------------------------------------------
    @contextlib.contextmanager
    def rope_theta_scaled(self, transformer: nn.Module, factor: float) -> Iterator[None]:
        rope = transformer.rope_embedder  # caches its tables on first use: recompute them for the new theta
        original, cached = rope.theta, rope.freqs_cis
        rope.theta, rope.freqs_cis = original * factor, None
        try:
            yield
        finally:
            rope.theta, rope.freqs_cis = original, cached

    def query_norms(self, transformer: nn.Module) -> list[nn.Module]:
        return [attn.norm_q for attn in self.attention_modules(transformer) if attn.norm_q is not None]

    # -- pipelines ---------------------------------------------------------------------------------
    def load_pipeline(self, folder, dtype: torch.dtype):
        return padded_text_pipeline().from_pretrained(str(folder), dtype=dtype, local_files_only=True)

    def img2img_pipeline_class(self) -> type:
        return resizing_img2img_pipeline()

    def default_size(self, pipe) -> int:
        return DEFAULT_SIZE

    def call_options(self, guidance: float, true_cfg: float, negative_prompt: str, text_len: int) -> dict:
        # ZImagePipeline's guidance_scale g predicts pos + g * (pos - neg): classifier-free guidance of
        # scale 1 + g (0 = off, as Z-Image-Turbo runs)
        options = dict(guidance_scale=float(true_cfg) - 1.0, max_sequence_length=text_len)
        if true_cfg > 1:
            options.update(negative_prompt=negative_prompt)
        return options

    def encode_prompt(self, pipe, prompt, *, images_per_prompt, text_len, true_cfg, negative_prompt) -> dict:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)

        def encode(texts):  # ZImagePipeline takes one embedding per image: [tokens, width] each
            embeds = pipe._encode_prompt(texts, pipe._execution_device, max_sequence_length=text_len)
            return [e for e in embeds for _ in range(images_per_prompt)]

        kwargs = dict(prompt_embeds=encode(prompts))
        if true_cfg > 1:
            kwargs.update(negative_prompt_embeds=encode([negative_prompt or ""] * len(prompts)))
        return kwargs

    def initial_noise(
        self, pipe, batch: int, height: int, width: int, dtype, device, generator
    ) -> torch.Tensor:
        channels = self.latent_channels(pipe.transformer)  # ZImagePipeline draws fp32 noise
        noise = pipe.prepare_latents(batch, channels, height, width, torch.float32, device, generator)
        return noise.to(dtype)

    def unpack_latents(self, pipe, packed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return packed  # ZImagePipeline's latents are the VAE's [B, C, h, w]; it patchifies inside

    # -- training ----------------------------------------------------------------------------------
    def encode_text(self, pipe, prompt: str, text_len: int) -> dict[str, torch.Tensor]:
        """The prompt's embedding padded with zeros to ``text_len`` rows, and its mask (the pipeline
        keeps only the prompt's real tokens; teacher data stores one length for all prompts)."""
        embeds = pipe._encode_prompt([prompt], pipe._execution_device, max_sequence_length=text_len)[0]
        padded_embeds = embeds.new_zeros(text_len, embeds.shape[-1])
        padded_embeds[: len(embeds)] = embeds
        mask = torch.arange(text_len, device=embeds.device) < len(embeds)
        return {"prompt_embeds": padded_embeds, "prompt_attention_mask": mask}

    def check_conditions(self, transformer: nn.Module, sample: dict) -> None:
        cfg = transformer.config
        checks = [
            ("text embedding width", sample["prompt_embeds"].shape[-1], cfg.cap_feat_dim),
            ("text mask length", sample["prompt_attention_mask"].shape[-1], sample["prompt_embeds"].shape[0]),
            ("latent channels", sample["latents"].shape[0], cfg.in_channels),
        ]
        check_teacher_data_fits(checks)

    def training_inputs(self, transformer, noisy, sigma, conditions, guidance) -> dict:
        masks = conditions["prompt_attention_mask"].bool()
        return dict(
            x=list(noisy.unsqueeze(2).unbind(0)),  # one (C, 1, h, w) frame per sample
            t=1 - sigma,  # Z-Image's time runs from 0 (noise) to 1 (image)
            cap_feats=[e[m] for e, m in zip(conditions["prompt_embeds"], masks, strict=True)],
            return_dict=False,
        )

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> [B, C, 1, h, w]: the transformer's per-sample (C, 1, h, w), stacked."""
        return latents.unsqueeze(2)

    def velocity(self, output) -> torch.Tensor:
        # one (C, 1, h, w) tensor per sample; Z-Image predicts x0 - noise, the opposite sign
        return -torch.stack(list(output[0]))

    def latent_channels(self, transformer: nn.Module) -> int:
        return int(transformer.config.in_channels)


@functools.cache
def padded_text_pipeline():
    """``ZImagePipeline`` that also takes the text as one padded tensor with its mask (how teacher data
    stores text of any length), and encodes the negative prompt itself when given text embeddings
    with guidance on (diffusers then asks for ``negative_prompt_embeds``). Built on first use:
    importing the pipeline imports transformers."""
    from diffusers import ZImagePipeline

    class ZImagePaddedTextPipeline(ZImagePipeline):
        def __call__(self, *args, prompt_attention_mask=None, **kwargs):
            embeds = kwargs.get("prompt_embeds")
            if prompt_attention_mask is not None:
                masks = prompt_attention_mask.bool()
                kwargs["prompt_embeds"] = embeds = [e[m] for e, m in zip(embeds, masks, strict=True)]
            prompt = kwargs.get("prompt", args[0] if args else None)
            if embeds is not None and prompt is None and kwargs.get("negative_prompt_embeds") is None:
                if kwargs.get("guidance_scale", 5.0) > 0:  # 5.0: ZImagePipeline's default
                    negative = kwargs.pop("negative_prompt", None) or ""
                    kwargs["negative_prompt_embeds"] = self._encode_prompt(
                        [negative] * len(embeds), self._execution_device,
                        max_sequence_length=kwargs.get("max_sequence_length", MAX_TEXT_TOKENS),
                    )  # fmt: skip
            return super().__call__(*args, **kwargs)

    return ZImagePaddedTextPipeline


@functools.cache
def resizing_img2img_pipeline():
    """``ZImageImg2ImgPipeline`` that resizes PIL images to ``height`` x ``width`` first: diffusers'
    preprocesses them at their own size (FLUX's img2img resizes), so an image of another size
    than the output fails when the noise is added. Built on first use, as above."""
    from diffusers import ZImageImg2ImgPipeline
    from PIL import Image

    class ZImageResizingImg2ImgPipeline(ZImageImg2ImgPipeline):
        def __call__(self, *args, image=None, height=None, width=None, **kwargs):
            if height is not None and width is not None:
                images = image if isinstance(image, list) else [image]
                if all(isinstance(i, Image.Image) for i in images):
                    image = [self.image_processor.resize(i, height, width) for i in images]
            return super().__call__(*args, image=image, height=height, width=width, **kwargs)

    return ZImageResizingImg2ImgPipeline
