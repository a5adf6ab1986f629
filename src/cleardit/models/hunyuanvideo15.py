"""HunyuanVideo 1.5 adapter: diffusers' ``HunyuanVideo15Transformer3DModel`` (the transformer only).

HunyuanVideo 1.5 has double-stream blocks only. Each block's joint attention runs over
``[video | conditions]``: the video tokens first, in raster order over the (T, H, W) latent grid
divided by the patch size (frames, then rows, then columns), then one block of condition tokens
that the forward builds per sample as ``[kept image | kept ByT5 | kept MLLM text | padded image |
padded ByT5 | padded MLLM text]`` (the SigLIP image-condition tokens are all padding in
text-to-video, where ``image_embeds`` is zero). The blocks get that block's mask ``attention_mask``
[B, conditions] and diffusers' processor attends with the outer product of [video (kept) | mask]:
padded keys are dropped for every query and padded queries see nothing (scaled dot-product
attention then gives zeros).

The rule here: video query (t, y, x) sees video key (t', y', x') iff
dt²·r² + (dy² + dx²)·rt² < r²·rt² (``temporal_radius`` None: every frame); every condition token
(image, ByT5, MLLM text) is global. The padding mask is honoured as diffusers does: samples that
keep the same condition tokens run as one smaller layout (``key_groups``), padded queries output
zeros. The grid comes from ``hidden_states`` (B, C, T, H, W) and the patch sizes, read by a forward
pre-hook. RoPE is built inside the forward from that shape in raster order, so the tile-major order
is applied once per forward by hooks on ``rope`` (its cos/sin rows) and ``x_embedder`` (the video
tokens), and undone on ``proj_out`` before the transformer unpatchifies; every op between them but
attention is token-wise, and the original processors (a distillation teacher pass) compute the
same numbers in that order.

Not supported yet: patch-parallel strips (images only) and the pipeline jobs (generate, distill,
eval model), which run Wan pipelines so far; ``load_pipeline`` says so.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from ..attention import TokenLayout
from ..config import ClearConfig
from .adapter import ModelAdapter
from .errors import NotSupportedError
from .handle import ClearHandle, ForwardGrid, add_hooks, bind_forward_args
from .processor import ClearProcessor
from .qwenimage import key_groups

# The video stream's attention projections of each block (as the reference release trains the image
# stream of FLUX's double-stream blocks), plus the pooling weights of the down-sampled variant.
TRAINABLE_PATTERN = re.compile(
    r"^transformer_blocks\.\d+\.attn\.(?:(?:to_q|to_k|to_v|to_out\.0)\.(?:weight|bias)|processor\.spatial_weight)$"
)
# what the forward needs beyond the latents (diffusers' own forward fails obscurely without them)
CONDITION_INPUTS = (
    "encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2", "encoder_attention_mask_2",
    "image_embeds",
)  # fmt: skip
JOBS_REFUSED = (
    "cleardit's generate, distill and eval model jobs run Wan video pipelines so far, not HunyuanVideo 1.5; "
    "its transformer can be linearized directly: cleardit.linearize(pipe.transformer, radius=..., "
    "temporal_radius=...) on a HunyuanVideo15Pipeline you load yourself"
)

# (sample rows, end of the kept keys or their index in [video | conditions], kept condition tokens)
KeptGroup = tuple[torch.Tensor | slice, int | torch.Tensor, int]


def latent_grid(hidden_states, patch_t: int, patch: int) -> tuple[int, int, int]:
    """(T, H, W) token grid of latents (B, C, T, H, W) cut into (patch_t, patch, patch) patches."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 5:
        shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else hidden_states
        raise ValueError(
            "HunyuanVideo15Transformer3DModel takes hidden_states as video latents [batch, channels, "
            f"frames, height, width], got {shape!r}"
        )
    frames, height, width = hidden_states.shape[2:]
    if frames % patch_t or height % patch or width % patch:
        raise ValueError(
            f"latents of {frames}x{height}x{width} (frames x height x width) are not a whole number of "
            f"{patch_t}x{patch}x{patch} patches, so they do not form one token grid (diffusers would "
            f"silently crop them); crop or pad the latents to multiples of ({patch_t}, {patch}, {patch})"
        )
    return frames // patch_t, height // patch, width // patch


def kept_groups(mask: torch.Tensor, video_len: int) -> list[KeptGroup] | None:
    """The condition-token mask [B, M] (as the blocks get it) as groups of samples keeping the same
    tokens; None when nothing is padded. diffusers puts each sample's kept tokens first, so the kept
    keys are usually the prefix [video | first n conditions] (a slice end, no gather)."""
    groups = key_groups(mask.bool())
    if groups is None:
        return None
    result = []
    for rows, kept, _ in groups:
        n = kept.numel()
        prefix = n == 0 or int(kept[-1]) == n - 1  # kept positions are sorted
        keys = (
            video_len + n
            if prefix
            else torch.cat([torch.arange(video_len, device=kept.device), video_len + kept])
        )
        result.append((slice(None) if len(groups) == 1 else rows, keys, n))
    return result


class HunyuanVideo15Grid(ForwardGrid):
    """ForwardGrid plus the tile-major permutation of the forward in flight (applied by the hooks on
    ``rope``, ``x_embedder`` and ``proj_out``)."""

    def __init__(self, config: ClearConfig):
        super().__init__(config)
        self.order: torch.Tensor | None = None  # raster -> tile-major
        self.inverse: torch.Tensor | None = None  # tile-major -> raster


class ClearHunyuanVideo15AttnProcessor(ClearProcessor):
    """Replaces ``HunyuanVideo15AttnProcessor2_0``: the same projections, q/k norms and video RoPE;
    CLEAR over ``[video | conditions]`` instead of full attention, with the condition mask."""

    _attention_backend = None  # what diffusers' set_attention_backend writes; CLEAR picks its own
    _parallel_config = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("HunyuanVideo 1.5 attention needs encoder_hidden_states (the condition tokens)")
        layout = self.geometry.state_for(image_rotary_emb[0] if image_rotary_emb is not None else None).layout
        video_len, cond_len = hidden_states.shape[1], encoder_hidden_states.shape[1]
        if video_len != layout.image_len or cond_len != layout.text_len:
            raise ValueError(
                f"attention got {video_len} video + {cond_len} condition tokens but the forward's inputs "
                f"describe {layout.image_len} ({layout.describe_grid()}) + {layout.text_len}"
            )
        query, key, value = (
            f(hidden_states).unflatten(2, (attn.heads, -1)) for f in (attn.to_q, attn.to_k, attn.to_v)
        )
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:  # the hooks put its rows in this forward's token order
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        cq, ck, cv = (
            f(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = (torch.cat(p, dim=1).transpose(1, 2) for p in ((query, cq), (key, ck), (value, cv)))
        groups = None if attention_mask is None else self.groups(attention_mask, video_len)
        out = self.attend(q, k, v, layout, groups).transpose(1, 2).flatten(2, 3).to(query.dtype)
        video_out = attn.to_out[1](attn.to_out[0](out[:, :video_len]))
        return video_out, attn.to_add_out(out[:, video_len:])

    @staticmethod
    def groups(mask: torch.Tensor, video_len: int) -> list[KeptGroup] | None:
        """``kept_groups`` of a forward's mask, read once: every block gets the same mask tensor (also
        when gradient checkpointing re-runs a block), so the groups are kept on it."""
        if torch.compiler.is_compiling():
            return kept_groups(mask, video_len)
        cached = getattr(mask, "_cleardit_groups", None)
        if cached is None or cached[0] != video_len:
            cached = (video_len, kept_groups(mask, video_len))
            mask._cleardit_groups = cached
        return cached[1]

    def attend(self, q, k, v, layout: TokenLayout, groups: list[KeptGroup] | None) -> torch.Tensor:
        """CLEAR over [B, heads, N, d] in the order [video | conditions]. Padded condition keys are
        dropped for every query; padded queries see no key and output zeros, as diffusers' mask gives."""
        if groups is None:
            return self.attention(q, k, v, layout)
        out = torch.zeros_like(q)
        for rows, keys, kept in groups:
            index = slice(None, keys) if isinstance(keys, int) else keys
            part = self.attention(
                *(t[rows][:, :, index] for t in (q, k, v)), dataclasses.replace(layout, text_len=kept)
            )
            if isinstance(rows, slice):  # one group: every sample
                out[:, :, index] = part
            else:
                keys = torch.arange(keys, device=q.device) if isinstance(keys, int) else keys
                out[rows[:, None], :, keys[None, :]] = part.transpose(1, 2)
        return out


# ----------------------------------------------------------------------------- forward hooks
def _pre_hook(module, args, kwargs):
    """Read the grid from the latents, publish the layout and choose this forward's token order."""
    geometry: HunyuanVideo15Grid = module._cleardit_grid
    geometry.check_processors(module)
    bound = bind_forward_args(module, args, kwargs)
    missing = [name for name in CONDITION_INPUTS if bound.arguments.get(name) is None]
    if missing:
        raise ValueError(
            f"a linearized HunyuanVideo15Transformer3DModel needs {', '.join(missing)}: its forward always "
            "joins the MLLM text, the ByT5 text and the image-condition tokens (image_embeds of zeros for "
            "text-to-video), as HunyuanVideo15Pipeline passes them"
        )
    cfg = module.config
    frames, height, width = latent_grid(bound.arguments["hidden_states"], cfg.patch_size_t, cfg.patch_size)
    conditions = sum(
        bound.arguments[n].shape[1]
        for n in ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds")
    )
    config = geometry.config
    layout = TokenLayout(
        conditions, height, width, text_first=False, down_factor=config.down_factor, tile=config.tile,
        frames=frames,
    )  # fmt: skip
    device = bound.arguments["hidden_states"].device
    geometry.order = geometry.inverse = None
    if layout.tile is not None and not _tile_order_is_raster(layout):
        geometry.order = layout.sequence_to_raster(device)
        geometry.inverse = layout.raster_to_sequence(device)
    geometry.layout = layout


def _tile_order_is_raster(layout: TokenLayout) -> bool:
    """Whether the tile-major order is the raster order: tiles of whole rows, one frame deep or
    holding whole frames (then nothing needs permuting)."""
    frames, rows, cols = layout.tile_3d
    return cols >= layout.width and (frames == 1 or rows >= layout.height)


def _post_hook(module, args, kwargs, output):
    # the layout stays set: gradient checkpointing re-runs the blocks during backward
    module._cleardit_grid.order = module._cleardit_grid.inverse = None
    return output


def _rope_hook(module, args, kwargs, output):
    """On ``rope``: the (cos, sin) rows [N, head_dim] in this forward's token order."""
    order = module._cleardit_grid.order
    return output if order is None else tuple(f[order] for f in output)


def _to_tile_major_hook(module, args, kwargs, output):
    """On ``x_embedder``: video tokens [B, N, C] from raster into tile-major order."""
    order = module._cleardit_grid.order
    return output if order is None else output[:, order]


def _to_raster_hook(module, args, kwargs, output):
    """On ``proj_out``: video tokens back into raster order before the transformer unpatchifies."""
    inverse = module._cleardit_grid.inverse
    return output if inverse is None else output[:, inverse]


# ----------------------------------------------------------------------------- the adapter
class HunyuanVideo15Adapter(ModelAdapter):
    """HunyuanVideo 1.5 (text-to-video and image-to-video transformers): linearize and weights."""

    family = "hunyuanvideo15"
    transformer_classes = ("HunyuanVideo15Transformer3DModel",)
    trainable_pattern = TRAINABLE_PATTERN
    grid_class = HunyuanVideo15Grid
    video = True

    def describe(self) -> str:
        return (
            f"{self.family} ({', '.join(self.transformer_classes)}): linearize (T x H x W video grid, "
            "temporal_radius; image-condition, ByT5 and text tokens global; padding mask), weights; "
            "generate / distill / eval model: not yet (linearize pipe.transformer); --devices: not yet"
        )

    # -- CLEAR attention ---------------------------------------------------------------------------
    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        """Every block's joint attention (the text token refiner's text-only attention stays full)."""
        return [block.attn for block in transformer.transformer_blocks]

    def strips_unsupported(self) -> str | None:
        return (
            "patch-parallel inference (--devices) splits an image into row strips; it does not run video "
            "models such as HunyuanVideo 1.5 yet"
        )

    def install_into(self, transformer: nn.Module, geometry: ForwardGrid, handle) -> ClearHandle:
        modules = self.attention_modules(transformer)
        foreign = sorted({type(a.processor).__name__ for a in modules} - {"HunyuanVideo15AttnProcessor2_0"})
        if foreign:
            raise NotSupportedError(
                "CLEAR for HunyuanVideo 1.5 replaces diffusers' HunyuanVideo15AttnProcessor2_0; this model "
                f"has {', '.join(foreign)}: put the original processors back before linearize"
            )
        geometry.adapter = self
        for attn in modules:
            handle.originals.append((attn, attn.processor))
            attn.set_processor(ClearHunyuanVideo15AttnProcessor(geometry, geometry.config, attn.to_q.weight))
        handle.hooks = (
            *add_hooks(transformer, _pre_hook, _post_hook, state=geometry),
            *add_hooks(transformer.rope, post_hook=_rope_hook, state=geometry),
            *add_hooks(transformer.x_embedder, post_hook=_to_tile_major_hook, state=geometry),
            *add_hooks(transformer.proj_out, post_hook=_to_raster_hook, state=geometry),
        )
        return handle

    def attention_geometry(self, transformer: nn.Module) -> tuple[int, int, int]:
        cfg = transformer.config
        return int(cfg.num_attention_heads), int(cfg.attention_head_dim), int(cfg.num_layers)

    def consistency_modules(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every block's joint attention; its first output is the video stream's."""
        blocks = transformer.transformer_blocks
        return [(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(blocks)]

    # -- jobs: not yet -----------------------------------------------------------------------------
    def loads_pipeline_class(self, name: str) -> bool:
        # claimed so that a HunyuanVideo 1.5 folder gets load_pipeline's refusal, not "unknown pipeline"
        return name.startswith("HunyuanVideo15")

    def load_pipeline(self, folder, dtype: torch.dtype):
        raise NotSupportedError(f"{folder} holds a HunyuanVideo 1.5 pipeline; {JOBS_REFUSED}")

    def load_transformer(self, folder, dtype: torch.dtype) -> nn.Module:
        raise NotSupportedError(
            f"distillation of HunyuanVideo 1.5 ({folder}) is not supported; {JOBS_REFUSED}"
        )

    def check_conditions(self, transformer: nn.Module, sample: dict) -> None:
        raise NotSupportedError(f"distillation of HunyuanVideo 1.5 is not supported; {JOBS_REFUSED}")
