"""``cleardit eval model``: teacher (full attention) and CLEAR images of the same prompts and seeds,
then the image metrics of each CLEAR radius against the teacher, with attention FLOPs and time.

Output folder (``output``)::

    prompts.txt            the prompts of this run, one per line
    teacher/00000.png ...  full attention, prompt i with seed ``seed + i``
    clear_r8/00000.png ... CLEAR radius 8 (``clear_r8_df4`` with a pooled branch), same seeds
    r8/metrics.json ...    ``eval images``' files for radius 8 (``metrics.md``, ``per_pair.csv``)
    eval_model.json        everything: settings, per radius metrics, skipped metrics, FLOPs, time
    eval_model.md          the table
    metrics_vs_radius.png  with two or more radii

Images already present with the same generation parameters are reused (:mod:`.generation`), so a
rerun with more radii, more prompts or after an interruption only makes what is missing.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DEFAULT_RADIUS
from .generation import Attention, FolderReport, Settings, files_fingerprint, fill_folder
from .images import EvalResult, ImagePair, evaluate_pairs
from .metrics import normalize_metric_names
from .report import atomic_write_text, json_text, plot_metrics_vs_radius, write_results

DEFAULT_OUTPUT = "outputs/eval-model"
SUMMARY_JSON, SUMMARY_MD, PLOT_PNG = "eval_model.json", "eval_model.md", "metrics_vs_radius.png"


# ----------------------------------------------------------------------------- inputs
def _prompt_list(prompts, limit: int | None) -> tuple[list[str], str]:
    """(prompts, where they came from): a file path, a list of strings, or None (bundled list)."""
    from ..prompt_list import prompt_list
    from .prompts import bundled_prompts_path, load_prompts

    if prompts is None or isinstance(prompts, (str, os.PathLike)):
        items = load_prompts(prompts)
        source = str(prompts) if prompts is not None else f"the bundled list ({bundled_prompts_path()})"
    else:
        items = prompt_list(prompts, one_line=True)
        source = "a list given in Python"
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"--limit must be a whole number >= 1, got {limit!r}")
        items = items[:limit]
    return items, source


def _declared_radius(path: Path) -> tuple[int | None, int | None, bool]:
    """(radius, down_factor, known) a CLEAR weights file was made for."""
    from safetensors import safe_open

    from ..weights import declared_geometry

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors has its own error types for corrupt files
        raise ValueError(f"--clear-weights {path} is not a readable safetensors file ({exc})") from exc
    return declared_geometry(path, metadata)


def plan_attention(
    radii: Sequence[int],
    down_factor: int | None,
    clear_weights: Sequence[str | os.PathLike],
    info,
    folder: Path,
) -> list[Attention]:
    """One :class:`Attention` per CLEAR radius, each with its weights file if there is one.

    A ``clear_weights`` file goes to the radius it declares (cleardit metadata or a reference
    release name); a file that declares none is allowed with a single radius only. A radius without
    a file uses the model's shipped CLEAR weights when ``cleardit.json`` names some for that radius
    (as ``cleardit generate`` does), else runs training-free.
    """
    if not radii:
        raise ValueError("give at least one CLEAR radius (--radius R [R ...])")
    for r in radii:
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"--radius must be whole numbers >= 1, got {r!r}")
        if r == 0:
            raise ValueError(
                "--radius 0 means full attention, which eval model always runs as the teacher; "
                "give only CLEAR radii >= 1 (e.g. --radius 8 16)"
            )
    dupes = sorted({r for r in radii if list(radii).count(r) > 1})
    if dupes:
        raise ValueError(f"--radius {dupes[0]} is given twice; list each radius once")
    if down_factor is not None and (isinstance(down_factor, bool) or not isinstance(down_factor, int)):
        raise ValueError(f"--down-factor must be a whole number >= 1, got {down_factor!r}")
    if down_factor is not None and down_factor < 1:
        raise ValueError(f"--down-factor must be a whole number >= 1, got {down_factor!r}")
    files: dict[int, tuple[Path, int | None]] = {}
    for raw in clear_weights:
        path = Path(raw).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--clear-weights {raw}: no such file")
        radius, df, known = _declared_radius(path)
        if not known:
            if len(radii) != 1:
                raise ValueError(
                    f"--clear-weights {raw} does not say which radius it was made for (no cleardit "
                    "metadata, not a reference release name); with several --radius values, run eval "
                    "model once per such file"
                )
            radius, df = radii[0], down_factor
        if radius not in radii:
            raise ValueError(
                f"--clear-weights {raw} was made for radius {radius}, which is not among --radius "
                f"{' '.join(map(str, radii))}; add --radius {radius} or drop the file"
            )
        if radius in files:
            raise ValueError(f"two --clear-weights files for radius {radius}: {files[radius][0]} and {path}")
        if down_factor is not None and df != down_factor:
            raise ValueError(
                f"--clear-weights {raw} was made for down factor {df}, but --down-factor {down_factor} "
                "was given; drop --down-factor or pass matching weights"
            )
        files[radius] = (path, df)
    out = []
    for r in radii:
        if r in files:
            out.append(Attention(r, files[r][1], files[r][0]))
        elif info.clear_weights and info.clear_radius == r and down_factor in (None, info.clear_down_factor):
            out.append(Attention(r, info.clear_down_factor, (folder / info.clear_weights).resolve()))
        else:
            out.append(Attention(r, down_factor, None))
    return out


# ----------------------------------------------------------------------------- result
@dataclass
class ModelEvalResult:
    """What ``evaluate_model`` did.

    ``summary``: the content of ``eval_model.json``; ``results``: per CLEAR tag (``r8``) the
    :class:`EvalResult` against the teacher; ``teacher`` / ``clear``: the folders' generation
    reports; ``files``: the files written.
    """

    summary: dict
    results: dict[str, EvalResult]
    teacher: FolderReport
    clear: list[FolderReport]
    files: dict[str, Path] = field(default_factory=dict)


def _flops(layout_args: tuple[int, int, int], attention: Attention, heads: int, head_dim: int) -> int:
    """Attention FLOPs of one transformer layer's forward for one image."""
    from ..attention import TokenLayout, attention_flops

    text_len, gh, gw = layout_args
    if attention.radius == 0:
        return attention_flops(TokenLayout(text_len, gh, gw), None, heads, head_dim)
    layout = TokenLayout(text_len, gh, gw, down_factor=attention.down_factor)
    return attention_flops(layout, attention.radius, heads, head_dim)


def _folder_entry(attention: Attention, report: FolderReport, flops_layer: int, layers: int, steps: int):
    return {
        "label": attention.label,
        "folder": str(report.folder.resolve()),
        "generated": report.generated,
        "cached": report.cached,
        "seconds_per_image": report.seconds_per_image,
        "attention_flops_per_forward": flops_layer * layers,
        "attention_flops_per_image": flops_layer * layers * steps,
    }


# ----------------------------------------------------------------------------- the job
def evaluate_model(
    prompts: str | os.PathLike | Sequence[str] | None = None,
    *,
    model: str | os.PathLike | None = None,
    radii: Sequence[int] | None = None,
    down_factor: int | None = None,
    clear_weights: Sequence[str | os.PathLike] = (),
    output: str | os.PathLike = DEFAULT_OUTPUT,
    metrics: str | list[str] | None = None,
    limit: int | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    weights_dir: str | os.PathLike | None = None,
    strict: bool = False,
    clip_model: str | None = None,
    dino_model: str | None = None,
    report: str | os.PathLike | None = None,
    samples: int = 8,
    quiet: bool = False,
    generate_fn: Callable | None = None,
    frames: int | None = None,
    temporal_radius: int | None = None,
) -> ModelEvalResult:
    """Generate teacher and CLEAR images of the same prompts and seeds, then compare them.

    Args:
        prompts: a text file (one prompt per line), a list of prompts, or None for the bundled list
            (:func:`cleardit.eval.prompts.bundled_prompts_path`); ``limit``: only the first N.
        model: as ``cleardit generate``: None (the shipped mini model), a pipeline folder, or a
            Hugging Face id in the local cache.
        radii: CLEAR radii (>= 1; the teacher is always full attention). Default: the radius of the
            model's shipped CLEAR weights, else 16.
        down_factor, clear_weights: pooled branch; CLEAR weights files (each for the radius it
            declares). A radius without a file uses the model's own weights for it, if any.
        output: the folder of images and results (see the module docstring); reused images are
            not regenerated.
        metrics: subset of ``cleardit.eval.METRIC_NAMES`` (default all); learned metrics whose
            weights are not on this machine are skipped with the reason (``strict``: an error).
        height, width, steps, guidance, seed, dtype: generation settings (defaults: the model's).
        batch_size: prompts per ``generate`` call (images are saved after each) and pairs per
            metric batch.
        device: for generation and metrics (``auto``: CUDA if visible).
        weights_dir, clip_model, dino_model: as ``cleardit eval images``.
        report: folder for ``report.md`` / ``report.html`` / ``grid.png`` (``samples`` prompts).
        quiet: no progress bars or log lines.
        generate_fn: replaces ``cleardit.pipelines.generate`` (tests count its calls).
        frames, temporal_radius: video families (``cleardit.eval.video_model``): frames per video and
            the rule's temporal radius; such a model returns a ``VideoEvalResult`` (per-frame metrics
            averaged over every frame, and temporal consistency).
    """
    from ..environment import resolve_device
    from ..models import adapter_for
    from ..pipelines.highres import check_size, wants_vae_tiles
    from ..pipelines.loading import (
        base_size,
        folder_adapter,
        load_pipeline,
        max_sequence_length,
        read_model_info,
        resolve_dtype,
        resolve_model,
        size_factor,
    )
    from ..pipelines.plan import resolve_guidance, sigmas_metadata
    from ..schedule import denoising_sigmas

    started = time.perf_counter()
    log = (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    prompt_list, source = _prompt_list(prompts, limit)
    names = normalize_metric_names(metrics)
    for what, value, low in (("seed", seed, 0), ("batch-size", batch_size, 1), ("samples", samples, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"--{what} must be a whole number >= {low}, got {value!r}")
    for what, value in (("steps", steps), ("height", height), ("width", width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"--{what} must be a whole number >= 1, got {value!r}")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))):
        raise ValueError(f"--guidance must be a number, got {guidance!r}")
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} exists and is not a folder; pass a folder")
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"model must be a pipeline folder, a cached Hugging Face id or None, got {type(model).__name__} "
            "(eval model reuses images by the model's files, so it needs them on disk)"
        )
    folder = resolve_model(model)
    info = read_model_info(folder)
    if folder_adapter(folder).video:
        from .video_model import evaluate_video_model

        if guidance is not None or report is not None:
            raise ValueError(
                "eval model of a video family has no distilled guidance and no report page; drop --guidance "
                "and --report"
            )
        attentions = plan_attention(
            list(radii) if radii is not None else [info.clear_radius or DEFAULT_RADIUS],
            down_factor, clear_weights, info, folder,
        )  # fmt: skip
        return evaluate_video_model(
            prompt_list, folder=folder, info=info, attentions=attentions, temporal_radius=temporal_radius,
            output=out, metrics=names, frames=frames, height=height, width=width, steps=steps, seed=seed,
            batch_size=batch_size, device=device, dtype=dtype, quiet=quiet, generate_fn=generate_fn,
            weights_dir=weights_dir, strict=strict, clip_model=clip_model, dino_model=dino_model,
        )  # fmt: skip
    attentions = plan_attention(
        list(radii) if radii is not None else [info.clear_radius or DEFAULT_RADIUS],
        down_factor,
        clear_weights,
        info,
        folder,
    )

    # -- generation ------------------------------------------------------------------------------
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    log(f"loading {folder} on {dev} ({str(dt).replace('torch.', '')})")
    pipe = load_pipeline(folder, dev, dt, progress=not quiet)
    base_h, base_w = base_size(pipe, info)
    height, width = height or base_h, width or base_w
    factor = size_factor(pipe)
    grid = (check_size(height, factor, "height"), check_size(width, factor, "width"))
    adapter = adapter_for(pipe.transformer)
    run_steps = steps or info.default_steps or adapter.default_steps
    run_guidance = resolve_guidance(guidance, info, adapter)
    settings = Settings(
        model=str(model) if model is not None else f"cleardit-mini ({folder})",
        fingerprint=files_fingerprint(folder),
        height=height,
        width=width,
        steps=run_steps,
        guidance=None if run_guidance is None else float(run_guidance),
        seed=seed,
        text_len=max_sequence_length(pipe, info),
        dtype=str(dt).replace("torch.", ""),
        device=dev.type,
        # images made with another schedule or VAE tiling are not reused
        sigmas=sigmas_metadata(
            denoising_sigmas(
                pipe.scheduler,
                run_steps,
                grid[0] * grid[1],
                mu=adapter.schedule_mu(pipe, grid[0] * grid[1], run_steps),
            )
        ),  # fmt: skip
        vae_tiling=wants_vae_tiles(pipe.vae, height, width, None),
    )
    heads, head_dim, layers = adapter.attention_geometry(pipe.transformer)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "prompts.txt", "".join(p + "\n" for p in prompt_list))
    fill = dict(chunk=batch_size, progress=not quiet, log=log, generate_fn=generate_fn)
    teacher_att = Attention(0)
    teacher = fill_folder(pipe, info, prompt_list, settings, teacher_att, out / "teacher", **fill)
    clear = [
        fill_folder(pipe, info, prompt_list, settings, att, out / f"clear_{att.tag}", **fill)
        for att in attentions
    ]
    del pipe
    _free_accelerator(dev)

    # -- metrics ---------------------------------------------------------------------------------
    layout_args = (settings.text_len, *grid)
    teacher_entry = _folder_entry(
        teacher_att, teacher, _flops(layout_args, teacher_att, heads, head_dim), layers, settings.steps
    )
    summary = {
        "model": settings.model,
        "model_fingerprint": settings.fingerprint,
        "prompts": {"source": source, "count": len(prompt_list)},
        "settings": {
            "height": height,
            "width": width,
            "steps": settings.steps,
            "guidance": settings.guidance,
            "seed": seed,
            "dtype": settings.dtype,
            "device": str(dev),
            "text_tokens": settings.text_len,
            "grid": list(grid),
            "heads": heads,
            "head_dim": head_dim,
            "attention_layers": layers,
        },
        "metrics": names,
        "teacher": teacher_entry,
        "clear": [],
    }
    results: dict[str, EvalResult] = {}
    files: dict[str, Path] = {}
    per_radius = []
    for att, rep in zip(attentions, clear, strict=True):
        log(f"metrics of {att.label} against full attention")
        pairs = [
            ImagePair(f"{i:05d}", t, c) for i, (t, c) in enumerate(zip(teacher.paths, rep.paths, strict=True))
        ]
        result = evaluate_pairs(
            pairs,
            names,
            folders=(teacher.folder, rep.folder),
            batch_size=batch_size,
            device=dev,
            weights_dir=weights_dir,
            strict=strict,
            clip_model=clip_model,
            dino_model=dino_model,
            progress=not quiet,
            log=log,
        )
        results[att.tag] = result
        entry = _folder_entry(att, rep, _flops(layout_args, att, heads, head_dim), layers, settings.steps)
        t_full, t_clear = teacher.seconds_per_image, rep.seconds_per_image
        flops_full = teacher_entry["attention_flops_per_forward"]
        entry.update(
            radius=att.radius,
            down_factor=att.down_factor,
            clear_weights=str(att.clear_weights) if att.clear_weights else None,
            speedup=t_full / t_clear if t_full and t_clear else None,
            flops_fraction=entry["attention_flops_per_forward"] / flops_full,
            values=dict(result.values),
            skipped=dict(result.skipped),
        )
        extra = {k: entry[k] for k in ("radius", "down_factor", "clear_weights", "speedup", "flops_fraction")}
        extra["attention_flops_per_forward"] = entry["attention_flops_per_forward"]
        written = write_results(result, out / att.tag, extra=extra)
        entry["results"] = str(written["json"].resolve())
        files[f"{att.tag}/metrics.json"] = written["json"]
        summary["clear"].append(entry)
        per_radius.append({**result.to_dict(), **extra})

    plot = None
    if len(attentions) >= 2:
        try:
            plot = plot_metrics_vs_radius(per_radius, out / PLOT_PNG)
            files["plot"] = plot
        except ValueError as exc:  # e.g. every metric skipped or infinite
            log(f"no metrics-vs-radius plot: {exc}")
    summary["seconds"] = round(time.perf_counter() - started, 3)
    summary["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    from .model_report import to_markdown, write_model_report

    files["json"] = atomic_write_text(out / SUMMARY_JSON, json_text(summary))
    files["markdown"] = atomic_write_text(
        out / SUMMARY_MD, to_markdown(summary, plot=PLOT_PNG if plot is not None else None)
    )
    if report is not None:
        report_files = write_model_report(
            summary,
            prompt_list,
            teacher.paths,
            [rep.paths for rep in clear],
            report,
            samples=samples,
            plot=plot,
        )
        files.update({f"report {k}": v for k, v in report_files.items()})
    return ModelEvalResult(summary=summary, results=results, teacher=teacher, clear=clear, files=files)


def _free_accelerator(device) -> None:
    """Give the generator's GPU memory back before the metric networks load."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
