"""The GPU benchmark suite dry-runs on the CPU (Triton under TRITON_INTERPRET=1, tiny sizes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout[proc.stdout.index("summary") :]
    assert "triton kernel PASSES" in summary
    assert "headline: at" in summary  # STEP-GPU's last line

    # ATTN-GPU: every contender timed, correctness checks passed, headline last
    lines = [line.strip() for line in (tmp_path / "attn_gpu.log").read_text().splitlines() if line.strip()]
    header = next(i for i, line in enumerate(lines) if line.startswith("grid") and "TFLOP/s" in line)
    table = [line.split() for line in lines[header + 1 :] if line[0].isdigit()]
    assert {row[3] for row in table} == {"sdpa", "triton", "flex"}
    assert all(float(row[4]) > 0 for row in table)
    assert all("FAILED" not in line for line in lines)
    assert lines[-1].startswith("HEADLINE")
    # STEP-GPU: one row per size with the three contenders' times
    step = (tmp_path / "step_gpu.log").read_text()
    assert step.count("[4 blocks]") >= 3  # two table rows + the headline


@pytest.mark.slow
def test_mini_gpu_round_dry_run(tmp_path):
    """bench/mini_gpu_round.sh on the CPU with the quick variant: trains, scores, probes, packs."""
    env = dict(
        os.environ, OUT=str(tmp_path), PYTHON=sys.executable, DEVICE="cpu", QUICK="1", MINUTES="3",
        RENDER_WORKERS="1",
    )  # fmt: skip
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "mini_gpu_round.sh"), "quick-a"],
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
    """bench/mini_adherence.py end to end: table, JSON rows per size x attention, picture grid."""
    import json

    from PIL import Image

    out = tmp_path / "adherence.json"
    grid = tmp_path / "grid.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "mini_adherence.py"), "--n", "2", "--steps", "2",
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
        assert im.size[1] == 7 * (64 + 4) and im.size[0] > 2 * 64


def test_mini_probe_on_the_shipped_model(tmp_path, capsys):
    """bench/mini_probe.py: the shipped model's loss at sigma = 1 is clearly lower with the right
    captions than with shuffled ones (it reads them) and below the flat floor (it places things),
    and the table has one row per model."""
    sys.path.insert(0, str(ROOT / "bench"))
    import mini_probe

    r = mini_probe.probe(
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
    assert mini_probe.main(["--n", "2", "--sigmas", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "loss s=0.5" in out and "x0(s=0.5) shapes" in out and "x0(s=1)" not in out
    with pytest.raises(SystemExit):
        mini_probe.main(["--model", str(tmp_path)])
    assert "not a pipeline folder" in capsys.readouterr().err


def test_mini_probe_spatial_r2_scores_layout_not_colour():
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import mini_probe

    x0 = torch.randn(3, 8, 6, 10)
    flat = x0.mean((2, 3), keepdim=True).expand_as(x0)
    assert mini_probe._spatial_r2(x0 + 5.0, x0) == pytest.approx([1.0] * 3)  # an offset colour, right layout
    assert mini_probe._spatial_r2(flat, x0) == pytest.approx([0.0] * 3, abs=1e-6)
    assert all(r < 0 for r in mini_probe._spatial_r2(-x0, x0))


def test_distill_quality_picture_grid_is_written_whole(tmp_path):
    from PIL import Image

    sys.path.insert(0, str(ROOT / "bench"))
    import distill_quality

    tile = Image.new("RGB", (8, 6), "red")
    path = distill_quality.picture_grid([[tile, tile], [tile, tile]], ["a", "b"], tmp_path / "g" / "grid.png")
    with Image.open(path) as im:
        assert im.size == (2 * (8 + 4) + 4, 16 + 2 * (6 + 4) + 4)
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]  # no temp file left


def test_mini_recipe_sweep_variants_are_valid_configs():
    """Every variant of bench/mini_recipe_sweep.py passes the trainer's checks, its values sent the
    way the sweep sends them (--set FIELD=<JSON>)."""
    import json

    sys.path.insert(0, str(ROOT / "bench"))
    import mini_recipe_sweep

    from cleardit.mini import train as T

    for name, overrides in {**mini_recipe_sweep.VARIANTS, **mini_recipe_sweep.QUICK_VARIANTS}.items():
        items = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
        make = T.quick_config if name in mini_recipe_sweep.QUICK_VARIANTS else T.full_config
        cfg = make(**T.parse_overrides(items))
        assert all(cfg.to_dict()[k] == json.loads(json.dumps(v)) for k, v in overrides.items()), name
