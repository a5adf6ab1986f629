"""A tiny HunyuanVideo 1.5 text-to-video pipeline built offline (no hub), for the adapter's job tests.

``tiny_hunyuanvideo15_pipeline()`` returns a ``HunyuanVideo15Pipeline`` of:

* the mini model's word-level tokenizer (``cleardit.mini.vocab``; unknown words are ``<unk>``) with a
  chat template of our own (``apply_chat_template`` is all the pipeline calls) and a tiny
  ``Qwen2_5_VLTextModel`` over its vocabulary (3 layers: the pipeline reads the third hidden state from
  the end). The pipeline pads to 1000 + 108 tokens and crops the first 108 (the real template's
  system prompt); the template here puts exactly ``CROP`` (= 108) tokens before the prompt, so the kept
  MLLM tokens are the prompt's words and the rest is padding, as with the real encoder;
* ``ByT5Tokenizer`` (it needs no files) and a tiny ``T5EncoderModel``: the pipeline encodes the quoted
  text of a prompt (``a red circle "hi"``) with it and gives a prompt without quotes zeros and an
  all-zero mask;
* a tiny ``AutoencoderKLHunyuanVideo15``: the real factors (16 in space, 4 in time: 1 + 4k frames),
  ``LATENT_CHANNELS`` latent channels and a ``scaling_factor`` that is not 1 (so the decode's
  division matters);
* a tiny ``HunyuanVideo15Transformer3DModel`` (2 blocks, 2 heads x 16, in_channels 2C + 1 as the
  pipeline concatenates [latents | condition latents | mask]) whose parameters are all random and
  non-zero;
* ``FlowMatchEulerDiscreteScheduler`` (shift 5) and ``ClassifierFreeGuidance`` (scale 6).

A 5-frame 32 x 48 px video is 2 latent frames of 2 x 3, i.e. 2 x 2 x 3 tokens.
``save_tiny_hunyuanvideo15_pipeline`` writes it to a folder (``save_pretrained`` plus a
``cleardit.json``) that ``cleardit`` jobs load.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TEXT_DIM, BYT5_DIM, IMAGE_DIM = 16, 12, 8  # Qwen hidden size, ByT5 d_model, image-condition width
LATENT_CHANNELS = 4
HEIGHT, WIDTH, FRAMES = 32, 48, 5
CROP = 108  # HunyuanVideo15Pipeline.prompt_template_encode_start_idx
GUIDANCE = 6.0


def _tokenizer():
    """The mini word-level tokenizer with a chat template whose system part is exactly CROP tokens."""
    from cleardit.mini.vocab import build_t5_tokenizer

    tok = build_t5_tokenizer(max_length=1108)
    # every "a" is one token; the pipeline's own system message (all <unk> here) is dropped, so the
    # CROP tokens before the prompt do not depend on it
    tok.chat_template = (
        "{{ 'a ' * " + str(CROP) + " }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ m['content'] }}{% endif %}{% endfor %}"
    )
    return tok


def tiny_hunyuanvideo15_transformer(seed: int = 0):
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=2 * LATENT_CHANNELS + 1, out_channels=LATENT_CHANNELS, num_attention_heads=2,
        attention_head_dim=16, num_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1,
        text_embed_dim=TEXT_DIM, text_embed_2_dim=BYT5_DIM, image_embed_dim=IMAGE_DIM,
        rope_axes_dim=(4, 6, 6), target_size=64, task_type="t2v",
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # diffusers zero-initialises some layers: random values make every path count
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval().requires_grad_(False)


def tiny_hunyuanvideo15_pipeline(seed: int = 0):
    """The tiny ``HunyuanVideo15Pipeline`` (see the module docstring)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
    )
    from transformers import (
        ByT5Tokenizer,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
        T5Config,
        T5EncoderModel,
    )

    from cleardit.mini.vocab import EOS_ID, PAD_ID, vocab_size

    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            vocab_size=vocab_size(), hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            pad_token_id=PAD_ID, eos_token_id=EOS_ID,
        )
    )  # fmt: skip
    byt5 = ByT5Tokenizer()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(byt5), d_model=BYT5_DIM, d_kv=6, d_ff=24, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=64, dropout_rate=0.0,
            feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        )
    )  # fmt: skip
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1,
        scaling_factor=0.75,
    )  # fmt: skip
    for module in (vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    return HunyuanVideo15Pipeline(
        text_encoder=text_encoder, tokenizer=_tokenizer(), text_encoder_2=text_encoder_2, tokenizer_2=byt5,
        transformer=tiny_hunyuanvideo15_transformer(seed), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0),
        guider=ClassifierFreeGuidance(guidance_scale=GUIDANCE),
    )  # fmt: skip


def save_tiny_hunyuanvideo15_pipeline(folder: str | os.PathLike, seed: int = 0, **info) -> Path:
    """Write ``tiny_hunyuanvideo15_pipeline(seed)`` to ``folder`` (safetensors) with a ``cleardit.json``:
    base size 32 x 48 px, 2 steps, no distilled guidance, the pipeline's own text length; ``info``
    overrides any ``ModelInfo`` field. Returns the folder."""
    from cleardit.mini.pipeline import mini_model_info

    folder = Path(folder)
    tiny_hunyuanvideo15_pipeline(seed).save_pretrained(str(folder), safe_serialization=True)
    fields = dict(
        name="tiny-hunyuanvideo15", base_height=HEIGHT, base_width=WIDTH, default_steps=2,
        default_guidance=None, max_sequence_length=None,
    )  # fmt: skip
    mini_model_info("tiny", **{**fields, **info}).write(folder)
    return folder
