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

Patch-parallel (``install_strips``): every rank takes the full image stream and the pre-hook keeps
``[references | this rank's target rows, raster order]`` of it and of ``img_ids`` (so the RoPE the
transformer computes from the ids matches); text and references stay whole on every rank as global
tokens. The processors' attention takes the band's keys and values from the neighbouring ranks
(``ClearProcessor.attention``), and the post-hook gathers every rank's target rows back into the
caller's order, so every rank returns the whole output. The KV-cache modes run as on one device (the
references, extracted or cached, are global on every rank).

Pipelines: ``Flux2KleinPipeline`` (Qwen3 text encoder, classifier-free guidance with the empty
negative prompt, no distilled guidance; ``Flux2Adapter``) and FLUX.2 [dev]'s ``Flux2Pipeline``
(Mistral 3 text encoder, distilled guidance, no classifier-free guidance; ``Flux2DevAdapter``).
Which adapter serves a transformer is the transformer's own ``guidance_embeds``. diffusers has no
FLUX.2 image-to-image pipeline, so ``--highres`` re-noises the start latents to the first sigma and
denoises them with the text-to-image pipeline (``renoise_pipeline_class``). The adapter's "latents"
[B, C, H/8, W/8] are the transformer's normalised space seen unpatchified: the VAE latents,
patchified (2x2), normalised by the VAE's batch-norm statistics, unpatchified again (every map
token-wise, so flow matching there is flow matching in the transformer's own space).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from ..attention import TokenLayout
from ..attention.strips import StripPlan
from ..config import ClearConfig
from .adapter import ModelAdapter, check_teacher_data_fits
from .errors import NotSupportedError
from .flux import FluxAdapter, project_qkv
from .handle import ClearHandle, ForwardGrid, ForwardState, add_hooks, bind_forward_args, replace_sample
from .processor import ClearProcessor
from .strips import StripContext

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


class Flux2StripContext(StripContext):
    """A patch-parallel model's ``StripContext`` plus what ``Flux2Grid`` adds for the processors."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens: Flux2Tokens | None = None
        self.output_order: torch.Tensor | None = None

    snapshot = Flux2Grid.snapshot


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
    | target]``, and reorder the image stream to ``[references | target, tile-major]`` (patch-parallel:
    ``[references | this rank's target rows]``)."""
    geometry: Flux2Grid | Flux2StripContext = module._cleardit_grid
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
    if mode is not None and not geometry.kv_processors:
        raise ValueError(
            f"kv_cache_mode={mode!r} on a model linearized from diffusers' plain FLUX.2 processors, which "
            "ignore the KV cache (it is never filled); build the pipeline as Flux2KleinKVPipeline (its KV "
            "processors) before linearize, or call the model without kv_cache_mode"
        )
    num_ref_tokens = int(arguments.get("num_ref_tokens", 0))
    references, target, (height, width) = split_image_stream(ids, mode, num_ref_tokens)
    global_refs = arguments["kv_cache"].num_ref_tokens if mode == "cached" else references.numel()
    config = geometry.config
    comm = getattr(geometry, "comm", None)
    layout = TokenLayout(
        text.shape[1] + global_refs, height, width, down_factor=config.down_factor,
        tile=config.tile if comm is None else None,
    )  # fmt: skip
    # order: the image stream the blocks run on; stream: the output's (after the gather in parallel)
    if comm is None:
        order = stream = torch.cat([references, target[layout.sequence_to_raster(ids.device)]])
    else:  # patch-parallel: this rank's rows, every rank's gathered again by the post-hook
        geometry.plan = StripPlan(height, width, comm.world, config.radius, config.down_factor)
        y0, y1 = geometry.plan.strip(comm.rank)
        order = torch.cat([references, target[y0 * width : y1 * width]])
        stream = torch.cat([references, target])
        if comm.counter is not None:
            comm.counter.next_step()
    geometry.layout = layout
    geometry.tokens = Flux2Tokens(text.shape[1], global_refs, mode)
    geometry.output_order = None
    if comm is not None or not torch.equal(order, torch.arange(order.numel(), device=order.device)):
        arguments["hidden_states"] = hidden[:, order]
        arguments["img_ids"] = ids[order]
        # the output holds the whole image stream, or only the target in extract mode
        kept = stream[references.numel() :] - references.numel() if mode == "extract" else stream
        geometry.output_order = torch.argsort(kept)
    bound.arguments.pop("self", None)
    return (), dict(bound.arguments)


def _flux2_post_hook(module, args, kwargs, output):
    """Put the output's tokens back in the caller's order (patch-parallel: every rank's target rows
    gathered first)."""
    geometry: Flux2Grid | Flux2StripContext = module._cleardit_grid
    order, geometry.output_order = geometry.output_order, None
    # the layout stays set: gradient checkpointing re-runs the blocks during backward
    if order is None or output is None:  # output is None when forward raised
        return output
    comm = getattr(geometry, "comm", None)

    def caller_order(sample: torch.Tensor) -> torch.Tensor:
        if comm is not None:
            sample = _gather_target_rows(sample, geometry.plan, comm)
        return sample[:, order]

    return replace_sample(output, caller_order)


def _gather_target_rows(sample: torch.Tensor, plan: StripPlan, comm) -> torch.Tensor:
    """[B, references + own rows, C] -> [B, references + every rank's rows, C] (no references in
    extract mode: the model drops them)."""
    counts = [plan.rows(r) * plan.width for r in range(comm.world)]
    references = sample.shape[1] - counts[comm.rank]
    rows = comm.all_gather(sample[:, references:], counts, 1, "output", "output gather", None)
    return torch.cat([sample[:, :references], *rows], dim=1)


# ----------------------------------------------------------------------------- processors
class ClearFlux2Processor(ClearProcessor):
    """CLEAR over FLUX.2's ``[text | references | target]`` q/k/v; the KV-cache modes as diffusers'
    ``_flux2_kv_causal_attention`` runs them. Subclasses project q/k/v as their block does."""

    def attend(self, query, key, value, image_rotary_emb, attention_mask, kv_cache) -> torch.Tensor:
        """[B, N, heads, d] q/k/v before RoPE -> the attention output [B, N, heads * d]."""
        if attention_mask is not None:
            raise ValueError("CLEAR attention for FLUX.2 takes no attention_mask; FLUX.2 pipelines pass none")
        state = self.forward_state(image_rotary_emb)
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
        strip = getattr(self.geometry, "comm", None) is not None  # this rank's rows only (install_strips)
        if not strip and query.shape[1] != layout.seq_len:
            raise ValueError(
                f"attention got {query.shape[1]} tokens but the forward's inputs describe "
                f"{layout.seq_len} ({t} text + {tokens.references} reference + "
                f"{layout.height}x{layout.width} target)"
            )
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out = self.attention(q, k, v, layout).transpose(1, 2)
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
    """FLUX.2 (dev, klein): ``Flux2Transformer2DModel``; the jobs through ``Flux2KleinPipeline``."""

    family = "flux2"
    transformer_classes = ("Flux2Transformer2DModel",)
    pipeline_classes = ("Flux2KleinPipeline",)
    text_token_limit = 512  # Flux2KleinPipeline's tokenizer_max_length
    grid_class = Flux2Grid
    strip_context_class = Flux2StripContext
    trainable_pattern = TRAINABLE_PATTERN
    text_conditions = ("prompt_embeds",)
    default_steps = 50  # Flux2KleinPipeline's defaults
    default_guidance = None  # no distilled guidance: its guidance_scale is classifier-free guidance
    default_true_cfg = 4.0

    def matches(self, transformer) -> bool:
        # FLUX.2 [dev] embeds distilled guidance, klein does not: the two run different pipelines
        guided = bool(getattr(getattr(transformer, "config", None), "guidance_embeds", False))
        return super().matches(transformer) and guided == (self.default_guidance is not None)

    def describe(self) -> str:
        classes = ", ".join(self.transformer_classes + self.pipeline_classes)
        jobs = "linearize (reference images global, KV cache), weights, generate, --compare"
        return (
            f"{self.family} ({classes}): {jobs}, --highres (latent re-noise), distill, eval model, "
            "--devices N"
        )

    # -- CLEAR attention ---------------------------------------------------------------------------
    # FLUX.2 keeps FLUX.1's module names (double blocks, then single blocks whose to_qkv_mlp_proj is
    # never "fused_projections"), so these read the model as FLUX.1's adapter does
    attention_modules = FluxAdapter.attention_modules
    sync_fused_projections = FluxAdapter.sync_fused_projections
    attention_geometry = FluxAdapter.attention_geometry
    consistency_modules = FluxAdapter.consistency_modules
    rope_theta_scaled = FluxAdapter.rope_theta_scaled
    query_norms = FluxAdapter.query_norms

    def strips_unsupported(self) -> str | None:
        return None

    def install_into(
        self, transformer: nn.Module, geometry: Flux2Grid | Flux2StripContext, handle
    ) -> ClearHandle:
        config = geometry.config
        geometry.adapter = self
        modules = self.attention_modules(transformer)
        # diffusers runs the KV-cache modes only with its KV processors (Flux2KleinKVPipeline sets them)
        geometry.kv_processors = all(type(a.processor).__name__.startswith("Flux2KV") for a in modules)
        for attn in modules:
            handle.originals.append((attn, attn.processor))
            single = hasattr(attn, "to_qkv_mlp_proj")
            cls = ClearFlux2ParallelSelfAttnProcessor if single else ClearFlux2AttnProcessor
            param_like = attn.to_qkv_mlp_proj.weight if single else attn.to_q.weight
            attn.set_processor(cls(geometry, config, param_like))
        # the hooks' state lives on the model: carried over by deepcopy
        handle.hooks = add_hooks(transformer, _flux2_pre_hook, _flux2_post_hook, state=geometry)
        return handle

    # -- high-resolution hooks ---------------------------------------------------------------------
    # -- pipelines ---------------------------------------------------------------------------------
    def loads_pipeline_class(self, name: str) -> bool:
        # every FLUX.2 folder but [dev]'s is ours (FLUX.1's adapter takes the other Flux* names);
        # load_pipeline says which of them the jobs run
        return name.startswith("Flux2") and name != "Flux2Pipeline"

    def load_pipeline(self, folder, dtype: torch.dtype):
        from diffusers import Flux2KleinPipeline

        name = json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name", "")
        if not name.startswith("Flux2Klein"):
            raise NotSupportedError(
                f"{folder} holds a {name}; cleardit's jobs run FLUX.2 [dev] (Flux2Pipeline) and klein "
                "(Flux2KleinPipeline) folders. Its transformer can be linearized directly: "
                "cleardit.linearize(pipe.transformer, radius=...)"
            )
        return Flux2KleinPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True)

    def schedule_mu(self, pipe, image_seq_len: int, steps: int) -> float | None:
        # FLUX.2's pipelines (dev and klein) fit mu to the token count and the step count
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=steps)

    def img2img_pipeline(self, pipe):
        img2img = renoise_pipeline_class("Flux2KleinPipeline")(
            **pipe.components, is_distilled=pipe.config.is_distilled
        )
        img2img._progress_bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
        return img2img

    def call_options(self, guidance: float, true_cfg: float, negative_prompt: str, text_len: int) -> dict:
        if true_cfg > 1 and negative_prompt:
            raise NotSupportedError(
                "FLUX.2 klein pipelines guide with the empty negative prompt and take no other; "
                "drop --negative-prompt"
            )
        return dict(guidance_scale=float(true_cfg), max_sequence_length=text_len)

    def encode_prompt(self, pipe, prompt, *, images_per_prompt, text_len, true_cfg, negative_prompt) -> dict:
        device = pipe._execution_device
        embeds, _ = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=images_per_prompt, max_sequence_length=text_len
        )
        kwargs = dict(prompt_embeds=embeds)
        if true_cfg > 1 and not pipe.config.is_distilled:  # every rank needs both texts' embeddings
            prompts = embeds.shape[0] // images_per_prompt
            neg, _ = pipe.encode_prompt(
                [negative_prompt or ""] * prompts, device=device, num_images_per_prompt=images_per_prompt,
                max_sequence_length=text_len,
            )  # fmt: skip
            kwargs.update(negative_prompt_embeds=neg)
        return kwargs

    def unpack_latents(self, pipe, packed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Flux2KleinPipeline's ``output_type="latent"`` (the VAE's own latents) -> normalised latents."""
        return normalize_latents(pipe.vae, packed)

    def decode_latents(self, pipe, packed: torch.Tensor, size: tuple[int, int], output_type: str = "pil"):
        vae = pipe.vae  # the pipeline's latent output is the VAE's own: decode as it is
        with torch.no_grad():
            image = vae.decode(packed.to(vae.device, vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)

    # -- training ----------------------------------------------------------------------------------
    def encode_text(self, pipe, prompt: str, text_len: int) -> dict[str, torch.Tensor]:
        embeds, _ = pipe.encode_prompt(prompt, num_images_per_prompt=1, max_sequence_length=text_len)
        return {"prompt_embeds": embeds[0]}

    def check_conditions(self, transformer: nn.Module, sample: dict) -> None:
        cfg = transformer.config
        check_teacher_data_fits(
            [
                ("text embedding width", sample["prompt_embeds"].shape[-1], cfg.joint_attention_dim),
                ("latent channels x 4", sample["latents"].shape[0] * 4, cfg.in_channels),
            ]
        )

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline._pack_latents(Flux2KleinPipeline._patchify_latents(latents))

    def training_inputs(self, transformer, noisy, sigma, conditions, guidance) -> dict:
        from diffusers import Flux2KleinPipeline

        text = conditions["prompt_embeds"]
        patches = Flux2KleinPipeline._patchify_latents(noisy)
        return dict(  # as Flux2KleinPipeline calls the transformer (no guidance)
            hidden_states=Flux2KleinPipeline._pack_latents(patches),
            timestep=sigma,
            encoder_hidden_states=text,
            txt_ids=Flux2KleinPipeline._prepare_text_ids(text).to(sigma.device),
            img_ids=Flux2KleinPipeline._prepare_latent_ids(patches).to(sigma.device),
            return_dict=False,
        )

    def latent_channels(self, transformer: nn.Module) -> int:
        return int(transformer.config.in_channels) // 4


class Flux2DevAdapter(Flux2Adapter):
    """FLUX.2 [dev]: a ``Flux2Transformer2DModel`` with distilled guidance (``guidance_embeds``), the
    jobs through ``Flux2Pipeline`` (Mistral 3 text encoder). CLEAR is installed as for klein; what
    differs is the pipeline: distilled guidance instead of classifier-free guidance, and its
    ``output_type="latent"`` is the packed normalised tokens, not the VAE's own latents."""

    pipeline_classes = ("Flux2Pipeline",)
    default_steps = 50  # Flux2Pipeline's defaults
    default_guidance = 4.0
    default_true_cfg = 1.0

    def describe(self) -> str:
        classes = ", ".join(self.transformer_classes + self.pipeline_classes)
        return (
            f"{self.family} [dev] ({classes}): linearize (reference images global), weights, generate, "
            "--compare, --highres (latent re-noise), distill, eval model, --devices N"
        )

    def loads_pipeline_class(self, name: str) -> bool:
        return name == "Flux2Pipeline"

    def load_pipeline(self, folder, dtype: torch.dtype):
        from diffusers import Flux2Pipeline

        return Flux2Pipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True)

    def img2img_pipeline(self, pipe):
        img2img = renoise_pipeline_class("Flux2Pipeline")(**pipe.components)
        img2img._progress_bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
        return img2img

    def call_options(self, guidance: float, true_cfg: float, negative_prompt: str, text_len: int) -> dict:
        if true_cfg > 1:
            raise NotSupportedError(
                "FLUX.2 [dev] (Flux2Pipeline) has distilled guidance and no classifier-free guidance: "
                f"drop --true-cfg {true_cfg:g} and set --guidance instead"
            )
        return dict(guidance_scale=float(guidance), max_sequence_length=text_len)

    def encode_prompt(self, pipe, prompt, *, images_per_prompt, text_len, true_cfg, negative_prompt) -> dict:
        embeds, _ = pipe.encode_prompt(
            prompt, device=pipe._execution_device, num_images_per_prompt=images_per_prompt,
            max_sequence_length=text_len,
        )  # fmt: skip
        return dict(prompt_embeds=embeds)

    def unpack_latents(self, pipe, packed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Flux2Pipeline's ``output_type="latent"`` (packed normalised tokens [B, h/2 * w/2, 4C], raster
        order) -> normalised latents [B, C, h, w]."""
        factor = self.size_factor(pipe)
        rows, cols = size[0] // factor, size[1] // factor
        b, n, c = packed.shape
        if n != rows * cols:
            raise ValueError(f"{n} packed tokens are not a {size[0]}x{size[1]} image ({rows}x{cols} tokens)")
        patches = packed.transpose(1, 2).reshape(b, c, rows, cols)
        return pipe._unpatchify_latents(patches)

    def decode_latents(self, pipe, packed: torch.Tensor, size: tuple[int, int], output_type: str = "pil"):
        vae = pipe.vae
        patches = pipe._patchify_latents(self.unpack_latents(pipe, packed, size))
        mean, std = _batch_norm_stats(vae, patches)
        latents = pipe._unpatchify_latents(patches * std + mean)
        with torch.no_grad():
            image = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)

    def training_inputs(self, transformer, noisy, sigma, conditions, guidance) -> dict:
        inputs = super().training_inputs(transformer, noisy, sigma, conditions, guidance)
        # as Flux2Pipeline calls the transformer: the guidance scale itself, one per sample
        inputs["guidance"] = torch.full((noisy.shape[0],), float(guidance), device=sigma.device)
        return inputs


# ----------------------------------------------------------------------------- latents and --highres
def _batch_norm_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
        like.device, like.dtype
    )
    return mean, std


def normalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's own latents [B, C, h, w] -> the transformer's normalised space, unpatchified."""
    from diffusers import Flux2KleinPipeline

    patches = Flux2KleinPipeline._patchify_latents(latents)
    mean, std = _batch_norm_stats(vae, patches)
    return Flux2KleinPipeline._unpatchify_latents((patches - mean) / std)


@functools.cache
def renoise_pipeline_class(base: str):
    """``Flux2RenoisePipeline`` over diffusers' pipeline class ``base`` (``Flux2KleinPipeline`` or
    ``Flux2Pipeline``), made on first use (importing diffusers' pipelines is slow)."""
    import diffusers

    class Flux2RenoisePipeline(getattr(diffusers, base)):
        """``--highres`` stage 2 for FLUX.2 (diffusers has no image-to-image pipeline for it): the start
        image's normalised latents re-noised to the first sigma, ``(1 - s) x0 + s noise`` (what an
        image-to-image pipeline does at strength s), then denoised by the text-to-image pipeline on
        those sigmas. Built from a pipeline's components (shared, not copied)."""

        @torch.no_grad()
        def __call__(self, prompt=None, image=None, height=None, width=None, sigmas=None, strength=None,
                     generator=None, **kwargs):  # fmt: skip
            """``image``: normalised latents [B, C, h, w] (the adapter's ``unpack_latents``) or images
            (PIL), resized to ``height`` x ``width``, one per image made; the noise level is
            ``sigmas[0]`` (``strength``, if given other than 1, must agree)."""
            if image is None or sigmas is None:
                raise ValueError("the FLUX.2 re-noise pipeline needs image= (the start) and sigmas=")
            level = float(sigmas[0])
            if strength not in (None, 1.0) and abs(strength - level) > 1e-6:
                raise ValueError(
                    f"strength={strength} disagrees with sigmas[0]={level}; pass one noise level"
                )
            device = self._execution_device
            if isinstance(image, torch.Tensor):
                start = self._patchify_latents(image.to(device, torch.float32))
            else:
                pixels = self.image_processor.preprocess(image, height=height, width=width)
                start = self._encode_vae_image(pixels.to(device, self.vae.dtype), generator).float()
            noise = randn_like_with(start, generator)
            latents = ((1 - level) * start + level * noise).to(self.transformer.dtype)
            kwargs.setdefault("num_inference_steps", len(sigmas))
            return super().__call__(
                prompt=prompt, height=height, width=width, sigmas=sigmas, generator=generator,
                latents=latents, **kwargs,
            )  # fmt: skip

    Flux2RenoisePipeline.__name__ = Flux2RenoisePipeline.__qualname__ = f"{base}Renoise"
    return Flux2RenoisePipeline


def randn_like_with(like: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like ``like`` from ``generator`` (one, or one per sample)."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)
