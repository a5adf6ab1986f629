"""Pair two folders of images by file name and run the metrics over them (``cleardit eval images``).

With only the set metrics (FID, IS) asked for, the folders need not pair. Otherwise images pair
by name without extension (``0001.png`` in the reference folder pairs with
``0001.png`` or ``0001.jpg`` in the test folder). Only ``.png``, ``.jpg``, ``.jpeg`` and ``.webp``
files count; hidden files, other files and subfolders are ignored. Every image is read as 8-bit
RGB (an alpha channel is dropped).
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..environment import resolve_device
from ..image_metrics import MS_SSIM_MIN_SIDE
from .metrics import (
    LPIPS_MIN_SIDE,
    SET_METRICS,
    Metric,
    MetricOptions,
    build_metric,
    normalize_metric_names,
)
from .weights import MissingWeightsError, WeightsResolver

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class ImagePair:
    name: str
    ref: Path
    test: Path


def list_images(folder: str | os.PathLike) -> dict[str, Path]:
    """``{name without extension: path}`` of the images directly inside ``folder``."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.stem in found:
            raise ValueError(
                f"two images named {path.stem!r} in {root}: {found[path.stem].name} and {path.name}; "
                "keep one per name so pairs are unambiguous"
            )
        found[path.stem] = path
    if not found:
        raise ValueError(f"no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images in {root}")
    return found


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def pair_folders(ref_dir: str | os.PathLike, test_dir: str | os.PathLike) -> list[ImagePair]:
    """Pairs of the two folders, sorted by name; every image must have a partner."""
    ref, test = list_images(ref_dir), list_images(test_dir)
    only_ref = sorted(set(ref) - set(test))
    only_test = sorted(set(test) - set(ref))
    if only_ref or only_test:
        parts = []
        if only_ref:
            parts.append(f"{len(only_ref)} in {ref_dir} without a partner in {test_dir} ({_names(only_ref)})")
        if only_test:
            parts.append(
                f"{len(only_test)} in {test_dir} without a partner in {ref_dir} ({_names(only_test)})"
            )
        raise ValueError(
            "unpaired images: " + "; ".join(parts) + ". Images pair by file name without extension"
        )
    return [ImagePair(name, ref[name], test[name]) for name in sorted(ref)]


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header; ValueError naming the file if it is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


def check_sizes(pairs: list[ImagePair]) -> list[tuple[int, int]]:
    """(width, height) per pair; ValueError naming both files where a pair's sizes differ."""
    sizes = []
    for pair in pairs:
        a, b = image_size(pair.ref), image_size(pair.test)
        if a != b:
            raise ValueError(
                f"image sizes differ for pair {pair.name!r}: {pair.ref} is {a[0]}x{a[1]}, "
                f"{pair.test} is {b[0]}x{b[1]}; paired metrics need equal sizes"
            )
        sizes.append(a)
    return sizes


def load_image(path: str | os.PathLike) -> Tensor:
    """An image file as uint8 RGB ``[3, H, W]``; ValueError naming the file if it cannot be decoded."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def iter_batches(pairs: list[ImagePair], sizes: list[tuple[int, int]], batch_size: int) -> Iterator:
    """Yields ``(pairs, ref [B,3,H,W] uint8, test [B,3,H,W] uint8)``; a batch holds one image size."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    start = 0
    while start < len(pairs):
        end = start + 1
        while end < len(pairs) and end - start < batch_size and sizes[end] == sizes[start]:
            end += 1
        chunk = pairs[start:end]
        ref = torch.stack([load_image(p.ref) for p in chunk])
        test = torch.stack([load_image(p.test) for p in chunk])
        yield chunk, ref, test
        start = end


@dataclass
class EvalResult:
    """What ``cleardit eval images`` measured.

    ``values``: metric name -> number (``psnr`` may be +inf when pairs are identical);
    ``skipped``: metric name -> the one-line reason; ``per_pair``: pair name -> {metric: value};
    ``meta``: folders, pair count, backend per metric, time.
    """

    values: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    per_pair: dict[str, dict[str, float]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    pairs: list[ImagePair] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.values, "skipped": dict(self.skipped), "meta": dict(self.meta)}


def _set_batches(paths: list[Path], batch_size: int) -> Iterator[Tensor]:
    """uint8 batches of one folder for the set metrics, images of one size per batch."""
    sizes = [image_size(p) for p in paths]
    order = sorted(range(len(paths)), key=lambda i: (sizes[i], i))
    paths = [paths[i] for i in order]
    sizes = [sizes[i] for i in order]
    start = 0
    while start < len(paths):
        end = start + 1
        while end < len(paths) and end - start < batch_size and sizes[end] == sizes[start]:
            end += 1
        yield torch.stack([load_image(p) for p in paths[start:end]])
        start = end


def evaluate_folders(
    ref_dir: str | os.PathLike,
    test_dir: str | os.PathLike,
    metrics: str | list[str] | None = None,
    **options,
) -> EvalResult:
    """Compute the metrics (all of them by default) of ``test_dir`` against ``ref_dir``.

    With any paired metric (psnr, ms_ssim, lpips, clip_i, dino) the folders must pair by file
    name and sizes; with only set metrics (fid, is) they need not (e.g. FID against real photos).
    ``options`` are those of :func:`evaluate_pairs`.
    """
    names = normalize_metric_names(metrics)
    if any(n not in SET_METRICS for n in names):
        return evaluate_pairs(pair_folders(ref_dir, test_dir), names, folders=(ref_dir, test_dir), **options)
    ref_paths = list(list_images(ref_dir).values())
    test_paths = list(list_images(test_dir).values())
    return _evaluate(names, None, (ref_paths, test_paths), (ref_dir, test_dir), **options)


def evaluate_pairs(
    pairs: list[ImagePair],
    metrics: str | list[str] | None = None,
    *,
    folders: tuple[str | os.PathLike, str | os.PathLike] | None = None,
    **options,
) -> EvalResult:
    """The metrics of the given (reference, test) pairs, e.g. a chosen subset of two folders.

    ``folders`` (reference, test) is recorded in ``meta``; default: the folders of the first pair.
    Set metrics (fid, is) use the pairs' reference and test files as the two sets. ``options``:
    ``batch_size`` (8), ``device``, ``weights_dir``, ``strict``, ``clip_model``, ``dino_model``,
    ``is_splits`` (10), ``progress`` (True), ``log`` (print). A metric whose weights are missing, or
    that cannot run on these images (too small, too few), is skipped with a one-line reason in
    ``result.skipped`` (and logged); ``strict`` raises instead.
    """
    if not pairs:
        raise ValueError("no image pairs to evaluate")
    names = normalize_metric_names(metrics)
    folders = folders or (pairs[0].ref.parent, pairs[0].test.parent)
    return _evaluate(names, list(pairs), None, folders, **options)


def _evaluate(
    names: list[str],
    pairs: list[ImagePair] | None,
    sets: tuple[list[Path], list[Path]] | None,
    folders: tuple[str | os.PathLike, str | os.PathLike],
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    weights_dir: str | os.PathLike | None = None,
    strict: bool = False,
    clip_model: str | None = None,
    dino_model: str | None = None,
    is_splits: int = 10,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> EvalResult:
    """Run ``names`` over ``pairs`` (paired and set metrics), or over ``sets`` = (reference paths,
    test paths) when ``pairs`` is None (set metrics only, nothing paired)."""
    from tqdm.auto import tqdm

    say = log or (lambda _msg: None)
    paired = pairs is not None
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if paired:
        sizes = check_sizes(pairs)
        counts = (len(pairs), len(pairs))
        min_side = min(min(s) for s in sizes)
    else:
        pairs, sizes = [], []
        ref_paths, test_paths = sets
        counts = (len(ref_paths), len(test_paths))
        min_side = None
    opts = MetricOptions(
        device=resolve_device(device),
        resolver=WeightsResolver(weights_dir),
        is_splits=is_splits,
        quiet=not progress,
    )
    if clip_model:
        opts.clip_model = clip_model
    if dino_model:
        opts.dino_model = dino_model
    result = EvalResult(pairs=pairs)

    def skip(name: str, reason: str, error: type[Exception] = ValueError) -> None:
        reason = reason.removeprefix(f"{name}: ")
        if strict:
            raise error(f"{name}: {reason} (--strict)")
        result.skipped[name] = reason
        say(f"skipped {name}: {reason}")

    built: list[Metric] = []
    for name in names:
        if name == "ms_ssim" and min_side < MS_SSIM_MIN_SIDE:
            skip(name, f"needs images of at least {MS_SSIM_MIN_SIDE} px per side, the smallest is {min_side}")
            continue
        if name == "lpips" and min_side < LPIPS_MIN_SIDE:
            skip(name, f"needs images of at least {LPIPS_MIN_SIDE} px per side, the smallest is {min_side}")
            continue
        if name in SET_METRICS and min(counts if name == "fid" else counts[1:]) < 2:
            skip(name, f"needs at least 2 images per folder, got {counts[0]} and {counts[1]}")
            continue
        try:
            built.append(build_metric(name, opts))
        except MissingWeightsError as exc:
            skip(name, str(exc), MissingWeightsError)

    started = time.perf_counter()
    if built and paired:
        bar = tqdm(total=len(pairs), unit="pair", desc="eval", disable=not progress)
        for chunk, ref, test in iter_batches(pairs, sizes, batch_size):
            for metric in built:
                vals = metric.update(ref, test)
                if vals is not None:
                    for pair, v in zip(chunk, vals, strict=True):
                        result.per_pair.setdefault(pair.name, {})[metric.name] = v
            bar.update(len(chunk))
        bar.close()
    elif built:
        wants_ref = any(m.name == "fid" for m in built)
        for real, paths in ((True, ref_paths), (False, test_paths)):
            if real and not wants_ref:
                continue
            label = "reference" if real else "test"
            bar = tqdm(total=len(paths), unit="img", desc=f"eval {label}", disable=not progress)
            for images in _set_batches(paths, batch_size):
                for metric in built:
                    metric.update_set(images, real=real)
                bar.update(images.shape[0])
            bar.close()
    for metric in built:
        try:
            result.values.update(metric.compute())
        except ValueError as exc:
            skip(metric.name, str(exc))
    result.meta = {
        "ref": str(Path(folders[0]).resolve()),
        "test": str(Path(folders[1]).resolve()),
        "pairs": len(pairs) if paired else None,
        "images": {"ref": counts[0], "test": counts[1]},
        "metrics": names,
        "backends": {m.name: m.backend for m in built if m.name in result.values},
        "device": str(opts.device),
        "seconds": round(time.perf_counter() - started, 3),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return result
