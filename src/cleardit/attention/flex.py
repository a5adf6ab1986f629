"""FlexAttention backend: the CLEAR rule as a ``mask_mod``, with block masks cached per geometry.

Compiled (``torch.compile``) it is a GPU fallback for the Triton kernel; on the CPU it is
selectable for comparison. The block mask works in whatever token order the layout uses, so a
tile-major layout gives it dense, well-filled blocks.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

from .dispatch import BackendResult
from .layout import TokenLayout, frame_thresholds
from .pooling import with_pooled_keys

_TEXT, _IMAGE, _POOLED = 0, 1, 2


def _token_tables(layout: TokenLayout, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per key index (text, image, then pooled): kind, frame, row, col. Queries use the first N entries."""
    n, p = layout.seq_len, layout.pooled_len
    kind = torch.full((n + p,), _IMAGE, dtype=torch.int32, device=device)
    kind[layout.text_slice] = _TEXT
    kind[n:] = _POOLED
    frame, row, col = (torch.zeros(n + p, dtype=torch.int32, device=device) for _ in range(3))
    f, r, c = layout.image_coordinates(device)
    isl = layout.image_slice
    frame[isl], row[isl], col[isl] = f.int(), r.int(), c.int()
    return kind, frame, row, col


def clear_mask_mod(
    layout: TokenLayout, radius: int, device: torch.device, temporal_radius: int | None = None
):
    """A FlexAttention mask_mod for the CLEAR rule on ``layout``."""
    kind, frame, row, col = _token_tables(layout, device)
    r2 = radius * radius
    # video: the squared-distance bound of each frame offset |dt| (layout.frame_thresholds)
    thresholds = torch.tensor(frame_thresholds(radius, temporal_radius, layout.frames), device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        q_kind, k_kind = kind[q_idx], kind[kv_idx]
        dy = row[q_idx] - row[kv_idx]
        dx = col[q_idx] - col[kv_idx]
        q_text = q_kind == _TEXT
        k_text = k_kind == _TEXT
        k_pooled = k_kind == _POOLED
        if layout.is_video:
            bound = thresholds[(frame[q_idx] - frame[kv_idx]).abs()]
        else:
            bound = r2
        near = (q_kind == _IMAGE) & (k_kind == _IMAGE) & (dy * dy + dx * dx < bound)
        return (q_text & ~k_pooled) | k_text | (~q_text & k_pooled) | near

    return mask_mod


@functools.lru_cache(maxsize=32)
def clear_block_mask(
    layout: TokenLayout,
    radius: int,
    device: torch.device,
    block_size: int = 128,
    temporal_radius: int | None = None,
) -> BlockMask:
    """The block mask for (layout, radius, temporal radius, device), built once and cached."""
    n = layout.seq_len
    return create_block_mask(
        clear_mask_mod(layout, radius, device, temporal_radius),
        None,
        None,
        n,
        n + layout.pooled_len,
        device=device,
        BLOCK_SIZE=block_size,
        # Eager construction materialises the mask through vmap (257 GiB asked at 2K on an H200);
        # the compiled builder works block by block.
        _compile=torch.device(device).type == "cuda",
    )


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _use_compiled(device: torch.device) -> bool:
    # Compilation is where FlexAttention is fast; eager flex is a slow but exact fallback (CPU tests).
    setting = os.environ.get("CLEARDIT_FLEX_COMPILE", "auto")
    if setting == "auto":
        return device.type == "cuda"
    return setting == "1"


def flex_clear_attention(
    q,
    k,
    v,
    layout,
    radius,
    pooled_k,
    pooled_v,
    scale,
    return_lse,
    temporal_radius=None,
    compile: bool | None = None,
) -> BackendResult:
    """CLEAR attention with FlexAttention and the cached block mask (``dispatch.AttentionBackend``);
    ``compile`` overrides the choice of compiled (CUDA) or eager (CPU) flex_attention."""
    if (
        q.device.type == "cpu"
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (q, k, v, pooled_k) if t is not None)
    ):
        raise NotImplementedError(
            "the flex backend has no backward pass on the CPU (a FlexAttention limit); "
            "use backend='tiled' for training on the CPU, or run under torch.no_grad()"
        )
    k, v = with_pooled_keys(k, v, pooled_k, pooled_v)
    if torch.compiler.is_compiling():
        # inside a compiled model: flex_attention and the mask are compiled with it (no cache lookup,
        # no warning filter: both would break the graph)
        block_mask = clear_block_mask.__wrapped__(layout, radius, q.device, temporal_radius=temporal_radius)
        return _flex(flex_attention, q, k, v, block_mask, scale, return_lse)
    block_mask = clear_block_mask(layout, radius, q.device, temporal_radius=temporal_radius)
    use_compiled = _use_compiled(q.device) if compile is None else compile
    with warnings.catch_warnings():
        # eager flex is chosen on purpose here (CPU comparison / tests); its advice to compile is noise
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _flex(
            _compiled_flex() if use_compiled else flex_attention, q, k, v, block_mask, scale, return_lse
        )


def _flex(fn, q, k, v, block_mask, scale, return_lse) -> BackendResult:
    if return_lse:
        out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
        return out, aux.lse.float()
    return fn(q, k, v, block_mask=block_mask, scale=scale), None
