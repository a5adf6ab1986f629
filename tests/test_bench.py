"""The GPU benchmark suite dry-runs on the CPU (Triton under TRITON_INTERPRET=1, tiny sizes).

The mini model's scripts (adherence bench, probe, recipe sweep, GPU round) are tested with their lab:
examples/mini_model/tests/test_lab_scripts.py.
"""

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


def test_attention_cpu_3d_runs_a_tiny_video():
    # ATTN-CPU-3D at a tiny grid, tiled backend forced (auto picks dense at this size), forward only
    # (its gradients are tested in test_video_rule.py): correctness checked first, every contender
    # timed, the headline last.
    argv = ["--grid", "3x12x14", "--radius", "3", "--temporal-radius", "2,none", "--backend", "tiled"]
    argv += ["--backward", "none"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "attention_cpu_3d.py"), *argv, "--no-flex", "--reps", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert any(line.startswith("check: tiled r=3 rt=2, out") for line in lines)
    assert any(line.startswith("check: tiled r=3 rt=all, out") for line in lines)
    assert any(line.startswith("check: max abs error") for line in lines)
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| 3x12x14")]
    contenders = {(row[2], row[3]) for row in rows}
    assert {("-", "dense SDPA"), ("2", "cleardit (tiled)"), ("all", "cleardit (tiled)")} <= contenders
    assert all(float(row[4]) > 0 for row in rows)
    assert len(rows) == 3  # dense + 2 temporal radii
    assert lines[-1].startswith("headline: at 3x12x14 r=3 rt=2 cleardit (tiled) forward is")
