"""`cleardit distill train` end to end on the tiny pipeline: SIGKILL + --resume, and 2 processes (gloo)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from cleardit.cli import main
from cleardit.distill.teacher_data import make_teacher_data
from cleardit.mini.pipeline import build_mini_pipeline, save_mini_pipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    save_mini_pipeline(build_mini_pipeline("tiny"), root / "tiny", "tiny")
    make_teacher_data(
        root / "tiny",
        PROMPTS,
        root / "data",
        resolution=(48, 64),
        steps=2,
        samples_per_prompt=2,
        shard_size=4,
        quiet=True,
    )
    return root


def train_args(root, output, steps, *extra):
    return [
        "distill",
        "train",
        "--model",
        str(root / "tiny"),
        "--data",
        str(root / "data"),
        "--radius",
        "1",
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--output",
        str(output),
        "--quiet",
        *extra,
    ]


def weights(folder):
    return load_file(str(folder / "clear_local_1.safetensors"))


def test_sigkill_then_resume_equals_uninterrupted(tiny_data, tmp_path):
    steps = 40
    assert main(train_args(tiny_data, tmp_path / "ref", steps)) == 0
    want = weights(tmp_path / "ref")

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cleardit", *train_args(tiny_data, out, steps, "--checkpoint-every", "1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "clear_local_1.safetensors").exists(), "the run finished before the kill"
    killed_at = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 1 <= killed_at < steps

    assert main(train_args(tiny_data, out, steps)) == 2  # an existing run needs --resume
    assert main(train_args(tiny_data, out, steps, "--resume")) == 0
    got = weights(out)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    log = torch.load(out / "checkpoint.pt", weights_only=True)["log"]
    assert [e["step"] for e in log] == list(range(1, steps + 1))


def test_two_processes_equal_one(tiny_data, tmp_path):
    """torchrun + accelerate (gloo): 2 processes x 1 sample == 1 process x 2 accumulated samples."""
    assert main(train_args(tiny_data, tmp_path / "one", 4, "--grad-accum", "2")) == 0
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        torchrun,
        "--nproc-per-node",
        "2",
        "-m",
        "cleardit.distill",
        *train_args(tiny_data, tmp_path / "two", 4)[1:],
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5)
    assert not torch.equal(one[k], build_mini_state(tiny_data)[k])  # it trained


def build_mini_state(root):
    from diffusers import FluxTransformer2DModel

    t = FluxTransformer2DModel.from_pretrained(str(root / "tiny"), subfolder="transformer")
    return {n: p.detach() for n, p in t.named_parameters()}
