"""The cleardit command line."""

import json
import subprocess
import sys

from cleardit.cli import main


def test_flops_8k_matches_the_paper(capsys):
    assert main(["flops", "--height", "8192", "--width", "8192", "--radius", "8"]) == 0
    out = capsys.readouterr().out
    assert "847.73 TFLOPs" in out  # the paper's full-attention figure, from the pair count
    assert main(["flops", "--height", "8192", "--width", "8192", "--radius", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert abs(data["flops_per_layer_clear"] / 1e12 - 3.92) / 3.92 < 0.02
    assert data["grid"] == [512, 512]


def test_flops_rejects_sizes_that_are_not_multiples_of_16(capsys):
    assert main(["flops", "--height", "1000", "--width", "1024"]) == 2
    assert "use 992 or 1008" in capsys.readouterr().err


def test_help_and_info_run_as_a_program():
    out = subprocess.run(
        [sys.executable, "-m", "cleardit", "--help"], capture_output=True, text=True, check=True
    )
    assert "flops" in out.stdout and "info" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "cleardit", "info"], capture_output=True, text=True, check=True
    )
    assert "backends" in out.stdout and "tiled" in out.stdout
