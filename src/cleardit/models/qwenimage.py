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
"""

from __future__ import annotations

import dataclasses
import re
from math import prod

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from torch import nn

from ..attention import TokenLayout, clear_attention, initial_pool_weight
from ..config import ClearConfig
from .adapter import ModelAdapter
from .errors import NotSupportedError
from .flux import bind_forward_args
from .handle import ClearHandle, ForwardGrid, ForwardState, add_hooks

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
        image_order: image-stream index [target + conditions]: the token at position i came from
            position ``image_order[i]`` of the input (tile-major target); None for the input order.
        groups: ``key_groups`` of the text mask; None when every text token is kept.
    """

    text_len: int
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


# ----------------------------------------------------------------------------- the processor
class ClearQwenAttnProcessor(nn.Module):
    """Replaces ``QwenDoubleStreamAttnProcessor2_0``: the same projections, norms and per-stream RoPE;
    CLEAR attention over ``[text | conditions | target]`` instead of full attention."""

    _attention_backend = None  # what diffusers' set_attention_backend writes; CLEAR picks its own
    _parallel_config = None

    def __init__(self, geometry: QwenGrid | None = None, config: ClearConfig | None = None, param_like=None):
        super().__init__()
        self.geometry = geometry
        self.config = config
        self.spatial_weight = None
        if config is not None and config.down_factor is not None:
            df = config.down_factor
            # the layout of FLUX's reference files (1, 1, 1, df, 1, df, 1), one format for every family
            w = initial_pool_weight(df).reshape(1, 1, 1, df, 1, df, 1)
            self.spatial_weight = nn.Parameter(w.to(device=param_like.device, dtype=param_like.dtype))

    def pool_weight(self) -> torch.Tensor | None:
        if self.spatial_weight is None:
            return None
        return self.spatial_weight.reshape(self.config.down_factor, self.config.down_factor)

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
        state = self.geometry.state_for(image_rotary_emb[0] if image_rotary_emb is not None else None)
        layout, fwd = state.layout, state.extra
        text_len, image_len = encoder_hidden_states.shape[1], hidden_states.shape[1]
        if text_len != fwd.text_len or text_len + image_len != layout.seq_len:
            raise ValueError(
                f"attention got {text_len} text + {image_len} image tokens but the forward's inputs describe "
                f"{fwd.text_len} text + {layout.seq_len - fwd.text_len} image tokens"
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
        target_len = layout.image_len

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
        cfg = self.config
        if groups is None:
            return clear_attention(
                q, k, v, layout, cfg.radius, pool_weight=self.pool_weight(), scale=cfg.scale,
                backend=cfg.backend,
            )  # fmt: skip
        seq_len = layout.seq_len
        out = torch.zeros_like(q)
        for rows, kept, padded in groups:
            text_len = kept.numel() + padded.numel()
            keys = torch.cat([kept, torch.arange(text_len, seq_len, device=q.device)])
            qg, kg, vg = q[rows], k[rows][:, :, keys], v[rows][:, :, keys]
            kept_layout = dataclasses.replace(layout, text_len=layout.text_len - padded.numel())
            part = clear_attention(
                qg[:, :, keys], kg, vg, kept_layout, cfg.radius, pool_weight=self.pool_weight(),
                scale=cfg.scale, backend=cfg.backend,
            )  # fmt: skip
            out[rows[:, None], :, keys[None, :]] = part.transpose(1, 2).to(out.dtype)
            if padded.numel():
                padded_out = F.scaled_dot_product_attention(qg[:, :, padded], kg, vg, scale=cfg.scale)
                out[rows[:, None], :, padded[None, :]] = padded_out.transpose(1, 2).to(out.dtype)
        return out


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
    # the original processors (a distillation teacher pass) apply RoPE in input order: no permutation;
    # controlnet residuals arrive in raster order: no permutation either
    tile = config.tile
    if geometry.original_pass or bound.arguments.get("controlnet_block_samples") is not None:
        tile = None
    layout = TokenLayout(text.shape[1] + cond_len, height, width, down_factor=config.down_factor, tile=tile)
    order = inverse = None
    if tile is not None and (height > tile[0] or width > tile[1]):
        rest = torch.arange(layout.image_len, hidden.shape[1], device=hidden.device)
        order = torch.cat([layout.sequence_to_raster(hidden.device), rest])
        inverse = torch.cat([layout.raster_to_sequence(hidden.device), rest])
        bound.arguments["hidden_states"] = hidden[:, order]
    groups = None
    mask = bound.arguments.get("encoder_hidden_states_mask")
    if mask is not None and not geometry.original_pass:  # the original processors read the mask
        groups = key_groups(text_keep(mask.to(text.device), *text.shape[:2]))
        bound.arguments["encoder_hidden_states_mask"] = None  # read once; the blocks build no mask
    geometry.layout = layout
    geometry.forward = QwenForward(text.shape[1], order, groups)
    geometry.inverse = inverse
    bound.arguments.pop("self", None)
    return (), dict(bound.arguments)


def _post_hook(module, args, kwargs, output):
    """Undo the tile-major permutation on the output (target and condition tokens, as it came in)."""
    geometry: QwenGrid = module._cleardit_grid
    inverse, geometry.inverse = geometry.inverse, None
    # layout and forward stay set: gradient checkpointing re-runs the blocks during backward
    if inverse is None or output is None:  # output is None when forward raised
        return output
    if isinstance(output, tuple):
        return (output[0][:, inverse], *output[1:])
    output.sample = output.sample[:, inverse]
    return output


# ----------------------------------------------------------------------------- the adapter
class QwenImageAdapter(ModelAdapter):
    """Qwen-Image and Qwen-Image-Edit (condition images are global tokens)."""

    family = "qwenimage"
    transformer_classes = ("QwenImageTransformer2DModel",)
    pipeline_classes = ("QwenImagePipeline",)
    trainable_pattern = TRAINABLE_PATTERN

    def describe(self) -> str:
        classes = ", ".join(self.transformer_classes)
        return f"{self.family} ({classes}): linearize, weights, --devices: not yet"

    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        return [block.attn for block in transformer.transformer_blocks]

    def install(self, transformer: nn.Module, config: ClearConfig) -> ClearHandle:
        if getattr(transformer.config, "use_layer3d_rope", False):
            raise NotSupportedError(
                "Qwen-Image-Layered (use_layer3d_rope) generates several layers of one image at once; CLEAR "
                "supports one target grid (Qwen-Image, Qwen-Image-Edit)"
            )
        geometry = QwenGrid(config)
        geometry.adapter = self
        handle = ClearHandle(transformer, config, self.trainable_pattern)
        for attn in self.attention_modules(transformer):
            handle.originals.append((attn, attn.processor))
            attn.set_processor(ClearQwenAttnProcessor(geometry, config, attn.to_q.weight))
        transformer._cleardit_grid = geometry  # the hooks' state: per model, carried by deepcopy
        handle.hooks = add_hooks(transformer, _pre_hook, _post_hook)
        return handle

    def strips_unsupported(self) -> str | None:
        return (
            "patch-parallel inference (--devices) is not supported for Qwen-Image yet (its condition images "
            "and text-padding mask are not split into strips)"
        )

    def attention_geometry(self, transformer: nn.Module) -> tuple[int, int, int]:
        cfg = transformer.config
        return int(cfg.num_attention_heads), int(cfg.attention_head_dim), int(cfg.num_layers)

    def consistency_modules(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every block's joint attention (Qwen-Image has no single-stream blocks); its first output is
        the image stream's."""
        return [
            (f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(transformer.transformer_blocks)
        ]
