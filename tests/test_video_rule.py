"""The CLEAR rule on a video grid (T, H, W): layout, exact pair counts, and every backend against the
dense reference (out, lse, gradients). Query (t, y, x) sees video key (t', y', x') iff
dt^2 r^2 + (dy^2 + dx^2) rt^2 < r^2 rt^2; temporal_radius None = every frame."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import cleardit.attention.tiled as tiled
from cleardit import ClearConfig
from cleardit.attention import (
    TokenLayout,
    attention_flops,
    choose_backend,
    clear_attention,
    count_pairs,
    frame_thresholds,
    initial_pool_weight,
    pool_image_tokens,
)
from cleardit.attention.reference import allowed_mask
from tests.helpers import assert_close, compare_layout, make_inputs, run_with_grads

# (text_len, frames, height, width, text_first, down_factor, radius, temporal_radius): odd T/H/W,
# rt None / 1 / 2 / 3 / beyond the frames, radius beyond the grid, no text, text after the video,
# a single row, one frame with rt (= the 2D rule), the pooled branch per frame.
VIDEO_CASES = [
    (3, 3, 5, 6, True, None, 3, None),
    (2, 5, 4, 7, True, None, 3, 2),
    (4, 3, 7, 5, False, None, 4, 1),
    (0, 3, 6, 6, True, None, 2, 3),
    (2, 3, 4, 5, True, None, 40, None),  # radius beyond the grid: full attention
    (3, 3, 9, 7, False, 2, 4, 2),  # pooled per frame, 9x7 not divisible by df
    (1, 7, 3, 4, True, None, 5, 3),
    (2, 4, 1, 9, True, None, 3, None),
    (2, 1, 6, 6, True, None, 3, 2),  # one frame: rt changes nothing
]


def video_case_id(case) -> str:
    t, f, h, w, first, df, r, rt = case
    return f"T{t}-{f}x{h}x{w}-{'tf' if first else 'tl'}-df{df}-r{r}-rt{rt}"


def layout_of(case, tile=None) -> TokenLayout:
    t, f, h, w, first, df, _, _ = case
    return TokenLayout(t, h, w, text_first=first, down_factor=df, tile=tile, frames=f)


def literal_rule(layout: TokenLayout, radius: int, temporal_radius) -> torch.Tensor:
    """Bool [N, N + P] straight from the formula, pair by pair (independent of the library's tables)."""
    n, p = layout.seq_len, layout.pooled_len
    fr, ro, co = (c.tolist() for c in layout.image_coordinates())
    img0, img_len = layout.image_start, layout.image_len
    r2 = radius * radius
    mask = torch.zeros(n, n + p, dtype=torch.bool)
    for i, j in itertools.product(range(n), range(n + p)):
        i_img = img0 <= i < img0 + img_len
        if j >= n:
            mask[i, j] = i_img
            continue
        if not (i_img and img0 <= j < img0 + img_len):
            mask[i, j] = True
            continue
        a, b = i - img0, j - img0
        dt, s = fr[a] - fr[b], (ro[a] - ro[b]) ** 2 + (co[a] - co[b]) ** 2
        if temporal_radius is None:
            mask[i, j] = s < r2
        else:
            rt2 = temporal_radius**2
            mask[i, j] = dt * dt * r2 + s * rt2 < r2 * rt2
    return mask


# ---- layout and token order ------------------------------------------------------------------------


def test_video_layout_sizes_and_positional_2d_construction():
    video = TokenLayout(5, 4, 6, down_factor=4, frames=3)
    assert (video.image_len, video.seq_len, video.pooled_len) == (72, 77, 3 * 1 * 2)
    assert video.describe_grid() == "3x4x6" and video.is_video
    image = TokenLayout(5, 4, 6, True, None, (2, 3))  # the 2D positional form, unchanged
    assert image.frames == 1 and image.image_len == 24 and image.describe_grid() == "4x6"
    assert image.with_tile(None) == TokenLayout(5, 4, 6)
    assert video.with_tile((1, 2, 3)).frames == 3


def test_tile_major_3d_order():
    layout = TokenLayout(0, 3, 4, tile=(2, 2, 3), frames=3)
    s2r = layout.sequence_to_raster()
    assert sorted(s2r.tolist()) == list(range(36))
    assert torch.equal(s2r[layout.raster_to_sequence()], torch.arange(36))
    # the first tile: frames 0-1, rows 0-1, columns 0-2, raster inside the tile
    assert s2r[:12].tolist() == [0, 1, 2, 4, 5, 6, 12, 13, 14, 16, 17, 18]
    frames, rows, cols = layout.image_coordinates()
    assert torch.equal(frames * 12 + rows * 4 + cols, s2r)
    # a 2D tile on a video is one frame deep: each frame in the 2D tile-major order
    flat = TokenLayout(0, 3, 4, tile=(2, 3), frames=2).sequence_to_raster()
    per_frame = TokenLayout(0, 3, 4, tile=(2, 3)).sequence_to_raster()
    assert torch.equal(flat, torch.cat([per_frame, per_frame + 12]))


def test_bad_video_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="frames must be >= 1"):
        TokenLayout(0, 4, 4, frames=0)
    with pytest.raises(ValueError, match=r"\(tt, th, tw\)"):
        TokenLayout(0, 4, 4, tile=(1, 2, 3, 4), frames=2)
    layout = TokenLayout(2, 3, 4, frames=2)
    q = k = v = torch.randn(1, 2, layout.seq_len, 8)
    with pytest.raises(ValueError, match="temporal_radius must be >= 1"):
        clear_attention(q, k, v, layout, 2, 0)
    with pytest.raises(TypeError, match="temporal_radius must be a positive integer"):
        clear_attention(q, k, v, layout, 2, 1.5)
    with pytest.raises(TypeError, match="temporal_radius must be a positive integer"):
        clear_attention(q, k, v, layout, 2, True)
    with pytest.raises(ValueError, match=r"2 text \+ 2x3x4 image"):
        clear_attention(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], layout, 2)
    with pytest.raises(ValueError, match="temporal_radius must be >= 1"):
        ClearConfig(temporal_radius=-1)
    assert ClearConfig(temporal_radius=2.0).temporal_radius == 2


# ---- the rule and its pair counts --------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout,radius,rt",
    [
        (TokenLayout(2, 3, 4, frames=3), 2, None),
        (TokenLayout(1, 4, 3, text_first=False, frames=4), 3, 2),
        (TokenLayout(0, 3, 3, down_factor=2, frames=3), 2, 1),
        (TokenLayout(2, 3, 5, tile=(2, 2, 3), frames=3), 3, 3),
        (TokenLayout(1, 2, 3, frames=5), 4, 4),
    ],
)
def test_mask_and_pair_count_match_the_literal_rule(layout, radius, rt):
    mask = allowed_mask(layout, radius, temporal_radius=rt)
    assert torch.equal(mask, literal_rule(layout, radius, rt))
    assert int(mask.sum()) == count_pairs(layout, radius, rt)


@pytest.mark.parametrize("radius", [1, 2, 5, 8])
@pytest.mark.parametrize("rt", [None, 1, 2, 3, 7])
def test_frame_thresholds_are_the_rule(radius, rt):
    # for every frame offset and squared distance, "s < m[|dt|]" is exactly the integer rule
    m = frame_thresholds(radius, rt, 9)
    for dt, s in itertools.product(range(9), range(4 * radius * radius)):
        rule = s < radius**2 if rt is None else dt * dt * radius**2 + s * rt * rt < radius**2 * rt * rt
        assert (s < m[dt]) == rule, (dt, s)


@pytest.mark.parametrize("frames,h,w", [(1, 7, 9), (4, 5, 6), (9, 3, 11), (6, 10, 1)])
@pytest.mark.parametrize("radius,rt", [(1, None), (3, None), (3, 1), (4, 2), (6, 5), (30, 30)])
def test_count_pairs_closed_form_equals_brute_force(frames, h, w, radius, rt):
    layout = TokenLayout(3, h, w, frames=frames, down_factor=2)
    fr, ro, co = (c[:, None] - c[None, :] for c in layout.image_coordinates())
    s = ro**2 + co**2
    if rt is None:
        near = int((s < radius**2).sum())
    else:
        near = int((fr**2 * radius**2 + s * rt**2 < radius**2 * rt**2).sum())
    img, n = layout.image_len, layout.seq_len
    expected = 3 * n + img * 3 + near + img * layout.pooled_len
    assert count_pairs(layout, radius, rt) == expected
    assert attention_flops(layout, radius, 5, 64, temporal_radius=rt) == 4 * 64 * 5 * expected


def test_pair_counts_of_a_wan_sized_video_are_instant():
    # 21 x 45 x 80 tokens (Wan 2.1 720p, 81 frames): closed form, no N^2 work
    layout = TokenLayout(0, 45, 80, frames=21)
    cylinder, window = count_pairs(layout, 16, None), count_pairs(layout, 16, 4)
    assert window < cylinder < layout.seq_len**2
    assert count_pairs(layout, 200, 100) == layout.seq_len**2  # the window covers the whole video


def test_one_frame_is_the_2d_rule():
    image, video = TokenLayout(3, 7, 6), TokenLayout(3, 7, 6, frames=1)
    assert image == video
    assert count_pairs(video, 3, 1) == count_pairs(image, 3)
    q, k, v, _ = make_inputs(image)
    for backend in ("reference", "tiled"):
        plain = clear_attention(q, k, v, image, 3, backend=backend)
        with_rt = clear_attention(q, k, v, video, 3, 2, backend=backend)
        assert torch.equal(plain, with_rt)


@pytest.mark.parametrize("rt", [None, 9])
def test_window_beyond_the_video_equals_full_attention(rt):
    layout = TokenLayout(3, 4, 5, frames=4)
    q, k, v, _ = make_inputs(layout)
    full = F.scaled_dot_product_attention(q, k, v)
    for backend in ("reference", "tiled"):
        assert_close(clear_attention(q, k, v, layout, 50, rt, backend=backend), full, 1e-5, what=backend)


def test_pooled_branch_pools_each_frame_in_space():
    layout = TokenLayout(2, 5, 6, down_factor=2, frames=3)
    q, k, v, pw = make_inputs(layout)
    pooled = pool_image_tokens(k, layout, pw)
    frame = TokenLayout(0, 5, 6, down_factor=2)
    img = k[:, :, layout.image_slice].unflatten(2, (3, 30))
    per_frame = [pool_image_tokens(img[:, :, f], frame, pw) for f in range(3)]
    assert_close(pooled, torch.cat(per_frame, dim=2), 1e-6, what="pooled per frame")
    assert pooled.shape[2] == layout.pooled_len == 3 * 3 * 3


# ---- backends against the reference -----------------------------------------------------------------


@pytest.fixture(params=["fused", "matmul"])
def kernel(request, monkeypatch):
    """The tiled backend with PyTorch's fused CPU attention kernel and with the plain-matmul fallback."""
    monkeypatch.setattr(tiled, "USE_FUSED_CPU_KERNEL", request.param == "fused")
    return request.param


@pytest.mark.parametrize("case", VIDEO_CASES, ids=video_case_id)
def test_tiled_matches_reference(case, kernel):
    compare_layout(layout_of(case), case[6], "tiled", temporal_radius=case[7])


@pytest.mark.parametrize(
    "case,tile",
    [
        (VIDEO_CASES[1], (2, 2, 3)),
        (VIDEO_CASES[5], (1, 4, 4)),
        (VIDEO_CASES[6], (2, 3)),
        (VIDEO_CASES[0], (3, 5, 6)),
    ],
    ids=["tile2x2x3", "tile1x4x4-df2", "tile2x3", "tile-whole-frames"],
)
def test_tiled_tile_major_video_matches_reference(case, tile):
    compare_layout(layout_of(case, tile), case[6], "tiled", temporal_radius=case[7])


def test_tiled_head_groups_and_split_backward_calls(monkeypatch):
    monkeypatch.setattr(tiled, "_group_size", lambda *args, **kwargs: 2)
    monkeypatch.setattr(tiled, "_BACKWARD_CALL_ROWS", 500)
    compare_layout(TokenLayout(3, 11, 9, down_factor=4, frames=3), 5, "tiled", temporal_radius=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rt", [None, 2])
def test_tiled_low_precision(dtype, rt):
    layout = TokenLayout(3, 9, 8, down_factor=2, frames=5)
    q, k, v, pw = make_inputs(layout)
    ref = run_with_grads(q, k, v, pw, layout, 4, "reference", temporal_radius=rt)
    got = run_with_grads(q.to(dtype), k.to(dtype), v.to(dtype), pw, layout, 4, "tiled", temporal_radius=rt)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for name, a, e in zip(
        ["out", "lse", "dq", "dk", "dv"], [got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]], strict=False
    ):
        # the 2D tests' tolerance (tests/test_tiled.py): 2e-2 of the largest value
        assert_close(a, e, 2e-2 * max(1.0, e.abs().max().item()), what=f"{dtype} rt={rt} {name}")


@pytest.mark.parametrize("case", VIDEO_CASES[:7], ids=video_case_id)
def test_flex_forward_matches_reference(case):
    layout = layout_of(case)
    q, k, v, pw = make_inputs(layout)
    with torch.no_grad():
        got = clear_attention(
            q, k, v, layout, case[6], case[7], pool_weight=pw, return_lse=True, backend="flex"
        )
        ref = clear_attention(
            q, k, v, layout, case[6], case[7], pool_weight=pw, return_lse=True, backend="reference"
        )
    assert_close(got[0], ref[0], 1e-5, what="flex out")
    assert_close(got[1], ref[1], 1e-5, what="flex lse")


def test_flex_tile_major_video_matches_reference():
    layout = TokenLayout(2, 5, 6, tile=(2, 2, 4), down_factor=2, frames=4)
    q, k, v, pw = make_inputs(layout)
    with torch.no_grad():
        got = clear_attention(q, k, v, layout, 3, 2, pool_weight=pw, backend="flex")
        ref = clear_attention(q, k, v, layout, 3, 2, pool_weight=pw, backend="reference")
    assert_close(got, ref, 1e-5, what="flex tile-major video")


# Triton runs in its interpreter here (tests/conftest.py): tiny shapes, every kernel path in 3D.
TRITON_CASES = [
    ((2, 3, 4, 5, True, None, 3, 2), (2, 4, 4)),  # 3D tiles cut into one-frame blocks
    ((3, 4, 3, 5, False, 2, 3, None), None),  # raster, pooled per frame, text after the video
    ((0, 3, 4, 7, True, None, 4, 1), (4, 4)),  # 2D tiles on a video, rt = 1
]


@pytest.mark.parametrize("case,tile", TRITON_CASES, ids=[video_case_id(c) for c, _ in TRITON_CASES])
def test_triton_matches_reference(case, tile):
    # one head (the interpreter runs every program in Python), batch 2
    compare_layout(layout_of(case, tile), case[6], "triton", temporal_radius=case[7], atol=2e-5, heads=1)


def test_triton_video_blocks_follow_the_sequence_and_classify_exactly():
    from cleardit.attention import triton_kernels as tk

    layout = TokenLayout(0, 5, 7, tile=(2, 3, 4), frames=5)
    frames, rows, cols = layout.image_coordinates()
    seen = torch.zeros(layout.image_len, dtype=torch.long)
    blocks = tk.video_blocks(layout, 8)
    for start, y0, x0, bw, size, frame in blocks:
        offs = torch.arange(size)
        assert torch.equal(rows[start : start + size], y0 + offs // bw)
        assert torch.equal(cols[start : start + size], x0 + offs % bw)
        assert (frames[start : start + size] == frame).all()
        seen[start : start + size] += 1
    assert (seen == 1).all()
    table = torch.tensor(blocks)
    for radius, rt in [(3, 2), (2, None), (4, 3)]:
        cls = tk.classify_block_pairs(table, radius, frame_thresholds(radius, rt, layout.frames))
        mask = allowed_mask(layout, radius, temporal_radius=rt)
        for (i, bi), (j, bj) in itertools.product(enumerate(blocks), repeat=2):
            sub = mask[bi[0] : bi[0] + bi[4], bj[0] : bj[0] + bj[4]]
            assert cls[i, j].item() == (2 if sub.all() else 1 if sub.any() else 0), (radius, rt, i, j)


def test_auto_backend_for_video(monkeypatch):
    import cleardit.attention.dispatch as dispatch

    cpu = torch.device("cpu")
    assert choose_backend(TokenLayout(2, 40, 40, frames=3), cpu, 4, 2) == "tiled"
    assert choose_backend(TokenLayout(2, 8, 8, frames=3), cpu, 4, 2) == "reference"  # short sequence
    # dense while the window covers most pairs: rt = None sees 4x more frames than rt = 1 here
    assert choose_backend(TokenLayout(0, 12, 12, frames=20), cpu, 12, None) == "reference"
    assert choose_backend(TokenLayout(0, 12, 12, frames=20), cpu, 12, 1) == "tiled"
    monkeypatch.setattr(
        dispatch, "available_backends", lambda device: ["reference", "tiled", "flex", "triton"]
    )
    assert choose_backend(TokenLayout(2, 40, 40, frames=3), torch.device("cuda"), 4, 2) == "triton"


def test_strips_refuse_video():
    from cleardit.attention.strips import strip_clear_attention

    layout = TokenLayout(2, 4, 4, frames=2)
    q = torch.randn(1, 1, layout.seq_len, 8)
    with pytest.raises(NotImplementedError, match="video"):
        strip_clear_attention(q, q, q, layout, 2)


def test_pool_weight_is_shared_by_every_frame():
    # gradient of the (df, df) pool weight collects every frame's blocks, as the reference does
    layout = TokenLayout(0, 4, 4, down_factor=2, frames=3)
    q, k, v, _ = make_inputs(layout, batch=1)
    pw = initial_pool_weight(2)
    grads = []
    for backend in ("reference", "tiled"):
        leaf = pw.clone().requires_grad_(True)
        clear_attention(q, k, v, layout, 2, 2, pool_weight=leaf, backend=backend).sum().backward()
        grads.append(leaf.grad)
    assert_close(grads[1], grads[0], 1e-5 * grads[0].abs().max().item(), what="d pool weight")
