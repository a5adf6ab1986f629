"""The GPU benchmark suite dry-runs on the CPU (Triton under TRITON_INTERPRET=1, tiny sizes)."""

import os
import subprocess
import sys
from pathlib import Path

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
        (256, "VAE only"), (256, "full"), (256, "CLEAR r=8"), (256, "CLEAR r=8 + highres"),
    ]  # fmt: skip
    assert all(0 <= r["percent"] <= 100 for r in rows)
    with Image.open(grid) as im:  # scene row + 5 generated rows, 2 columns of 64 px tiles
        assert im.size[1] == 6 * (64 + 4) and im.size[0] > 2 * 64
