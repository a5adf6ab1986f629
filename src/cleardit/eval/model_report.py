"""Tables and the report page of ``cleardit eval model``: one row per attention (the full-attention
teacher, then each CLEAR radius) with the metrics against the teacher, attention FLOPs and time,
plus an image grid teacher | CLEAR for a sample of prompts.

Everything here reads the summary dict that ``evaluate_model`` writes as ``eval_model.json``.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from ..atomic import atomic_write_bytes, atomic_write_text
from ..attention.flops import format_flops
from ..image_grid import write_image_grid
from .metrics import HIGHER_IS_BETTER, METRIC_NAMES
from .report import LABELS, format_value, sample_indices


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}"


def measured_metrics(summary: dict) -> list[str]:
    """Metrics with a value for at least one radius, in the order of METRIC_NAMES."""
    return [n for n in METRIC_NAMES if any(n in c["values"] for c in summary["clear"])]


def skipped_metrics(summary: dict) -> dict[str, str]:
    """metric -> reason, for metrics skipped at some radius (the first radius's reason)."""
    out: dict[str, str] = {}
    for c in summary["clear"]:
        for name, reason in c["skipped"].items():
            out.setdefault(name, reason)
    return out


def table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): the teacher row, then one row per CLEAR setting."""
    names = measured_metrics(summary)
    headers = ["attention"]
    headers += [LABELS[n] + (" ↑" if HIGHER_IS_BETTER[n] else " ↓") for n in names]
    headers += ["attention FLOPs / step", "% of full", "s / image", "speedup"]
    teacher = summary["teacher"]
    full = teacher["attention_flops_per_forward"]
    rows = [
        [teacher["label"] + " (teacher)"]
        + ["reference"] * len(names)
        + [format_flops(full), "100%", _seconds(teacher["seconds_per_image"]), "1.00x"]
    ]
    for c in summary["clear"]:
        cells = [c["label"]]
        for n in names:
            if n not in c["values"]:
                cells.append("skipped")
                continue
            value = format_value(n, c["values"][n])
            if n == "is" and "is_std" in c["values"]:
                value += f" ± {format_value('is_std', c['values']['is_std'])}"
            cells.append(value)
        speedup = c.get("speedup")
        cells += [
            format_flops(c["attention_flops_per_forward"]),
            f"{100 * c['attention_flops_per_forward'] / full:.1f}%" if full else "?",
            _seconds(c["seconds_per_image"]),
            "?" if speedup is None else f"{speedup:.2f}x",
        ]
        rows.append(cells)
    return headers, rows


def format_model_table(summary: dict) -> str:
    """The table as aligned plain text, then one line per skipped metric."""
    headers, rows = table(summary)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for r in [headers, *rows]:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    for name, reason in skipped_metrics(summary).items():
        lines.append(f"skipped {name}: {reason}")
    s = summary["settings"]
    lines.append(
        f"{summary['prompts']['count']} prompts, {s['height']}x{s['width']} px, {s['steps']} steps, "
        f"seeds {s['seed']}..{s['seed'] + summary['prompts']['count'] - 1}, model {summary['model']}"
    )
    return "\n".join(lines)


def _settings_lines(summary: dict) -> list[str]:
    s = summary["settings"]
    return [
        f"model: `{summary['model']}` (files fingerprint {summary['model_fingerprint']})",
        f"prompts: {summary['prompts']['count']} from {summary['prompts']['source']}; prompt i uses seed "
        f"{s['seed']} + i",
        f"size: {s['height']}x{s['width']} px = {s['grid'][0]}x{s['grid'][1]} image tokens + "
        f"{s['text_tokens']} text tokens; {s['steps']} steps, guidance {s['guidance']}",
        f"attention: {s['attention_layers']} layers of {s['heads']} heads x {s['head_dim']}; FLOPs per "
        "transformer forward (one step of one image) from cleardit.attention.attention_flops",
        f"device: {s['device']}, {s['dtype']}; seconds per image as recorded when each image was made "
        "(reused images keep the time of the run that made them)",
    ]


def to_markdown(summary: dict, *, grid: str | None = None, plot: str | None = None) -> str:
    """The Markdown page: settings, the table, skipped metrics, the plot and grid if given."""
    headers, rows = table(summary)
    lines = ["# CLEAR vs full attention", ""]
    lines += [f"- {line}" for line in _settings_lines(summary)]
    lines += ["", "| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    skipped = skipped_metrics(summary)
    if skipped:
        lines += ["", "## Skipped metrics", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in skipped.items()]
    if plot:
        lines += ["", "## Metrics against the radius", "", f"![metrics vs radius]({plot})"]
    if grid:
        lines += ["", "## Sample prompts (teacher | CLEAR)", "", f"![teacher vs CLEAR]({grid})"]
    return "\n".join(lines) + "\n"


def to_html(summary: dict, *, grid: str | None = None, plot: str | None = None, samples=()) -> str:
    """The HTML page; ``samples``: (index, prompt) of the grid's rows, listed under it."""
    headers, rows = table(summary)
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cleardit eval model</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;border-bottom:1px solid #ddd}"
        "td:not(:first-child){text-align:right}.note{color:#777;font-size:small}</style></head><body>",
        "<h1>CLEAR vs full attention</h1><ul>",
        "".join(f"<li>{esc(line).replace('`', '')}</li>" for line in _settings_lines(summary)),
        f"</ul><table><tr>{head}</tr>{body}</table>",
    ]
    skipped = skipped_metrics(summary)
    if skipped:
        parts.append("<h2>Skipped metrics</h2><ul class='note'>")
        parts += [f"<li><b>{esc(n)}</b>: {esc(r)}</li>" for n, r in skipped.items()]
        parts.append("</ul>")
    if plot:
        parts.append(f"<h2>Metrics against the radius</h2><img src='{esc(plot)}' alt='metrics vs radius'>")
    if grid:
        parts.append(f"<h2>Sample prompts (teacher | CLEAR)</h2><img src='{esc(grid)}' alt='grid'><ol>")
        parts += [f"<li value='{i}'>{esc(p)}</li>" for i, p in samples]
        parts.append("</ol>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_model_report(
    summary: dict,
    prompts: list[str],
    teacher_paths: list[Path],
    clear_paths: list[list[Path]],
    report_dir: str | os.PathLike,
    *,
    samples: int = 8,
    plot: Path | None = None,
) -> dict[str, Path]:
    """``report.md``, ``report.html``, ``grid.png`` (teacher | each CLEAR, ``samples`` prompts spread
    over the list) and, if given, a copy of the metrics-vs-radius plot, in ``report_dir``."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    picked = sample_indices(len(prompts), samples)
    files = {
        "grid": write_image_grid(
            out / "grid.png",
            [[teacher_paths[i], *(p[i] for p in clear_paths)] for i in picked],
            column_labels=["full attention (teacher)", *(c["label"] for c in summary["clear"])],
            captions=[f"{i:05d}: {prompts[i]}" for i in picked],
            thumb=256,
        )
    }
    plot_name = None
    if plot is not None:
        plot_name = "metrics_vs_radius.png"
        files["plot"] = atomic_write_bytes(out / plot_name, Path(plot).read_bytes())
    page = to_markdown(summary, grid="grid.png", plot=plot_name)
    files["markdown"] = atomic_write_text(out / "report.md", page)
    page = to_html(summary, grid="grid.png", plot=plot_name, samples=[(i, prompts[i]) for i in picked])
    files["html"] = atomic_write_text(out / "report.html", page)
    return files
