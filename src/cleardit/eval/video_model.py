"""``cleardit eval model`` for video families: teacher (full attention) and CLEAR videos of the same
prompts and seeds, compared frame by frame with the image metrics, plus temporal consistency.

Output folder::

    teacher/NNNNN-<prompt>.mp4 (+ .json sidecar, .gif)   full-attention videos
    clear_r8/...                                        CLEAR videos of radius 8
    teacher/frames/NNNNN-FFF.png, clear_r8/frames/...    their frames, what the metrics read
    r8/metrics.json, metrics.md, per_pair.csv           per-frame metrics (means over every frame)
    eval_model.json, eval_model.md                      everything, with temporal consistency

A video whose sidecar already records the same settings is reused, not regenerated.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..video_io import read_video
from ..video_metrics import temporal_psnr
from .images import ImagePair, evaluate_pairs
from .metrics import normalize_metric_names
from .report import atomic_write_text, json_text, write_results

SUMMARY_JSON, SUMMARY_MD = "eval_model.json", "eval_model.md"


@dataclass
class VideoEvalResult:
    """What ``evaluate_model`` measured for a video family: the summary written to
    ``eval_model.json``, the per-frame ``EvalResult`` of each CLEAR setting (by tag, e.g. "r8_rt2"),
    the summary as a markdown table, and the files written."""

    summary: dict
    results: dict
    markdown: str
    files: dict[str, Path] = field(default_factory=dict)


def _fill(
    prompts, folder: Path, wanted: dict, call: dict, generate_fn, log
) -> tuple[list[Path], float | None]:
    """Video i of ``prompts`` as ``folder/NNNNN.mp4``, generated unless its sidecar already records the
    ``wanted`` values (and seed ``wanted["seed"] + i``); returns (the MP4 paths, seconds per generated
    video or None when all were reused)."""
    paths = [folder / f"{i:05d}.mp4" for i in range(len(prompts))]
    todo = []
    for i, path in enumerate(paths):
        sidecar = path.with_suffix(".json")
        old = json.loads(sidecar.read_text()) if sidecar.is_file() and path.is_file() else {}
        want = {**wanted, "prompt": prompts[i], "seed": wanted["seed"] + i}
        if any(old.get(k) != v for k, v in want.items() if v is not None):
            todo.append(i)
    if not todo:
        return paths, None
    log(f"generating {len(todo)} video(s) in {folder}")
    t = time.perf_counter()
    for i in todo:
        generate_fn(prompts[i], output=paths[i], seed=wanted["seed"] + i, **call)
    return paths, (time.perf_counter() - t) / len(todo)


def _frames_as_png(video_path: Path, frames_folder: Path) -> list[Path]:
    """The frames of a video as PNG files (what the image metrics read)."""
    from PIL import Image

    from ..atomic import atomic_write_bytes
    from ..image_grid import png_bytes

    out = []
    for f, frame in enumerate(read_video(video_path)):
        path = frames_folder / f"{video_path.stem}-{f:03d}.png"
        out.append(atomic_write_bytes(path, png_bytes(Image.fromarray(frame))))
    return out


def evaluate_video_model(
    prompts: list[str],
    *,
    model,
    radii: list[int],
    temporal_radius: int | None = None,
    output: str | os.PathLike,
    metrics=None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    device=None,
    dtype=None,
    quiet: bool = False,
    generate_fn=None,
    **metric_options,
) -> VideoEvalResult:
    """Teacher and CLEAR videos of ``prompts`` (seed ``seed + i``), then per-frame metrics of each
    radius against the teacher (means over every frame of every video) and the temporal consistency
    (mean consecutive-frame PSNR) of every video."""
    from ..pipelines import generate
    from ..pipelines.loading import (
        load_pipeline,
        read_model_info,
        resolve_device,
        resolve_dtype,
        resolve_model,
    )

    generate_fn = generate_fn or generate
    started = time.perf_counter()
    log = (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    names = normalize_metric_names(metrics)
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    folder = resolve_model(model)
    info = read_model_info(folder)
    dev = resolve_device(device)
    pipe = load_pipeline(folder, dev, resolve_dtype(dtype, dev), progress=not quiet)  # once for every video
    call = dict(model=pipe, info=info, frames=frames, height=height, width=width, steps=steps, quiet=quiet)
    wanted = dict(seed=seed, frames=frames, height=height, width=width, steps=steps)

    def fill(where: Path, radius: int, rt: int | None):
        return _fill(
            prompts, where, {**wanted, "radius": radius, "temporal_radius": rt},
            {**call, "radius": radius, "temporal_radius": rt}, generate_fn, log,
        )  # fmt: skip

    teacher, teacher_s = fill(out / "teacher", 0, None)
    first = json.loads(teacher[0].with_suffix(".json").read_text())
    teacher_frames = [_frames_as_png(p, out / "teacher" / "frames") for p in teacher]
    temporal_teacher = [temporal_psnr(read_video(p)) for p in teacher]
    results, files = {}, {}
    summary = {
        "model": str(model) if model is not None else first["model"],
        "prompts": {"count": len(prompts)},
        "settings": {
            k: first[k] for k in ("height", "width", "frames", "latent_frames", "steps", "true_cfg", "dtype")
        },
        "metrics": names,
        "teacher": {
            "folder": str((out / "teacher").resolve()),
            "seconds_per_video": teacher_s,
            "attention_flops_per_forward": first["attention_flops_per_step"],
            "temporal_psnr": float(np.mean(temporal_teacher)),
        },
        "clear": [],
    }
    for radius in radii:
        tag = f"r{radius}" + (f"_rt{temporal_radius}" if temporal_radius is not None else "")
        folder = out / f"clear_{tag}"
        videos, seconds = fill(folder, radius, temporal_radius)
        clear_frames = [_frames_as_png(p, folder / "frames") for p in videos]
        pairs = [
            ImagePair(test.stem, ref, test)
            for refs, tests in zip(teacher_frames, clear_frames, strict=True)
            for ref, test in zip(refs, tests, strict=True)
        ]
        log(f"metrics of CLEAR {tag} against full attention ({len(pairs)} frame pairs)")
        result = evaluate_pairs(
            pairs, names, folders=(out / "teacher" / "frames", folder / "frames"), batch_size=batch_size,
            device=device, progress=not quiet, log=log, **metric_options,
        )  # fmt: skip
        meta = json.loads(videos[0].with_suffix(".json").read_text())
        temporal = [temporal_psnr(read_video(p)) for p in videos]
        entry = {
            "label": f"CLEAR r={radius}" + (f", rt={temporal_radius}" if temporal_radius is not None else ""),
            "radius": radius,
            "temporal_radius": temporal_radius,
            "folder": str(folder.resolve()),
            "seconds_per_video": seconds,
            "attention_flops_per_forward": meta["attention_flops_per_step"],
            "flops_fraction": meta["attention_flops_per_step"] / first["attention_flops_per_step"],
            "values": dict(result.values),
            "skipped": dict(result.skipped),
            "temporal_psnr": float(np.mean(temporal)),
            "temporal_psnr_per_video": temporal,
        }
        written = write_results(result, out / tag, extra={k: entry[k] for k in ("radius", "temporal_radius")})
        entry["results"] = str(written["json"].resolve())
        summary["clear"].append(entry)
        results[tag] = result
        files[f"{tag}/metrics.json"] = written["json"]
    summary["seconds"] = round(time.perf_counter() - started, 3)
    markdown = _markdown(summary)
    files["json"] = atomic_write_text(out / SUMMARY_JSON, json_text(summary))
    files["markdown"] = atomic_write_text(out / SUMMARY_MD, markdown)
    return VideoEvalResult(summary, results, markdown, files)


def _markdown(summary: dict) -> str:
    s = summary["settings"]
    lines = [
        f"# eval model (video): {summary['model']}",
        "",
        f"{summary['prompts']['count']} prompts; {s['frames']} frames of {s['height']}x{s['width']} px "
        f"({s['latent_frames']} latent frames), {s['steps']} steps. Metrics are per frame, averaged over "
        "every frame; temporal consistency is the mean PSNR between consecutive frames of each video.",
        "",
        "| attention | FLOPs vs full | temporal PSNR (dB) | " + " | ".join(summary["metrics"]) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in summary["metrics"]) + " |",
        f"| full attention (teacher) | 1 | {summary['teacher']['temporal_psnr']:.2f} | "
        + " | ".join("" for _ in summary["metrics"])
        + " |",
    ]
    for entry in summary["clear"]:
        values = [
            f"{entry['values'][m]:.4f}" if m in entry["values"] else "skipped" for m in summary["metrics"]
        ]
        lines.append(
            f"| {entry['label']} | {entry['flops_fraction']:.4f} | {entry['temporal_psnr']:.2f} | "
            + " | ".join(values)
            + " |"
        )
    return "\n".join(lines) + "\n"
