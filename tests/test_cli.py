"""The cleardit command line."""

import json
import subprocess
import sys

import pytest

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


def test_shared_argument_types():
    import argparse

    from cleardit.argtypes import nonneg_float, nonneg_int, positive_int, positive_int_list

    assert positive_int("3") == 3 and nonneg_int("0") == 0
    assert positive_int_list("8, 4") == [8, 4] and nonneg_float("0") == 0.0
    for fn, bad, message in (
        (positive_int, "0", "expected a whole number >= 1, got '0'"),
        (nonneg_int, "x", "expected a whole number >= 0, got 'x'"),
        (positive_int_list, "8,0", "expected comma-separated whole numbers >= 1, got '8,0'"),
        (positive_int_list, "a", "expected comma-separated whole numbers, got 'a'"),
        (nonneg_float, "-1", "expected a number >= 0, got '-1'"),
    ):
        with pytest.raises(argparse.ArgumentTypeError) as err:
            fn(bad)
        assert str(err.value) == message


def test_shared_options_are_declared_once():
    import argparse

    from cleardit.cli import build_parser
    from cleardit.cli_options import MODEL_HELP, add_model_option, add_radius_option

    p = argparse.ArgumentParser()
    add_model_option(p, role="the teacher")
    add_radius_option(p, many=True, zero_means_full=True)
    args = p.parse_args(["--radius", "0", "8"])
    assert args.radius == [0, 8] and args.model is None
    q = argparse.ArgumentParser()
    add_radius_option(q, default=16)
    assert q.parse_args([]).radius == 16
    with pytest.raises(SystemExit):
        q.parse_args(["--radius", "0"])  # 0 (full attention) only where the command gives it a meaning
    # the command lines declare --model / --radius through those helpers: one help text each
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices

    def option(path, name):
        sub = commands[path[0]]
        for step in path[1:]:
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[step]
        return next(a for a in sub._actions if name in a.option_strings)

    for path in (("eval", "model"), ("distill", "train"), ("distill", "data"), ("generate",)):
        assert option(path, "--model").help.endswith(MODEL_HELP)
    radius_help = {
        option(path, "--radius").help.split(" (")[0].split(";")[0]
        for path in (("flops",), ("check",), ("eval", "images"), ("distill", "train"), ("generate",))
    }
    assert radius_help == {"CLEAR radius in tokens: image tokens attend to the image tokens closer than this"}
