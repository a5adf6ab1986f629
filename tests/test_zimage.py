"""Z-Image: CLEAR on diffusers' ZImageTransformer2DModel (image-only noise refiner, padded unified
sequence [image | caption] with a batch-padding mask) against a brute-force dense-mask oracle."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from PIL import Image

from cleardit import generate, linearize, load_weights, save_weights
from cleardit.distill.teacher import TeacherView
from cleardit.distill.teacher_data import TeacherDataset, make_teacher_data
from cleardit.distill.trainer import DistillConfig, Distiller, RunOptions
from cleardit.eval import evaluate_model
from cleardit.mini.pipeline import build_mini_pipeline, mini_model_info
from cleardit.mini.vocab import vocab_size
from cleardit.models import NotSupportedError, adapter_for, get_handle
from cleardit.models.zimage import ClearZImageAttnProcessor, ZImageAdapter

CAPTION_DIM = 16
CHANNELS = 4


def tiny_zimage_transformer(seed: int = 0, caption_dim: int = CAPTION_DIM) -> ZImageTransformer2DModel:
    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(
        in_channels=CHANNELS, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
        cap_feat_dim=caption_dim, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64],
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random weights everywhere, the learned pad tokens included (zeros in diffusers)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval().requires_grad_(False)


def zimage_inputs(height: int, width: int, captions: list[int], seed: int = 3) -> dict:
    """A batch of one-frame latents of height x width tokens (2x2 latent pixels each) and captions of
    the given lengths (padded by diffusers to multiples of 32, then to the longest sample)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=[torch.randn(CHANNELS, 1, 2 * height, 2 * width, generator=g) for _ in captions],
        t=torch.linspace(0.3, 0.7, len(captions)),
        cap_feats=[torch.randn(n, CAPTION_DIM, generator=g) for n in captions],
        return_dict=False,
    )


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack(model(**inputs)[0])


class DenseOracle:
    """Written independently of cleardit: Z-Image's attention (to_q/k/v, heads, RMS norms, complex
    RoPE, output projection) with one brute-force boolean mask. The first height x width tokens are
    the grid (raster order); every other token (image pads, caption, caption pads) is global: it
    sees every key and every query sees it. diffusers' batch-padding key mask is ANDed in."""

    def __init__(self, height: int, width: int, radius: int):
        self.height, self.width, self.radius = height, width, radius
        self.masks: dict[int, torch.Tensor] = {}

    def rule(self, seq_len: int) -> torch.Tensor:
        """Bool [S, S]: every (query, key) pair checked from the grid positions."""
        if seq_len not in self.masks:
            cell = torch.arange(self.height * self.width)
            y, x = cell // self.width, cell % self.width
            mask = torch.ones(seq_len, seq_len, dtype=torch.bool)
            mask[: cell.numel(), : cell.numel()] = (y[:, None] - y) ** 2 + (
                x[:, None] - x
            ) ** 2 < self.radius**2
            self.masks[seq_len] = mask
        return self.masks[seq_len]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        def heads(t):
            return t.unflatten(-1, (attn.heads, -1))

        q, k, v = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        q, k = attn.norm_q(q), attn.norm_k(k)

        def rope(t):
            pairs = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
            return torch.view_as_real(pairs * freqs_cis[:, :, None]).flatten(3).to(t.dtype)

        q, k = rope(q), rope(k)
        mask = self.rule(q.shape[1])[None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, :]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None]
        )
        return attn.to_out[0](out.transpose(1, 2).flatten(2, 3))


def oracle_output(model, inputs, height, width, radius) -> torch.Tensor:
    oracle = copy.deepcopy(model)
    dense = DenseOracle(height, width, radius)
    for block in [*oracle.noise_refiner, *oracle.layers]:  # the caption-only refiner keeps its attention
        block.attention.set_processor(dense)
    return run(oracle, inputs)


# (height, width, captions, radius): grid tokens not a multiple of 32 (image pads), captions of
# different padded lengths (batch padding), the default 8x16 tile order, odd and non-square grids
CASES = [
    (5, 7, [5, 40], 1),  # 35 tokens: 29 image pads; captions padded to 32 and 64
    (9, 6, [7, 7], 3),  # no batch padding
    (10, 19, [3, 33], 4),  # larger than one 8x16 tile: tile-major order
    (8, 4, [12], 2),  # 32 tokens: no image pads; batch 1
    (6, 5, [20, 50], 30),  # radius beyond the grid
]


@pytest.mark.parametrize("height,width,captions,radius", CASES, ids=lambda v: str(v))
def test_linearized_zimage_matches_the_dense_mask_oracle(height, width, captions, radius):
    model = tiny_zimage_transformer()
    inputs = zimage_inputs(height, width, captions)
    expected = oracle_output(model, inputs, height, width, radius)
    handle = linearize(model, radius=radius, backend="tiled")
    got = run(model, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    handle.restore()
    original = run(model, inputs)
    assert (original - expected).abs().max() > 1e-3 or radius > height + width  # the rule changes the model


@pytest.mark.parametrize("backend", ["reference", "tiled", "flex", "triton"])
def test_every_backend_matches_the_oracle(backend):
    height, width, captions, radius = 4, 5, [3, 33], 2  # image pads, batch padding
    model = tiny_zimage_transformer(seed=1)
    inputs = zimage_inputs(height, width, captions, seed=4)
    expected = oracle_output(model, inputs, height, width, radius)
    linearize(model, radius=radius, backend=backend, tile=(2, 4))  # tile-major order
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=1e-5)


def test_radius_beyond_the_grid_equals_the_original_model_and_restore_is_exact():
    model = tiny_zimage_transformer()
    inputs = zimage_inputs(9, 13, [4, 37])
    original = run(model, inputs)
    processors = [b.attention.processor for b in [*model.noise_refiner, *model.layers]]
    handle = linearize(model, radius=100)
    assert all(isinstance(b.attention.processor, ClearZImageAttnProcessor) for b in model.layers)
    torch.testing.assert_close(run(model, inputs), original, atol=1e-5, rtol=1e-5)
    handle.restore()
    assert [b.attention.processor for b in [*model.noise_refiner, *model.layers]] == processors
    assert not hasattr(model, "_cleardit_grid") and not model._forward_pre_hooks
    assert torch.equal(run(model, inputs), original)


@pytest.mark.parametrize("tile", [(2, 3), (4, 4)])
def test_tile_major_order_equals_raster_order_with_gradients(tile):
    model = tiny_zimage_transformer().requires_grad_(True)
    inputs = zimage_inputs(6, 7, [6, 35])
    grads = []
    for order in (None, tile):
        handle = linearize(model, radius=3, tile=order, backend="reference")
        model.zero_grad()
        out = torch.stack(model(**inputs)[0])
        out.square().sum().backward()
        grads.append(
            (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
        handle.restore()
    (raster, g_raster), (tiled, g_tiled) = grads
    torch.testing.assert_close(tiled, raster, atol=1e-5, rtol=1e-5)
    assert g_raster.keys() == g_tiled.keys() and g_raster
    for name in g_raster:  # fp32 sums in another order: compare relative to each gradient's size
        scale = g_raster[name].abs().max().item()
        torch.testing.assert_close(g_tiled[name], g_raster[name], atol=1e-4 * scale, rtol=1e-3)


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = zimage_inputs(5, 7, [5, 40])  # batch padding
    grads = []
    for checkpointing in (False, True):
        model = tiny_zimage_transformer().requires_grad_(True)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        linearize(model, radius=3, backend="reference", tile=(2, 4))  # tile-major order
        torch.stack(model(**inputs)[0]).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-4)


def test_batch_padding_is_masked_exactly():
    """A sample's output does not depend on the other samples' captions (their padding is masked)."""
    model = tiny_zimage_transformer()
    linearize(model, radius=3, backend="tiled")
    batch = zimage_inputs(6, 7, [4, 70])
    alone = dict(batch, x=batch["x"][:1], t=batch["t"][:1], cap_feats=batch["cap_feats"][:1])
    # fp32 noise is ~1e-5 here; unmasked padding would change the output by far more
    torch.testing.assert_close(run(model, batch)[0], run(model, alone)[0], atol=1e-4, rtol=1e-4)


def test_bf16_error_is_within_the_models_own_bf16_error():
    height, width, captions, radius = 7, 10, [6, 40], 3
    model = tiny_zimage_transformer()
    inputs = zimage_inputs(height, width, captions)
    expected = oracle_output(model, inputs, height, width, radius)
    original = run(model, inputs)

    def bf16(model):
        half = dict(
            inputs,
            x=[t.bfloat16() for t in inputs["x"]],
            cap_feats=[c.bfloat16() for c in inputs["cap_feats"]],
        )
        return run(model.to(torch.bfloat16), half).float()

    own_error = (bf16(copy.deepcopy(model)) - original).abs().max().item()
    linearize(model, radius=radius, backend="tiled")
    clear_error = (bf16(model) - expected).abs().max().item()
    assert 0 < own_error and clear_error <= 2 * own_error, (clear_error, own_error)


def test_down_factor_adds_one_trainable_pooling_weight_per_layer():
    model = tiny_zimage_transformer()
    inputs = zimage_inputs(8, 12, [5])
    plain = run(model, inputs)
    handle = linearize(model, radius=2, down_factor=4, backend="tiled")
    names = [n for n, _ in handle.named_clear_parameters()]
    assert names == [
        f"{stage}.{i}.attention.{part}"
        for stage, count in (("noise_refiner", 1), ("layers", 2))
        for i in range(count)
        for part in ("to_q.weight", "to_k.weight", "to_v.weight", "processor.spatial_weight")
    ]
    with_reference = copy.deepcopy(model)
    get_handle(with_reference).restore()
    linearize(with_reference, radius=2, down_factor=4, backend="reference")
    out = run(model, inputs)
    torch.testing.assert_close(out, run(with_reference, inputs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-3)
    weight = model.layers[0].attention.processor.spatial_weight
    weight.requires_grad_(True)
    torch.stack(model(**inputs)[0]).square().mean().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_inputs_that_are_not_one_grid_are_clear_errors():
    model = tiny_zimage_transformer()
    linearize(model, radius=2)
    inputs = zimage_inputs(4, 5, [3, 3])
    mixed = dict(inputs, x=[inputs["x"][0], torch.randn(CHANNELS, 1, 10, 8)])
    with pytest.raises(ValueError, match="different sizes"):
        model(**mixed)
    with pytest.raises(ValueError, match="one frame"):
        model(**dict(inputs, x=[torch.randn(CHANNELS, 2, 8, 10)] * 2))
    with pytest.raises(NotSupportedError, match="omni mode"):
        model(**dict(inputs, x=[[t] for t in inputs["x"]]))
    with pytest.raises(ValueError, match=r"not one stacked tensor \(2, 4, 1, 8, 10\): pass list\(x\)"):
        model(**dict(inputs, x=torch.stack(inputs["x"])))
    with pytest.raises(ValueError, match="one caption each"):
        model(**dict(inputs, cap_feats=inputs["cap_feats"][:1]))
    # the noise refiner run outside the transformer's forward (as ZImageControlNetModel does)
    block = model.noise_refiner[0]
    with pytest.raises(RuntimeError, match="ControlNet is not supported"):
        block(torch.randn(1, 32, 32), None, torch.ones(1, 32, 8, dtype=torch.complex64), torch.zeros(1, 32))
    assert torch.isfinite(run(model, inputs)).all()  # the model still works after the errors


def test_weights_round_trip_and_other_families_are_refused(tmp_path):
    model = tiny_zimage_transformer()
    handle = linearize(model, radius=2)
    assert adapter_for(model).family == "zimage"
    path = save_weights(model, tmp_path / "zimage.safetensors")
    other = tiny_zimage_transformer(seed=5)
    other_handle = linearize(other, radius=2)
    load_weights(other, path)
    for (name, a), (_, b) in zip(
        handle.named_clear_parameters(), other_handle.named_clear_parameters(), strict=True
    ):
        assert torch.equal(a, b), name

    from cleardit.models.tiny import tiny_flux_transformer

    flux = tiny_flux_transformer()
    linearize(flux, radius=2)
    with pytest.raises(ValueError, match="ZImageTransformer2DModel"):
        load_weights(flux, path)
    flux_path = save_weights(flux, tmp_path / "flux.safetensors")
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        load_weights(other, flux_path)


def test_adapter_reports_geometry():
    model = tiny_zimage_transformer()
    adapter = adapter_for(model)
    assert adapter.attention_geometry(model) == (2, 16, 3)
    assert [n for n, _ in adapter.consistency_modules(model)] == ["layers.0.attention", "layers.1.attention"]
    assert adapter.strips_unsupported() is None and not adapter.strip_latents
    assert "zimage (ZImageTransformer2DModel" in adapter.describe()


# ----------------------------------------------------------------------------- the pipeline side
def tiny_zimage_pipeline(seed: int = 0) -> ZImagePipeline:
    """The tiny mini pipeline's VAE and word-level tokenizer (with a plain chat template, which
    ZImagePipeline applies to every prompt) around a tiny Qwen3 text encoder and Z-Image transformer."""
    from transformers import Qwen3Config, Qwen3Model

    mini = build_mini_pipeline("tiny", seed=seed)
    tokenizer = mini.tokenizer_2
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        )
    ).eval()  # fmt: skip
    assert mini.vae.config.latent_channels == CHANNELS
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**mini.scheduler.config),
        vae=mini.vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny_zimage_transformer(seed, caption_dim=32),
    )


@pytest.fixture(scope="module")
def zimage_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zimage") / "tiny-zimage"
    tiny_zimage_pipeline().save_pretrained(str(folder), safe_serialization=True)
    mini_model_info("tiny", name="tiny-zimage", default_guidance=None).write(folder)
    return folder


def test_generate_with_a_tiny_zimage_pipeline(zimage_folder, tmp_path):
    result = generate(
        ["a red circle", "a blue square on a green field"], model=zimage_folder, height=64, width=96,
        steps=2, radius=2, true_cfg=2.0, compare=True, output=tmp_path, quiet=True,
    )  # fmt: skip
    assert len(result.images) == 2 and result.images[0].size == (96, 64)
    assert result.compare is not None and result.compare.flops_clear < result.compare.flops_full
    assert Image.open(result.paths[0]).text["true_cfg"] == "2.0"
    highres = generate(
        "a red circle", model=zimage_folder, height=96, width=128, steps=2, radius=2, highres=True, quiet=True
    )
    assert highres.images[0].size == (128, 96) and highres.base_images[0].size[0] < 128
    latent = generate(
        "a red circle", model=zimage_folder, height=96, width=128, steps=2, radius=2, highres=True,
        upscale="latent", quiet=True,
    )  # fmt: skip
    assert latent.images[0].size == (128, 96)


def test_clear_beyond_the_grid_equals_full_attention_through_the_pipeline(zimage_folder):
    """With CFG the pipeline batches the prompt and the empty negative prompt: captions of different
    lengths, so the unified sequence carries batch padding."""
    common = dict(model=zimage_folder, height=64, width=80, steps=2, true_cfg=2.0, quiet=True)
    full = generate("a red circle", radius=0, **common).images[0]
    clear = generate("a red circle", radius=20, **common).images[0]
    diff = np.abs(np.asarray(full, dtype=int) - np.asarray(clear, dtype=int))
    assert diff.max() <= 1


def test_zimage_has_no_distilled_guidance_and_encodes_its_prompts(zimage_folder):
    with pytest.raises(ValueError, match="--true-cfg"):
        generate("a red circle", model=zimage_folder, height=64, width=64, steps=1, guidance=3.0, quiet=True)
    pipe = ZImageAdapter().load_pipeline(zimage_folder, torch.float32)
    adapter = adapter_for(pipe)
    text = adapter.encode_prompt(
        pipe, ["a red circle", "a blue square"], images_per_prompt=2, text_len=12, true_cfg=2.0,
        negative_prompt="",
    )  # fmt: skip
    assert set(text) == {"prompt_embeds", "negative_prompt_embeds"}
    assert len(text["prompt_embeds"]) == 4 and len(text["negative_prompt_embeds"]) == 4
    assert text["prompt_embeds"][0].shape[1] == 32 and len(text["prompt_embeds"][0]) <= 12
    assert torch.equal(text["prompt_embeds"][0], text["prompt_embeds"][1])
    noise = adapter.initial_noise(pipe, 2, 64, 80, torch.float32, "cpu", torch.Generator().manual_seed(0))
    assert noise.shape == (2, CHANNELS, 8, 10)
    assert adapter.size_factor(pipe) == 16 and adapter.max_text_tokens(pipe) == 40
    row = adapter.encode_text(pipe, "a red circle", 12)
    kept = int(row["prompt_attention_mask"].sum())
    assert row["prompt_embeds"].shape == (12, 32) and 0 < kept < 12
    assert not row["prompt_embeds"][kept:].any()


def test_the_teacher_pass_is_the_original_model_in_tile_major_order():
    """The distillation teacher swaps the original processors in: the tokens then stay in raster
    order (only CLEAR's processors permute RoPE alike)."""
    model = tiny_zimage_transformer()
    inputs = zimage_inputs(6, 7, [4, 40])
    expected = run(model, inputs)
    teacher = TeacherView(model)
    handle = linearize(model, radius=2, tile=(2, 4))
    teacher.freeze_initial(handle)
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(teacher.run(**inputs)[0]), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(run(model, inputs), expected, atol=1e-3)


def test_distill_data_train_resume_and_eval_on_a_tiny_zimage_pipeline(zimage_folder, tmp_path, monkeypatch):
    prompts = ["a red circle", "a big blue square on a green field"]  # different text lengths
    data = tmp_path / "data"
    make_teacher_data(zimage_folder, prompts, data, resolution=64, steps=2, quiet=True)
    dataset = TeacherDataset(data)
    assert set(dataset[0]) >= {"latents", "prompt_embeds", "prompt_attention_mask"}
    assert dataset[0]["latents"].shape == (CHANNELS, 8, 8)
    cfg = DistillConfig(radius=2, steps=2, batch_size=2, lr=1e-3, attention_layers="0,1")
    opts = RunOptions(checkpoint_every=1, quiet=True)
    original_step = Distiller._step

    def crash_at_1(self, m, opt, step):
        if step == 1:
            raise RuntimeError("simulated crash")
        return original_step(self, m, opt, step)

    monkeypatch.setattr(Distiller, "_step", crash_at_1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Distiller(cfg, dataset, tmp_path / "run", model=zimage_folder, opts=opts).run()
    monkeypatch.setattr(Distiller, "_step", original_step)
    result = Distiller(cfg, dataset, tmp_path / "run", model=zimage_folder, resume=True, opts=opts).run()
    assert [e["step"] for e in result.losses] == [1, 2] and result.weights.is_file()
    assert all(np.isfinite(e["loss"]) and e["flow"] > 0 for e in result.losses)
    report = evaluate_model(
        prompts,
        model=zimage_folder,
        radii=[2],
        output=tmp_path / "eval",
        steps=2,
        metrics=["psnr"],
        quiet=True,
    )
    assert report.teacher.generated == 2 and report.clear[0].generated == 2
    assert report.results["r2"].to_dict()


# ----------------------------------------------------------------------------- patch parallelism
def _zimage_strips_worker(rank: int, world: int) -> list[float]:
    """Each case: the parallel model's full output vs the single-process linearized model's, relative to
    its size (the tiny model's outputs reach ~40, where fp32 steps by ~4e-6)."""
    from cleardit.parallel import parallelize

    errors = []
    # (height, width, captions, radius, down_factor): 7 rows on 3 ranks (strips of 3, 2, 2 rows) with
    # image pads and batch padding; the pooled branch; radius beyond the grid, no image pads (32 tokens)
    cases = [(7, 5, [5, 40], 4, None), (9, 6, [7, 7], 3, 2), (8, 4, [12, 40], 30, None)]
    for i, (height, width, captions, radius, down_factor) in enumerate(cases):
        model = tiny_zimage_transformer(seed=i)
        inputs = zimage_inputs(height, width, captions, seed=10 + i)
        options = dict(radius=radius, down_factor=down_factor, backend="reference")
        handle = linearize(model, tile=None, **options)
        expected = run(model, inputs)
        handle.restore()
        handle = parallelize(model, timeout_s=30, **options)
        errors.append(((run(model, inputs) - expected).abs().max() / expected.abs().max()).item())
    with pytest.raises(NotSupportedError, match="ControlNet"):
        model(**inputs, controlnet_block_samples={0: torch.zeros(1)})
    handle.restore()
    with pytest.raises(NotSupportedError, match="strip_input=False"):
        parallelize(model, radius=2, strip_input=True)
    return errors


def test_patch_parallel_zimage_equals_one_process():
    """Every rank keeps its rows at the first noise-refiner block (the image pads whole), exchanges the
    band's keys and values in every noise-refiner and main layer, merges its batch-padding queries over
    the ranks, and gathers the output before the transformer unpatchifies (3 ranks: a middle strip
    with two neighbours; strips thinner than the band)."""
    from cleardit.parallel import spawn

    for rank_errors in spawn(
        _zimage_strips_worker, 3, timeout_s=60, deadline_s=120, start_method="forkserver"
    ):
        assert max(rank_errors) <= 1e-5, rank_errors


@pytest.mark.slow  # the job path of --devices with full latents runs by default in tests/test_sd3.py
def test_generate_on_two_devices_equals_one(zimage_folder):
    """Every rank runs the pipeline on the full latents (with CFG: the prompt and the negative prompt
    batched); the transformer gathers its rows at every step."""
    from cleardit.parallel import generate_parallel

    common = dict(
        model=zimage_folder, height=64, width=80, steps=2, radius=2, true_cfg=2.0, quiet=True, seed=3
    )
    one = generate("a red circle", **common)
    two = generate_parallel("a red circle", devices=2, **common)
    diff = np.abs(np.asarray(one.images[0], dtype=int) - np.asarray(two.images[0], dtype=int)).max()
    assert diff <= 1 and two.devices == 2 and two.comm_bytes["halo"] > 0
