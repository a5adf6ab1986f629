"""The attention-consistency loss compares the student's and the teacher's attention outputs token by
token: in every family both must run in one token order. At a radius beyond the grid the student
computes the teacher's model, so the loss is zero up to rounding, also on grids larger than a tile
(where the student's tokens may run tile-major)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cleardit.distill.losses import AttentionRecorder
from cleardit.distill.teacher import TeacherView
from cleardit.distill.trainer import student_config
from cleardit.models import adapter_for, linearize
from cleardit.models.tiny import flux_inputs, tiny_flux_transformer
from tests import test_flux2, test_qwenimage, test_sd3, test_wan, test_zimage
from tests.tiny_wan import tiny_wan_transformer

# grids of 10 x 20 tokens: larger than the default 8 x 16 tile
FAMILIES = {
    "flux": lambda: (tiny_flux_transformer(), lambda m: flux_inputs(m, 10, 20, batch=2)),
    "flux2": lambda: (test_flux2.tiny_flux2_transformer(), lambda m: test_flux2.flux2_inputs(10, 20)),
    "qwenimage": lambda: (
        test_qwenimage.tiny_qwenimage_transformer(),
        lambda m: test_qwenimage.qwen_inputs(10, 20, [3, 7]),
    ),
    "sd3": lambda: (test_sd3.tiny_sd3_transformer(), lambda m: test_sd3.sd3_inputs(10, 20)),
    "wan": lambda: (tiny_wan_transformer(), lambda m: test_wan.wan_inputs(3, 10, 20)),  # 3 x 10 x 20 tokens
    "zimage": lambda: (
        test_zimage.tiny_zimage_transformer(),
        lambda m: test_zimage.zimage_inputs(10, 20, [5, 40]),
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_consistency_loss_is_zero_when_the_student_computes_the_teacher(family):
    model, make_inputs = FAMILIES[family]()
    inputs = make_inputs(model)
    adapter = adapter_for(model)
    teacher = TeacherView(model)
    handle = linearize(model, config=student_config(adapter, radius=100, down_factor=None, backend="tiled"))
    teacher.freeze_initial(handle)
    recorder = AttentionRecorder(dict(adapter.consistency_modules(model)))
    with torch.no_grad():
        teacher.run(**inputs)
        expected = recorder.take()
        model(**inputs)
        got = recorder.take()
    recorder.remove()
    assert got.keys() == expected.keys() and got
    for name in got:
        scale = expected[name].square().mean().item()
        assert F.mse_loss(got[name], expected[name]).item() <= 1e-9 * max(scale, 1.0), name
