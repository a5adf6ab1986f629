"""Wan 2.1 / 2.2 adapter: diffusers' ``WanTransformer3DModel`` / ``WanPipeline`` (text to video).

Every block has ``attn1``, self-attention over the video tokens with a 3D RoPE, and ``attn2``,
cross-attention from the video tokens to the text (and, for image-to-video models, CLIP image)
tokens. CLEAR replaces ``attn1``: video query (t, y, x) sees video key (t', y', x') iff
dt² r² + (dy² + dx²) rt² < r² rt² (``temporal_radius`` rt; None = every frame). ``attn1`` holds no
text, so its layout has no global tokens. ``attn2`` is cross-attention to a few hundred tokens whose
cost is already linear in the video: it stays as it is.

The grid is the forward's own input: ``hidden_states`` [B, C, T, H, W] divided by
``config.patch_size`` (p_t, p_h, p_w), read by a forward pre-hook. The transformer patchifies inside
its forward, so the tile-major order is applied once per forward by hooks on sub-modules (every op
between them but attention is token-wise): on ``patch_embedding``'s output (before it is flattened
into tokens), on ``rope``'s cos/sin tables, and undone on ``proj_out``'s output (before the
unpatchify). Wan 2.2 TI2V's per-token timesteps [B, T*H*W] are put in the same order in the
pre-hook. Each forward's layout travels to the processors on its RoPE tensor
(``ForwardGrid.state_for``), so gradient checkpointing recomputes a block with its own forward's grid.

Pipelines: ``WanPipeline`` keeps latents unpacked [B, C, F, h, w] (the transformer patchifies), calls
the transformer with ``timestep`` = the scheduler's timestep (sigma x 1000) and has no distilled
guidance: its ``guidance_scale`` is classifier-free guidance. Its VAE takes 1 + k x
``vae_scale_factor_temporal`` frames; latents are stored normalised (``latents_mean`` /
``latents_std`` of the VAE config) and denormalised before decoding.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..attention import TokenLayout, clear_attention
from .adapter import ModelAdapter, check_teacher_data_fits
from .errors import NotSupportedError
from .handle import (
    ClearHandle,
    ForwardGrid,
    OrderedGrid,
    add_hooks,
    bind_forward_args,
    forget_token_order,
    to_raster_order,
)
from .processor import ClearProcessor

# attn1's projections (the video self-attention CLEAR replaces), plus the pooling weights. Its q/k
# norms and everything of attn2 stay frozen, as the image families choose.
TRAINABLE_PATTERN = re.compile(
    r"^blocks\.\d+\.attn1\."
    r"(?:(?:to_q|to_k|to_v|to_out\.0)\.(?:weight|bias)|processor\.spatial_weight)$"
)
TRAIN_TIMESTEPS = 1000  # Wan's flow-matching schedulers: timestep = sigma x 1000
DEFAULT_HEIGHT, DEFAULT_WIDTH, DEFAULT_FRAMES = 480, 832, 81  # WanPipeline's defaults


def video_grid(hidden_states: torch.Tensor, patch_size) -> tuple[int, int, int]:
    """(T, H, W) token grid of Wan latents [B, C, T, H, W]; a ValueError naming the fix otherwise."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 5:
        shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else hidden_states
        raise ValueError(
            "WanTransformer3DModel takes hidden_states as video latents [batch, channels, frames, height, "
            f"width], got {shape!r}; pass the unpacked latents (the transformer patchifies them itself)"
        )
    sizes = tuple(int(s) for s in hidden_states.shape[2:])
    patch = tuple(int(p) for p in patch_size)
    if any(s % p for s, p in zip(sizes, patch, strict=True)):
        t, h, w = sizes
        raise ValueError(
            f"latents of {t}x{h}x{w} (frames x height x width) are not a whole number of "
            f"{patch[0]}x{patch[1]}x{patch[2]} patches (the transformer's config.patch_size), so they do "
            f"not form one token grid; crop or pad the latents to multiples of {patch} (video sides to "
            "multiples of the patch times the VAE's spatial factor)"
        )
    return tuple(s // p for s, p in zip(sizes, patch, strict=True))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on [B, N, heads, d]: channel pairs (2i, 2i + 1) rotated by the tables [1, N, 1, d]
    (each angle repeated on both channels of its pair); computed in the tables' precision (float64),
    rounded once to ``x``'s dtype, as diffusers does. Each half is written straight into the result,
    so no full-size float64 copy of a long video's queries is ever held."""
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * c - odd * s
    out[..., 1::2] = even * s + odd * c
    return out


class ClearWanAttnProcessor(ClearProcessor):
    """Replaces ``attn1``'s ``WanAttnProcessor``: the same projections (fused or not), q/k RMS norms
    across heads and 3D RoPE; CLEAR over the video grid instead of full attention."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        layout = self.forward_state(rotary_emb).layout
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                "CLEAR replaces Wan's attn1 (video self-attention), which diffusers calls without "
                "encoder_hidden_states or attention_mask; attn2 (cross-attention) keeps its own processor"
            )
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)  # RMS norm across heads, before the split
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = apply_rope(query, *rotary_emb), apply_rope(key, *rotary_emb)
        if query.shape[1] != layout.seq_len:
            raise ValueError(
                f"attn1 got {query.shape[1]} tokens but the latents describe a {layout.describe_grid()} "
                f"grid ({layout.seq_len} tokens); call the transformer itself with the video latents"
            )
        cfg = self.config
        out = clear_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), layout, cfg.radius,
            cfg.temporal_radius, pool_weight=self.pool_weight(), scale=cfg.scale, backend=cfg.backend,
        )  # fmt: skip
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


# ----------------------------------------------------------------------------- forward hooks
def _wan_pre_hook(module, args, kwargs):
    """Read the grid from the latents, publish the layout and choose this forward's token order."""
    geometry: OrderedGrid = module._cleardit_grid
    geometry.check_processors(module)
    bound = bind_forward_args(module, args, kwargs)
    hidden = bound.arguments["hidden_states"]
    frames, height, width = video_grid(hidden, module.config.patch_size)
    cfg = geometry.config
    layout = TokenLayout(0, height, width, down_factor=cfg.down_factor, tile=cfg.tile, frames=frames)
    if not geometry.use_tile_order(layout, hidden.device):
        layout = layout.with_tile(None)  # no tile, or tiles covering whole rows: raster order
    geometry.layout = layout
    timestep = bound.arguments.get("timestep")
    if geometry.order is not None and torch.is_tensor(timestep) and timestep.ndim == 2:
        # Wan 2.2 TI2V: one timestep per token, in raster order like the tokens
        if timestep.shape[1] != layout.image_len:
            raise ValueError(
                f"timestep has {timestep.shape[1]} per-token values but the latents describe "
                f"{layout.image_len} tokens ({layout.describe_grid()}); pass one timestep per video token"
            )
        bound.arguments["timestep"] = timestep[:, geometry.order]
    bound.arguments.pop("self", None)
    return (), dict(bound.arguments)


def _tile_order_patches_hook(module, args, kwargs, output):
    """On ``patch_embedding``: its output [B, C, T, H, W] is flattened into tokens right after, so its
    cells are rearranged such that the flattening yields the tile-major order (the 5D shape is kept
    only for that flattening)."""
    order = module._cleardit_grid.order
    return output if order is None else output.flatten(2)[:, :, order].view(output.shape)


def _tile_order_rope_hook(module, args, kwargs, output):
    """On ``rope``: the cos/sin tables [1, T*H*W, 1, d] in the tokens' order."""
    order = module._cleardit_grid.order
    return output if order is None else tuple(t[:, order] for t in output)


# ----------------------------------------------------------------------------- the adapter
class WanAdapter(ModelAdapter):
    """Wan 2.1 (T2V 1.3B / 14B) and Wan 2.2 (TI2V-5B) text-to-video transformers."""

    family = "wan"
    transformer_classes = ("WanTransformer3DModel",)
    pipeline_classes = ("WanPipeline",)
    trainable_pattern = TRAINABLE_PATTERN
    text_conditions = ("prompt_embeds",)
    text_tokenizer = "tokenizer"  # UMT5
    text_token_limit = 512  # WanPipeline's default max_sequence_length
    grid_class = OrderedGrid
    video = True
    default_steps = 50  # WanPipeline's defaults
    default_guidance = None  # no distilled guidance: guidance_scale is classifier-free guidance
    default_true_cfg = 5.0
    default_frames = DEFAULT_FRAMES

    def describe(self) -> str:
        classes = ", ".join(self.transformer_classes + self.pipeline_classes)
        jobs = "linearize (temporal_radius), weights, generate --frames, --compare, distill, eval model"
        return f"{self.family} ({classes}): {jobs}, --devices: images only"

    # -- CLEAR attention ---------------------------------------------------------------------------
    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        """Every block's ``attn1`` (the video self-attention); ``attn2`` is not CLEAR's."""
        return [block.attn1 for block in transformer.blocks]

    def strips_unsupported(self) -> str | None:
        return "patch-parallel inference (--devices) is for images only; Wan makes videos"

    def install_into(self, transformer: nn.Module, geometry: ForwardGrid, handle) -> ClearHandle:
        modules = self.attention_modules(transformer)
        foreign = sorted({type(a.processor).__name__ for a in modules} - {"WanAttnProcessor"})
        if foreign:
            raise NotSupportedError(
                "CLEAR for Wan replaces diffusers' WanAttnProcessor in attn1; this model has "
                f"{', '.join(foreign)} there. Put the default processor back (e.g. "
                "transformer.set_attn_processor(WanAttnProcessor())) before linearize"
            )
        geometry.adapter = self
        config = geometry.config
        for attn in modules:
            handle.originals.append((attn, attn.processor))
            attn.set_processor(ClearWanAttnProcessor(geometry, config, attn.to_q.weight))
        # the hooks' state lives on the modules: per model, carried over by deepcopy
        handle.hooks = (
            *add_hooks(transformer, _wan_pre_hook, forget_token_order, state=geometry),
            *add_hooks(transformer.patch_embedding, post_hook=_tile_order_patches_hook, state=geometry),
            *add_hooks(transformer.rope, post_hook=_tile_order_rope_hook, state=geometry),
            *add_hooks(transformer.proj_out, post_hook=to_raster_order, state=geometry),
        )
        return handle

    @torch.no_grad()
    def sync_fused_projections(self, transformer: nn.Module) -> None:
        # fuse_projections() keeps to_q/k/v and adds to_qkv = [q; k; v], which the processor then
        # reads: it must follow CLEAR weights loaded into to_q/k/v
        for attn in self.attention_modules(transformer):
            if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
                parts = (attn.to_q, attn.to_k, attn.to_v)
                attn.to_qkv.weight.copy_(torch.cat([p.weight for p in parts]))
                attn.to_qkv.bias.copy_(torch.cat([p.bias for p in parts]))

    def attention_geometry(self, transformer: nn.Module) -> tuple[int, int, int]:
        cfg = transformer.config
        return int(cfg.num_attention_heads), int(cfg.attention_head_dim), len(transformer.blocks)

    def consistency_modules(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every block's ``attn1`` (its output is the video tokens')."""
        return [(f"blocks.{i}.attn1", b.attn1) for i, b in enumerate(transformer.blocks)]

    # -- pipelines ---------------------------------------------------------------------------------
    def load_pipeline(self, folder, dtype: torch.dtype):
        import diffusers

        index = Path(folder) / "model_index.json"
        if index.is_file() and (json.loads(index.read_text()).get("transformer_2") or [None])[0]:
            raise NotSupportedError(
                f"{folder} holds two transformers (Wan 2.2 A14B: transformer_2 denoises the low-noise "
                "steps), and cleardit's jobs linearize one; linearize both by hand "
                "(cleardit.linearize(pipe.transformer), cleardit.linearize(pipe.transformer_2)) or use a "
                "one-transformer Wan folder (Wan 2.1, Wan 2.2 TI2V-5B)"
            )
        cls = getattr(diffusers, self.pipeline_classes[0])
        return cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True)

    def size_factor(self, pipe) -> int:
        """Pixels per token side: the VAE's spatial factor times the patch (16 for Wan 2.1)."""
        patch = pipe.transformer.config.patch_size
        return int(pipe.vae_scale_factor_spatial) * max(int(patch[1]), int(patch[2]))

    def default_size(self, pipe) -> int:
        """WanPipeline's default height (its default video is 480 x 832 px: ``default_video_size``)."""
        return DEFAULT_HEIGHT

    def default_video_size(self, pipe) -> tuple[int, int]:
        """WanPipeline's default (height, width): 480 x 832 px."""
        return DEFAULT_HEIGHT, DEFAULT_WIDTH

    def attention_text_len(self, text_len: int) -> int:
        """0: the text reaches the video through attn2 (cross-attention), never inside attn1 (CLEAR's)."""
        return 0

    def call_options(self, guidance: float, true_cfg: float, negative_prompt: str, text_len: int) -> dict:
        # Wan has no distilled guidance: its guidance_scale is classifier-free guidance
        return self.cfg_guidance_scale_options(true_cfg, negative_prompt, text_len)

    def encode_prompt(self, pipe, prompt, *, images_per_prompt, text_len, true_cfg, negative_prompt) -> dict:
        embeds, neg = pipe.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=true_cfg > 1,
            num_videos_per_prompt=images_per_prompt, max_sequence_length=text_len,
            device=pipe._execution_device,
        )  # fmt: skip
        kwargs = dict(prompt_embeds=embeds)
        if true_cfg > 1:
            kwargs.update(negative_prompt_embeds=neg)
        return kwargs

    def unpack_latents(self, pipe, packed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return packed  # WanPipeline keeps latents unpacked [B, C, F, h, w]: the transformer patchifies

    def decode_latents(self, pipe, packed: torch.Tensor, size: tuple[int, int], output_type: str = "pil"):
        """Normalised latents [B, C, F, h, w] -> the frames of each video, as ``WanPipeline`` decodes
        them (per-channel ``latents_mean`` / ``latents_std``, then ``postprocess_video``)."""
        vae = pipe.vae
        latents = self.unpack_latents(pipe, packed, size).to(vae.device, vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        latents = latents / inv_std + mean  # the pipeline's own arithmetic, so the frames are its frames
        with torch.no_grad():
            video = vae.decode(latents, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type=output_type)

    # -- training ----------------------------------------------------------------------------------
    def encode_text(self, pipe, prompt: str, text_len: int) -> dict[str, torch.Tensor]:
        embeds, _ = pipe.encode_prompt(
            prompt, do_classifier_free_guidance=False, num_videos_per_prompt=1, max_sequence_length=text_len
        )
        return {"prompt_embeds": embeds[0]}

    def check_conditions(self, transformer: nn.Module, sample: dict) -> None:
        cfg = transformer.config
        check_teacher_data_fits(
            [
                ("text embedding width", sample["prompt_embeds"].shape[-1], cfg.text_dim),
                ("latent channels", sample["latents"].shape[0], cfg.in_channels),
            ]
        )

    def training_inputs(self, transformer, noisy, sigma, conditions, guidance) -> dict:
        # WanPipeline passes the scheduler's timesteps: sigma x num_train_timesteps (1000), one per video
        return dict(
            hidden_states=self.pack_latents(noisy),
            timestep=sigma * TRAIN_TIMESTEPS,
            encoder_hidden_states=conditions["prompt_embeds"],
            return_dict=False,
        )

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents  # the transformer takes (and returns) the latents [B, C, F, h, w] as they are

    def latent_channels(self, transformer: nn.Module) -> int:
        return int(transformer.config.in_channels)
