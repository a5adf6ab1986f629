"""Video jobs on a tiny Wan pipeline built offline: ``generate --frames`` (MP4, GIF preview, JSON
sidecar, ``--compare``), video teacher data + distillation with ``--resume``, and ``eval model``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cleardit import generate, linearize, load_weights
from cleardit.video_io import encode_mp4, read_video, save_mp4
from cleardit.video_metrics import frame_psnr, temporal_psnr, video_psnr
from tests.helpers import distill_resumed_after_a_crash
from tests.tiny_wan import save_tiny_wan_pipeline

HEIGHT, WIDTH, FRAMES = 32, 48, 5  # 2 latent frames of 2 x 3 tokens


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("wan") / "tiny-wan")


# ----------------------------------------------------------------------------- files and metrics
def test_mp4_round_trip_keeps_frames_size_and_content(tmp_path):
    g = np.random.default_rng(0)
    smooth = np.cumsum(g.integers(0, 3, size=(7, 24, 40, 3)), axis=2).clip(0, 255).astype(np.uint8)
    path = save_mp4(smooth, tmp_path / "a.mp4", fps=8)
    back = read_video(path)
    assert back.shape == smooth.shape
    assert video_psnr(smooth, back) > 30  # H.264 at crf 18 on a smooth video
    odd = read_video(save_mp4(smooth[:, :23, :39], tmp_path / "odd.mp4"))  # yuv420p pads to even sides
    assert odd.shape == (7, 24, 40, 3)
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temporary file
    with pytest.raises(ValueError, match=r"\[frames, height, width, 3\]"):
        encode_mp4(np.zeros((4, 4, 3), np.uint8))


def test_video_metrics():
    g = np.random.default_rng(1)
    video = g.integers(0, 256, size=(4, 8, 8, 3)).astype(np.uint8)
    assert video_psnr(video, video) == math.inf
    noisy = np.clip(video.astype(int) + g.integers(-8, 9, size=video.shape), 0, 255).astype(np.uint8)
    assert len(frame_psnr(video, noisy)) == 4
    mse = ((noisy.astype(float) - video) / 255).__pow__(2).mean()
    assert video_psnr(video, noisy) == pytest.approx(10 * math.log10(1 / mse))
    # one differing frame among identical ones scores better than every frame differing a little
    one_off = video.copy()
    one_off[2] = noisy[2]
    assert video_psnr(video, one_off) > video_psnr(video, noisy) + 5
    still = np.repeat(video[:1], 4, axis=0)
    assert temporal_psnr(still) == math.inf and temporal_psnr(video) < 15
    assert temporal_psnr(video[:1]) is None


# ----------------------------------------------------------------------------- generate
def test_generate_writes_mp4_preview_sidecar_and_compare(wan_folder, tmp_path):
    from PIL import Image

    result = generate(
        "a red circle", model=wan_folder, frames=FRAMES, radius=2, temporal_radius=1, steps=2, batch=2,
        compare=True, output=tmp_path, quiet=True,
    )  # fmt: skip
    assert [p.name for p in result.paths] == ["00000-a-red-circle.mp4", "00001-a-red-circle.mp4"]
    for video, path, preview, sidecar in zip(
        result.videos, result.paths, result.preview_paths, result.sidecar_paths, strict=True
    ):
        assert video.shape == (FRAMES, HEIGHT, WIDTH, 3) and video.dtype == np.uint8
        back = read_video(path)
        assert back.shape == (FRAMES, HEIGHT, WIDTH, 3)
        assert video_psnr(video, back) > 25  # the file holds this video
        assert Image.open(preview).n_frames == FRAMES
        meta = json.loads(sidecar.read_text())
        assert meta["frames"] == FRAMES and meta["latent_frames"] == 2 and meta["radius"] == 2
        assert meta["temporal_radius"] == 1 and meta["family"] == "wan" and meta["attention"] == "clear"
    assert json.loads(result.sidecar_paths[1].read_text())["seed"] == 1
    stats = result.compare
    assert stats.flops_clear < stats.flops_full and len(stats.psnr) == 2
    assert all(math.isfinite(v) for v in stats.temporal_clear + stats.temporal_full)
    assert read_video(stats.paths[0]).shape[0] == FRAMES  # the side-by-side video
    assert read_video(result.full_paths[0]).shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert "PSNR" in result.summary and "temporal consistency" in result.summary


def test_clear_beyond_the_grid_equals_full_attention_and_a_small_window_does_not(wan_folder):
    common = dict(model=wan_folder, frames=FRAMES, steps=2, quiet=True)
    full = generate("a red circle", radius=0, **common).videos[0].astype(int)
    wide = generate("a red circle", radius=9, temporal_radius=3, **common).videos[0].astype(int)
    small = generate("a red circle", radius=1, temporal_radius=1, **common).videos[0].astype(int)
    assert np.abs(full - wide).max() <= 1
    assert np.abs(full - small).max() > 1


def test_bad_video_requests_are_clear_errors(wan_folder, tmp_path):
    from cleardit.cli import main

    with pytest.raises(ValueError, match="use 5 or 9"):
        generate("a red circle", model=wan_folder, frames=6, steps=1, quiet=True)
    with pytest.raises(ValueError, match="--highres is an image recipe"):
        generate("a red circle", model=wan_folder, frames=5, highres=True, quiet=True)
    with pytest.raises(ValueError, match="--temporal-radius needs CLEAR"):
        generate("a red circle", model=wan_folder, frames=5, radius=0, temporal_radius=2, quiet=True)
    with pytest.raises(ValueError, match="holds an image model"):
        generate("a red circle", frames=5, quiet=True)  # the shipped mini model makes images
    with pytest.raises(ValueError, match="names one .mp4 file but 2 videos"):
        generate("a red circle", model=wan_folder, frames=5, batch=2, output=tmp_path / "a.mp4", quiet=True)
    from types import SimpleNamespace

    from tests.test_ltx2 import tiny_ltx2_transformer

    loaded = SimpleNamespace(transformer=tiny_ltx2_transformer(), vae=None, _execution_device="cpu")
    with pytest.raises(ValueError, match="video jobs do not run ltx2 pipelines yet.*linearize"):
        generate("a red circle", model=loaded, quiet=True)  # a family linearize serves, the jobs not yet
    code = main(["generate", "--model", str(wan_folder), "--prompt", "x", "--frames", "6", "--quiet"])
    assert code == 2
    code = main(["generate", "--model", str(wan_folder), "--prompt", "x", "--frames", "5", "--devices", "2"])
    assert code == 2  # the strip exchange is 2D: refused before any rank starts


# ----------------------------------------------------------------------------- distill and eval
def test_video_distill_with_resume_and_eval(wan_folder, tmp_path, monkeypatch):
    from diffusers import WanPipeline
    from safetensors import safe_open

    from cleardit.distill.teacher_data import TeacherDataset, make_teacher_data
    from cleardit.distill.trainer import DistillConfig
    from cleardit.eval import evaluate_model

    prompts = ["a red circle", "a blue square"]
    data = tmp_path / "data"
    make_teacher_data(
        wan_folder, prompts, data, resolution=(HEIGHT, WIDTH), steps=2, frames=FRAMES, quiet=True
    )
    dataset = TeacherDataset(data)
    assert dataset[0]["latents"].shape == (4, 2, HEIGHT // 8, WIDTH // 8)  # [C, latent frames, h, w]
    assert dataset.manifest["frames"] == FRAMES
    cfg = DistillConfig(radius=2, temporal_radius=1, steps=2, batch_size=2, lr=1e-3, attention_layers="0")

    def load():
        return WanPipeline.from_pretrained(str(wan_folder))

    result, resumed = distill_resumed_after_a_crash(cfg, dataset, tmp_path, load, monkeypatch)
    assert any("attn1" in k for k in resumed)
    with safe_open(str(result.weights), "pt") as f:
        assert f.metadata()["temporal_radius"] == "1" and f.metadata()["family"] == "wan"
    # the weights bring their window: generate takes rt from them, load_weights refuses another rt
    with_weights = generate(
        "a red circle", model=wan_folder, frames=FRAMES, steps=1, clear_weights=result.weights, quiet=True
    )
    assert with_weights.metadata[0]["temporal_radius"] == 1 and with_weights.metadata[0]["radius"] == 2
    pipe = load()
    linearize(pipe.transformer, radius=2, temporal_radius=2)
    with pytest.raises(ValueError, match="made for temporal_radius=1.*temporal_radius=2"):
        load_weights(pipe.transformer, result.weights)

    report = evaluate_model(
        prompts, model=wan_folder, radii=[2], temporal_radius=1, frames=FRAMES, steps=2,
        output=tmp_path / "eval", metrics=["psnr"], quiet=True,
    )  # fmt: skip
    entry = report.summary["clear"][0]
    assert entry["radius"] == 2 and entry["temporal_radius"] == 1 and 0 < entry["flops_fraction"] < 1
    assert math.isfinite(entry["values"]["psnr"]) and len(entry["temporal_psnr_per_video"]) == 2
    assert report.results["r2_rt1"].meta  # per-frame pairs: 2 videos x 5 frames
    assert len(report.results["r2_rt1"].per_pair) == 2 * FRAMES
    calls = []
    evaluate_model(
        prompts, model=wan_folder, radii=[2], temporal_radius=1, frames=FRAMES, steps=2,
        output=tmp_path / "eval", metrics=["psnr"], quiet=True, generate_fn=lambda *a, **k: calls.append(a),
    )  # fmt: skip
    assert calls == []  # every video reused from its sidecar
    # another model's files (same config, other weights): nothing of the first model is reused
    other = save_tiny_wan_pipeline(tmp_path / "other-wan", seed=1)

    def counting(*args, **kwargs):
        calls.append(args)
        return generate(*args, **kwargs)

    again = evaluate_model(
        prompts, model=other, radii=[2], temporal_radius=1, frames=FRAMES, steps=2,
        output=tmp_path / "eval", metrics=["psnr"], quiet=True, generate_fn=counting,
    )  # fmt: skip
    assert len(calls) == 4 and again.summary["model_fingerprint"] != report.summary["model_fingerprint"]
