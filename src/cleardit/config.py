"""``ClearConfig``: what ``linearize`` installs into a model."""

from __future__ import annotations

from dataclasses import dataclass

from .attention.dispatch import BACKENDS
from .attention.layout import check_radius, check_temporal_radius

# Tile shape of the tile-major token order: 8 rows x 16 columns = 128 tokens, one GPU key block.
DEFAULT_TILE = (8, 16)
# CLEAR radius (tokens) when nothing else says: no --radius and no radius in the model's CLEAR weights.
DEFAULT_RADIUS = 16


@dataclass(frozen=True)
class ClearConfig:
    """Settings of a linearized model.

    Attributes:
        radius: image tokens attend to image tokens closer than this (token units, strict <).
        down_factor: df of the pooled branch (None = off), as in the reference's *_down_4 releases.
        backend: attention backend ("auto", "reference", "tiled", "flex", "triton").
        tile: image tokens are permuted into tile-major order with this tile shape once per forward
            (None keeps raster order). Results are identical; GPU kernels see contiguous tiles.
            (rows, cols), one frame deep for videos; video models also take (frames, rows, cols).
        scale: softmax scale; None = 1/sqrt(head_dim).
        temporal_radius: video models only: latent frames of the spatio-temporal window (a query
            sees the key at (dt, dy, dx) iff dt^2 r^2 + (dy^2 + dx^2) rt^2 < r^2 rt^2); None = every
            frame (a disc in space, a cylinder in time).
    """

    radius: int = DEFAULT_RADIUS
    down_factor: int | None = None
    backend: str = "auto"
    tile: tuple[int, int] | tuple[int, int, int] | None = DEFAULT_TILE
    scale: float | None = None
    temporal_radius: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "radius", check_radius(self.radius))
        object.__setattr__(self, "temporal_radius", check_temporal_radius(self.temporal_radius))
        if self.down_factor is not None and (
            isinstance(self.down_factor, bool)
            or not isinstance(self.down_factor, int)
            or self.down_factor < 1
        ):
            raise ValueError(f"down_factor must be a positive integer or None, got {self.down_factor!r}")
        if self.backend not in BACKENDS + ("auto",):
            raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {self.backend!r}")
        if self.tile is not None:
            tile = tuple(self.tile)
            if len(tile) not in (2, 3) or any(
                isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tile
            ):
                raise ValueError(
                    "tile must be positive ints (rows, cols), for videos also (frames, rows, cols), or "
                    f"None; got {self.tile!r}"
                )
            object.__setattr__(self, "tile", tile)
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"scale must be positive or None (1/sqrt(head_dim)), got {self.scale!r}")
