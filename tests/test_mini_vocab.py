"""The mini model's offline tokenizers and text-encoder configs (``cleardit.mini.vocab``).

The caption grammar itself belongs to the training lab (examples/mini_model/tests/test_lab_dataset.py
checks that it makes exactly ``WORDS``); here the captions are plain strings.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cleardit.mini.vocab import WORDS

# -- tokenizers ------------------------------------------------------------------------------

LONGEST = (
    "a small white triangle at the bottom right, a large black square at the bottom left and a "
    "small yellow circle at the top right on a red to blue vertical gradient background"
)


def test_tokenizers_encode_words_and_roundtrip(tmp_path):
    transformers = pytest.importorskip("transformers")
    from cleardit.mini.vocab import (
        BOS_ID,
        EOS_ID,
        MAX_TEXT_TOKENS,
        PAD_ID,
        UNK_ID,
        build_tokenizers,
        token_vocab,
        vocab_size,
    )

    clip_tok, t5_tok = build_tokenizers()
    assert len(clip_tok) == len(t5_tok) == vocab_size() == len(WORDS) + 4
    assert clip_tok.model_max_length == MAX_TEXT_TOKENS
    vocab = token_vocab()
    text = "a small red circle at the top left on a plain blue background"
    ids = clip_tok(text).input_ids
    assert ids == [BOS_ID] + [vocab[w] for w in text.split()] + [EOS_ID]
    assert t5_tok(text).input_ids == [vocab[w] for w in text.split()] + [EOS_ID]
    assert t5_tok("A Small, RED zebra").input_ids == [
        vocab["a"],
        vocab["small"],
        vocab[","],
        vocab["red"],
        UNK_ID,
        EOS_ID,
    ]
    assert clip_tok.decode(ids, skip_special_tokens=True) == text
    # the longest caption the grammar makes (test_lab_dataset.py) fits with room for <s> and </s>
    assert len(clip_tok(LONGEST).input_ids) <= MAX_TEXT_TOKENS
    batch = clip_tok(
        [text, LONGEST],
        padding="max_length",
        max_length=MAX_TEXT_TOKENS,
        truncation=True,
        return_tensors="pt",
    )
    assert batch.input_ids.shape == (2, MAX_TEXT_TOKENS)
    assert batch.input_ids[0, -1] == PAD_ID and (batch.input_ids == EOS_ID).sum(1).tolist() == [1, 1]
    # truncation keeps the closing </s> (CLIP pools there)
    short = t5_tok([LONGEST], padding="max_length", max_length=8, truncation=True).input_ids[0]
    assert len(short) == 8 and short[-1] == EOS_ID
    # save and reload offline
    for name, tok in (("clip", clip_tok), ("t5", t5_tok)):
        tok.save_pretrained(tmp_path / name)
        again = transformers.AutoTokenizer.from_pretrained(tmp_path / name)
        assert again(LONGEST).input_ids == tok(LONGEST).input_ids
        assert again.pad_token_id == PAD_ID and again.eos_token_id == EOS_ID
        assert again.model_max_length == MAX_TEXT_TOKENS


def _tiny_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, T5EncoderModel

    from cleardit.mini.vocab import build_tokenizers, clip_text_config, flux_text_dims, t5_config
    from cleardit.models.tiny import tiny_flux_transformer

    torch.manual_seed(0)
    clip_cfg = clip_text_config(hidden_size=16, intermediate_size=32, projection_dim=16)
    t5_cfg = t5_config(d_model=24, d_kv=12, d_ff=32)
    transformer = tiny_flux_transformer(**flux_text_dims(clip_cfg, t5_cfg))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=transformer.config.in_channels // 4,
        norm_num_groups=4,
        sample_size=64,
        shift_factor=0.0,
        scaling_factor=1.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    clip_tok, t5_tok = build_tokenizers()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.eval(),
        text_encoder=CLIPTextModel(clip_cfg).eval(),
        tokenizer=clip_tok,
        text_encoder_2=T5EncoderModel(t5_cfg).eval(),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def test_flux_pipeline_accepts_the_tokenizers(tmp_path):
    pytest.importorskip("transformers")
    from diffusers import FluxPipeline

    from cleardit.mini.vocab import EOS_ID, MAX_TEXT_TOKENS

    pipe = _tiny_pipeline()
    prompts = [
        "a small red circle at the top left on a plain blue background",
        "a large blue square in the center on a plain red background",
    ]
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, max_sequence_length=MAX_TEXT_TOKENS)
        assert embeds.shape == (2, MAX_TEXT_TOKENS, 24) and pooled.shape == (2, 16)
        assert text_ids.shape == (MAX_TEXT_TOKENS, 3)
        assert (embeds[0] - embeds[1]).abs().max() > 1e-3 and (pooled[0] - pooled[1]).abs().max() > 1e-3
        # CLIP pools at the </s> token (config eos_token_id matches the tokenizer)
        ids = pipe.tokenizer(
            prompts[0], padding="max_length", max_length=MAX_TEXT_TOKENS, return_tensors="pt"
        )
        hidden = pipe.text_encoder(ids.input_ids).last_hidden_state
        eos_at = int((ids.input_ids[0] == EOS_ID).nonzero()[0])
        assert torch.allclose(pooled[0], hidden[0, eos_at], atol=1e-5)
        out = pipe(
            prompts[0],
            height=64,
            width=64,
            num_inference_steps=2,
            max_sequence_length=MAX_TEXT_TOKENS,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
    # a saved pipeline reloads (tokenizers included) offline and encodes identically
    pipe.save_pretrained(tmp_path / "pipe")
    again = FluxPipeline.from_pretrained(tmp_path / "pipe")
    with torch.no_grad():
        embeds2, pooled2, _ = again.encode_prompt(prompts, max_sequence_length=MAX_TEXT_TOKENS)
    assert torch.allclose(embeds, embeds2) and torch.allclose(pooled, pooled2)


def test_words_are_sorted_and_match_the_shipped_tokenizers():
    """The token ids are baked into the shipped text encoders: the shipped tokenizer files must map
    every word to the id ``token_vocab`` gives it."""
    from cleardit.mini.vocab import token_vocab
    from cleardit.pipelines.loading import DEFAULT_MODEL_DIR

    assert list(WORDS) == sorted(set(WORDS))
    for name in ("tokenizer", "tokenizer_2"):
        shipped = json.loads((DEFAULT_MODEL_DIR / name / "tokenizer.json").read_text())["model"]["vocab"]
        assert shipped == token_vocab(), name
