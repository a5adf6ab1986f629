"""Strip-parallel CLEAR attention: every rank holds one horizontal strip of image rows + all text.

Why this is exact. In a DiT block only attention mixes tokens, and under CLEAR an image query at
row y only sees image keys in rows y-(r-1) .. y+(r-1). So a rank that owns rows [y0, y1) needs,
besides its own rows, the keys/values of rows [y0-(r-1), y0) and [y1, y1+(r-1)) (clipped to the
grid). ``StripPlan`` says who sends which rows to whom; a strip thinner than the band simply gets
rows from ranks further away (every transfer is one direct point-to-point message).

Per rank and layer:
  * image queries (own rows) = a local CLEAR attention over the extended rows [lo, hi), merged by
    log-sum-exp with a dense attention over the text keys and the pooled keys;
  * text queries see every key, so each rank attends to its own image keys (rank 0 also to the
    text keys, so they count once) and the partial results are merged exactly across ranks with
    their log-sum-exp (two all-reduces: max, then sum of weighted outputs and weights). The
    paper's approximation, plain averaging of per-rank outputs (each rank including the text
    keys), is available as ``text_merge="average"``;
  * pooled branch: pooled row p (image rows p*df .. p*df+df-1) is computed by the rank owning
    image row p*df; the band below is widened to df-1 rows when needed so the whole block is
    local, then the pooled rows are all-gathered.

The local CLEAR call computes attention for the band's rows too (with zero queries) and keeps
the own rows: the backends take one layout for queries and keys, and this keeps them untouched.
The wasted work is 2(r-1)/rows of the image-query cost.

Byte accounting: ``CommCounter`` records what this rank sends, per step, layer and kind (halo,
text, pooled, output). Point-to-point messages count their size; collectives count the standard
ring-algorithm volume per rank (all-reduce 2(N-1)/N x size, all-gather (N-1) x chunk). The dry
functions ``layer_comm_bytes`` / ``step_comm_bytes`` use the same formulas and the same plan.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .dispatch import choose_backend, clear_attention
from .layout import TokenLayout, check_radius
from .pooling import pool_image_tokens

TEXT_MERGES = ("exact", "average")
KINDS = ("halo", "text", "pooled", "output")


class ParallelError(RuntimeError):
    """A collective or halo exchange failed: a peer died, stalled past the timeout, or diverged."""


# ---- the plan: who owns which rows, who needs which ------------------------------------------
@dataclass(frozen=True)
class StripPlan:
    """Row strips of an H x W token grid over ``world_size`` ranks, and the halo transfers.

    Strips are balanced: sizes differ by at most one row (the first H % N ranks get one more).
    """

    height: int
    width: int
    world_size: int
    radius: int
    down_factor: int | None = None

    def __post_init__(self) -> None:
        for name in ("height", "width", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StripPlan.{name} must be a positive int, got {value!r}")
        object.__setattr__(self, "radius", check_radius(self.radius))
        df = self.down_factor
        if df is not None and (isinstance(df, bool) or not isinstance(df, int) or df < 1):
            raise ValueError(f"down_factor must be a positive int or None, got {df!r}")
        if self.world_size > self.height:
            raise ValueError(
                f"{self.world_size} ranks but the image grid has only {self.height} token rows, so some "
                f"strip would be empty; use at most {self.height} ranks or a taller image"
            )

    def strip(self, rank: int) -> tuple[int, int]:
        """Rows [y0, y1) owned by ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        base, extra = divmod(self.height, self.world_size)
        y0 = rank * base + min(rank, extra)
        return y0, y0 + base + (1 if rank < extra else 0)

    def rows(self, rank: int) -> int:
        y0, y1 = self.strip(rank)
        return y1 - y0

    @property
    def max_rows(self) -> int:
        return math.ceil(self.height / self.world_size)

    @property
    def pooled_width(self) -> int:
        return 0 if self.down_factor is None else math.ceil(self.width / self.down_factor)

    def pooled_rows(self, rank: int) -> tuple[int, int]:
        """Pooled rows [p0, p1) this rank computes: those whose first image row it owns."""
        if self.down_factor is None:
            return 0, 0
        y0, y1 = self.strip(rank)
        df = self.down_factor
        return -(-y0 // df), -(-y1 // df)

    @property
    def max_pooled_rows(self) -> int:
        return max(p1 - p0 for p0, p1 in (self.pooled_rows(r) for r in range(self.world_size)))

    def needed_rows(self, rank: int) -> tuple[int, int]:
        """Rows [lo, hi) whose keys/values ``rank`` needs: own rows, the r-1 bands, whole pool blocks."""
        y0, y1 = self.strip(rank)
        band = self.radius - 1
        lo, hi = max(0, y0 - band), min(self.height, y1 + band)
        p0, p1 = self.pooled_rows(rank)
        if p1 > p0:
            hi = max(hi, min(self.height, p1 * self.down_factor))
        return lo, hi

    def transfers(self) -> list[tuple[int, int, int, int]]:
        """All messages of one exchange as (src, dst, row0, row1): src sends rows [row0, row1)."""
        out = []
        for dst in range(self.world_size):
            lo, hi = self.needed_rows(dst)
            for src in range(self.world_size):
                a, b = self.strip(src)
                a, b = max(a, lo), min(b, hi)
                if src != dst and a < b:
                    out.append((src, dst, a, b))
        return out


# ---- byte accounting -------------------------------------------------------------------------
def p2p_bytes(nbytes: int) -> int:
    """Bytes a rank sends for one point-to-point message."""
    return int(nbytes)


def allreduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes each rank sends in a ring all-reduce of an ``nbytes`` tensor: 2 (N-1)/N x size."""
    return 2 * (world_size - 1) * int(nbytes) // world_size


def allgather_bytes(chunk_nbytes: int, world_size: int) -> int:
    """Bytes each rank sends in a ring all-gather of ``chunk_nbytes`` per rank: (N-1) x chunk."""
    return (world_size - 1) * int(chunk_nbytes)


@dataclass
class CommEvent:
    step: int
    layer: int | None
    kind: str
    nbytes: int


@dataclass
class CommCounter:
    """Bytes this rank sent, by step (one transformer forward), layer and kind."""

    events: list[CommEvent] = field(default_factory=list)
    step: int = 0

    def next_step(self) -> None:
        self.step += 1

    def record(self, kind: str, nbytes: int, layer: int | None = None) -> None:
        self.events.append(CommEvent(self.step, layer, kind, int(nbytes)))

    def total(self, kind: str | None = None, step: int | None = None) -> int:
        return sum(
            e.nbytes
            for e in self.events
            if (kind is None or e.kind == kind) and (step is None or e.step == step)
        )

    def by_kind(self, step: int | None = None) -> dict[str, int]:
        return {k: self.total(k, step) for k in KINDS}

    def by_layer(self, step: int | None = None) -> dict[int | None, dict[str, int]]:
        out: dict[int | None, dict[str, int]] = {}
        for e in self.events:
            if step is None or e.step == step:
                row = out.setdefault(e.layer, dict.fromkeys(KINDS, 0))
                row[e.kind] += e.nbytes
        return out


def layer_comm_bytes(
    plan: StripPlan,
    rank: int,
    *,
    batch: int,
    heads: int,
    head_dim: int,
    text_len: int,
    elem_bytes: int,
    exchange: str = "input",
    input_dim: int | None = None,
    text_merge: str = "exact",
) -> dict[str, int]:
    """Bytes ``rank`` sends in one attention layer (same formulas as the runtime counters).

    ``exchange="input"`` sends the band's attention input (``input_dim`` channels, default
    heads*head_dim); ``"kv"`` sends its keys and values (2*heads*head_dim channels).
    """
    n, w = plan.world_size, plan.width
    channels = (input_dim or heads * head_dim) if exchange == "input" else 2 * heads * head_dim
    halo = sum(
        p2p_bytes(batch * (b - a) * w * channels * elem_bytes) for s, _, a, b in plan.transfers() if s == rank
    )
    text = 0
    if text_len:
        fp32 = 4
        if text_merge == "exact":
            text = allreduce_bytes(batch * heads * text_len * fp32, n)
            text += allreduce_bytes(batch * heads * text_len * (head_dim + 1) * fp32, n)
        else:
            text = allreduce_bytes(batch * heads * text_len * head_dim * fp32, n)
    pooled = 0
    if plan.down_factor is not None:
        chunk = batch * heads * plan.max_pooled_rows * plan.pooled_width * 2 * head_dim * elem_bytes
        pooled = allgather_bytes(chunk, n)
    return {"halo": halo, "text": text, "pooled": pooled, "output": 0}


def step_comm_bytes(
    plan: StripPlan,
    *,
    layers: int,
    out_channels: int,
    gather_output: bool = True,
    **layer_kwargs,
) -> list[dict[str, int]]:
    """Bytes each rank sends in one transformer forward: ``layers`` attention layers + output gather."""
    per_rank = []
    for rank in range(plan.world_size):
        per_layer = layer_comm_bytes(plan, rank, **layer_kwargs)
        row = {k: v * layers for k, v in per_layer.items()}
        if gather_output:
            chunk = (
                layer_kwargs["batch"] * plan.max_rows * plan.width * out_channels * layer_kwargs["elem_bytes"]
            )
            row["output"] = allgather_bytes(chunk, plan.world_size)
        per_rank.append(row)
    return per_rank


# ---- communication with counting and clear failures ------------------------------------------
class Comm:
    """This rank's view of the group: rank, size, byte counter, optional wait timeout."""

    def __init__(self, group=None, counter: CommCounter | None = None, timeout_s: float | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "cleardit.parallel needs an initialised torch.distributed process group: launch with "
                "torchrun and call cleardit.parallel.init_distributed(), or use cleardit.parallel.spawn"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.counter = counter
        self.timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)

    def record(self, kind: str, nbytes: int, layer: int | None) -> None:
        if self.counter is not None:
            self.counter.record(kind, nbytes, layer)

    def guarded(self, what: str, layer: int | None, fn: Callable):
        start = time.monotonic()
        try:
            return fn()
        except RuntimeError as exc:  # DistBackendError and gloo errors are RuntimeErrors
            where = f" in attention layer {layer}" if layer is not None else ""
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ParallelError(
                f"rank {self.rank} of {self.world}: {what}{where} failed after "
                f"{time.monotonic() - start:.1f}s; "
                "a peer rank died, stalled longer than the process-group timeout, or ran a different "
                f"forward (every rank must call the model with the same inputs). Backend error: {first}"
            ) from exc

    def wait(self, work) -> None:
        if self.timeout is None:
            work.wait()
        else:
            work.wait(timeout=self.timeout)

    def all_reduce(self, t: torch.Tensor, op, kind: str, what: str, layer: int | None) -> torch.Tensor:
        self.record(kind, allreduce_bytes(t.numel() * t.element_size(), self.world), layer)
        if self.world > 1:
            self.guarded(
                what, layer, lambda: self.wait(dist.all_reduce(t, op=op, group=self.group, async_op=True))
            )
        return t

    def all_gather(self, t: torch.Tensor, counts: list[int], dim: int, kind: str, what: str, layer) -> list:
        """Every rank's ``t`` (``counts[rank]`` entries on axis ``dim``), padded to the max, trimmed."""
        longest = max(counts)
        if t.shape[dim] < longest:
            pad = list(t.shape)
            pad[dim] = longest - t.shape[dim]
            t = torch.cat([t, t.new_zeros(pad)], dim)
        t = t.contiguous()
        self.record(kind, allgather_bytes(t.numel() * t.element_size(), self.world), layer)
        if self.world == 1:
            return [t.narrow(dim, 0, counts[0])]
        bufs = [torch.empty_like(t) for _ in range(self.world)]
        work = self.guarded(what, layer, lambda: dist.all_gather(bufs, t, group=self.group, async_op=True))
        self.guarded(what, layer, lambda: self.wait(work))
        return [b.narrow(dim, 0, c) for b, c in zip(bufs, counts, strict=True)]


class PendingRows:
    """Halo rows in flight; ``wait()`` returns (rows above, rows below) in raster order."""

    def __init__(self, comm, works, received, like, dim, strip, what, layer):
        self.comm, self.works, self.received = comm, works, received
        self.like, self.dim, self.strip, self.what, self.layer = like, dim, strip, what, layer

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.works:
            self.comm.guarded(self.what, self.layer, lambda: [self.comm.wait(w) for w in self.works])
        y0, _ = self.strip
        above = [buf for row, buf in sorted(self.received, key=lambda x: x[0]) if row < y0]
        below = [buf for row, buf in sorted(self.received, key=lambda x: x[0]) if row >= y0]
        empty = self.like.narrow(self.dim, 0, 0)
        cat = lambda parts: torch.cat(parts, self.dim) if parts else empty
        return cat(above), cat(below)


def start_row_exchange(
    x: torch.Tensor, plan: StripPlan, comm: Comm, dim: int, what: str = "halo exchange", layer=None
) -> PendingRows:
    """Send this rank's rows that others need and post receives for the rows it needs (non-blocking).

    ``x`` holds this rank's own image rows in raster order along ``dim`` (rows x width tokens).
    """
    strip = plan.strip(comm.rank)
    y0, w = strip[0], plan.width
    ops, received = [], []
    for src, dst, a, b in plan.transfers():
        if src == comm.rank:
            t = x.narrow(dim, (a - y0) * w, (b - a) * w).contiguous()
            comm.record("halo", p2p_bytes(t.numel() * t.element_size()), layer)
            ops.append(dist.P2POp(dist.isend, t, group=comm.group, group_peer=dst))
        elif dst == comm.rank:
            shape = list(x.shape)
            shape[dim] = (b - a) * w
            buf = x.new_empty(shape)
            received.append((a, buf))
            ops.append(dist.P2POp(dist.irecv, buf, group=comm.group, group_peer=src))
    works = comm.guarded(what, layer, lambda: dist.batch_isend_irecv(ops)) if ops else []
    return PendingRows(comm, works, received, x, dim, strip, what, layer)


# ---- local math --------------------------------------------------------------------------------
def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, max_scores: int = 1 << 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention in fp32, chunked over queries: (out [B,h,Nq,d] fp32, lse [B,h,Nq] fp32)."""
    b, h, nq, _ = q.shape
    kf, vf = k.float(), v.float()
    step = max(1, max_scores // max(1, b * h * k.shape[2]))
    outs, lses = [], []
    for i in range(0, nq, step):
        s = torch.matmul(q[:, :, i : i + step].float(), kf.transpose(-1, -2)) * scale
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse[..., None]), vf))
        lses.append(lse)
    if not outs:
        return q.new_zeros(q.shape, dtype=torch.float32), q.new_zeros(q.shape[:3], dtype=torch.float32)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def merge_partials(out_a, lse_a, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the union of two disjoint key sets from the two partial results (fp32)."""
    m = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    s = wa + wb
    out = (out_a.float() * wa[..., None] + out_b.float() * wb[..., None]) / s[..., None]
    return out, m + torch.log(s)


def merge_text(out_t, lse_t, comm: Comm, text_merge: str, layer=None):
    """Combine the ranks' partial text-query results: exact (log-sum-exp) or plain average."""
    if text_merge == "exact":
        m = comm.all_reduce(lse_t.float().clone(), dist.ReduceOp.MAX, "text", "text merge (max)", layer)
        w = torch.exp(lse_t.float() - m)
        packed = torch.cat([out_t.float() * w[..., None], w[..., None]], dim=-1).contiguous()
        packed = comm.all_reduce(packed, dist.ReduceOp.SUM, "text", "text merge (sum)", layer)
        s = packed[..., -1]
        return packed[..., :-1] / s[..., None], m + torch.log(s)
    acc = comm.all_reduce(out_t.float().contiguous(), dist.ReduceOp.SUM, "text", "text average", layer)
    return acc / comm.world, None


def gather_pooled(k_ext, v_ext, plan: StripPlan, comm: Comm, pool_weight, layer=None):
    """Pooled keys and values of the whole grid [B, h, Hp*Wp, d] on every rank (raster order)."""
    df, w, d = plan.down_factor, plan.width, k_ext.shape[-1]
    lo, _ = plan.needed_rows(comm.rank)
    p0, p1 = plan.pooled_rows(comm.rank)
    kv = torch.cat([k_ext, v_ext], dim=-1)  # pooling is per channel, so pool k and v together
    if p1 > p0:
        r0, r1 = p0 * df, min(plan.height, p1 * df)
        block = kv[:, :, (r0 - lo) * w : (r1 - lo) * w]
        local = pool_image_tokens(block, TokenLayout(0, r1 - r0, w, down_factor=df), pool_weight)
    else:
        local = kv.new_zeros(kv.shape[0], kv.shape[1], 0, kv.shape[3])
    counts = [(b - a) * plan.pooled_width for a, b in (plan.pooled_rows(r) for r in range(plan.world_size))]
    parts = comm.all_gather(local, counts, 2, "pooled", "pooled-token gather", layer)
    pooled = torch.cat(parts, dim=2)
    return pooled[..., :d], pooled[..., d:]


def strip_attention(
    q_txt: torch.Tensor,
    k_txt: torch.Tensor,
    v_txt: torch.Tensor,
    q_img: torch.Tensor,
    k_img: torch.Tensor,
    v_img: torch.Tensor,
    halo: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    plan: StripPlan,
    comm: Comm,
    radius: int,
    *,
    pool_weight: torch.Tensor | None,
    scale: float,
    backend: str,
    text_merge: str,
    layer: int | None = None,
):
    """CLEAR attention of one rank: text tokens + own rows, given a callable that yields the band.

    All tensors are [B, heads, tokens, d]; ``*_img`` are the own rows. ``halo()`` returns
    (k_ext, v_ext) for rows ``plan.needed_rows(rank)``; it is called after the text queries'
    local part, so an exchange started before this call overlaps with that work.

    Returns (out_txt, lse_txt, out_img, lse_img); lse_txt is None with ``text_merge="average"``.
    """
    rank, w = comm.rank, plan.width
    y0, y1 = plan.strip(rank)
    lo, hi = plan.needed_rows(rank)
    local = TokenLayout(0, hi - lo, w)
    if backend == "auto":  # the log-sum-exp is needed, which the dense reference computes slowly
        backend = choose_backend(local, q_img.device)
        backend = "tiled" if backend == "reference" else backend
    text_len = q_txt.shape[2]
    dtype = q_img.dtype

    out_t = lse_t = None
    if text_len:  # text queries: partial softmax over this rank's keys (text keys counted once)
        with_text = text_merge == "average" or rank == 0
        keys = torch.cat([k_txt, k_img], 2) if with_text else k_img
        vals = torch.cat([v_txt, v_img], 2) if with_text else v_img
        out_t, lse_t = dense_attention(q_txt, keys, vals, scale)

    k_ext, v_ext = halo()
    pooled_k = pooled_v = None
    if plan.down_factor is not None:
        pooled_k, pooled_v = gather_pooled(k_ext, v_ext, plan, comm, pool_weight, layer)

    # image queries: the disc over the extended rows (band rows as zero queries, dropped after)
    own = slice((y0 - lo) * w, (y1 - lo) * w)
    q_ext = q_img.new_zeros(k_ext.shape)
    q_ext[:, :, own] = q_img
    out_i, lse_i = clear_attention(
        q_ext, k_ext, v_ext, local, radius, scale=scale, return_lse=True, backend=backend
    )
    out_i, lse_i = out_i[:, :, own], lse_i[:, :, own]
    extra_k = [t for t in (k_txt, pooled_k) if t is not None and t.shape[2]]
    if extra_k:  # plus the text keys and the pooled keys, which every image query sees
        extra_v = [t for t in (v_txt, pooled_v) if t is not None and t.shape[2]]
        out_c, lse_c = dense_attention(q_img, torch.cat(extra_k, 2), torch.cat(extra_v, 2), scale)
        out_i, lse_i = merge_partials(out_i, lse_i, out_c, lse_c)

    if text_len:
        out_t, lse_t = merge_text(out_t, lse_t, comm, text_merge, layer)
        out_t = out_t.to(dtype)
    else:
        out_t = q_txt
    return out_t, lse_t, out_i.to(dtype), lse_i.float()


def strip_clear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    radius: int,
    *,
    group=None,
    pool_weight: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    text_merge: str = "exact",
    backend: str = "auto",
    counter: CommCounter | None = None,
    timeout_s: float | None = None,
    layer: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``clear_attention`` of the full ``layout`` with this rank holding only its strip.

    Args:
        q, k, v: [B, heads, T + rows*W, d]: all text tokens and this rank's image rows
            ``StripPlan(...).strip(rank)`` in raster order, text before or after them as in
            ``layout`` (the GLOBAL layout: full text length and full image grid, raster order).
        group: the process group (default: the world).
        text_merge: "exact" (log-sum-exp merge) or "average" (the paper's approximation).
        counter: a CommCounter that records the bytes this rank sends.
        timeout_s: wait at most this long for a peer (default: the process group's timeout).

    Returns:
        out [B, heads, T + rows*W, d] (and lse [B, heads, T + rows*W] fp32 when return_lse), equal to
        the corresponding rows of ``clear_attention`` on the full tensors.

    The keys/values of the band (rows closer than r to the strip) are exchanged.
    """
    radius = check_radius(radius)
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a cleardit TokenLayout, got {type(layout).__name__}")
    if layout.tile is not None:
        raise ValueError("strip parallelism needs raster token order; use layout.with_tile(None)")
    if layout.is_video:
        raise NotImplementedError(
            f"strip parallelism splits one image's rows; this layout is a video ({layout.describe_grid()}); "
            "run clear_attention on one device"
        )
    if text_merge not in TEXT_MERGES:
        raise ValueError(f"text_merge must be one of {TEXT_MERGES}, got {text_merge!r}")
    if return_lse and text_merge == "average" and layout.text_len:
        raise ValueError("text_merge='average' has no log-sum-exp for text queries; use return_lse=False")
    if (layout.down_factor is None) != (pool_weight is None):
        raise ValueError("pass pool_weight exactly when layout.down_factor is set (see clear_attention)")
    comm = Comm(group, counter, timeout_s)
    plan = StripPlan(layout.height, layout.width, comm.world, radius, layout.down_factor)
    y0, y1 = plan.strip(comm.rank)
    local = TokenLayout(layout.text_len, y1 - y0, layout.width, layout.text_first)
    if q.dim() == 4 and q.shape[2] != local.seq_len:
        raise ValueError(
            f"rank {comm.rank} owns rows {y0}..{y1 - 1} of the {layout.height}x{layout.width} grid, so q/k/v "
            f"need {layout.text_len} text + {local.image_len} image tokens = {local.seq_len}, "
            f"got {q.shape[2]}; "
            "split the image tokens with StripPlan.strip(rank)"
        )
    local.check_qkv(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    txt, img = local.text_slice, local.image_slice
    d = k.shape[-1]
    k_img, v_img = k[:, :, img], v[:, :, img]
    kv_own = torch.cat([k_img, v_img], dim=-1)
    pending = start_row_exchange(kv_own, plan, comm, dim=2, what="halo exchange (k/v)", layer=layer)

    def halo():
        above, below = pending.wait()
        kv = torch.cat([above, kv_own, below], dim=2)
        return kv[..., :d], kv[..., d:]

    out_t, lse_t, out_i, lse_i = strip_attention(
        q[:, :, txt], k[:, :, txt], v[:, :, txt], q[:, :, img], k_img, v_img, halo, plan, comm, radius,
        pool_weight=pool_weight, scale=scale, backend=backend, text_merge=text_merge, layer=layer,
    )  # fmt: skip
    parts = (out_t, out_i) if layout.text_first else (out_i, out_t)
    out = torch.cat(parts, dim=2)
    if not return_lse:
        return out
    if lse_t is None:
        lse_t = lse_i.new_zeros(lse_i.shape[:2] + (0,))
    lse = torch.cat((lse_t, lse_i) if layout.text_first else (lse_i, lse_t), dim=2)
    return out, lse
