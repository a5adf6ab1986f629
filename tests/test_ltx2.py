"""LTX-2: CLEAR in space and time on a tiny LTX2VideoTransformer3DModel built offline (audio included).

Only the video self-attention (``attn1``) is replaced; the oracle is diffusers' processor math with a
brute-force boolean mask of the 3D rule, in raster order, written here independently of cleardit.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import LTX2VideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx2 import (
    apply_interleaved_rotary_emb,
    apply_split_rotary_emb,
)

from cleardit import linearize, load_weights, save_weights
from cleardit.models import NotSupportedError, adapter_for, get_handle
from cleardit.models.ltx2 import FULL_ATTENTIONS, ClearLTX2AttnProcessor
from cleardit.models.tiny import tiny_flux_transformer

CHANNELS, AUDIO_CHANNELS, CAPTION, TEXT_LEN, AUDIO_LEN = 4, 3, 6, 5, 6


def tiny_ltx2_transformer(seed: int = 0, **overrides) -> LTX2VideoTransformer3DModel:
    """Two blocks; video 2 heads x 8, audio 2 heads x 4; random non-zero weights everywhere."""
    torch.manual_seed(seed)
    config = dict(
        in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=AUDIO_CHANNELS, audio_out_channels=AUDIO_CHANNELS,
        audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8,
        num_layers=2, caption_channels=CAPTION, norm_elementwise_affine=True,
    )  # fmt: skip
    model = LTX2VideoTransformer3DModel(**{**config, **overrides})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # diffusers zero-initialises some layers: random everywhere instead
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval().requires_grad_(False)


def ltx2_inputs(frames: int, height: int, width: int, batch: int = 2, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, frames * height * width, CHANNELS, generator=g),
        audio_hidden_states=torch.randn(batch, AUDIO_LEN, AUDIO_CHANNELS, generator=g),
        encoder_hidden_states=torch.randn(batch, TEXT_LEN, CAPTION, generator=g),
        audio_encoder_hidden_states=torch.randn(batch, TEXT_LEN, CAPTION, generator=g),
        timestep=torch.tensor([500.0, 300.0][:batch]),
        num_frames=frames,
        height=height,
        width=width,
        audio_num_frames=AUDIO_LEN,
        return_dict=False,
    )


def run(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(**inputs)


def brute_force_mask(frames, height, width, radius, temporal_radius) -> torch.Tensor:
    """Query (t, y, x) sees key (t', y', x') iff dt^2 r^2 + (dy^2 + dx^2) rt^2 < r^2 rt^2 (rt None:
    dy^2 + dx^2 < r^2 in every frame); tokens in raster order."""
    cells = list(itertools.product(range(frames), range(height), range(width)))
    r2 = radius * radius
    rows = []
    for t, y, x in cells:
        row = []
        for t2, y2, x2 in cells:
            s = (y - y2) ** 2 + (x - x2) ** 2
            if temporal_radius is None:
                row.append(s < r2)
            else:
                rt2 = temporal_radius**2
                row.append((t - t2) ** 2 * r2 + s * rt2 < r2 * rt2)
        rows.append(row)
    return torch.tensor(rows)


class DenseMaskLTX2Processor:
    """diffusers' LTX-2 self-attention math (gates, q/k norms, RoPE, spatio-temporal guidance) with
    SDPA under a dense mask; with ``pool`` (df, weights [df, df]) every query also sees each frame's
    pooled keys/values (zero-padded df x df blocks, weighted sums)."""

    def __init__(self, mask: torch.Tensor, grid: tuple[int, int, int], pool=None):
        self.mask, self.grid, self.pool = mask, grid, pool

    def pooled(self, x):  # [B, heads, T*H*W, d] -> [B, heads, T*Hp*Wp, d]
        df, w = self.pool
        t, h, wd = self.grid
        b, n, _, d = x.shape
        x = x.reshape(b, n, t, h, wd, d)
        x = F.pad(x, (0, 0, 0, -wd % df, 0, -h % df))
        x = x.reshape(b, n, t, x.shape[3] // df, df, x.shape[4] // df, df, d)
        return torch.einsum("bntiajcd,ac->bntijd", x, w.to(x.dtype)).reshape(b, n, -1, d)

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
        query_rotary_emb=None, key_rotary_emb=None, perturbation_mask=None, all_perturbed=None,
    ):  # fmt: skip
        assert encoder_hidden_states is None and attention_mask is None
        value = attn.to_v(hidden_states)
        if all_perturbed is None:
            all_perturbed = perturbation_mask is not None and bool((perturbation_mask == 0).all())
        if all_perturbed:
            out = value
        else:
            q, k = attn.norm_q(attn.to_q(hidden_states)), attn.norm_k(attn.to_k(hidden_states))
            rope = apply_split_rotary_emb if attn.rope_type == "split" else apply_interleaved_rotary_emb
            q, k = rope(q, query_rotary_emb), rope(k, query_rotary_emb)
            q, k, v = (x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (q, k, value))
            mask = self.mask
            if self.pool is not None:
                k, v = torch.cat([k, self.pooled(k)], 2), torch.cat([v, self.pooled(v)], 2)
                mask = torch.cat([mask, torch.ones(mask.shape[0], k.shape[2] - mask.shape[1], dtype=bool)], 1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
            if perturbation_mask is not None:
                out = torch.lerp(value, out, perturbation_mask)
        if attn.to_gate_logits is not None:
            gates = 2.0 * torch.sigmoid(attn.to_gate_logits(hidden_states))
            out = (out.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2)
        return attn.to_out[0](out)


def oracle_model(model, grid, radius, temporal_radius, pool=None):
    """A copy of the (unlinearized) model whose attn1 layers run the dense-mask oracle."""
    oracle = copy.deepcopy(model)
    processor = DenseMaskLTX2Processor(brute_force_mask(*grid, radius, temporal_radius), grid, pool)
    for block in oracle.transformer_blocks:
        block.attn1.set_processor(processor)
    return oracle


def assert_outputs_close(got, expected, atol=1e-5):
    for name, a, e in zip(("video", "audio"), got, expected, strict=True):
        assert a.shape == e.shape, name
        torch.testing.assert_close(a, e, atol=atol, rtol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "grid,radius,rt,batch,tile,backend",
    [
        ((3, 5, 7), 3, 2, 2, (2, 3), "reference"),  # odd T/H/W, non-square, tile-major, rt = 2
        ((3, 5, 7), 2, None, 2, None, "tiled"),  # raster order, every frame (a cylinder)
        ((4, 6, 5), 3, 1, 1, (4, 4), "tiled"),  # rt = 1: each frame alone
        ((2, 9, 4), 4, 3, 2, (8, 16), "tiled"),  # the default tile: 9 rows > 8, edge tiles smaller
        ((3, 5, 7), 3, 2, 1, (2, 2, 3), "tiled"),  # tiles two frames deep (the last one frame)
    ],
)
def test_linearized_ltx2_matches_dense_mask_oracle(grid, radius, rt, batch, tile, backend):
    model = tiny_ltx2_transformer()
    inputs = ltx2_inputs(*grid, batch=batch)
    expected = run(oracle_model(model, grid, radius, rt), inputs)
    original = run(model, inputs)
    linearize(model, radius=radius, temporal_radius=rt, tile=tile, backend=backend)
    got = run(model, inputs)
    assert_outputs_close(got, expected)
    assert (got[0] - original[0]).abs().max() > 1e-2  # CLEAR really changed the video


@pytest.mark.parametrize("checkpointing", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_gradients_match_the_oracle(checkpointing):
    grid, radius, rt = (3, 5, 6), 3, 2
    model = tiny_ltx2_transformer()
    inputs = ltx2_inputs(*grid)
    oracle = oracle_model(model, grid, radius, rt)
    handle = linearize(model, radius=radius, temporal_radius=rt, tile=(2, 4), backend="tiled")
    trained = [name for name, _ in handle.named_clear_parameters()]
    if checkpointing:  # a recomputed block must see its own forward's grid
        model.enable_gradient_checkpointing()

    def grads(m):
        params = dict(m.named_parameters())
        leaves = [params[name].requires_grad_(True) for name in trained]
        x = inputs["hidden_states"].clone().requires_grad_(True)
        audio = inputs["audio_hidden_states"].clone().requires_grad_(True)
        video_out, audio_out = m(**dict(inputs, hidden_states=x, audio_hidden_states=audio))
        g = torch.Generator().manual_seed(7)
        loss = (video_out * torch.randn(video_out.shape, generator=g)).sum() + (
            audio_out * torch.randn(audio_out.shape, generator=g)
        ).sum()
        found = torch.autograd.grad(loss, [x, audio, *leaves])
        return dict(zip(["x", "audio", *trained], found, strict=True))

    expected = grads(oracle)
    assert len(expected) == 2 + 2 * 4 * 2  # inputs, 2 layers x (q, k, v, out) x (weight, bias)
    got = grads(model)
    for name, e in expected.items():
        assert e.abs().max() > 0, name
        torch.testing.assert_close(got[name], e, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "grid,radius,rt,tile",
    [((3, 5, 7), 3, 2, (2, 4)), pytest.param((2, 4, 6), 2, None, None, marks=pytest.mark.slow)],
)
def test_tiled_and_flex_agree_with_reference(grid, radius, rt, tile):
    model = tiny_ltx2_transformer()
    inputs = ltx2_inputs(*grid)
    reference = copy.deepcopy(model)
    linearize(reference, radius=radius, temporal_radius=rt, tile=tile, backend="reference")
    expected = run(reference, inputs)
    for backend in ("tiled", "flex"):
        candidate = copy.deepcopy(model)
        linearize(candidate, radius=radius, temporal_radius=rt, tile=tile, backend=backend)
        assert_outputs_close(run(candidate, inputs), expected, atol=2e-5)


@pytest.mark.parametrize(
    "rt,tile,gradients",
    [
        (2, (1, 2), False),
        pytest.param(None, (2, 2), True, marks=pytest.mark.slow),
        pytest.param(1, None, True, marks=pytest.mark.slow),
    ],
)
def test_triton_agrees_with_reference(rt, tile, gradients):
    """In Triton's interpreter (every program runs as Python): one block, one head, batch 1."""
    model = tiny_ltx2_transformer(num_layers=1, num_attention_heads=1, attention_head_dim=16)
    inputs = ltx2_inputs(2, 3, 4, batch=1)

    def outputs(backend):
        m = copy.deepcopy(model)
        linearize(m, radius=2, temporal_radius=rt, tile=tile, backend=backend)
        x = inputs["hidden_states"].clone().requires_grad_(gradients)
        with torch.set_grad_enabled(gradients):
            video_out, audio_out = m(**dict(inputs, hidden_states=x))
        if not gradients:
            return video_out, audio_out
        (grad,) = torch.autograd.grad(video_out.square().sum() + audio_out.square().sum(), [x])
        return video_out.detach(), audio_out.detach(), grad

    got, expected = outputs("triton"), outputs("reference")
    for name, a, e in zip(("video", "audio", "grad")[: len(got)], got, expected, strict=True):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_audio_runs_its_original_processors_and_is_exact_when_isolated():
    model = tiny_ltx2_transformer()
    inputs = ltx2_inputs(3, 5, 7)
    before = {
        (i, name): getattr(block, name).processor
        for i, block in enumerate(model.transformer_blocks)
        for name in FULL_ATTENTIONS
    }
    isolated = dict(inputs, isolate_modalities=True)  # no audio <-> video cross-attention
    original = run(model, isolated)
    linearize(model, radius=2, temporal_radius=1, tile=(2, 3))
    for (i, name), processor in before.items():
        assert getattr(model.transformer_blocks[i], name).processor is processor, name
    assert all(isinstance(b.attn1.processor, ClearLTX2AttnProcessor) for b in model.transformer_blocks)
    got = run(model, isolated)
    assert torch.equal(got[1], original[1])  # the audio stream never sees the video
    assert (got[0] - original[0]).abs().max() > 1e-2


def test_window_beyond_the_video_equals_the_original_and_restore_is_exact():
    model = tiny_ltx2_transformer()
    inputs = ltx2_inputs(3, 5, 7)
    original = run(model, inputs)
    assert_outputs_close(run(oracle_model(model, (3, 5, 7), 9, 4), inputs), original)
    handle = linearize(model, radius=9, temporal_radius=4, tile=(2, 3), backend="tiled")  # tile-major
    assert_outputs_close(run(model, inputs), original)  # video and audio
    handle.restore()
    restored = run(model, inputs)
    assert torch.equal(restored[0], original[0]) and torch.equal(restored[1], original[1])
    assert not any(isinstance(b.attn1.processor, ClearLTX2AttnProcessor) for b in model.transformer_blocks)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not hasattr(model, "_cleardit_grid") and get_handle(model) is None


def test_pipeline_style_inputs_coords_per_token_timesteps_and_keyframes():
    """What LTX-2's pipelines pass: video_coords made by the rope, an fps, per-token timesteps with
    their own audio timestep (LTX2ConditionPipeline) and a keyframe mask: all follow the tokens."""
    grid, radius, rt = (3, 5, 7), 3, 2
    model = tiny_ltx2_transformer(use_keyframes_abs_pos_embedding=True)
    inputs = ltx2_inputs(*grid)
    n = inputs["hidden_states"].shape[1]
    g = torch.Generator().manual_seed(11)
    inputs.update(
        video_coords=model.rope.prepare_video_coords(2, *grid, torch.device("cpu"), fps=25.0),
        fps=25.0,
        timestep=torch.rand(2, n, generator=g) * 1000,
        audio_timestep=torch.tensor([400.0, 200.0]),
        video_keyframes_mask=(torch.rand(2, n, 1, generator=g) > 0.5).float(),
    )
    expected = run(oracle_model(model, grid, radius, rt), inputs)
    linearize(model, radius=radius, temporal_radius=rt, tile=(2, 3), backend="tiled")
    assert_outputs_close(run(model, inputs), expected)


def test_split_rope_gates_and_spatio_temporal_guidance():
    """LTX-2.3's options: split RoPE, gated attention, prompt modulation, perturbed (STG) processors."""
    grid, radius, rt = (2, 5, 6), 2, None
    model = tiny_ltx2_transformer(
        rope_type="split", gated_attn=True, perturbed_attn=True, cross_attn_mod=True
    )
    inputs = ltx2_inputs(*grid)
    inputs.update(sigma=torch.tensor([0.5, 0.3]), spatio_temporal_guidance_blocks=[1])
    partial = dict(inputs, perturbation_mask=torch.tensor([0.0, 1.0]))  # perturb the first sample only
    oracle = oracle_model(model, grid, radius, rt)
    expected, expected_all = run(oracle, partial), run(oracle, inputs)  # STG on every sample
    linearize(model, radius=radius, temporal_radius=rt, tile=(2, 4), backend="tiled")
    assert_outputs_close(run(model, partial), expected)
    assert_outputs_close(run(model, inputs), expected_all)


def test_pooled_branch_matches_the_oracle_and_weights_round_trip(tmp_path):
    grid, radius, rt = (3, 5, 7), 2, 2
    model = tiny_ltx2_transformer()
    inputs = ltx2_inputs(*grid)
    pool = 0.25 + 0.1 * torch.randn(2, 2, generator=torch.Generator().manual_seed(2))
    expected = run(oracle_model(model, grid, radius, rt, pool=(2, pool)), inputs)
    handle = linearize(model, radius=radius, temporal_radius=rt, down_factor=2, tile=(2, 3))
    names = [n for n, _ in handle.named_clear_parameters()]
    assert len(names) == 2 * (4 * 2 + 1)  # 2 layers x ((q, k, v, out) x (weight, bias) + pooling)
    assert all(n.startswith("transformer_blocks.") and ".attn1." in n for n in names)
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.attn1.processor.spatial_weight.copy_(pool.reshape(1, 1, 1, 2, 1, 2, 1))
    assert_outputs_close(run(model, inputs), expected)

    with torch.no_grad():
        for _, p in handle.named_clear_parameters():
            p.add_(0.01)
    path = save_weights(model, tmp_path / "ltx2.safetensors")
    assert safetensors.safe_open(str(path), "pt").metadata()["family"] == "ltx2"
    other = tiny_ltx2_transformer(seed=5)
    other_handle = linearize(other, radius=radius, temporal_radius=rt, down_factor=2)
    load_weights(other, path)
    for (name, a), (_, b) in zip(
        handle.named_clear_parameters(), other_handle.named_clear_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    flux = tiny_flux_transformer()
    linearize(flux, radius=radius, down_factor=2)
    flux_file = save_weights(flux, tmp_path / "flux.safetensors")
    with pytest.raises(ValueError, match="holds weights for a FluxTransformer2DModel, not a LTX2Video"):
        load_weights(other, flux_file)
    release = tmp_path / "clear_local_2_down_2.safetensors"  # no metadata: a FLUX.1 release file
    safetensors.torch.save_file({k: v.contiguous() for k, v in handle.clear_state_dict().items()}, release)
    with pytest.raises(ValueError, match="CLEAR weights for flux models, not for this ltx2 model"):
        load_weights(other, release)


def test_bf16_error_is_of_the_order_of_the_models_own():
    grid = (3, 6, 6)
    model = tiny_ltx2_transformer()
    inputs = ltx2_inputs(*grid)
    half = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    reference = run(model, inputs)
    own = run(copy.deepcopy(model).bfloat16(), half)
    own_error = max((o.float() - r).abs().max() for o, r in zip(own, reference, strict=True))
    expected = run(oracle_model(model, grid, 3, 2), inputs)
    model = model.bfloat16()
    linearize(model, radius=3, temporal_radius=2, tile=(4, 4), backend="tiled")
    got = run(model, half)
    assert got[0].dtype == torch.bfloat16
    error = max((o.float() - e).abs().max() for o, e in zip(got, expected, strict=True))
    assert 0 < own_error and error <= 2 * own_error, (error, own_error)


def test_bad_grids_and_inputs_are_refused():
    model = tiny_ltx2_transformer()
    linearize(model, radius=3, temporal_radius=2, tile=(2, 3))
    inputs = ltx2_inputs(3, 5, 7)
    with pytest.raises(ValueError, match=r"holds 105 video tokens, but num_frames=4.*4x5x7 grid of 140"):
        run(model, dict(inputs, num_frames=4))
    with pytest.raises(ValueError, match=r"num_frames, height and width.*num_frames=None"):
        run(model, dict(inputs, num_frames=None))
    with pytest.raises(ValueError, match=r"packed video tokens \[batch, tokens, channels\], got \(2, 105\)"):
        run(model, dict(inputs, hidden_states=inputs["hidden_states"][..., 0]))
    coords = model.rope.prepare_video_coords(2, 3, 5, 7, torch.device("cpu"))
    swapped = coords.reshape(2, 3, 3, 5, 7, 2).transpose(3, 4).reshape(2, 3, 105, 2)  # columns first
    with pytest.raises(ValueError, match="not lay the tokens out as one 3x5x7 grid in raster order"):
        run(model, dict(inputs, video_coords=swapped))
    with pytest.raises(ValueError, match=r"video_coords must be \[batch, 3, 105, 2\]"):
        run(model, dict(inputs, video_coords=coords[:, :, :100]))
    with pytest.raises(NotSupportedError, match="video_self_attention_mask.*handle.restore"):
        run(model, dict(inputs, video_self_attention_mask=torch.ones(2, 105, 105)))
    with pytest.raises(ValueError, match="temporal_radius must be >= 1"):
        linearize(tiny_ltx2_transformer(), radius=3, temporal_radius=0)
    with pytest.raises(RuntimeError, match="belongs to no linearized model"):
        ClearLTX2AttnProcessor()(model.transformer_blocks[0].attn1, torch.randn(1, 6, 16))


def test_adapter_protocol():
    model = tiny_ltx2_transformer()
    adapter = adapter_for(model)
    assert adapter.family == "ltx2" and adapter.video
    assert adapter.attention_geometry(model) == (2, 8, 2)
    assert [n for n, _ in adapter.consistency_modules(model)] == [
        "transformer_blocks.0.attn1",
        "transformer_blocks.1.attn1",
    ]
    assert "images only" in adapter.strips_unsupported()
    assert "linearize" in adapter.describe() and "not yet" in adapter.describe()
    assert adapter.loads_pipeline_class("LTX2Pipeline")
    with pytest.raises(
        NotSupportedError, match=r"cleardit.linearize\(pipe.transformer, radius=.*temporal_radius"
    ):
        adapter.load_pipeline("/models/ltx2", torch.float32)
