"""Teacher data for CLEAR distillation (``cleardit distill data``).

The teacher is the pipeline itself with its original full attention. For every sample it denoises
from the sample's own seed and we keep what the student's training step consumes: the final latents
(the transformer's normalised latent space, unpacked to ``[C, H/vae_scale, W/vae_scale]``) and the
encoded text, as the model adapter's ``text_conditions`` (FLUX.1: ``prompt_embeds [L, D]``,
``pooled_prompt_embeds [Dp]``; Chroma: ``prompt_embeds``, ``prompt_attention_mask [L]``). Sample
``i`` uses prompt ``prompts[i // samples_per_prompt]`` and seed ``seed + i``.

On disk (``output/``)::

    manifest.json               settings, prompts, the finished shards and their sha256
    shard-00000.safetensors     latents [n, C, h, w], the text conditions [n, ...],
    shard-00001.safetensors     index [n] (int64)
    ...

Shard ``k`` holds samples ``k * shard_size ...`` up to the next shard. Every file is written to a
temporary name, fsynced and renamed (:mod:`cleardit.atomic`); a shard counts only once the manifest
lists it, so a run killed at any moment and started again deletes the leftovers, regenerates the
missing shards and ends with the same bytes as an uninterrupted run (each sample depends on its
seed only).
``TeacherDataset`` reads a finished folder.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import operator
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_write_bytes, atomic_write_text
from ..prompt_list import prompt_list

FORMAT = "cleardit-teacher-data-v1"
MANIFEST = "manifest.json"
_SHARD_FILE = re.compile(r"^shard-\d{5,}\.safetensors$")
_TEMP_FILE = re.compile(r"^\.(manifest\.json|shard-\d{5,}\.safetensors)\.tmp(-\d+)?$")  # cleardit.atomic
# Settings that must match for a rerun to complete an existing folder (manifest key -> option).
_SETTINGS = {
    "model": "--model",
    "height": "--resolution (height)",
    "width": "--resolution (width)",
    "steps": "--steps",
    "guidance": "--guidance",
    "seed": "--seed",
    "samples_per_prompt": "--samples-per-prompt",
    "shard_size": "--shard-size",
    "dtype": "--dtype",
    "latent_channels": "the model's latent channels",
    "text_len": "the model's text length (max_sequence_length)",
    "prompts": "--prompts",
}


def shard_name(k: int) -> str:
    """File name of shard ``k``: ``shard-00000.safetensors``."""
    return f"shard-{k:05d}.safetensors"


# ----------------------------------------------------------------------------- small checks
def _whole(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"--{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def _resolution(resolution: tuple[int, int] | int) -> tuple[int, int]:
    """(height, width) in pixels from an int (square) or a (height, width) pair."""
    if isinstance(resolution, int) and not isinstance(resolution, bool):
        resolution = (resolution, resolution)
    if not isinstance(resolution, (tuple, list)) or len(resolution) != 2:
        raise ValueError(f"--resolution must be pixels (256) or a (height, width) pair, got {resolution!r}")
    height, width = (_whole("resolution", v, 1) for v in resolution)
    return height, width


def parse_resolution(text: str) -> tuple[int, int]:
    """argparse type of ``--resolution``: ``256`` (square) or ``HEIGHTxWIDTH`` (``256x384``)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not match or int(match.group(1)) < 1 or (match.group(2) is not None and int(match.group(2)) < 1):
        raise argparse.ArgumentTypeError(
            f"expected pixels like 256 or HEIGHTxWIDTH like 256x384, got {text!r}"
        )
    height = int(match.group(1))
    return height, int(match.group(2) or height)


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 on disk unless the pipeline computes in a narrower type (bf16/fp16: kept as is)."""
    return dtype if dtype.is_floating_point and dtype.itemsize < 4 else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- files
def _write_manifest(folder: Path, manifest: dict) -> Path:
    return atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The folder's ``manifest.json`` (None if it has none); a ValueError if it is not teacher data."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path} is not readable JSON ({exc}); delete the folder and generate again"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest; pass another --output folder")
    shards = manifest.get("shards")
    if (
        any(key not in manifest for key in (*_SETTINGS, "total", "complete"))
        or not isinstance(shards, list)
        or any(not isinstance(e, dict) or not {"file", "indices", "sha256"} <= e.keys() for e in shards)
    ):
        raise ValueError(
            f"{path} lacks fields of a {FORMAT} manifest (damaged); delete the folder and generate again"
        )
    return manifest


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold an advisory lock on ``folder`` so two runs never write the same files."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"--output {folder} is in use by another `cleardit distill data` run; wait for it to "
                "finish or pass another --output"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _prepare_folder(folder: Path) -> None:
    """Create ``folder``; refuse a file, or a folder holding anything but teacher-data files."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {folder} is a file; pass a folder for the teacher data")
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / MANIFEST).exists():
        return
    foreign = sorted(
        p.name for p in folder.iterdir() if not (_SHARD_FILE.match(p.name) or _TEMP_FILE.match(p.name))
    )
    if foreign:
        raise ValueError(
            f"--output {folder} already holds other files ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}) and no {MANIFEST}; pass a new or empty folder"
        )


def _check_settings(stored: dict, wanted: dict, folder: Path) -> None:
    """A ValueError naming the first setting of ``wanted`` that differs from the folder's manifest."""
    for key, value in wanted.items():
        if key not in _SETTINGS or stored.get(key) == value:
            continue
        if key == "prompts":
            old = stored.get("prompts") or []
            differing = (i for i, (a, b) in enumerate(zip(old, value, strict=False)) if a != b)
            first = next(differing, min(len(old), len(value)))
            detail = (
                f"--prompts differ ({len(old)} stored, {len(value)} given; "
                f"first difference at line {first + 1})"
            )
        else:
            detail = f"{_SETTINGS[key]} differs: stored {stored.get(key)!r}, given {value!r}"
        raise ValueError(
            f"--output {folder} holds teacher data made with other settings: {detail}. Rerun with the "
            "same settings to complete it, or pass another --output"
        )


def _tidy(folder: Path, manifest: dict, log) -> None:
    """Delete temp files and shards the manifest does not list (a run killed before listing them)."""
    listed = {entry["file"] for entry in manifest["shards"]}
    for path in sorted(folder.iterdir()):
        if _TEMP_FILE.match(path.name) or (_SHARD_FILE.match(path.name) and path.name not in listed):
            log(f"removing {path.name} (left by an interrupted run)")
            path.unlink()


def _keep_intact(folder: Path, manifest: dict, log) -> None:
    """Drop manifest entries whose file is missing or fails its sha256 (they are generated again)."""
    intact = []
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        if not path.is_file():
            log(f"{entry['file']} is missing; generating it again")
        elif _sha256(path) != entry["sha256"]:
            log(f"{entry['file']} does not match its sha256 (corrupt); generating it again")
            path.unlink()
        else:
            intact.append(entry)
    manifest["shards"] = intact


# ----------------------------------------------------------------------------- generation
@dataclass
class _Teacher:
    """A loaded pipeline and the resolved generation settings."""

    pipe: object
    adapter: object
    height: int
    width: int
    steps: int
    guidance: float | None
    true_cfg: float
    text_len: int
    dtype: torch.dtype  # storage dtype
    frames: int | None = None  # video families: frames of each video

    @torch.no_grad()
    def embed(self, prompt: str) -> dict[str, torch.Tensor]:
        """One prompt's text conditions (the adapter's ``text_conditions``, no batch dimension)."""
        return self.adapter.encode_text(self.pipe, prompt, self.text_len)

    def latents(self, text: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
        """Final denoised latents of one seed, unpacked: [C, H / vae_scale, W / vae_scale] (a video:
        [C, latent frames, H / vae_scale, W / vae_scale])."""
        pipe, adapter = self.pipe, self.adapter
        video = {} if self.frames is None else {"num_frames": self.frames}
        out = adapter.run_pipeline(
            pipe,
            **video,
            **{name: t[None] for name, t in text.items()},
            **adapter.call_options(self.guidance, self.true_cfg, "", self.text_len),
            height=self.height,
            width=self.width,
            num_inference_steps=self.steps,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
        )
        packed = out.frames if self.frames is not None else out.images  # video pipelines return frames
        return adapter.unpack_latents(pipe, packed, (self.height, self.width))[0]


def _shard_bytes(rows: list[dict[str, torch.Tensor]], indices: list[int], dtype) -> bytes:
    """One shard as safetensors bytes from per-sample rows (``latents`` and the text conditions).

    Floating-point tensors are stored in ``dtype``; others (masks) as they are."""
    from safetensors.torch import save

    def stack(name: str) -> torch.Tensor:
        parts = [row[name].to("cpu") for row in rows]
        parts = [t.to(dtype) if t.is_floating_point() else t for t in parts]
        return torch.stack(parts).contiguous()

    tensors = {name: stack(name) for name in rows[0]}
    tensors["index"] = torch.tensor(indices, dtype=torch.int64)
    return save(tensors, metadata={"format": FORMAT})


@dataclass
class RunStats:
    """What one ``make_teacher_data`` call did: the manifest, samples generated now and the seconds
    that took (model loading excluded)."""

    manifest: Path
    total: int
    generated: int
    seconds: float


def make_teacher_data(
    model,
    prompts: list[str],
    output: str | os.PathLike,
    *,
    resolution: tuple[int, int] | int,
    steps: int | None = None,
    guidance: float | None = None,
    true_cfg: float | None = None,
    seed: int = 0,
    samples_per_prompt: int = 1,
    shard_size: int = 16,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quiet: bool = False,
    frames: int | None = None,
) -> Path:
    """Generate (or finish) a teacher-data folder; returns the path of its ``manifest.json``.

    Args:
        model: None (the shipped mini model), a diffusers pipeline folder of a supported family, a
            Hugging Face id in the local cache, or a loaded pipeline (used as it is; must not be
            linearized).
        prompts: the prompts; sample ``i`` uses ``prompts[i // samples_per_prompt]`` and seed ``seed + i``.
        output: the folder. If it holds a manifest, the run completes it (same settings required):
            it deletes temp files and shards the manifest does not list, regenerates listed shards
            that are missing or fail their sha256, and generates the shards not yet made.
        resolution: pixels, ``256`` or ``(height, width)``; multiples of the pipeline's size factor.
        steps, guidance, true_cfg: teacher denoising steps, distilled guidance and classifier-free
            guidance scale (against the empty prompt); defaults as ``cleardit generate``'s: the
            model's cleardit.json, else the family's (FLUX.1: 28 / 3.5 / 1 = off; Chroma: 35 / none /
            5).
        samples_per_prompt: samples (seeds) per prompt.
        shard_size: samples per shard file.
        device, dtype: default CUDA + bfloat16 when a GPU is visible, else CPU + float32. Tensors are
            stored in float32, or in the pipeline's dtype when that is narrower (bf16, fp16).
        quiet: no progress bar or log lines.
        frames: video families: frames of each teacher video (default the family's); the stored
            latents are then [C, latent frames, h, w].

    Raises:
        ValueError: bad settings, or ``output`` holds data made with other settings.
    """
    return _run(
        model,
        prompts,
        output,
        resolution=resolution,
        steps=steps,
        guidance=guidance,
        true_cfg=true_cfg,
        seed=seed,
        samples_per_prompt=samples_per_prompt,
        shard_size=shard_size,
        device=device,
        dtype=dtype,
        quiet=quiet,
        frames=frames,
    ).manifest


def _run(
    model,
    prompts,
    output,
    *,
    resolution,
    steps,
    guidance,
    seed,
    samples_per_prompt,
    shard_size,
    device,
    dtype,
    quiet,
    true_cfg=None,
    frames=None,
) -> RunStats:
    """``make_teacher_data``, returning RunStats (the CLI prints them)."""
    from tqdm.auto import tqdm

    from ..models import adapter_for, get_handle
    from ..pipelines import highres as hr
    from ..pipelines.loading import (
        ModelInfo,
        folder_adapter,
        load_pipeline,
        max_sequence_length,
        read_model_info,
        resolve_device,
        resolve_dtype,
        resolve_model,
        size_factor,
        size_factor_of_folder,
    )
    from ..pipelines.plan import resolve_guidance, resolve_true_cfg

    prompts = prompt_list(prompts, one_line=True)
    height, width = _resolution(resolution)
    _whole("seed", seed, 0)
    _whole("samples-per-prompt", samples_per_prompt, 1)
    _whole("shard-size", shard_size, 1)
    if steps is not None:
        _whole("steps", steps, 1)
    if frames is not None:
        _whole("frames", frames, 1)
    if guidance is not None and (isinstance(guidance, bool) or not math.isfinite(float(guidance))):
        raise ValueError(f"--guidance must be a finite number, got {guidance!r}")
    log = (lambda msg: None) if quiet else (lambda msg: tqdm.write(msg, file=sys.stderr))
    folder = Path(output).expanduser()
    total = len(prompts) * samples_per_prompt

    # -- settings known before loading: a mismatch is reported before gigabytes are read ----------
    path = None
    if model is None or isinstance(model, (str, os.PathLike)):
        path = resolve_model(model)
        info = read_model_info(path)
        text = os.fspath(model) if model is not None else None
        name = text if text is not None and not Path(text).expanduser().exists() else str(path.resolve())
        factor = size_factor_of_folder(path)
        if factor is not None:
            hr.check_size(height, factor, "resolution")
            hr.check_size(width, factor, "resolution")
        adapter = folder_adapter(path)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
    else:
        if not hasattr(model, "transformer") or not hasattr(model, "encode_prompt"):
            raise TypeError(
                f"model must be a path, a Hugging Face id or a diffusers pipeline, got {type(model).__name__}"
            )
        info = ModelInfo()
        adapter = adapter_for(model)
        name = getattr(model, "name_or_path", None) or type(model).__name__
        if device is not None or dtype is not None:
            dev = resolve_device(device) if device is not None else model._execution_device
            model.to(dev, resolve_dtype(dtype, dev) if dtype is not None else model.transformer.dtype)
        dt = model.transformer.dtype
    steps = steps or info.default_steps or adapter.default_steps
    guidance = resolve_guidance(guidance, info, adapter)
    true_cfg = resolve_true_cfg(true_cfg, info, adapter)
    settings = {
        "format": FORMAT,
        "model": name,
        "height": height,
        "width": width,
        "steps": steps,
        "guidance": float(guidance) if guidance is not None else None,
        "seed": seed,
        "samples_per_prompt": samples_per_prompt,
        "shard_size": shard_size,
        "total": total,
        "dtype": _dtype_name(_store_dtype(dt)),
    }
    if true_cfg > 1:  # recorded only when on, so folders made before this option still resume
        settings["true_cfg"] = float(true_cfg)
    if adapter.video:  # videos only, for the same reason
        settings["frames"] = frames = frames or adapter.default_frames
    elif frames is not None:
        raise ValueError(f"--frames {frames}: {adapter.family} models make images, not videos; drop --frames")
    _prepare_folder(folder)
    with _exclusive(folder):
        manifest = read_manifest(folder)
        if manifest is not None:
            _check_settings(manifest, {**settings, "prompts": prompts}, folder)

        # -- the teacher ---------------------------------------------------------------------------
        if path is not None:
            log(f"loading {path} on {dev} ({_dtype_name(dt)})")
            pipe = load_pipeline(path, dev, dt, progress=not quiet)
        else:
            pipe = model
        if get_handle(pipe.transformer) is not None:
            raise ValueError(
                "the pipeline's transformer is linearized; the teacher runs the original full attention "
                "(call handle.restore() first)"
            )
        factor = size_factor(pipe)
        hr.check_size(height, factor, "resolution")
        hr.check_size(width, factor, "resolution")
        teacher = _Teacher(
            pipe,
            adapter,
            height,
            width,
            steps,
            guidance,
            float(true_cfg),
            max_sequence_length(pipe, info),
            _store_dtype(dt),
            adapter.check_frames(pipe, frames) if frames is not None else None,
        )
        settings["latent_channels"] = adapter.latent_channels(pipe.transformer)
        settings["text_len"] = teacher.text_len
        if manifest is not None:
            _check_settings(manifest, settings, folder)
            _tidy(folder, manifest, log)
            _keep_intact(folder, manifest, log)
        else:
            _tidy(folder, {"shards": []}, log)
        n_shards = math.ceil(total / shard_size)
        manifest = {**settings, "prompts": prompts, "shards": manifest["shards"] if manifest else []}
        manifest["complete"] = len(manifest["shards"]) == n_shards
        manifest_path = _write_manifest(folder, manifest)

        # -- the missing shards ----------------------------------------------------------------------
        listed = {entry["file"] for entry in manifest["shards"]}
        todo = [k for k in range(n_shards) if shard_name(k) not in listed]
        done = sum(len(entry["indices"]) for entry in manifest["shards"])
        if done:
            log(f"resuming {folder}: {done}/{total} samples already there")
        config = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(disable=True)
        generated, t0 = 0, time.perf_counter()
        cached: tuple[int, dict[str, torch.Tensor]] | None = None
        try:
            with tqdm(
                total=total,
                initial=done,
                unit="sample",
                desc="teacher data",
                disable=quiet,
                dynamic_ncols=True,
            ) as bar:
                for k in todo:
                    indices = list(range(k * shard_size, min(total, (k + 1) * shard_size)))
                    rows = []
                    for i in indices:
                        p = i // samples_per_prompt
                        if cached is None or cached[0] != p:
                            cached = (p, teacher.embed(prompts[p]))
                        text = cached[1]
                        rows.append({"latents": teacher.latents(text, seed + i), **text})
                        generated += 1
                        bar.update(1)
                    data = _shard_bytes(rows, indices, teacher.dtype)
                    atomic_write_bytes(folder / shard_name(k), data)
                    entry = {
                        "file": shard_name(k),
                        "indices": indices,
                        "sha256": hashlib.sha256(data).hexdigest(),
                    }
                    manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda e: e["file"])
                    manifest["complete"] = len(manifest["shards"]) == n_shards
                    _write_manifest(folder, manifest)
        finally:
            pipe.set_progress_bar_config(**config)
    return RunStats(manifest_path, total, generated, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- reading
class TeacherDataset(torch.utils.data.Dataset):
    """A finished teacher-data folder as a map-style dataset.

    ``dataset[i]`` is a dict: ``latents`` [C, H/vae_scale, W/vae_scale], the text conditions
    (FLUX.1: ``prompt_embeds`` [L, D], ``pooled_prompt_embeds`` [Dp]; floating point in the stored
    dtype, see ``manifest["dtype"]``), ``index`` (i),
    ``seed`` and ``prompt`` (str). Shards load on first use; the shard in use stays cached.

    Args:
        folder: written by ``make_teacher_data`` / ``cleardit distill data``.
        verify: also check every shard's sha256 against the manifest (reads every file once).

    Raises:
        ValueError: not a teacher-data folder, unfinished, files missing, or (verify) corrupt.
    """

    def __init__(self, folder: str | os.PathLike, *, verify: bool = False):
        self.folder = Path(folder)
        again = (
            f"run `cleardit distill data --output {self.folder}` again with the same settings to finish it"
        )
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise ValueError(
                f"{self.folder} is not a teacher-data folder (no {MANIFEST}); make one with "
                f"`cleardit distill data --output {self.folder} ...`"
            )
        total = int(manifest["total"])
        present = sum(len(entry["indices"]) for entry in manifest["shards"])
        if not manifest.get("complete"):
            raise ValueError(
                f"{self.folder} holds an unfinished teacher-data set ({present}/{total} samples); {again}"
            )
        missing = [
            entry["file"] for entry in manifest["shards"] if not (self.folder / entry["file"]).is_file()
        ]
        if missing:
            raise ValueError(f"{self.folder}: shard files missing ({', '.join(missing)}); {again}")
        self._where: dict[int, tuple[int, int]] = {}
        for s, entry in enumerate(manifest["shards"]):
            for row, i in enumerate(entry["indices"]):
                self._where[int(i)] = (s, row)
        if sorted(self._where) != list(range(total)) or present != total:
            raise ValueError(
                f"{self.folder}/{MANIFEST} does not list every sample 0..{total - 1} exactly once; "
                "generate the folder again"
            )
        if verify:
            for entry in manifest["shards"]:
                if _sha256(self.folder / entry["file"]) != entry["sha256"]:
                    raise ValueError(
                        f"{self.folder / entry['file']} does not match its sha256 in {MANIFEST} (corrupt); "
                        f"delete that file and {again}"
                    )
        self._manifest = manifest
        self._cache: tuple[int, dict[str, torch.Tensor]] | None = None

    @property
    def manifest(self) -> dict:
        """The parsed ``manifest.json`` (settings, prompts, shards)."""
        return self._manifest

    @property
    def height(self) -> int:
        """Image height in pixels the teacher generated at."""
        return int(self._manifest["height"])

    @property
    def width(self) -> int:
        """Image width in pixels the teacher generated at."""
        return int(self._manifest["width"])

    def __len__(self) -> int:
        return int(self._manifest["total"])

    def __getstate__(self) -> dict:  # DataLoader workers: do not copy the cached shard
        return {**self.__dict__, "_cache": None}

    def _shard(self, s: int) -> dict[str, torch.Tensor]:
        if self._cache is None or self._cache[0] != s:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            entry = self._manifest["shards"][s]
            path = self.folder / entry["file"]
            try:
                tensors = load_file(str(path))
            except (OSError, SafetensorError) as exc:
                raise ValueError(f"{path} is not a readable shard ({exc}); delete it and regenerate") from exc
            if tensors.get("index") is None or tensors["index"].tolist() != list(entry["indices"]):
                raise ValueError(
                    f"{path} does not hold the samples {MANIFEST} lists; delete it and regenerate"
                )
            self._cache = (s, tensors)
        return self._cache[1]

    def __getitem__(self, i: int) -> dict:
        i, n = operator.index(i), len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        i %= n
        s, row = self._where[i]
        tensors = self._shard(s)
        m = self._manifest
        return {
            **{name: t[row].clone() for name, t in tensors.items() if name != "index"},
            "index": i,
            "seed": int(m["seed"]) + i,
            "prompt": m["prompts"][i // int(m["samples_per_prompt"])],
        }


# ----------------------------------------------------------------------------- command line
def add_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``cleardit distill data`` to ``parser``; returns it."""
    from ..argtypes import nonneg_int, positive_int
    from ..cli_options import add_device_option, add_dtype_option, add_model_option

    add_model_option(parser, role="the teacher")
    parser.add_argument("--prompts", metavar="FILE", required=True, help="a text file, one prompt per line")
    parser.add_argument(
        "--resolution",
        type=parse_resolution,
        required=True,
        metavar="R",
        help="training resolution in pixels: 256 or HEIGHTxWIDTH (256x384)",
    )
    parser.add_argument(
        "--output", metavar="DIR", required=True, help="the dataset folder (a rerun completes it)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="teacher steps (default: the model's, else 28)"
    )
    parser.add_argument(
        "--guidance", type=float, default=None, help="distilled guidance (default: the model's, else 3.5)"
    )
    parser.add_argument(
        "--true-cfg",
        type=float,
        default=None,
        metavar="SCALE",
        help="classifier-free guidance of the teacher against the empty prompt (default: the model's; "
        "1 = off for FLUX.1, 5 for Chroma)",
    )
    parser.add_argument(
        "--frames",
        type=positive_int,
        default=None,
        help="video families: frames per teacher video (default the family's: 81 for Wan)",
    )
    parser.add_argument("--seed", type=nonneg_int, default=0, help="seed of sample 0; sample i uses seed + i")
    parser.add_argument(
        "--samples-per-prompt", type=positive_int, default=1, help="seeds per prompt (default 1)"
    )
    parser.add_argument(
        "--shard-size", type=positive_int, default=16, help="samples per shard file (default 16)"
    )
    add_device_option(parser)
    add_dtype_option(parser)
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar or log lines (the summary still prints)"
    )
    return parser


def cmd_distill_data(args: argparse.Namespace) -> int:
    """Run ``cleardit distill data``; 0 when the folder is complete, 2 on a user error."""
    from ..pipelines.loading import ModelNotFoundError
    from ..prompt_list import read_prompts

    try:
        prompts = read_prompts(args.prompts)
        stats = _run(
            args.model,
            prompts,
            args.output,
            resolution=args.resolution,
            steps=args.steps,
            guidance=args.guidance,
            true_cfg=args.true_cfg,
            seed=args.seed,
            samples_per_prompt=args.samples_per_prompt,
            shard_size=args.shard_size,
            device=args.device,
            dtype=args.dtype,
            quiet=args.quiet,
            frames=args.frames,
        )
    except (ModelNotFoundError, ValueError, TypeError) as exc:
        print(f"cleardit distill data: error: {exc}", file=sys.stderr)
        return 2
    m = json.loads(stats.manifest.read_text(encoding="utf-8"))
    rate = f" ({stats.seconds / stats.generated:.2f} s/sample)" if stats.generated else ""
    shards = f"{len(m['shards'])} shard" + ("s" if len(m["shards"]) != 1 else "")
    guidance = "no distilled guidance" if m["guidance"] is None else f"guidance {m['guidance']:g}"
    size = f"{m['height']}x{m['width']} px" + (f" x {m['frames']} frames" if m.get("frames") else "")
    print(
        f"teacher data: {stats.total} samples of {size} ({m['steps']} steps, "
        f"{guidance}, {m['dtype']}) in {shards}; "
        f"{stats.generated} generated in {stats.seconds:.1f} s{rate} -> {stats.manifest}"
    )
    return 0


__all__ = [
    "FORMAT",
    "RunStats",
    "TeacherDataset",
    "add_data_arguments",
    "cmd_distill_data",
    "make_teacher_data",
    "parse_resolution",
    "read_manifest",
    "shard_name",
]
