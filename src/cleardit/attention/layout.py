"""Where each token of a joint text+image sequence sits, and therefore which (query, key) pairs exist.

The CLEAR rule (see docs/architecture.md):
  * a text query attends to every text and image key (never to pooled keys);
  * every query attends to every text key;
  * an image query at (qy, qx) attends to an image key at (ky, kx) iff (qy-ky)^2 + (qx-kx)^2 < r^2;
  * with a down factor df, image queries also attend to all (H/df)*(W/df) pooled keys.

Image tokens are stored either in raster (row-major) order or tile-major order: tiles of
``tile = (th, tw)`` tokens, tiles in row-major order, tokens row-major inside each tile; tiles on the
bottom/right edge are simply smaller, so the sequence length never changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    """Geometry of a joint sequence ``[text | image]`` (or ``[image | text]``).

    Attributes:
        text_len: number of text tokens T (may be 0).
        height, width: image token grid H x W.
        text_first: True when text tokens precede image tokens (FLUX), False when they follow.
        down_factor: df of the optional pooled branch (None = no pooled keys).
        tile: (th, tw) when image tokens are stored tile-major; None for raster order.
    """

    text_len: int
    height: int
    width: int
    text_first: bool = True
    down_factor: int | None = None
    tile: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name in ("text_len", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"TokenLayout.{name} must be an int, got {value!r}")
        if self.text_len < 0:
            raise ValueError(f"TokenLayout.text_len must be >= 0, got {self.text_len}")
        if self.height < 1 or self.width < 1:
            raise ValueError(
                f"TokenLayout needs an image grid of at least 1x1 tokens, got {self.height}x{self.width}"
            )
        if self.down_factor is not None and (not isinstance(self.down_factor, int) or self.down_factor < 1):
            raise ValueError(f"down_factor must be a positive int or None, got {self.down_factor!r}")
        if self.tile is not None:
            if len(self.tile) != 2 or any((not isinstance(t, int)) or t < 1 for t in self.tile):
                raise ValueError(f"tile must be a pair of positive ints (th, tw) or None, got {self.tile!r}")
            object.__setattr__(self, "tile", tuple(self.tile))

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def image_len(self) -> int:
        return self.height * self.width

    @property
    def seq_len(self) -> int:
        """Length of the query (and key/value) sequence passed to ``clear_attention``."""
        return self.text_len + self.image_len

    @property
    def pooled_height(self) -> int:
        return 0 if self.down_factor is None else math.ceil(self.height / self.down_factor)

    @property
    def pooled_width(self) -> int:
        return 0 if self.down_factor is None else math.ceil(self.width / self.down_factor)

    @property
    def pooled_len(self) -> int:
        return self.pooled_height * self.pooled_width

    @property
    def text_start(self) -> int:
        return 0 if self.text_first else self.image_len

    @property
    def image_start(self) -> int:
        return self.text_len if self.text_first else 0

    @property
    def text_slice(self) -> slice:
        return slice(self.text_start, self.text_start + self.text_len)

    @property
    def image_slice(self) -> slice:
        return slice(self.image_start, self.image_start + self.image_len)

    def with_tile(self, tile: tuple[int, int] | None) -> TokenLayout:
        return TokenLayout(self.text_len, self.height, self.width, self.text_first, self.down_factor, tile)

    # ---- token order -------------------------------------------------------------------------
    def raster_to_sequence(self, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor [H*W]: for raster cell ``y*W + x``, its offset inside the image segment."""
        if self.tile is None:
            return torch.arange(self.image_len, device=device)
        return torch.argsort(self.sequence_to_raster(device))

    def sequence_to_raster(self, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor [H*W]: for the i-th image token of the sequence, its raster cell ``y*W + x``."""
        if self.tile is None:
            return torch.arange(self.image_len, device=device)
        th, tw = self.tile
        chunks = []
        for y0 in range(0, self.height, th):
            rows = torch.arange(y0, min(y0 + th, self.height), device=device)
            for x0 in range(0, self.width, tw):
                cols = torch.arange(x0, min(x0 + tw, self.width), device=device)
                chunks.append((rows[:, None] * self.width + cols[None, :]).reshape(-1))
        return torch.cat(chunks)

    def image_positions(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) LongTensors [H*W] of the image tokens in sequence order."""
        cell = self.sequence_to_raster(device)
        return cell // self.width, cell % self.width

    # ---- checks ------------------------------------------------------------------------------
    def check_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Raise a clear error unless q, k, v are [B, heads, seq_len, d] tensors matching this layout."""
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(
                    f"{name} must be shaped [batch, heads, tokens, head_dim] like "
                    f"F.scaled_dot_product_attention, got shape {tuple(t.shape)}"
                )
            if t.shape[2] != self.seq_len:
                raise ValueError(
                    f"{name} has {t.shape[2]} tokens but the layout has {self.seq_len} "
                    f"({self.text_len} text + {self.height}x{self.width} image); "
                    f"build the TokenLayout from the real text length and image grid"
                )
        if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[3] != k.shape[3]:
            raise ValueError(
                f"q, k, v shapes do not agree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                "expected equal [batch, heads, tokens, head_dim]"
            )
        if not (q.dtype == k.dtype == v.dtype):
            raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
        if not (q.device == k.device == v.device):
            raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")


def check_radius(radius: int) -> int:
    """Return radius as int, or raise a ValueError that names it."""
    if (
        isinstance(radius, bool)
        or not isinstance(radius, (int,))
        and not (isinstance(radius, float) and radius.is_integer())
    ):
        raise TypeError(f"radius must be a positive integer (token units), got {radius!r}")
    radius = int(radius)
    if radius <= 0:
        raise ValueError(
            f"radius must be >= 1 (token units), got {radius}; use full attention instead of radius <= 0"
        )
    return radius


def row_half_width(radius: int, dy: int) -> int:
    """Largest |dx| with dy^2 + dx^2 < r^2 (-1 when the row dy holds no key)."""
    m = radius * radius - dy * dy - 1
    return math.isqrt(m) if m >= 0 else -1
