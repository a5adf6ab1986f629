"""The mini model's architecture: an UNTRAINED diffusers ``FluxPipeline`` built offline from configs.

Same classes and data flow as FLUX.1 (AutoencoderKL, FluxTransformer2DModel, CLIPTextModel +
T5EncoderModel, FlowMatchEulerDiscreteScheduler), shrunk. FluxPipeline packs 2x2 latent patches into
one token, so the transformer's ``in_channels`` is 4 * the VAE's ``latent_channels`` and one token
covers ``2 * vae_scale_factor`` pixels per side (the pipeline's size factor).

Sizes (``MINI_SIZES``):

* ``"tiny"``: for tests. VAE x8 (size factor 16, like FLUX), 4 latent channels, 1+1 transformer
  blocks of 2 heads x 16; a 64x64 image is 4x4 tokens and a 2-step generation takes well under a
  second on a CPU. Weights are random with a large spread, so every layer (attention included)
  visibly changes the output.
* ``"mini"``: the model the mini trainer trains. VAE x4 (size factor 8), 8 latent channels, base
  resolution 128 px = 16x16 tokens, 2 double-stream + 4 single-stream blocks of 4 heads x 32,
  40 text tokens. A 4x-base image (512 px) is 64x64 tokens, where CLEAR r=8 keeps ~5% of the
  image-image pairs. Weights are diffusers' initialisation (untrained).

``save_mini_pipeline`` writes the folder ``cleardit generate --model`` reads (``save_pretrained``
plus ``cleardit.json`` with the base resolution, text length and generation defaults).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..pipelines.loading import ModelInfo
from .vocab import MAX_TEXT_TOKENS, build_tokenizers, clip_text_config, flux_text_dims, t5_config


@dataclass(frozen=True)
class MiniSize:
    """Configs of one mini size (keyword overrides of the diffusers / transformers configs)."""

    base_resolution: int
    vae: dict
    transformer: dict
    clip: dict = field(default_factory=dict)
    t5: dict = field(default_factory=dict)
    default_steps: int = 20
    random_init_std: float | None = None  # tiny: replace every weight by N(0, std) so all paths matter


MINI_SIZES: dict[str, MiniSize] = {
    "tiny": MiniSize(
        base_resolution=64,
        vae=dict(
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            mid_block_add_attention=False,
        ),
        transformer=dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            axes_dims_rope=(4, 6, 6),
            guidance_embeds=True,
        ),
        clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, projection_dim=32),
        t5=dict(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2),
        default_steps=2,
        random_init_std=0.2,
    ),
    "mini": MiniSize(
        base_resolution=128,
        vae=dict(
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            latent_channels=8,
            norm_num_groups=32,
            mid_block_add_attention=False,  # no quadratic VAE attention: decoding stays linear in pixels
        ),
        transformer=dict(
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=32,
            num_attention_heads=4,
            axes_dims_rope=(8, 12, 12),
            guidance_embeds=False,
        ),
        default_steps=20,
    ),
}

# diffusers' scheduler config of FLUX.1-dev (dynamic shift: mu from the image token count).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def _size(size: str) -> MiniSize:
    if size not in MINI_SIZES:
        raise ValueError(f"size must be one of {sorted(MINI_SIZES)}, got {size!r}")
    return MINI_SIZES[size]


def build_vae(size: str = "mini", **overrides):
    """An untrained ``AutoencoderKL`` of the given size (scaling 1, shift 0 until the trainer sets them)."""
    from diffusers import AutoencoderKL

    cfg = dict(_size(size).vae)
    n = len(cfg["block_out_channels"])
    cfg = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        sample_size=_size(size).base_resolution,
        scaling_factor=1.0,
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **cfg,
    )
    cfg.update(overrides)
    return AutoencoderKL(**cfg)


def build_transformer(size: str = "mini", latent_channels: int | None = None, **overrides):
    """An untrained ``FluxTransformer2DModel`` matching the size's VAE and text encoders."""
    from diffusers import FluxTransformer2DModel

    spec = _size(size)
    latent_channels = latent_channels or spec.vae["latent_channels"]
    clip_cfg, t5_cfg = clip_text_config(**spec.clip), t5_config(**spec.t5)
    cfg = dict(patch_size=1, in_channels=4 * latent_channels, out_channels=None, **spec.transformer)
    cfg.update(flux_text_dims(clip_cfg, t5_cfg))
    cfg.update(overrides)
    return FluxTransformer2DModel(**cfg)


def build_mini_pipeline(
    size: str = "mini",
    seed: int = 0,
    *,
    vae_overrides: dict | None = None,
    transformer_overrides: dict | None = None,
):
    """An untrained mini-architecture ``FluxPipeline`` (fp32, CPU, eval mode), built offline.

    Args:
        size: "tiny" (tests) or "mini" (the model to train); see ``MINI_SIZES``.
        seed: seeds the initialisation, so the same call gives the same weights.
        vae_overrides, transformer_overrides: config fields to change (e.g. ``num_single_layers``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, T5EncoderModel

    spec = _size(size)
    torch.manual_seed(seed)
    vae = build_vae(size, **(vae_overrides or {}))
    transformer = build_transformer(size, vae.config.latent_channels, **(transformer_overrides or {}))
    text_encoder = CLIPTextModel(clip_text_config(**spec.clip))
    text_encoder_2 = T5EncoderModel(t5_config(**spec.t5))
    tokenizer, tokenizer_2 = build_tokenizers(MAX_TEXT_TOKENS)
    modules = [vae, transformer, text_encoder, text_encoder_2]
    if spec.random_init_std is not None:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for module in (transformer, text_encoder, text_encoder_2):
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * spec.random_init_std)
    for module in modules:
        module.eval().requires_grad_(False)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def mini_model_info(size: str = "mini", **fields) -> ModelInfo:
    """The ``cleardit.json`` of a mini pipeline: base resolution, 40 text tokens, default steps."""
    spec = _size(size)
    info = dict(
        name=f"cleardit-{size}",
        base_height=spec.base_resolution,
        base_width=spec.base_resolution,
        max_sequence_length=MAX_TEXT_TOKENS,
        default_steps=spec.default_steps,
        default_guidance=3.5,
    )
    info.update(fields)
    return ModelInfo(**info)


def save_mini_pipeline(pipe, folder: str | os.PathLike, info: ModelInfo | str = "mini") -> Path:
    """``pipe.save_pretrained(folder)`` (safetensors) plus ``cleardit.json``; returns the folder.

    ``info``: a ModelInfo, or a size name whose defaults to write (``mini_model_info(size)``).
    """
    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    (info if isinstance(info, ModelInfo) else mini_model_info(info)).write(folder)
    return folder


def count_parameters(pipe) -> dict[str, int]:
    """Parameters per component of a pipeline (vae, transformer, text_encoder, text_encoder_2)."""
    out = {}
    for name in ("vae", "transformer", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            out[name] = sum(p.numel() for p in module.parameters())
    return out


__all__ = [
    "MINI_SIZES",
    "SCHEDULER_CONFIG",
    "MiniSize",
    "build_mini_pipeline",
    "build_transformer",
    "build_vae",
    "count_parameters",
    "mini_model_info",
    "save_mini_pipeline",
]
