"""The fused Triton kernels, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1).

Sizes are tiny (the interpreter executes every program in Python) but chosen so that every code
path runs: several blocks per grid, full and partial block pairs, edge tiles, tiles larger than a
block, raster order, text first/last/absent, the pooled branch, chunks smaller than a block, head
dims that are not a power of two, and gradients through both outputs (out and lse).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from cleardit.attention import TokenLayout, clear_attention, count_pairs, pool_image_tokens  # noqa: E402
from cleardit.attention import triton_kernels as tk  # noqa: E402
from cleardit.attention.reference import allowed_mask, reference_attention  # noqa: E402
from tests.helpers import assert_close, make_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _run(q, k, v, pw, layout, radius, fn, use_out=True, use_lse=True, dtype=None):
    """Forward, then backward of random projections of out and/or lse; returns [out, lse, grads...]."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    pw_leaf = pw.detach().clone().requires_grad_(True) if pw is not None else None
    pk = pv = None
    if pw_leaf is not None:
        pk, pv = pool_image_tokens(leaves[1], layout, pw_leaf), pool_image_tokens(leaves[2], layout, pw_leaf)
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = fn(*leaves, layout, radius, pk, pv, scale, True)
    g = torch.Generator().manual_seed(123)
    w_out = torch.randn(out.shape, generator=g)
    w_lse = torch.randn(lse.shape, generator=g)
    loss = 0.0
    if use_out:
        loss = loss + (out.float() * w_out).sum()
    if use_lse:
        loss = loss + (lse * w_lse).sum()
    loss.backward()
    grads = [t.grad for t in leaves] + ([pw_leaf.grad] if pw_leaf is not None else [])
    return [out.detach(), lse.detach(), *grads]


def _triton(**blocks):
    return lambda *a: tk.triton_clear_attention(*a, **blocks)


def _check(got, ref, atol, what, names=("out", "lse", "dq", "dk", "dv", "dpool")):
    for name, a, e in zip(names, got, ref, strict=False):
        if e is None:  # e.g. d lse / d v: autograd gives None where the kernels give zeros
            e = torch.zeros_like(a)
        scale = max(1.0, math.sqrt(e.float().abs().max().item())) if name == "dpool" else 1.0
        assert_close(a, e, atol * scale, what=f"{what} {name}")


# (text_len, H, W, text_first, down_factor, tile, radius, batch, heads, tile_tokens)
CASES = [
    (4, 6, 6, True, None, (4, 4), 1, 1, 2, 16),  # radius 1: only the token itself among images
    (3, 7, 5, True, None, None, 3, 1, 2, 16),  # raster order, non-square
    (0, 9, 11, True, None, (4, 4), 3, 1, 2, 16),  # no text, edge tiles
    (5, 10, 7, False, None, (3, 5), 5, 1, 2, 16),  # text after the image, 15-token tiles
    (3, 5, 7, True, None, (4, 8), 40, 1, 2, 16),  # radius beyond the grid; tiles split into 2 blocks
    (4, 8, 8, True, 2, (4, 4), 3, 1, 2, 16),  # pooled branch
    (3, 10, 7, False, 4, None, 5, 1, 2, 16),  # pooled, grid not divisible by df, raster, text last
    (2, 10, 10, True, None, (4, 4), 4, 2, 1, 16),  # batch 2, full and partial pairs
    (2, 4, 20, True, None, None, 4, 1, 1, 16),  # raster rows wider than a block: row segments
    (3, 11, 9, True, None, (8, 16), 4, 1, 1, 32),  # layout tile (8, 16) cut into 32-token blocks
]


def _case_id(c):
    t, h, w, first, df, tile, r, b, heads, tt = c
    return f"T{t}-{h}x{w}-{'tf' if first else 'tl'}-df{df}-tile{tile}-r{r}-b{b}-TT{tt}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference_fp32(case):
    t, h, w, first, df, tile, r, b, heads, tt = case
    layout = TokenLayout(t, h, w, text_first=first, down_factor=df, tile=tile)
    q, k, v, pw = make_inputs(layout, batch=b, heads=heads, dim=16)
    ref = _run(q, k, v, pw, layout, r, reference_attention)
    got = _run(q, k, v, pw, layout, r, _triton(tile_tokens=tt))
    _check(got, ref, 2e-5, _case_id(case))


def test_chunks_smaller_than_blocks_and_odd_head_dim():
    # 32-token blocks walked in 16-token chunks by all three kernels; head_dim 24 pads to 32
    layout = TokenLayout(3, 9, 10, text_first=True, down_factor=2, tile=(4, 8))
    q, k, v, pw = make_inputs(layout, batch=1, heads=1, dim=24)
    ref = _run(q, k, v, pw, layout, 4, reference_attention)
    got = _run(q, k, v, pw, layout, 4, _triton(tile_tokens=32, fwd_n=16, dq_n=16, dkv_m=16))
    _check(got, ref, 2e-5, "chunks16-d24")


@pytest.mark.parametrize("use_out,use_lse", [(True, False), (False, True)])
def test_gradient_through_one_output(use_out, use_lse):
    layout = TokenLayout(2, 7, 7, text_first=True, tile=(4, 4))
    q, k, v, _ = make_inputs(layout, batch=1, heads=1, dim=16)
    ref = _run(q, k, v, None, layout, 3, reference_attention, use_out, use_lse)
    got = _run(q, k, v, None, layout, 3, _triton(tile_tokens=16), use_out, use_lse)
    _check(got, ref, 2e-5, f"out={use_out} lse={use_lse}")


def test_strided_inputs_with_pooling():
    # q, k, v as FLUX makes them: [B, N, heads, d] memory seen as [B, heads, N, d]
    layout = TokenLayout(3, 8, 6, text_first=True, down_factor=2, tile=(4, 4))
    q, k, v, pw = make_inputs(layout, batch=1, heads=2, dim=16)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert strided[0].stride(2) == 2 * 16
    ref = _run(q, k, v, pw, layout, 3, reference_attention)
    got = _run(*strided, pw, layout, 3, _triton(tile_tokens=16))
    _check(got, ref, 2e-5, "strided")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    layout = TokenLayout(4, 9, 8, text_first=True, down_factor=2, tile=(4, 4))
    q, k, v, pw = make_inputs(layout, batch=1, heads=2, dim=16)
    ref = _run(q, k, v, pw, layout, 3, reference_attention)
    got = _run(q.to(dtype), k.to(dtype), v.to(dtype), pw, layout, 3, _triton(tile_tokens=16))
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert got[2].dtype == dtype
    tol = 3e-3 if dtype == torch.float16 else 1.5e-2  # measured: ~1e-3 and ~6e-3
    _check(got[:2], ref[:2], tol, str(dtype), names=("out", "lse"))
    _check(got[2:], ref[2:], 4 * tol, str(dtype), names=("dq", "dk", "dv", "dpool"))


def test_through_clear_attention_dispatch():
    layout = TokenLayout(3, 9, 9, text_first=True, tile=tk.preferred_tile(16))
    q, k, v, _ = make_inputs(layout, batch=1, heads=1, dim=16)
    out, lse = clear_attention(q, k, v, layout, 4, return_lse=True, backend="triton")
    ref_out, ref_lse = reference_attention(q, k, v, layout, 4, None, None, 0.25, True)
    assert_close(out, ref_out, 2e-5, what="dispatch out")
    assert_close(lse, ref_lse, 2e-5, what="dispatch lse")
    out_only = clear_attention(q, k, v, layout, 4, backend="triton")
    assert torch.equal(out_only, out)


# ---- the host-side plan (no kernels) -------------------------------------------------------------


@pytest.mark.parametrize(
    "h,w,tile,tt", [(9, 11, (4, 4), 16), (7, 40, None, 16), (10, 7, (8, 16), 32), (5, 3, None, 8)]
)
def test_image_blocks_follow_the_sequence(h, w, tile, tt):
    layout = TokenLayout(0, h, w, tile=tile)
    cells = layout.sequence_to_raster()
    seen = torch.zeros(h * w, dtype=torch.long)
    for start, y0, x0, bw, size in tk.image_blocks(h, w, tile, tt):
        assert 0 < size <= tt and size % bw == 0
        offs = torch.arange(size)
        expect = (y0 + offs // bw) * w + (x0 + offs % bw)
        assert torch.equal(cells[start : start + size], expect)
        seen[start : start + size] += 1
    assert torch.equal(seen, torch.ones_like(seen))


@pytest.mark.parametrize("radius", [1, 2, 3, 5, 9])
def test_block_classification_is_exact(radius):
    layout = TokenLayout(0, 13, 11, tile=(4, 4))
    blocks = torch.tensor(tk.image_blocks(13, 11, (4, 4), 16))
    cls = tk.classify_block_pairs(blocks, radius)
    allowed = allowed_mask(layout, radius)
    for i, (si, *_, ni) in enumerate(blocks.tolist()):
        for j, (sj, *_, nj) in enumerate(blocks.tolist()):
            sub = allowed[si : si + ni, sj : sj + nj]
            expect = 2 if sub.all() else (1 if sub.any() else 0)
            assert cls[i, j].item() == expect, (i, j)


def test_plan_lists_are_transposes_and_count_pairs():
    layout = TokenLayout(5, 10, 9, text_first=False, down_factor=2, tile=(4, 4))
    plan = tk._plan(layout, 4, 16, "cpu")
    n_q, n_k = plan.n_text + plan.n_img, plan.n_text + plan.n_img + plan.n_pool

    def dense(csr, rows, cols):
        off, idx = csr
        m = torch.zeros(rows, cols, dtype=torch.bool)
        for r in range(rows):
            m[r, idx[off[r] : off[r + 1]].long()] = True
        return m

    full, part = dense(plan.q_full, n_q, n_k), dense(plan.q_part, n_q, n_k)
    assert torch.equal(dense(plan.k_full, n_k, n_q), full.t())
    assert torch.equal(dense(plan.k_part, n_k, n_q), part.t())
    # every allowed (query, key) pair lies in a listed block pair; full pairs hold only allowed pairs
    mask = allowed_mask(layout, 4)
    n = layout.seq_len
    owner_q = torch.empty(n, dtype=torch.long)  # block id of every query / key token
    owner_k = torch.empty(n + layout.pooled_len, dtype=torch.long)
    for i, row in enumerate(plan.table.tolist()):
        start, size, pooled = row[0], row[4], row[5]
        if pooled:
            owner_k[n + start : n + start + size] = i
        else:
            owner_q[start : start + size] = i
            owner_k[start : start + size] = i
    listed = (full | part)[owner_q[:, None], owner_k[None, :]]
    assert not (mask & ~listed).any()
    assert mask[full[owner_q[:, None], owner_k[None, :]]].all()
    assert int(mask.sum()) == count_pairs(layout, 4)


def test_rejects_bad_inputs():
    layout = TokenLayout(2, 4, 4)
    q, k, v, _ = make_inputs(layout, batch=1, heads=1, dim=16)
    with pytest.raises(TypeError):
        tk.triton_clear_attention(q.double(), k.double(), v.double(), layout, 2, None, None, 0.25, False)
    with pytest.raises(ValueError):
        tk.triton_clear_attention(q, k, v, layout, 2, None, None, 0.25, False, tile_tokens=24)
    with pytest.raises(ValueError):  # pooled keys for a layout without a down factor
        tk.triton_clear_attention(q, k, v, layout, 2, k[:, :, :4], v[:, :, :4], 0.25, False)
    assert tk.triton_available()


@pytest.mark.slow
def test_kernels_compile_for_h100():
    """Compile (not run) every kernel for sm_90 in a process without the interpreter: catches what
    the interpreter accepts but the compiler rejects, and shared-memory overflows."""
    pytest.importorskip("triton.backends.nvidia")
    code = (
        "import torch\n"
        "from cleardit.attention.triton_kernels import compile_for_gpu\n"
        "print(compile_for_gpu(90, torch.bfloat16, 128, True))\n"
        "print(compile_for_gpu(90, torch.float16, 64, False))\n"
        "print(compile_for_gpu(90, torch.float32, 16, True))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
