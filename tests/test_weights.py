"""save_weights / load_weights in the reference release's key names."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import cleardit
from cleardit.models.tiny import flux_inputs, tiny_flux_transformer


def reference_release_tensors(model, down_factor=None, seed=0):
    """A synthetic file in the reference naming: image-stream projections (+ spatial_weight)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, block in enumerate(model.transformer_blocks):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            lin = block.attn.get_submodule(proj)
            tensors[f"transformer_blocks.{i}.attn.{proj}.weight"] = torch.randn(lin.weight.shape, generator=g)
            tensors[f"transformer_blocks.{i}.attn.{proj}.bias"] = torch.randn(lin.bias.shape, generator=g)
    for i, block in enumerate(model.single_transformer_blocks):
        for proj in ("to_q", "to_k", "to_v"):
            lin = block.attn.get_submodule(proj)
            tensors[f"single_transformer_blocks.{i}.attn.{proj}.weight"] = torch.randn(
                lin.weight.shape, generator=g
            )
            tensors[f"single_transformer_blocks.{i}.attn.{proj}.bias"] = torch.randn(
                lin.bias.shape, generator=g
            )
    if down_factor:
        for prefix in [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))] + [
            f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))
        ]:
            shape = (1, 1, 1, down_factor, 1, down_factor, 1)
            tensors[f"{prefix}.attn.processor.spatial_weight"] = torch.rand(shape, generator=g)
    return tensors


def test_reference_release_file_loads_by_name(tmp_path):
    model = tiny_flux_transformer()
    path = tmp_path / "clear_local_8_down_4.safetensors"
    tensors = reference_release_tensors(model, down_factor=4)
    save_file(tensors, str(path))
    cleardit.linearize(model, radius=8, down_factor=4)
    report = cleardit.load_weights(model, path)
    assert sorted(report.used) == sorted(tensors) and not report.missing
    assert (report.radius, report.down_factor) == (8, 4)
    params = dict(model.named_parameters())
    for k, v in tensors.items():
        assert torch.equal(params[k], v)
    # untouched: text-stream projections keep their values
    assert "transformer_blocks.0.attn.add_q_proj.weight" not in tensors


def test_save_load_round_trip_and_metadata(tmp_path):
    model = tiny_flux_transformer()
    cleardit.linearize(model, radius=4, down_factor=2)
    with torch.no_grad():
        model.transformer_blocks[0].attn.processor.spatial_weight.add_(0.5)
    path = cleardit.save_weights(model, tmp_path / "mine.safetensors")
    assert not list(tmp_path.glob("*.tmp"))
    inputs = flux_inputs(model, 8, 8)
    with torch.no_grad():
        expected = model(**inputs).sample

    fresh = tiny_flux_transformer(seed=9)
    cleardit.linearize(fresh, radius=4, down_factor=2)
    # copy the frozen (non-CLEAR) weights so only load_weights can make the outputs agree
    clear_names = set(load_file(str(path)))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k not in clear_names}, strict=False)
    report = cleardit.load_weights(fresh, path)
    assert len(report.used) == len(clear_names)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).sample, expected)


def test_checkpoint_for_another_radius_or_down_factor_is_refused(tmp_path):
    model = tiny_flux_transformer()
    cleardit.linearize(model, radius=4)
    path = cleardit.save_weights(model, tmp_path / "r4.safetensors")
    other = tiny_flux_transformer()
    cleardit.linearize(other, radius=8)
    with pytest.raises(ValueError, match="made for radius=4, down_factor=None.*radius=8"):
        cleardit.load_weights(other, path)

    release = tmp_path / "clear_local_16_down_4.safetensors"
    save_file(reference_release_tensors(model, down_factor=4), str(release))
    with pytest.raises(ValueError, match="radius=16, down_factor=4"):
        cleardit.load_weights(other, release)


def test_file_without_metadata_checks_keys_and_shapes(tmp_path):
    model = tiny_flux_transformer()
    cleardit.linearize(model, radius=4)
    tensors = reference_release_tensors(model, down_factor=2)
    save_file(tensors, str(tmp_path / "anon.safetensors"))
    with pytest.raises(ValueError, match="linearize with down_factor"):
        cleardit.load_weights(model, tmp_path / "anon.safetensors")

    tensors = reference_release_tensors(model)
    tensors["transformer_blocks.0.attn.to_q.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"to_q.weight has shape \(3, 3\)"):
        cleardit.load_weights(model, tmp_path / "shape.safetensors")

    partial = {k: v for k, v in reference_release_tensors(model).items() if "single" not in k}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="lacks 12 of the model's 28"):
        cleardit.load_weights(model, tmp_path / "partial.safetensors")
    report = cleardit.load_weights(model, tmp_path / "partial.safetensors", strict=False)
    assert len(report.missing) == 12


def test_unlinearized_model_missing_file_and_garbage_are_clear_errors(tmp_path):
    model = tiny_flux_transformer()
    with pytest.raises(ValueError, match="not linearized"):
        cleardit.load_weights(model, tmp_path / "x.safetensors")
    cleardit.linearize(model, radius=4)
    with pytest.raises(FileNotFoundError, match="not found"):
        cleardit.load_weights(model, tmp_path / "x.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        cleardit.load_weights(model, tmp_path / "bad.safetensors")
