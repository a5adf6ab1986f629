"""Exact counts of allowed (query, key) pairs, and the attention FLOPs they imply.

Counted in closed form per row offset, so 8K grids with any radius cost microseconds; the
benchmarks and the CLI take their FLOPs from here.
"""

from __future__ import annotations

from .layout import TokenLayout, check_radius, row_half_width


def _disc_pairs(height: int, width: int, radius: int) -> int:
    """Number of (image query, image key) pairs on an H x W grid with squared distance < r^2."""
    total = 0
    for dy in range(-min(radius - 1, height - 1), min(radius - 1, height - 1) + 1):
        a = min(row_half_width(radius, dy), width - 1)
        if a < 0:
            continue
        # sum over dx in [-a, a] of (W - |dx|) query positions that keep the key inside the grid
        total += (height - abs(dy)) * (width * (2 * a + 1) - a * (a + 1))
    return total


def count_pairs(layout: TokenLayout, radius: int | None) -> int:
    """Allowed (query, key) pairs; radius None means full attention over text + image tokens."""
    n, t, img = layout.seq_len, layout.text_len, layout.image_len
    if radius is None:
        return n * n
    radius = check_radius(radius)
    text_queries = t * n
    image_queries = img * t + _disc_pairs(layout.height, layout.width, radius) + img * layout.pooled_len
    return text_queries + image_queries


def attention_flops(layout: TokenLayout, radius: int | None, heads: int, head_dim: int) -> int:
    """FLOPs of one attention layer's forward: QK^T and PV each cost 2*d per pair."""
    return 4 * head_dim * heads * count_pairs(layout, radius)


def format_flops(flops: float) -> str:
    """``847.73 TFLOPs`` style: the largest unit (T, G, M, k) the value reaches, two decimals."""
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if flops >= scale:
            return f"{flops / scale:,.2f} {unit}"
    return f"{flops:,.0f} FLOPs"
