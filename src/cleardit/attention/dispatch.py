"""``clear_attention``: the one public entry point; checks inputs, pools, and picks a backend."""

from __future__ import annotations

import math
from typing import Protocol

import torch

from .flops import count_pairs
from .layout import TokenLayout, check_radius, check_temporal_radius
from .pooling import pool_image_tokens

BackendResult = tuple[torch.Tensor, torch.Tensor | None]


class AttentionBackend(Protocol):
    """The contract every backend (``reference``, ``tiled``, ``flex``, ``triton``) implements; the
    backends' signatures refer here for their argument types.

    Args (positional, then one keyword; ``clear_attention`` has checked them):
        q, k, v (torch.Tensor): [B, heads, N, d], N = layout.seq_len.
        layout (TokenLayout): where text and image tokens sit.
        radius (int): image queries see image keys with squared distance < radius^2.
        pooled_k, pooled_v (torch.Tensor | None): [B, heads, P, d] pooled image keys/values
            (P = layout.pooled_len), exactly when the layout has a down_factor; otherwise None.
        scale (float): softmax scale.
        return_lse (bool): also return the natural-log log-sum-exp of each query's scores.
        temporal_radius (int | None): video layouts only (``layout.frames > 1``; None for images):
            the rule per frame offset is ``layout.frame_thresholds``; None = every frame.

    Returns:
        out [B, heads, N, d] in q's dtype, and lse [B, heads, N] float32 (None unless return_lse).
    """

    def __call__(
        self, q, k, v, layout, radius, pooled_k, pooled_v, scale, return_lse, temporal_radius=None
    ) -> BackendResult: ...


def _load_backend(name: str) -> AttentionBackend:
    # Imported lazily so that e.g. a missing triton never breaks the CPU path.
    if name == "reference":
        from .reference import reference_attention

        return reference_attention
    if name == "tiled":
        from .tiled import tiled_attention

        return tiled_attention
    if name == "flex":
        from .flex import flex_clear_attention

        return flex_clear_attention
    if name == "triton":
        from .triton_kernels import triton_clear_attention

        return triton_clear_attention
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS + ('auto',)}")


BACKENDS = ("reference", "tiled", "flex", "triton")  # each runs images and videos alike


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this environment."""
    device = torch.device(device)
    names = ["reference", "tiled"]
    try:
        from torch.nn.attention import flex_attention  # noqa: F401

        names.append("flex")
    except ImportError:
        pass
    if device.type == "cuda":
        from .triton_kernels import triton_available

        if triton_available():
            names.append("triton")
    return names


# Dense masked SDPA wins when the sequence is short or the disc covers most of the grid; measured
# on the 2-core CPU (docs/benchmarks.md, "auto"): tiled is 0.5-0.95x dense at ~600 tokens and
# 1.2-10x from ~2,300 tokens at r=8. Past _DENSE_CAP_TOKENS the N x N mask itself is too big.
_DENSE_MAX_TOKENS = 1024
_DENSE_CAP_TOKENS = 4096
_DENSE_PAIR_FRACTION = 0.5


def choose_backend(
    layout: TokenLayout, device: torch.device, radius: int | None = None, temporal_radius: int | None = None
) -> str:
    """The backend ``auto`` picks for this size, radius (if known) and device."""
    n = layout.seq_len + layout.pooled_len
    if n <= _DENSE_MAX_TOKENS:
        return "reference"
    if radius is not None and n <= _DENSE_CAP_TOKENS:
        if count_pairs(layout, radius, temporal_radius) > _DENSE_PAIR_FRACTION * layout.seq_len * n:
            return "reference"
    if device.type == "cuda" and "triton" in available_backends(device):
        return "triton"
    return "tiled"


def clear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    radius: int,
    temporal_radius: int | None = None,
    *,
    pool_weight: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """CLEAR attention over a joint text+image (or text+video) sequence.

    Args:
        q, k, v: [B, heads, N, d] with N = layout.seq_len, as for F.scaled_dot_product_attention.
        layout: where text and image tokens sit (see TokenLayout); ``frames > 1`` for video.
        radius: image queries see image keys with squared distance < radius^2 (token units).
        temporal_radius: video only, in latent frames: a query sees the key at (dt, dy, dx) iff
            dt^2 r^2 + (dy^2 + dx^2) rt^2 < r^2 rt^2; None = every frame. On an image (one frame)
            it changes nothing.
        pool_weight: (df, df) weights of the pooled branch; required iff layout.down_factor is set.
        scale: softmax scale, default 1/sqrt(d).
        return_lse: also return the natural-log log-sum-exp of each query's scores, [B, heads, N] fp32.
        backend: "auto", "reference", "tiled", "flex" or "triton".

    Returns:
        out [B, heads, N, d] (and lse when return_lse).
    """
    radius = check_radius(radius)
    temporal_radius = check_temporal_radius(temporal_radius)
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a cleardit TokenLayout, got {type(layout).__name__}")
    layout.check_qkv(q, k, v)
    if not layout.is_video:
        temporal_radius = None  # one frame: dt = 0 always, the rule is the disc (caches stay 2D)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "auto":
        backend = choose_backend(layout, q.device, radius, temporal_radius)
    impl = _load_backend(backend)

    pooled_k = pooled_v = None
    if layout.down_factor is not None:
        if pool_weight is None:
            raise ValueError(
                f"layout has down_factor={layout.down_factor} but pool_weight is None; pass the "
                f"({layout.down_factor}, {layout.down_factor}) pooling weights (e.g. initial_pool_weight(df))"
            )
        pooled_k = pool_image_tokens(k, layout, pool_weight)
        pooled_v = pool_image_tokens(v, layout, pool_weight)
    elif pool_weight is not None:
        raise ValueError(
            "pool_weight was given but the layout has no down_factor; set TokenLayout.down_factor"
        )

    out, lse = impl(
        q, k, v, layout, radius, pooled_k, pooled_v, scale, return_lse, temporal_radius=temporal_radius
    )
    return (out, lse) if return_lse else out
