"""SD3 / SD3.5: CLEAR on a tiny SD3Transformer2DModel built offline (dual attention, RMS q/k norms)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from cleardit import generate, linearize, load_weights, save_weights
from cleardit.distill.teacher_data import TeacherDataset, make_teacher_data
from cleardit.distill.trainer import DistillConfig, Distiller, RunOptions
from cleardit.eval import evaluate_model
from cleardit.mini.pipeline import build_mini_pipeline, mini_model_info
from cleardit.mini.vocab import clip_text_config
from cleardit.models import NotSupportedError, adapter_for, get_handle
from cleardit.models.sd3 import ClearSD3AttnProcessor
from cleardit.models.tiny import tiny_flux_transformer

TEXT_DIM, POOLED_DIM, CHANNELS, PATCH = 12, 8, 4, 2


def tiny_sd3_transformer(seed: int = 0, **overrides) -> SD3Transformer2DModel:
    """SD3.5-shaped: block 0 has the image-only attn2, RMS q/k norms, the last block is context_pre_only."""
    torch.manual_seed(seed)
    config = dict(
        sample_size=16, patch_size=PATCH, in_channels=CHANNELS, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
        pooled_projection_dim=POOLED_DIM, out_channels=CHANNELS, pos_embed_max_size=32,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    )  # fmt: skip
    model = SD3Transformer2DModel(**{**config, **overrides})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # diffusers zero-initialises some layers: random everywhere instead
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval().requires_grad_(False)


def sd3_inputs(height: int, width: int, text_len: int = 4, batch: int = 2, seed: int = 3) -> dict:
    """Inputs of an ``height`` x ``width`` token grid (latents of twice that: patch size 2)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, CHANNELS, height * PATCH, width * PATCH, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, TEXT_DIM, generator=g),
        pooled_projections=torch.randn(batch, POOLED_DIM, generator=g),
        timestep=torch.full((batch,), 500.0),
        return_dict=False,
    )


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


class DenseMaskSD3Processor:
    """Written independently of cleardit: diffusers' JointAttnProcessor2_0 math with a brute-force
    boolean mask of the rule. Joint attention runs on [image | text]: text queries and text keys see
    everything, image pairs only within the disc; image-only attention (attn2) is the disc alone."""

    def __init__(self, height: int, width: int, radius: int):
        self.height, self.width, self.radius = height, width, radius
        self.masks: dict[int, torch.Tensor] = {}

    def mask(self, text_len: int) -> torch.Tensor:
        if text_len not in self.masks:
            self.masks[text_len] = self.brute_force_mask(text_len)
        return self.masks[text_len]

    def brute_force_mask(self, text_len: int) -> torch.Tensor:
        cells = [divmod(i, self.width) for i in range(self.height * self.width)]
        disc = [[(yi - yj) ** 2 + (xi - xj) ** 2 < self.radius**2 for yj, xj in cells] for yi, xi in cells]
        image = len(cells)
        mask = torch.ones(image + text_len, image + text_len, dtype=torch.bool)  # text rows and columns
        mask[:image, :image] = torch.tensor(disc)
        return mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        def heads(x):
            return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        q, k = attn.norm_q(q), attn.norm_k(k)
        text_len = 0
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            q, k, v = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(text_len))
        out = out.transpose(1, 2).flatten(2, 3)
        image = attn.to_out[0](out[:, : hidden_states.shape[1]])
        if encoder_hidden_states is None:
            return image
        text = out[:, hidden_states.shape[1] :]
        return image, (text if attn.context_pre_only else attn.to_add_out(text))


def oracle_output(model, inputs, height: int, width: int, radius: int) -> torch.Tensor:
    oracle = copy.deepcopy(model)
    oracle.set_attn_processor(DenseMaskSD3Processor(height, width, radius))
    return run(oracle, inputs)


@pytest.mark.parametrize(
    "height,width,radius,batch,tile,backend",
    [
        (7, 11, 3, 2, None, "reference"),  # odd, non-square, raster order
        (9, 17, 3, 2, (8, 16), "tiled"),  # larger than the default tile: tile-major order
        (6, 9, 1, 1, (2, 4), "reference"),  # radius 1: each image token sees only itself
        (9, 4, 2, 2, (4, 3), "tiled"),  # tall grid, edge tiles smaller
    ],
)
def test_linearized_sd3_matches_dense_mask_oracle(height, width, radius, batch, tile, backend):
    model = tiny_sd3_transformer()
    inputs = sd3_inputs(height, width, batch=batch)
    expected = oracle_output(model, inputs, height, width, radius)
    linearize(model, radius=radius, tile=tile, backend=backend)
    got = run(model, inputs)
    assert got.shape == inputs["hidden_states"].shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - run(tiny_sd3_transformer(), inputs)).abs().max() > 1e-2  # CLEAR really changed it


@pytest.mark.parametrize("backend", ["reference", "tiled", "flex", "triton"])
def test_every_backend_agrees_with_the_oracle(backend):
    model = tiny_sd3_transformer()
    inputs = sd3_inputs(4, 5, text_len=3, batch=1, seed=4)
    expected = oracle_output(model, inputs, 4, 5, 2)
    linearize(model, radius=2, tile=(2, 3), backend=backend)
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=1e-5)


def test_radius_beyond_the_grid_equals_the_original_and_restore_is_exact():
    model = tiny_sd3_transformer()
    inputs = sd3_inputs(6, 13, text_len=5)
    original = run(model, inputs)
    processors = [a.processor for a in adapter_for(model).attention_modules(model)]
    assert len(processors) == 3  # attn, attn2 (dual-attention block 0), attn
    torch.testing.assert_close(oracle_output(model, inputs, 6, 13, 15), original, atol=1e-5, rtol=1e-5)
    handle = linearize(model, radius=15, backend="tiled")  # 15 > diagonal of 6 x 13
    assert all(
        isinstance(a.processor, ClearSD3AttnProcessor) for a in adapter_for(model).attention_modules(model)
    )
    torch.testing.assert_close(run(model, inputs), original, atol=1e-5, rtol=1e-5)
    handle.restore()
    assert torch.equal(run(model, inputs), original)
    assert [a.processor for a in adapter_for(model).attention_modules(model)] == processors
    for module in (model, model.pos_embed, model.proj_out):
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not hasattr(module, "_cleardit_grid")
    assert get_handle(model) is None


def test_bf16_error_is_of_the_order_of_the_models_own():
    model = tiny_sd3_transformer()
    inputs = sd3_inputs(8, 10)
    half = {
        k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in inputs.items()
    }
    own_error = (run(copy.deepcopy(model).to(torch.bfloat16), half).float() - run(model, inputs)).abs().max()
    expected = oracle_output(model, inputs, 8, 10, 3)
    model = model.to(torch.bfloat16)
    linearize(model, radius=3, backend="tiled")
    got = run(model, half)
    assert got.dtype == torch.bfloat16
    error = (got.float() - expected).abs().max()
    assert 0 < own_error and error <= 2 * own_error, (error, own_error)


def test_inputs_that_are_not_one_grid_are_refused():
    model = tiny_sd3_transformer()
    linearize(model, radius=3)
    inputs = sd3_inputs(4, 5)
    odd = dict(inputs, hidden_states=inputs["hidden_states"][..., :-1])  # 8 x 9 latents, patch 2
    with pytest.raises(
        ValueError, match=r"latents of 8x9 are not a whole number of 2x2 patches.*multiples of 2"
    ):
        run(model, odd)
    flat = dict(inputs, hidden_states=inputs["hidden_states"].flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match=r"latents \[batch, channels, height, width\], got \(2, 80, 4\)"):
        run(model, flat)


def test_processors_it_cannot_replace_are_refused():
    model = tiny_sd3_transformer()
    model.fuse_qkv_projections()
    with pytest.raises(NotSupportedError, match="FusedJointAttnProcessor2_0.*unfuse_qkv_projections"):
        linearize(model, radius=3)
    # a processor rebuilt as type(p)() and called on its own (outside a linearized forward)
    attn = tiny_sd3_transformer().transformer_blocks[0].attn
    with pytest.raises(RuntimeError, match="ran outside a linearized SD3 transformer's forward"):
        ClearSD3AttnProcessor()(attn, torch.randn(1, 6, 16), torch.randn(1, 4, 16))


def test_trainable_parameters_and_weights_round_trip(tmp_path):
    model = tiny_sd3_transformer()
    handle = linearize(model, radius=2, down_factor=2)
    names = [n for n, _ in handle.named_clear_parameters()]
    # 3 attention layers x (q, k, v, out) x (weight, bias) + one pooling weight each
    assert len(names) == 3 * 4 * 2 + 3
    assert "transformer_blocks.0.attn2.to_q.weight" in names
    assert "transformer_blocks.1.attn.processor.spatial_weight" in names
    assert not any("add_" in n or "norm" in n or "to_add_out" in n for n in names)
    with torch.no_grad():
        for _, p in handle.named_clear_parameters():
            p.add_(0.01)
    path = save_weights(model, tmp_path / "sd3.safetensors")
    other = tiny_sd3_transformer(seed=5)
    other_handle = linearize(other, radius=2, down_factor=2)
    load_weights(other, path)
    for (name, a), (_, b) in zip(
        handle.named_clear_parameters(), other_handle.named_clear_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    flux = tiny_flux_transformer()
    linearize(flux, radius=2, down_factor=2)
    with pytest.raises(
        ValueError, match="holds weights for a SD3Transformer2DModel, not a FluxTransformer2DModel"
    ):
        load_weights(flux, path)
    with pytest.raises(
        ValueError, match="holds weights for a FluxTransformer2DModel, not a SD3Transformer2DModel"
    ):
        load_weights(other, save_weights(flux, tmp_path / "flux.safetensors"))
    # a file without cleardit's metadata is a FLUX.1 reference-release file: refused by family
    release = tmp_path / "clear_local_2_down_2.safetensors"
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in get_handle(other).clear_state_dict().items()}, release
    )
    with pytest.raises(ValueError, match="CLEAR weights for flux models, not for this sd3 model"):
        load_weights(other, release)


def test_pooled_branch_trains_and_tile_order_does_not_change_results():
    model = tiny_sd3_transformer()
    inputs = sd3_inputs(9, 10, batch=1)
    outputs = []
    for tile in (None, (4, 4)):
        handle = linearize(model, radius=2, down_factor=4, tile=tile, backend="tiled")
        handle.model.requires_grad_(False)
        weight = model.transformer_blocks[0].attn2.processor.spatial_weight.requires_grad_(True)
        out = model(**inputs)[0]
        out.square().mean().backward()
        outputs.append((out.detach(), weight.grad.clone()))
        handle.restore()
    assert outputs[0][1].abs().sum() > 0
    torch.testing.assert_close(outputs[1][0], outputs[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], atol=1e-5, rtol=1e-4)


def test_controlnet_residuals_keep_raster_order():
    model = tiny_sd3_transformer()
    inputs = sd3_inputs(6, 7)
    g = torch.Generator().manual_seed(9)
    inputs["block_controlnet_hidden_states"] = [torch.randn(2, 42, 16, generator=g)]
    handle = linearize(model, radius=2, tile=None)
    raster = run(model, inputs)
    handle.restore()
    linearize(model, radius=2, tile=(2, 3))
    torch.testing.assert_close(run(model, inputs), raster, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_recomputes_each_forward_with_its_own_grid():
    """Two forwards on grids of equal token count (4x6, 6x4) before one backward: each recomputed
    block uses its own forward's grid, so the gradients equal those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_sd3_transformer()
        if checkpointing:
            model.enable_gradient_checkpointing()
        linearize(model, radius=2, tile=None, backend="tiled")
        weight = model.transformer_blocks[0].attn.to_q.weight.requires_grad_(True)
        loss = sum(model(**sd3_inputs(h, w, batch=1))[0].square().mean() for h, w in ((4, 6), (6, 4)))
        loss.backward()
        grads.append(weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- the pipeline side
def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """The tiny mini pipeline's VAE, T5 encoder and tokenizers, two tiny CLIP encoders with projection
    and a tiny SD3.5-shaped transformer: 64 px base size, 4x4 tokens."""
    flux = build_mini_pipeline("tiny", seed=seed)
    clip = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=8
    )
    torch.manual_seed(seed)
    clip_l, clip_g = (CLIPTextModelWithProjection(clip_text_config(**clip)) for _ in range(2))
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for p in [*clip_l.parameters(), *clip_g.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    t5 = flux.text_encoder_2
    transformer = tiny_sd3_transformer(
        seed,
        sample_size=8,
        joint_attention_dim=t5.config.d_model,
        pooled_projection_dim=2 * clip["projection_dim"],
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),  # SD3's
        vae=flux.vae,
        text_encoder=clip_l.eval(),
        tokenizer=flux.tokenizer,
        text_encoder_2=clip_g.eval(),
        tokenizer_2=flux.tokenizer,
        text_encoder_3=t5,
        tokenizer_3=flux.tokenizer_2,
    )


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3") / "tiny-sd3"
    tiny_sd3_pipeline().save_pretrained(str(folder), safe_serialization=True)
    mini_model_info("tiny", name="tiny-sd3", default_guidance=None).write(folder)
    return folder


def test_the_adapter_serves_the_pipeline_and_encodes_its_prompts(sd3_folder):
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_folder))
    adapter = adapter_for(pipe)
    assert adapter.family == "sd3" and adapter.size_factor(pipe) == 16 and adapter.default_size(pipe) == 64
    assert adapter.max_text_tokens(pipe) == 40  # the tiny T5 tokenizer's length
    text = adapter.encode_prompt(
        pipe, ["a red circle"], images_per_prompt=2, text_len=12, true_cfg=2.0, negative_prompt=""
    )
    assert set(text) == {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                         "negative_pooled_prompt_embeds"}  # fmt: skip
    assert text["prompt_embeds"].shape == (2, 40 + 12, 32)  # CLIP tokens, then T5 tokens
    assert text["pooled_prompt_embeds"].shape == (2, 16)
    noise = adapter.initial_noise(pipe, 2, 64, 80, torch.float32, "cpu", torch.Generator().manual_seed(0))
    assert noise.shape == (2, 4, 8, 10)
    assert adapter.call_options(3.5, 1.0, "", 12) == dict(guidance_scale=1.0, max_sequence_length=12)
    assert "sd3 (SD3Transformer2DModel, StableDiffusion3Pipeline)" in adapter.describe()


def test_generate_with_a_tiny_sd3_pipeline(sd3_folder, tmp_path):
    result = generate(
        ["a red circle", "a blue square"], model=sd3_folder, height=64, width=96, steps=2, radius=2,
        true_cfg=2.0, compare=True, output=tmp_path, quiet=True,
    )  # fmt: skip
    assert len(result.images) == 2 and result.images[0].size == (96, 64)
    assert result.compare is not None and result.compare.flops_clear < result.compare.flops_full
    clear, full = (np.asarray(im, dtype=int) for im in (result.images[0], result.full_images[0]))
    assert np.abs(clear - full).max() > 0  # radius 2 on a 4x6 grid: CLEAR changes the image
    assert Image.open(result.paths[0]).text["true_cfg"] == "2.0"
    highres = generate(
        "a red circle", model=sd3_folder, height=96, width=96, steps=2, radius=2, highres=True, quiet=True
    )
    assert highres.images[0].size == (96, 96) and highres.base_images[0].size == (64, 64)
    with pytest.raises(ValueError, match="--true-cfg"):
        generate("a red circle", model=sd3_folder, height=64, width=64, steps=1, guidance=3.0, quiet=True)


def test_clear_beyond_the_grid_equals_full_attention_through_the_pipeline(sd3_folder):
    common = dict(model=sd3_folder, height=64, width=80, steps=2, true_cfg=2.0, quiet=True)
    full = generate("a red circle", radius=0, **common).images[0]
    clear = generate("a red circle", radius=20, **common).images[0]
    diff = np.abs(np.asarray(full, dtype=int) - np.asarray(clear, dtype=int))
    assert diff.max() <= 1


def test_distill_with_resume_and_eval_on_a_tiny_sd3_pipeline(sd3_folder, tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_teacher_data(sd3_folder, ["a red circle", "a blue square"], data, resolution=64, steps=2, quiet=True)
    dataset = TeacherDataset(data)
    sample = dataset[0]
    assert sample["latents"].shape == (4, 8, 8) and sample["prompt_embeds"].shape == (80, 32)
    cfg = DistillConfig(radius=2, steps=2, batch_size=2, lr=1e-3, attention_layers="0,1")
    opts = RunOptions(checkpoint_every=1, quiet=True)
    reference = Distiller(cfg, dataset, tmp_path / "ref", model=str(sd3_folder), opts=opts).run()
    original_step = Distiller._step

    def crash_at_2(self, model, optimizer, step):
        if step == 1:  # the second step (0-based): one step is checkpointed
            raise RuntimeError("simulated crash")
        return original_step(self, model, optimizer, step)

    monkeypatch.setattr(Distiller, "_step", crash_at_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Distiller(cfg, dataset, tmp_path / "run", model=str(sd3_folder), opts=opts).run()
    monkeypatch.setattr(Distiller, "_step", original_step)
    resumed = Distiller(cfg, dataset, tmp_path / "run", model=str(sd3_folder), resume=True, opts=opts).run()
    assert [e["step"] for e in resumed.losses] == [1, 2] and resumed.weights.is_file()
    want, got = (load_file(str(r.weights)) for r in (reference, resumed))
    assert want.keys() == got.keys() and "transformer_blocks.0.attn2.to_q.weight" in want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)

    report = evaluate_model(
        ["a red circle", "a blue square"], model=sd3_folder, radii=[2], output=tmp_path / "eval",
        steps=2, metrics=["psnr"], quiet=True,
    )  # fmt: skip
    assert report.teacher.generated == 2 and report.clear[0].generated == 2
    assert report.results["r2"].to_dict()


# ----------------------------------------------------------------------------- patch parallelism
def _sd3_strips_worker(rank: int, world: int) -> list[float]:
    """Each case: the parallel model's full output vs the single-process linearized model's."""
    from cleardit.parallel import parallelize

    errors = []
    for i, (height, width, radius, down_factor) in enumerate(
        [(7, 5, 2, None), (9, 6, 3, 2), (5, 4, 30, None)]
    ):
        model = tiny_sd3_transformer(seed=i)
        inputs = sd3_inputs(height, width, batch=2, seed=10 + i)
        handle = linearize(model, radius=radius, down_factor=down_factor, backend="reference", tile=None)
        expected = run(model, inputs)
        handle.restore()
        parallelize(model, radius=radius, down_factor=down_factor, backend="reference", timeout_s=30)
        errors.append((run(model, inputs) - expected).abs().max().item())
    return errors


def test_patch_parallel_sd3_equals_one_process():
    """Every rank keeps its rows after pos_embed, exchanges the band's keys and values in every joint
    and image-only attention, and gathers the output before the transformer unpatchifies (3 ranks: a
    middle strip with two neighbours; strips thinner than the band)."""
    from cleardit.parallel import spawn

    for rank_errors in spawn(_sd3_strips_worker, 3, timeout_s=60, deadline_s=120, start_method="forkserver"):
        assert max(rank_errors) <= 1e-5, rank_errors


def test_generate_on_two_devices_equals_one(sd3_folder):
    """SD3's latents are not packed token rows: every rank runs the pipeline on the full latents and
    the transformer gathers its output strips at every step."""
    from cleardit.parallel import generate_parallel

    common = dict(model=sd3_folder, height=64, width=80, steps=2, radius=2, true_cfg=2.0, quiet=True, seed=3)
    one = generate("a red circle", **common)
    two = generate_parallel("a red circle", devices=2, **common)
    diff = np.abs(np.asarray(one.images[0], dtype=int) - np.asarray(two.images[0], dtype=int)).max()
    assert diff <= 1 and two.devices == 2 and two.comm_bytes["halo"] > 0
