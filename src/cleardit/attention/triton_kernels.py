"""Fused Triton kernels for CLEAR attention: block-sparse over image tiles, forward and backward.

Design
------
Every token of the joint sequence belongs to one *block* of at most ``TILE`` tokens (128 on a GPU):
  * text blocks: TILE consecutive text tokens;
  * image blocks: rectangles of the token grid whose tokens are contiguous in the sequence, stored
    row-major inside the rectangle (token ``l`` sits at ``(y0 + l // bw, x0 + l % bw)``). With a
    tile-major layout whose tile holds TILE tokens (``preferred_tile()`` = (8, 16)) every tile is
    one compact block: the fast case. Any other order works in place, without copies: a raster
    layout gives blocks of whole rows (or 1 x TILE row segments on wide grids), larger tiles are
    cut into row bands, bottom/right edge tiles are smaller blocks;
  * pooled blocks: TILE consecutive pooled keys (their own tensors).

Video (``layout.frames > 1``): every block lies in one frame (a (tt, th, tw) tile is tt one-frame
rectangles), its frame is a column of the block table, and the bound between two image blocks is
``frame_thresholds[|dt|]`` of their frame offset instead of r^2 (``VIDEO`` constexpr: the image
kernels compile exactly as without it).

The host classifies every (query block, key block) pair once per layout/radius/device (cached):
*full* (every token pair allowed: no mask), *partial* (the disc boundary crosses it: the mask is
computed arithmetically from the block rectangles, never loaded) or absent. Text rows and columns
and pooled columns are full by the rule. The kernels then only walk two CSR lists per block:

  * forward and dq, one program per query block: its full key blocks, then its partial key blocks,
    in one online softmax (exp2 domain, fp32 statistics and accumulators);
  * dk/dv, one program per key block: the transposed lists (queries of that key block);
  * a small kernel first computes ``delta = rowsum(dO * O) - dlse``, which is how the gradient of
    the returned log-sum-exp enters (d lse_i / d s_ij = p_ij).

Programs of the long, dense rows (text queries; text and pooled keys in dk/dv) are numbered first
so that they start first. A plain loop over a list (instead of one loop per kind of key) keeps one
set of pipelined shared-memory buffers per kernel.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from .dispatch import BackendResult
from .layout import TokenLayout, check_radius, frame_thresholds

try:  # triton is optional: the CPU backends never need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """True when the Triton kernels can run: triton importable and a CUDA device (or the interpreter)."""
    if triton is None:
        return False
    if _interpreting():
        return True
    return torch.cuda.is_available()


def _default_tile_tokens(head_dim: int) -> int:
    if _interpreting():
        return 32
    return 128 if head_dim <= 128 else 64


def preferred_tile(head_dim: int = 128) -> tuple[int, int]:
    """The (th, tw) tile-major order that makes every image tile exactly one kernel block (the fast
    case): (8, 16) on a GPU for head_dim <= 128."""
    tokens = _default_tile_tokens(head_dim)
    th = 1 << (int(math.log2(tokens)) // 2)
    return th, tokens // th


# ------------------------------------------------------------------------------------------------
# Host side: blocks and the block-sparse lists (cached per layout, radius, block size, device).
# ------------------------------------------------------------------------------------------------


def _regions(height: int, width: int, tile: tuple[int, int] | None) -> list[tuple[int, int, int, int, int]]:
    """Contiguous row-major rectangles of the image segment: (start, y0, x0, h, w) in sequence order."""
    if tile is None:
        return [(0, 0, 0, height, width)]
    th, tw = tile
    out, start = [], 0
    for y0 in range(0, height, th):
        h = min(th, height - y0)
        for x0 in range(0, width, tw):
            w = min(tw, width - x0)
            out.append((start, y0, x0, h, w))
            start += h * w
    return out


def _region_blocks(start: int, y0: int, x0: int, h: int, w: int, tile_tokens: int) -> list[tuple]:
    """Blocks (start, y0, x0, bw, size) of one contiguous row-major h x w rectangle."""
    if w > tile_tokens:  # row segments
        return [
            (start + ry * w + cx, y0 + ry, x0 + cx, min(tile_tokens, w - cx), min(tile_tokens, w - cx))
            for ry in range(h)
            for cx in range(0, w, tile_tokens)
        ]
    rows = tile_tokens // w
    return [(start + ry * w, y0 + ry, x0, w, min(rows, h - ry) * w) for ry in range(0, h, rows)]


def image_blocks(
    height: int, width: int, tile: tuple[int, int] | None, tile_tokens: int
) -> list[tuple[int, int, int, int, int]]:
    """The kernel's image blocks: (start inside the image segment, y0, x0, bw, size), each a full
    (size // bw) x bw rectangle stored contiguously row-major, size <= tile_tokens."""
    return [b for region in _regions(height, width, tile) for b in _region_blocks(*region, tile_tokens)]


def video_blocks(layout: TokenLayout, tile_tokens: int) -> list[tuple[int, int, int, int, int, int]]:
    """``image_blocks`` of every frame of ``layout``'s grid in its token order: (start inside the image
    segment, y0, x0, bw, size, frame). A block never spans frames: a (tt, th, tw) tile holds tt
    contiguous one-frame rectangles (raster order inside the tile)."""
    if layout.tile is None:
        frame_tiles, tile2d = [(t, 1) for t in range(layout.frames)], None
    else:
        tt, th, tw = layout.tile_3d
        frame_tiles, tile2d = (
            [(t0, min(tt, layout.frames - t0)) for t0 in range(0, layout.frames, tt)],
            (th, tw),
        )
    blocks, base = [], 0
    for t0, depth in frame_tiles:  # frames t0 .. t0 + depth - 1, tile by tile
        for start, y0, x0, h, w in _regions(layout.height, layout.width, tile2d):
            for t in range(t0, t0 + depth):
                first = base + start * depth + (t - t0) * h * w
                blocks += [(*b, t) for b in _region_blocks(first, y0, x0, h, w, tile_tokens)]
        base += depth * layout.frame_len
    return blocks


def classify_block_pairs(
    blocks: torch.Tensor, radius: int, thresholds: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Int8 [nb, nb] for image blocks (rows of ``image_blocks``): 2 if every token pair of (query block
    i, key block j) has squared distance < r^2, 1 if some do, 0 if none. Video: ``blocks`` rows of
    ``video_blocks`` (frame in column 5) and the bound ``thresholds[|dt|]`` (``frame_thresholds``)."""
    blocks = blocks.to(torch.int64)
    y0, x0, bw, size = blocks[:, 1], blocks[:, 2], blocks[:, 3], blocks[:, 4]
    y1 = y0 + size // bw - 1
    x1 = x0 + bw - 1
    r2 = radius * radius
    if thresholds is not None:
        bound = torch.tensor(thresholds, dtype=torch.int64, device=blocks.device)
        frame = blocks[:, 5]
    nb = blocks.shape[0]
    out = torch.empty(nb, nb, dtype=torch.int8, device=blocks.device)
    step = max(1, (1 << 22) // max(nb, 1))
    for i0 in range(0, nb, step):
        sl = slice(i0, min(nb, i0 + step))
        qy0, qy1, qx0, qx1 = y0[sl, None], y1[sl, None], x0[sl, None], x1[sl, None]
        if thresholds is not None:  # one frame per block: one bound per block pair
            r2 = bound[(frame[sl, None] - frame[None]).abs()]
        dy_min = torch.clamp(torch.maximum(y0[None] - qy1, qy0 - y1[None]), min=0)
        dx_min = torch.clamp(torch.maximum(x0[None] - qx1, qx0 - x1[None]), min=0)
        dy_max = torch.maximum(qy1 - y0[None], y1[None] - qy0)
        dx_max = torch.maximum(qx1 - x0[None], x1[None] - qx0)
        some = dy_min * dy_min + dx_min * dx_min < r2
        full = dy_max * dy_max + dx_max * dx_max < r2
        out[sl] = some.to(torch.int8) + full.to(torch.int8)
    return out


def _csr(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = selected.sum(dim=1)
    offsets = torch.zeros(selected.shape[0] + 1, dtype=torch.int64, device=selected.device)
    offsets[1:] = torch.cumsum(counts, 0)
    idx = selected.nonzero()[:, 1]  # row-major order: grouped by row, as the offsets assume
    return offsets.to(torch.int32), idx.to(torch.int32).contiguous()


@dataclass(frozen=True)
class _Plan:
    # int32 [n_text + n_img + n_pool, 8]: start (absolute, in the sequence or the pooled keys), y0, x0,
    # bw, size, pooled flag, frame, padding; ids: text blocks, image blocks, pooled blocks
    table: torch.Tensor
    thresholds: torch.Tensor  # int32 [frames]: the squared-distance bound of each |dt| (frame_thresholds)
    n_text: int
    n_img: int
    n_pool: int
    q_full: tuple[torch.Tensor, torch.Tensor]  # CSR over query blocks [0, n_text + n_img)
    q_part: tuple[torch.Tensor, torch.Tensor]
    k_full: tuple[torch.Tensor, torch.Tensor]  # CSR over key blocks [0, n_text + n_img + n_pool)
    k_part: tuple[torch.Tensor, torch.Tensor]


@functools.lru_cache(maxsize=32)
def _plan(
    layout: TokenLayout, radius: int, tile_tokens: int, device: str, temporal_radius: int | None = None
) -> _Plan:
    t, p = layout.text_len, layout.pooled_len
    img = video_blocks(layout, tile_tokens)
    rows = [
        (layout.text_start + s, 0, 0, 1, min(tile_tokens, t - s), 0, 0, 0) for s in range(0, t, tile_tokens)
    ]
    rows += [(layout.image_start + s, y0, x0, bw, n, 0, f, 0) for s, y0, x0, bw, n, f in img]
    rows += [(s, 0, 0, 1, min(tile_tokens, p - s), 1, 0, 0) for s in range(0, p, tile_tokens)]
    nt, ni = math.ceil(t / tile_tokens), len(img)
    npool = math.ceil(p / tile_tokens)
    table = torch.tensor(rows, dtype=torch.int64, device=device)
    cls = torch.zeros(nt + ni, nt + ni + npool, dtype=torch.int8, device=device)
    cls[:nt, : nt + ni] = 2  # text queries: every text and image key
    cls[nt:, :nt] = 2  # image queries: every text key ...
    cls[nt:, nt + ni :] = 2  # ... every pooled key ...
    thresholds = frame_thresholds(radius, temporal_radius, layout.frames)
    image = table[nt : nt + ni][:, [0, 1, 2, 3, 4, 6]]  # the rows of video_blocks
    # ... and the disc (of each frame offset)
    cls[nt:, nt : nt + ni] = classify_block_pairs(image, radius, thresholds if layout.is_video else None)
    full, part = cls == 2, cls == 1
    return _Plan(
        table.to(torch.int32).contiguous(),
        torch.tensor(thresholds, dtype=torch.int32, device=device),
        nt,
        ni,
        npool,
        _csr(full),
        _csr(part),
        _csr(full.t()),
        _csr(part.t()),
    )


@dataclass(frozen=True)
class _Config:
    tile: int  # tokens per block: BLOCK_M of forward/dq, the key block of dk/dv
    fwd_n: int  # key chunk of the forward
    dq_n: int  # key chunk of dq
    dkv_m: int  # query chunk of dk/dv
    fwd_warps: int
    fwd_stages: int
    bwd_warps: int
    bwd_stages: int


def _config(head_dim: int, dtype: torch.dtype, overrides: dict) -> _Config:
    # Block sizes checked by compiling for sm_90 (no register spills, shared memory < 227 KiB).
    if _interpreting():
        tile = overrides.get("tile_tokens") or _default_tile_tokens(head_dim)
        cfg = _Config(tile, min(tile, 16), min(tile, 16), min(tile, 16), 4, 1, 4, 1)
    elif dtype == torch.float32:  # exact fp32 (no tf32) for tests: no tensor cores, small blocks
        tile = overrides.get("tile_tokens") or 32
        cfg = _Config(tile, min(tile, 32), min(tile, 32), min(tile, 32), 4, 1, 4, 1)
    else:
        tile = overrides.get("tile_tokens") or _default_tile_tokens(head_dim)
        if head_dim <= 64:
            cfg = _Config(tile, min(tile, 64), min(tile, 32), min(tile, 32), 8, 3, 8, 2)
        elif head_dim <= 128:
            cfg = _Config(tile, min(tile, 64), min(tile, 32), min(tile, 32), 8, 3, 8, 2)
        else:
            cfg = _Config(tile, min(tile, 32), min(tile, 32), min(tile, 32), 8, 2, 8, 1)
    fields = {k: overrides[k] for k in ("fwd_n", "dq_n", "dkv_m") if overrides.get(k)}
    if fields:
        cfg = _Config(**{**cfg.__dict__, **fields})
    for name in ("tile", "fwd_n", "dq_n", "dkv_m"):
        value = getattr(cfg, name)
        if value < 1 or value & (value - 1):
            raise ValueError(f"triton block size {name}={value} must be a power of two")
    for name in ("fwd_n", "dq_n", "dkv_m"):
        if cfg.tile % getattr(cfg, name):
            raise ValueError(f"triton chunk {name}={getattr(cfg, name)} must divide the tile ({cfg.tile})")
    if not _interpreting() and min(cfg.tile, cfg.fwd_n, cfg.dq_n, cfg.dkv_m) < 16:
        raise ValueError("on a GPU every triton block size must be >= 16 (tl.dot)")
    return cfg


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


def _device_fn(fn):
    """``triton.jit`` for the helpers the kernels call (inlined by the compiler on a GPU).

    In Triton's CPU interpreter (``TRITON_INTERPRET=1``, the tests) a kernel already runs as Python
    with ``triton.language`` patched, and a nested jit call patches it again on every call (about
    0.25 ms, as long as a whole chunk of work): there the helpers are the interpreter's rewritten
    Python functions, called directly.
    """
    jitted = triton.jit(fn)
    rewrite = getattr(jitted, "rewrite", None)  # only the interpreter's InterpretedFunction has it
    return rewrite() if rewrite is not None else jitted


# fmt: off
if triton is not None:

    @_device_fn
    def _load_rows(base, offs, s_n, valid, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
        ptrs = base + offs[:, None] * s_n + offs_d[None, :]
        if EVEN_D:
            x = tl.load(ptrs, mask=valid[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        return x

    @_device_fn
    def _store_rows(base, offs, s_n, valid, offs_d, x, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
        ptrs = base + offs[:, None] * s_n + offs_d[None, :]
        if EVEN_D:
            tl.store(ptrs, x, mask=valid[:, None])
        else:
            tl.store(ptrs, x, mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM))

    @_device_fn
    def _block(BLK, bid):
        """Row ``bid`` of the block table: (first token as int64, y0, x0, bw, size, pooled)."""
        row = BLK + bid * 8
        first = tl.load(row).to(tl.int64)
        pooled = tl.load(row + 5) != 0
        return first, tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), pooled

    @_device_fn
    def _block_cells(BLK, bid, offs):
        """Block ``bid`` as the rows of a program: (first token, pooled, validity of ``offs`` and the
        (row, col) of those tokens in fp32)."""
        first, y0, x0, bw, size, pooled = _block(BLK, bid)
        rows = (y0 + offs // bw).to(tl.float32)
        cols = (x0 + offs % bw).to(tl.float32)
        return first, pooled, offs < size, rows, cols

    @_device_fn
    def _pair_r2(BLK, THR, qid, kid, r2, VIDEO: tl.constexpr):
        """The squared-distance bound between image blocks qid and kid: r2, or on a video the bound
        of their frame offset, ``THR[|dt|]`` (each block lies in one frame)."""
        if VIDEO:
            dt = tl.load(BLK + qid * 8 + 6) - tl.load(BLK + kid * 8 + 6)
            r2 = tl.load(THR + tl.abs(dt)).to(tl.float32)
        return r2

    @_device_fn
    def _disc_mask(ar, ac, offs, valid, y0, x0, bw, r2):
        """The rule between image tokens: [len(ar), len(offs)], True where token (ar, ac) and token
        ``offs`` of the block rectangle (y0, x0, width bw) have dy^2 + dx^2 < r2.

        The block token's (row, col) is computed in fp32 (exact for these small integers; no integer
        division); tokens past the block's end (``~valid``) are moved far away, so one compare masks
        both."""
        o = offs.to(tl.float32)
        bwf = bw.to(tl.float32)
        lr = tl.floor((o + 0.5) / bwf)
        br = tl.where(valid, y0 + lr, 1.0e6)
        bc = x0 + (o - lr * bwf)
        dy = ar[:, None] - br[None, :]
        dx = ac[:, None] - bc[None, :]
        return dy * dy + dx * dx < r2

    @_device_fn
    def _kv_bases(first, pooled, k_bh, v_bh, pk_bh, pv_bh, skn, svn, HAS_POOL: tl.constexpr):
        """K and V pointers of a key block's first token: pooled blocks live in their own tensors."""
        if HAS_POOL:
            kb = tl.where(pooled, pk_bh, k_bh) + first * skn
            vb = tl.where(pooled, pv_bh, v_bh) + first * svn
        else:
            kb = k_bh + first * skn
            vb = v_bh + first * svn
        return kb, vb

    @_device_fn
    def _key_chunk(
        acc, l_i, m_i, q, do, lse2, delta, qr, qc, k_base, v_base, skn, svn, offs, count, ky0, kx0, kbw, r2,
        qk_scale, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASK: tl.constexpr,
        BACKWARD: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """One chunk of keys for a query block. Forward: the online softmax (acc, l_i, m_i). dq
        (BACKWARD): acc is dq, from the saved lse (lse2, log2 domain) and delta; l_i, m_i pass through."""
        kvalid = offs < count
        k = _load_rows(k_base, offs, skn, kvalid, offs_d, HEAD_DIM, EVEN_D)
        v = _load_rows(v_base, offs, svn, kvalid, offs_d, HEAD_DIM, EVEN_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASK:
            ok = _disc_mask(qr, qc, offs, kvalid, ky0, kx0, kbw, r2)
        else:
            ok = kvalid[None, :]
        if BACKWARD:
            p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            acc += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        else:
            s = tl.where(ok, s, float("-inf"))
            # m starts at -1e30 (finite), so a row whose keys are all masked so far never makes NaNs
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
        return acc, l_i, m_i

    @_device_fn
    def _walk_key_blocks(
        acc, l_i, m_i, q, do, lse2, delta, qr, qc, qid, BLK, FOFF, FIDX, POFF, PIDX, THR, k_bh, v_bh, pk_bh,
        pv_bh, skn, svn, r2, qk_scale, offs_d, TILE: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, HAS_POOL: tl.constexpr, BACKWARD: tl.constexpr,
        DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, VIDEO: tl.constexpr,
    ):
        """The forward's and dq's walk over the key blocks of query block ``qid``, in chunks of BLOCK_N
        keys: first the full ones (text, image blocks inside the disc, pooled: no mask), then the
        image blocks the disc boundary crosses. See ``_key_chunk`` for the state."""
        offs_n = tl.arange(0, BLOCK_N)
        for j in range(tl.load(FOFF + qid), tl.load(FOFF + qid + 1)):
            k0, _, _, _, ksize, pooled = _block(BLK, tl.load(FIDX + j))
            kb, vb = _kv_bases(k0, pooled, k_bh, v_bh, pk_bh, pv_bh, skn, svn, HAS_POOL)
            for c in tl.static_range(TILE // BLOCK_N):
                acc, l_i, m_i = _key_chunk(
                    acc, l_i, m_i, q, do, lse2, delta, qr, qc, kb, vb, skn, svn, offs_n + c * BLOCK_N, ksize,
                    0, 0, 1, r2, qk_scale, offs_d, HEAD_DIM, EVEN_D, False, BACKWARD, DOT_PREC, UPCAST,
                )
        for j in range(tl.load(POFF + qid), tl.load(POFF + qid + 1)):
            kid = tl.load(PIDX + j)
            k0, ky0, kx0, kbw, ksize, _ = _block(BLK, kid)
            kr2 = _pair_r2(BLK, THR, qid, kid, r2, VIDEO)
            for c in tl.static_range(TILE // BLOCK_N):
                acc, l_i, m_i = _key_chunk(
                    acc, l_i, m_i, q, do, lse2, delta, qr, qc, k_bh + k0 * skn, v_bh + k0 * svn, skn, svn,
                    offs_n + c * BLOCK_N, ksize, ky0, kx0, kbw, kr2, qk_scale, offs_d, HEAD_DIM, EVEN_D, True,
                    BACKWARD, DOT_PREC, UPCAST,
                )
        return acc, l_i, m_i

    @_device_fn
    def _query_program(pid, BH, H, n_text, n_img):
        """(bh, b, h, query block id): text query blocks first (long rows start first), then image blocks."""
        n_text_prog = BH * n_text
        if pid < n_text_prog:
            bh = pid % BH
            qid = pid // BH
        else:
            bh = (pid - n_text_prog) // n_img
            qid = n_text + (pid - n_text_prog) % n_img
        return bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), qid

    @triton.jit(do_not_specialize=["BH", "H", "N", "n_text", "n_img", "r2"])
    def _clear_fwd_kernel(
        Q, K, V, PK, PV, Out, LSE, BLK, FOFF, FIDX, POFF, PIDX, THR,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, spkb, spkh, spvb, spvh, sob, soh, son,
        BH, H, N, n_text, n_img, r2, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr,
        EVEN_D: tl.constexpr, HAS_POOL: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
        VIDEO: tl.constexpr,
    ):
        bh, b, h, qid = _query_program(tl.program_id(0), BH, H, n_text, n_img)
        offs_m = tl.arange(0, TILE)
        offs_d = tl.arange(0, BLOCK_D)
        q_first, _, qvalid, qr, qc = _block_cells(BLK, qid, offs_m)
        q = _load_rows(Q + b * sqb + h * sqh + q_first * sqn, offs_m, sqn, qvalid, offs_d, HEAD_DIM, EVEN_D)
        if UPCAST:  # the CPU interpreter has no bf16 tl.dot: emulate it in fp32
            q = q.to(tl.float32)
        m_i = tl.full([TILE], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([TILE], dtype=tl.float32)
        acc = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
        acc, l_i, m_i = _walk_key_blocks(  # do, lse2, delta: unused in the forward
            acc, l_i, m_i, q, q, l_i, l_i, qr, qc, qid, BLK, FOFF, FIDX, POFF, PIDX, THR,
            K + b * skb + h * skh, V + b * svb + h * svh, PK + b * spkb + h * spkh, PV + b * spvb + h * spvh,
            skn, svn, r2, qk_scale, offs_d, TILE, BLOCK_N, HEAD_DIM, EVEN_D, HAS_POOL, False, DOT_PREC,
            UPCAST, VIDEO,
        )
        l_i = tl.where(l_i > 0.0, l_i, 1.0)  # only rows past the end of an edge block have l = 0
        out = acc / l_i[:, None]
        _store_rows(Out + b * sob + h * soh + q_first * son, offs_m, son, qvalid, offs_d,
                    out.to(Out.dtype.element_ty), HEAD_DIM, EVEN_D)
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
        tl.store(LSE + bh.to(tl.int64) * N + q_first + offs_m, lse, mask=qvalid)

    # ---- backward: delta = rowsum(dO * O) - dlse ----------------------------------------------------
    @triton.jit(do_not_specialize=["N", "H"])
    def _bwd_delta_kernel(
        Out, DO, DLSE, DELTA, sob, soh, son, sdob, sdoh, sdon, N, H,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, EVEN_D: tl.constexpr,
        HAS_DLSE: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        valid = rows < N
        o = _load_rows(Out + b * sob + h * soh, rows, son, valid, offs_d, HEAD_DIM, EVEN_D).to(tl.float32)
        do = _load_rows(DO + b * sdob + h * sdoh, rows, sdon, valid, offs_d, HEAD_DIM, EVEN_D).to(tl.float32)
        delta = tl.sum(o * do, 1)
        if HAS_DLSE:
            delta -= tl.load(DLSE + bh.to(tl.int64) * N + rows, mask=valid, other=0.0)
        tl.store(DELTA + bh.to(tl.int64) * N + rows, delta, mask=valid)

    # ---- backward: dq -------------------------------------------------------------------------------
    @triton.jit(do_not_specialize=["BH", "H", "N", "n_text", "n_img", "r2"])
    def _clear_dq_kernel(
        Q, K, V, PK, PV, DO, LSE, DELTA, DQ, BLK, FOFF, FIDX, POFF, PIDX, THR,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, spkb, spkh, spvb, spvh, sdob, sdoh, sdon, sgb, sgh, sgn,
        BH, H, N, n_text, n_img, r2, qk_scale, sm_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr,
        EVEN_D: tl.constexpr, HAS_POOL: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
        VIDEO: tl.constexpr,
    ):
        bh, b, h, qid = _query_program(tl.program_id(0), BH, H, n_text, n_img)
        offs_m = tl.arange(0, TILE)
        offs_d = tl.arange(0, BLOCK_D)
        q_first, _, qvalid, qr, qc = _block_cells(BLK, qid, offs_m)
        q = _load_rows(Q + b * sqb + h * sqh + q_first * sqn, offs_m, sqn, qvalid, offs_d, HEAD_DIM, EVEN_D)
        do = _load_rows(DO + b * sdob + h * sdoh + q_first * sdon, offs_m, sdon, qvalid, offs_d, HEAD_DIM,
                        EVEN_D)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        row = bh.to(tl.int64) * N + q_first + offs_m
        lse2 = tl.load(LSE + row, mask=qvalid, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row, mask=qvalid, other=0.0)
        dq = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
        dq, _, _ = _walk_key_blocks(
            dq, lse2, delta, q, do, lse2, delta, qr, qc, qid, BLK, FOFF, FIDX, POFF, PIDX, THR,
            K + b * skb + h * skh, V + b * svb + h * svh, PK + b * spkb + h * spkh, PV + b * spvb + h * spvh,
            skn, svn, r2, qk_scale, offs_d, TILE, BLOCK_N, HEAD_DIM, EVEN_D, HAS_POOL, True, DOT_PREC, UPCAST,
            VIDEO,
        )
        _store_rows(DQ + b * sgb + h * sgh + q_first * sgn, offs_m, sgn, qvalid, offs_d,
                    (dq * sm_scale).to(DQ.dtype.element_ty), HEAD_DIM, EVEN_D)

    # ---- backward: dk, dv ---------------------------------------------------------------------------
    @_device_fn
    def _dkdv_chunk(
        dk, dv, k, v, kr, kc, q_base, do_base, lse_ptr, delta_ptr, sqn, sdon, offs, count, qy0, qx0, qbw, r2,
        qk_scale, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASK: tl.constexpr,
        DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        qvalid = offs < count
        q = _load_rows(q_base, offs, sqn, qvalid, offs_d, HEAD_DIM, EVEN_D)
        do = _load_rows(do_base, offs, sdon, qvalid, offs_d, HEAD_DIM, EVEN_D)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # missing query rows get lse = +inf, hence p = 0
        lse2 = tl.load(lse_ptr + offs, mask=qvalid, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + offs, mask=qvalid, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        pt = tl.exp2(st - lse2[None, :])
        if MASK:
            pt = tl.where(_disc_mask(kr, kc, offs, qvalid, qy0, qx0, qbw, r2), pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
        return dk, dv

    @triton.jit(do_not_specialize=["BH", "H", "N", "n_text", "n_img", "n_pool", "r2"])
    def _clear_dkdv_kernel(
        Q, K, V, PK, PV, DO, LSE, DELTA, DK, DV, DPK, DPV, BLK, FOFF, FIDX, POFF, PIDX, THR,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, spkb, spkh, spvb, spvh, sdob, sdoh, sdon,
        sgb, sgh, sgn, spgb, spgh,
        BH, H, N, n_text, n_img, n_pool, r2, qk_scale, sm_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr, BLOCK_M: tl.constexpr,
        EVEN_D: tl.constexpr, HAS_POOL: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
        VIDEO: tl.constexpr,
    ):
        # key block ids: text [0, n_text), image [n_text, n_text + n_img), pooled after; the long
        # ones (text keys: every query; pooled keys: every image query) get the first programs
        pid = tl.program_id(0)
        n_long = BH * (n_text + n_pool)
        if pid < n_long:
            bh = pid % BH
            i = pid // BH
            kid = tl.where(i < n_text, i, i + n_img)
        else:
            bh = (pid - n_long) // n_img
            kid = n_text + (pid - n_long) % n_img
        offs_k = tl.arange(0, TILE)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        k_first, pooled, kvalid, kr, kc = _block_cells(BLK, kid, offs_k)
        k_src, v_src = _kv_bases(k_first, pooled, K + b * skb + h * skh, V + b * svb + h * svh,
                                 PK + b * spkb + h * spkh, PV + b * spvb + h * spvh, skn, svn, HAS_POOL)
        k = _load_rows(k_src, offs_k, skn, kvalid, offs_d, HEAD_DIM, EVEN_D)
        v = _load_rows(v_src, offs_k, svn, kvalid, offs_d, HEAD_DIM, EVEN_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        q_bh = Q + b * sqb + h * sqh
        do_bh = DO + b * sdob + h * sdoh
        row_bh = bh.to(tl.int64) * N
        dk = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
        # query blocks that see every key of this block
        for j in range(tl.load(FOFF + kid), tl.load(FOFF + kid + 1)):
            q0, _, _, _, qsize, _ = _block(BLK, tl.load(FIDX + j))
            for c in tl.static_range(TILE // BLOCK_M):
                dk, dv = _dkdv_chunk(
                    dk, dv, k, v, kr, kc, q_bh + q0 * sqn, do_bh + q0 * sdon, LSE + row_bh + q0,
                    DELTA + row_bh + q0, sqn, sdon, offs_m + c * BLOCK_M, qsize, 0, 0, 1, r2, qk_scale,
                    offs_d, HEAD_DIM, EVEN_D, False, DOT_PREC, UPCAST,
                )
        # image query blocks across the disc boundary
        for j in range(tl.load(POFF + kid), tl.load(POFF + kid + 1)):
            qid = tl.load(PIDX + j)
            q0, qy0, qx0, qbw, qsize, _ = _block(BLK, qid)
            qr2 = _pair_r2(BLK, THR, qid, kid, r2, VIDEO)
            for c in tl.static_range(TILE // BLOCK_M):
                dk, dv = _dkdv_chunk(
                    dk, dv, k, v, kr, kc, q_bh + q0 * sqn, do_bh + q0 * sdon, LSE + row_bh + q0,
                    DELTA + row_bh + q0, sqn, sdon, offs_m + c * BLOCK_M, qsize, qy0, qx0, qbw, qr2, qk_scale,
                    offs_d, HEAD_DIM, EVEN_D, True, DOT_PREC, UPCAST,
                )
        dk = (dk * sm_scale).to(DK.dtype.element_ty)
        dv = dv.to(DV.dtype.element_ty)
        if HAS_POOL:
            g0 = tl.where(pooled, b * spgb + h * spgh, b * sgb + h * sgh) + k_first * sgn
            dk_dst = tl.where(pooled, DPK, DK) + g0
            dv_dst = tl.where(pooled, DPV, DV) + g0
        else:
            g0 = b * sgb + h * sgh + k_first * sgn
            dk_dst = DK + g0
            dv_dst = DV + g0
        _store_rows(dk_dst, offs_k, sgn, kvalid, offs_d, dk, HEAD_DIM, EVEN_D)
        _store_rows(dv_dst, offs_k, sgn, kvalid, offs_d, dv, HEAD_DIM, EVEN_D)

# fmt: on


# ------------------------------------------------------------------------------------------------
# Launchers and autograd
# ------------------------------------------------------------------------------------------------


def _meta(q: torch.Tensor, cfg: _Config, layout: TokenLayout) -> dict:
    d = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    upcast = _interpreting() and q.dtype == torch.bfloat16
    return {
        "HEAD_DIM": d,
        "BLOCK_D": block_d,
        "TILE": cfg.tile,
        "EVEN_D": block_d == d,
        "DOT_PREC": "ieee" if q.dtype == torch.float32 or upcast else "tf32",
        "UPCAST": upcast,
        "VIDEO": layout.is_video,  # 2D compiles exactly the image kernels (no per-pair bound loads)
    }


def _hb(x: torch.Tensor) -> tuple[int, int]:
    return x.stride(0), x.stride(1)


def _forward(q, k, v, pk, pv, layout, rule, scale, cfg):
    radius, temporal_radius = rule
    plan = _plan(layout, radius, cfg.tile, str(q.device), temporal_radius)
    b, h, n, d = q.shape
    out = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    has_pool = pk is not None
    pk_, pv_ = (pk, pv) if has_pool else (k, v)
    grid = (b * h * (plan.n_text + plan.n_img),)
    _clear_fwd_kernel[grid](
        q, k, v, pk_, pv_, out, lse, plan.table, *plan.q_full, *plan.q_part, plan.thresholds,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *_hb(pk_), *_hb(pv_), *out.stride()[:3],
        b * h, h, n, plan.n_text, plan.n_img, float(radius * radius), scale * _LOG2E,
        BLOCK_N=cfg.fwd_n, HAS_POOL=has_pool, num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
        **_meta(q, cfg, layout),
    )  # fmt: skip
    return out, lse


def _backward(q, k, v, pk, pv, out, lse, dout, dlse, layout, rule, scale, cfg):
    radius, temporal_radius = rule
    plan = _plan(layout, radius, cfg.tile, str(q.device), temporal_radius)
    meta = _meta(q, cfg, layout)
    b, h, n, d = q.shape
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    delta = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    has_dlse = dlse is not None
    dlse_ = dlse.float().contiguous() if has_dlse else delta
    rows = 64
    _bwd_delta_kernel[(triton.cdiv(n, rows), b * h)](
        out, dout, dlse_, delta, *out.stride()[:3], *dout.stride()[:3], n, h,
        HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK=rows, EVEN_D=meta["EVEN_D"], HAS_DLSE=has_dlse,
    )  # fmt: skip

    has_pool = pk is not None
    pk_, pv_ = (pk, pv) if has_pool else (k, v)
    dq = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    if has_pool:  # same per-token stride (d) as dk/dv: the kernel stores both with one stride
        dpk = torch.empty(pk.shape, dtype=q.dtype, device=q.device)
        dpv = torch.empty(pv.shape, dtype=q.dtype, device=q.device)
    else:
        dpk = dpv = dk  # never written
    grid = (b * h * (plan.n_text + plan.n_img),)
    _clear_dq_kernel[grid](
        q, k, v, pk_, pv_, dout, lse, delta, dq, plan.table, *plan.q_full, *plan.q_part, plan.thresholds,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *_hb(pk_), *_hb(pv_), *dout.stride()[:3],
        *dq.stride()[:3],
        b * h, h, n, plan.n_text, plan.n_img, float(radius * radius), scale * _LOG2E, scale,
        BLOCK_N=cfg.dq_n, HAS_POOL=has_pool, num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages, **meta,
    )  # fmt: skip
    grid = (b * h * (plan.n_text + plan.n_img + plan.n_pool),)
    _clear_dkdv_kernel[grid](
        q, k, v, pk_, pv_, dout, lse, delta, dk, dv, dpk, dpv, plan.table, *plan.k_full, *plan.k_part,
        plan.thresholds,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *_hb(pk_), *_hb(pv_), *dout.stride()[:3],
        *dk.stride()[:3], *_hb(dpk),
        b * h, h, n, plan.n_text, plan.n_img, plan.n_pool, float(radius * radius), scale * _LOG2E, scale,
        BLOCK_M=cfg.dkv_m, HAS_POOL=has_pool, num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages, **meta,
    )  # fmt: skip
    return dq, dk, dv, (dpk if has_pool else None), (dpv if has_pool else None)


class _ClearAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, layout, rule, scale, cfg):
        out, lse = _forward(q, k, v, pk, pv, layout, rule, scale, cfg)
        ctx.save_for_backward(q, k, v, pk, pv, out, lse)
        ctx.layout, ctx.rule, ctx.scale, ctx.cfg = layout, rule, scale, cfg
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, pk, pv, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        grads = _backward(q, k, v, pk, pv, out, lse, dout, dlse, ctx.layout, ctx.rule, ctx.scale, ctx.cfg)
        return (*grads, None, None, None, None)


def _with_token_stride(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """``x`` [B, h, P, d] laid out with the same per-token stride as ``like``, or None if not simple."""
    if x.stride(2) == like.stride(2) and x.stride(3) == 1:
        return x
    d, heads = like.shape[3], like.shape[1]
    if like.stride(2) == d:
        return x.contiguous()
    if like.stride(2) == heads * d and like.stride(1) == d:  # [B, N, h, d] memory, e.g. from FLUX
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return None


def triton_clear_attention(
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
    *,
    tile_tokens: int | None = None,
    fwd_n: int | None = None,
    dq_n: int | None = None,
    dkv_m: int | None = None,
) -> BackendResult:
    """CLEAR attention with the fused Triton kernels (``dispatch.AttentionBackend``).

    q, k, v: [B, heads, N, d], fp16/bf16/fp32, any strides with a unit last stride (used in place).
    pooled_k / pooled_v: [B, heads, P, d] or None. Differentiable in q, k, v, pooled_k and pooled_v,
    including through the returned lse. The keyword-only block sizes are for tests and tuning:
    ``tile_tokens`` caps a block's tokens (128 on a GPU; use ``preferred_tile()`` as the layout's tile
    for the fast path), the others are the key/query chunks of the three kernels (powers of two
    dividing ``tile_tokens``).
    """
    if triton is None:
        raise RuntimeError("the triton backend needs the `triton` package (pip install triton)")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"the triton backend needs CUDA tensors (got {q.device}); use backend='tiled' on the CPU, "
            "or set TRITON_INTERPRET=1 before importing triton to run the kernels in the interpreter"
        )
    radius = check_radius(radius)
    layout.check_qkv(q, k, v)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton backend supports float16, bfloat16 and float32, got {q.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"triton backend supports head_dim <= 256, got {q.shape[-1]}")
    has_pool = pooled_k is not None
    if has_pool != (layout.down_factor is not None) or (pooled_v is None) != (pooled_k is None):
        raise ValueError("pooled_k/pooled_v must be given exactly when the layout has a down_factor")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if has_pool:
        expect = (*q.shape[:2], layout.pooled_len, q.shape[-1])
        for name, t in (("pooled_k", pooled_k), ("pooled_v", pooled_v)):
            if tuple(t.shape) != expect:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expect}")
        # the kernels address pooled and image keys with one per-token stride
        pooled_k, pooled_v = pooled_k.to(q.dtype), pooled_v.to(q.dtype)
        pk, pv = _with_token_stride(pooled_k, k), _with_token_stride(pooled_v, v)
        if pk is None or pv is None:
            k, v = k.contiguous(), v.contiguous()
            pk, pv = pooled_k.contiguous(), pooled_v.contiguous()
        pooled_k, pooled_v = pk, pv
    blocks = {"tile_tokens": tile_tokens, "fwd_n": fwd_n, "dq_n": dq_n, "dkv_m": dkv_m}
    cfg = _config(q.shape[-1], q.dtype, blocks)
    rule = (radius, None if temporal_radius is None or not layout.is_video else int(temporal_radius))
    out, lse = _ClearAttentionFn.apply(q, k, v, pooled_k, pooled_v, layout, rule, float(scale), cfg)
    return out, (lse if return_lse else None)


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile check (no GPU needed)
# ------------------------------------------------------------------------------------------------

_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_FP32_PTRS = ("LSE", "DELTA", "DLSE")
_INT_PTRS = ("BLK", "FOFF", "FIDX", "POFF", "PIDX", "THR")
_INT_SCALARS = ("BH", "H", "N")
# largest dynamic shared memory per block, by compute capability major.minor * 10
_SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def compile_for_gpu(
    arch: int = 90,
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 128,
    has_pool: bool = True,
    video: bool = False,
) -> dict[str, int]:
    """Compile every kernel for an NVIDIA GPU of compute capability ``arch`` (90 = H100) without a
    GPU, with the block sizes the wrapper would launch; returns {kernel: shared memory bytes}.

    Catches what the CPU interpreter cannot: type errors of the compiled language, unsupported
    constructs and blocks that do not fit in shared memory. Needs a process where TRITON_INTERPRET
    is unset when this module is imported (e.g. ``python -c "from cleardit.attention.triton_kernels
    import compile_for_gpu; print(compile_for_gpu())"``).
    """
    if triton is None:
        raise RuntimeError("compile_for_gpu needs triton")
    if _interpreting() or not hasattr(_clear_fwd_kernel, "arg_names"):
        raise RuntimeError("compile_for_gpu needs the compiled kernels: unset TRITON_INTERPRET and re-import")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        cfg = _config(head_dim, dtype, {})
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    block_d = max(16, triton.next_power_of_2(head_dim))
    base = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d,
        "TILE": cfg.tile,
        "EVEN_D": block_d == head_dim,
        "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST": False,
        "VIDEO": video,
    }
    even = block_d == head_dim
    delta_consts = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK": 64, "EVEN_D": even, "HAS_DLSE": True}
    launches = [
        (
            _clear_fwd_kernel,
            {**base, "BLOCK_N": cfg.fwd_n, "HAS_POOL": has_pool},
            cfg.fwd_warps,
            cfg.fwd_stages,
        ),
        (_bwd_delta_kernel, delta_consts, 4, 3),
        (
            _clear_dq_kernel,
            {**base, "BLOCK_N": cfg.dq_n, "HAS_POOL": has_pool},
            cfg.bwd_warps,
            cfg.bwd_stages,
        ),
        (
            _clear_dkdv_kernel,
            {**base, "BLOCK_M": cfg.dkv_m, "HAS_POOL": has_pool},
            cfg.bwd_warps,
            cfg.bwd_stages,
        ),
    ]
    result = {}
    for fn, consts, warps, stages in launches:
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                signature[name] = "constexpr"
            elif name in _INT_SCALARS or name.startswith("n_"):
                signature[name] = "i32"
            elif name in ("qk_scale", "sm_scale", "r2"):
                signature[name] = "fp32"
            elif name[0].isupper():
                kind = (
                    "fp32" if name in _FP32_PTRS else "i32" if name in _INT_PTRS else _TORCH_TO_TRITON[dtype]
                )
                signature[name] = "*" + kind
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:  # strides: multiples of 16 elements for the head dims the launcher specialises on
                signature[name] = "i32"
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, signature, consts, attrs)
        kernel = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages}
        )
        shared = int(kernel.metadata.shared)
        limit = _SHARED_LIMIT.get(arch)
        if limit is not None and shared > limit:
            raise RuntimeError(f"{fn.__name__} needs {shared} bytes of shared memory, sm_{arch} has {limit}")
        result[fn.__name__] = shared
    return result
