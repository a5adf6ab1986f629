"""The pooled branch: a learned weighted sum of keys/values over each df x df block of the image grid.

One weight per block position, shape (df, df), shared over heads and channels; initialised to
1/df^2 (a plain average). Grids not divisible by df are zero-padded on the bottom/right, so an
edge block sums only the tokens it has (identical to the reference release when df divides).
A video is pooled frame by frame in space (never across frames: the released weights are (df, df)),
giving T x Hp x Wp pooled tokens in raster order; image queries see all of them, as in 2D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import TokenLayout


def initial_pool_weight(down_factor: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full((down_factor, down_factor), 1.0 / down_factor**2, dtype=dtype)


def pool_image_tokens(x: torch.Tensor, layout: TokenLayout, weight: torch.Tensor) -> torch.Tensor:
    """Pool the image tokens of ``x`` [B, h, N, d] into [B, h, T*Hp*Wp, d] (pooled raster order)."""
    df = layout.down_factor
    if df is None:
        raise ValueError("pool_image_tokens needs a layout with a down_factor")
    if weight.numel() != df * df:
        raise ValueError(
            f"pool weight has {weight.numel()} elements (shape {tuple(weight.shape)}), "
            f"expected df*df = {df * df} for down_factor={df}"
        )
    b, h, _, d = x.shape
    img = x[:, :, layout.image_slice]
    if layout.tile is not None:
        img = img.index_select(2, layout.raster_to_sequence(x.device))
    # frames folded into the head dimension: every frame is pooled on its own
    grid = img.reshape(b, h * layout.frames, layout.height, layout.width, d)
    hp, wp = layout.pooled_height, layout.pooled_width
    pad_h, pad_w = hp * df - layout.height, wp * df - layout.width
    if pad_h or pad_w:
        grid = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
    blocks = grid.reshape(b, h * layout.frames, hp, df, wp, df, d)
    w = weight.reshape(df, df).to(x.dtype)
    pooled = torch.einsum("bhpiqjd,ij->bhpqd", blocks, w)
    return pooled.reshape(b, h, layout.pooled_len, d)


def with_pooled_keys(
    k: torch.Tensor, v: torch.Tensor, pooled_k: torch.Tensor | None, pooled_v: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, h, N + P, d] with the pooled ones appended (the key order of
    ``reference.allowed_mask``), or k, v unchanged when there are none."""
    if pooled_k is None:
        return k, v
    return torch.cat([k, pooled_k], dim=2), torch.cat([v, pooled_v], dim=2)
