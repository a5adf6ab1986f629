"""Teacher data (``cleardit distill data``) on the tiny FLUX pipeline, offline."""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from cleardit.distill.teacher_data import (
    TeacherDataset,
    add_data_arguments,
    cmd_distill_data,
    make_teacher_data,
    parse_resolution,
)
from cleardit.mini.pipeline import build_mini_pipeline, save_mini_pipeline
from cleardit.pipelines.loading import load_pipeline

PROMPTS = [
    "a small red circle at the top left",
    "a large blue square in the middle",
    "two green triangles at the bottom",
]
# 3 prompts x 2 seeds = 6 samples in shards of 4 and 2; latents [4, 32/8, 48/8] = [4, 4, 6].
SETTINGS = dict(resolution=(32, 48), steps=2, seed=5, samples_per_prompt=2, shard_size=4)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_mini_pipeline(build_mini_pipeline("tiny"), folder, "tiny")
    return folder


@pytest.fixture(scope="module")
def complete_dir(tiny_dir, tmp_path_factory):
    """A finished teacher-data folder made in one uninterrupted call (never modified by tests)."""
    folder = tmp_path_factory.mktemp("data") / "complete"
    make_teacher_data(tiny_dir, PROMPTS, folder, quiet=True, **SETTINGS)
    return folder


def file_hashes(folder) -> dict[str, str]:
    """sha256 of every file in ``folder`` (hidden ones included)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def edit_manifest(folder, change) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def drop_last_shard(manifest: dict) -> None:
    manifest["shards"].pop()
    manifest["complete"] = False


def flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# -- the data ---------------------------------------------------------------------------------------


def test_round_trip_matches_the_pipeline(tiny_dir, complete_dir):
    manifest = json.loads((complete_dir / "manifest.json").read_text())
    assert manifest["format"] == "cleardit-teacher-data-v1" and manifest["complete"] is True
    assert manifest["model"] == str(tiny_dir.resolve()) and manifest["prompts"] == PROMPTS
    assert (manifest["height"], manifest["width"], manifest["steps"], manifest["guidance"]) == (
        32,
        48,
        2,
        3.5,
    )
    assert (manifest["seed"], manifest["samples_per_prompt"], manifest["shard_size"]) == (5, 2, 4)
    assert (manifest["total"], manifest["dtype"], manifest["latent_channels"], manifest["text_len"]) == (
        6,
        "float32",
        4,
        40,
    )
    assert [(s["file"], s["indices"]) for s in manifest["shards"]] == [
        ("shard-00000.safetensors", [0, 1, 2, 3]),
        ("shard-00001.safetensors", [4, 5]),
    ]
    assert sorted(p.name for p in complete_dir.iterdir()) == [
        "manifest.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    shard = load_file(str(complete_dir / "shard-00001.safetensors"))
    assert shard["latents"].shape == (2, 4, 4, 6) and shard["prompt_embeds"].shape == (2, 40, 32)
    assert shard["pooled_prompt_embeds"].shape == (2, 32)
    assert shard["index"].dtype == torch.int64 and shard["index"].tolist() == [4, 5]

    data = TeacherDataset(complete_dir, verify=True)
    assert len(data) == 6 and (data.height, data.width) == (32, 48) and data.manifest["total"] == 6
    items = [data[i] for i in range(len(data))]
    assert [(it["index"], it["seed"], it["prompt"]) for it in items] == [
        (i, 5 + i, PROMPTS[i // 2]) for i in range(6)
    ]
    assert data[-1]["index"] == 5
    with pytest.raises(IndexError):
        data[6]
    # two seeds of one prompt: same text embeddings, different images
    assert torch.equal(items[0]["prompt_embeds"], items[1]["prompt_embeds"])
    assert not torch.equal(items[0]["latents"], items[1]["latents"])

    pipe = load_pipeline(tiny_dir, torch.device("cpu"), torch.float32, progress=False)
    pipe.set_progress_bar_config(disable=True)
    for i in (0, 3, 5):
        packed = pipe(
            PROMPTS[i // 2],
            height=32,
            width=48,
            num_inference_steps=2,
            guidance_scale=3.5,
            max_sequence_length=40,
            generator=torch.Generator("cpu").manual_seed(5 + i),
            output_type="latent",
        ).images
        expected = pipe._unpack_latents(packed, 32, 48, pipe.vae_scale_factor)[0]
        with torch.no_grad():  # as inside the pipeline (T5 differs in the last bit with autograd on)
            prompt_embeds, pooled, _ = pipe.encode_prompt(
                PROMPTS[i // 2], prompt_2=None, max_sequence_length=40
            )
        assert items[i]["latents"].shape == (4, 4, 6) and items[i]["latents"].dtype == torch.float32
        assert torch.equal(items[i]["latents"], expected)
        assert torch.equal(items[i]["prompt_embeds"], prompt_embeds[0])
        assert torch.equal(items[i]["pooled_prompt_embeds"], pooled[0])


def test_loaded_bf16_pipeline_stores_bf16(tmp_path):
    pipe = build_mini_pipeline("tiny")
    manifest = make_teacher_data(
        pipe, PROMPTS[:1], tmp_path / "bf16", resolution=32, steps=1, dtype="bf16", quiet=True
    )
    stored = json.loads(manifest.read_text())
    assert stored["model"] == "FluxPipeline" and stored["dtype"] == "bfloat16"
    item = TeacherDataset(tmp_path / "bf16")[0]
    assert item["latents"].dtype == item["prompt_embeds"].dtype == torch.bfloat16
    assert item["latents"].shape == (4, 4, 4) and torch.isfinite(item["latents"]).all()


# -- resuming ---------------------------------------------------------------------------------------

# SETTINGS on the command line
CLI_ARGS = "--resolution 32x48 --steps 2 --seed 5 --samples-per-prompt 2 --shard-size 4".split()
SLOW_CLI = """
import sys, time
import diffusers
call = diffusers.FluxPipeline.__call__
def slow_call(self, *args, **kwargs):  # time to kill the run between its two shards
    time.sleep(0.5)
    return call(self, *args, **kwargs)
diffusers.FluxPipeline.__call__ = slow_call
from cleardit.distill.cli import main
sys.exit(main(["data", *sys.argv[1:]]))
"""


def test_sigkilled_run_completes_to_identical_files(tiny_dir, complete_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    folder = tmp_path / "resumed"
    argv = ["--model", str(tiny_dir), "--prompts", str(prompts), *CLI_ARGS, "--output", str(folder)]
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *argv], stdout=log, stderr=log)
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            path = folder / "manifest.json"
            if path.is_file() and json.loads(path.read_text())["shards"]:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    killed = json.loads((folder / "manifest.json").read_text())
    assert not killed["complete"] and len(killed["shards"]) == 1

    done = subprocess.run(
        [sys.executable, "-m", "cleardit.distill", "data", *argv], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "6 samples of 32x48 px" in done.stdout and "resuming" in done.stderr
    # the same bytes as the uninterrupted in-process run
    assert file_hashes(folder) == file_hashes(complete_dir)
    TeacherDataset(folder, verify=True)


def _unlisted_shard_and_temp_files(folder) -> None:
    # killed after renaming shard 1 but before listing it, and in the middle of two writes
    edit_manifest(folder, drop_last_shard)
    (folder / ".shard-00001.safetensors.tmp-4242").write_bytes(b"half a shard")
    (folder / ".manifest.json.tmp-4242").write_text("{")


def _missing_shard(folder) -> None:
    (folder / "shard-00001.safetensors").unlink()


def _corrupt_shard(folder) -> None:
    flip_last_byte(folder / "shard-00001.safetensors")


@pytest.mark.parametrize("damage", [_unlisted_shard_and_temp_files, _missing_shard, _corrupt_shard])
def test_rerun_repairs_only_what_is_missing(tiny_dir, complete_dir, tmp_path, damage):
    folder = copy_of(complete_dir, tmp_path)
    damage(folder)
    first_inode = (folder / "shard-00000.safetensors").stat().st_ino
    make_teacher_data(tiny_dir, PROMPTS, folder, quiet=True, **SETTINGS)
    assert file_hashes(folder) == file_hashes(complete_dir)
    assert (folder / "shard-00000.safetensors").stat().st_ino == first_inode  # intact shard kept


def test_rerun_of_a_complete_folder_changes_nothing(tiny_dir, complete_dir, tmp_path, capsys):
    folder = copy_of(complete_dir, tmp_path)
    inodes = {p.name: p.stat().st_ino for p in folder.glob("shard-*")}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    parser = add_data_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--model",
            str(tiny_dir),
            "--prompts",
            str(prompts),
            "--resolution",
            "32x48",
            "--output",
            str(folder),
        ]
        + ["--steps", "2", "--seed", "5", "--samples-per-prompt", "2", "--shard-size", "4", "--quiet"]
    )
    assert cmd_distill_data(args) == 0
    out = capsys.readouterr().out
    assert "6 samples of 32x48 px" in out and "0 generated" in out
    assert file_hashes(folder) == file_hashes(complete_dir)
    assert {p.name: p.stat().st_ino for p in folder.glob("shard-*")} == inodes


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(steps=3), "--steps differs: stored 2, given 3"),
        (dict(resolution=32), r"--resolution \(width\) differs: stored 48, given 32"),
        (dict(seed=0), "--seed differs"),
        (dict(shard_size=2), "--shard-size differs"),
        (dict(dtype="bf16"), "--dtype differs: stored 'float32', given 'bfloat16'"),
        (dict(prompts=[*PROMPTS[:2], "another prompt"]), "--prompts differ .*line 3"),
    ],
)
def test_other_settings_are_refused(tiny_dir, complete_dir, change, message):
    before = file_hashes(complete_dir)
    kwargs = {**SETTINGS, "prompts": PROMPTS, **change}
    with pytest.raises(ValueError, match=message) as info:
        make_teacher_data(tiny_dir, kwargs.pop("prompts"), complete_dir, quiet=True, **kwargs)
    assert "another --output" in str(info.value) and "same settings" in str(info.value)
    assert file_hashes(complete_dir) == before


def test_another_model_is_refused(tiny_dir, complete_dir, tmp_path):
    other = shutil.copytree(tiny_dir, tmp_path / "other-model")
    with pytest.raises(ValueError, match="--model differs"):
        make_teacher_data(other, PROMPTS, complete_dir, quiet=True, **SETTINGS)


def test_dataset_refuses_unfinished_and_foreign_folders(complete_dir, tmp_path):
    with pytest.raises(ValueError, match="not a teacher-data folder"):
        TeacherDataset(tmp_path)
    folder = copy_of(complete_dir, tmp_path)
    (folder / "shard-00000.safetensors").unlink()
    with pytest.raises(ValueError, match="shard files missing.*cleardit distill data"):
        TeacherDataset(folder)
    edit_manifest(folder, drop_last_shard)
    with pytest.raises(
        ValueError, match=r"unfinished teacher-data set \(4/6 samples\).*cleardit distill data"
    ):
        TeacherDataset(folder)


def test_verify_detects_a_corrupt_shard(complete_dir, tmp_path):
    folder = copy_of(complete_dir, tmp_path)
    flip_last_byte(folder / "shard-00001.safetensors")
    assert len(TeacherDataset(folder)) == 6  # without verify only the manifest and files are checked
    with pytest.raises(ValueError, match="shard-00001.safetensors does not match its sha256"):
        TeacherDataset(folder, verify=True)


def test_input_errors(tiny_dir, tmp_path, capsys):
    assert parse_resolution("256") == (256, 256) and parse_resolution("256x384") == (256, 384)
    for bad in ("0", "256x", "x256", "big"):
        with pytest.raises(argparse.ArgumentTypeError, match="HEIGHTxWIDTH"):
            parse_resolution(bad)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one prompt\n")
    parser = add_data_arguments(argparse.ArgumentParser())
    argv = ["--model", str(tiny_dir), "--prompts", str(prompts), "--output", str(tmp_path / "out")]
    assert cmd_distill_data(parser.parse_args([*argv, "--resolution", "40"])) == 2
    assert "--resolution 40 is not a multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    with pytest.raises(ValueError, match="is a file"):
        make_teacher_data(tiny_dir, PROMPTS, prompts, resolution=32, quiet=True)
    foreign = tmp_path / "images"
    foreign.mkdir()
    (foreign / "cat.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"already holds other files \(cat.png\)"):
        make_teacher_data(tiny_dir, PROMPTS, foreign, resolution=32, quiet=True)
    with pytest.raises(ValueError, match="--samples-per-prompt must be a whole number >= 1, got 0"):
        make_teacher_data(tiny_dir, PROMPTS, tmp_path / "x", resolution=32, samples_per_prompt=0)

    busy = tmp_path / "busy"
    busy.mkdir()
    fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="in use by another"):
            make_teacher_data(tiny_dir, PROMPTS, busy, resolution=32, steps=1, quiet=True)
    finally:
        os.close(fd)
