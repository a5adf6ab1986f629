"""The ground truth itself: the dense mask equals a per-pair brute force of the CLEAR rule."""

import pytest
import torch

from cleardit.attention import TokenLayout, clear_attention, count_pairs
from cleardit.attention.reference import allowed_mask


def brute_force_mask(layout: TokenLayout, radius: int) -> torch.Tensor:
    n, p = layout.seq_len, layout.pooled_len
    rows, cols = layout.image_positions()
    img0 = layout.image_start
    mask = torch.zeros(n, n + p, dtype=torch.bool)
    for i in range(n):
        i_text = not (img0 <= i < img0 + layout.image_len)
        for j in range(n + p):
            if j >= n:
                mask[i, j] = not i_text
                continue
            j_text = not (img0 <= j < img0 + layout.image_len)
            if i_text or j_text:
                mask[i, j] = True
            else:
                dy = rows[i - img0] - rows[j - img0]
                dx = cols[i - img0] - cols[j - img0]
                mask[i, j] = bool(dy * dy + dx * dx < radius * radius)
    return mask


@pytest.mark.parametrize(
    "layout,radius",
    [
        (TokenLayout(3, 4, 5), 2),
        (TokenLayout(2, 5, 3, text_first=False), 3),
        (TokenLayout(0, 4, 4, down_factor=2), 2),
        (TokenLayout(2, 5, 7, down_factor=3), 1),
        (TokenLayout(2, 5, 7, tile=(2, 3)), 3),
        (TokenLayout(1, 3, 3), 10),
    ],
)
def test_mask_matches_brute_force_and_pair_count(layout, radius):
    mask = allowed_mask(layout, radius)
    assert torch.equal(mask, brute_force_mask(layout, radius))
    assert int(mask.sum()) == count_pairs(layout, radius)


def test_strict_inequality_on_distance():
    # radius 2 on a 1x5 row: offsets 0 and +-1 are allowed (1 < 4), offset 2 is not (4 < 4 is false)
    mask = allowed_mask(TokenLayout(0, 1, 5), 2)
    assert mask[2].tolist() == [False, True, True, True, False]


def test_tile_major_order_is_a_permutation_of_raster():
    layout = TokenLayout(0, 7, 5, tile=(3, 2))
    s2r = layout.sequence_to_raster()
    assert sorted(s2r.tolist()) == list(range(35))
    assert torch.equal(s2r[layout.raster_to_sequence()], torch.arange(35))
    # the first tile holds rows 0-2, columns 0-1
    assert s2r[:6].tolist() == [0, 1, 5, 6, 10, 11]


def test_tile_major_reference_equals_permuted_raster():
    raster = TokenLayout(3, 6, 7)
    tiled = raster.with_tile((4, 3))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, raster.seq_len, 8, generator=g) for _ in range(3))
    perm = torch.cat([torch.arange(3), 3 + tiled.sequence_to_raster()])  # tiled position -> raster position
    out_raster = clear_attention(q, k, v, raster, 3, backend="reference")
    out_tiled = clear_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], tiled, 3, backend="reference")
    torch.testing.assert_close(out_tiled, out_raster[:, :, perm], atol=1e-6, rtol=0)


def test_huge_radius_equals_full_attention():
    layout = TokenLayout(4, 5, 6)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, layout.seq_len, 8, generator=g) for _ in range(3))
    out = clear_attention(q, k, v, layout, 100, backend="reference")
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_lse_is_logsumexp_of_allowed_scores():
    layout = TokenLayout(2, 3, 4)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, layout.seq_len, 4, generator=g) for _ in range(3))
    _, lse = clear_attention(q, k, v, layout, 2, return_lse=True, backend="reference")
    mask = allowed_mask(layout, 2)
    scores = (q[0, 0] @ k[0, 0].T) / 2.0
    expected = torch.stack([scores[i][mask[i]].logsumexp(0) for i in range(layout.seq_len)])
    torch.testing.assert_close(lse[0, 0], expected)


def test_auto_picks_dense_for_short_sequences_and_wide_discs_and_tiled_otherwise():
    from cleardit.attention import choose_backend

    cpu = torch.device("cpu")
    assert choose_backend(TokenLayout(40, 24, 24), cpu, 8) == "reference"  # 616 tokens
    assert choose_backend(TokenLayout(40, 48, 48), cpu, 100) == "reference"  # disc covers the grid
    assert choose_backend(TokenLayout(40, 48, 48), cpu, 8) == "tiled"
    assert choose_backend(TokenLayout(256, 128, 128), cpu, 10_000) == "tiled"  # too big for a dense mask


def test_bad_inputs_to_clear_attention_are_clear_errors():
    layout = TokenLayout(2, 3, 4)
    q = k = v = torch.randn(1, 2, layout.seq_len, 8)
    with pytest.raises(ValueError, match="has 13 tokens but the layout has 14"):
        clear_attention(q[:, :, :13], k[:, :, :13], v[:, :, :13], layout, 2)
    with pytest.raises(ValueError, match=r"shaped \[batch, heads, tokens, head_dim\]"):
        clear_attention(q[0], k[0], v[0], layout, 2)
    with pytest.raises(ValueError, match="shapes do not agree"):
        clear_attention(q, k[:, :1], v[:, :1], layout, 2)
    with pytest.raises(ValueError, match="radius must be >= 1"):
        clear_attention(q, k, v, layout, 0)
    with pytest.raises(TypeError, match="radius must be a positive integer"):
        clear_attention(q, k, v, layout, 2.5)
    with pytest.raises(ValueError, match="pool_weight is None"):
        clear_attention(q, k, v, TokenLayout(2, 3, 4, down_factor=2), 2)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        clear_attention(q, k, v, layout, 2, backend="fast")
    with pytest.raises(ValueError, match="at least 1x1"):
        TokenLayout(2, 0, 4)
