"""Patch-parallel FLUX: each rank runs the transformer on its strip of image rows + all text.

``parallelize(transformer, radius=16)`` is ``linearize`` for a process group. Every rank calls the
model with the SAME full inputs; a forward pre-hook keeps this rank's rows of ``hidden_states``
and ``img_ids`` (so FLUX's RoPE is computed for the right positions) and computes the RoPE of the
band rows it will receive; every attention processor exchanges the band and runs
``strip_attention``; a forward hook all-gathers the output strips, so every rank returns the
full output (``gather_output=False`` returns only the own strip, in raster order).

With ``strip_input=True`` each rank passes only its own rows of ``hidden_states`` (img_ids still
describe the full grid): a sampler loop can then keep just its strip of the latents for the whole
denoising and gather them once at the end (``cleardit.parallel.generate`` does this; FLUX's
scheduler step is token-wise).

By default the band's attention INPUT (the normed hidden states, ``exchange="input"``) is sent
once per layer and each rank projects it to keys/values itself (to_k, to_v, norm_k, RoPE of the
band rows): one tensor instead of two, half the bytes of sending keys and values
(``exchange="kv"``), for the price of projecting the band rows locally. The exchange starts as
soon as the processor is called, so it overlaps the projection of the own rows and the text
queries' local attention.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from ..attention import TokenLayout
from ..config import ClearConfig
from ..models.flux import (
    TRAINABLE_PATTERN,
    ClearFluxAttnProcessor,
    FluxGeometry,
    bind_forward_args,
    flux_attention_modules,
    grid_from_ids,
    project_qkv,
)
from ..models.handle import ClearHandle, get_handle
from .patch import TEXT_MERGES, Comm, CommCounter, StripPlan, start_row_exchange, strip_attention

EXCHANGES = ("input", "kv")


class ParallelFluxContext(FluxGeometry):
    """What all processors of one parallel model share: the group, the plan of the forward in flight."""

    def __init__(
        self,
        config: ClearConfig,
        comm: Comm,
        text_merge: str,
        exchange: str,
        gather_output: bool,
        strip_input: bool = False,
    ):
        super().__init__(config)
        self.comm = comm
        self.text_merge = text_merge
        self.exchange = exchange
        self.gather_output = gather_output
        self.strip_input = strip_input
        self.plan: StripPlan | None = None
        self.band_rope: tuple = (None, None)  # RoPE (cos, sin) of the rows above / below the strip

    @property
    def counter(self) -> CommCounter | None:
        return self.comm.counter


@dataclass
class ParallelHandle(ClearHandle):
    """A patch-parallel model; ``context.comm.counter`` holds the bytes sent."""

    context: ParallelFluxContext | None = None


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


class ParallelClearFluxAttnProcessor(ClearFluxAttnProcessor):
    """ClearFluxAttnProcessor for one strip: same parameters (``spatial_weight``), band exchange."""

    def __init__(
        self, context: ParallelFluxContext, config: ClearConfig, param_like: torch.Tensor, layer: int
    ):
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
            raise ValueError("CLEAR attention does not take an attention_mask; FLUX pipelines pass none")
        ctx: ParallelFluxContext = self.geometry
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

        pool_weight = None
        if self.spatial_weight is not None:
            pool_weight = self.spatial_weight.reshape(self.config.down_factor, self.config.down_factor)
        out_t, _, out_i, _ = strip_attention(
            query[:, :, :text_len], key[:, :, :text_len], value[:, :, :text_len],
            query[:, :, text_len:], k_img, v_img, halo, plan, comm, self.config.radius,
            pool_weight=pool_weight, scale=self.config.scale or 1.0 / attn.head_dim**0.5,
            backend=self.config.backend, text_merge=ctx.text_merge, layer=self.layer,
        )  # fmt: skip
        out = torch.cat([out_t, out_i], dim=2).transpose(1, 2).flatten(2, 3).to(query.dtype)
        if not dual_stream:
            return out
        text_out, image_out = out.split_with_sizes([text_len, own_rows * w], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


def _install_strip_hooks(transformer: nn.Module, ctx: ParallelFluxContext) -> list:
    def pre_hook(module, args, kwargs):
        bound = bind_forward_args(module, args, kwargs)
        for name in ("controlnet_block_samples", "controlnet_single_block_samples"):
            if bound.arguments.get(name) is not None:
                raise ValueError(
                    f"patch-parallel FLUX does not support {name}; run controlnets on one device"
                )
        img_ids, txt_ids = bound.arguments.get("img_ids"), bound.arguments.get("txt_ids")
        if img_ids is None or txt_ids is None:
            raise ValueError(
                "a patch-parallel FLUX transformer needs img_ids and txt_ids to know the image grid"
            )
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
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

    def post_hook(module, args, kwargs, output):
        plan, ctx.plan, ctx.layout, ctx.band_rope = ctx.plan, None, None, (None, None)
        if output is None or plan is None or not ctx.gather_output:
            return output
        sample = output[0] if isinstance(output, tuple) else output.sample
        counts = [plan.rows(r) * plan.width for r in range(plan.world_size)]
        parts = ctx.comm.all_gather(sample, counts, 1, "output", "output gather", None)
        full = torch.cat(parts, dim=1)
        if isinstance(output, tuple):
            return (full,) + tuple(output[1:])
        output.sample = full
        return output

    return [
        transformer.register_forward_pre_hook(pre_hook, with_kwargs=True),
        transformer.register_forward_hook(post_hook, with_kwargs=True, always_call=True),
    ]


def parallelize(
    model: nn.Module,
    radius: int = 16,
    down_factor: int | None = None,
    backend: str = "auto",
    *,
    config: ClearConfig | None = None,
    group=None,
    text_merge: str = "exact",
    exchange: str = "input",
    gather_output: bool = True,
    strip_input: bool = False,
    counter: CommCounter | None = None,
    timeout_s: float | None = None,
) -> ParallelHandle:
    """Linearize a FluxTransformer2DModel for patch-parallel inference over ``group`` (in place).

    Call it on every rank after the process group exists (``init_distributed`` or ``spawn``),
    then call the model on every rank with the same full inputs.

    Args:
        radius, down_factor, backend / config: as for ``cleardit.linearize`` (the token order is
            always raster here: ``config.tile`` is ignored).
        group: the process group (default: the world).
        text_merge: "exact" (log-sum-exp merge of the text queries, equal to one device) or
            "average" (the paper's approximation: the mean of the per-rank text outputs).
        exchange: "input" (send the band's attention input, project k/v locally; default) or "kv".
        gather_output: all-gather the output strips so every rank returns the full output.
        strip_input: every rank passes only its own rows of ``hidden_states``
            ([B, rows_of_this_rank * W, C], raster order; ``StripPlan(H, W, world, radius).strip``
            says which) with the full img_ids; default False: the full hidden_states.
        counter: a CommCounter recording the bytes this rank sends (one is created if None).
        timeout_s: per-wait timeout for a peer (default: the process group's timeout).

    Returns:
        a ParallelHandle; ``restore()`` puts the original attention back. ``load_weights`` works
        as on a linearized model (same parameter names).
    """
    if not any(c.__name__ == "FluxTransformer2DModel" for c in type(model).__mro__):
        raise TypeError(f"parallelize supports FluxTransformer2DModel, got {type(model).__name__}")
    if get_handle(model) is not None:
        raise ValueError("this model is already linearized; call handle.restore() before parallelize()")
    if text_merge not in TEXT_MERGES:
        raise ValueError(f"text_merge must be one of {TEXT_MERGES}, got {text_merge!r}")
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    if config is None:
        config = ClearConfig(radius=radius, down_factor=down_factor, backend=backend, tile=None)
    config = replace(config, tile=None)
    comm = Comm(group, counter if counter is not None else CommCounter(), timeout_s)
    ctx = ParallelFluxContext(config, comm, text_merge, exchange, gather_output, strip_input)
    handle = ParallelHandle(model, config, TRAINABLE_PATTERN, context=ctx)
    for layer, attn in enumerate(flux_attention_modules(model)):
        original = attn.processor
        attn.set_processor(ParallelClearFluxAttnProcessor(ctx, config, attn.to_q.weight, layer))
        handle._undo.append(lambda attn=attn, original=original: attn.set_processor(original))
    for hook in _install_strip_hooks(model, ctx):
        handle._undo.append(hook.remove)
    model._cleardit_handle = handle
    return handle
