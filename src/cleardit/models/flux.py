"""FLUX.1 adapter: diffusers' ``FluxTransformer2DModel`` / ``FluxPipeline``.

FLUX's joint sequence is ``[text (txt_ids) | image (img_ids)]``; ``img_ids[:, 1:3]`` hold each
image token's row and column. A forward pre-hook on the transformer reads the grid from those ids
(so callers never pass H and W), optionally permutes the image tokens into tile-major order (every
op but attention is token-wise, so this is done once per forward and undone at the output), and
publishes the ``TokenLayout`` that every attention processor of that forward uses. The
patch-parallel variant (``install_strips``) cuts this rank's rows in the same kind of hook.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from ..attention import TokenLayout, clear_attention
from ..attention.strips import StripPlan, start_row_exchange, strip_attention
from ..config import ClearConfig
from .adapter import ModelAdapter, check_teacher_data_fits
from .handle import ClearHandle, ForwardGrid, ForwardState, add_hooks, bind_forward_args, replace_sample
from .processor import ClearProcessor
from .strips import ParallelHandle, StripContext

# The image-stream attention projections the reference release trains, plus pooling weights.
TRAINABLE_PATTERN = re.compile(
    r"^(?:transformer_blocks\.\d+\.attn\.(?:to_q|to_k|to_v|to_out\.0)\.(?:weight|bias)"
    r"|single_transformer_blocks\.\d+\.attn\.(?:to_q|to_k|to_v)\.(?:weight|bias)"
    r"|(?:single_)?transformer_blocks\.\d+\.attn\.processor\.spatial_weight)$"
)
CONTROLNET_INPUTS = ("controlnet_block_samples", "controlnet_single_block_samples")


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


def assert_grid(img_ids: torch.Tensor, grid: tuple[int, int]) -> None:
    """Traceable check (no graph break under torch.compile) that ``img_ids`` rows run ``grid``'s width:
    the first row has W tokens with consecutive columns, and the next token starts the next row."""
    h, w = grid
    rows, cols = img_ids[:, 1], img_ids[:, 2]
    ok = (rows[w - 1] == rows[0]) & (cols[w - 1] == cols[0] + (w - 1))
    if h > 1:
        ok = ok & (rows[w] == rows[0] + 1)
    torch._assert_async(ok, "img_ids do not form the grid compiled for this token count")


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


def _project_kv(attn: nn.Module, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, heads, n, d] of image-stream tokens ``x`` [B, n, C], RoPE applied."""
    if getattr(attn, "fused_projections", False):
        _, key, value = attn.to_qkv(x).chunk(3, dim=-1)
    else:
        key, value = attn.to_k(x), attn.to_v(x)
    key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (key, value))
    key = attn.norm_k(key)
    if rope is not None:
        key = apply_rotary_emb(key, rope, sequence_dim=1)
    return key.transpose(1, 2), value.transpose(1, 2)


def _finish(attn: nn.Module, out: torch.Tensor, text_len: int, dual_stream: bool):
    """[B, N, heads * d] attention output -> what a FLUX processor returns (output projections)."""
    if not dual_stream:
        return out
    text_out, image_out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
    image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
    return image_out, attn.to_add_out(text_out.contiguous())


class ClearFluxAttnProcessor(ClearProcessor):
    """Replaces FluxAttnProcessor: same projections, norms and RoPE; CLEAR instead of full attention."""

    def attend(self, q, k, v, state: ForwardState, attention_mask) -> torch.Tensor:
        """CLEAR over [B, heads, N, d] tensors. FLUX pipelines pass no mask (Chroma's adapter does)."""
        if attention_mask is not None:
            raise ValueError("CLEAR attention for FLUX takes no attention_mask; FLUX pipelines pass none")
        return clear_attention(
            q, k, v, state.layout, self.config.radius, pool_weight=self.pool_weight(),
            scale=self.config.scale, backend=self.config.backend,
        )  # fmt: skip

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        return self.clear_forward(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
        )[0]

    def clear_forward(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
        """(what the processor returns, the image queries before RoPE [B, n, heads, d])."""
        state = self.forward_state(image_rotary_emb)
        layout = state.layout
        query, key, value = project_qkv(attn, hidden_states, encoder_hidden_states)
        image_query = query[:, max(0, query.shape[1] - layout.image_len) :]  # [text | image]: image last
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if query.shape[1] != layout.seq_len:
            raise ValueError(
                f"attention got {query.shape[1]} tokens but txt_ids/img_ids describe {layout.seq_len} "
                f"({layout.text_len} text + {layout.height}x{layout.width} image)"
            )
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = self.attend(q, k, v, state, attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        return _finish(attn, out, layout.text_len, encoder_hidden_states is not None), image_query


class IPAdapterBranch:
    """Mixin for a CLEAR processor: the IP-Adapter branch of diffusers' ``FluxIPAdapterAttnProcessor``
    beside it. In the dual-stream blocks the image queries (normed, before RoPE) attend to each IP
    image's tokens with full attention (a few tokens, so the cost stays linear), scaled and summed;
    the block adds the result to the image stream. ``ip_adapter`` is the loaded diffusers processor
    (its ``to_k_ip``, ``to_v_ip`` and ``scale``)."""

    def __init__(self, geometry=None, config=None, param_like=None, ip_adapter=None):
        super().__init__(geometry, config, param_like)
        self.ip_adapter = ip_adapter

    @property
    def scale(self):
        """The IP images' scales (``pipe.set_ip_adapter_scale`` sets them here)."""
        return self.ip_adapter.scale

    @scale.setter
    def scale(self, value) -> None:
        self.ip_adapter.scale = value

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
        ip_hidden_states=None, ip_adapter_masks=None,
    ):  # fmt: skip
        out, image_query = self.clear_forward(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
        )
        if encoder_hidden_states is None:
            return out
        if ip_hidden_states is None:
            raise ValueError(
                "IP-Adapter layers need ip_hidden_states: pass ip_adapter_image (or its embeddings) to the "
                "pipeline, or unload the IP-Adapter"
            )
        batch, ip = hidden_states.shape[0], self.ip_adapter
        q = image_query.transpose(1, 2)
        ip_out = torch.zeros_like(out[0])
        for tokens, scale, to_k, to_v in zip(
            ip_hidden_states, ip.scale, ip.to_k_ip, ip.to_v_ip, strict=False
        ):
            k, v = (
                f(tokens).view(batch, -1, attn.heads, attn.head_dim).transpose(1, 2) for f in (to_k, to_v)
            )
            part = (
                F.scaled_dot_product_attention(q, k, v)
                .transpose(1, 2)
                .reshape(batch, -1, attn.heads * attn.head_dim)
            )
            ip_out += scale * part.to(image_query.dtype)
        return (*out, ip_out)


class ClearFluxIPAdapterAttnProcessor(IPAdapterBranch, ClearFluxAttnProcessor):
    """ClearFluxAttnProcessor with the IP-Adapter branch (replaces ``FluxIPAdapterAttnProcessor``)."""


class ParallelClearFluxAttnProcessor(ClearFluxAttnProcessor):
    """ClearFluxAttnProcessor for one strip: same parameters (``spatial_weight``), band exchange."""

    def __init__(self, context: StripContext, config: ClearConfig, param_like: torch.Tensor, layer: int):
        super().__init__(context, config, param_like)
        self.layer = layer

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if attention_mask is not None:
            raise ValueError("patch-parallel CLEAR takes no attention_mask; FLUX pipelines pass none")
        ctx: StripContext = self.geometry
        layout = ctx.require_layout()
        plan, comm = ctx.plan, ctx.comm
        text_len, w = layout.text_len, layout.width
        dual_stream = encoder_hidden_states is not None
        image_in = hidden_states if dual_stream else hidden_states[:, text_len:]
        pending = None
        if ctx.exchange == "input":  # start sending the band's attention input right away
            pending = start_row_exchange(
                image_in, plan, comm, 1, "halo exchange (attention input)", self.layer
            )

        query, key, value = project_qkv(attn, hidden_states, encoder_hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        own_rows = plan.rows(comm.rank)
        if query.shape[1] != text_len + own_rows * w:
            raise ValueError(
                f"attention got {query.shape[1]} tokens but this rank's strip has {text_len} text + "
                f"{own_rows}x{w} image tokens; call the parallel model with the full inputs on every rank"
            )
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        k_img, v_img = key[:, :, text_len:], value[:, :, text_len:]
        if ctx.exchange == "kv":
            kv_own = torch.cat([k_img, v_img], dim=-1)
            pending = start_row_exchange(kv_own, plan, comm, 2, "halo exchange (k/v)", self.layer)

        def halo():
            above, below = pending.wait()
            if ctx.exchange == "kv":
                kv = torch.cat([above, kv_own, below], dim=2)
                return kv[..., : attn.head_dim], kv[..., attn.head_dim :]
            (ka, va), (kb, vb) = (
                _project_kv(attn, x, rope) for x, rope in zip((above, below), ctx.band_rope, strict=True)
            )
            return torch.cat([ka, k_img, kb], dim=2), torch.cat([va, v_img, vb], dim=2)

        out_t, _, out_i, _ = strip_attention(
            query[:, :, :text_len], key[:, :, :text_len], value[:, :, :text_len],
            query[:, :, text_len:], k_img, v_img, halo, plan, comm, self.config.radius,
            pool_weight=self.pool_weight(), scale=self.config.scale or 1.0 / attn.head_dim**0.5,
            backend=self.config.backend, text_merge=ctx.text_merge, layer=self.layer,
        )  # fmt: skip
        out = torch.cat([out_t, out_i], dim=2).transpose(1, 2).flatten(2, 3).to(query.dtype)
        return _finish(attn, out, text_len, dual_stream)


# ----------------------------------------------------------------------------- forward hooks
def _ids(bound: inspect.BoundArguments, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    img_ids, txt_ids = bound.arguments.get("img_ids"), bound.arguments.get("txt_ids")
    if img_ids is None or txt_ids is None:
        raise ValueError(f"a {what} transformer needs img_ids and txt_ids to know the image grid")
    return (img_ids[0] if img_ids.ndim == 3 else img_ids), (txt_ids[0] if txt_ids.ndim == 3 else txt_ids)


def _token_order_pre_hook(module, args, kwargs):
    """Read the grid from the ids and publish the layout of this forward; the family may read more
    inputs. Only Python here: the tensor work (tile-major order, the compiled grid check) runs in the
    sub-module hooks below, inside the forward, so ``torch.compile`` keeps the forward one graph."""
    geometry = module._cleardit_grid
    geometry.check_processors(module)
    tile = geometry.config.tile
    bound = bind_forward_args(module, args, kwargs)
    img_ids, txt_ids = _ids(bound, "linearized")
    height, width = geometry.grid_of(img_ids.shape[0], lambda: grid_from_ids(img_ids))
    # tile-major order, except with controlnet residuals, which arrive in raster order
    use_tile = tile is not None and not any(bound.arguments.get(k) is not None for k in CONTROLNET_INPUTS)
    down_factor = geometry.config.down_factor
    geometry.layout = TokenLayout(
        txt_ids.shape[0], height, width, down_factor=down_factor, tile=tile if use_tile else None
    )
    geometry.reorder = use_tile and (height > tile[0] or width > tile[1])
    geometry.check_ids = torch.compiler.is_compiling()  # eagerly, grid_from_ids checked them all
    geometry.adapter.read_forward_inputs(module, bound, geometry)
    bound.arguments.pop("self", None)
    return (), dict(bound.arguments)


def _tile_order_embedding_hook(module, args, kwargs, output):
    """x_embedder's output (every op before attention is token-wise) in tile-major order."""
    geometry = module._cleardit_grid
    if not geometry.reorder:
        return output
    return output[:, geometry.layout.sequence_to_raster(output.device)]


def _tile_order_ids_hook(module, args, kwargs):
    """pos_embed's ids [text | image] with the image ids in tile-major order (and, under
    torch.compile, checked against the grid taken from an eager forward)."""
    geometry = module._cleardit_grid
    layout = geometry.layout
    ids = args[0] if args else kwargs["ids"]
    text, image = ids[: layout.text_len], ids[layout.text_len :]
    if geometry.check_ids:
        assert_grid(image, (layout.height, layout.width))
    if not geometry.reorder:
        return None
    ids = torch.cat([text, image[layout.sequence_to_raster(ids.device)]])
    return ((ids, *args[1:]), kwargs) if args else (args, {**kwargs, "ids": ids})


def _raster_order_output_hook(module, args, kwargs, output):
    """proj_out's output back in raster order."""
    geometry = module._cleardit_grid
    if not geometry.reorder or output is None:  # output is None when forward raised
        return output
    return output[:, geometry.layout.raster_to_sequence(output.device)]


def _strip_pre_hook(module, args, kwargs):
    """Cut this rank's rows of the inputs (and compute the RoPE of the band rows it will receive)."""
    ctx: StripContext = module._cleardit_grid
    ctx.check_processors(module)
    bound = bind_forward_args(module, args, kwargs)
    for name in CONTROLNET_INPUTS:
        if bound.arguments.get(name) is not None:
            raise ValueError(f"patch-parallel FLUX does not support {name}; run controlnets on one device")
    img_ids, txt_ids = _ids(bound, "patch-parallel FLUX")
    height, width = grid_from_ids(img_ids)
    cfg = ctx.config
    plan = StripPlan(height, width, ctx.comm.world, cfg.radius, cfg.down_factor)
    hidden = bound.arguments["hidden_states"]
    y0, y1 = plan.strip(ctx.comm.rank)
    lo, hi = plan.needed_rows(ctx.comm.rank)
    if ctx.strip_input:
        if hidden.shape[1] != (y1 - y0) * width:
            raise ValueError(
                f"hidden_states has {hidden.shape[1]} image tokens but rank {ctx.comm.rank}'s strip of "
                f"the {height}x{width} grid (img_ids) is rows {y0}..{y1 - 1} = {(y1 - y0) * width} "
                "tokens; with strip_input=True pass this rank's rows and the full img_ids"
            )
    elif hidden.shape[1] != height * width:
        raise ValueError(
            f"hidden_states has {hidden.shape[1]} image tokens but img_ids describe a "
            f"{height}x{width} grid; "
            "every rank must pass the full hidden_states and img_ids (the strip is cut here)"
        )
    else:
        bound.arguments["hidden_states"] = hidden[:, y0 * width : y1 * width]
    bound.arguments["img_ids"] = img_ids[y0 * width : y1 * width]
    bound.arguments["txt_ids"] = txt_ids

    def rope(ids):
        return module.pos_embed(ids) if ids.shape[0] else None

    ctx.band_rope = (rope(img_ids[lo * width : y0 * width]), rope(img_ids[y1 * width : hi * width]))
    ctx.plan = plan
    ctx.layout = TokenLayout(txt_ids.shape[0], height, width, down_factor=cfg.down_factor)
    if ctx.counter is not None:
        ctx.counter.next_step()
    bound.arguments.pop("self", None)
    return (), dict(bound.arguments)


def _strip_post_hook(module, args, kwargs, output):
    """All-gather the output strips (unless ``gather_output=False``)."""
    ctx: StripContext = module._cleardit_grid
    plan, ctx.plan, ctx.layout, ctx.band_rope = ctx.plan, None, None, (None, None)
    if output is None or plan is None or not ctx.gather_output:
        return output
    counts = [plan.rows(r) * plan.width for r in range(plan.world_size)]

    def gather(sample):
        return torch.cat(ctx.comm.all_gather(sample, counts, 1, "output", "output gather", None), dim=1)

    return replace_sample(output, gather)


# ----------------------------------------------------------------------------- the adapter
class FluxAdapter(ModelAdapter):
    """FLUX.1 (dev, schnell) and FLUX-architecture models such as the shipped mini model."""

    family = "flux"
    transformer_classes = ("FluxTransformer2DModel",)
    pipeline_classes = ("FluxPipeline",)
    img2img_class = "FluxImg2ImgPipeline"
    trainable_pattern = TRAINABLE_PATTERN
    text_conditions = ("prompt_embeds", "pooled_prompt_embeds")
    text_tokenizer = "tokenizer_2"  # the pipeline's T5 tokenizer: it sets the text length
    text_token_limit = 512  # FluxPipeline refuses max_sequence_length > 512
    strip_latents = True  # packed latents [B, H*W, C]: a rank's rows are a slice
    processor_class = ClearFluxAttnProcessor
    ip_processor_class = ClearFluxIPAdapterAttnProcessor

    # -- CLEAR attention ---------------------------------------------------------------------------
    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        return [b.attn for b in transformer.transformer_blocks] + [
            b.attn for b in transformer.single_transformer_blocks
        ]

    def _swap_processors(self, transformer, handle: ClearHandle, make) -> None:
        for layer, attn in enumerate(self.attention_modules(transformer)):
            handle.originals.append((attn, attn.processor))
            attn.set_processor(make(attn, layer))

    def clear_processor(self, attn: nn.Module, geometry: ForwardGrid, config: ClearConfig) -> nn.Module:
        """The CLEAR processor replacing ``attn``'s: with the IP-Adapter branch where one is loaded."""
        if type(attn.processor).__name__ == "FluxIPAdapterAttnProcessor":
            return self.ip_processor_class(geometry, config, attn.to_q.weight, attn.processor)
        return self.processor_class(geometry, config, attn.to_q.weight)

    def read_forward_inputs(self, transformer: nn.Module, bound, geometry: ForwardGrid) -> None:
        """Family-specific inputs of a linearized forward (FLUX.1 has none beyond its ids)."""

    def install(self, transformer: nn.Module, config: ClearConfig) -> ClearHandle:
        geometry = self.grid_class(config)
        geometry.adapter = self
        handle = ClearHandle(transformer, config, self.trainable_pattern)
        self._swap_processors(
            transformer, handle, lambda attn, _layer: self.clear_processor(attn, geometry, config)
        )
        # the hooks' state lives on the modules: per model, carried over by deepcopy
        handle.hooks = (
            *add_hooks(transformer, _token_order_pre_hook, state=geometry),
            *add_hooks(transformer.x_embedder, post_hook=_tile_order_embedding_hook, state=geometry),
            *add_hooks(transformer.pos_embed, _tile_order_ids_hook, state=geometry),
            *add_hooks(transformer.proj_out, post_hook=_raster_order_output_hook, state=geometry),
        )
        return handle

    def strips_unsupported(self) -> str | None:
        return None

    def loads_pipeline_class(self, name: str) -> bool:
        # every FLUX.1 pipeline folder (FluxPipeline, FluxImg2ImgPipeline, ...) holds the same
        # components, and FluxPipeline loads them all (Flux2* folders are FLUX.2's)
        flux1 = name.startswith("Flux") and not name.startswith("Flux2")
        return super().loads_pipeline_class(name) or (self.family == "flux" and flux1)

    def install_strips(
        self, transformer: nn.Module, config: ClearConfig, context: StripContext
    ) -> ClearHandle:
        handle = ParallelHandle(transformer, config, self.trainable_pattern, context=context)
        self._swap_processors(
            transformer,
            handle,
            lambda attn, layer: ParallelClearFluxAttnProcessor(context, config, attn.to_q.weight, layer),
        )
        context.adapter = self
        handle.hooks = add_hooks(transformer, _strip_pre_hook, _strip_post_hook, state=context)
        return handle

    @torch.no_grad()
    def sync_fused_projections(self, transformer: nn.Module) -> None:
        # fuse_qkv_projections() keeps to_q/k/v and adds to_qkv = [q; k; v]; the processors then
        # read to_qkv, so it must follow weights loaded into to_q/k/v (the image stream CLEAR trains)
        for attn in self.attention_modules(transformer):
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
        """The single-stream blocks' attention (the reference's attention-consistency targets)."""
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

    # -- pipelines ---------------------------------------------------------------------------------
    def _pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    def load_pipeline(self, folder, dtype: torch.dtype):
        return self._pipeline_class().from_pretrained(str(folder), dtype=dtype, local_files_only=True)

    def call_options(self, guidance: float, true_cfg: float, negative_prompt: str, text_len: int) -> dict:
        options = dict(guidance_scale=guidance, max_sequence_length=text_len)
        if true_cfg > 1:
            options.update(true_cfg_scale=float(true_cfg), negative_prompt=negative_prompt)
        return options

    def encode_prompt(self, pipe, prompt, *, images_per_prompt, text_len, true_cfg, negative_prompt) -> dict:
        device = pipe._execution_device
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=device,
            num_images_per_prompt=images_per_prompt, max_sequence_length=text_len,
        )  # fmt: skip
        kwargs = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        if true_cfg > 1 and negative_prompt is not None:  # every rank needs both texts' embeddings
            neg, neg_pooled, _ = pipe.encode_prompt(
                prompt=[negative_prompt] * (embeds.shape[0] // images_per_prompt), prompt_2=None,
                device=device, num_images_per_prompt=images_per_prompt, max_sequence_length=text_len,
            )  # fmt: skip
            kwargs.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
        return kwargs

    def unpack_latents(self, pipe, packed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return pipe._unpack_latents(packed, size[0], size[1], pipe.vae_scale_factor)

    # -- training ----------------------------------------------------------------------------------
    def encode_text(self, pipe, prompt: str, text_len: int) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(
            prompt, prompt_2=None, num_images_per_prompt=1, max_sequence_length=text_len
        )
        return {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0]}

    def check_conditions(self, transformer: nn.Module, sample: dict) -> None:
        cfg = transformer.config
        checks = [
            ("text embedding width", sample["prompt_embeds"].shape[-1], cfg.joint_attention_dim),
            ("pooled embedding width", sample["pooled_prompt_embeds"].shape[-1], cfg.pooled_projection_dim),
            ("latent channels x 4", sample["latents"].shape[0] * 4, cfg.in_channels),
        ]
        check_teacher_data_fits(checks)

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        # FluxPipeline._pack_latents: 2x2 patches of the latent image, row-major.
        x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    def image_ids(self, h: int, w: int, device) -> torch.Tensor:
        """FLUX ``img_ids`` [h * w, 3] of an h x w token grid: (0, row, column)."""
        ids = torch.zeros(h, w, 3)
        ids[..., 1] += torch.arange(h)[:, None]
        ids[..., 2] += torch.arange(w)[None, :]
        return ids.reshape(h * w, 3).to(device)

    def training_inputs(self, transformer, noisy, sigma, conditions, guidance) -> dict:
        dev = sigma.device
        b, _, h, w = noisy.shape
        inputs = dict(
            hidden_states=self.pack_latents(noisy),
            timestep=sigma,
            pooled_projections=conditions["pooled_prompt_embeds"],
            encoder_hidden_states=conditions["prompt_embeds"],
            txt_ids=torch.zeros(conditions["prompt_embeds"].shape[1], 3, device=dev),
            img_ids=self.image_ids(h // 2, w // 2, dev),
            return_dict=False,
        )
        if transformer.config.guidance_embeds:
            inputs["guidance"] = torch.full((b,), guidance, device=dev)
        return inputs

    def latent_channels(self, transformer: nn.Module) -> int:
        return int(transformer.config.in_channels) // 4
