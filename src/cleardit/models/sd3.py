"""SD3 / SD3.5 adapter: diffusers' ``SD3Transformer2DModel`` / ``StableDiffusion3Pipeline``.

SD3's joint attention runs on ``[image | text]``: the image tokens come FIRST (``TokenLayout(...,
text_first=False)``). There is no RoPE (``PatchEmbed`` adds an absolute sin-cos embedding), so the
grid is the latents' (H / patch, W / patch), read by a forward pre-hook from ``hidden_states``
[B, C, H, W] before the transformer patchifies them. SD3.5's ``dual_attention_layers`` add ``attn2``,
an image-only self-attention: CLEAR without text. The last block is ``context_pre_only``: its text
output is dropped by the block (no ``to_add_out``), as in diffusers.

The transformer patchifies inside its forward, so the tile-major permutation is applied to the
output of ``pos_embed`` and undone on the output of ``proj_out`` (every op between them but
attention is token-wise). ControlNet residuals arrive in raster order: with them the order stays
raster. Each forward's layout also travels to the processors in ``joint_attention_kwargs``, so a
block that gradient checkpointing recomputes during backward uses the grid of its own forward.

Patch-parallel (``install_strips``): every rank takes the full latents, keeps its rows after
``pos_embed`` (the sin-cos positions are already added), runs the processors' attention with the
band's keys and values from its neighbours (``ClearProcessor.attention``) and gathers every rank's
rows at ``proj_out``, so the transformer unpatchifies the whole image on every rank.

Pipelines: ``StableDiffusion3Pipeline`` (and its img2img for ``--highres``) keep the latents unpacked
[B, C, h, w] (nothing to pack), take ``timestep`` = sigma x 1000, and have no distilled guidance: the
jobs' true CFG is their ``guidance_scale``. The text is 77 CLIP tokens (the CLIP tokenizers' length)
followed by ``max_sequence_length`` T5 tokens.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from ..attention import TokenLayout
from ..attention.strips import StripPlan
from .adapter import ModelAdapter, check_teacher_data_fits
from .errors import NotSupportedError
from .handle import (
    ClearHandle,
    ForwardGrid,
    OrderedGrid,
    add_hooks,
    bind_forward_args,
    forget_token_order,
    to_tile_order,
)
from .processor import ClearProcessor

# The image-stream projections of the joint attention (attn) and of SD3.5's image-only attn2,
# plus the pooling weights of the down-sampled variant.
TRAINABLE_PATTERN = re.compile(
    r"^transformer_blocks\.\d+\.attn2?\."
    r"(?:(?:to_q|to_k|to_v|to_out\.0)\.(?:weight|bias)|processor\.spatial_weight)$"
)
TRAIN_TIMESTEPS = 1000  # SD3's FlowMatchEulerDiscreteScheduler: timestep = sigma x 1000
LAYOUT_KWARG = "cleardit_layout"  # the forward's TokenLayout, passed to processors in joint_attention_kwargs


def latent_grid(hidden_states: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """(H, W) token grid of SD3 latents [B, C, H, W]; a ValueError naming the fix otherwise."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 4:
        shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else hidden_states
        raise ValueError(
            f"SD3Transformer2DModel takes hidden_states as latents [batch, channels, height, width], got "
            f"{shape!r}; pass the unpacked latents (the transformer patchifies them itself)"
        )
    height, width = hidden_states.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"latents of {height}x{width} are not a whole number of {patch_size}x{patch_size} patches, so "
            f"they do not form one token grid; crop or pad the latents to multiples of {patch_size} "
            "(image sides to multiples of patch_size x the VAE's scale factor, 16 px for SD3)"
        )
    return height // patch_size, width // patch_size


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, n, heads * d] -> [B, heads, n, d] (as JointAttnProcessor2_0 reshapes)."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


class ClearSD3AttnProcessor(ClearProcessor):
    """Replaces ``JointAttnProcessor2_0`` (joint ``attn`` and SD3.5's ``attn2``): the same projections
    and q/k norms; CLEAR instead of full attention. Without ``encoder_hidden_states`` (``attn2``) the
    attention is image-only: CLEAR without text."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cleardit_layout: TokenLayout | None = None,
    ):
        if attention_mask is not None:
            raise ValueError("CLEAR attention for SD3 takes no attention_mask; SD3 pipelines pass none")
        if cleardit_layout is None:  # the transformer's pre-hook passes every forward's own layout
            raise RuntimeError(
                f"this {type(self).__name__} ran outside a linearized SD3 transformer's forward (or belongs "
                "to none: diffusers' loaders rebuild processors as type(p)()), so the image grid is unknown; "
                "call the transformer itself, linearized with cleardit.linearize"
            )
        layout = cleardit_layout
        joint = encoder_hidden_states is not None
        if not joint:  # attn2: image-only self-attention
            layout = dataclasses.replace(layout, text_len=0)
        query, key, value = (_heads(p(hidden_states), attn.heads) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if joint:
            eq, ek, ev = (
                _heads(p(encoder_hidden_states), attn.heads)
                for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            # [image | text], image first
            query, key, value = (torch.cat(p, dim=2) for p in ((query, eq), (key, ek), (value, ev)))
        strip = getattr(self.geometry, "comm", None) is not None  # this rank's rows only (install_strips)
        if not strip and query.shape[2] != layout.seq_len:
            raise ValueError(
                f"attention got {query.shape[2]} tokens but the latents and text describe {layout.seq_len} "
                f"({layout.height}x{layout.width} image + {layout.text_len} text)"
            )
        out = self.attention(query, key, value, layout)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        image_len = out.shape[1] - layout.text_len
        image_out = attn.to_out[1](attn.to_out[0](out[:, :image_len]))
        if not joint:
            return image_out
        text_out = out[:, image_len:]
        if not attn.context_pre_only:  # the last block drops its text output (no to_add_out)
            text_out = attn.to_add_out(text_out)
        return image_out, text_out


# ----------------------------------------------------------------------------- forward hooks
def _sd3_pre_hook(module, args, kwargs):
    """Read the grid from the latents, publish the layout (also to the processors through
    ``joint_attention_kwargs``) and choose the token order of this forward."""
    geometry: OrderedGrid = module._cleardit_grid
    geometry.check_processors(module)
    bound = bind_forward_args(module, args, kwargs)
    text = bound.arguments.get("encoder_hidden_states")
    if text is None:
        raise ValueError("a linearized SD3 transformer needs encoder_hidden_states (the text tokens)")
    height, width = latent_grid(bound.arguments["hidden_states"], module.config.patch_size)
    controlnet = bound.arguments.get("block_controlnet_hidden_states") is not None
    comm = getattr(geometry, "comm", None)
    tile = None if controlnet or comm is not None else geometry.config.tile
    layout = TokenLayout(
        text.shape[1], height, width, text_first=False, down_factor=geometry.config.down_factor, tile=tile
    )
    geometry.layout = layout
    geometry.order = geometry.inverse = None
    if comm is not None:  # patch-parallel: keep this rank's rows (gathered again at proj_out)
        if controlnet:
            raise ValueError(
                "patch-parallel SD3 does not support ControlNet residuals; run them on one device"
            )
        geometry.plan = StripPlan(
            height, width, comm.world, geometry.config.radius, geometry.config.down_factor
        )
        y0, y1 = geometry.plan.strip(comm.rank)
        geometry.order = torch.arange(y0 * width, y1 * width, device=text.device)
        if comm.counter is not None:
            comm.counter.next_step()
    else:  # controlnet residuals are added in raster order: with them the layout has no tile
        geometry.use_tile_order(layout, text.device)
    if not geometry.original_pass:  # the original processors (distillation teacher) take no layout
        attention_kwargs = dict(bound.arguments.get("joint_attention_kwargs") or {})
        attention_kwargs[LAYOUT_KWARG] = layout
        bound.arguments["joint_attention_kwargs"] = attention_kwargs
    bound.arguments.pop("self", None)
    return (), dict(bound.arguments)


def _to_raster_hook(module, args, kwargs, output):
    """On ``proj_out``: image tokens back into raster order before the transformer unpatchifies
    (patch-parallel: every rank's rows gathered)."""
    geometry = module._cleardit_grid
    comm = getattr(geometry, "comm", None)
    if comm is not None:
        plan = geometry.plan
        counts = [plan.rows(r) * plan.width for r in range(comm.world)]
        return torch.cat(comm.all_gather(output, counts, 1, "output", "output gather", None), dim=1)
    return output if geometry.inverse is None else output[:, geometry.inverse]


# ----------------------------------------------------------------------------- the adapter
class SD3Adapter(ModelAdapter):
    """Stable Diffusion 3 (medium) and 3.5 (medium, large, large-turbo)."""

    family = "sd3"
    transformer_classes = ("SD3Transformer2DModel",)
    pipeline_classes = ("StableDiffusion3Pipeline",)
    img2img_class = "StableDiffusion3Img2ImgPipeline"
    trainable_pattern = TRAINABLE_PATTERN
    text_conditions = ("prompt_embeds", "pooled_prompt_embeds")
    text_tokenizer = "tokenizer_3"  # T5: the CLIP encoders' 77 tokens come before its tokens
    text_token_limit = 512  # StableDiffusion3Pipeline refuses max_sequence_length > 512
    grid_class = OrderedGrid
    default_steps = 28  # StableDiffusion3Pipeline's defaults
    default_guidance = None  # no distilled guidance: guidance_scale is classifier-free guidance
    default_true_cfg = 7.0

    # -- CLEAR attention ---------------------------------------------------------------------------
    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        """Per block its joint ``attn`` and, in SD3.5's dual-attention blocks, the image-only ``attn2``."""
        modules = []
        for block in transformer.transformer_blocks:
            modules += [a for a in (block.attn, getattr(block, "attn2", None)) if a is not None]
        return modules

    def strips_unsupported(self) -> str | None:
        return None

    def install_into(self, transformer: nn.Module, geometry: ForwardGrid, handle) -> ClearHandle:
        config = geometry.config
        modules = self.attention_modules(transformer)
        foreign = sorted({type(a.processor).__name__ for a in modules} - {"JointAttnProcessor2_0"})
        if foreign:
            raise NotSupportedError(
                "CLEAR for SD3 replaces diffusers' JointAttnProcessor2_0; this model has "
                f"{', '.join(foreign)} "
                "(an IP-Adapter, fused QKV projections or another attention variant). Unload it "
                "(unload_ip_adapter(), unfuse_qkv_projections()) before linearize"
            )
        geometry.adapter = self
        for attn in modules:
            handle.originals.append((attn, attn.processor))
            attn.set_processor(ClearSD3AttnProcessor(geometry, config, attn.to_q.weight))
        # the hooks' state lives on the modules: per model, carried over by deepcopy
        handle.hooks = (
            *add_hooks(transformer, _sd3_pre_hook, forget_token_order, state=geometry),
            *add_hooks(transformer.pos_embed, post_hook=to_tile_order, state=geometry),
            *add_hooks(transformer.proj_out, post_hook=_to_raster_hook, state=geometry),
        )
        return handle

    def attention_geometry(self, transformer: nn.Module) -> tuple[int, int, int]:
        """(heads, head_dim, attention layers); SD3.5's image-only attn2 layers count as layers (their
        few text pairs are counted too: the FLOPs are a slight over-estimate)."""
        cfg = transformer.config
        return (
            int(cfg.num_attention_heads),
            int(cfg.attention_head_dim),
            len(self.attention_modules(transformer)),
        )

    def consistency_modules(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every block's joint attention (its image-stream output is compared)."""
        return [
            (f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(transformer.transformer_blocks)
        ]

    def query_norms(self, transformer: nn.Module) -> list[nn.Module]:
        """The q norms (image and text queries) of SD3.5-style models (``qk_norm``); SD3 without q/k
        norms has no module whose output is the query, so proportional attention cannot hook it."""
        norms = []
        for attn in self.attention_modules(transformer):
            wanted = [attn.norm_q] + ([attn.norm_added_q] if attn.add_q_proj is not None else [])
            if any(n is None for n in wanted):
                raise NotSupportedError(
                    "proportional attention with full attention needs q/k norms (SD3.5, qk_norm); this "
                    "SD3 model has none: use it with CLEAR only, or without proportional attention"
                )
            norms += wanted
        return norms

    # -- pipelines ---------------------------------------------------------------------------------
    def load_pipeline(self, folder, dtype: torch.dtype):
        import diffusers

        cls = getattr(diffusers, self.pipeline_classes[0])
        return cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True)

    def size_factor(self, pipe) -> int:
        return int(pipe.vae_scale_factor) * int(pipe.patch_size)

    def call_options(self, guidance: float, true_cfg: float, negative_prompt: str, text_len: int) -> dict:
        # SD3 has no distilled guidance: its guidance_scale is classifier-free guidance
        return self.cfg_guidance_scale_options(true_cfg, negative_prompt, text_len)

    def encode_prompt(self, pipe, prompt, *, images_per_prompt, text_len, true_cfg, negative_prompt) -> dict:
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=pipe._execution_device,
            num_images_per_prompt=images_per_prompt, do_classifier_free_guidance=true_cfg > 1,
            negative_prompt=negative_prompt, max_sequence_length=text_len,
        )  # fmt: skip
        kwargs = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        if true_cfg > 1:
            kwargs.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
        return kwargs

    def unpack_latents(self, pipe, packed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return packed  # SD3 pipelines keep latents unpacked [B, C, h, w]: the transformer patchifies

    # -- training ----------------------------------------------------------------------------------
    def encode_text(self, pipe, prompt: str, text_len: int) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, None, None, num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=text_len,
        )  # fmt: skip
        return {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0]}

    def check_conditions(self, transformer: nn.Module, sample: dict) -> None:
        cfg = transformer.config
        check_teacher_data_fits(
            [
                ("text embedding width", sample["prompt_embeds"].shape[-1], cfg.joint_attention_dim),
                (
                    "pooled embedding width",
                    sample["pooled_prompt_embeds"].shape[-1],
                    cfg.pooled_projection_dim,
                ),
                ("latent channels", sample["latents"].shape[0], cfg.in_channels),
            ]
        )

    def training_inputs(self, transformer, noisy, sigma, conditions, guidance) -> dict:
        # SD3 pipelines pass the scheduler's timesteps: sigma x num_train_timesteps (1000)
        return dict(
            hidden_states=self.pack_latents(noisy),
            timestep=sigma * TRAIN_TIMESTEPS,
            encoder_hidden_states=conditions["prompt_embeds"],
            pooled_projections=conditions["pooled_prompt_embeds"],
            return_dict=False,
        )

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents  # the transformer takes (and returns) the latents [B, C, h, w] as they are

    def latent_channels(self, transformer: nn.Module) -> int:
        return int(transformer.config.in_channels)
