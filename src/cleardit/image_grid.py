"""Labelled image grids: the one layout of every picture of panels cleardit draws (``generate
--compare``, the evaluation reports, the benchmarks' grids). PIL and numpy only.

A grid is rows of panels. Optional text: a label over each column (centred), a label left of each
row, a caption above each row (wrapped at the grid's width) and footer lines below everything
(never wrapped: the grid widens to fit them and centres the panels).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes


def default_font(size: int):
    """PIL's default font at ``size`` px (one fixed bitmap size before Pillow 10.1)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _as_rgb(panel):
    """A PIL RGB image (a new one) from a PIL image, an HxWx3 uint8 array or an image file."""
    from PIL import Image

    if isinstance(panel, Image.Image):
        return panel.convert("RGB")
    if isinstance(panel, (str, os.PathLike)):
        with Image.open(panel) as im:
            return im.convert("RGB")
    return Image.fromarray(np.asarray(panel)).convert("RGB")


def wrap_text(draw, text: str, width: int, font=None) -> list[str]:
    """``text`` split at spaces into lines no wider than ``width`` pixels (a long word stays whole)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]


def image_grid(
    rows: Sequence[Sequence],
    *,
    column_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    captions: Sequence[str] | None = None,
    footer: Sequence[str] = (),
    cell: tuple[int, int] | None = None,
    thumb: int | None = None,
    font_size: int | None = None,
):
    """A PIL image of ``rows`` of panels (PIL images, uint8 HxWx3 arrays or image files).

    Args:
        column_labels: one label per column, centred over it.
        row_labels: one label per row, on its left.
        captions: one caption per row, above its panels, wrapped at the grid's width.
        footer: lines below the grid (the grid widens to the longest).
        cell: resize every panel to this (width, height) (Lanczos; e.g. a smaller stage-1 image shown
            at the size of the others). ``thumb``: shrink panels to fit ``thumb`` x ``thumb``, never
            enlarge. Neither: panels as they are. Columns are as wide as the widest panel (and
            label), panels are centred in them.
        font_size: text size in px; default max(11, panel side / 24).
    """
    from PIL import Image, ImageDraw

    grid = [[_as_rgb(p) for p in row] for row in rows]
    if not any(grid):
        raise ValueError("an image grid needs at least one image")
    n_cols = max(len(row) for row in grid)
    for name, values, want in (
        ("column_labels", column_labels, n_cols),
        ("row_labels", row_labels, len(grid)),
        ("captions", captions, len(grid)),
    ):
        if values is not None and len(values) != want:
            raise ValueError(f"{name} has {len(values)} entries, the grid has {want}")
    for row in grid:
        for i, im in enumerate(row):
            if cell is not None and im.size != tuple(cell):
                row[i] = im.resize(tuple(cell), Image.LANCZOS)
            elif cell is None and thumb is not None:
                im.thumbnail((thumb, thumb))
    col_w = max(im.width for row in grid for im in row)
    row_h = [max((im.height for im in row), default=0) for row in grid]
    size = font_size or max(11, min(col_w, max(row_h)) // 24)
    font = default_font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_width(text: str) -> int:
        box = probe.textbbox((0, 0), text, font=font)
        return box[2] - box[0]

    line_h, pad = size + size // 2, max(4, size // 2)
    if column_labels:
        col_w = max(col_w, *(text_width(t) for t in column_labels))
    gap = max(4, col_w // 64)
    label_w = max(text_width(t) for t in row_labels) + pad if row_labels else 0
    panels_w = label_w + n_cols * col_w + (n_cols - 1) * gap
    width = max(panels_w, *(text_width(t) for t in footer), 0) + 2 * pad
    x0 = (width - panels_w) // 2
    wrapped = [wrap_text(probe, c, width - 2 * pad, font) for c in captions] if captions else None

    height = pad + (line_h if column_labels else 0)
    height += sum(row_h) + gap * (len(grid) - 1)
    height += sum(len(lines) for lines in wrapped) * line_h if wrapped else 0
    height += (pad + line_h * len(footer) if footer else 0) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)

    def col_x(c: int) -> int:
        return x0 + label_w + c * (col_w + gap)

    y = pad
    if column_labels:
        for c, text in enumerate(column_labels):
            draw.text((col_x(c) + max(0, (col_w - text_width(text)) // 2), y), text, fill="black", font=font)
        y += line_h
    for r, row in enumerate(grid):
        for line in wrapped[r] if wrapped else ():
            draw.text((pad, y), line, fill="dimgray", font=font)
            y += line_h
        if row_labels:
            draw.text((x0, y + max(0, (row_h[r] - size) // 2)), row_labels[r], fill="black", font=font)
        for c, im in enumerate(row):
            canvas.paste(im, (col_x(c) + (col_w - im.width) // 2, y))
        y += row_h[r] + gap
    y += pad - gap
    for line in footer:
        draw.text((pad, y), line, fill="black", font=font)
        y += line_h
    return canvas


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_image_grid(path: str | os.PathLike, rows: Sequence[Sequence], **layout) -> Path:
    """``image_grid(rows, **layout)`` written atomically as a PNG at ``path`` (folders created)."""
    return atomic_write_bytes(path, png_bytes(image_grid(rows, **layout)))
