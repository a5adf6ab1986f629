"""Folders of generated images that survive interruptions (the generation half of ``eval model``).

Image ``i`` of a prompt list is ``FOLDER/{i:05d}.png``, made by :func:`cleardit.pipelines.generate`
from prompt ``i`` with seed ``seed + i``. Each PNG carries its generation parameters (generate's
metadata) plus fingerprints of the model files and of the CLEAR weights file (the model and weights
are identified by their bytes, not by their path or name), the dtype, the device type and the
seconds it took.
:func:`fill_folder` makes only the images whose file is missing or whose parameters differ from the
ones asked for, in chunks saved as each finishes (atomically), so an interrupted run loses at most
one chunk and the next run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BACKEND = "auto"
_FINGERPRINT_BYTES = 1 << 20


def files_fingerprint(location: str | os.PathLike) -> str:
    """A short hash of a file, or of a folder's files: relative path, size, first and last MiB.

    Cheap for a 30 GB model, unchanged by copying elsewhere, and changed by retraining (weight bytes
    differ at the start of every safetensors file's data). Hidden files in a folder are ignored.
    """
    root = Path(location)
    paths = [root] if root.is_file() else sorted(root.rglob("*"))
    base = root.parent if root.is_file() else root
    digest = hashlib.sha256()
    for path in paths:
        rel = path.relative_to(base).as_posix() if path != root else ""
        if any(part.startswith(".") for part in Path(rel).parts) or not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with open(path, "rb") as fh:
            digest.update(fh.read(_FINGERPRINT_BYTES))
            if size > _FINGERPRINT_BYTES:
                fh.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
                digest.update(fh.read())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Settings:
    """What every image of an evaluation shares (all defaults already resolved)."""

    model: str
    fingerprint: str
    height: int
    width: int
    steps: int
    guidance: float | None
    seed: int
    text_len: int
    dtype: str
    device: str
    sigmas: str  # the run's noise levels as generate() writes them (JSON list)
    vae_tiling: bool


@dataclass(frozen=True)
class Attention:
    """The attention of one folder: ``radius`` 0 is full attention (the teacher)."""

    radius: int
    down_factor: int | None = None
    clear_weights: Path | None = None

    @property
    def label(self) -> str:
        if self.radius == 0:
            return "full attention"
        return f"CLEAR r={self.radius}" + (f" df={self.down_factor}" if self.down_factor else "")

    @property
    def tag(self) -> str:
        """Short name for folders: ``r8``, ``r8_df4``."""
        return f"r{self.radius}" + (f"_df{self.down_factor}" if self.down_factor else "")


def expected_parameters(
    settings: Settings, attention: Attention, index: int, prompt: str, weights_fingerprint: str | None
) -> dict:
    """The parameters that decide what image ``index`` looks like; a file is reused only if it
    carries all of them with these values (``weights_fingerprint``: of the attention's CLEAR
    weights file, None without one). Names and paths are left out on purpose: the model and the
    weights are identified by their fingerprints, so moving them does not invalidate images."""
    clear = attention.radius > 0
    values = {
        "prompt": prompt,
        "seed": settings.seed + index,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "height": settings.height,
        "width": settings.width,
        "attention": "clear" if clear else "full",
        "radius": attention.radius,
        "down_factor": attention.down_factor if clear else None,
        "backend": BACKEND if clear else None,
        "max_sequence_length": settings.text_len,
        "highres": False,
        "sigmas": settings.sigmas,
        "vae_tiling": settings.vae_tiling,
        "model_fingerprint": settings.fingerprint,
        "clear_weights_fingerprint": weights_fingerprint if clear else None,
        "dtype": settings.dtype,
        "device": settings.device,
    }
    return json.loads(json.dumps(values))  # the types a PNG's JSON gives back (tuples -> lists ...)


def image_path(folder: str | os.PathLike, index: int) -> Path:
    return Path(folder) / f"{index:05d}.png"


def read_parameters(path: Path) -> dict | None:
    """The ``parameters`` JSON stored in a PNG by ``save_png``; None if absent or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}).get("parameters")
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def matches(parameters: dict | None, expected: dict) -> bool:
    return parameters is not None and all(parameters.get(k) == v for k, v in expected.items())


@dataclass
class FolderReport:
    """What :func:`fill_folder` did: images generated now, images reused, and every image's
    generation seconds (read back from the files of reused images)."""

    folder: Path
    paths: list[Path]
    generated: int = 0
    cached: int = 0
    seconds: list[float] = field(default_factory=list)

    @property
    def seconds_per_image(self) -> float | None:
        return sum(self.seconds) / len(self.seconds) if self.seconds else None


def _runs(indices: list[int], chunk: int) -> list[list[int]]:
    """Consecutive indices grouped into runs of at most ``chunk`` (generate seeds prompts in a row)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < chunk:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def fill_folder(
    pipe,
    info,
    prompts: Sequence[str],
    settings: Settings,
    attention: Attention,
    folder: str | os.PathLike,
    *,
    chunk: int = 8,
    progress: bool = True,
    log: Callable[[str], None] = lambda _msg: None,
    generate_fn: Callable | None = None,
) -> FolderReport:
    """Make sure ``folder`` holds image ``i`` of every prompt with ``settings`` and ``attention``.

    Args:
        pipe, info: a loaded pipeline and its ModelInfo (``generate``'s ``model`` / ``info``).
        chunk: prompts per ``generate`` call; the images of a call are written when it ends.
        generate_fn: ``cleardit.pipelines.generate`` (tests pass a counting wrapper).

    The first ``generate`` call of each ``fill_folder`` call warms up (one untimed 1-step image,
    ``generate``'s ``warmup``), so the recorded seconds exclude one-off compilation and cache filling.
    """
    from tqdm.auto import tqdm

    from ..pipelines.config import GenerateConfig
    from ..pipelines.generate import save_png

    if generate_fn is None:
        from ..pipelines.generate import generate as generate_fn
    if chunk < 1:
        raise ValueError(f"chunk (--batch-size) must be >= 1, got {chunk}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder; move it away or pass another --output")
    report = FolderReport(folder=folder, paths=[image_path(folder, i) for i in range(len(prompts))])
    weights = attention.clear_weights if attention.radius else None
    weights_fp = files_fingerprint(weights) if weights is not None else None
    expected = [expected_parameters(settings, attention, i, p, weights_fp) for i, p in enumerate(prompts)]
    seconds: dict[int, float] = {}
    missing = []
    for i, path in enumerate(report.paths):
        params = read_parameters(path) if path.is_file() else None
        if matches(params, expected[i]):
            report.cached += 1
            if isinstance(params.get("seconds"), (int, float)):
                seconds[i] = float(params["seconds"])
        else:
            missing.append(i)
    log(f"{attention.label}: {report.cached} image(s) already in {folder}, {len(missing)} to generate")
    run_info = dataclasses.replace(info, name=settings.model)  # generate records info.name as "model"
    bar = tqdm(total=len(missing), unit="img", desc=attention.label, disable=not progress or not missing)
    for n, run in enumerate(_runs(missing, chunk)):
        config = GenerateConfig(
            height=settings.height,
            width=settings.width,
            steps=settings.steps,
            guidance=settings.guidance,
            seed=settings.seed + run[0],
            radius=attention.radius,
            down_factor=attention.down_factor if attention.radius else None,
            clear_weights=weights,
            backend=BACKEND,
            warmup=n == 0,
            quiet=True,
        )
        result = generate_fn([prompts[i] for i in run], config, model=pipe, info=run_info)
        per_image = result.seconds / len(run)
        for i, image, meta in zip(run, result.images, result.metadata, strict=True):
            extra = {
                "model_fingerprint": settings.fingerprint,
                "clear_weights_fingerprint": weights_fp,
                "dtype": settings.dtype,
                "device": settings.device,
                "seconds": round(per_image, 6),
            }
            params = json.loads(json.dumps({**meta, **extra}, default=str))
            if not matches(params, expected[i]):
                wrong = {k: (params.get(k), v) for k, v in expected[i].items() if params.get(k) != v}
                raise RuntimeError(
                    f"generate made image {i} with other parameters than asked ({wrong}: made, asked); "
                    "this is a bug in cleardit, please report it"
                )
            save_png(image, report.paths[i], {**meta, **extra})
            seconds[i] = per_image
            report.generated += 1
        bar.update(len(run))
    bar.close()
    report.seconds = [seconds[i] for i in sorted(seconds)]
    return report
