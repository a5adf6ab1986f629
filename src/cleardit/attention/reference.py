"""The ground truth: a dense boolean mask of the CLEAR rule and one masked SDPA call.

Materialises an N x (N + pooled) mask, so it is for small sizes and for testing other backends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import BackendResult
from .layout import TokenLayout, frame_thresholds
from .pooling import with_pooled_keys


def allowed_mask(
    layout: TokenLayout,
    radius: int,
    device: torch.device | str | None = None,
    temporal_radius: int | None = None,
) -> torch.Tensor:
    """Bool [N, N + P]: entry (i, j) is True iff query i may attend to key j (pooled keys last)."""
    n, p = layout.seq_len, layout.pooled_len
    is_text = torch.zeros(n, dtype=torch.bool, device=device)
    is_text[layout.text_slice] = True
    frames, rows, cols = (torch.zeros(n, dtype=torch.long, device=device) for _ in range(3))
    f_img, r_img, c_img = layout.image_coordinates(device)
    isl = layout.image_slice
    frames[isl], rows[isl], cols[isl] = f_img, r_img, c_img

    # the rule per frame offset (frame_thresholds): dy^2 + dx^2 < m[|dt|]
    thresholds = torch.tensor(frame_thresholds(radius, temporal_radius, layout.frames), device=device)
    dist2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    near = dist2 < thresholds[(frames[:, None] - frames[None, :]).abs()]
    image_pair = ~is_text[:, None] & ~is_text[None, :]
    allowed = is_text[:, None] | is_text[None, :] | (image_pair & near)
    pooled = (~is_text)[:, None].expand(n, p)  # only image queries see pooled keys
    return torch.cat([allowed, pooled], dim=1)


def reference_attention(
    q, k, v, layout, radius, pooled_k, pooled_v, scale, return_lse, temporal_radius=None
) -> BackendResult:
    """CLEAR attention as one SDPA call with the dense mask (``dispatch.AttentionBackend``)."""
    k, v = with_pooled_keys(k, v, pooled_k, pooled_v)
    mask = allowed_mask(layout, radius, q.device, temporal_radius)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    lse = None
    if return_lse:
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        lse = scores.masked_fill(~mask, float("-inf")).logsumexp(dim=-1)
    return out, lse
