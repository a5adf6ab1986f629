"""FLUX.2 adapter (dev and klein): diffusers' ``Flux2Transformer2DModel``.

FLUX.2's joint sequence is ``[text | image stream]``, where the image stream is the target image
followed by any reference images: ``img_ids`` [N, 4] = (t, h, w, l) with t = 0 on the target and
t = 10, 20, ... on the references. Double-stream blocks attend over ``[text | image stream]``, then
parallel single blocks over the same sequence, their q/k/v fused with the MLP input in one Linear
(``to_qkv_mlp_proj``).

The rule here: the target's tokens lie on its grid (the CLEAR disc between them); text and every
reference-image token are global (they see everything and everything sees them). Global tokens must
be one block, so a forward pre-hook reorders the image stream once per forward (every op but
attention is token-wise) to ``[references | target in tile-major order]``, giving the sequence
``[text | references | target]`` with ``text_len + reference tokens`` globals in front; a forward
hook puts the output back in the caller's order.

The KV-cache mode of ``Flux2KleinKVPipeline`` is supported as diffusers runs it: "extract" (the
references prepended to the image stream attend only to themselves, and their post-RoPE keys and
values are cached) and "cached" (the cached reference keys and values sit between text and target
as global keys).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from ..attention import TokenLayout, clear_attention, initial_pool_weight
from ..config import ClearConfig
from .adapter import ModelAdapter
from .flux import _replace_sample, bind_forward_args, project_qkv
from .handle import ClearHandle, ForwardGrid, ForwardState, add_hooks

# What CLEAR fine-tunes and saves. Double-stream blocks: the image stream's to_q/k/v/to_out, as the
# reference release trains on FLUX.1. Single blocks compute q, k, v and the MLP input with ONE Linear
# (to_qkv_mlp_proj; q, k, v are its first 3 * inner_dim output rows), and a parameter cannot be split
# by name, so the whole fused projection is trained there (its MLP rows too). Their to_out fuses the
# attention and MLP outputs, like FLUX.1's single-block proj_out, which the reference does not train.
TRAINABLE_PATTERN = re.compile(
    r"^(?:transformer_blocks\.\d+\.attn\.(?:to_q|to_k|to_v|to_out\.0)\.(?:weight|bias)"
    r"|single_transformer_blocks\.\d+\.attn\.to_qkv_mlp_proj\.(?:weight|bias)"
    r"|(?:single_)?transformer_blocks\.\d+\.attn\.processor\.spatial_weight)$"
)
KV_MODES = (None, "extract", "cached")


@dataclass(frozen=True)
class Flux2Tokens:
    """What a FLUX.2 forward's processors need beyond the layout: the text length, the number of
    reference tokens (global, between text and target), and the KV-cache mode in effect
    ("extract", "cached" or None, decided as diffusers decides it)."""

    text_len: int
    references: int
    kv_mode: str | None


class Flux2Grid(ForwardGrid):
    """ForwardGrid plus the forward's ``Flux2Tokens`` and the order that puts its output back."""

    def __init__(self, config: ClearConfig):
        super().__init__(config)
        self.tokens: Flux2Tokens | None = None
        self.output_order: torch.Tensor | None = None

    def snapshot(self) -> ForwardState:
        return ForwardState(self.require_layout(), self.tokens)


# ----------------------------------------------------------------------------- reading the grid
def target_grid(ids: torch.Tensor) -> tuple[int, int]:
    """(H, W) of the target image from its ``img_ids`` rows [n, 4] in sequence order; raise unless they
    are one row-major grid (rows then columns, one ``l``)."""
    n = ids.shape[0]
    rows, cols = ids[:, 1], ids[:, 2]
    changes = (rows != rows[0]).nonzero()
    width = int(changes[0]) if changes.numel() else n
    height = n // width
    # Rebuild the grid the pipelines make (float32 arithmetic, cast to the ids' dtype) and compare.
    r0, c0 = rows[0].float(), cols[0].float()
    exp_rows = (r0 + torch.arange(height, device=ids.device).float()).repeat_interleave(width)
    exp_cols = (c0 + torch.arange(width, device=ids.device).float()).repeat(height)
    ok = (
        height * width == n
        and torch.equal(rows, exp_rows.to(ids.dtype))
        and torch.equal(cols, exp_cols.to(ids.dtype))
        and bool((ids[:, 3] == ids[0, 3]).all())
    )
    if not ok:
        raise ValueError(
            f"the target image's img_ids (the {n} tokens with t = 0) are not one row-major grid (rows "
            "then columns); CLEAR needs each token's neighbours. Pass the ids FLUX.2 pipelines make "
            "(Flux2Pipeline._prepare_latent_ids), or call handle.restore() for other layouts"
        )
    return height, width


def kv_mode(arguments: dict) -> str | None:
    """The KV-cache mode a Flux2Transformer2DModel forward runs in (as its own code decides)."""
    mode = arguments.get("kv_cache_mode")
    if mode not in KV_MODES:
        raise ValueError(f"kv_cache_mode must be one of {KV_MODES}, got {mode!r}")
    if mode == "extract" and arguments.get("num_ref_tokens", 0) > 0:
        return "extract"
    if mode == "cached" and arguments.get("kv_cache") is not None:
        return "cached"
    return None


def split_image_stream(ids: torch.Tensor, mode: str | None, num_ref_tokens: int):
    """(reference positions, target positions, (H, W)) of an image stream's ``img_ids`` [N, 4]."""
    is_target = ids[:, 0] == 0
    if not bool(is_target.any()):
        raise ValueError(
            "img_ids hold no target-image token (t = 0 in img_ids[:, 0]; FLUX.2's references have "
            "t = 10, 20, ...): CLEAR needs the target's grid"
        )
    positions = torch.arange(ids.shape[0], device=ids.device)
    references, target = positions[~is_target], positions[is_target]
    if mode == "extract" and not torch.equal(references, positions[:num_ref_tokens]):
        raise ValueError(
            f"with kv_cache_mode='extract' the first num_ref_tokens={num_ref_tokens} image tokens must be "
            f"the references (t != 0 in img_ids) and the rest the target; got {references.numel()} "
            "reference tokens elsewhere. Prepend the references as Flux2KleinKVPipeline does"
        )
    if mode == "cached" and references.numel():
        raise ValueError(
            f"with kv_cache_mode='cached' the references come from kv_cache; img_ids hold "
            f"{references.numel()} reference tokens (t != 0) too. Pass the target's tokens only"
        )
    return references, target, target_grid(ids[target])


def _flux2_pre_hook(module, args, kwargs):
    """Read the target grid and the references from the ids, publish the layout ``[text | references
    | target]``, and reorder the image stream to ``[references | target, tile-major]``."""
    geometry: Flux2Grid = module._cleardit_grid
    geometry.check_processors(module)
    bound = bind_forward_args(module, args, kwargs)
    arguments = bound.arguments
    hidden, text, img_ids = (arguments.get(k) for k in ("hidden_states", "encoder_hidden_states", "img_ids"))
    if img_ids is None or text is None:
        raise ValueError("a linearized FLUX.2 transformer needs encoder_hidden_states and img_ids")
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    if ids.shape[0] != hidden.shape[1]:
        raise ValueError(
            f"img_ids describe {ids.shape[0]} image tokens but hidden_states has {hidden.shape[1]}"
        )
    mode = kv_mode(arguments)
    num_ref_tokens = int(arguments.get("num_ref_tokens", 0))
    references, target, (height, width) = split_image_stream(ids, mode, num_ref_tokens)
    global_refs = arguments["kv_cache"].num_ref_tokens if mode == "cached" else references.numel()
    config = geometry.config
    layout = TokenLayout(
        text.shape[1] + global_refs, height, width, down_factor=config.down_factor, tile=config.tile
    )
    order = torch.cat([references, target[layout.sequence_to_raster(ids.device)]])
    geometry.layout = layout
    geometry.tokens = Flux2Tokens(text.shape[1], global_refs, mode)
    geometry.output_order = None
    if not torch.equal(order, torch.arange(order.numel(), device=order.device)):
        arguments["hidden_states"] = hidden[:, order]
        arguments["img_ids"] = ids[order]
        # the output holds the whole image stream, or only the target in extract mode
        kept = order[references.numel() :] - references.numel() if mode == "extract" else order
        geometry.output_order = torch.argsort(kept)
    bound.arguments.pop("self", None)
    return (), dict(bound.arguments)


def _flux2_post_hook(module, args, kwargs, output):
    """Put the output's tokens back in the caller's order."""
    geometry: Flux2Grid = module._cleardit_grid
    order, geometry.output_order = geometry.output_order, None
    # the layout stays set: gradient checkpointing re-runs the blocks during backward
    if order is None or output is None:  # output is None when forward raised
        return output
    return _replace_sample(output, lambda sample: sample[:, order])


# ----------------------------------------------------------------------------- processors
class ClearFlux2Processor(nn.Module):
    """CLEAR over FLUX.2's ``[text | references | target]`` q/k/v; the KV-cache modes as diffusers'
    ``_flux2_kv_causal_attention`` runs them. Subclasses project q/k/v as their block does."""

    def __init__(self, geometry: Flux2Grid | None = None, config: ClearConfig | None = None, param_like=None):
        # Without arguments (diffusers' loaders rebuild processors as ``type(p)()``) it belongs to no
        # linearized model: the forward refuses it clearly.
        super().__init__()
        self.geometry = geometry
        self.config = config
        self.spatial_weight = None
        if config is not None and config.down_factor is not None:
            df = config.down_factor
            # the reference release's layout (1, 1, 1, df, 1, df, 1), as for FLUX.1
            w = initial_pool_weight(df).reshape(1, 1, 1, df, 1, df, 1)
            self.spatial_weight = nn.Parameter(w.to(device=param_like.device, dtype=param_like.dtype))

    def pool_weight(self) -> torch.Tensor | None:
        if self.spatial_weight is None:
            return None
        return self.spatial_weight.reshape(self.config.down_factor, self.config.down_factor)

    def attend(self, query, key, value, image_rotary_emb, attention_mask, kv_cache) -> torch.Tensor:
        """[B, N, heads, d] q/k/v before RoPE -> the attention output [B, N, heads * d]."""
        if attention_mask is not None:
            raise ValueError("CLEAR attention for FLUX.2 takes no attention_mask; FLUX.2 pipelines pass none")
        if self.geometry is None:
            raise RuntimeError(
                f"this {type(self).__name__} belongs to no linearized model (rebuilt by a diffusers "
                "loader?); call handle.restore(), change the processors, then linearize again"
            )
        state = self.geometry.state_for(image_rotary_emb[0] if image_rotary_emb is not None else None)
        layout, tokens = state.layout, state.extra
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        t, refs = tokens.text_len, slice(tokens.text_len, tokens.text_len + tokens.references)
        if tokens.kv_mode == "extract":
            kv_cache.store(key[:, refs].clone(), value[:, refs].clone())
        elif tokens.kv_mode == "cached":
            # the cached references are keys only: placeholder query rows, dropped below
            k_ref, v_ref = kv_cache.get()
            zeros = query.new_zeros(query.shape[0], tokens.references, *query.shape[2:])
            query = torch.cat([query[:, :t], zeros, query[:, t:]], dim=1)
            key = torch.cat([key[:, :t], k_ref.to(key.dtype), key[:, t:]], dim=1)
            value = torch.cat([value[:, :t], v_ref.to(value.dtype), value[:, t:]], dim=1)
        if query.shape[1] != layout.seq_len:
            raise ValueError(
                f"attention got {query.shape[1]} tokens but the forward's inputs describe "
                f"{layout.seq_len} ({t} text + {tokens.references} reference + "
                f"{layout.height}x{layout.width} target)"
            )
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out = clear_attention(
            q, k, v, layout, self.config.radius, pool_weight=self.pool_weight(),
            scale=self.config.scale, backend=self.config.backend,
        ).transpose(1, 2)  # fmt: skip
        if tokens.kv_mode == "extract":  # while extracting, references attend only to themselves
            own = F.scaled_dot_product_attention(*(x[:, :, refs] for x in (q, k, v)), scale=self.config.scale)
            out = torch.cat([out[:, :t], own.transpose(1, 2), out[:, refs.stop :]], dim=1)
        elif tokens.kv_mode == "cached":
            out = torch.cat([out[:, :t], out[:, refs.stop :]], dim=1)
        return out.flatten(2, 3).to(query.dtype)


class ClearFlux2AttnProcessor(ClearFlux2Processor):
    """Replaces ``Flux2AttnProcessor`` / ``Flux2KVAttnProcessor`` (double-stream blocks)."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
        kv_cache=None, kv_cache_mode=None, num_ref_tokens=0,
    ):  # fmt: skip
        # the KV keywords are named so Flux2Attention passes them; the forward's state says the mode
        query, key, value = project_qkv(attn, hidden_states, encoder_hidden_states)
        out = self.attend(query, key, value, image_rotary_emb, attention_mask, kv_cache)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        text_out, image_out = out.split_with_sizes(
            [encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        return attn.to_out[1](attn.to_out[0](image_out)), attn.to_add_out(text_out)


class ClearFlux2ParallelSelfAttnProcessor(ClearFlux2Processor):
    """Replaces ``Flux2ParallelSelfAttnProcessor`` / ``Flux2KVParallelSelfAttnProcessor`` (single
    blocks: q, k, v and the MLP input from one fused Linear, one fused output Linear)."""

    def __call__(
        self, attn, hidden_states, attention_mask=None, image_rotary_emb=None,
        kv_cache=None, kv_cache_mode=None, num_txt_tokens=0, num_ref_tokens=0,
    ):  # fmt: skip
        projected = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        qkv, mlp = projected.split([qkv_dim, projected.shape[-1] - qkv_dim], dim=-1)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        out = self.attend(query, key, value, image_rotary_emb, attention_mask, kv_cache)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


# ----------------------------------------------------------------------------- the adapter
class Flux2Adapter(ModelAdapter):
    """FLUX.2 (dev, klein): ``Flux2Transformer2DModel``."""

    family = "flux2"
    transformer_classes = ("Flux2Transformer2DModel",)
    trainable_pattern = TRAINABLE_PATTERN

    def describe(self) -> str:
        classes = ", ".join(self.transformer_classes + self.pipeline_classes)
        return f"{self.family} ({classes}): linearize (reference images global, KV cache), weights"

    # -- CLEAR attention ---------------------------------------------------------------------------
    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        return [b.attn for b in transformer.transformer_blocks] + [
            b.attn for b in transformer.single_transformer_blocks
        ]

    def install(self, transformer: nn.Module, config: ClearConfig) -> ClearHandle:
        geometry = Flux2Grid(config)
        geometry.adapter = self
        handle = ClearHandle(transformer, config, self.trainable_pattern)
        for attn in self.attention_modules(transformer):
            handle.originals.append((attn, attn.processor))
            single = hasattr(attn, "to_qkv_mlp_proj")
            cls = ClearFlux2ParallelSelfAttnProcessor if single else ClearFlux2AttnProcessor
            param_like = attn.to_qkv_mlp_proj.weight if single else attn.to_q.weight
            attn.set_processor(cls(geometry, config, param_like))
        transformer._cleardit_grid = geometry  # the hooks' state: per model, carried by deepcopy
        handle.hooks = add_hooks(transformer, _flux2_pre_hook, _flux2_post_hook)
        return handle

    def strips_unsupported(self) -> str | None:
        return (
            "patch-parallel inference (--devices) is not supported for FLUX.2 yet (its reference-image "
            "tokens are global and are not split into strips)"
        )

    @torch.no_grad()
    def sync_fused_projections(self, transformer: nn.Module) -> None:
        # fuse_qkv_projections() adds to_qkv = [q; k; v] to the double blocks and their processors then
        # read it, so it must follow weights loaded into to_q/k/v (single blocks are always fused)
        for block in transformer.transformer_blocks:
            attn = block.attn
            if not getattr(attn, "fused_projections", False) or not hasattr(attn, "to_qkv"):
                continue
            parts = (attn.to_q, attn.to_k, attn.to_v)
            attn.to_qkv.weight.copy_(torch.cat([p.weight for p in parts]))
            if attn.to_qkv.bias is not None:
                attn.to_qkv.bias.copy_(torch.cat([p.bias for p in parts]))

    def attention_geometry(self, transformer: nn.Module) -> tuple[int, int, int]:
        cfg = transformer.config
        layers = int(cfg.num_layers) + int(cfg.num_single_layers)
        return int(cfg.num_attention_heads), int(cfg.attention_head_dim), layers

    def consistency_modules(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        """The single blocks' attention modules (as for FLUX.1; their output includes the fused MLP)."""
        return [
            (f"single_transformer_blocks.{i}.attn", b.attn)
            for i, b in enumerate(transformer.single_transformer_blocks)
        ]

    # -- high-resolution hooks ---------------------------------------------------------------------
    @contextlib.contextmanager
    def rope_theta_scaled(self, transformer: nn.Module, factor: float) -> Iterator[None]:
        pos_embed = transformer.pos_embed
        original = pos_embed.theta
        pos_embed.theta = original * factor
        try:
            yield
        finally:
            pos_embed.theta = original

    def query_norms(self, transformer: nn.Module) -> list[nn.Module]:
        norms = []
        for attn in self.attention_modules(transformer):
            norms += [n for n in (attn.norm_q, getattr(attn, "norm_added_q", None)) if n is not None]
        return norms
