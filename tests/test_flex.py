"""FlexAttention backend (eager on CPU, forward only: FlexAttention has no CPU backward)."""

import pytest
import torch

from cleardit.attention import TokenLayout, clear_attention
from tests.helpers import CASES, case_id, make_inputs


def _forward(layout, radius, backend):
    q, k, v, pw = make_inputs(layout)
    with torch.no_grad():
        return clear_attention(q, k, v, layout, radius, pool_weight=pw, return_lse=True, backend=backend)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_flex_forward_matches_reference(case):
    t, h, w, first, df, r = case
    layout = TokenLayout(t, h, w, text_first=first, down_factor=df)
    out, lse = _forward(layout, r, "flex")
    ref_out, ref_lse = _forward(layout, r, "reference")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


def test_flex_tile_major_matches_reference():
    layout = TokenLayout(3, 9, 10, tile=(4, 4), down_factor=2)
    out, lse = _forward(layout, 4, "flex")
    ref_out, ref_lse = _forward(layout, 4, "reference")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


def test_flex_backward_on_cpu_is_a_clear_error():
    layout = TokenLayout(2, 4, 4)
    q, k, v, _ = make_inputs(layout)
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="backend='tiled'"):
        clear_attention(q, k, v, layout, 2, backend="flex")
