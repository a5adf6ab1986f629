"""``cleardit eval model`` on the tiny mini-architecture pipeline, offline: teacher and CLEAR images,
metrics, FLOPs and time, the report, reuse of finished images, interrupted runs, input errors; the
bundled prompt list."""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import cleardit
import cleardit.cli
from cleardit.attention import TokenLayout, attention_flops
from cleardit.eval import add_eval_parser, bundled_prompts_path, evaluate_model, load_prompts, load_result
from cleardit.eval import metrics as M
from cleardit.eval.generation import Attention, files_fingerprint, read_parameters
from cleardit.eval.model import plan_attention
from cleardit.mini.pipeline import build_mini_pipeline, mini_model_info, save_mini_pipeline
from cleardit.pipelines import ModelNotFoundError, generate, loading
from tests.test_eval import offline  # noqa: F401  (fixture: empty weight caches, no packaged FID net)

PROMPTS = [
    "a small red circle at the top left on a plain white background",
    "a large blue square in the center on a yellow and black vertical striped background",
    "a small green triangle on the right on a plain black background",
    "a large pink circle at the bottom on a cyan to white horizontal gradient background",
]
# The tiny pipeline: 64x64 px = 4x4 tokens, 40 text tokens, 2 heads x 16, 1 + 1 attention layers, 2 steps.
TINY_LAYOUT, TINY_HEADS, TINY_HEAD_DIM, TINY_LAYERS, TINY_STEPS = (40, 4, 4), 2, 16, 2, 2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_mini_pipeline(build_mini_pipeline("tiny"), folder, "tiny")
    return folder


def prompts_file(tmp_path, prompts=PROMPTS[:3]):
    path = tmp_path / "prompts.txt"
    path.write_text("".join(p + "\n" for p in prompts))
    return path


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cleardit")
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


class CountingGenerate:
    """``generate`` that records each call's prompts and first seed, and can fail at call ``fail_at``."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[list[str], int, int]] = []  # (prompts, seed, radius)
        self.fail_at = fail_at

    def __call__(self, prompts, config, **kwargs):
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt("simulated Ctrl-C")
        self.calls.append((list(prompts), config.seed, config.radius))
        return generate(prompts, config, **kwargs)

    @property
    def images(self) -> int:
        return sum(len(p) for p, _, _ in self.calls)


def never_generate(*_args, **_kwargs):
    raise AssertionError("generate must not run for a bad input")


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def mtimes(folder) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.png"))}


# ----------------------------------------------------------------------------- bundled prompts
def test_bundled_prompts_are_50_distinct_lines():
    """The package's prompt list; that they are held-out captions of the mini model's grammar is checked
    with the lab that makes them (examples/mini_model/tests/test_lab_prompts.py)."""
    path = bundled_prompts_path()
    assert path.is_file() and path.name == "mini_prompts.txt" and path.parent.name == "eval"
    prompts = load_prompts()
    assert len(prompts) == 50 and len(set(prompts)) == 50 and all(p.strip() == p and p for p in prompts)


# ----------------------------------------------------------------------------- end to end
def test_eval_model_two_radii_end_to_end(offline, tiny_dir, tmp_path, capsys):  # noqa: F811
    out, report = tmp_path / "out", tmp_path / "report"
    code = run_cli(
        ["eval", "model", "--model", str(tiny_dir), "--prompts", str(prompts_file(tmp_path)),
         "--radius", "1", "2", "--output", str(out), "--report", str(report), "--batch-size", "2",
         "--quiet"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "full attention (teacher)" in printed and "CLEAR r=1" in printed and "CLEAR r=2" in printed

    summary = json.loads((out / "eval_model.json").read_text())
    assert summary["prompts"]["count"] == 3 and summary["metrics"] == list(M.METRIC_NAMES)
    assert summary["settings"]["grid"] == [4, 4] and summary["settings"]["steps"] == TINY_STEPS
    full = attention_flops(TokenLayout(*TINY_LAYOUT), None, TINY_HEADS, TINY_HEAD_DIM) * TINY_LAYERS
    teacher = summary["teacher"]
    assert teacher["attention_flops_per_forward"] == full
    assert teacher["attention_flops_per_image"] == full * TINY_STEPS
    assert teacher["generated"] == 3 and teacher["cached"] == 0 and teacher["seconds_per_image"] > 0
    assert [c["radius"] for c in summary["clear"]] == [1, 2]
    for c in summary["clear"]:
        r = c["radius"]
        clear = attention_flops(TokenLayout(*TINY_LAYOUT), r, TINY_HEADS, TINY_HEAD_DIM) * TINY_LAYERS
        assert c["attention_flops_per_forward"] == clear < full
        assert c["flops_fraction"] == pytest.approx(clear / full)
        assert c["seconds_per_image"] > 0
        assert c["speedup"] == pytest.approx(teacher["seconds_per_image"] / c["seconds_per_image"])
        # PSNR measured (CLEAR changes the images, so finite), learned metrics skipped with the reason
        assert 5 < c["values"]["psnr"] < 80
        skipped = c["skipped"]
        assert set(skipped) == {"ms_ssim", "lpips", "clip_i", "dino", "fid", "is"}
        assert "176 px" in skipped["ms_ssim"] and M.ALEXNET_FILE in skipped["lpips"]
        assert M.DEFAULT_CLIP_MODEL in skipped["clip_i"] and M.DEFAULT_DINO_MODEL in skipped["dino"]
        result = load_result(out / f"r{r}" / "metrics.json")  # eval images' files, with the radius
        assert (
            result["radius"] == r and result["meta"]["pairs"] == 3 and result["psnr"] == c["values"]["psnr"]
        )
        assert result["attention_flops_per_forward"] == clear

    for name, radius in (("teacher", 0), ("clear_r1", 1), ("clear_r2", 2)):
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == ["00000.png", "00001.png", "00002.png"]
        for i, file in enumerate(files):
            params = read_parameters(out / name / file)
            assert params["prompt"] == PROMPTS[i] and params["seed"] == i and params["radius"] == radius
    assert not np.array_equal(pixels(out / "teacher" / "00001.png"), pixels(out / "clear_r1" / "00001.png"))
    # the teacher image of prompt 1 is what cleardit generate makes with full attention and seed 1
    direct = generate(PROMPTS[1], model=tiny_dir, radius=0, seed=1, quiet=True).images[0]
    assert np.array_equal(pixels(out / "teacher" / "00001.png"), np.asarray(direct.convert("RGB")))

    assert (out / "prompts.txt").read_text().splitlines() == PROMPTS[:3]
    assert (out / "metrics_vs_radius.png").read_bytes()[:4] == b"\x89PNG"
    assert "| CLEAR r=2 |" in (out / "eval_model.md").read_text()
    page = (report / "report.html").read_text()
    assert "<table>" in page and "CLEAR r=2" in page and PROMPTS[2] in page and "skipped" in page.lower()
    assert "grid.png" in (report / "report.md").read_text()
    for png in ("grid.png", "metrics_vs_radius.png"):
        assert (report / png).read_bytes()[:4] == b"\x89PNG"
    with Image.open(report / "grid.png") as grid:
        assert grid.width >= 3 * 64  # teacher | r=1 | r=2
    assert not list(out.rglob(".*.tmp*")) and not list(report.glob(".*.tmp*"))


def test_finished_images_are_reused_and_an_interrupted_run_continues(offline, tiny_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    common = dict(model=tiny_dir, radii=[1], output=out, metrics="psnr", quiet=True)

    interrupted = CountingGenerate(fail_at=1)
    with pytest.raises(KeyboardInterrupt):
        evaluate_model(PROMPTS[:3], batch_size=1, generate_fn=interrupted, **common)
    assert [p.name for p in (out / "teacher").glob("*.png")] == ["00000.png"]  # the first call's image
    first = mtimes(out / "teacher")

    resumed = CountingGenerate()
    result = evaluate_model(PROMPTS[:3], batch_size=1, generate_fn=resumed, **common)
    assert [(p, s, r) for p, s, r in resumed.calls] == [
        ([PROMPTS[1]], 1, 0), ([PROMPTS[2]], 2, 0),  # teacher: only what the interruption left out
        ([PROMPTS[0]], 0, 1), ([PROMPTS[1]], 1, 1), ([PROMPTS[2]], 2, 1),
    ]  # fmt: skip
    assert result.teacher.cached == 1 and result.teacher.generated == 2
    assert mtimes(out / "teacher")["00000.png"] == first["00000.png"]
    before = {name: mtimes(out / name) for name in ("teacher", "clear_r1")}

    again = CountingGenerate()
    result = evaluate_model(PROMPTS[:3], batch_size=1, generate_fn=again, **common)
    assert again.calls == [] and {name: mtimes(out / name) for name in before} == before
    assert result.teacher.cached == 3 and result.clear[0].cached == 3
    assert result.summary["teacher"]["seconds_per_image"] > 0  # read back from the reused images
    assert math.isfinite(result.summary["clear"][0]["values"]["psnr"])

    # a file without matching parameters is remade; one more prompt adds one image per folder
    Image.new("RGB", (64, 64), "white").save(out / "clear_r1" / "00001.png")
    grown = CountingGenerate()
    result = evaluate_model(PROMPTS, batch_size=8, generate_fn=grown, **common)
    assert [(p, s, r) for p, s, r in grown.calls] == [
        ([PROMPTS[3]], 3, 0), ([PROMPTS[1]], 1, 1), ([PROMPTS[3]], 3, 1),
    ]  # fmt: skip
    assert result.summary["prompts"]["count"] == 4 and result.results["r1"].meta["pairs"] == 4

    # another seed changes every image
    reseeded = CountingGenerate()
    evaluate_model(PROMPTS[:2], seed=5, generate_fn=reseeded, **common)
    assert [(len(p), s, r) for p, s, r in reseeded.calls] == [(2, 5, 0), (2, 5, 1)]
    assert read_parameters(out / "teacher" / "00001.png")["seed"] == 6


def test_files_fingerprint_follows_the_bytes_not_the_place(tmp_path):
    a = tmp_path / "a"
    (a / "transformer").mkdir(parents=True)
    (a / "model_index.json").write_text("{}")
    weights = a / "transformer" / "w.safetensors"
    weights.write_bytes(bytes(range(256)) * 20_000)  # 5 MB: first and last MiB are read
    (a / ".cache").mkdir()
    (a / ".cache" / "lock").write_text("x")
    b = tmp_path / "b"
    b.mkdir()
    (b / "transformer").mkdir()
    (b / "model_index.json").write_text("{}")
    (b / "transformer" / "w.safetensors").write_bytes(weights.read_bytes())
    assert files_fingerprint(a) == files_fingerprint(b)  # a copy elsewhere (hidden files ignored)
    data = bytearray(weights.read_bytes())
    data[-10] ^= 1
    weights.write_bytes(bytes(data))
    assert files_fingerprint(a) != files_fingerprint(b)  # retrained weights
    # a single file: its bytes count, not its name
    (tmp_path / "renamed.safetensors").write_bytes(weights.read_bytes())
    assert files_fingerprint(weights) == files_fingerprint(tmp_path / "renamed.safetensors")
    assert files_fingerprint(weights) != files_fingerprint(b / "transformer" / "w.safetensors")


def test_new_clear_weights_at_the_same_path_remake_only_that_radius(offline, tiny_dir, tmp_path):  # noqa: F811
    weights, out = tmp_path / "clear.safetensors", tmp_path / "out"
    _weights_file(tiny_dir, weights, radius=2)
    common = dict(model=tiny_dir, radii=[1, 2], clear_weights=[weights], output=out, metrics="psnr")
    first = CountingGenerate()
    result = evaluate_model(PROMPTS[:2], generate_fn=first, quiet=True, **common)
    assert [(r, len(p)) for p, _, r in first.calls] == [(0, 2), (1, 2), (2, 2)]
    assert result.summary["clear"][1]["clear_weights"] == str(weights.resolve())
    assert read_parameters(out / "clear_r2" / "00000.png")["clear_weights"] == str(weights.resolve())
    _weights_file(tiny_dir, weights, radius=2, scale=1.5)  # "retrained": new values, same file name
    second = CountingGenerate()
    evaluate_model(PROMPTS[:2], generate_fn=second, quiet=True, **common)
    assert [(r, len(p)) for p, _, r in second.calls] == [(2, 2)]


# ----------------------------------------------------------------------------- inputs
def _weights_file(tiny_dir, path, radius, scale=1.0):
    """A CLEAR weights file for ``radius``: the tiny model's projections times ``scale``."""
    pipe = loading.load_pipeline(tiny_dir, torch.device("cpu"), torch.float32, progress=False)
    handle = cleardit.linearize(pipe.transformer, radius=radius)
    with torch.no_grad():
        for _, p in handle.named_clear_parameters():
            p.mul_(scale)
    cleardit.save_weights(pipe.transformer, path)
    return path


def test_bad_inputs_give_clear_errors_before_any_image_is_made(tiny_dir, tmp_path, capsys):
    good = prompts_file(tmp_path)
    out = tmp_path / "out"

    def fails(match, error=ValueError, **kwargs):
        args = dict(prompts=good, model=tiny_dir, radii=[1], output=out, quiet=True)
        args.update(kwargs)
        with pytest.raises(error, match=match):
            evaluate_model(generate_fn=never_generate, **args)

    fails("cannot read the file", prompts=tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    fails("the file has no prompts", prompts=tmp_path / "empty.txt")
    fails("--radius 0 means full attention", radii=[4, 0])
    fails("--radius 2 is given twice", radii=[2, 2])
    fails("at least one CLEAR radius", radii=[])
    fails("unknown metric 'psnrr'", metrics="psnr,psnrr")
    fails("--limit must be", limit=0)
    fails("--steps must be a whole number >= 1, got 0", steps=0)
    (tmp_path / "file").write_text("x")
    fails("exists and is not a folder", output=tmp_path / "file")
    fails("no such folder", ModelNotFoundError, model=tmp_path / "nowhere")
    fails("--height 70 is not a multiple of 16", height=70)
    fails("--clear-weights .*missing.safetensors: no such file", FileNotFoundError,
          clear_weights=[tmp_path / "missing.safetensors"])  # fmt: skip
    w3 = _weights_file(tiny_dir, tmp_path / "w3.safetensors", radius=3)
    fails("made for radius 3, which is not among --radius 1 2", radii=[1, 2], clear_weights=[w3])
    fails("made for down factor None, but --down-factor 2", radii=[3], down_factor=2, clear_weights=[w3])
    assert not out.exists()

    # the command line: exit code 2 and the message
    code = cleardit.cli.main(
        ["eval", "model", "--model", str(tiny_dir), "--prompts", str(good), "--radius", "8", "0",
         "--output", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 2 and "--radius 0 means full attention" in capsys.readouterr().err


def test_weights_go_to_the_radius_they_declare_and_the_models_own_weights_are_used(tiny_dir, tmp_path):
    w3 = _weights_file(tiny_dir, tmp_path / "w3.safetensors", radius=3)
    info = mini_model_info("tiny", clear_weights="own.safetensors", clear_radius=2)
    plan = plan_attention([1, 2, 3], None, [w3], info, tiny_dir)
    assert plan == [
        Attention(1, None, None),  # training-free
        Attention(2, None, (tiny_dir / "own.safetensors").resolve()),  # the model's shipped weights
        Attention(3, None, w3.resolve()),  # the file made for radius 3
    ]
    assert [a.tag for a in plan] == ["r1", "r2", "r3"]
    assert Attention(8, 4).tag == "r8_df4" and Attention(8, 4).label == "CLEAR r=8 df=4"
    # a file without declared geometry is fine with one radius only
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(w3), plain)  # the same tensors without cleardit's metadata
    assert plan_attention([5], None, [plain], mini_model_info("tiny"), tiny_dir)[0].clear_weights is not None
    with pytest.raises(ValueError, match="does not say which radius"):
        plan_attention([5, 6], None, [plain], mini_model_info("tiny"), tiny_dir)


# ----------------------------------------------------------------------------- the shipped model
@pytest.mark.slow
def test_eval_model_on_the_shipped_mini_model_with_20_prompts(tmp_path, capsys):
    """Issue acceptance: ``cleardit eval model`` on the mini model with 20 prompts runs.

    Uses the default model (src/cleardit/mini/weights/, which the mini trainer writes; or the folder
    in CLEARDIT_MINI_MODEL), the bundled
    prompts and two radii at the base size (128 px = 16x16 tokens).
    """
    out, report = tmp_path / "out", tmp_path / "report"
    model = os.environ.get("CLEARDIT_MINI_MODEL")  # another mini-model folder (e.g. before one is shipped)
    code = cleardit.cli.main(
        ["eval", "model", *(["--model", model] if model else []), "--limit", "20", "--radius", "4", "8",
         "--output", str(out), "--report", str(report), "--quiet"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "eval_model.json").read_text())
    assert summary["prompts"]["count"] == 20 and summary["settings"]["grid"] == [16, 16]
    assert summary["teacher"]["generated"] + summary["teacher"]["cached"] == 20
    assert [c["radius"] for c in summary["clear"]] == [4, 8]
    for c in summary["clear"]:
        assert c["flops_fraction"] < 1 and c["seconds_per_image"] > 0
        assert 10 < c["values"]["psnr"] < 100 or c["values"]["psnr"] == "inf"
        assert set(c["values"]) | set(c["skipped"]) >= set(M.METRIC_NAMES) - {"is"}
    for name in ("teacher", "clear_r4", "clear_r8"):
        assert len(list((out / name).glob("*.png"))) == 20
    assert (out / "metrics_vs_radius.png").is_file() and (report / "grid.png").is_file()
    assert "CLEAR r=8" in (report / "report.html").read_text()
