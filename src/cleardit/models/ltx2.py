"""LTX-2 adapter: diffusers' ``LTX2VideoTransformer3DModel`` (audio + video).

Each ``LTX2VideoTransformerBlock`` has six attentions; CLEAR replaces only the first:
- ``attn1``: video self-attention -> CLEAR on the (T, H, W) token grid (no global tokens);
- ``audio_attn1`` (audio self-attention), ``attn2`` / ``audio_attn2`` (text cross-attention),
  ``audio_to_video_attn`` / ``video_to_audio_attn`` (audio <-> video cross-attention): left as they are.

The transformer takes packed video tokens [B, T*H*W, C] in raster order (frames, rows, columns) plus
the latent sizes ``num_frames`` / ``height`` / ``width``, and computes RoPE from ``video_coords``
(made from those sizes when not given). Every op but attention is token-wise, so the tile-major
order is applied once per forward to the forward's own inputs (a pre-hook permutes the video tokens,
``video_coords`` and any per-token timestep / sigma / keyframe mask) and undone on the video output
(a post-hook): RoPE, the per-token modulation and the audio<->video cross-attention then all see the
same permuted tokens. Audio tensors are never touched.

Pipeline jobs (generate, distill, eval model) do not run LTX-2 yet: ``load_pipeline`` says so.
"""

from __future__ import annotations

import math
import re

import torch
from diffusers.models.transformers.transformer_ltx2 import (
    apply_interleaved_rotary_emb,
    apply_split_rotary_emb,
)
from torch import nn

from ..attention import TokenLayout, clear_attention
from .adapter import ModelAdapter
from .errors import NotSupportedError
from .handle import ClearHandle, ForwardGrid, OrderedGrid, add_hooks, bind_forward_args, replace_sample
from .processor import ClearProcessor

# The video self-attention's projections (attn1 only), plus the pooled branch's weights.
TRAINABLE_PATTERN = re.compile(
    r"^transformer_blocks\.\d+\.attn1\."
    r"(?:(?:to_q|to_k|to_v|to_out\.0)\.(?:weight|bias)|processor\.spatial_weight)$"
)
ORIGINAL_PROCESSORS = ("LTX2AudioVideoAttnProcessor", "LTX2PerturbedAttnProcessor")
# the other attentions of a block, which keep their processors (named in errors and docs)
FULL_ATTENTIONS = ("audio_attn1", "attn2", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")


def video_grid(transformer: nn.Module, tokens: int, num_frames, height, width) -> tuple[int, int, int]:
    """(T, H, W) token grid of a forward from its latent sizes (patches as ``prepare_video_coords``
    steps them); a ValueError naming the sizes and the fix when ``tokens`` do not form it."""
    name = type(transformer).__name__
    if any(isinstance(s, bool) or not isinstance(s, int) for s in (num_frames, height, width)):
        raise ValueError(
            f"a linearized {name} reads its video token grid from num_frames, height and width (latent "
            f"sizes), got num_frames={num_frames!r}, height={height!r}, width={width!r}; pass them as "
            "LTX2Pipeline does"
        )
    cfg = transformer.config
    grid = (
        math.ceil(num_frames / cfg.patch_size_t),
        math.ceil(height / cfg.patch_size),
        math.ceil(width / cfg.patch_size),
    )
    if min(grid) < 1 or tokens != grid[0] * grid[1] * grid[2]:
        raise ValueError(
            f"hidden_states holds {tokens} video tokens, but num_frames={num_frames}, height={height}, "
            f"width={width} make a {'x'.join(map(str, grid))} grid of {grid[0] * grid[1] * grid[2]} tokens; "
            "pass the latent sizes of these tokens (CLEAR needs every video token on that grid, in raster "
            "order; extra tokens appended to the video, such as LTX2ConditionPipeline's keyframes or "
            "IC-LoRA's reference tokens, are not supported yet: call handle.restore() for them)"
        )
    return grid


def check_coords_form_grid(coords: torch.Tensor, grid: tuple[int, int, int]) -> None:
    """Refuse ``video_coords`` [B, 3, N, 2] whose tokens are not the raster (T, H, W) grid: CLEAR takes
    each token's place from its index, so every axis' position must grow along its own axis only."""
    t, h, w = grid
    if coords.ndim != 4 or coords.shape[1] != 3 or coords.shape[2] != t * h * w:
        raise ValueError(
            f"video_coords must be [batch, 3, {t * h * w}, 2] (the {t}x{h}x{w} grid's patch bounds), got "
            f"{tuple(coords.shape)}; pass transformer.rope.prepare_video_coords(...) as LTX2Pipeline does"
        )
    mid = coords.float().mean(-1).reshape(coords.shape[0], 3, t, h, w)
    for axis in range(3):
        values = mid[:, axis]
        others = tuple(d for d in (1, 2, 3) if d != axis + 1)
        high, low = values.amax(dim=others), values.amin(dim=others)  # [B, length]
        if not (torch.equal(high, low) and bool((high.diff(dim=1) > 0).all())):
            raise ValueError(
                f"video_coords do not lay the tokens out as one {t}x{h}x{w} grid in raster order (frames, "
                f"then rows, then columns; axis {axis} is not a function of its own index); CLEAR reads "
                "each token's position from its place in the sequence. Pass coords from "
                "transformer.rope.prepare_video_coords(batch, num_frames, height, width, device, fps) as "
                "LTX2Pipeline does, or call handle.restore()"
            )


class ClearLTX2AttnProcessor(ClearProcessor):
    """Replaces the video self-attention's processor (``LTX2AudioVideoAttnProcessor`` or, with
    ``perturbed_attn``, ``LTX2PerturbedAttnProcessor``): the same gates, projections, q/k norms and
    RoPE; CLEAR on the video grid instead of full attention. The spatio-temporal guidance arguments
    (``perturbation_mask``, ``all_perturbed``) behave as the perturbed processor's."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        perturbation_mask: torch.Tensor | None = None,
        all_perturbed: bool | torch.Tensor | None = None,
    ) -> torch.Tensor:
        layout = self.forward_state(query_rotary_emb).layout
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotSupportedError(
                "CLEAR replaces LTX-2's video self-attention (attn1), which takes neither "
                "encoder_hidden_states nor an attention mask (video_self_attention_mask); call "
                "handle.restore() to run with a mask"
            )
        rope = query_rotary_emb
        if hidden_states.shape[1] != layout.image_len:
            raise ValueError(
                f"video self-attention got {hidden_states.shape[1]} tokens but the forward's grid "
                f"{layout.describe_grid()} has {layout.image_len}"
            )
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        value = attn.to_v(hidden_states)
        if all_perturbed is None:
            all_perturbed = bool((perturbation_mask == 0).all()) if perturbation_mask is not None else False
        if all_perturbed:  # spatio-temporal guidance: the values skip attention entirely
            out = value
        else:
            query, key = attn.norm_q(attn.to_q(hidden_states)), attn.norm_k(attn.to_k(hidden_states))
            if rope is not None:
                apply = apply_split_rotary_emb if attn.rope_type == "split" else apply_interleaved_rotary_emb
                query, key = (
                    apply(query, rope),
                    apply(key, key_rotary_emb if key_rotary_emb is not None else rope),
                )
            q, k, v = (x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (query, key, value))
            cfg = self.config
            out = clear_attention(
                q, k, v, layout, cfg.radius, cfg.temporal_radius,
                pool_weight=self.pool_weight(), scale=cfg.scale, backend=cfg.backend,
            )  # fmt: skip
            out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
            if perturbation_mask is not None:
                out = torch.lerp(value, out, perturbation_mask)
        if gate_logits is not None:  # per-head gates, 2 * sigmoid (1 at zero logits) as in diffusers
            out = (
                out.unflatten(2, (attn.heads, -1)) * (2.0 * torch.sigmoid(gate_logits)).unsqueeze(-1)
            ).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


# ----------------------------------------------------------------------------- forward hooks
def _permute_per_token(arguments: dict, name: str, order: torch.Tensor, tokens: int) -> None:
    """Permute a per-video-token tensor argument (``timestep`` / ``sigma`` [B, N, ...]); the audio
    stream defaults to the video's value, so it gets the original order explicitly."""
    value = arguments.get(name)
    if not torch.is_tensor(value) or value.ndim < 2 or value.shape[1] != tokens:
        return
    if arguments.get(f"audio_{name}") is None:
        arguments[f"audio_{name}"] = value
    arguments[name] = value[:, order]


def _ltx2_pre_hook(module, args, kwargs):
    """Read the grid from ``num_frames`` / ``height`` / ``width``, publish the layout and put the video
    tokens and their per-token inputs into tile-major order."""
    geometry: OrderedGrid = module._cleardit_grid
    geometry.check_processors(module)
    geometry.inverse = None
    bound = bind_forward_args(module, args, kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    arguments.pop("self", None)
    hidden = arguments["hidden_states"]
    if not torch.is_tensor(hidden) or hidden.ndim != 3:
        shape = tuple(hidden.shape) if torch.is_tensor(hidden) else hidden
        raise ValueError(
            f"{type(module).__name__} takes hidden_states as packed video tokens [batch, tokens, channels], "
            f"got {shape!r}; pack the latents as LTX2Pipeline does (_pack_latents)"
        )
    if arguments.get("video_self_attention_mask") is not None:
        raise NotSupportedError(
            "video_self_attention_mask (IC-LoRA's reference-token mask) is not supported with CLEAR, which "
            "replaces the video self-attention; call handle.restore() to run with it"
        )
    tokens = hidden.shape[1]
    num_frames, height, width = arguments["num_frames"], arguments["height"], arguments["width"]
    grid = video_grid(module, tokens, num_frames, height, width)
    if arguments.get("video_coords") is not None:
        check_coords_form_grid(arguments["video_coords"], grid)
    config = geometry.config
    layout = TokenLayout(
        0, grid[1], grid[2], frames=grid[0], down_factor=config.down_factor, tile=config.tile
    )
    geometry.layout = layout
    if geometry.use_tile_order(layout, hidden.device):
        order = geometry.order
        coords = arguments.get("video_coords")
        if coords is None:  # the coords the forward would make, so that RoPE follows the tokens
            coords = module.rope.prepare_video_coords(
                hidden.shape[0], num_frames, height, width, hidden.device, fps=arguments["fps"]
            )
        arguments["video_coords"] = coords[:, :, order]
        arguments["hidden_states"] = hidden[:, order]
        for name in ("timestep", "sigma"):
            _permute_per_token(arguments, name, order, tokens)
        if arguments.get("video_keyframes_mask") is not None:
            arguments["video_keyframes_mask"] = arguments["video_keyframes_mask"][:, order]
    return (), dict(arguments)


def _ltx2_post_hook(module, args, kwargs, output):
    """The video output back into raster order (the audio output is untouched)."""
    geometry: OrderedGrid = module._cleardit_grid
    inverse = geometry.inverse
    geometry.order = geometry.inverse = None
    if inverse is None or output is None:  # output is None when the forward raised
        return output
    return replace_sample(output, lambda sample: sample[:, inverse])


# ----------------------------------------------------------------------------- the adapter
class LTX2Adapter(ModelAdapter):
    """LTX-2 (audio-video): CLEAR in space and time for the video self-attention."""

    family = "ltx2"
    transformer_classes = ("LTX2VideoTransformer3DModel",)
    trainable_pattern = TRAINABLE_PATTERN
    grid_class = OrderedGrid
    video = True

    def describe(self) -> str:
        return (
            f"{self.family} ({', '.join(self.transformer_classes)}): linearize (video self-attention in "
            "space and time; audio and cross-attentions full), weights; generate, distill, eval model: "
            "not yet (linearize pipe.transformer directly); --devices: not supported (images only)"
        )

    def loads_pipeline_class(self, name: str) -> bool:
        # LTX-2 folders are recognised so that load_pipeline can say what works instead
        return name.startswith("LTX2")

    # -- CLEAR attention ---------------------------------------------------------------------------
    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        """Each block's video self-attention ``attn1``."""
        return [block.attn1 for block in transformer.transformer_blocks]

    def strips_unsupported(self) -> str | None:
        return (
            "patch-parallel inference (--devices) splits image rows and runs images only; LTX-2 makes videos"
        )

    def install_into(self, transformer: nn.Module, geometry: ForwardGrid, handle) -> ClearHandle:
        modules = self.attention_modules(transformer)
        foreign = sorted({type(a.processor).__name__ for a in modules} - set(ORIGINAL_PROCESSORS))
        if foreign:
            raise NotSupportedError(
                f"CLEAR for LTX-2 replaces diffusers' {' / '.join(ORIGINAL_PROCESSORS)} of the video "
                f"self-attention; this model has {', '.join(foreign)}. Set the default processors back "
                "(e.g. transformer.set_default_attn_processor() or unload the adapter that replaced them) "
                "before linearize"
            )
        geometry.adapter = self
        for attn in modules:
            handle.originals.append((attn, attn.processor))
            attn.set_processor(ClearLTX2AttnProcessor(geometry, geometry.config, attn.to_q.weight))
        handle.hooks = add_hooks(transformer, _ltx2_pre_hook, _ltx2_post_hook, state=geometry)
        return handle

    def attention_geometry(self, transformer: nn.Module) -> tuple[int, int, int]:
        """(heads, head_dim, layers) of the video self-attention, the only attention CLEAR changes."""
        cfg = transformer.config
        return int(cfg.num_attention_heads), int(cfg.attention_head_dim), len(transformer.transformer_blocks)

    def consistency_modules(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        return [
            (f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(transformer.transformer_blocks)
        ]

    # -- pipelines ---------------------------------------------------------------------------------
    def load_pipeline(self, folder, dtype: torch.dtype):
        raise NotSupportedError(
            f"{folder} holds an LTX-2 pipeline; cleardit's jobs (generate, distill, eval model) do not run "
            "LTX-2 pipelines yet (its video jobs run Wan pipelines so far). Its transformer can be "
            "linearized directly: cleardit.linearize(pipe.transformer, radius=..., temporal_radius=...)"
        )
