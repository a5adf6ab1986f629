"""Video jobs on a tiny HunyuanVideo 1.5 text-to-video pipeline built offline: ``generate --frames``
(+ ``--compare``), the adapter's rebuild of the pipeline's transformer call and decode, CFG through
the guider for one call only, teacher data + distillation with ``--resume``, and ``eval model``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cleardit import generate
from cleardit.models import NotSupportedError, adapter_for
from cleardit.video_io import read_video
from tests.helpers import distill_resumed_after_a_crash
from tests.tiny_hunyuanvideo15 import (
    FRAMES,
    GUIDANCE,
    HEIGHT,
    LATENT_CHANNELS,
    WIDTH,
    save_tiny_hunyuanvideo15_pipeline,
)

PROMPT = 'a red circle "hi"'  # the quoted text goes through ByT5 too
FAST = dict(frames=FRAMES, height=HEIGHT, width=WIDTH, steps=1, true_cfg=1.0, quiet=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_hunyuanvideo15_pipeline(tmp_path_factory.mktemp("hy") / "tiny-hunyuanvideo15")


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import HunyuanVideo15Pipeline

    return HunyuanVideo15Pipeline.from_pretrained(str(folder))


# ----------------------------------------------------------------------------- generate
def test_generate_compare_writes_videos_of_the_stated_frames(folder, tmp_path):
    result = generate(
        PROMPT, model=folder, frames=FRAMES, radius=2, temporal_radius=1, steps=1, true_cfg=1.0,
        compare=True, output=tmp_path, quiet=True,
    )  # fmt: skip
    (path,) = result.paths
    assert result.videos[0].shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert read_video(path).shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert read_video(result.full_paths[0]).shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert read_video(result.compare.paths[0]).shape[0] == FRAMES
    meta = json.loads(result.sidecar_paths[0].read_text())
    assert meta["family"] == "hunyuanvideo15" and meta["latent_frames"] == 2 and meta["temporal_radius"] == 1
    assert meta["text_tokens"] == 1000  # the pipeline's fixed MLLM length
    assert result.compare.flops_clear < result.compare.flops_full


def test_clear_beyond_the_video_equals_full_attention_and_a_small_window_does_not(pipe):
    guider = pipe.guider.guidance_scale
    full = generate(PROMPT, model=pipe, radius=0, **FAST).videos[0].astype(int)
    wide = generate(PROMPT, model=pipe, radius=9, temporal_radius=3, **FAST).videos[0].astype(int)
    small = generate(PROMPT, model=pipe, radius=1, temporal_radius=1, **FAST).videos[0].astype(int)
    assert np.abs(full - wide).max() <= 1
    assert np.abs(full - small).max() > 1
    assert pipe.guider.guidance_scale == guider  # the run's scale (1) was for its calls only


def test_training_inputs_rebuild_the_pipelines_transformer_call_and_decode_matches(pipe, monkeypatch):
    adapter = adapter_for(pipe.transformer)
    calls, steps = [], []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append({n: v.clone() if torch.is_tensor(v) else v for n, v in k.items()}),
        with_kwargs=True,
    )
    scheduler_step, denoised = type(pipe.scheduler).step, []

    def step(self, *args, **kwargs):  # keeps the final latents, which the pipeline then decodes
        out = scheduler_step(self, *args, **kwargs)
        denoised.append(out[0].clone())
        return out

    monkeypatch.setattr(type(pipe.scheduler), "step", step)
    try:
        frames = adapter.run_pipeline(
            pipe, prompt=PROMPT, height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=2,
            generator=torch.Generator().manual_seed(0), output_type="np",
            callback_on_step_end=lambda p, i, t, kw: steps.append(i) or {},
            **adapter.call_options(None, 4.0, "", 1000),
        ).frames  # fmt: skip
    finally:
        hook.remove()
    latents = denoised[-1]
    assert pipe.guider.guidance_scale == GUIDANCE  # 4.0 was set for that call only
    assert steps == [0, 1] and len(calls) == 4  # CFG: a conditional and an unconditional call per step
    assert latents.shape == (1, LATENT_CHANNELS, 2, HEIGHT // 16, WIDTH // 16)
    text = {True: adapter.encode_text(pipe, PROMPT, 1000), False: adapter.encode_text(pipe, "", 1000)}
    assert text[True]["prompt_embeds_mask_2"].sum() > 0  # the quoted text reached ByT5
    for i, call in enumerate(calls):
        conditions = {n: t[None] for n, t in text[i % 2 == 0].items()}  # conditional call first
        sigma = pipe.scheduler.sigmas[i // 2].reshape(1)
        noisy = call["hidden_states"][:, :LATENT_CHANNELS]
        rebuilt = adapter.training_inputs(pipe.transformer, noisy, sigma, conditions, None)
        assert set(rebuilt) == set(call) - {"attention_kwargs"}
        for name, value in rebuilt.items():
            if torch.is_tensor(value):
                assert value.dtype == call[name].dtype, name
                torch.testing.assert_close(value, call[name], rtol=0, atol=1e-4 if name == "timestep" else 0)
            else:
                assert value == call[name], name
    # decode_latents gives the pipeline's own frames
    np.testing.assert_array_equal(
        adapter.decode_latents(pipe, latents, (HEIGHT, WIDTH), output_type="np"), frames
    )
    noise = adapter.initial_noise(pipe, 1, HEIGHT, WIDTH, torch.float32, "cpu", None, frames=FRAMES)
    assert noise.shape == latents.shape


def test_bad_requests_are_clear_errors(folder, pipe, tmp_path):
    adapter = adapter_for(pipe.transformer)
    with pytest.raises(ValueError, match="use 5 or 9"):
        generate(PROMPT, model=pipe, **{**FAST, "frames": 6})
    with pytest.raises(TypeError, match="frames=N"):
        adapter.initial_noise(pipe, 1, HEIGHT, WIDTH, torch.float32, "cpu", None)
    with pytest.raises(ValueError, match="encodes 1000 MLLM tokens"):
        adapter.encode_text(pipe, PROMPT, 40)
    i2v = tmp_path / "i2v"
    i2v.mkdir()
    (i2v / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideo15ImageToVideoPipeline"}))
    with pytest.raises(NotSupportedError, match="HunyuanVideo15ImageToVideoPipeline.*text to video"):
        adapter.load_pipeline(i2v, torch.float32)
    with pytest.raises(NotSupportedError, match="HunyuanVideo15ImageToVideoPipeline"):
        adapter.load_transformer(i2v, torch.float32)


@pytest.mark.slow
def test_several_videos_per_prompt(pipe):
    # diffusers makes image_embeds for one video per prompt and its VAE cannot decode a batch:
    # run_pipeline corrects both for the call; each video equals the one made alone with its seed
    videos = generate(PROMPT, model=pipe, radius=2, batch=2, seed=3, **FAST).videos
    alone = generate(PROMPT, model=pipe, radius=2, seed=4, **FAST).videos[0]
    assert len(videos) == 2 and np.abs(videos[1].astype(int) - alone.astype(int)).max() <= 1


# ----------------------------------------------------------------------------- distill and eval
@pytest.mark.slow
def test_distill_with_resume_and_eval(folder, tmp_path, monkeypatch):
    from diffusers import HunyuanVideo15Pipeline
    from safetensors import safe_open

    from cleardit.distill.teacher_data import TeacherDataset, make_teacher_data
    from cleardit.distill.trainer import DistillConfig
    from cleardit.eval import evaluate_model

    prompts = [PROMPT, "a blue square"]
    data = tmp_path / "data"
    make_teacher_data(
        folder, prompts, data, resolution=(HEIGHT, WIDTH), steps=2, frames=FRAMES, true_cfg=1.0, quiet=True
    )
    dataset = TeacherDataset(data)
    assert dataset[0]["latents"].shape == (LATENT_CHANNELS, 2, HEIGHT // 16, WIDTH // 16)
    assert dataset[0]["prompt_embeds_mask_2"].sum() > 0 and dataset[1]["prompt_embeds_mask_2"].sum() == 0
    assert dataset.manifest["frames"] == FRAMES
    cfg = DistillConfig(radius=2, temporal_radius=1, steps=2, batch_size=2, lr=1e-3, attention_layers="0")

    def load():
        return HunyuanVideo15Pipeline.from_pretrained(str(folder))

    result, resumed = distill_resumed_after_a_crash(cfg, dataset, tmp_path, load, monkeypatch)
    assert all(math.isfinite(e["loss"]) for e in result.losses)
    assert any("transformer_blocks.0.attn" in k for k in resumed)
    with safe_open(str(result.weights), "pt") as f:
        assert f.metadata()["temporal_radius"] == "1" and f.metadata()["family"] == "hunyuanvideo15"

    report = evaluate_model(
        prompts, model=folder, radii=[2], temporal_radius=1, frames=FRAMES, steps=1,
        output=tmp_path / "eval", metrics=["psnr"], quiet=True,
    )  # fmt: skip
    entry = report.summary["clear"][0]
    assert entry["radius"] == 2 and entry["temporal_radius"] == 1 and 0 < entry["flops_fraction"] < 1
    assert math.isfinite(entry["values"]["psnr"]) and len(entry["temporal_psnr_per_video"]) == 2
