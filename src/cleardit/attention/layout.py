"""Where each token of a joint text+image (or text+video) sequence sits, and therefore which
(query, key) pairs exist.

The CLEAR rule (see docs/architecture.md):
  * a text query attends to every text and image key (never to pooled keys);
  * every query attends to every text key;
  * an image query at (qy, qx) attends to an image key at (ky, kx) iff (qy-ky)^2 + (qx-kx)^2 < r^2;
  * video (frames T > 1, tokens at (t, y, x)): iff dt^2 r^2 + (dy^2 + dx^2) rt^2 < r^2 rt^2, with rt
    the temporal radius in frames; rt None = every frame (a disc in space, a cylinder in time);
  * with a down factor df, image queries also attend to all T*(H/df)*(W/df) pooled keys (each
    frame pooled in space).

Image tokens are stored either in raster order (frames, then rows, then columns) or tile-major
order: tiles of ``tile = (th, tw)`` (one frame deep) or ``(tt, th, tw)`` tokens, tiles in raster
order, tokens in raster order inside each tile; tiles on the last frame/row/column are simply
smaller, so the sequence length never changes. A 2D image is exactly the T = 1 case.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    """Geometry of a joint sequence ``[text | image]`` (or ``[image | text]``).

    Attributes:
        text_len: number of text (global) tokens (may be 0).
        height, width: image token grid H x W (of each frame).
        text_first: True when text tokens precede image tokens (FLUX), False when they follow.
        down_factor: df of the optional pooled branch (None = no pooled keys).
        tile: (th, tw) or (tt, th, tw) when image tokens are stored tile-major; None for raster order.
        frames: video frames T of the grid (1 = an image); last, so positional use stays 2D.
    """

    text_len: int
    height: int
    width: int
    text_first: bool = True
    down_factor: int | None = None
    tile: tuple[int, int] | tuple[int, int, int] | None = None
    frames: int = 1

    def __post_init__(self) -> None:
        for name in ("text_len", "height", "width", "frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"TokenLayout.{name} must be an int, got {value!r}")
        if self.text_len < 0:
            raise ValueError(f"TokenLayout.text_len must be >= 0, got {self.text_len}")
        if self.height < 1 or self.width < 1:
            raise ValueError(
                f"TokenLayout needs an image grid of at least 1x1 tokens, got {self.height}x{self.width}"
            )
        if self.frames < 1:
            raise ValueError(f"TokenLayout.frames must be >= 1 (1 = an image), got {self.frames}")
        if self.down_factor is not None and (not isinstance(self.down_factor, int) or self.down_factor < 1):
            raise ValueError(f"down_factor must be a positive int or None, got {self.down_factor!r}")
        if self.tile is not None:
            if len(self.tile) not in (2, 3) or any(
                isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in self.tile
            ):
                raise ValueError(
                    f"tile must be positive ints (th, tw) or (tt, th, tw) (frames x rows x cols), or None; "
                    f"got {self.tile!r}"
                )
            object.__setattr__(self, "tile", tuple(self.tile))

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def frame_len(self) -> int:
        """Image tokens of one frame (H*W)."""
        return self.height * self.width

    @property
    def image_len(self) -> int:
        """Image tokens of the whole grid (T*H*W)."""
        return self.frames * self.height * self.width

    @property
    def is_video(self) -> bool:
        return self.frames > 1

    def describe_grid(self) -> str:
        """``HxW`` for an image, ``TxHxW`` for a video."""
        hw = f"{self.height}x{self.width}"
        return f"{self.frames}x{hw}" if self.is_video else hw

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
        """Pooled keys: each frame pooled in space (frames x Hp x Wp)."""
        return self.frames * self.pooled_height * self.pooled_width

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

    def with_tile(self, tile: tuple[int, ...] | None) -> TokenLayout:
        return dataclasses.replace(self, tile=tile)

    @property
    def tile_3d(self) -> tuple[int, int, int] | None:
        """The tile as (tt, th, tw): a 2-entry tile is one frame deep."""
        if self.tile is None:
            return None
        return self.tile if len(self.tile) == 3 else (1, *self.tile)

    @property
    def tile_order_is_raster(self) -> bool:
        """Whether the tile-major order is the raster order (no tile; tiles of whole rows one frame
        deep, or of whole frames; one frame): nothing to permute then."""
        if self.tile is None:
            return True
        frames, rows, cols = self.tile_3d
        return cols >= self.width and (frames == 1 or self.frames == 1 or rows >= self.height)

    # ---- token order -------------------------------------------------------------------------
    def raster_to_sequence(self, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor [T*H*W]: for raster cell ``(t*H + y)*W + x``, its offset inside the image segment."""
        if self.tile is None:
            return torch.arange(self.image_len, device=device)
        return torch.argsort(self.sequence_to_raster(device))

    def sequence_to_raster(self, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor [T*H*W]: for the i-th image token of the sequence, its raster cell
        ``(t*H + y)*W + x``."""
        if self.tile is None:
            return torch.arange(self.image_len, device=device)
        tt, th, tw = self.tile_3d
        hh, ww = self.height, self.width
        chunks = []
        for t0 in range(0, self.frames, tt):
            frames = torch.arange(t0, min(t0 + tt, self.frames), device=device)
            for y0 in range(0, hh, th):
                rows = torch.arange(y0, min(y0 + th, hh), device=device)
                for x0 in range(0, ww, tw):
                    cols = torch.arange(x0, min(x0 + tw, ww), device=device)
                    cells = (frames[:, None, None] * hh + rows[None, :, None]) * ww + cols[None, None, :]
                    chunks.append(cells.reshape(-1))
        return torch.cat(chunks)

    def image_positions(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) LongTensors [T*H*W] of the image tokens in sequence order (inside their frame)."""
        _, rows, cols = self.image_coordinates(device)
        return rows, cols

    def image_coordinates(
        self, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(frames, rows, cols) LongTensors [T*H*W] of the image tokens in sequence order."""
        cell = self.sequence_to_raster(device)
        frame, in_frame = cell // self.frame_len, cell % self.frame_len
        return frame, in_frame // self.width, in_frame % self.width

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
                    f"({self.text_len} text + {self.describe_grid()} image); "
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


def check_temporal_radius(temporal_radius: int | None) -> int | None:
    """Return the temporal radius as int (or None = every frame), or raise an error that names it."""
    if temporal_radius is None:
        return None
    if isinstance(temporal_radius, bool) or not (
        isinstance(temporal_radius, int)
        or (isinstance(temporal_radius, float) and temporal_radius.is_integer())
    ):
        raise TypeError(
            f"temporal_radius must be a positive integer (latent frames) or None (every frame), "
            f"got {temporal_radius!r}"
        )
    temporal_radius = int(temporal_radius)
    if temporal_radius <= 0:
        raise ValueError(
            f"temporal_radius must be >= 1 (latent frames; 1 = each frame alone), got {temporal_radius}; "
            "use None to let every frame see every frame"
        )
    return temporal_radius


def frame_thresholds(radius: int, temporal_radius: int | None, frames: int) -> tuple[int, ...]:
    """The rule per frame offset: entry |dt| (0 <= |dt| < frames) is the m with which an image query
    sees the key at (dt, dy, dx) iff dy^2 + dx^2 < m (0: that frame offset holds no key).

    dt^2 r^2 + s rt^2 < r^2 rt^2 with s = dy^2 + dx^2 an integer is s < r^2 (rt^2 - dt^2) / rt^2,
    i.e. s < ceil(r^2 (rt^2 - dt^2) / rt^2): every backend uses these integers, so none rounds.
    """
    r2 = radius * radius
    if temporal_radius is None:
        return (r2,) * frames
    rt2 = temporal_radius * temporal_radius
    return tuple(max(0, -(-r2 * (rt2 - dt * dt) // rt2)) for dt in range(frames))


def half_width(r2: int, dy: int) -> int:
    """Largest |dx| with dy^2 + dx^2 < r2 (-1 when the row dy holds no key)."""
    m = r2 - dy * dy - 1
    return math.isqrt(m) if m >= 0 else -1


def reach(r2: int) -> int:
    """Largest |dy| (or |dx|) with dy^2 < r2 (-1 when r2 <= 0: no key at all)."""
    return half_width(r2, 0)


def row_half_width(radius: int, dy: int) -> int:
    """Largest |dx| with dy^2 + dx^2 < r^2 (-1 when the row dy holds no key)."""
    return half_width(radius * radius, dy)
