"""Result files of ``cleardit eval``: JSON, Markdown, per-pair CSV, an HTML/Markdown report with an
image grid (reference | test), and a plot of metrics against the CLEAR radius.

Every file is written atomically (a temporary file in the same folder, then a rename), so an
interrupted run never leaves a half-written result. JSON has no infinity: a PSNR of +inf
(identical images) is written as the string ``"inf"`` and read back as ``float("inf")`` by
:func:`load_result`.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

from ..atomic import atomic_write_bytes, atomic_write_text
from ..image_grid import write_image_grid
from .metrics import HIGHER_IS_BETTER, METRIC_NAMES

LABELS = {
    "psnr": "PSNR (dB)",
    "ms_ssim": "MS-SSIM",
    "lpips": "LPIPS",
    "clip_i": "CLIP-I",
    "dino": "DINO",
    "fid": "FID",
    "is": "IS",
}
RESULT_JSON, RESULT_MD, PER_PAIR_CSV = "metrics.json", "metrics.md", "per_pair.csv"


# ----------------------------------------------------------------------------- values
def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        if math.isnan(v):
            raise ValueError("refusing to write NaN into a result file")
        return "inf" if v > 0 else "-inf"
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


def json_text(data: dict) -> str:
    """``data`` as indented JSON; +/-inf become the strings ``"inf"`` / ``"-inf"``, NaN is refused."""
    return json.dumps(_json_value(data), indent=2) + "\n"


def _from_json(v):
    if v in ("inf", "-inf"):
        return float(v)
    if isinstance(v, dict):
        return {k: _from_json(x) for k, x in v.items()}
    return v


def load_result(path: str | os.PathLike) -> dict:
    """A ``metrics.json`` as a dict, with ``"inf"`` turned back into ``float("inf")``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read result file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"result file {path} does not hold a JSON object")
    return {k: _from_json(v) for k, v in data.items()}


def format_value(name: str, value) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if name in ("psnr", "fid"):
        return f"{value:.2f}"
    if name in ("is", "is_std"):
        return f"{value:.3f}"
    return f"{value:.4f}"


def _rows(summary: dict) -> list[tuple[str, str, str]]:
    """(metric label, value or 'skipped', note) for every metric measured or skipped."""
    rows = []
    skipped = summary.get("skipped", {})
    for name in METRIC_NAMES:
        label = LABELS[name] + (" ↑" if HIGHER_IS_BETTER[name] else " ↓")
        if name in summary:
            value = format_value(name, summary[name])
            if name == "is" and "is_std" in summary:
                value += f" ± {format_value('is_std', summary['is_std'])}"
            rows.append((label, value, ""))
        elif name in skipped:
            rows.append((label, "skipped", skipped[name]))
    return rows


def format_table(summary: dict) -> str:
    """A plain-text table of a result dict (as in ``metrics.json``)."""
    rows = _rows(summary)
    if not rows:
        return "(no metric was computed)"
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{'metric':<{w0}}  {'value':>{w1}}"]
    for label, value, note in rows:
        first = note.split(";")[0]
        short = f"  ({first[:77] + '...' if len(first) > 80 else first})" if note else ""
        lines.append(f"{label:<{w0}}  {value:>{w1}}{short}")
    meta = summary.get("meta", {})
    if meta:
        lines.append(f"{_count(meta)}: {meta.get('ref', '?')} (reference) vs {meta.get('test', '?')} (test)")
    return "\n".join(lines)


def _count(meta: dict) -> str:
    if meta.get("pairs") is not None:
        return f"{meta['pairs']} pairs"
    images = meta.get("images") or {}
    return f"{images.get('ref', '?')} reference and {images.get('test', '?')} test images (unpaired)"


def to_markdown(summary: dict, title: str = "Evaluation") -> str:
    meta = summary.get("meta", {})
    lines = [f"# {title}", ""]
    if meta:
        lines += [
            f"- reference: `{meta.get('ref', '?')}`",
            f"- test: `{meta.get('test', '?')}`",
            f"- images: {_count(meta)}",
        ]
        if "radius" in summary:
            lines.append(f"- radius: {summary['radius']}")
        lines.append("")
    lines += ["| metric | value |", "| --- | --- |"]
    lines += [f"| {label} | {value} |" for label, value, note in _rows(summary) if not note]
    skipped = summary.get("skipped", {})
    if skipped:
        lines += ["", "## Skipped", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in skipped.items()]
    backends = meta.get("backends", {})
    if backends:
        lines += ["", "## Computed by", ""]
        lines += [f"- {name}: {how}" for name, how in backends.items()]
    return "\n".join(lines) + "\n"


def write_results(result, out_dir: str | os.PathLike, extra: dict | None = None) -> dict[str, Path]:
    """``metrics.json``, ``metrics.md`` and ``per_pair.csv`` of an ``EvalResult`` in ``out_dir``.

    ``extra`` keys (e.g. ``{"radius": 16}``) are added to the top level of the JSON.
    """
    out = Path(out_dir)
    summary = {**result.to_dict(), **(extra or {})}
    files = {
        "json": atomic_write_text(out / RESULT_JSON, json_text(summary)),
        "markdown": atomic_write_text(out / RESULT_MD, to_markdown(summary)),
    }
    if result.per_pair:
        cols = [n for n in METRIC_NAMES if any(n in v for v in result.per_pair.values())]
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["name", "ref", "test", *cols])
        for pair in result.pairs:
            vals = result.per_pair.get(pair.name, {})
            cells = [format_value(c, vals[c]) if c in vals else "" for c in cols]
            writer.writerow([pair.name, pair.ref, pair.test, *cells])
        files["csv"] = atomic_write_text(out / PER_PAIR_CSV, buf.getvalue())
    return files


# ----------------------------------------------------------------------------- report
def sample_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them if ``n <= k``)."""
    if n <= k:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def make_pair_grid(
    pairs, path: str | os.PathLike, per_pair: dict | None = None, *, samples: int = 8, thumb: int = 256
) -> Path:
    """A PNG with one row per sampled pair: reference | test, captioned with the pair's metrics.

    Images are shrunk to fit ``thumb`` x ``thumb`` (never enlarged). Written atomically.
    """
    per_pair = per_pair or {}
    picked = [pairs[i] for i in sample_indices(len(pairs), samples)]
    captions = []
    for pair in picked:
        vals = per_pair.get(pair.name, {})
        captions.append(
            pair.name + "".join(f"   {k}={format_value(k, vals[k])}" for k in ("psnr", "lpips") if k in vals)
        )
    return write_image_grid(
        path,
        [[pair.ref, pair.test] for pair in picked],
        column_labels=["reference", "test"],
        captions=captions,
        thumb=thumb,
    )


def write_report(
    result, report_dir: str | os.PathLike, *, samples: int = 8, extra: dict | None = None
) -> dict[str, Path]:
    """``report.md``, ``report.html`` and ``grid.png`` (reference | test for a sample of pairs)."""
    out = Path(report_dir)
    summary = {**result.to_dict(), **(extra or {})}
    files = {}
    if result.pairs:
        files["grid"] = make_pair_grid(result.pairs, out / "grid.png", result.per_pair, samples=samples)
    md = to_markdown(summary, title="Evaluation report")
    if "grid" in files:
        md += "\n## Sample pairs (reference | test)\n\n![pairs](grid.png)\n"
    files["markdown"] = atomic_write_text(out / "report.md", md)
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{html.escape(value)}</td><td>{html.escape(note)}</td></tr>"
        for label, value, note in _rows(summary)
    )
    meta = {k: html.escape(str(v)) for k, v in summary.get("meta", {}).items()}
    grid = (
        "<h2>Sample pairs (reference | test)</h2><img src='grid.png' alt='pairs'>" if "grid" in files else ""
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>cleardit evaluation</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;border-bottom:1px solid #ddd}"
        "td:nth-child(3){color:#777;font-size:small}</style></head><body>"
        "<h1>Evaluation report</h1>"
        f"<p>reference <code>{meta.get('ref', '?')}</code>, test <code>{meta.get('test', '?')}</code>, "
        f"{html.escape(_count(summary.get('meta', {})))}</p>"
        f"<table><tr><th>metric</th><th>value</th><th>note</th></tr>{rows}</table>{grid}</body></html>\n"
    )
    files["html"] = atomic_write_text(out / "report.html", page)
    return files


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_metrics_vs_radius(results: Iterable[dict | str | os.PathLike], path: str | os.PathLike) -> Path:
    """One panel per metric, value against the CLEAR radius, from several result dicts or JSON files.

    Every result needs a numeric ``radius`` field (``cleardit eval images --radius R`` writes it).
    Metrics that are missing or infinite in a result are left out of that point.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    loaded = []
    for item in results:
        data = item if isinstance(item, dict) else load_result(item)
        radius = data.get("radius")
        if not isinstance(radius, (int, float)) or isinstance(radius, bool):
            where = item if not isinstance(item, dict) else f"result {len(loaded)}"
            raise ValueError(f"{where} has no numeric 'radius' field; rerun eval images with --radius R")
        loaded.append(data)
    if not loaded:
        raise ValueError("no results given to plot")
    loaded.sort(key=lambda d: d["radius"])
    names = [n for n in METRIC_NAMES if any(_finite(d.get(n)) for d in loaded)]
    if not names:
        raise ValueError("none of the results holds a finite metric value to plot")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4 * cols, 3 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        pts = [(d["radius"], d[name]) for d in loaded if _finite(d.get(name))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        better = "higher" if HIGHER_IS_BETTER[name] else "lower"
        ax.set_title(f"{LABELS[name]} ({better} is better)")
        ax.set_xticks(sorted({p[0] for p in pts}))
        ax.set_xlabel("radius (tokens)")
        ax.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write_bytes(path, buf.getvalue())
