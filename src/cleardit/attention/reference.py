"""The ground truth: a dense boolean mask of the CLEAR rule and one masked SDPA call.

Materialises an N x (N + pooled) mask, so it is for small sizes and for testing other backends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import BackendResult
from .layout import TokenLayout
from .pooling import with_pooled_keys


def allowed_mask(layout: TokenLayout, radius: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool [N, N + P]: entry (i, j) is True iff query i may attend to key j (pooled keys last)."""
    n, p = layout.seq_len, layout.pooled_len
    is_text = torch.zeros(n, dtype=torch.bool, device=device)
    is_text[layout.text_slice] = True
    rows = torch.full((n,), -1, dtype=torch.long, device=device)
    cols = torch.full((n,), -1, dtype=torch.long, device=device)
    r_img, c_img = layout.image_positions(device)
    rows[layout.image_slice], cols[layout.image_slice] = r_img, c_img

    dist2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    image_pair = ~is_text[:, None] & ~is_text[None, :]
    allowed = is_text[:, None] | is_text[None, :] | (image_pair & (dist2 < radius * radius))
    pooled = (~is_text)[:, None].expand(n, p)  # only image queries see pooled keys
    return torch.cat([allowed, pooled], dim=1)


def reference_attention(q, k, v, layout, radius, pooled_k, pooled_v, scale, return_lse) -> BackendResult:
    """CLEAR attention as one SDPA call with the dense mask (``dispatch.AttentionBackend``)."""
    k, v = with_pooled_keys(k, v, pooled_k, pooled_v)
    mask = allowed_mask(layout, radius, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    lse = None
    if return_lse:
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        lse = scores.masked_fill(~mask, float("-inf")).logsumexp(dim=-1)
    return out, lse
