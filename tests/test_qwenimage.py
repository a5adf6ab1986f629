"""Qwen-Image: CLEAR on a tiny QwenImageTransformer2DModel equals a hand-written dense-mask oracle,
with a padded text mask and an Edit-style condition image (global tokens); every job runs on a tiny
QwenImagePipeline built offline."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)

from cleardit import generate, linearize, load_weights, save_weights
from cleardit.distill.teacher_data import TeacherDataset, make_teacher_data
from cleardit.distill.trainer import DistillConfig, Distiller, RunOptions
from cleardit.eval import evaluate_model
from cleardit.mini.pipeline import mini_model_info
from cleardit.mini.vocab import WORDS
from cleardit.models import NotSupportedError, adapter_for, get_handle
from cleardit.models.tiny import tiny_flux_transformer

TEXT_DIM = 32
TEXT_LEN = 7


def tiny_qwenimage_transformer(seed: int = 0, **overrides) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    config = dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    model = QwenImageTransformer2DModel(**{**config, **overrides})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # diffusers zero-initialises some layers: random values make every path count
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval().requires_grad_(False)


def qwen_inputs(height, width, kept, condition=None, seed=3, dtype=torch.float32):
    """Forward kwargs: batch len(kept), sample b keeps its first kept[b] of TEXT_LEN text tokens;
    ``condition`` (h, w): an Edit-style condition image after the target."""
    g = torch.Generator().manual_seed(seed)
    batch = len(kept)
    shapes = [(1, height, width)] + ([(1, *condition)] if condition else [])
    tokens = sum(f * h * w for f, h, w in shapes)
    mask = (torch.arange(TEXT_LEN)[None, :] < torch.tensor(kept)[:, None]).long()
    return dict(
        hidden_states=torch.randn(batch, tokens, 16, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g).to(dtype),
        encoder_hidden_states_mask=mask,
        timestep=torch.full((batch,), 0.6, dtype=dtype),
        img_shapes=[shapes] * batch,
        return_dict=False,
    )


def oracle_pool(k, height, width, df, weight):
    """Pooled keys of the target k [B, heads, H*W, d]: a weighted sum per df x df block, the grid
    zero-padded at the bottom/right."""
    b, h, _, d = k.shape
    grid = k.reshape(b, h, height, width, d)
    hp, wp = -(-height // df), -(-width // df)
    grid = F.pad(grid, (0, 0, 0, wp * df - width, 0, hp * df - height))
    blocks = grid.reshape(b, h, hp, df, wp, df, d)
    return (blocks * weight[None, None, None, :, None, :, None]).sum(dim=(3, 5)).reshape(b, h, hp * wp, d)


class DenseOracle:
    """Qwen-Image's joint attention (diffusers' math) written out with one explicit boolean mask of
    the rule: target queries see target keys with dy^2 + dx^2 < r^2, text and condition tokens are
    global both ways, padded text keys are dropped for every query (diffusers' mask); with
    ``pool_weight`` the target queries also see the pooled target keys."""

    def __init__(self, height, width, radius, pool_weight=None):
        self.height, self.width, self.radius, self.pool_weight = height, width, radius, pool_weight

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
        attention_mask=None, image_rotary_emb=None,
    ):  # fmt: skip
        d = attn.inner_dim // attn.heads

        def heads(x):
            return x.unflatten(-1, (-1, d))

        iq, ik, iv = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        tq = heads(attn.add_q_proj(encoder_hidden_states))
        tk = heads(attn.add_k_proj(encoder_hidden_states))
        tv = heads(attn.add_v_proj(encoder_hidden_states))
        iq, ik, tq, tk = attn.norm_q(iq), attn.norm_k(ik), attn.norm_added_q(tq), attn.norm_added_k(tk)
        img_freqs, txt_freqs = image_rotary_emb
        iq, ik = (
            apply_rotary_emb_qwen(iq, img_freqs, use_real=False),
            apply_rotary_emb_qwen(ik, img_freqs, use_real=False),
        )
        tq, tk = (
            apply_rotary_emb_qwen(tq, txt_freqs, use_real=False),
            apply_rotary_emb_qwen(tk, txt_freqs, use_real=False),
        )
        q, k, v = (torch.cat(pair, dim=1).transpose(1, 2) for pair in ((tq, iq), (tk, ik), (tv, iv)))

        batch, text_len, image_len = q.shape[0], tq.shape[1], iq.shape[1]
        n, target = text_len + image_len, self.height * self.width
        # every (query, key) pair, by brute force over the grid positions (-1: not a target token)
        index = torch.arange(n) - text_len
        on_target = (index >= 0) & (index < target)
        y = torch.where(on_target, index // self.width, -1)
        x = torch.where(on_target, index % self.width, -1)
        near = (y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2 < self.radius**2
        allowed = ~on_target[:, None] | ~on_target[None, :] | near
        keys_kept = torch.ones(batch, n, dtype=torch.bool)
        if encoder_hidden_states_mask is not None:
            keys_kept[:, :text_len] = encoder_hidden_states_mask.bool()
        mask = allowed[None] & keys_kept[:, None, :]
        if self.pool_weight is not None:
            target_k = slice(text_len, text_len + target)
            df = self.pool_weight.shape[0]
            pk = oracle_pool(k[:, :, target_k], self.height, self.width, df, self.pool_weight)
            pv = oracle_pool(v[:, :, target_k], self.height, self.width, df, self.pool_weight)
            k, v = torch.cat([k, pk], dim=2), torch.cat([v, pv], dim=2)
            is_target = torch.zeros(n, dtype=torch.bool)
            is_target[target_k] = True
            mask = torch.cat([mask, is_target[None, :, None].expand(batch, n, pk.shape[2])], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None]).transpose(1, 2).flatten(2, 3)
        image_out = attn.to_out[0](out[:, text_len:])
        return image_out, attn.to_add_out(out[:, :text_len])


def oracle_model(model, height, width, radius, pool_weight=None):
    """A deep copy of the (unlinearized) model with the oracle in every layer."""
    oracle = copy.deepcopy(model)
    if get_handle(oracle) is not None:
        get_handle(oracle).restore()
    oracle.set_attn_processor(DenseOracle(height, width, radius, pool_weight))
    return oracle


def oracle_output(model, inputs, height, width, radius, pool_weight=None):
    return run(oracle_model(model, height, width, radius, pool_weight), inputs)


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def run_recording_text(model, inputs):
    """(output, each block's attention output for the text stream, padded text queries included)."""
    text = []
    hooks = [
        b.attn.register_forward_hook(lambda _m, _a, out: text.append(out[1]))
        for b in model.transformer_blocks
    ]
    try:
        return run(model, inputs), text
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize(
    "height,width,condition,radius,kept,backend,tile",
    [
        (7, 9, (2, 3), 3, [3, 7], "reference", (4, 4)),  # tile-major target, two padding lengths
        (7, 9, (2, 3), 3, [3, 7], "tiled", (4, 4)),
        (5, 6, (2, 3), 3, [3, 3], "flex", (4, 4)),  # the slow ones on a CPU: smaller, one mask group
        (5, 6, (2, 3), 3, [3, 3], "triton", (4, 4)),
        (7, 5, None, 1, [2, 5], "tiled", None),  # odd sizes, radius 1, no condition image
        (6, 9, (2, 3), 2, [7, 7], "reference", None),  # mask given, nothing padded
        (9, 17, (4, 4), 4, [0, 6], "tiled", (8, 16)),  # the default tile; a sample with no text at all
    ],
)
def test_linearized_qwenimage_matches_dense_mask_oracle(
    height, width, condition, radius, kept, backend, tile
):
    model = tiny_qwenimage_transformer()
    inputs = qwen_inputs(height, width, kept, condition)
    expected, expected_text = run_recording_text(oracle_model(model, height, width, radius), inputs)
    handle = linearize(model, radius=radius, backend=backend, tile=tile)
    got, got_text = run_recording_text(model, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(got_text, expected_text, strict=True):  # padded text queries attend as in diffusers
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    # the rule really cuts: full attention gives other numbers
    handle.restore()
    assert (run(model, inputs) - expected).abs().max() > 1e-3


def test_pooled_branch_matches_the_oracle():
    height, width, radius, df = 9, 7, 2, 2
    model = tiny_qwenimage_transformer()
    inputs = qwen_inputs(height, width, [3, 6], (2, 2))
    weight = 0.25 + 0.2 * torch.randn(df, df, generator=torch.Generator().manual_seed(9))
    linearize(model, radius=radius, down_factor=df, backend="tiled")
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.attn.processor.spatial_weight.copy_(weight.reshape(1, 1, 1, df, 1, df, 1))
    expected = oracle_output(model, inputs, height, width, radius, pool_weight=weight)
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=1e-5)


def test_radius_beyond_the_grid_equals_the_original_model_and_restore_is_exact():
    model = tiny_qwenimage_transformer()
    inputs = qwen_inputs(9, 17, [4, 2], (1, 4))
    original = run(model, inputs)
    expected = oracle_output(model, inputs, 9, 17, 30)
    handle = linearize(model, radius=30)
    got = run(model, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, original, atol=1e-5, rtol=1e-5)
    handle.restore()
    assert torch.equal(run(model, inputs), original)
    assert all(
        isinstance(b.attn.processor, QwenDoubleStreamAttnProcessor2_0) for b in model.transformer_blocks
    )
    assert not hasattr(model, "_cleardit_grid") and not model._forward_pre_hooks


def test_padded_text_is_dropped_and_kept_text_counts():
    model = tiny_qwenimage_transformer()
    inputs = qwen_inputs(6, 7, [3, 7], (2, 2))
    linearize(model, radius=2, backend="tiled")
    got = run(model, inputs)
    padded = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    padded["encoder_hidden_states"][0, 3:] += 3.0
    torch.testing.assert_close(run(model, padded), got, atol=1e-6, rtol=0)
    kept = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    kept["encoder_hidden_states"][0, 0] += 3.0
    assert (run(model, kept)[0] - got[0]).abs().max() > 1e-3


def test_bf16_error_is_the_models_own():
    height, width, radius = 7, 9, 3
    inputs = qwen_inputs(height, width, [3, 7], (3, 4))
    low = qwen_inputs(height, width, [3, 7], (3, 4), dtype=torch.bfloat16)
    model = tiny_qwenimage_transformer()
    own_error = (run(model.to(torch.bfloat16), low).float() - run(model.float(), inputs)).abs().max()
    expected = oracle_output(model, inputs, height, width, radius)
    linearize(model, radius=radius, backend="tiled", tile=(4, 4))
    clear_error = (run(model.to(torch.bfloat16), low).float() - expected).abs().max()
    assert 0 < clear_error < 2 * own_error


def test_tile_major_gradients_equal_raster_and_reach_the_clear_parameters():
    inputs = qwen_inputs(5, 6, [2, 5], (2, 3))
    grads = []
    for tile in (None, (4, 4)):
        model = tiny_qwenimage_transformer()
        handle = linearize(model, radius=3, down_factor=2, tile=tile, backend="tiled")
        params = dict(handle.named_clear_parameters())
        for p in params.values():
            p.requires_grad_(True)
        model(**inputs)[0].square().mean().backward()
        grads.append({n: p.grad for n, p in params.items()})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4)


def test_distillation_teacher_runs_the_original_model():
    """With the original processors swapped in (the teacher pass), the forward is the original model's:
    no tile-major order (diffusers' RoPE is in raster order) and the text mask reaches the blocks."""
    from cleardit.distill.teacher import TeacherView

    model = tiny_qwenimage_transformer()
    inputs = qwen_inputs(9, 17, [3, 7], (2, 2))
    original = run(model, inputs)
    teacher = TeacherView(model)
    handle = linearize(model, radius=2)
    teacher.freeze_initial(handle)
    torch.testing.assert_close(teacher.run(**inputs)[0], original, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(img_shapes=None), "needs img_shapes"),
        (dict(img_shapes=[[(1, 5, 6)]] * 2), "describe 30 image tokens but hidden_states has 34"),
        (dict(img_shapes=[[(1, 5, 6), (1, 2, 2)], [(1, 6, 5), (1, 2, 2)]]), "different target grids"),
        (dict(img_shapes=[[(2, 5, 3), (1, 2, 2)]] * 2), "has 2 frames"),
        (dict(img_shapes=[[(1, 5)]] * 2), "is not \\(frames, height, width\\)"),
        (dict(encoder_hidden_states_mask=torch.ones(2, 3)), "does not fit 2 x 7 text tokens"),
    ],
)
def test_inputs_that_are_not_one_grid_are_refused(change, message):
    model = tiny_qwenimage_transformer()
    linearize(model, radius=2)
    with pytest.raises(ValueError, match=message):
        run(model, {**qwen_inputs(5, 6, [3, 7], (2, 2)), **change})


def test_single_tuple_img_shapes_read_as_diffusers_reads_them():
    model = tiny_qwenimage_transformer()
    inputs = dict(qwen_inputs(5, 6, [3, 7]), img_shapes=[(1, 5, 6)] * 2)
    original = run(model, inputs)
    linearize(model, radius=20)
    torch.testing.assert_close(run(model, inputs), original, atol=1e-5, rtol=1e-5)


def test_layered_models_are_refused():
    with pytest.raises(NotSupportedError, match="Qwen-Image-Layered"):
        linearize(tiny_qwenimage_transformer(use_layer3d_rope=True), radius=2)


def test_trainable_parameters_are_the_image_stream_projections():
    model = tiny_qwenimage_transformer()
    handle = linearize(model, radius=2, down_factor=2)
    names = [n for n, _ in handle.named_clear_parameters()]
    # 2 blocks x (to_q, to_k, to_v, to_out.0) x (weight, bias) + one pooling weight per block
    assert len(names) == 2 * 4 * 2 + 2
    assert "transformer_blocks.1.attn.to_out.0.bias" in names
    assert "transformer_blocks.0.attn.processor.spatial_weight" in names
    assert not any("add_" in n or "norm" in n or "to_add_out" in n for n in names)
    adapter = adapter_for(model)
    assert adapter.family == "qwenimage" and adapter.attention_geometry(model) == (2, 16, 2)
    assert [n for n, _ in adapter.consistency_modules(model)] == [
        "transformer_blocks.0.attn",
        "transformer_blocks.1.attn",
    ]


def test_weights_round_trip_and_other_families_are_refused(tmp_path):
    model = tiny_qwenimage_transformer()
    handle = linearize(model, radius=2, down_factor=2)
    path = save_weights(model, tmp_path / "qwen.safetensors")
    other = tiny_qwenimage_transformer(seed=5)
    linearize(other, radius=2, down_factor=2)
    load_weights(other, path)
    ours, theirs = dict(handle.named_clear_parameters()), dict(get_handle(other).named_clear_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)

    flux = tiny_flux_transformer()
    linearize(flux, radius=2, down_factor=2)
    with pytest.raises(ValueError, match="holds weights for a QwenImageTransformer2DModel"):
        load_weights(flux, path)
    from safetensors.torch import save_file

    release = tmp_path / "clear_local_2_down_2.safetensors"  # a reference-release name: FLUX.1 weights
    save_file({k: v.contiguous() for k, v in handle.clear_state_dict().items()}, str(release))
    with pytest.raises(ValueError, match="for flux models, not for this qwenimage model"):
        load_weights(model, release)


# ----------------------------------------------------------------------------- a tiny pipeline, offline
# QwenImagePipeline.prompt_template_encode (checked below): its first 34 tokens are dropped
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PROMPTS = ["a red circle", "a small blue square at the top left on a plain white background"]


def tiny_qwen_tokenizer():
    """A word-level tokenizer of the mini model's words and the template's, which splits the template's
    prefix into the 34 tokens the pipeline drops, as Qwen2's tokenizer does (newlines are tokens)."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "\n")
    words = set(re.findall(r"\w+|[^\w\s]+", re.sub(r"<\|\w+\|>", " ", TEMPLATE).lower())) | set(WORDS)
    vocab = {t: i for i, t in enumerate(special + ("<unk>",) + tuple(sorted(words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=1024, padding_side="right",
        pad_token="<|endoftext|>", unk_token="<unk>", eos_token="<|im_end|>",
    )  # fmt: skip


def tiny_qwenimage_pipeline(seed: int = 0) -> QwenImagePipeline:
    """Tokenizer, Qwen2.5-VL text encoder, VAE (x4: 8 px per token) and transformer, all tiny."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_qwen_tokenizer()
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **ids,
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_DIM)
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    ).eval()
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, False],
        latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 1.2],
    ).eval()  # fmt: skip
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, transformer=tiny_qwenimage_transformer(seed),
    )  # fmt: skip


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwenimage") / "tiny-qwenimage"
    tiny_qwenimage_pipeline().save_pretrained(str(folder), safe_serialization=True)
    mini_model_info("tiny", name="tiny-qwenimage", default_guidance=None).write(folder)  # 64 px, 40 tokens
    return folder


def test_the_tiny_tokenizer_drops_the_template_as_qwen2s_does():
    pipe = tiny_qwenimage_pipeline()
    assert pipe.prompt_template_encode == TEMPLATE
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(TEMPLATE.format("a red circle")).input_ids)
    drop = pipe.prompt_template_encode_start_idx
    assert tokens[drop - 3 : drop] == ["<|im_start|>", "user", "\n"]
    assert tokens[drop : drop + 3] == ["a", "red", "circle"] and "<unk>" not in tokens


def test_generate_with_a_tiny_qwenimage_pipeline(qwen_folder, tmp_path):
    result = generate(
        PROMPTS, model=qwen_folder, height=64, width=96, steps=2, radius=2, true_cfg=2.0, compare=True,
        output=tmp_path, quiet=True,
    )  # fmt: skip
    assert len(result.images) == 2 and result.images[0].size == (96, 64)
    assert result.compare is not None and result.compare.flops_clear < result.compare.flops_full
    assert result.compare.psnr[0] < 60  # radius 2 on 8x12 tokens is not full attention
    for upscale in ("image", "latent"):  # the img2img pipeline takes images and latents
        highres = generate(
            PROMPTS[0], model=qwen_folder, height=96, width=96, steps=2, radius=2, highres=True,
            upscale=upscale, quiet=True,
        )  # fmt: skip
        assert highres.images[0].size == (96, 96) and highres.base_images[0].size == (64, 64)


def test_clear_beyond_the_grid_equals_full_attention_through_the_pipeline(qwen_folder):
    """Two prompts of different lengths: the pipeline pads the shorter one and passes the text mask."""
    common = dict(model=qwen_folder, height=64, width=80, steps=2, true_cfg=2.0, quiet=True)
    full = generate(PROMPTS, radius=0, **common).images
    clear = generate(PROMPTS, radius=20, **common).images
    for a, b in zip(full, clear, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_distill_with_resume_and_eval_on_a_tiny_qwenimage_pipeline(qwen_folder, tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_teacher_data(qwen_folder, PROMPTS, data, resolution=64, steps=2, quiet=True)
    dataset = TeacherDataset(data)
    sample = dataset[0]
    assert set(sample) >= {"latents", "prompt_embeds", "prompt_embeds_mask"}
    assert sample["prompt_embeds"].shape == (40, TEXT_DIM) and sample["latents"].shape == (4, 16, 16)
    assert 0 < int(sample["prompt_embeds_mask"].sum()) < 40  # padded to the text length, masked

    cfg = DistillConfig(radius=2, steps=2, batch_size=2, lr=1e-3, attention_layers="0,1")
    opts = RunOptions(checkpoint_every=1, quiet=True)

    def distiller(name, **kw):
        pipe = QwenImagePipeline.from_pretrained(str(qwen_folder))
        return Distiller(cfg, dataset, tmp_path / name, model=pipe, opts=opts, **kw)

    reference = distiller("ref").run()
    original_step = Distiller._step

    def crash_in_step_2(self, model, opt, step):  # steps count from 0
        if step == 1:
            raise RuntimeError("simulated crash")
        return original_step(self, model, opt, step)

    monkeypatch.setattr(Distiller, "_step", crash_in_step_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        distiller("run").run()
    monkeypatch.setattr(Distiller, "_step", original_step)
    resumed = distiller("run", resume=True).run()
    assert [e["step"] for e in resumed.losses] == [1, 2]
    from safetensors.torch import load_file

    want, got = load_file(str(reference.weights)), load_file(str(resumed.weights))
    assert want.keys() == got.keys() and all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)

    report = evaluate_model(
        PROMPTS, model=qwen_folder, radii=[2], clear_weights=[resumed.weights], output=tmp_path / "eval",
        steps=2, metrics=["psnr"], quiet=True,
    )  # fmt: skip
    assert report.teacher.generated == 2 and report.clear[0].generated == 2
    assert report.results


def test_qwenimage_pipeline_hooks(qwen_folder):
    pipe = QwenImagePipeline.from_pretrained(str(qwen_folder))
    adapter = adapter_for(pipe)
    assert "--highres (QwenImageImg2ImgPipeline)" in adapter.describe()
    text = adapter.encode_prompt(
        pipe, PROMPTS, images_per_prompt=2, text_len=12, true_cfg=2.0, negative_prompt=""
    )
    assert set(text) == {"prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds",
                         "negative_prompt_embeds_mask"}  # fmt: skip
    assert text["prompt_embeds"].shape == (4, 12, TEXT_DIM)  # truncated at text_len
    g = torch.Generator().manual_seed(0)
    noise = adapter.initial_noise(pipe, 2, 64, 80, torch.float32, "cpu", g)
    assert noise.shape == (2, 8 * 10, 16)
    latents = adapter.unpack_latents(pipe, noise, (64, 80))
    assert latents.shape == (2, 4, 16, 20) and torch.equal(adapter.pack_latents(latents), noise)
    assert adapter.size_factor(pipe) == 8 and adapter.max_text_tokens(pipe) == 1024
    # latents decode to the pipeline's own images
    call = dict(height=64, width=80, num_inference_steps=1, true_cfg_scale=1.0)
    packed = pipe(PROMPTS[0], output_type="latent", generator=torch.Generator().manual_seed(1), **call).images
    images = pipe(PROMPTS[0], output_type="np", generator=torch.Generator().manual_seed(1), **call).images
    np.testing.assert_allclose(adapter.decode_latents(pipe, packed, (64, 80), "np"), images, atol=1e-5)
    with pytest.raises(ValueError, match="--true-cfg"):
        generate("a red circle", model=qwen_folder, height=64, width=64, steps=1, guidance=3.0, quiet=True)


# ----------------------------------------------------------------------------- patch parallelism
def _qwen_strips_worker(rank: int, world: int) -> list[float]:
    """Each case: the parallel model's full output and text-stream attention outputs (padded text
    queries included, which no image token sees) vs the single-process linearized model's."""
    from cleardit.parallel import parallelize

    errors = []
    cases = [
        (7, 5, (2, 3), [3, 7], 4, None, {}),  # condition image, padded text; strips thinner than the band
        (9, 6, None, [0, 6], 2, 2, {}),  # pooled branch; a sample with no text at all
        (5, 4, (2, 2), [2, 5], 30, None, dict(zero_cond_t=True)),  # beyond the grid; Edit-2511 modulation
    ]
    for i, (height, width, condition, kept, radius, down_factor, overrides) in enumerate(cases):
        model = tiny_qwenimage_transformer(seed=i, **overrides)
        inputs = qwen_inputs(height, width, kept, condition, seed=10 + i)
        handle = linearize(model, radius=radius, down_factor=down_factor, backend="reference", tile=None)
        expected, expected_text = run_recording_text(model, inputs)
        handle.restore()
        parallelize(model, radius=radius, down_factor=down_factor, backend="reference", timeout_s=30)
        got, got_text = run_recording_text(model, inputs)
        pairs = [(got, expected), *zip(got_text, expected_text, strict=True)]
        errors.append(max((g - e).abs().max().item() for g, e in pairs))
    with pytest.raises(ValueError, match="does not support ControlNet"):
        run(model, {**inputs, "controlnet_block_samples": [torch.zeros_like(expected)]})
    get_handle(model).restore()
    with pytest.raises(NotSupportedError, match="takes the full latents on every rank"):
        parallelize(model, radius=2, strip_input=True)
    return errors


def test_patch_parallel_qwenimage_equals_one_process():
    """Every rank keeps its target rows and the condition tokens, exchanges the band's keys and values
    in every attention (each text-mask group too), merges the padded text queries across ranks and
    gathers the output (3 ranks: a middle strip with two neighbours)."""
    from cleardit.parallel import spawn

    for rank_errors in spawn(_qwen_strips_worker, 3, timeout_s=60, deadline_s=120, start_method="forkserver"):
        assert max(rank_errors) <= 1e-5, rank_errors


@pytest.mark.slow  # the job path of --devices with full latents runs by default in tests/test_sd3.py
def test_generate_on_two_devices_equals_one(qwen_folder):
    """Every rank runs the pipeline on the full latents and the transformer gathers its output strips
    at every step; two prompts of different lengths: the pipeline passes a text mask."""
    from cleardit.parallel import generate_parallel

    common = dict(model=qwen_folder, height=64, width=80, steps=2, radius=2, true_cfg=2.0, quiet=True, seed=3)
    one = generate(PROMPTS, **common)
    two = generate_parallel(PROMPTS, devices=2, **common)
    for a, b in zip(one.images, two.images, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    assert two.devices == 2 and two.comm_bytes["halo"] > 0
