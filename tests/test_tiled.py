"""The tiled CPU backend against the dense reference: values, log-sum-exp, gradients, memory."""

import pytest
import torch

import cleardit.attention.tiled as tiled
from cleardit.attention import TokenLayout, clear_attention
from tests.helpers import (
    CASES,
    assert_close,
    case_id,
    compare_backend,
    compare_layout,
    make_inputs,
    run_with_grads,
)


@pytest.fixture(params=["fused", "matmul"])
def kernel(request, monkeypatch):
    """Run a test with PyTorch's fused CPU attention kernel and with the plain-matmul fallback."""
    monkeypatch.setattr(tiled, "USE_FUSED_CPU_KERNEL", request.param == "fused")
    return request.param


def _compare_layout(layout, radius, dtype=torch.float32, atol=1e-5, heads=3, dim=16):
    q, k, v, pw = make_inputs(layout, heads=heads, dim=dim)
    ref = run_with_grads(q, k, v, pw, layout, radius, "reference")
    got = run_with_grads(q.to(dtype), k.to(dtype), v.to(dtype), pw, layout, radius, "tiled")
    names = ["out", "lse", "dq", "dk", "dv", "dpool"][: 2 + len(ref[2])]
    for name, a, e in zip(names, [got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]], strict=True):
        assert_close(a, e, atol * max(1.0, e.abs().max().item()), what=f"tiled {layout} r={radius} {name}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_tiled_matches_reference(case, kernel):
    compare_backend(case, "tiled")


@pytest.mark.parametrize("group", [1, 2])
def test_head_groups_match_reference(group, monkeypatch, kernel):
    # heads are processed in groups sized by a memory budget; 3 heads in groups of 1 or 2
    monkeypatch.setattr(tiled, "_group_size", lambda *args, **kwargs: group)
    monkeypatch.setattr(tiled, "_BACKWARD_CALL_ROWS", 2000)  # also split the backward calls
    _compare_layout(TokenLayout(5, 19, 23, down_factor=4), 6)
    _compare_layout(TokenLayout(3, 14, 13, tile=(4, 4)), 4)


@pytest.mark.parametrize(
    "t, h, w, first, df, r, tile",
    [
        (3, 9, 10, True, 2, 4, (4, 4)),
        (5, 13, 11, False, None, 5, (3, 5)),
        (0, 17, 9, True, 4, 3, (4, 4)),
        (2, 12, 12, True, None, 40, (5, 5)),
        (4, 1, 23, True, None, 3, (1, 4)),
    ],
)
def test_tile_major_layouts_match_reference(t, h, w, first, df, r, tile, kernel):
    _compare_layout(TokenLayout(t, h, w, text_first=first, down_factor=df, tile=tile), r)


@pytest.mark.parametrize(
    "t, h, w, r",
    [(3, 1, 40, 5), (2, 37, 1, 4), (0, 1, 1, 3), (5, 30, 29, 7), (1, 26, 35, 12)],
    ids=["1xW", "Hx1", "1x1", "30x29-r7", "26x35-r12"],
)
def test_odd_grids_match_reference(t, h, w, r, kernel):
    # grids not divisible by the tile, single rows/columns, several border regions
    _compare_layout(TokenLayout(t, h, w), r)


@pytest.mark.parametrize(
    "t, f, h, w, df, tile, r, rt, trims",
    [
        (0, 3, 9, 10, None, None, 8, 2, {48: 1}),  # r=8, rt=2: the offsets +-1 reach 6 rows, not 7
        (3, 4, 10, 9, 3, None, 8, 4, {48: 1, 28: 2}),  # text and pooled keys too
        (2, 5, 9, 12, None, (2, 4, 4), 4, 3, {9: 1}),  # tile-major (2-frame tiles), odd grid
    ],
)
def test_video_windows_trimmed_to_each_frame_offset(t, f, h, w, df, tile, r, rt, trims, kernel):
    # a farther frame offset's smaller disc reads fewer rows of the shared strip buffers
    layout = TokenLayout(t, h, w, down_factor=df, tile=tile, frames=f)
    for backward in (False, True):
        plans = tiled._Offsets(layout, r, rt, "cpu", backward).plans
        assert {m: p.trim for m, p in plans.items() if p.trim} == trims
    compare_layout(layout, r, "tiled", temporal_radius=rt, batch=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [CASES[5], CASES[9], CASES[11]], ids=case_id)
def test_low_precision_forward_and_backward(case, dtype):
    t, h, w, first, df, r = case
    layout = TokenLayout(t, h, w, text_first=first, down_factor=df)
    q, k, v, pw = make_inputs(layout)
    ref = run_with_grads(q, k, v, pw, layout, r, "reference")
    got = run_with_grads(q.to(dtype), k.to(dtype), v.to(dtype), pw, layout, r, "tiled")
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert all(g.dtype == dtype for g in got[2][:3])
    for name, a, e in zip(
        ["out", "lse", "dq", "dk", "dv"], [got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]], strict=False
    ):
        assert_close(a, e, 2e-2 * max(1.0, e.abs().max().item()), what=f"{dtype} {case_id(case)} {name}")


def test_return_lse_false_through_clear_attention():
    layout = TokenLayout(5, 11, 9, down_factor=2)
    q, k, v, pw = make_inputs(layout)
    q.requires_grad_(True)
    out = clear_attention(q, k, v, layout, 4, pool_weight=pw, backend="tiled")
    assert isinstance(out, torch.Tensor)
    ref = clear_attention(q, k, v, layout, 4, pool_weight=pw, backend="reference")
    assert_close(out, ref, 1e-5, what="out (return_lse=False)")
    (out * out).sum().backward()  # the log-sum-exp output gets no gradient: the dlse=None path
    grad = q.grad.clone()
    q.grad = None
    (ref * ref).sum().backward()
    assert_close(grad, q.grad, 1e-5, what="dq (return_lse=False)")


def test_gradient_of_lse_alone(kernel):
    # only the log-sum-exp is used: the output gradient is None inside the backward
    layout = TokenLayout(3, 10, 13, down_factor=4)
    q, k, v, pw = make_inputs(layout)
    grads = {}
    for backend in ("reference", "tiled"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        _, lse = clear_attention(*leaves, layout, 6, pool_weight=pw, return_lse=True, backend=backend)
        (lse * torch.linspace(-1, 1, lse.shape[-1])).sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for name, a, e in zip("qkv", grads["tiled"], grads["reference"], strict=True):
        if e is None:  # the log-sum-exp does not depend on v
            assert a is None or not a.any(), f"d{name} of lse alone should be zero"
            continue
        assert_close(a, e, 1e-5, what=f"d{name} of lse alone")


def test_non_contiguous_inputs():
    # [B, N, heads, d] projections transposed to [B, heads, N, d], as attention processors do
    layout = TokenLayout(4, 12, 10)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, layout.seq_len, 3, 16, generator=g).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    out, lse = clear_attention(q, k, v, layout, 5, return_lse=True, backend="tiled")
    ref, ref_lse = clear_attention(q, k, v, layout, 5, return_lse=True, backend="reference")
    assert_close(out, ref, 1e-5, what="out")
    assert_close(lse, ref_lse, 1e-5, what="lse")


def test_workspace_reuse_across_shapes_and_dtypes():
    # scratch buffers are shared between calls: alternating geometries must not leak into each other
    a, b = TokenLayout(3, 14, 9), TokenLayout(0, 9, 17, text_first=False)
    qa, ka, va, _ = make_inputs(a, seed=1)
    qb, kb, vb, _ = make_inputs(b, seed=2)
    with torch.no_grad():
        first = clear_attention(qa, ka, va, a, 6, backend="tiled")
        clear_attention(qb, kb, vb, b, 3, backend="tiled")
        clear_attention(qb.bfloat16(), kb.bfloat16(), vb.bfloat16(), b, 9, backend="tiled")
        again = clear_attention(qa, ka, va, a, 6, backend="tiled")
        ref = clear_attention(qa, ka, va, a, 6, backend="reference")
    assert torch.equal(first, again)
    assert_close(first, ref, 1e-5, what="after reuse")
    tiled.release_workspace()


@pytest.mark.parametrize("heads, max_rows", [(1, None), (3, None), (2, 4096)])
def test_kernel_calls_cover_every_tile_once(heads, max_rows):
    for layout, r in [
        (TokenLayout(0, 128, 128), 8),
        (TokenLayout(0, 45, 71), 16),
        (TokenLayout(0, 3, 100), 2),
        (TokenLayout(0, 192, 64, tile=(8, 8)), 5),
    ]:
        plan = tiled._get_plan(layout, r, torch.device("cpu"))
        seen = torch.zeros(plan.ns, plan.nty, dtype=torch.int32)
        for call in plan.calls(heads, max_rows):
            seen[call.s0 : call.s1, call.t0 : call.t1] += 1
            assert call.reg.allowed.shape[0] == 1  # masks broadcast over strips and heads
            assert call.reg.allowed.shape[1] in (1, call.reg.t1 - call.reg.t0)
            if max_rows is not None:
                rows = (call.s1 - call.s0) * heads * (call.t1 - call.t0) * plan.win
                assert rows <= max(max_rows, heads * plan.win)
        assert (seen == 1).all()


def test_interior_tiles_share_one_mask():
    # a large grid stores its interior mask once (broadcast), so mask memory does not grow with N
    layout = TokenLayout(0, 128, 128)
    plan = tiled._get_plan(layout, 16, torch.device("cpu"))
    biggest = max(plan.regions, key=lambda reg: (reg.s1 - reg.s0) * (reg.t1 - reg.t0))
    assert biggest.allowed.shape[:2] == (1, 1)
    mask_bytes = sum(reg.allowed.numel() for reg in plan.regions)
    assert mask_bytes < 64 * plan.tq * plan.win


def test_no_call_is_quadratic(monkeypatch, kernel):
    """Every attention call (forward and backward) is text x all, image x (text+pooled) or tile x window."""
    layout = TokenLayout(4, 48, 40, down_factor=4)
    n, img = layout.seq_len, layout.image_len
    calls = []

    def checked(fn, backward):
        def wrapper(*args):
            q, k = (args[1], args[2]) if backward else (args[0], args[1])
            lq, lk = q.shape[-2], k.shape[-2]
            calls.append((lq, lk))
            assert lq * lk <= max(layout.text_len * n, img * (layout.text_len + layout.pooled_len), 2048), (
                f"attention call {lq} x {lk} on a sequence of {n}"
            )
            return fn(*args)

        return wrapper

    monkeypatch.setattr(tiled, "_attn_fwd", checked(tiled._attn_fwd, backward=False))
    monkeypatch.setattr(tiled, "_attn_bwd", checked(tiled._attn_bwd, backward=True))
    q, k, v, pw = make_inputs(layout, batch=1, heads=1)
    run_with_grads(q, k, v, pw, layout, 3, "tiled")
    assert len(calls) > 3


def test_huge_grid_forward_runs_in_linear_memory():
    # 384 x 384 image tokens: an N x N fp32 score matrix would be ~87 GB
    layout = TokenLayout(8, 384, 384)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, layout.seq_len, 8, generator=g) for _ in range(3))
    with torch.no_grad():
        out, lse = clear_attention(q, k, v, layout, 2, return_lse=True, backend="tiled")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # spot-check one image query (row 200, col 300) against a direct computation
    t, w = layout.text_len, layout.width
    i = t + 200 * w + 300
    near = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # dy^2 + dx^2 < 2^2
    keys = [*range(t), *(t + (200 + dy) * w + 300 + dx for dy, dx in near)]
    s = (q[0, 0, i] @ k[0, 0, keys].T) / 8**0.5
    expected = torch.softmax(s, 0) @ v[0, 0, keys]
    torch.testing.assert_close(out[0, 0, i], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse[0, 0, i], torch.logsumexp(s, 0), atol=1e-5, rtol=0)
