"""The lab's scripts end to end: the adherence bench and the probe on the shipped model, the recipe
sweep's variants, and (slow) the GPU round's dry run on the CPU. ``conftest.py`` puts
``examples/mini_model`` (the scripts, ``mini_lab``) and ``bench`` on ``sys.path``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[1]  # examples/mini_model
ROOT = LAB.parents[1]


@pytest.mark.slow
def test_mini_gpu_round_dry_run(tmp_path):
    """gpu_round.sh on the CPU with the quick variant: trains, scores, probes, packs."""
    env = dict(
        os.environ, OUT=str(tmp_path), PYTHON=sys.executable, DEVICE="cpu", QUICK="1", MINUTES="3",
        RENDER_WORKERS="1",
    )  # fmt: skip
    proc = subprocess.run(
        ["bash", str(LAB / "gpu_round.sh"), "quick-a"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| quick-a | 60/60 |" in (tmp_path / "sweep.log").read_text()
    probe = (tmp_path / "probe.log").read_text()
    assert "spatial R^2" in probe and "model-quick-a" in probe
    for name in ("logs.tgz", "model-quick-a.tgz"):
        assert (tmp_path / name).stat().st_size > 0
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back


def test_mini_adherence_bench_on_the_shipped_model(tmp_path):
    """adherence_bench.py end to end: table, JSON rows per size x attention, picture grid."""
    import json

    from PIL import Image

    out = tmp_path / "adherence.json"
    grid = tmp_path / "grid.png"
    proc = subprocess.run(
        [sys.executable, str(LAB / "adherence_bench.py"), "--n", "2", "--steps", "2",
         "--scales", "1,2", "--highres", "--json", str(out), "--grid", str(grid), "--grid-tile", "64"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "headline: at 2x base (256x256)" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    labels = [(r["height"], r["attention"]) for r in rows]
    assert labels == [
        (128, "VAE only"), (128, "full"), (128, "CLEAR r=8"),
        (256, "VAE only"), (256, "full"), (256, "CLEAR r=8"), (256, "full + highres"),
        (256, "CLEAR r=8 + highres"),
    ]  # fmt: skip
    assert all(0 <= r["percent"] <= 100 for r in rows)
    # faithfulness to the upscaled base image: only above the base, only for generated rows
    assert [r["psnr_vs_base"] is not None for r in rows] == [False] * 4 + [True] * 4
    assert all(r["psnr_vs_base"] > 5 and 0 < r["ms_ssim_vs_base"] <= 1 for r in rows[4:])
    with Image.open(grid) as im:  # scene row + 6 generated rows, 2 columns of 64 px tiles
        assert 7 * 64 <= im.size[1] < 8 * 64 and im.size[0] > 2 * 64


def test_mini_probe_on_the_shipped_model(tmp_path, capsys):
    """caption_probe.py: the shipped model's loss at sigma = 1 is clearly lower with the right
    captions than with shuffled ones (it reads them) and below the flat floor (it places things),
    and the table has one row per model."""
    import caption_probe

    r = caption_probe.probe(
        str(ROOT / "src" / "cleardit" / "mini" / "weights"), n=8, sigmas=[1.0, 0.6, 0.2], batch=4
    )
    # near the clean picture the one-step x0 keeps the true shapes, whatever the shape words say
    assert r["x0_shapes"][0.2]["right"] >= 75 > 40 >= r["x0_shapes"][0.2]["rotated"]
    # ... and redraws little of a circle blob as the stated shape (round 10)
    assert r["x0_shapes"][0.2]["from circles"] < r["x0_shapes"][0.2]["right"] - 25
    assert r["loss"][1.0]["right"] < 0.5 * r["loss"][1.0]["shuffled"]
    assert 0 < r["loss"][0.6]["right"] < r["loss"][0.6]["shuffled"]
    assert 0 < r["loss"][1.0]["right"] < 0.5 * r["flat_floor"] < r["loss"][1.0]["shuffled"]
    assert 0.4 < r["x0_spatial_r2"] <= 1  # the shipped model's guess from pure noise shows the layout
    assert 0 <= r["x0_bg_colours"] <= 100 and 0 <= r["x0_bg_pattern"] <= 100
    assert caption_probe.main(["--n", "2", "--sigmas", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "loss s=0.5" in out and "x0(s=0.5) shapes" in out and "x0(s=1)" not in out
    with pytest.raises(SystemExit):
        caption_probe.main(["--model", str(tmp_path)])
    assert "not a pipeline folder" in capsys.readouterr().err


def test_mini_probe_spatial_r2_scores_layout_not_colour():
    import caption_probe
    import torch

    x0 = torch.randn(3, 8, 6, 10)
    flat = x0.mean((2, 3), keepdim=True).expand_as(x0)
    # an offset colour, right layout
    assert caption_probe._spatial_r2(x0 + 5.0, x0) == pytest.approx([1.0] * 3)
    assert caption_probe._spatial_r2(flat, x0) == pytest.approx([0.0] * 3, abs=1e-6)
    assert all(r < 0 for r in caption_probe._spatial_r2(-x0, x0))


def test_mini_recipe_sweep_variants_are_valid_configs():
    """Every variant of recipe_sweep.py passes the trainer's checks, its values sent the
    way the sweep sends them (--set FIELD=<JSON>)."""
    import json

    import recipe_sweep
    from mini_lab import trainer as T

    for name, overrides in {**recipe_sweep.VARIANTS, **recipe_sweep.QUICK_VARIANTS}.items():
        items = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
        make = T.quick_config if name in recipe_sweep.QUICK_VARIANTS else T.full_config
        cfg = make(**T.parse_overrides(items))
        assert all(cfg.to_dict()[k] == json.loads(json.dumps(v)) for k, v in overrides.items()), name
