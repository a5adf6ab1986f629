"""linearize() on a tiny diffusers FluxTransformer2DModel built offline."""

import pytest
import torch

import cleardit
from cleardit.models.flux import ClearFluxAttnProcessor, grid_from_ids
from cleardit.models.tiny import flux_inputs, tiny_flux_transformer
from tests.helpers import DenseMaskProcessor


@pytest.fixture
def model():
    return tiny_flux_transformer()


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_huge_radius_equals_diffusers_and_restore_is_exact(model, backend):
    inputs = flux_inputs(model, 9, 14, text_len=5, batch=2)
    original = run(model, inputs)
    handle = cleardit.linearize(model, radius=10_000, backend=backend)
    torch.testing.assert_close(run(model, inputs), original, atol=1e-5, rtol=0)
    handle.restore()
    assert torch.equal(run(model, inputs), original)
    assert not any(isinstance(b.attn.processor, ClearFluxAttnProcessor) for b in model.transformer_blocks)


@pytest.mark.parametrize("backend", ["reference", "tiled", "flex"])
@pytest.mark.parametrize("height,width,radius", [(7, 10, 3), (12, 5, 2)])
def test_small_radius_equals_hand_written_dense_mask(model, backend, height, width, radius):
    inputs = flux_inputs(model, height, width, text_len=4, batch=2, seed=3)
    dense = DenseMaskProcessor(height, width, 4, radius)
    originals = [b.attn.processor for b in [*model.transformer_blocks, *model.single_transformer_blocks]]
    for b in [*model.transformer_blocks, *model.single_transformer_blocks]:
        b.attn.set_processor(dense)
    expected = run(model, inputs)
    for b, p in zip([*model.transformer_blocks, *model.single_transformer_blocks], originals, strict=True):
        b.attn.set_processor(p)
    cleardit.linearize(model, radius=radius, backend=backend)
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tile", [(2, 3), (4, 4), (8, 16)])
def test_tile_major_order_equals_raster_order(model, tile):
    inputs = flux_inputs(model, 11, 13, text_len=3, batch=2, seed=5)
    handle = cleardit.linearize(model, radius=3, tile=None, backend="reference")
    raster = run(model, inputs)
    handle.restore()
    cleardit.linearize(model, radius=3, tile=tile, backend="reference")
    torch.testing.assert_close(run(model, inputs), raster, atol=1e-5, rtol=0)


def test_tile_major_order_gradients_equal_raster(model):
    inputs = flux_inputs(model, 9, 10, text_len=3, seed=6)
    grads = []
    for tile in (None, (4, 4)):
        handle = cleardit.linearize(model, radius=3, tile=tile, backend="tiled")
        model.zero_grad()
        model(**inputs).sample.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        handle.restore()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-4)


def test_down_factor_adds_one_pooling_weight_per_layer(model):
    inputs = flux_inputs(model, 8, 12, text_len=3, seed=7)
    plain = run(model, inputs)
    handle = cleardit.linearize(model, radius=2, down_factor=4, backend="tiled")
    weights = [n for n, _ in handle.named_clear_parameters() if n.endswith("spatial_weight")]
    assert len(weights) == len(model.transformer_blocks) + len(model.single_transformer_blocks)
    sw = model.transformer_blocks[0].attn.processor.spatial_weight
    assert sw.shape == (1, 1, 1, 4, 1, 4, 1)
    assert torch.allclose(sw, torch.full_like(sw, 1 / 16))
    out = model(**inputs).sample
    assert not torch.allclose(out, plain)
    out.square().mean().backward()
    assert sw.grad is not None and sw.grad.abs().sum() > 0


def test_nonsquare_batch_and_text_length_follow_the_inputs(model):
    cleardit.linearize(model, radius=4, backend="tiled")
    for h, w, t, b in [(3, 17, 2, 1), (16, 6, 7, 3)]:
        out = run(model, flux_inputs(model, h, w, text_len=t, batch=b))
        assert out.shape == (b, h * w, model.config.in_channels)
        assert torch.isfinite(out).all()


def test_ids_that_are_not_one_grid_are_refused(model):
    cleardit.linearize(model, radius=3)
    inputs = flux_inputs(model, 4, 4)
    inputs["img_ids"] = inputs["img_ids"][torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ValueError, match="not a single row-major image grid"):
        run(model, inputs)
    two_images = flux_inputs(model, 4, 4)["img_ids"]
    second = two_images.clone()
    second[:, 0] = 1
    with pytest.raises(ValueError, match="not a single row-major image grid"):
        grid_from_ids(torch.cat([two_images, second]))


def test_grid_from_ids_accepts_offsets_and_bf16_ids():
    ids = torch.zeros(300, 2, 3)
    ids[..., 1] += 5 + torch.arange(300)[:, None]
    ids[..., 2] += 7 + torch.arange(2)[None, :]
    assert grid_from_ids(ids.reshape(-1, 3).to(torch.bfloat16)) == (300, 2)


def test_bad_arguments_are_clear_errors(model):
    with pytest.raises(ValueError, match="radius must be >= 1"):
        cleardit.linearize(model, radius=0)
    with pytest.raises(TypeError, match="cannot linearize a Linear"):
        cleardit.linearize(torch.nn.Linear(2, 2), radius=4)
    with pytest.raises(ValueError, match="backend must be one of"):
        cleardit.linearize(model, radius=4, backend="fast")
    with pytest.raises(ValueError, match="temporal_radius=2 is for video models.*drop temporal_radius"):
        cleardit.linearize(model, radius=4, temporal_radius=2)
    with pytest.raises(ValueError, match=r"tile=\(2, 8, 16\) has a depth in frames"):
        cleardit.linearize(model, radius=4, tile=(2, 8, 16))
    with pytest.raises(ValueError, match="tile must be positive ints"):
        cleardit.linearize(model, radius=4, tile=(1, 2, 3, 4))
    assert getattr(model, "_cleardit_handle", None) is None
    cleardit.linearize(model, radius=4)
    with pytest.raises(ValueError, match="already linearized"):
        cleardit.linearize(model, radius=4)


def test_trainable_parameters_are_the_image_stream_projections(model):
    handle = cleardit.linearize(model, radius=4)
    names = [n for n, _ in handle.named_clear_parameters()]
    assert "transformer_blocks.0.attn.to_out.0.weight" in names
    assert "single_transformer_blocks.1.attn.to_v.bias" in names
    assert not any("add_" in n or "norm" in n or "to_add_out" in n for n in names)
    # 2 double blocks x (q, k, v, out) + 2 single blocks x (q, k, v), weight + bias each
    assert len(names) == 2 * 4 * 2 + 2 * 3 * 2
