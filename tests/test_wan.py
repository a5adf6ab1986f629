"""Wan 2.x: CLEAR in space and time on a tiny WanTransformer3DModel (attn1 only), against a dense 3D-mask
oracle written here; and the adapter's pipeline/training side on a tiny WanPipeline built offline."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from cleardit import linearize, load_weights, save_weights
from cleardit.models import NotSupportedError, adapter_for, get_handle
from cleardit.models.tiny import tiny_flux_transformer
from cleardit.models.wan import ClearWanAttnProcessor, WanAdapter
from tests.tiny_wan import FRAMES, HEIGHT, LATENT_CHANNELS, TEXT_DIM, WIDTH, tiny_wan_transformer

PATCH = (1, 2, 2)


def wan_inputs(frames, height, width, batch=2, text_len=5, seed=3, patch=PATCH) -> dict:
    """Forward kwargs for a ``frames`` x ``height`` x ``width`` token grid (latents times the patch)."""
    g = torch.Generator().manual_seed(seed)
    latents = (batch, LATENT_CHANNELS, frames * patch[0], height * patch[1], width * patch[2])
    return dict(
        hidden_states=torch.randn(latents, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
        encoder_hidden_states=torch.randn(batch, text_len, TEXT_DIM, generator=g),
        return_dict=False,
    )


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def run_with_grads(model, inputs, seed=7):
    """Output, and the gradients of a random projection of it w.r.t. the latents, the text and every
    attn1 parameter."""
    model.requires_grad_(False)
    params = {n: p.requires_grad_(True) for n, p in model.named_parameters() if ".attn1." in n}
    x = inputs["hidden_states"].clone().requires_grad_(True)
    text = inputs["encoder_hidden_states"].clone().requires_grad_(True)
    out = model(**{**inputs, "hidden_states": x, "encoder_hidden_states": text})[0]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * weights).sum().backward()
    grads = {"hidden_states": x.grad, "encoder_hidden_states": text.grad}
    grads.update({n: p.grad for n, p in params.items()})
    model.requires_grad_(False)
    return out.detach(), grads


# ----------------------------------------------------------------------------- the oracle
class DenseMask3DProcessor:
    """Written independently of cleardit: Wan's self-attention (q/k/v, RMS norms across heads, RoPE as
    a complex rotation of channel pairs) with SDPA under a boolean mask built pair by pair from the
    rule on the raster (t, y, x) grid: dt² r² + (dy² + dx²) rt² < r² rt², or dy² + dx² < r² (rt None)."""

    def __init__(self, frames, height, width, radius, temporal_radius):
        cells = [(t, y, x) for t in range(frames) for y in range(height) for x in range(width)]
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
        self.mask = torch.tensor(rows)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        assert encoder_hidden_states is None and attention_mask is None
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        cos, sin = rotary_emb
        turn = torch.complex(cos[..., 0::2], sin[..., 0::2])

        def rotate(t):
            pairs = torch.view_as_complex(t.double().unflatten(-1, (-1, 2)).contiguous())
            return torch.view_as_real(pairs * turn).flatten(-2).to(t.dtype)

        q, k = rotate(q), rotate(k)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=self.mask
        )
        return attn.to_out[0](out.transpose(1, 2).flatten(2))


def oracle_model(model, grid, radius, temporal_radius):
    oracle = copy.deepcopy(model)
    processor = DenseMask3DProcessor(*grid, radius, temporal_radius)
    for block in oracle.blocks:
        block.attn1.set_processor(processor)
    return oracle


def assert_grads_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert expected[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------- CLEAR vs the oracle
@pytest.mark.parametrize(
    "grid,radius,rt,batch,tile,backend,patch",
    [
        ((3, 5, 7), 2, 2, 2, None, "reference", PATCH),  # odd T/H/W, rt = 2, raster order
        ((3, 5, 7), 3, None, 2, (2, 3), "tiled", PATCH),  # rt None (every frame), tile-major
        ((4, 6, 5), 2, 1, 1, (4, 4), "tiled", PATCH),  # rt = 1: each frame alone; edge tiles
        ((2, 3, 4), 2, 2, 2, (2, 3), "reference", (2, 2, 2)),  # a temporal patch: T from frames / p_t
        ((3, 5, 7), 3, 2, 1, (2, 2, 3), "tiled", PATCH),  # tiles two frames deep (the last one frame)
    ],
)
def test_linearized_wan_matches_the_dense_3d_mask_oracle(grid, radius, rt, batch, tile, backend, patch):
    model = tiny_wan_transformer(patch_size=patch)
    inputs = wan_inputs(*grid, batch=batch, patch=patch)
    expected, expected_grads = run_with_grads(oracle_model(model, grid, radius, rt), inputs)
    original = run(model, inputs)
    linearize(model, radius=radius, temporal_radius=rt, tile=tile, backend=backend)
    got, grads = run_with_grads(model, inputs)
    assert got.shape == inputs["hidden_states"].shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert_grads_close(grads, expected_grads)
    assert (got - original).abs().max() > 1e-2  # CLEAR really changed it


@pytest.mark.parametrize("rt", [None, 9])
def test_a_window_beyond_the_video_equals_the_original_and_restore_is_exact(rt):
    model = tiny_wan_transformer()
    inputs = wan_inputs(3, 4, 5, batch=2)
    original = run(model, inputs)
    modules = adapter_for(model).attention_modules(model)
    before = [a.processor for a in modules]
    cross = [b.attn2.processor for b in model.blocks]
    handle = linearize(model, radius=7, temporal_radius=rt, tile=(2, 3), backend="tiled")  # 7 > diagonal
    assert all(isinstance(a.processor, ClearWanAttnProcessor) for a in modules)
    # attn2 (cross-attention to the text) keeps its own processor
    assert [b.attn2.processor for b in model.blocks] == cross
    assert all(type(p) is WanAttnProcessor for p in cross)
    torch.testing.assert_close(run(model, inputs), original, atol=1e-5, rtol=1e-5)
    handle.restore()
    assert torch.equal(run(model, inputs), original)
    assert [a.processor for a in modules] == before
    for module in (model, model.patch_embedding, model.rope, model.proj_out):
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not hasattr(module, "_cleardit_grid")
    assert get_handle(model) is None


# Every backend against reference on 3D shapes: (grid, radius, rt, tile, down_factor, batch).
SHAPES = {
    "3x4x5-rt2-tiles": ((3, 4, 5), 2, 2, (2, 3), None, 2),
    "2x5x3-rtNone-raster": ((2, 5, 3), 3, None, None, None, 2),
    "5x3x4-rt1-pooled": ((5, 3, 4), 2, 1, (2, 2), 2, 2),  # the pooled branch, per frame
    "2x3x4-rt2-tiles": ((2, 3, 4), 2, 2, (2, 3), None, 1),
}
SLOW = pytest.mark.slow
BACKEND_CASES = [
    pytest.param("tiled", "3x4x5-rt2-tiles"),
    pytest.param("tiled", "2x5x3-rtNone-raster", marks=SLOW),
    pytest.param("tiled", "5x3x4-rt1-pooled", marks=SLOW),
    pytest.param("flex", "5x3x4-rt1-pooled"),
    pytest.param("flex", "3x4x5-rt2-tiles", marks=SLOW),
    pytest.param("flex", "2x5x3-rtNone-raster", marks=SLOW),
    pytest.param("triton", "2x3x4-rt2-tiles"),  # forward only
    pytest.param("triton", "3x4x5-rt2-tiles", marks=SLOW),
    pytest.param("triton", "2x5x3-rtNone-raster", marks=SLOW),
    pytest.param("triton", "5x3x4-rt1-pooled", marks=SLOW),
]


@pytest.mark.parametrize("backend,shape", BACKEND_CASES)
def test_every_backend_agrees_with_reference(backend, shape):
    grid, radius, rt, tile, df, batch = SHAPES[shape]
    # Triton runs in its interpreter here (tests/conftest.py): one head, one block keeps it to seconds
    small = dict(num_attention_heads=1, attention_head_dim=24, num_layers=1) if backend == "triton" else {}
    model = tiny_wan_transformer(seed=len(shape), **small)
    inputs = wan_inputs(*grid, batch=batch, seed=len(shape))
    handle = linearize(model, radius=radius, temporal_radius=rt, down_factor=df, backend="reference")
    # FlexAttention runs forward only on the CPU; Triton's backward kernels are slow in the interpreter,
    # so by default they run in tests/test_video_rule.py (attention level) and here in the slow cases
    if backend == "flex" or (backend == "triton" and shape == "2x3x4-rt2-tiles"):
        expected = run(model, inputs)
        handle.restore()
        linearize(model, radius=radius, temporal_radius=rt, down_factor=df, tile=tile, backend=backend)
        torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=1e-5)
        return
    expected, expected_grads = run_with_grads(model, inputs)
    handle.restore()
    linearize(model, radius=radius, temporal_radius=rt, down_factor=df, tile=tile, backend=backend)
    got, grads = run_with_grads(model, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert_grads_close(grads, expected_grads)


def test_bf16_error_is_of_the_order_of_the_models_own():
    model = tiny_wan_transformer()
    inputs = wan_inputs(3, 6, 7)
    half = {k: v.to(torch.bfloat16) if torch.is_tensor(v) else v for k, v in inputs.items()}
    own_error = (run(copy.deepcopy(model).to(torch.bfloat16), half).float() - run(model, inputs)).abs().max()
    expected = run(oracle_model(model, (3, 6, 7), 3, 2), inputs)
    model = model.to(torch.bfloat16)
    linearize(model, radius=3, temporal_radius=2, backend="tiled")
    got = run(model, half)
    assert got.dtype == torch.bfloat16
    error = (got.float() - expected).abs().max()
    assert 0 < own_error and error <= 2 * own_error, (error, own_error)


def test_per_token_timesteps_follow_the_tile_order():
    """Wan 2.2 TI2V passes one timestep per token [B, T*H*W] (raster order): tile-major runs equal raster."""
    model = tiny_wan_transformer()
    inputs = wan_inputs(3, 4, 6, batch=2)
    g = torch.Generator().manual_seed(5)
    inputs["timestep"] = torch.rand(2, 3 * 4 * 6, generator=g) * 1000
    outputs = []
    for tile in (None, (2, 4)):
        handle = linearize(model, radius=2, temporal_radius=2, tile=tile, backend="tiled")
        outputs.append(run(model, inputs))
        handle.restore()
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    linearize(model, radius=2, tile=(2, 4))
    bad = dict(inputs, timestep=inputs["timestep"][:, :-1])
    with pytest.raises(ValueError, match="timestep has 71 per-token values but the latents describe 72"):
        run(model, bad)


def test_gradient_checkpointing_recomputes_each_forward_with_its_own_grid():
    """Two forwards on grids of equal token count (2x3x4, 2x4x3) before one backward: each recomputed
    block uses its own forward's grid, so the gradients equal those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_wan_transformer()
        if checkpointing:
            model.enable_gradient_checkpointing()
        linearize(model, radius=2, temporal_radius=1, tile=(2, 2), backend="tiled")
        weight = model.blocks[0].attn1.to_q.weight.requires_grad_(True)
        loss = sum(model(**wan_inputs(2, h, w, batch=1))[0].square().mean() for h, w in ((3, 4), (4, 3)))
        loss.backward()
        grads.append(weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_fused_projections_give_the_same_result_and_follow_loaded_weights(tmp_path):
    model = tiny_wan_transformer()
    inputs = wan_inputs(2, 3, 5)
    handle = linearize(model, radius=2, temporal_radius=2)
    plain = run(model, inputs)
    with torch.no_grad():  # trained weights, saved from the unfused model
        for _, p in handle.named_clear_parameters():
            p.add_(0.05)
    trained = run(model, inputs)
    path = save_weights(model, tmp_path / "wan.safetensors")
    fused = tiny_wan_transformer()
    fused.fuse_qkv_projections()
    assert fused.blocks[0].attn1.fused_projections
    linearize(fused, radius=2, temporal_radius=2)
    torch.testing.assert_close(run(fused, inputs), plain, atol=1e-5, rtol=1e-5)
    load_weights(fused, path)  # into to_q/k/v, then copied into the fused to_qkv the processor reads
    torch.testing.assert_close(run(fused, inputs), trained, atol=1e-5, rtol=1e-5)
    assert (trained - plain).abs().max() > 1e-3


def test_temporal_radius_is_accepted_and_bad_inputs_are_refused():
    model = tiny_wan_transformer()
    assert WanAdapter.video and adapter_for(model).family == "wan"
    handle = linearize(model, radius=3, temporal_radius=2)
    assert handle.config.temporal_radius == 2
    inputs = wan_inputs(2, 4, 5)
    odd = dict(inputs, hidden_states=inputs["hidden_states"][..., :-1])  # 2 x 8 x 9 latents
    with pytest.raises(ValueError, match=r"latents of 2x8x9 .* not a whole number of 1x2x2 patches"):
        run(model, odd)
    flat = dict(inputs, hidden_states=inputs["hidden_states"][:, :, 0])
    with pytest.raises(ValueError, match=r"\[batch, channels, frames, height, width\], got \(2, 4, 8, 10\)"):
        run(model, flat)
    with pytest.raises(ValueError, match="temporal_radius=2 is for video models"):
        linearize(tiny_flux_transformer(), radius=3, temporal_radius=2)
    with pytest.raises(NotSupportedError, match="images only; Wan makes videos"):
        adapter_for(model).install_strips(tiny_wan_transformer(), handle.config, None)


def test_processors_it_cannot_replace_are_refused():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = tiny_wan_transformer()
    model.blocks[1].attn1.set_processor(AttnProcessor2_0())
    with pytest.raises(NotSupportedError, match="WanAttnProcessor in attn1; this model has AttnProcessor2_0"):
        linearize(model, radius=2)
    attn = tiny_wan_transformer().blocks[0].attn1
    with pytest.raises(RuntimeError, match="belongs to no linearized model"):
        ClearWanAttnProcessor()(attn, torch.randn(1, 6, 24))


def test_trainable_parameters_and_weights_round_trip(tmp_path):
    model = tiny_wan_transformer()
    handle = linearize(model, radius=2, temporal_radius=2, down_factor=2)
    names = [n for n, _ in handle.named_clear_parameters()]
    # 2 blocks x attn1 (q, k, v, out) x (weight, bias) + one pooling weight each
    assert len(names) == 2 * 4 * 2 + 2
    assert "blocks.1.attn1.to_out.0.weight" in names and "blocks.0.attn1.processor.spatial_weight" in names
    assert not any("attn2" in n or "norm" in n for n in names)
    with torch.no_grad():
        for _, p in handle.named_clear_parameters():
            p.add_(0.01)
    path = save_weights(model, tmp_path / "wan.safetensors")
    other = tiny_wan_transformer(seed=5)
    other_handle = linearize(other, radius=2, temporal_radius=2, down_factor=2)
    load_weights(other, path)
    for (name, a), (_, b) in zip(
        handle.named_clear_parameters(), other_handle.named_clear_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    flux = tiny_flux_transformer()
    linearize(flux, radius=2, down_factor=2)
    with pytest.raises(
        ValueError, match="holds weights for a WanTransformer3DModel, not a FluxTransformer2DModel"
    ):
        load_weights(flux, path)
    with pytest.raises(
        ValueError, match="holds weights for a FluxTransformer2DModel, not a WanTransformer3DModel"
    ):
        load_weights(other, save_weights(flux, tmp_path / "flux.safetensors"))


def test_adapter_geometry_and_frame_counts():
    from cleardit.models.adapter import check_num_frames, nearest_frame_counts

    model = tiny_wan_transformer()
    adapter = adapter_for(model)
    assert adapter.attention_geometry(model) == (2, 12, 2)
    assert [n for n, _ in adapter.consistency_modules(model)] == ["blocks.0.attn1", "blocks.1.attn1"]
    assert "wan (WanTransformer3DModel, WanPipeline)" in adapter.describe()
    assert nearest_frame_counts(80, 4) == [77, 81] and nearest_frame_counts(81, 4) == [81]
    assert check_num_frames(81, 4, "wan") == 81
    with pytest.raises(ValueError, match=r"num_frames=80 does not fit the wan VAE.*use 77 or 81"):
        check_num_frames(80, 4, "wan")
    with pytest.raises(ValueError, match="num_frames must be a positive integer"):
        check_num_frames(0, 4, "wan")


# ----------------------------------------------------------------------------- the pipeline side
@pytest.fixture(scope="module")
def wan_pipe():
    from tests.tiny_wan import tiny_wan_pipeline

    return tiny_wan_pipeline()


def test_training_inputs_and_decoding_are_the_pipelines(wan_pipe):
    """Hooked during a 2-step pipeline run: ``training_inputs`` rebuilds each transformer call (same
    inputs, same velocity), the last Euler step lands on the latents the adapter decodes, and
    ``decode_latents`` gives the pipeline's own frames."""
    pipe, adapter = wan_pipe, adapter_for(wan_pipe)
    calls, last = [], {}
    hook = pipe.transformer.register_forward_hook(
        lambda _m, _a, kwargs, out: calls.append((kwargs, out[0])), with_kwargs=True
    )

    def keep_latents(_pipe, step, t, kwargs):
        last.update(kwargs)
        return kwargs

    try:
        frames = pipe(
            prompt="a red circle", height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=2,
            guidance_scale=1.0, max_sequence_length=12, output_type="np",
            generator=torch.Generator().manual_seed(0), callback_on_step_end=keep_latents,
        ).frames  # fmt: skip
    finally:
        hook.remove()
    assert frames.shape == (1, FRAMES, HEIGHT, WIDTH, 3) and len(calls) == 2
    for step, (kwargs, velocity) in enumerate(calls):
        sigma = pipe.scheduler.sigmas[step].expand(1)
        text = {"prompt_embeds": kwargs["encoder_hidden_states"]}
        inputs = adapter.training_inputs(pipe.transformer, kwargs["hidden_states"], sigma, text, None)
        assert torch.equal(inputs["hidden_states"], kwargs["hidden_states"])
        assert torch.equal(inputs["timestep"], kwargs["timestep"])  # sigma x 1000, bit for bit
        with torch.no_grad():
            torch.testing.assert_close(
                adapter.velocity(pipe.transformer(**inputs)), velocity, atol=1e-6, rtol=0
            )
    kwargs, velocity = calls[-1]
    latents = adapter.unpack_latents(pipe, last["latents"], (HEIGHT, WIDTH))
    assert latents.shape == (1, LATENT_CHANNELS, 2, HEIGHT // 8, WIDTH // 8)
    expected = kwargs["hidden_states"] + (0.0 - float(pipe.scheduler.sigmas[-2])) * velocity
    torch.testing.assert_close(adapter.pack_latents(latents), expected, atol=1e-5, rtol=1e-5)
    decoded = adapter.decode_latents(pipe, last["latents"], (HEIGHT, WIDTH), output_type="np")
    np.testing.assert_allclose(decoded, frames, atol=1e-6, rtol=0)


def test_clear_runs_through_the_pipeline(wan_pipe):
    common = dict(
        prompt="a red circle", height=HEIGHT, width=WIDTH + 16, num_frames=9, num_inference_steps=2,
        guidance_scale=1.0, max_sequence_length=12, output_type="latent",
    )  # fmt: skip
    full = wan_pipe(**common, generator=torch.Generator().manual_seed(1)).frames
    handle = linearize(wan_pipe.transformer, radius=1, temporal_radius=1, tile=(2, 2))
    try:
        clear = wan_pipe(**common, generator=torch.Generator().manual_seed(1)).frames
    finally:
        handle.restore()
    assert clear.shape == full.shape == (1, LATENT_CHANNELS, 3, HEIGHT // 8, (WIDTH + 16) // 8)
    assert (clear - full).abs().max() > 1e-3  # each token sees only itself: CLEAR changed the video


def test_the_adapter_loads_the_folder_and_serves_the_jobs(tmp_path):
    from tests.tiny_wan import save_tiny_wan_pipeline

    folder = save_tiny_wan_pipeline(tmp_path / "tiny-wan")
    assert json.loads((folder / "cleardit.json").read_text())["base_width"] == WIDTH
    adapter = adapter_for(tiny_wan_transformer())
    pipe = adapter.load_pipeline(folder, torch.float32)
    assert type(pipe).__name__ == "WanPipeline" and adapter_for(pipe) is adapter
    assert adapter.size_factor(pipe) == 16 and adapter.default_size(pipe) == 480
    assert adapter.default_video_size(pipe) == (480, 832) and adapter.default_frames == 81
    assert adapter.attention_text_len(12) == 0  # the text is in attn2, not in CLEAR's attn1
    assert adapter.max_text_tokens(pipe) == 40  # the tiny tokenizer's length
    assert adapter.frames_factor(pipe) == 4 and adapter.latent_frames(pipe, 9) == 3
    with pytest.raises(ValueError, match="num_frames=6 does not fit the wan VAE.*use 5 or 9"):
        adapter.check_frames(pipe, 6)
    text = adapter.encode_prompt(
        pipe, ["a red circle"], images_per_prompt=2, text_len=12, true_cfg=2.0, negative_prompt=""
    )
    assert set(text) == {"prompt_embeds", "negative_prompt_embeds"}
    assert text["prompt_embeds"].shape == text["negative_prompt_embeds"].shape == (2, 12, TEXT_DIM)
    assert set(adapter.encode_prompt(pipe, "a", images_per_prompt=1, text_len=12, true_cfg=1.0,
                                     negative_prompt=None)) == {"prompt_embeds"}  # fmt: skip
    single = adapter.encode_text(pipe, "a red circle", 12)
    assert single["prompt_embeds"].shape == (12, TEXT_DIM)
    torch.testing.assert_close(single["prompt_embeds"], text["prompt_embeds"][0])
    sample = {**single, "latents": torch.zeros(LATENT_CHANNELS, 2, 4, 6)}
    adapter.check_conditions(pipe.transformer, sample)
    with pytest.raises(ValueError, match="text embedding width is 8 in the data, 16 in the transformer"):
        adapter.check_conditions(pipe.transformer, {**sample, "prompt_embeds": torch.zeros(12, 8)})
    assert adapter.call_options(None, 5.0, "blurry", 12) == dict(
        guidance_scale=5.0, max_sequence_length=12, negative_prompt="blurry"
    )
    noise = adapter.initial_noise(
        pipe, 2, 32, 64, torch.float32, "cpu", torch.Generator().manual_seed(0), frames=9
    )
    drawn = pipe.prepare_latents(
        2, LATENT_CHANNELS, 32, 64, 9, torch.float32, "cpu", torch.Generator().manual_seed(0)
    )
    assert noise.shape == (2, LATENT_CHANNELS, 3, 4, 8) and torch.equal(noise, drawn)
    with pytest.raises(TypeError, match=r"pass initial_noise\(\.\.\., frames=N\)"):
        adapter.initial_noise(pipe, 1, 32, 64, torch.float32, "cpu", None)
    # a Wan 2.2 A14B folder (two transformers) is refused before anything loads
    two = tmp_path / "a14b"
    two.mkdir()
    index = json.loads((folder / "model_index.json").read_text())
    (two / "model_index.json").write_text(json.dumps({**index, "transformer_2": index["transformer"]}))
    with pytest.raises(NotSupportedError, match="two transformers.*linearize both by hand"):
        adapter.load_pipeline(two, torch.float32)
