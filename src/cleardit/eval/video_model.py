"""``cleardit eval model`` for video families: teacher (full attention) and CLEAR videos of the same
prompts and seeds, compared frame by frame with the image metrics, plus temporal consistency.

Output folder::

    teacher/NNNNN.mp4 (+ .json sidecar, .gif)     full-attention videos (to watch)
    teacher/frames/NNNNN-FFF.png                  their frames as generated (what the metrics read)
    teacher/settings.json                         what every video of the folder was made with
    clear_r8/...                                  the same for CLEAR r=8 (``clear_r8_rt2``: rt=2)
    r8/metrics.json, metrics.md, per_pair.csv     per-frame metrics (means over every frame)
    eval_model.json, eval_model.md                everything, with temporal consistency

The metrics read the frames the pipeline made (lossless PNGs), never frames decoded from the MP4s.
A folder whose ``settings.json`` records other settings (model files, CLEAR weights, size, frames,
steps, guidance, dtype, ...) is made anew; otherwise a video is reused when its sidecar has the same
prompt and seed and its frames are there.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..video_metrics import temporal_psnr
from .generation import Attention, files_fingerprint
from .images import ImagePair, evaluate_pairs
from .report import atomic_write_text, json_text, write_results

SUMMARY_JSON, SUMMARY_MD = "eval_model.json", "eval_model.md"
SETTINGS_JSON = "settings.json"
# the resolved generation settings a folder's videos must share (keys of generate's sidecars)
SHARED_KEYS = (
    "height", "width", "frames", "steps", "guidance", "true_cfg", "radius", "temporal_radius",
    "down_factor", "dtype",
)  # fmt: skip


@dataclass
class VideoEvalResult:
    """What ``evaluate_model`` measured for a video family: the summary written to
    ``eval_model.json``, the per-frame ``EvalResult`` of each CLEAR setting (by tag, e.g. "r8_rt2"),
    the summary as a markdown table, and the files written."""

    summary: dict
    results: dict
    markdown: str
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class _Folder:
    """One attention setting's videos: their frame PNGs, temporal consistency, generation time."""

    path: Path
    frames: list[list[Path]]
    temporal: list[float | None]
    seconds_per_video: float | None
    settings: dict


def _png(frame: np.ndarray, path: Path) -> Path:
    from PIL import Image

    from ..atomic import atomic_write_bytes
    from ..image_grid import png_bytes

    return atomic_write_bytes(path, png_bytes(Image.fromarray(frame)))


def _read_frames(paths: list[Path]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def _fill(prompts, folder: Path, settings: dict, seed: int, generate, log) -> _Folder:
    """Every video of ``prompts`` in ``folder`` with ``settings`` (resolved, with fingerprints),
    generating what is missing or was made otherwise. ``generate(prompt, output=, seed=)`` makes one."""
    record = folder / SETTINGS_JSON
    if record.is_file() and json.loads(record.read_text()) != settings:
        log(f"{folder} was made with other settings: making its videos again")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json_text(settings))
    frames_of, made, seconds = [], 0, 0.0
    for i, prompt in enumerate(prompts):
        video = folder / f"{i:05d}.mp4"
        sidecar = video.with_suffix(".json")
        frames = [folder / "frames" / f"{i:05d}-{f:03d}.png" for f in range(settings["frames"])]
        old = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        if old.get("prompt") != prompt or old.get("seed") != seed + i or not all(p.is_file() for p in frames):
            t = time.perf_counter()
            result = generate(prompt, output=video, seed=seed + i)
            seconds += time.perf_counter() - t
            made += 1
            for frame, path in zip(result.videos[0], frames, strict=True):
                _png(frame, path)
        frames_of.append(frames)
    if made:
        log(f"made {made} video(s) in {folder}")
    temporal = [temporal_psnr(_read_frames(f)) for f in frames_of]
    return _Folder(folder, frames_of, temporal, seconds / made if made else None, settings)


def _mean(values: list[float | None]) -> float | None:
    return None if not values or None in values else float(np.mean(values))


def evaluate_video_model(
    prompts: list[str],
    *,
    folder: Path,
    info,
    attentions: list[Attention],
    temporal_radius: int | None = None,
    output: Path,
    metrics: list[str],
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
    """Teacher and CLEAR videos of ``prompts`` (prompt i: seed ``seed + i``) from the model in
    ``folder``, one CLEAR folder per ``attentions`` entry (its radius, down factor and weights, all
    with ``temporal_radius``), then the metrics of each against the teacher over every frame pair and
    the temporal consistency (consecutive-frame PSNR) of every video."""
    from ..pipelines import GenerateConfig, generate
    from ..pipelines.loading import load_pipeline, resolve_device, resolve_dtype
    from ..pipelines.video import plan_video

    generate_fn = generate_fn or generate
    started = time.perf_counter()
    log = (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    output.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    pipe = load_pipeline(folder, dev, resolve_dtype(dtype, dev), progress=not quiet)  # once for all videos
    model_fingerprint = files_fingerprint(folder)

    def run(where: Path, attention: Attention, rt: int | None) -> _Folder:
        config = GenerateConfig(
            frames=frames, height=height, width=width, steps=steps, radius=attention.radius,
            down_factor=attention.down_factor, clear_weights=attention.clear_weights,
            temporal_radius=rt, quiet=quiet,
        )  # fmt: skip
        plan = plan_video(prompts, config, pipe, info, lambda _msg: None)  # the settings, resolved
        meta = plan.metadata(0, attention.radius > 0)
        settings = {k: meta[k] for k in SHARED_KEYS}
        settings.update(
            model_fingerprint=model_fingerprint,
            weights_fingerprint=files_fingerprint(attention.clear_weights)
            if attention.clear_weights
            else None,
            attention_flops_per_forward=meta["attention_flops_per_forward"],
        )

        def one(prompt, output, seed):
            return generate_fn(prompt, config.replace(seed=seed, output=output), model=pipe, info=info)

        return _fill(prompts, where, settings, seed, one, log)

    teacher = run(output / "teacher", Attention(0), None)
    s = teacher.settings
    summary = {
        "model": str(folder),
        "model_fingerprint": model_fingerprint,
        "prompts": {"count": len(prompts)},
        "settings": {k: s[k] for k in ("height", "width", "frames", "steps", "true_cfg", "dtype")},
        "metrics": metrics,
        "teacher": {
            "folder": str(teacher.path.resolve()),
            "seconds_per_video": teacher.seconds_per_video,
            "attention_flops_per_forward": s["attention_flops_per_forward"],
            "temporal_psnr": _mean(teacher.temporal),
        },
        "clear": [],
    }
    results, files = {}, {}
    for attention in attentions:
        tag = attention.tag + (f"_rt{temporal_radius}" if temporal_radius is not None else "")
        clear = run(output / f"clear_{tag}", attention, temporal_radius)
        pairs = [
            ImagePair(test.stem, ref, test)
            for refs, tests in zip(teacher.frames, clear.frames, strict=True)
            for ref, test in zip(refs, tests, strict=True)
        ]
        log(f"metrics of CLEAR {tag} against full attention ({len(pairs)} frame pairs)")
        result = evaluate_pairs(
            pairs, metrics, folders=(teacher.path / "frames", clear.path / "frames"), batch_size=batch_size,
            device=device, progress=not quiet, log=log, **metric_options,
        )  # fmt: skip
        flops = clear.settings["attention_flops_per_forward"]
        entry = {
            "label": attention.label + (f", rt={temporal_radius}" if temporal_radius is not None else ""),
            "radius": attention.radius,
            "temporal_radius": temporal_radius,
            "down_factor": attention.down_factor,
            "clear_weights": str(attention.clear_weights) if attention.clear_weights else None,
            "folder": str(clear.path.resolve()),
            "seconds_per_video": clear.seconds_per_video,
            "attention_flops_per_forward": flops,
            "flops_fraction": flops / s["attention_flops_per_forward"],
            "values": dict(result.values),
            "skipped": dict(result.skipped),
            "temporal_psnr": _mean(clear.temporal),
            "temporal_psnr_per_video": clear.temporal,
        }
        written = write_results(
            result, output / tag, extra={k: entry[k] for k in ("radius", "temporal_radius")}
        )
        entry["results"] = str(written["json"].resolve())
        summary["clear"].append(entry)
        results[tag] = result
        files[f"{tag}/metrics.json"] = written["json"]
    summary["seconds"] = round(time.perf_counter() - started, 3)
    markdown = _markdown(summary)
    files["json"] = atomic_write_text(output / SUMMARY_JSON, json_text(summary))
    files["markdown"] = atomic_write_text(output / SUMMARY_MD, markdown)
    return VideoEvalResult(summary, results, markdown, files)


def _db(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _markdown(summary: dict) -> str:
    s, names = summary["settings"], summary["metrics"]
    lines = [
        f"# eval model (video): {summary['model']}",
        "",
        f"{summary['prompts']['count']} prompts; {s['frames']} frames of {s['height']}x{s['width']} px, "
        f"{s['steps']} steps. Metrics compare each CLEAR frame with the same teacher frame, averaged over "
        "every frame; temporal consistency is the PSNR between consecutive frames of each video (n/a for "
        "one-frame videos).",
        "",
        "| attention | FLOPs vs full | temporal PSNR (dB) | " + " | ".join(names) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |",
        f"| full attention (teacher) | 1 | {_db(summary['teacher']['temporal_psnr'])} | "
        + " | ".join("" for _ in names)
        + " |",
    ]
    for entry in summary["clear"]:
        values = [f"{entry['values'][m]:.4f}" if m in entry["values"] else "skipped" for m in names]
        lines.append(
            f"| {entry['label']} | {entry['flops_fraction']:.4f} | {_db(entry['temporal_psnr'])} | "
            + " | ".join(values)
            + " |"
        )
    return "\n".join(lines) + "\n"
