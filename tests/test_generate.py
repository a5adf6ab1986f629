"""``cleardit generate`` / ``cleardit.pipelines.generate`` on the tiny mini-architecture pipeline, offline."""

from __future__ import annotations

import argparse
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import cleardit
from cleardit.commands.generate import add_generate_parser
from cleardit.image_metrics import ms_ssim_images, ms_ssim_settings
from cleardit.mini.pipeline import (
    build_mini_pipeline,
    count_parameters,
    mini_model_info,
    save_mini_pipeline,
)
from cleardit.pipelines import ModelInfo, generate, loading
from cleardit.pipelines import highres as hr
from cleardit.pipelines.generate import output_paths

PROMPT = "a small red circle at the top left on a plain white background"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_mini_pipeline(build_mini_pipeline("tiny"), folder, "tiny")
    return folder


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = build_mini_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="cleardit")
    add_generate_parser(parser.add_subparsers())
    args = parser.parse_args(["generate", *argv])
    return args.func(args)


def run(model, options: str = "", *, prompt: str = PROMPT, output=None) -> int:
    """``cleardit generate --model MODEL --prompt PROMPT OPTIONS [--output OUTPUT]``."""
    argv = ["--model", str(model), "--prompt", prompt, *options.split()]
    return cli(*argv, *(["--output", str(output)] if output is not None else []))


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def png_text(path) -> dict:
    with Image.open(path) as im:
        return dict(im.text)


# -- models and errors ----------------------------------------------------------------------------


def test_single_file_output_metadata_and_summary(tiny_dir, tmp_path, capsys):
    out = tmp_path / "one.png"
    assert run(tiny_dir, "--seed 7 --radius 2", output=out) == 0
    text = png_text(out)
    assert text["prompt"] == PROMPT and text["seed"] == "7" and text["steps"] == "2"
    assert text["radius"] == "2" and text["attention"] == "clear" and text["model"] == str(tiny_dir)
    assert text["height"] == "64" and text["width"] == "64" and text["highres"] == "False"
    assert text["cleardit_version"] == cleardit.__version__
    assert json.loads(text["parameters"])["guidance"] == 3.5
    summary = capsys.readouterr().out
    assert "s/step" in summary and "peak memory" in summary and str(out) in summary
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_default_model_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", tmp_path / "missing")
    assert cli("--prompt", PROMPT, "--output", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert "the shipped mini model is missing" in err and "--model" in err
    with pytest.raises(loading.ModelNotFoundError, match="mini_model/train.py"):
        generate(PROMPT)


def test_hf_id_not_in_cache(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    (tmp_path / "empty-cache").mkdir()
    assert cli("--model", "black-forest-labs/FLUX.1-dev", "--prompt", PROMPT) == 2
    err = capsys.readouterr().err
    assert "not in the local Hugging Face cache" in err
    assert "hf download black-forest-labs/FLUX.1-dev" in err and str(tmp_path / "empty-cache") in err
    # a folder that is no pipeline, and a path that is neither folder nor id
    assert cli("--model", str(tmp_path), "--prompt", PROMPT) == 2
    assert "no model_index.json" in capsys.readouterr().err
    assert cli("--model", str(tmp_path / "a" / "b" / "c"), "--prompt", PROMPT) == 2
    assert "no such folder" in capsys.readouterr().err


def test_sizes_non_square_and_invalid(tiny_dir, tmp_path, capsys):
    out = tmp_path / "wide.png"
    assert run(tiny_dir, "--height 64 --width 96", output=out) == 0
    assert Image.open(out).size == (96, 64)
    assert run(tiny_dir, "--height 70") == 2
    assert "nearest valid sizes: 64 or 80" in capsys.readouterr().err
    assert run(tiny_dir, "--width 8") == 2
    assert "not a multiple of 16" in capsys.readouterr().err


def test_batch_folder_naming_and_prompts_file(tiny_dir, tmp_path, capsys):
    out = tmp_path / "imgs"
    assert run(tiny_dir, "--batch 2 --seed 5", output=out) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "00000-a-small-red-circle-at-the-top-left-on-a.png",
        "00001-a-small-red-circle-at-the-top-left-on-a.png",
    ]
    seeds = [png_text(out / f)["seed"] for f in files]
    assert seeds == ["5", "6"]
    a, b = (pixels(out / f) for f in files)
    assert not np.array_equal(a, b)  # different seeds, different images

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large blue square in the center\n\n  a small green triangle on the left \n")
    assert cli("--model", str(tiny_dir), "--prompts", str(prompts), "--output", str(out), "--quiet") == 0
    new = sorted(p.name for p in out.iterdir() if p.name >= "00002")
    assert [n[:6] for n in new] == ["00002-", "00003-"]
    assert png_text(out / new[1])["prompt"] == "a small green triangle on the left"

    # a .png name for several images, an empty and a missing prompts file
    assert run(tiny_dir, "--batch 2", output=tmp_path / "x.png") == 2
    assert "names one .png file but 2 images" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert cli("--model", str(tiny_dir), "--prompts", str(empty)) == 2
    assert "has no prompts" in capsys.readouterr().err
    assert cli("--model", str(tiny_dir), "--prompts", str(tmp_path / "nope.txt")) == 2
    assert "cannot read" in capsys.readouterr().err


def test_output_paths_numbering(tmp_path):
    (tmp_path / "00041-old.png").write_bytes(b"")
    assert [p.name for p in output_paths(tmp_path, ["Hello, World!"], 2)] == [
        "00042-hello-world.png",
        "00043-hello-world.png",
    ]
    assert output_paths(tmp_path / "a.PNG", ["x"], 1) == [tmp_path / "a.PNG"]


def test_unwritable_output_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import importlib

    generate_module = importlib.import_module("cleardit.pipelines.plan")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(generate_module, "load_pipeline", no_loading)
    monkeypatch.setattr(generate_module, "resolve_model", no_loading)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for output in ("/proc/x.png", blocker / "x.png", "/proc/cleardit-out/"):
        with pytest.raises(ValueError, match="cannot write files in"):
            generate(PROMPT, output=output, quiet=True)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ValueError, match="is a folder, not a file name"):
        generate(PROMPT, output=tmp_path / "dir.png", quiet=True)
    assert cli("--prompt", PROMPT, "--output", "/proc/x.png") == 2
    assert "cannot write files in /proc" in capsys.readouterr().err


def test_output_check_leaves_nothing_behind(tmp_path):
    from cleardit.atomic import check_writable

    target = tmp_path / "new" / "deeper" / "x.png"
    check_writable([target])
    assert list(tmp_path.iterdir()) == []  # the folders it made to try are gone again


# -- high resolution --------------------------------------------------------------------------------


@pytest.mark.parametrize("upscale", ["image", "latent"])
def test_highres(tiny_dir, tmp_path, upscale):
    out = tmp_path / "hi.png"
    options = (
        "--height 128 --width 96 --highres --steps 3 --ntk-factor 10 --proportional-attention --radius 2"
    )
    rc = run(tiny_dir, f"{options} --upscale {upscale} --quiet", output=out)
    assert rc == 0
    assert Image.open(out).size == (96, 128)
    text = png_text(out)
    assert text["highres"] == "True" and text["upscale"] == upscale and text["strength"] == "0.3"
    assert text["stage1_size"] == "80x48" and text["ntk_factor"] == "10.0"
    assert float(text["attention_scale"]) > 1 / math.sqrt(16)  # longer sequence -> sharper softmax


def test_highres_needs_larger_target(tiny_pipe):
    with pytest.raises(ValueError, match="not larger"):
        generate(PROMPT, model=tiny_pipe, info=mini_model_info("tiny"), highres=True, quiet=True)
    with pytest.raises(ValueError, match="--strength must be a noise level in"):
        generate(PROMPT, model=tiny_pipe, height=128, highres=True, strength=1.5, quiet=True)
    # one step and a small strength still leave one step at the target size, from that noise level
    result = generate(
        PROMPT,
        model=tiny_pipe,
        info=mini_model_info("tiny"),
        height=128,
        highres=True,
        steps=1,
        strength=0.2,
        quiet=True,
    )
    assert result.steps == 2 and json.loads(result.metadata[0]["sigmas"]) == [0.2]


def test_vae_tiles_above_its_trained_size_by_default(tiny_pipe):
    """The tiny VAE was built for 64 px: 128 px images go through it in 64 px tiles unless told not."""
    kw = dict(model=tiny_pipe, info=mini_model_info("tiny"), steps=1, radius=2, quiet=True)
    assert tiny_pipe.vae.config.sample_size == 64 and not tiny_pipe.vae.use_tiling
    assert generate(PROMPT, height=64, **kw).metadata[0]["vae_tiling"] is False
    tiled = generate(PROMPT, height=128, width=128, **kw)
    assert tiled.metadata[0]["vae_tiling"] is True
    assert not tiny_pipe.vae.use_tiling  # the user's VAE is left as it was
    plain = generate(PROMPT, height=128, width=128, vae_tiling=False, **kw)
    assert plain.metadata[0]["vae_tiling"] is False
    assert not np.array_equal(np.asarray(tiled.images[0]), np.asarray(plain.images[0]))
    assert hr.wants_vae_tiles(tiny_pipe.vae, 64, 65, None) and not hr.wants_vae_tiles(
        tiny_pipe.vae, 64, 64, None
    )
    assert hr.wants_vae_tiles(tiny_pipe.vae, 32, 32, True)


def test_stage1_size_keeps_aspect():
    assert hr.stage1_size(4096, 4096, 1024, 1024, 16) == (1024, 1024)
    assert hr.stage1_size(2048, 4096, 1024, 1024, 16) == (720, 1456)
    assert hr.stage1_size(128, 64, 128, 128, 8) == (128, 64)  # never larger than the target


# -- compare ---------------------------------------------------------------------------------------------


def test_compare_side_by_side(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = run(tiny_dir, "--height 64 --width 96 --radius 2 --compare", output=out)
    assert rc == 0
    summary = capsys.readouterr().out
    assert "speedup" in summary and "PSNR" in summary and "MS-SSIM" in summary and "fewer" in summary
    names = sorted(p.name for p in out.iterdir())
    assert [n.split("-", 1)[0] for n in names] == ["00000"] * 3
    board = Image.open(next(out.glob("*-compare.png")))
    assert board.size[0] >= 2 * 96 and board.size[1] > 64
    full = png_text(next(out.glob("*-full.png")))
    assert full["attention"] == "full" and full["radius"] == "0"


def test_highres_compare_shows_stage1_full_and_clear(tiny_dir, tmp_path, capsys):
    out = tmp_path / "hi"
    rc = run(tiny_dir, "--height 128 --width 128 --radius 2 --highres --strength 0.4 --compare", output=out)
    assert rc == 0
    files = sorted(p.name for p in out.iterdir())
    clear_name = "00000-a-small-red-circle-at-the-top-left-on-a.png"
    assert files == sorted(
        [clear_name] + [clear_name.replace(".png", f"-{t}.png") for t in ("base", "full", "compare")]
    )
    base = next(out.glob("*-base.png"))
    assert Image.open(base).size == (64, 64)
    text = png_text(base)
    assert text["height"] == "64" and text["attention"] == "full" and text["highres"] == "False"
    assert json.loads(text["sigmas"])[0] == 1.0  # stage 1 starts from noise
    board = Image.open(next(out.glob("*-compare.png")))
    assert board.size[0] >= 3 * 128  # stage 1 (upscaled) | full | CLEAR
    clear = png_text(out / clear_name)
    assert json.loads(clear["sigmas"])[0] == 0.4 and clear["attention"] == "clear"


def test_compare_result_api(tiny_pipe):
    res = generate(
        PROMPT,
        model=tiny_pipe,
        info=mini_model_info("tiny"),
        height=96,
        width=96,
        radius=2,
        compare=True,
        quiet=True,
    )
    stats = res.compare
    assert stats is not None and stats.speedup > 0 and stats.flops_clear < stats.flops_full
    assert len(stats.psnr) == 1 and math.isfinite(stats.psnr[0])  # r=2 differs from full on 6x6 tokens
    assert stats.ms_ssim is not None and 0 < stats.ms_ssim[0] <= 1
    assert res.paths == [] and len(res.images) == len(res.full_images) == 1
    with pytest.raises(ValueError, match="--compare"):
        generate(PROMPT, model=tiny_pipe, radius=0, compare=True)


def test_ms_ssim_small_sizes():
    assert ms_ssim_settings(176, 176) == (5, 11, 1.5) and ms_ssim_settings(1024, 2048)[:2] == (5, 11)
    for side in (16, 48, 64, 96, 128):
        n, k, _ = ms_ssim_settings(side, side + 32)
        assert side >= 2**n and side // max(1, n - 1) ** 2 > k - 1
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(64, 80, 3, generator=g) * 255).byte().numpy())
    value, note = ms_ssim_images(img, img)
    assert value == pytest.approx(1.0) and "adapted" in note


# -- CLEAR weights and attention options -----------------------------------------------------------------


def _weights(tiny_dir, path, radius=2):
    """A save_weights file with CLEAR projections that differ from the model's."""
    pipe = loading.load_pipeline(tiny_dir, torch.device("cpu"), torch.float32, progress=False)
    handle = cleardit.linearize(pipe.transformer, radius=radius)
    with torch.no_grad():
        for _, p in handle.named_clear_parameters():
            p.mul_(1.5)
    cleardit.save_weights(pipe.transformer, path)


def test_clear_weights_round_trip(tiny_dir, tmp_path, capsys):
    wfile = tmp_path / "clear_r2.safetensors"
    _weights(tiny_dir, wfile)
    out = tmp_path / "w.png"
    assert run(tiny_dir, f"--clear-weights {wfile} --compare", output=out) == 0
    text = png_text(out)
    assert text["radius"] == "2" and text["clear_weights"] == str(wfile)  # radius read from the file
    assert "with clear_r2.safetensors" in capsys.readouterr().out
    # the full-attention image of --compare uses the original projections, not the CLEAR ones
    plain = tmp_path / "plain.png"
    assert run(tiny_dir, "--full", output=plain) == 0
    full = tmp_path / "w-full.png"
    assert np.array_equal(pixels(full), pixels(plain))
    no_w = tmp_path / "now.png"
    assert run(tiny_dir, "--radius 2", output=no_w) == 0
    assert not np.array_equal(pixels(out), pixels(no_w))

    # a file for another radius, and weights with full attention
    assert run(tiny_dir, f"--radius 3 --clear-weights {wfile}") == 2
    assert "made for radius=2" in capsys.readouterr().err
    assert run(tiny_dir, f"--full --clear-weights {wfile}") == 2
    assert "needs CLEAR attention" in capsys.readouterr().err


def test_shipped_clear_weights_and_pipeline_left_intact(tiny_dir, tmp_path, tiny_pipe):
    folder = tmp_path / "with-clear"
    shutil.copytree(tiny_dir, folder)
    _weights(tiny_dir, folder / "clear.safetensors")
    info = mini_model_info("tiny", clear_weights="clear.safetensors", clear_radius=2)
    info.write(folder)
    res = generate(PROMPT, model=str(folder), quiet=True)
    assert res.metadata[0]["radius"] == 2 and res.metadata[0]["clear_weights"].endswith("clear.safetensors")
    res = generate(PROMPT, model=str(folder), radius=3, quiet=True)  # another radius: training-free
    assert res.metadata[0]["radius"] == 3 and res.metadata[0]["clear_weights"] is None

    before = {k: v.clone() for k, v in tiny_pipe.transformer.state_dict().items()}
    weights = folder / "clear.safetensors"
    generate(
        PROMPT,
        model=tiny_pipe,
        info=ModelInfo(base_height=64),
        clear_weights=weights,
        compare=True,
        quiet=True,
    )
    after = tiny_pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert cleardit.models.get_handle(tiny_pipe.transformer) is None
    assert tiny_pipe.transformer.pos_embed.theta == 10000


def test_query_scale_matches_clear_scale(tiny_pipe):
    from cleardit.models.tiny import flux_inputs

    tr = tiny_pipe.transformer
    inputs = flux_inputs(tr, 3, 4, text_len=5)
    d = tr.config.attention_head_dim
    scale = hr.proportional_scale(3 * 4 + 5, 2 * 2 + 5, d)
    assert hr.proportional_scale(9, 9, d) == pytest.approx(1 / math.sqrt(d))
    with torch.no_grad(), hr.query_scale(tr, scale * math.sqrt(d)):
        full = tr(**inputs).sample
    handle = cleardit.linearize(tr, radius=10, scale=scale, backend="reference")  # radius covers the grid
    try:
        with torch.no_grad():
            clear = tr(**inputs).sample
    finally:
        handle.restore()
    torch.testing.assert_close(clear, full, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = tr(**inputs).sample  # hooks removed
    assert not torch.allclose(plain, full)
    with hr.ntk_rope(tr, 10.0):
        assert tr.pos_embed.theta == 100000
    assert tr.pos_embed.theta == 10000


# -- the mini architecture -------------------------------------------------------------------------------


def test_mini_sizes():
    pipe = build_mini_pipeline("mini")
    counts = count_parameters(pipe)
    assert 1e6 < counts["transformer"] < 10e6 and counts["vae"] < 10e6
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    assert pipe.vae_scale_factor * 2 == 8 and mini_model_info("mini").base_height == 128
    with pytest.raises(ValueError, match="size must be one of"):
        build_mini_pipeline("huge")


# -- classifier-free guidance ---------------------------------------------------------------------


def test_true_cfg_changes_the_image_and_is_recorded(tiny_dir, tmp_path):
    plain, guided = tmp_path / "plain.png", tmp_path / "guided.png"
    assert run(tiny_dir, "--radius 2", output=plain) == 0
    assert run(tiny_dir, "--radius 2 --true-cfg 3 --negative-prompt blue", output=guided) == 0
    assert not np.array_equal(pixels(plain), pixels(guided))
    params = json.loads(png_text(guided)["parameters"])
    assert params["true_cfg"] == 3 and params["negative_prompt"] == "blue"
    assert json.loads(png_text(plain)["parameters"])["true_cfg"] == 1.0


def test_true_cfg_default_from_model_info_and_bad_values(tiny_dir, tiny_pipe):
    info = mini_model_info("tiny", default_true_cfg=2.5)
    a = generate(PROMPT, model=tiny_pipe, info=info, radius=0, quiet=True)
    b = generate(PROMPT, model=tiny_pipe, info=info, radius=0, true_cfg=2.5, quiet=True)
    c = generate(PROMPT, model=tiny_pipe, info=info, radius=0, true_cfg=1, quiet=True)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))
    for bad in (0.5, "2", True):
        with pytest.raises(ValueError, match="--true-cfg must be a number >= 1"):
            generate(PROMPT, model=tiny_pipe, radius=0, true_cfg=bad, quiet=True)


# -- the shipped model ----------------------------------------------------------------------------


def test_shipped_default_model(tmp_path):
    """No --model: the mini model in the package (it ships with the repository)."""
    assert (loading.DEFAULT_MODEL_DIR / "model_index.json").is_file(), "the shipped mini model is missing"
    size = sum(p.stat().st_size for p in loading.DEFAULT_MODEL_DIR.rglob("*.safetensors"))
    assert size <= 25 * 2**20
    kw = dict(steps=2, radius=4, height=128, width=192, device="cpu", output=tmp_path, quiet=True)
    result = generate(PROMPT, **kw)
    assert result.images[0].size == (192, 128)
    params = json.loads(png_text(result.paths[0])["parameters"])
    assert params["model"].startswith("cleardit-mini") and params["radius"] == 4
