"""A tiny Wan text-to-video pipeline built offline (no hub), for the Wan adapter's and the video jobs' tests.

``tiny_wan_pipeline()`` returns a ``WanPipeline`` of:

* the mini model's word-level T5-style tokenizer (``cleardit.mini.vocab``, 40 tokens) and a tiny
  ``UMT5EncoderModel`` over its vocabulary (d_model ``TEXT_DIM``);
* a tiny ``AutoencoderKLWan``: 8 channels at every level, ``z_dim`` = ``LATENT_CHANNELS``, the real
  factors (8 in space, 4 in time: ``num_frames = 1 + 4k``), ``latents_mean`` / ``latents_std`` of
  length ``z_dim`` that are not 0 / 1 (so the pipeline's denormalisation matters);
* a tiny ``WanTransformer3DModel`` (patch (1, 2, 2), 2 blocks, 2 heads x 12) whose parameters are all
  random and non-zero;
* the scheduler: ``FlowMatchEulerDiscreteScheduler`` (shift 3, Wan's 480p flow shift) by default. It is
  the class ``WanPipeline`` declares, its timesteps are exactly sigma x 1000 (floats), the value
  ``WanAdapter.training_inputs`` gives, and cleardit's schedule helpers know it. ``unipc=True`` gives
  the scheduler the Wan-AI Diffusers folders ship instead (``UniPCMultistepScheduler`` with
  ``prediction_type="flow_prediction"``, ``use_flow_sigmas=True``, ``flow_shift=3.0``), whose
  timesteps are sigma x 1000 truncated to integers.

A 5-frame 32 x 48 px video is 2 latent frames of 4 x 6, i.e. 2 x 2 x 3 tokens. ``save_tiny_wan_pipeline``
writes it to a folder (``save_pretrained`` plus a ``cleardit.json``) that ``cleardit`` jobs load.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TEXT_DIM = 16  # UMT5 d_model = the transformer's text_dim
LATENT_CHANNELS = 4  # the VAE's z_dim = the transformer's in/out channels
HEIGHT, WIDTH, FRAMES = 32, 48, 5  # a small valid video: 2 latent frames x 4 x 6 latents


def tiny_wan_transformer(seed: int = 0, **overrides):
    """A ``WanTransformer3DModel`` with every parameter random (diffusers leaves none zero here, but
    random values everywhere make every path count), in eval mode without gradients."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    config = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
    )  # fmt: skip
    model = WanTransformer3DModel(**{**config, **overrides})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval().requires_grad_(False)


def tiny_wan_pipeline(seed: int = 0, unipc: bool = False):
    """The tiny ``WanPipeline`` (see the module docstring)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanPipeline,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    from cleardit.mini.vocab import EOS_ID, MAX_TEXT_TOKENS, PAD_ID, build_t5_tokenizer, vocab_size

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=vocab_size(), d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=MAX_TEXT_TOKENS,
            dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
            pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID,
        )
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 2)
    mean = (0.3 * torch.randn(LATENT_CHANNELS, generator=g)).tolist()
    std = (0.5 + torch.rand(LATENT_CHANNELS, generator=g)).tolist()
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        latents_mean=mean, latents_std=std,
    )  # fmt: skip
    if unipc:
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    transformer = tiny_wan_transformer(seed)
    for module in (vae, text_encoder):
        module.eval().requires_grad_(False)
    return WanPipeline(
        tokenizer=build_t5_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
        transformer=transformer,
    )  # fmt: skip


def save_tiny_wan_pipeline(folder: str | os.PathLike, seed: int = 0, unipc: bool = False, **info) -> Path:
    """Write ``tiny_wan_pipeline(seed, unipc)`` to ``folder`` (safetensors) with a ``cleardit.json``:
    base size 32 x 48 px, 40 text tokens, 2 steps, no distilled guidance; ``info`` overrides any
    ``ModelInfo`` field. Returns the folder."""
    from cleardit.mini.pipeline import mini_model_info

    folder = Path(folder)
    tiny_wan_pipeline(seed, unipc).save_pretrained(str(folder), safe_serialization=True)
    fields = dict(
        name="tiny-wan", base_height=HEIGHT, base_width=WIDTH, default_steps=2, default_guidance=None
    )
    mini_model_info("tiny", **{**fields, **info}).write(folder)
    return folder
