"""STEP-CPU (bench/step_cpu.py) runs its dry path on the small check models: checks pass, the table
has one row per family with the three contenders' times, the headline is last."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def step_cpu():
    spec = importlib.util.spec_from_file_location("step_cpu", ROOT / "bench" / "step_cpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_cpu"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_checks_then_times_every_contender(step_cpu, capsys, tmp_path):
    json_path = tmp_path / "step.json"
    argv = ["--dry-run", "--family", "sd3,wan", "--warmup", "0", "--json", str(json_path)]
    assert step_cpu.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[0].startswith("machine:")
    checks = [line for line in lines if "CLEAR beyond the grid vs full" in line]
    assert len(checks) == 2 and all(line.endswith("-> ok") for line in checks)
    header = next(i for i, line in enumerate(lines) if line.startswith("|") and "floor ms" in line)
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in lines[header + 2 :]
        if line.startswith("|")
    ]
    assert [row[0] for row in rows] == ["sd3", "wan"]
    assert rows[1][3] == "3x10x12"  # the video row's T x H x W
    for row in rows:
        full, clear, floor = (float(x) for x in row[5:8])
        assert full > 0 and clear > 0 and floor > 0
        assert abs(float(row[8].rstrip("x")) - full / clear) < 0.05
    assert lines[-1].startswith("headline:") and "wan" in lines[-1]
    assert '"family": "wan"' in json_path.read_text()


def test_the_floor_replaces_sdpa_and_puts_it_back(step_cpu):
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    original = F.scaled_dot_product_attention
    calls = [0]
    with step_cpu.no_attention(calls):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.shape == (1, 2, 5, 8) and calls == [1]
    assert torch.nn.functional.scaled_dot_product_attention is original


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--family", "flux,sdxl"], "unknown family sdxl; choose from: flux, flux2"),
        (["--grid", "96"], "expected 2 whole numbers"),
        (["--video-grid", "13x30"], "expected 3 whole numbers"),
        (["--radius", "0"], "--radius must be >= 1"),
    ],
)
def test_bad_options_are_clear_errors(step_cpu, capsys, argv, message):
    with pytest.raises(SystemExit):
        step_cpu.main(argv)
    assert message in capsys.readouterr().err
