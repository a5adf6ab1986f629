"""Exact counts of allowed (query, key) pairs, and the attention FLOPs they imply.

Counted in closed form per frame offset and row offset, so 8K grids and long videos with any radius
cost microseconds; the benchmarks and the CLI take their FLOPs from here.
"""

from __future__ import annotations

from .layout import TokenLayout, check_radius, check_temporal_radius, frame_thresholds, half_width


def _disc_pairs(height: int, width: int, r2: int) -> int:
    """Number of (query, key) pairs of two H x W frames with dy^2 + dx^2 < r2 (same or other frame)."""
    total = 0
    dy_max = min(half_width(r2, 0), height - 1)
    for dy in range(-dy_max, dy_max + 1):
        a = min(half_width(r2, dy), width - 1)
        # sum over dx in [-a, a] of (W - |dx|) query positions that keep the key inside the grid
        total += (height - abs(dy)) * (width * (2 * a + 1) - a * (a + 1))
    return total


def _grid_pairs(layout: TokenLayout, radius: int, temporal_radius: int | None) -> int:
    """(image query, image key) pairs: for each frame offset dt, (T - |dt|) frame pairs, each a disc."""
    thresholds = frame_thresholds(radius, temporal_radius, layout.frames)
    per_offset = {m: _disc_pairs(layout.height, layout.width, m) for m in set(thresholds)}
    frames = layout.frames
    return sum((2 if dt else 1) * (frames - dt) * per_offset[m] for dt, m in enumerate(thresholds))


def count_pairs(layout: TokenLayout, radius: int | None, temporal_radius: int | None = None) -> int:
    """Allowed (query, key) pairs; radius None means full attention over text + image tokens.
    ``temporal_radius`` (latent frames, None = every frame) matters only for video layouts."""
    n, t, img = layout.seq_len, layout.text_len, layout.image_len
    if radius is None:
        return n * n
    radius = check_radius(radius)
    temporal_radius = check_temporal_radius(temporal_radius)
    text_queries = t * n
    image_queries = img * t + _grid_pairs(layout, radius, temporal_radius) + img * layout.pooled_len
    return text_queries + image_queries


def attention_flops(
    layout: TokenLayout, radius: int | None, heads: int, head_dim: int, temporal_radius: int | None = None
) -> int:
    """FLOPs of one attention layer's forward: QK^T and PV each cost 2*d per pair."""
    return 4 * head_dim * heads * count_pairs(layout, radius, temporal_radius)


def format_flops(flops: float) -> str:
    """``847.73 TFLOPs`` style: the largest unit (T, G, M, k) the value reaches, two decimals."""
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if flops >= scale:
            return f"{flops / scale:,.2f} {unit}"
    return f"{flops:,.0f} FLOPs"
