"""``cleardit generate --devices N``: patch-parallel generation on CPU ranks (gloo) equals one process.

The tiny mini-architecture pipeline (size factor 16) at 48x80 px is a 3x5 token grid: with CLEAR
radius 2 the disc is smaller than the grid (the output differs from full attention), and 2 ranks
get strips of 2 and 1 rows. Launches use a forkserver, so the ranks import torch and diffusers once
for the whole file.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import cleardit
from cleardit.attention.strips import allgather_bytes
from cleardit.commands.generate import add_generate_parser
from cleardit.mini.pipeline import build_mini_pipeline, save_mini_pipeline
from cleardit.parallel import ParallelLaunchError, StripPlan, spawn
from cleardit.parallel.generate import (
    PRELOAD,
    _launch_backend,
    generate_parallel,
    user_error,
)
from cleardit.pipelines import generate, loading
from cleardit.schedule import denoising_sigmas

PROMPT = "a small red circle at the top left on a plain white background"


@pytest.fixture(scope="module", autouse=True)
def _forkserver_preload():
    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_mini_pipeline(build_mini_pipeline("tiny"), folder, "tiny")
    return folder


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="cleardit")
    add_generate_parser(parser.add_subparsers())
    args = parser.parse_args(["generate", *argv])
    return args.func(args)


def run(model, options: str, output=None) -> int:
    """``cleardit generate --model MODEL --prompt PROMPT OPTIONS [--output OUTPUT]``."""
    argv = ["--model", str(model), "--prompt", PROMPT, *options.split()]
    return cli(*argv, *(["--output", str(output)] if output is not None else []))


def pngs(folder) -> list[np.ndarray]:
    out = []
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as im:
            out.append((np.asarray(im.convert("RGB")).astype(int), dict(im.text)))
    return out


def max_pixel_diff(a: list, b: list) -> int:
    assert len(a) == len(b) and a
    return max(
        int(np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max())
        for x, y in zip(a, b, strict=True)
    )


# -- the acceptance: a full `cleardit generate` on 2 ranks equals 1 rank ------------------------


def test_cli_two_ranks_make_the_same_images_as_one(tiny_dir, tmp_path, capfd):
    options = "--height 48 --width 80 --radius 2 --seed 3 --steps 3 --batch 2"
    assert run(tiny_dir, f"{options} --devices 1", tmp_path / "one") == 0
    one_out, _ = capfd.readouterr()
    # A fresh interpreter: the ranks' stderr must reach this test, and a forkserver started by an
    # earlier test of the session would keep that earlier test's file descriptors.
    argv = ["--model", str(tiny_dir), "--prompt", PROMPT, *options.split(), "--devices", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "cleardit", "generate", *argv, "--output", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_out, two_err = proc.stdout, proc.stderr
    assert run(tiny_dir, options.replace("--radius 2", "--full"), tmp_path / "full") == 0

    one, two, full = pngs(tmp_path / "one"), pngs(tmp_path / "two"), pngs(tmp_path / "full")
    assert len(one) == len(two) == 2
    diff = max_pixel_diff([p for p, _ in one], [p for p, _ in two])
    assert diff <= 1, f"2 ranks differ from 1 rank by {diff}/255"
    assert [text for _, text in one] == [text for _, text in two]  # same parameters in the PNGs
    # the radius matters at this size: CLEAR r=2 is visibly not full attention
    assert max_pixel_diff([p for p, _ in one], [p for p, _ in full]) > 10

    assert "patch-parallel" not in one_out  # --devices 1 is the ordinary path
    assert two_out.count("generated 2 images of 48x80 px") == 1
    assert "patch-parallel: 2 ranks (gloo on cpu)" in two_out and "gathered once" in two_out
    assert two_err.count("loading ") == 1  # rank 1 is quiet: only rank 0 logs


def _clear_weights(tiny_dir, path) -> None:
    """A save_weights file (r=2, down factor 2) whose projections and pooling weights are perturbed."""
    pipe = loading.load_pipeline(tiny_dir, torch.device("cpu"), torch.float32, progress=False)
    handle = cleardit.linearize(pipe.transformer, radius=2, down_factor=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in handle.named_clear_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    cleardit.save_weights(pipe.transformer, path)


def test_python_api_three_ranks_with_clear_weights_and_pooled_branch(tiny_dir, tmp_path):
    """Also with classifier-free guidance: every rank encodes the negative prompt too."""
    weights = tmp_path / "clear_r2_df2.safetensors"
    _clear_weights(tiny_dir, weights)
    prompts = [PROMPT, "a blue square at the bottom right"]
    kw = dict(model=tiny_dir, height=64, width=112, seed=5, true_cfg=2.5, quiet=True)
    reference = generate(prompts, clear_weights=weights, **kw)  # radius 2, df 2 from the file
    result = generate_parallel(prompts, devices=3, clear_weights=weights, **kw)
    diff = max_pixel_diff(reference.images, result.images)
    assert diff <= 1, f"3 ranks differ from 1 rank by {diff}/255"
    assert result.metadata == reference.metadata and result.metadata[0]["down_factor"] == 2
    assert result.metadata[0]["true_cfg"] == 2.5
    untrained = generate(prompts, radius=2, down_factor=2, **kw)
    assert max_pixel_diff(untrained.images, result.images) > 10  # the weights file was used
    assert result.devices == 3 and result.launch == "gloo on cpu" and result.paths == []
    sent = result.comm_bytes
    assert sent["halo"] > 0 and sent["text"] > 0 and sent["pooled"] > 0
    # "output" is only the final latent gather: exactly one all-gather per image, none per step
    plan = StripPlan(4, 7, 3, radius=2, down_factor=2)
    channels = 16  # the tiny transformer's in_channels (4 latent channels x 2x2 packing)
    chunk = plan.max_rows * 7 * channels * 4  # [1 image, tallest strip, C] in fp32
    assert sent["output"] == len(prompts) * 3 * allgather_bytes(chunk, 3)


def _strip_latents_worker(rank: int, world: int, folder: str, call: dict) -> torch.Tensor:
    from diffusers import FluxPipeline

    from cleardit.config import ClearConfig
    from cleardit.parallel.generate import PatchParallelRank

    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    runner = PatchParallelRank(timeout_s=30)
    runner.install(pipe.transformer, config=ClearConfig(radius=2, tile=None))
    generator = [torch.Generator().manual_seed(s) for s in (0, 1)]
    # the whole image's sigmas (48x80 px = 15 tokens), which the strip alone cannot know
    sigmas = denoising_sigmas(pipe.scheduler, call["num_inference_steps"], 15).tolist()
    return runner.wrap(pipe)(PROMPT, generator=generator, output_type="latent", sigmas=sigmas, **call).images


def test_strip_denoising_gives_the_latents_of_one_process(tiny_dir):
    """Stronger than pixels: the gathered latents equal one process's to float rounding (fp32)."""
    from diffusers import FluxPipeline

    import cleardit

    call = dict(height=48, width=80, num_inference_steps=3, guidance_scale=3.5)
    call.update(max_sequence_length=40, num_images_per_prompt=2)
    pipe = FluxPipeline.from_pretrained(str(tiny_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    cleardit.linearize(pipe.transformer, radius=2)
    generator = [torch.Generator().manual_seed(s) for s in (0, 1)]
    expected = pipe(PROMPT, generator=generator, output_type="latent", **call).images  # [2, 15, 16]
    for latents in spawn(
        _strip_latents_worker,
        2,
        (str(tiny_dir), call),
        timeout_s=60,
        deadline_s=120,
        start_method="forkserver",
    ):
        assert latents.shape == expected.shape
        error = (latents - expected).abs().max().item()
        assert error <= 1e-5, f"gathered latents differ from one process by {error:.3g}"


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ("--devices 4 --height 48", "--devices 4 but a 48 px tall image has only 3 token rows"),
        ("--devices 5", "--devices 5 but a 64 px tall image has only 4 token rows"),  # base size
        ("--devices 2 --compare", "--devices 2 with --compare is not supported"),
        ("--devices 2 --highres --height 128", "--devices 2 with --highres is not supported"),
        ("--devices 2 --full", "--devices 2 needs CLEAR attention"),
        ("--devices 2 --radius 0", "--devices 2 needs CLEAR attention"),
    ],
)
def test_refused_before_anything_is_spawned(tiny_dir, tmp_path, capsys, options, message):
    assert run(tiny_dir, options, tmp_path / "out") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_devices_below_one_is_refused(tiny_dir, capsys):
    with pytest.raises(SystemExit) as info:
        run(tiny_dir, "--devices 0")
    assert info.value.code == 2
    assert "--devices: expected a whole number >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--devices must be a whole number >= 1, got -1"):
        generate_parallel(PROMPT, devices=-1, model=tiny_dir)


def test_python_api_refuses_a_loaded_pipeline_and_unknown_options(tiny_dir):
    with pytest.raises(TypeError, match="every rank loads the model itself"):
        generate_parallel(PROMPT, devices=2, model=build_mini_pipeline("tiny"))
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['radious'\]"):
        generate_parallel(PROMPT, devices=2, model=tiny_dir, radious=2)


def test_a_rank_failing_on_a_user_mistake_is_reported_as_that_mistake(tiny_dir, tmp_path):
    missing = tmp_path / "missing.safetensors"  # not checked before spawning: the ranks find out
    with pytest.raises(ValueError) as info:
        generate_parallel(PROMPT, devices=2, model=tiny_dir, height=48, clear_weights=missing)
    assert str(info.value) == f"--clear-weights {missing}: no such file"
    assert isinstance(info.value.__cause__, ParallelLaunchError)
    assert set(info.value.__cause__.failures) == {0, 1}


def test_user_error_picks_the_message_of_a_user_mistake_only():
    trace = "\nTraceback (most recent call last):\n  File ...\nValueError: bad"
    crash = ParallelLaunchError({1: "ParallelError: rank 1 of 2: peer died" + trace}, {0: 0, 1: 1})
    assert user_error(crash) is None
    mistake = ParallelLaunchError(
        {0: "ValueError: --steps x is bad\nsecond line" + trace, 1: "ParallelError: peer died"},
        {0: 1, 1: 1},
    )
    assert user_error(mistake) == "--steps x is bad\nsecond line"


def test_cuda_launch_needs_enough_gpus_and_no_gpu_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _launch_backend("auto", 2) == ("cuda", "nccl")
    assert _launch_backend("cpu", 8) == ("cpu", "gloo")
    with pytest.raises(ValueError, match="--devices 3 but 2 CUDA GPU"):
        _launch_backend("cuda", 3)
    with pytest.raises(ValueError, match=re.escape("--device cuda:1 names one GPU")):
        _launch_backend("cuda:1", 2)
