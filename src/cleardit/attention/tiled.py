"""The ``tiled`` backend: CLEAR attention in pure PyTorch, linear memory, the default on CPU.

The work is split in three parts, each one attention-kernel call (or a few), merged exactly
through their log-sum-exps (one softmax per query, as in the reference):

* text queries x all text and image keys: one dense call, no mask;
* image queries x (text keys + pooled keys): one dense call per group of heads, no mask;
* image queries x image keys: query tiles of ``th x tw`` tokens (4 x 8) against the rectangle
  of keys their discs can reach (the tile plus a halo of r-1, clipped to the grid), with a mask.

The local part gathers nothing per tile. The grid is cut into vertical strips of width ``tw``;
each strip plus its left/right halo is copied once into ``ext[strip, row, col]`` (1 + 2(r-1)/tw
times the keys). The keys of one tile are then a *contiguous* run of ``(th + 2(r-1)) x
(tw + 2(r-1))`` rows of that buffer, and the next tile down the strip is the same run shifted by
``th`` rows, so all tiles form one overlapping strided view that the kernel reads in place.
Interior tiles share one mask (a stride-0 broadcast over tiles and heads); tiles that touch the
border (or are cut by it) are grouped into a few more regions, each with one broadcast mask.
Heads are processed in groups (as many as fit a scratch budget) folded into the kernel's batch
dimension, so a call covers all tiles of a region for all heads of the group: few, large calls.

Video (``layout.frames > 1``): one part per frame offset dt the rule reaches: every query frame f
against key frame f + dt, on the same tiles and strip buffers (sized for r) with the disc
``dy^2 + dx^2 < frame_thresholds[|dt|]``; a smaller disc's windows skip the buffer rows it cannot
reach (at r=8, rt=2 the offsets +-1 reach 6 rows: 16 x 22 keys instead of 18 x 22). Every frame
has its strip buffer (built once per head group); a call covers one tile row of a region in all
its frames (the kernel's second dimension runs over frames instead of tile rows), and the parts of
a query merge exactly through their log-sum-exps (in fp32 for fp16/bf16). An image is the one
part dt = 0, exactly the 2D path.

The kernel is PyTorch's fused CPU flash-attention op (``aten::_scaled_dot_product_flash_attention
_for_cpu``): it returns the log-sum-exp the merge needs and its backward recomputes probabilities
from it. On other devices, for other dtypes, or if that private op is missing, a plain
matmul + softmax version of the same two functions runs instead (``USE_FUSED_CPU_KERNEL``).

The backward is hand-written; forward and backward are PyTorch custom operators, which
``torch.compile`` keeps as single opaque calls. The kernel's backward runs on each part with the
*joint* output and log-sum-exp, which makes each part's gradient exactly its share of the joint
softmax's gradient; window gradients are folded back onto the grid. A gradient
flowing into the returned log-sum-exp is supported (one extra kernel call per part).

Query tiles are 4 x 8 in the forward and 8 x 8 in the backward (in calls of at most 16384 window
rows), chosen by measurement: docs/benchmarks.md, "Tile shapes of the tiled backend".

Few, large calls also matter on a shared machine: every parallel region waits for its slowest
thread, so when other processes hold a core each small op can stall for a scheduler slice.

Scratch tensors (tile-ordered copies of q, k, v and their gradients) live in a per-thread
workspace reused between calls: on the CPU a fresh large allocation costs page faults worth
several copies (20% of the forward at r=16). ``release_workspace()`` frees it.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict

import torch

from .dispatch import BackendResult
from .layout import TokenLayout, frame_thresholds, reach

__all__ = ["tiled_attention", "tile_shape", "release_workspace"]

_FLASH_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Set to False (e.g. by tests) to force the plain-matmul kernels everywhere.
USE_FUSED_CPU_KERNEL = True


# ---------------------------------------------------------------------------------------------
# The two kernels every part is built from: attention with a float mask, returning (out, lse),
# and its backward given the (joint) output and log-sum-exp. Shapes [B, H, L, E]; mask
# broadcastable to [B, H, Lq, Lk] or None; lse float32 [B, H, Lq].
# ---------------------------------------------------------------------------------------------
def _fused_ok(q: torch.Tensor) -> bool:
    return (
        USE_FUSED_CPU_KERNEL
        and _FLASH_FWD is not None
        and _FLASH_BWD is not None
        and q.device.type == "cpu"
        and q.dtype in _FLASH_DTYPES
    )


def _attn_fwd(q, k, v, mask, scale):
    if _fused_ok(q):
        return _FLASH_FWD(q, k, v, attn_mask=mask, scale=scale)
    acc = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)).mul_(scale)
    if mask is not None:
        s.add_(mask.to(acc))
    lse = torch.logsumexp(s, dim=-1)
    p = s.sub_(lse.unsqueeze(-1)).exp_()
    return torch.matmul(p, v.to(acc)).to(q.dtype), lse.float()


def _attn_bwd(dout, q, k, v, out, lse, mask, scale):
    """Gradients of one attention part; ``out``/``lse`` are the joint ones of the whole softmax."""
    if _fused_ok(q):
        return _FLASH_BWD(dout, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf, gf = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    s = torch.matmul(qf, kf.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        s.add_(mask.to(acc))
    p = s.sub_(lse.to(acc).unsqueeze(-1)).exp_()
    dv = torch.matmul(p.transpose(-1, -2), gf)
    delta = (gf * out.to(acc)).sum(-1, keepdim=True)
    ds = torch.matmul(gf, vf.transpose(-1, -2)).sub_(delta).mul_(p).mul_(scale)
    dq = torch.matmul(ds, kf)
    dk = torch.matmul(ds.transpose(-1, -2), qf)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _lse_grad_parts(dlse, q, k, lse, mask, scale, zeros_v=None):
    """(dq, dk) of sum_i dlse_i * lse_i for one part: dS_ij = P_ij * dlse_i.

    Uses the kernel's backward with zero values: dP = 0 and D_i = dout_i . out_i = -dlse_i
    when dout_i = dlse_i * e_0 and out_i = -e_0.
    """
    shape = (*dlse.shape, q.shape[-1])
    g = torch.zeros(shape, dtype=q.dtype, device=q.device)
    g[..., 0] = dlse
    o = torch.zeros(shape, dtype=q.dtype, device=q.device)
    o[..., 0] = -1.0
    if zeros_v is None:
        zeros_v = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dq, dk, _ = _attn_bwd(g, q, k, zeros_v, o, lse, mask, scale)
    return dq, dk


# ---------------------------------------------------------------------------------------------
# Workspace: reused scratch buffers (never returned to the caller, never saved for backward).
# ---------------------------------------------------------------------------------------------
class _Workspace(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape, dtype, device) -> torch.Tensor:
        numel = math.prod(shape)
        key = (name, dtype, device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            self.buffers.pop(key, None)
            buf = torch.empty(numel, dtype=dtype, device=device)
            self.buffers[key] = buf
        return buf[:numel].view(shape)


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free the scratch buffers the tiled backend keeps between calls (in this thread)."""
    _WORKSPACE.buffers.clear()


def _scratch(name, shape, dtype, device):
    if device.type == "cpu":
        return _WORKSPACE.get(name, shape, dtype, device)
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Plan: everything that depends only on the geometry, cached per (layout, radius, tile, device).
# Image tensors inside are [H*W, d] in raster order ("raster views"); tile-major layouts are
# permuted to raster order once per head.
# ---------------------------------------------------------------------------------------------
def tile_shape(radius: int, height: int, width: int, backward: bool = False) -> tuple[int, int]:
    """Query tile (th, tw), clipped to the grid: 4 x 8 forward, 8 x 8 backward, for every radius
    (chosen by measurement, see the module doc)."""
    th, tw = (8, 8) if backward else (4, 8)
    return min(th, height), min(tw, width)


def _groups(signatures: list, part: list) -> list[tuple[int, int, bool]]:
    """Split 0..n-1 into ranges (start, end, uniform).

    A uniform range shares one signature (one broadcast mask); other indices are gathered into
    non-uniform ranges, never mixing different ``part`` values (partial-tile sizes).
    """
    runs: list[list] = []
    for i, sig in enumerate(signatures):
        if runs and runs[-1][2] == sig:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, sig])
    groups: list[tuple[int, int, bool]] = []
    for start, end, _ in runs:
        uniform = end - start >= 2
        if not uniform and groups and not groups[-1][2] and part[groups[-1][0]] == part[start]:
            groups[-1] = (groups[-1][0], end, False)
        else:
            groups.append((start, end, uniform))
    return groups


class _Region:
    """Tiles (strips s0:s1) x (tile rows t0:t1) sharing one mask, broadcast over strips and heads.

    Every tile of a region has its first ``hq`` rows and ``wq`` columns inside the grid.
    """

    def __init__(self, s0, s1, t0, t1, hq, wq, allowed, plan=None):
        self.s0, self.s1, self.t0, self.t1, self.hq, self.wq = s0, s1, t0, t1, hq, wq
        self.allowed = allowed  # bool [1, 1 or T, tq, win]
        self.plan = plan  # the _Plan whose key windows the mask is laid out for
        self._masks: dict = {}

    def mask(self, dtype, device):
        key = (dtype, device)
        m = self._masks.get(key)
        if m is None:
            m = torch.zeros(self.allowed.shape, dtype=dtype, device=device)
            m.masked_fill_(~self.allowed.to(device), float("-inf"))
            self._masks[key] = m
        return m


class _Call:
    """One kernel call: tiles (s0:s1, t0:t1) of frames f0:f1 of a region, for a group of heads, with
    the keys of frames f0+dt:f1+dt. The kernel's second dimension runs over tile rows (one frame)
    or over frames (one tile row of a video), whichever has several."""

    def __init__(self, reg: _Region, s0, s1, t0, t1, f0=0, f1=1, dt=0):
        self.reg, self.s0, self.s1, self.t0, self.t1 = reg, s0, s1, t0, t1
        self.f0, self.f1, self.dt = f0, f1, dt
        self.hq, self.wq = reg.hq, reg.wq
        self.over_frames = f1 - f0 > 1
        self.n_h = (t1 - t0) * (f1 - f0)  # one of the two is 1

    def mask(self, dtype, device, heads):
        m = self.reg.mask(dtype, device)
        if m.shape[1] > 1:
            m = m[:, self.t0 - self.reg.t0 : self.t1 - self.reg.t0]
        return m.expand((self.s1 - self.s0) * heads, self.n_h, *m.shape[2:])


class _Plan:
    """One frame's tiles and key windows (sized for ``radius``) with the masks of ``dy^2 + dx^2 <
    r2`` (default r^2; a video's other frame offsets use smaller r2 on the same windows)."""

    def __init__(
        self, layout: TokenLayout, radius: int, tile: tuple[int, int], device, r2: int | None = None
    ):
        r2 = radius * radius if r2 is None else r2
        hh, ww = layout.height, layout.width
        th, tw = min(tile[0], hh), min(tile[1], ww)
        ry, rx = min(radius - 1, hh - 1), min(radius - 1, ww - 1)
        nty, ns = -(-hh // th), -(-ww // tw)
        self.H, self.W = hh, ww
        self.th, self.tw, self.ry, self.rx = th, tw, ry, rx
        # a smaller disc (a video's farther frame offsets) reaches fewer rows: its windows skip
        # the strip buffer's first and last `trim` rows (the buffer is shared by every offset)
        ry_w = min(ry, reach(r2))
        self.trim = ry - ry_w
        self.nty, self.ns = nty, ns
        self.wh, self.wx = th + 2 * ry_w, tw + 2 * rx  # key window rows, cols (= strip buffer width)
        self.hx = nty * th + 2 * ry  # strip buffer rows
        self.tq, self.win = th * tw, self.wh * self.wx
        self.n_slots, self.n_ext = ns * nty * self.tq, ns * self.hx * self.wx  # rows per head
        # row / column blocks of tiles: (first, end, valid rows or cols per tile)
        self.t_blocks = [(0, hh // th, th)] + ([(hh // th, nty, hh - (hh // th) * th)] if hh % th else [])
        self.s_blocks = [(0, ww // tw, tw)] + ([(ww // tw, ns, ww - (ww // tw) * tw)] if ww % tw else [])
        self.t_blocks = [b for b in self.t_blocks if b[1] > b[0]]
        self.s_blocks = [b for b in self.s_blocks if b[1] > b[0]]
        # strips whose whole window lies inside the grid (one strided copy for all of them)
        lo = -(-rx // tw)
        hi = (ww - self.wx + rx) // tw + 1
        self.inner = (lo, max(lo, min(hi, ns)))
        self.phases = -(-self.wx // tw)  # strips this far apart have disjoint windows
        self.r2s, self.s2r = _token_order(layout.frames, hh, ww, layout.tile, torch.device(device))

        # masks: disc pattern x key validity x query validity, grouped into regions
        ii = torch.arange(th).view(th, 1, 1, 1)
        jj = torch.arange(tw).view(1, tw, 1, 1)
        aa = torch.arange(self.wh).view(1, 1, self.wh, 1)
        cc = torch.arange(self.wx).view(1, 1, 1, self.wx)
        disc = (ii + ry_w - aa) ** 2 + (jj + rx - cc) ** 2 < r2  # [th, tw, wh, wx]

        def key_rows(t):
            rows = t * th - ry_w + torch.arange(self.wh)
            return (rows >= 0) & (rows < hh)

        def key_cols(s):
            cols = s * tw - rx + torch.arange(self.wx)
            return (cols >= 0) & (cols < ww)

        hq_of = [min(th, hh - t * th) for t in range(nty)]
        wq_of = [min(tw, ww - s * tw) for s in range(ns)]
        row_sig = [(tuple(key_rows(t).tolist()), hq_of[t]) for t in range(nty)]
        col_sig = [(tuple(key_cols(s).tolist()), wq_of[s]) for s in range(ns)]
        self.regions: list[_Region] = []
        for t0, t1, t_uni in _groups(row_sig, hq_of):
            t_idx = [t0] if t_uni else list(range(t0, t1))
            rk = torch.stack([key_rows(t) for t in t_idx])  # [T, wh]
            hq = hq_of[t0]
            for s0, s1, s_uni in _groups(col_sig, wq_of):
                wq = wq_of[s0]
                # padded query slots (outside the grid) see their whole window: finite, then dropped
                qpad = (torch.arange(th) >= hq).view(th, 1) | (torch.arange(tw) >= wq).view(1, tw)
                # a mask must not vary across strips (it is broadcast over strips x heads)
                for a, b in [(s0, s1)] if s_uni else [(s, s + 1) for s in range(s0, s1)]:
                    ck = key_cols(a)
                    allowed = disc[None] & rk[:, None, None, :, None] & ck[None, None, None, None, :]
                    allowed = allowed | qpad[None, :, :, None, None]  # [T, th, tw, wh, wx]
                    allowed = allowed.reshape(1, len(t_idx), self.tq, self.win)
                    self.regions.append(_Region(a, b, t0, t1, hq, wq, allowed, self))

    def video_calls(self, heads: int, max_rows: int | None, f0: int, f1: int, dt: int) -> list[_Call]:
        """Kernel calls of query frames f0:f1 against key frames f0+dt:f1+dt: per region and tile
        row, all those frames in one call (at most ``max_rows`` window rows; None: any)."""
        out = []
        for reg in self.regions:
            n_s, n_f = reg.s1 - reg.s0, f1 - f0
            cf, cs = n_f, n_s
            if max_rows is not None:
                cf = min(n_f, max(1, max_rows // (heads * self.win)))
                cs = max(1, max_rows // (heads * cf * self.win))
            for t in range(reg.t0, reg.t1):
                for a in range(f0, f1, cf):
                    for c in range(reg.s0, reg.s1, cs):
                        out.append(_Call(reg, c, min(reg.s1, c + cs), t, t + 1, a, min(f1, a + cf), dt))
        return out

    def calls(self, heads: int, max_rows: int | None) -> list[_Call]:
        """Kernel calls for a group of heads, each with at most ``max_rows`` window rows (None: any)."""
        out = []
        for reg in self.regions:
            n_s, n_t = reg.s1 - reg.s0, reg.t1 - reg.t0
            ct, cs = n_t, n_s
            if max_rows is not None:
                ct = min(n_t, max(1, max_rows // (heads * self.win)))
                cs = max(1, max_rows // (heads * ct * self.win))
            for a in range(reg.t0, reg.t1, ct):
                for c in range(reg.s0, reg.s1, cs):
                    out.append(_Call(reg, c, min(reg.s1, c + cs), a, min(reg.t1, a + ct)))
        return out

    # ---- raster <-> sequence order (image tensors are [heads, HW, e]) -------------------------
    def raster(self, x_seq: torch.Tensor, name: str) -> torch.Tensor:
        """Image tokens in sequence order -> raster order (a view when the layout is raster)."""
        if self.r2s is None:
            return x_seq
        out = _scratch(name, x_seq.shape, x_seq.dtype, x_seq.device)
        return torch.index_select(x_seq, 1, self.r2s, out=out)

    def unraster(self, x_rast: torch.Tensor, x_seq: torch.Tensor) -> None:
        """x_seq (sequence order) = x_rast (raster order, any dtype)."""
        x_seq.copy_(x_rast if self.r2s is None else x_rast.index_select(1, self.s2r))

    # ---- strided views --------------------------------------------------------------------------
    def rview(self, x: torch.Tensor, c: _Call) -> torch.Tensor:
        """Raster [g, T*HW, e] -> view [S, g, n_h, hq, wq, e] of the tiles of call ``c``."""
        sg, sr, se = x.stride()
        hw = self.H * self.W
        off = x.storage_offset() + (c.s0 * self.tw + c.f0 * hw + c.t0 * self.th * self.W) * sr
        shape = (c.s1 - c.s0, x.shape[0], c.n_h, c.hq, c.wq, x.shape[2])
        h_stride = hw * sr if c.over_frames else self.th * self.W * sr
        strides = (self.tw * sr, sg, h_stride, self.W * sr, sr, se)
        return x.as_strided(shape, strides, off)

    def tview(self, x_t: torch.Tensor, c: _Call) -> torch.Tensor:
        """Kernel output [S*g, n_h, tq, e] -> [S, g, n_h, hq, wq, e] valid part."""
        x = x_t.unflatten(0, (c.s1 - c.s0, -1)).unflatten(3, (self.th, self.tw))
        return x[:, :, :, : c.hq, : c.wq]

    def frame(self, x: torch.Tensor, f: int) -> torch.Tensor:
        """Raster [g, T*HW, e] -> view [g, HW, e] of frame f."""
        hw = self.H * self.W
        return x[:, f * hw : (f + 1) * hw]

    def to_tiles(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Raster [g, T*HW, e] -> scratch [ns, g, T, nty, tq, e] in tile order; padded slots are zero."""
        g, e = x.shape[0], x.shape[2]
        frames = x.shape[1] // (self.H * self.W)
        out = _scratch(name, (self.ns, g, frames, self.nty, self.th, self.tw, e), x.dtype, x.device)
        if self.H % self.th:
            out[:, :, :, -1].zero_()
        if self.W % self.tw:
            out[-1].zero_()
        for f in range(frames):
            for s0, s1, wq in self.s_blocks:
                for t0, t1, hq in self.t_blocks:
                    blk = _Call(_Region(s0, s1, t0, t1, hq, wq, None), s0, s1, t0, t1, f, f + 1)
                    out[s0:s1, :, f, t0:t1, :hq, :wq] = self.rview(x, blk)
        return out.view(self.ns, g, frames, self.nty, self.tq, e)

    def tiles_of(self, x_t: torch.Tensor, c: _Call) -> torch.Tensor:
        """Tile-ordered scratch [ns, g, T, nty, tq, e] -> [S*g, n_h, tq, e] view for one call."""
        return x_t[c.s0 : c.s1, :, c.f0 : c.f1, c.t0 : c.t1].flatten(2, 3).flatten(0, 1)

    def _strip_cols(self, s):
        """(first grid column, first buffer column, width) of strip s inside the grid."""
        x0 = s * self.tw - self.rx
        lo, hi = max(0, x0), min(self.W, x0 + self.wx)
        return lo, lo - x0, hi - lo

    def _strips_view(self, x: torch.Tensor, s0, s1, step=1) -> torch.Tensor:
        """Raster [g, HW, d] -> view [S, g, H, wx, d] of whole windows of strips s0, s0+step, ... < s1."""
        sg, sr, se = x.stride()
        off = x.storage_offset() + (s0 * self.tw - self.rx) * sr
        n = len(range(s0, s1, step))
        shape = (n, x.shape[0], self.H, self.wx, x.shape[2])
        return x.as_strided(shape, (step * self.tw * sr, sg, self.W * sr, sr, se), off)

    def to_ext(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Raster keys [g, T*HW, d] -> zero-padded strip buffers [ns, g, T, hx, wx, d] (scratch)."""
        g, d = x.shape[0], x.shape[2]
        frames = x.shape[1] // (self.H * self.W)
        ext = _scratch(name, (self.ns, g, frames, self.hx, self.wx, d), x.dtype, x.device)
        for f in range(frames):
            self._fill_ext(self.frame(x, f), ext[:, :, f])
        return ext

    def _fill_ext(self, x: torch.Tensor, ext: torch.Tensor) -> None:
        """One frame: raster keys [g, HW, d] -> its strip buffer [ns, g, hx, wx, d]."""
        ry, hh = self.ry, self.H
        ext[:, :, :ry].zero_()
        ext[:, :, ry + hh :].zero_()
        lo, hi = self.inner
        if hi > lo:
            ext[lo:hi, :, ry : ry + hh] = self._strips_view(x, lo, hi)
        img = x.unflatten(1, (hh, self.W))
        for s in [*range(0, lo), *range(hi, self.ns)]:
            g0, b0, n = self._strip_cols(s)
            band = ext[s, :, ry : ry + hh]
            band[:, :, :b0].zero_()
            band[:, :, b0 + n :].zero_()
            band[:, :, b0 : b0 + n] = img[:, :, g0 : g0 + n]

    def fold_ext(self, ext: torch.Tensor, x: torch.Tensor) -> None:
        """x (raster [g, T*HW, d]) += the in-grid part of strip buffers ext (overlapping strips summed)."""
        for f in range(ext.shape[2]):
            self._fold_frame(ext[:, :, f], self.frame(x, f))

    def _fold_frame(self, ext: torch.Tensor, x: torch.Tensor) -> None:
        ry, hh = self.ry, self.H
        lo, hi = self.inner
        for p in range(self.phases):
            if lo + p < hi:
                self._strips_view(x, lo + p, hi, self.phases).add_(
                    ext[lo + p : hi : self.phases, :, ry : ry + hh]
                )
        img = x.unflatten(1, (hh, self.W))
        for s in [*range(0, lo), *range(hi, self.ns)]:
            g0, b0, n = self._strip_cols(s)
            img[:, :, g0 : g0 + n] += ext[s, :, ry : ry + hh, b0 : b0 + n]

    def _window_geometry(self, ext: torch.Tensor, c: _Call, row: int = 0) -> tuple[int, int, int]:
        """(storage offset of call c's first window from its row ``row``, stride of the merged
        (strip, head) dimension, stride of the tile-row or frame dimension) in strip buffers ext."""
        g, frames, d = ext.shape[1], ext.shape[2], ext.shape[-1]
        frame = self.hx * self.wx * d
        first = c.s0 * g * frames + c.f0 + c.dt
        off = ext.storage_offset() + first * frame + (c.t0 * self.th + self.trim + row) * self.wx * d
        return off, frames * frame, frame if c.over_frames else self.th * self.wx * d

    def windows(self, ext: torch.Tensor, c: _Call) -> torch.Tensor:
        """Strip buffers [ns, g, T, hx, wx, d] -> overlapping view [S*g, n_h, win, d] of the key windows."""
        off, b_stride, h_stride = self._window_geometry(ext, c)
        shape = ((c.s1 - c.s0) * ext.shape[1], c.n_h, self.win, ext.shape[-1])
        return ext.as_strided(shape, (b_stride, h_stride, ext.shape[-1], 1), off)

    def fold_windows(self, ext: torch.Tensor, c: _Call, win: torch.Tensor) -> None:
        """ext += window gradients [S*g, n_h, win, d] (overlapping windows summed)."""
        d, wx, th = ext.shape[-1], self.wx, self.th
        win = win.unflatten(2, (self.wh, wx))
        n_b = (c.s1 - c.s0) * ext.shape[1]
        for a0 in range(0, self.wh, th):  # row bands of th rows: no two windows of a call overlap in one
            a1 = min(self.wh, a0 + th)
            off, b_stride, h_stride = self._window_geometry(ext, c, a0)
            dst = ext.as_strided((n_b, c.n_h, a1 - a0, wx, d), (b_stride, h_stride, wx * d, d, 1), off)
            dst.add_(win[:, :, a0:a1])


# Most key-window rows (over all heads of a group) per kernel call in the backward, which writes
# one key/value gradient per window row: bounded calls keep them in cache until folded.
_BACKWARD_CALL_ROWS = 16384
# Scratch bytes per group of heads processed together (more heads per call = fewer, larger calls).
_GROUP_BYTES = 256 * 2**20


def _group_size(plan: _Plan, heads: int, d: int, itemsize: int, backward: bool, frames: int = 1) -> int:
    rows = (4 * plan.n_slots + 4 * plan.n_ext) if backward else (plan.n_slots + 2 * plan.n_ext)
    return max(1, min(heads, _GROUP_BYTES // (frames * rows * d * itemsize)))


@functools.lru_cache(maxsize=16)
def _token_order(frames: int, height: int, width: int, tile: tuple | None, device: torch.device):
    """(raster -> sequence, sequence -> raster) permutations of the image tokens (None, None: raster)."""
    if tile is None:
        return None, None
    layout = TokenLayout(0, height, width, tile=tile, frames=frames)
    return layout.raster_to_sequence(device), layout.sequence_to_raster(device)


_PLANS: OrderedDict = OrderedDict()
_PLAN_CACHE_SIZE = 16


def _get_plan(
    layout: TokenLayout, radius: int, device, backward: bool = False, r2: int | None = None
) -> _Plan:
    tile = tile_shape(radius, layout.height, layout.width, backward)
    key = (layout.frames, layout.height, layout.width, layout.tile, radius, r2, tile, str(device))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _Plan(layout, radius, tile, device, r2)
        _PLANS[key] = plan
        while len(_PLANS) > _PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


class _Offsets:
    """The frame offsets dt the rule reaches, each a part with its plan (the masks of the disc
    ``dy^2 + dx^2 < frame_thresholds[|dt|]`` on the tiles and windows every part shares); the
    parts of one query merge exactly through their log-sum-exps. An image has dt = 0 only."""

    def __init__(self, layout: TokenLayout, radius: int, temporal_radius, device, backward: bool):
        self.frames = layout.frames
        self.thresholds = frame_thresholds(radius, temporal_radius, layout.frames)
        r2 = radius * radius
        self.plans = {
            m: _get_plan(layout, radius, device, backward, None if m == r2 else m)
            for m in set(self.thresholds)
            if m > 0
        }
        self.plan = self.plans[r2]  # dt = 0: the geometry every part shares

    def parts(self, heads: int, max_rows: int | None) -> list[list[_Call]]:
        """The kernel calls of each frame offset dt (dt = 0 first: it covers every query)."""
        if self.frames == 1:
            return [self.plan.calls(heads, max_rows)]
        offsets = [0] + [dt for a in range(1, self.frames) for dt in (-a, a)]
        return [
            self.plans[self.thresholds[abs(dt)]].video_calls(
                heads, max_rows, max(0, -dt), min(self.frames, self.frames - dt), dt
            )
            for dt in offsets
            if self.thresholds[abs(dt)] > 0
        ]


# ---------------------------------------------------------------------------------------------
# Forward and backward
# ---------------------------------------------------------------------------------------------
def _global_kv(k, v, pooled_k, pooled_v, layout, bi, heads):
    """Keys/values every image query sees densely: text then pooled, [1, g, T+P, d] each (or None)."""
    ks, vs = [], []
    if layout.text_len:
        ks.append(k[bi, heads, layout.text_slice])
        vs.append(v[bi, heads, layout.text_slice])
    if pooled_k is not None:
        ks.append(pooled_k[bi, heads])
        vs.append(pooled_v[bi, heads])
    if not ks:
        return None, None
    if len(ks) == 1:
        return ks[0][None], vs[0][None]
    return torch.cat(ks, 1)[None], torch.cat(vs, 1)[None]


def _head_groups(nh: int, g: int):
    return [slice(h0, min(nh, h0 + g)) for h0 in range(0, nh, g)]


def _forward(q, k, v, pooled_k, pooled_v, layout, offsets, scale):
    bsz, nh, n, d = q.shape
    dtype, device = q.dtype, q.device
    plan = offsets.plan
    out = torch.empty((bsz, nh, n, d), dtype=dtype, device=device)
    lse = torch.empty((bsz, nh, n), dtype=torch.float32, device=device)
    ts, isl = layout.text_slice, layout.image_slice
    # a video query merges several parts: accumulate low-precision outputs in fp32
    acc = torch.float32 if layout.is_video else dtype

    if layout.text_len:
        o_t, l_t = _attn_fwd(q[:, :, ts], k, v, None, scale)
        out[:, :, ts] = o_t
        lse[:, :, ts] = l_t

    img = layout.image_len
    group = _group_size(plan, nh, d, q.element_size(), backward=False, frames=layout.frames)
    for bi in range(bsz):
        for heads in _head_groups(nh, group):
            g = heads.stop - heads.start
            q_r = plan.raster(q[bi, heads, isl], "q_r")
            k_r = plan.raster(k[bi, heads, isl], "k_r")
            v_r = plan.raster(v[bi, heads, isl], "v_r")
            in_place = plan.r2s is None and acc == dtype
            if in_place:
                o_r, l_r = out[bi, heads, isl], lse[bi, heads, isl]
            else:
                o_r = _scratch("o_r", (g, img, d), acc, device)
                l_r = _scratch("l_r", (g, img), torch.float32, device)
            q_t = plan.to_tiles(q_r, "q_t")
            k_x = plan.to_ext(k_r, "k_x")
            v_x = plan.to_ext(v_r, "v_x")
            kg, vg = _global_kv(k, v, pooled_k, pooled_v, layout, bi, heads)
            if kg is not None:
                o_g, l_g = _attn_fwd(q_r[None], kg, vg, None, scale)
                o_g, l_g = o_g[0].to(acc), l_g[0].unsqueeze(-1)
            for part, calls in enumerate(offsets.parts(g, None)):
                for c in calls:
                    o_l, l_l = _attn_fwd(
                        plan.tiles_of(q_t, c),
                        c.reg.plan.windows(k_x, c),
                        c.reg.plan.windows(v_x, c),
                        c.mask(dtype, device, g),
                        scale,
                    )
                    o_l = plan.tview(o_l, c).to(acc)
                    l_l = plan.tview(l_l.unsqueeze(-1), c)
                    o_dst = plan.rview(o_r, c)
                    l_dst = plan.rview(l_r.unsqueeze(-1), c)
                    if part:  # merge into the parts so far (global keys included)
                        torch.logaddexp(l_dst, l_l, out=l_dst)
                        torch.lerp(o_dst, o_l, (l_l - l_dst).exp_().to(acc), out=o_dst)
                    elif kg is None:
                        o_dst.copy_(o_l)
                        l_dst.copy_(l_l)
                    else:
                        l_gr = plan.rview(l_g, c)
                        torch.logaddexp(l_l, l_gr, out=l_dst)
                        w_g = (l_gr - l_dst).exp_()
                        torch.lerp(o_l, plan.rview(o_g, c), w_g.to(acc), out=o_dst)
            if not in_place:
                plan.unraster(o_r, out[bi, heads, isl])
                plan.unraster(l_r, lse[bi, heads, isl])
    return out, lse


def _backward(dout, dlse, q, k, v, pooled_k, pooled_v, out, lse, layout, offsets, scale):
    bsz, nh, n, d = q.shape
    dtype, device = q.dtype, q.device
    plan = offsets.plan
    ts, isl, t_len = layout.text_slice, layout.image_slice, layout.text_len
    if dout is None:
        dout = torch.zeros_like(out)
    elif dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq = torch.empty((bsz, nh, n, d), dtype=dtype, device=device)

    if t_len:
        q_txt, l_txt = q[:, :, ts], lse[:, :, ts]
        dq_t, dk, dv = _attn_bwd(dout[:, :, ts], q_txt, k, v, out[:, :, ts], l_txt, None, scale)
        if dlse is not None:
            dq_x, dk_x = _lse_grad_parts(dlse[:, :, ts], q_txt, k, l_txt, None, scale)
            dq_t = dq_t + dq_x
            dk = dk + dk_x
        dq[:, :, ts] = dq_t
    else:
        dk = torch.zeros((bsz, nh, n, d), dtype=dtype, device=device)
        dv = torch.zeros((bsz, nh, n, d), dtype=dtype, device=device)
    dpk = dpv = None
    if pooled_k is not None:
        dpk = torch.empty_like(pooled_k)
        dpv = torch.empty_like(pooled_v)

    img = layout.image_len
    group = _group_size(plan, nh, d, q.element_size(), backward=True, frames=layout.frames)
    for bi in range(bsz):
        for heads in _head_groups(nh, group):
            g = heads.stop - heads.start
            q_r = plan.raster(q[bi, heads, isl], "q_r")
            k_r = plan.raster(k[bi, heads, isl], "k_r")
            v_r = plan.raster(v[bi, heads, isl], "v_r")
            g_r = plan.raster(dout[bi, heads, isl], "g_r")
            o_r = plan.raster(out[bi, heads, isl], "o_r")
            l_r = plan.raster(lse[bi, heads, isl], "l_r")
            dl_r = plan.raster(dlse[bi, heads, isl], "dl_r") if dlse is not None else None
            q_t = plan.to_tiles(q_r, "q_t")
            g_t = plan.to_tiles(g_r, "g_t")
            o_t = plan.to_tiles(o_r, "o_t")
            l_t = plan.to_tiles(l_r.unsqueeze(-1), "l_t")[..., 0]
            dl_t = plan.to_tiles(dl_r.unsqueeze(-1), "dl_t")[..., 0] if dl_r is not None else None
            k_x = plan.to_ext(k_r, "k_x")
            v_x = plan.to_ext(v_r, "v_x")

            kg, vg = _global_kv(k, v, pooled_k, pooled_v, layout, bi, heads)
            if kg is not None:
                args = (q_r[None], kg)
                dq_r, dkg, dvg = _attn_bwd(g_r[None], *args, vg, o_r[None], l_r[None], None, scale)
                if dl_r is not None:
                    dq_x, dk_x = _lse_grad_parts(dl_r[None], *args, l_r[None], None, scale)
                    dq_r = dq_r + dq_x
                    dkg = dkg + dk_x
                dq_r, dkg, dvg = dq_r[0], dkg[0], dvg[0]
                if t_len:
                    dk[bi, heads, ts] += dkg[:, :t_len]
                    dv[bi, heads, ts] += dvg[:, :t_len]
                if dpk is not None:
                    dpk[bi, heads] = dkg[:, t_len:]
                    dpv[bi, heads] = dvg[:, t_len:]
            else:
                dq_r = _scratch("dq_r", (g, img, d), dtype, device).zero_()

            dk_x = _scratch("dk_x", k_x.shape, dtype, device).zero_()
            dv_x = _scratch("dv_x", v_x.shape, dtype, device).zero_()
            zero_x = None
            if dl_t is not None:  # values for the log-sum-exp gradient calls (see _lse_grad_parts)
                zero_x = _scratch("zero_x", v_x.shape, dtype, device).zero_()
            for calls in offsets.parts(g, _BACKWARD_CALL_ROWS):
                for c in calls:
                    mask = c.mask(dtype, device, g)
                    qw, gw, ow, lw = (plan.tiles_of(x, c) for x in (q_t, g_t, o_t, l_t))
                    kw, vw = c.reg.plan.windows(k_x, c), c.reg.plan.windows(v_x, c)
                    dq_w, dk_w, dv_w = _attn_bwd(gw, qw, kw, vw, ow, lw, mask, scale)
                    if dl_t is not None:
                        zw = c.reg.plan.windows(zero_x, c)
                        dq_x, dk_x2 = _lse_grad_parts(plan.tiles_of(dl_t, c), qw, kw, lw, mask, scale, zw)
                        dq_w = dq_w + dq_x
                        dk_w = dk_w + dk_x2
                    plan.rview(dq_r, c).add_(plan.tview(dq_w, c))
                    c.reg.plan.fold_windows(dk_x, c, dk_w)
                    c.reg.plan.fold_windows(dv_x, c, dv_w)
            if plan.r2s is None:
                dq[bi, heads, isl] = dq_r
                plan.fold_ext(dk_x, dk[bi, heads, isl])
                plan.fold_ext(dv_x, dv[bi, heads, isl])
            else:
                plan.unraster(dq_r, dq[bi, heads, isl])
                for ext, grad in ((dk_x, dk), (dv_x, dv)):
                    acc = _scratch("acc_r", (g, img, d), dtype, device).zero_()
                    plan.fold_ext(ext, acc)
                    grad[bi, heads, isl] += acc.index_select(1, plan.s2r)
    return dq, dk, dv, dpk, dpv


# The forward and backward are registered as PyTorch custom operators: ``torch.compile`` treats each
# as one opaque call (with a shape-only "fake" version for tracing), so a compiled model keeps the
# whole attention layer in its graph instead of breaking it at every strided view and scratch buffer.
# The layout travels as plain ints, which operators can take.
def _layout_args(layout: TokenLayout) -> tuple:
    return (layout.text_len, layout.height, layout.width, layout.text_first, layout.down_factor,
            list(layout.tile) if layout.tile is not None else None, layout.frames)  # fmt: skip


def _layout_of(text_len, height, width, text_first, down_factor, tile, frames) -> TokenLayout:
    return TokenLayout(
        text_len, height, width, text_first, down_factor, tuple(tile) if tile else None, frames
    )


@torch.library.custom_op("cleardit::tiled_clear", mutates_args=())
def _tiled_clear(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    pooled_k: torch.Tensor | None, pooled_v: torch.Tensor | None,
    text_len: int, height: int, width: int, text_first: bool, down_factor: int | None,
    tile: list[int] | None, frames: int, radius: int, temporal_radius: int | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    layout = _layout_of(text_len, height, width, text_first, down_factor, tile, frames)
    offsets = _Offsets(layout, radius, temporal_radius, q.device, backward=False)
    return _forward(q, k, v, pooled_k, pooled_v, layout, offsets, scale)


@_tiled_clear.register_fake
def _(q, k, v, pooled_k, pooled_v, *layout_and_radius):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)  # contiguous, as _forward


@torch.library.custom_op("cleardit::tiled_clear_backward", mutates_args=())
def _tiled_clear_backward(
    dout: torch.Tensor | None, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, pooled_k: torch.Tensor | None, pooled_v: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor, text_len: int, height: int, width: int, text_first: bool,
    down_factor: int | None, tile: list[int] | None, frames: int, radius: int, temporal_radius: int | None,
    scale: float,
) -> list[torch.Tensor]:  # fmt: skip
    """[dq, dk, dv] (plus [d pooled_k, d pooled_v] when there are pooled keys)."""
    layout = _layout_of(text_len, height, width, text_first, down_factor, tile, frames)
    offsets = _Offsets(layout, radius, temporal_radius, q.device, backward=True)
    grads = _backward(dout, dlse, q, k, v, pooled_k, pooled_v, out, lse, layout, offsets, scale)
    return [g.contiguous() for g in grads if g is not None]  # the strides the fake version promises


@_tiled_clear_backward.register_fake
def _(dout, dlse, q, k, v, pooled_k, pooled_v, out, lse, *layout_and_radius):
    like = [q, k, v, *([pooled_k, pooled_v] if pooled_k is not None else [])]
    return [t.new_empty(t.shape) for t in like]


def _save_for_backward(ctx, inputs, output):
    q, k, v, pooled_k, pooled_v, *rule = inputs  # the layout's ints, radius, temporal radius, scale
    ctx.save_for_backward(q, k, v, pooled_k, pooled_v, *output)
    ctx.rule = rule
    ctx.set_materialize_grads(False)  # no gradient for the log-sum-exp: skip its extra kernel calls


def _tiled_clear_grad(ctx, dout, dlse):
    q, k, v, pooled_k, pooled_v, out, lse = ctx.saved_tensors
    no_grads = (None,) * len(ctx.rule)
    if dout is None and dlse is None:
        return (None,) * 5 + no_grads
    grads = _tiled_clear_backward(dout, dlse, q, k, v, pooled_k, pooled_v, out, lse, *ctx.rule)
    pooled = grads[3:] if pooled_k is not None else [None, None]
    return (*grads[:3], *pooled) + no_grads


_tiled_clear.register_autograd(_tiled_clear_grad, setup_context=_save_for_backward)


def tiled_attention(
    q, k, v, layout, radius, pooled_k, pooled_v, scale, return_lse, temporal_radius=None
) -> BackendResult:
    """CLEAR attention with tiles plus halo (``dispatch.AttentionBackend``). Memory is linear in N:
    no N x N (or image x image) tensor is ever formed."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    rt = None if temporal_radius is None else int(temporal_radius)
    out, lse = _tiled_clear(q, k, v, pooled_k, pooled_v, *_layout_args(layout), int(radius), rt, float(scale))
    return out, (lse if return_lse else None)
