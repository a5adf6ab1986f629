"""FLUX adapter: CLEAR attention processors for diffusers' ``FluxTransformer2DModel``.

FLUX's joint sequence is ``[text (txt_ids) | image (img_ids)]``; ``img_ids[:, 1:3]`` hold each
image token's row and column. A forward pre-hook on the transformer reads the grid from those ids
(so callers never pass H and W), optionally permutes the image tokens into tile-major order (every
op but attention is token-wise, so this is done once per forward and undone at the output), and
publishes the ``TokenLayout`` that every attention processor of that forward uses.
"""

from __future__ import annotations

import inspect
import re

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from ..attention import TokenLayout, clear_attention, initial_pool_weight
from ..config import ClearConfig
from .handle import ClearHandle

# The image-stream attention projections the reference release trains, plus pooling weights.
TRAINABLE_PATTERN = re.compile(
    r"^(?:transformer_blocks\.\d+\.attn\.(?:to_q|to_k|to_v|to_out\.0)\.(?:weight|bias)"
    r"|single_transformer_blocks\.\d+\.attn\.(?:to_q|to_k|to_v)\.(?:weight|bias)"
    r"|(?:single_)?transformer_blocks\.\d+\.attn\.processor\.spatial_weight)$"
)


class FluxGeometry:
    """The layout of the forward in flight, shared by all processors of one model."""

    def __init__(self, config: ClearConfig):
        self.config = config
        self.layout: TokenLayout | None = None

    def require_layout(self) -> TokenLayout:
        if self.layout is None:
            raise RuntimeError(
                "a CLEAR attention processor ran outside FluxTransformer2DModel.forward, so the image grid "
                "is unknown; call the transformer itself (its img_ids give the grid)"
            )
        return self.layout


def grid_from_ids(img_ids: torch.Tensor) -> tuple[int, int]:
    """(H, W) of the image grid described by FLUX ``img_ids`` [N, 3]; raise if not one row-major grid."""
    n = img_ids.shape[0]
    if n == 0:
        raise ValueError("img_ids is empty: the transformer got no image tokens")
    ids = img_ids.detach()
    rows, cols = ids[:, 1], ids[:, 2]
    changes = (rows != rows[0]).nonzero()
    width = int(changes[0]) if changes.numel() else n
    height = n // width
    # Rebuild the grid FLUX pipelines make (float32 arithmetic, then cast to the ids' dtype) and compare.
    r0, c0 = rows[0].float(), cols[0].float()
    exp_rows = (r0 + torch.arange(height, device=ids.device).float()).repeat_interleave(width).to(ids.dtype)
    exp_cols = (c0 + torch.arange(width, device=ids.device).float()).repeat(height).to(ids.dtype)
    ok = (
        height * width == n
        and bool((ids[:, 0] == ids[0, 0]).all())
        and torch.equal(rows, exp_rows)
        and torch.equal(cols, exp_cols)
    )
    if not ok:
        raise ValueError(
            f"img_ids ({n} tokens) are not a single row-major image grid (rows then columns, one image). "
            "CLEAR needs the neighbourhood of each token; sequences holding several images or shuffled "
            "tokens (e.g. Kontext reference images) are not supported: call handle.restore() for them"
        )
    return height, width


class ClearFluxAttnProcessor(nn.Module):
    """Replaces FluxAttnProcessor: same projections, norms and RoPE; CLEAR instead of full attention."""

    def __init__(self, geometry: FluxGeometry, config: ClearConfig, param_like: torch.Tensor):
        super().__init__()
        self.geometry = geometry
        self.config = config
        if config.down_factor is not None:
            df = config.down_factor
            # Reference layout (1, 1, 1, df, 1, df, 1) so reference-release files load as they are.
            w = initial_pool_weight(df).reshape(1, 1, 1, df, 1, df, 1)
            self.spatial_weight = nn.Parameter(w.to(device=param_like.device, dtype=param_like.dtype))
        else:
            self.spatial_weight = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if attention_mask is not None:
            raise ValueError("CLEAR attention does not take an attention_mask; FLUX pipelines pass none")
        layout = self.geometry.require_layout()
        dual_stream = encoder_hidden_states is not None
        query, key, value = project_qkv(attn, hidden_states, encoder_hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if query.shape[1] != layout.seq_len:
            raise ValueError(
                f"attention got {query.shape[1]} tokens but txt_ids/img_ids describe {layout.seq_len} "
                f"({layout.text_len} text + {layout.height}x{layout.width} image)"
            )
        pool_weight = None
        if self.spatial_weight is not None:
            pool_weight = self.spatial_weight.reshape(self.config.down_factor, self.config.down_factor)
        out = clear_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            layout,
            self.config.radius,
            pool_weight=pool_weight,
            scale=self.config.scale,
            backend=self.config.backend,
        )
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if not dual_stream:
            return out
        text_out, image_out = out.split_with_sizes([layout.text_len, layout.image_len], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


def project_qkv(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """q, k, v as [B, N, heads, d] for the joint sequence [text | image], normalised as FLUX does."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    d = attn.head_dim
    query, key, value = (t.unflatten(-1, (-1, d)) for t in (query, key, value))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if encoder_hidden_states is None or attn.added_kv_proj_dim is None:
        return query, key, value
    if getattr(attn, "fused_projections", False):
        eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
    else:
        eq = attn.add_q_proj(encoder_hidden_states)
        ek = attn.add_k_proj(encoder_hidden_states)
        ev = attn.add_v_proj(encoder_hidden_states)
    eq, ek, ev = (t.unflatten(-1, (-1, d)) for t in (eq, ek, ev))
    eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
    return torch.cat([eq, query], dim=1), torch.cat([ek, key], dim=1), torch.cat([ev, value], dim=1)


def flux_attention_modules(transformer: nn.Module) -> list[nn.Module]:
    return [b.attn for b in transformer.transformer_blocks] + [
        b.attn for b in transformer.single_transformer_blocks
    ]


def bind_forward_args(transformer: nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    return inspect.signature(type(transformer).forward).bind(transformer, *args, **kwargs)


def _install_token_order(transformer: nn.Module, geometry: FluxGeometry) -> list:
    """Hooks that read the grid, permute to tile-major order on the way in and back on the way out."""
    tile = geometry.config.tile
    state: dict = {}

    def pre_hook(module, args, kwargs):
        bound = bind_forward_args(module, args, kwargs)
        img_ids, txt_ids = bound.arguments.get("img_ids"), bound.arguments.get("txt_ids")
        if img_ids is None or txt_ids is None:
            raise ValueError("a linearized FLUX transformer needs img_ids and txt_ids to know the image grid")
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        height, width = grid_from_ids(img_ids)
        # Controlnet residuals arrive in raster order, so such forwards keep raster order.
        use_tile = tile is not None and not any(
            bound.arguments.get(k) is not None
            for k in ("controlnet_block_samples", "controlnet_single_block_samples")
        )
        layout = TokenLayout(
            txt_ids.shape[0],
            height,
            width,
            down_factor=geometry.config.down_factor,
            tile=tile if use_tile else None,
        )
        geometry.layout = layout
        state["inverse"] = None
        if use_tile and (height > tile[0] or width > tile[1]):
            order = layout.sequence_to_raster(img_ids.device)
            state["inverse"] = layout.raster_to_sequence(img_ids.device)
            bound.arguments["hidden_states"] = bound.arguments["hidden_states"][:, order]
            bound.arguments["img_ids"] = img_ids[order]
            bound.arguments["txt_ids"] = txt_ids
        bound.arguments.pop("self", None)
        return (), dict(bound.arguments)

    def post_hook(module, args, kwargs, output):
        inverse = state.pop("inverse", None)
        # geometry.layout stays set: gradient checkpointing re-runs the blocks (and so the
        # processors) during backward, after this hook, and needs the layout of that forward.
        if inverse is None or output is None:  # output is None when forward raised
            return output
        if isinstance(output, tuple):
            return (output[0][:, inverse],) + tuple(output[1:])
        output.sample = output.sample[:, inverse]
        return output

    return [
        transformer.register_forward_pre_hook(pre_hook, with_kwargs=True),
        transformer.register_forward_hook(post_hook, with_kwargs=True, always_call=True),
    ]


def linearize_flux(transformer: nn.Module, config: ClearConfig) -> ClearHandle:
    """Install CLEAR processors in every attention layer of a FluxTransformer2DModel (in place)."""
    geometry = FluxGeometry(config)
    handle = ClearHandle(transformer, config, TRAINABLE_PATTERN)
    for attn in flux_attention_modules(transformer):
        original = attn.processor
        attn.set_processor(ClearFluxAttnProcessor(geometry, config, attn.to_q.weight))
        handle._undo.append(lambda attn=attn, original=original: attn.set_processor(original))
    for hook in _install_token_order(transformer, geometry):
        handle._undo.append(hook.remove)
    return handle
