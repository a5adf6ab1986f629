"""Chroma: CLEAR honours its text-padding mask, and every job runs on a tiny Chroma pipeline built offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.models.embeddings import apply_rotary_emb
from PIL import Image

from cleardit import generate, linearize, load_weights, save_weights
from cleardit.attention import TokenLayout
from cleardit.attention.reference import allowed_mask
from cleardit.distill.teacher_data import TeacherDataset, make_teacher_data
from cleardit.distill.trainer import DistillConfig, Distiller
from cleardit.eval import evaluate_model
from cleardit.mini.pipeline import build_mini_pipeline, mini_model_info
from cleardit.models import adapter_for
from cleardit.models.chroma import keep_mask
from cleardit.models.flux import project_qkv

TEXT_DIM = 32


def tiny_chroma_transformer(seed: int = 0, joint_attention_dim: int = TEXT_DIM) -> ChromaTransformer2DModel:
    torch.manual_seed(seed)
    model = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval().requires_grad_(False)


def tiny_chroma_pipeline(seed: int = 0) -> ChromaPipeline:
    """The tiny mini pipeline's VAE, T5 encoder and tokenizer around a tiny Chroma transformer."""
    flux = build_mini_pipeline("tiny", seed=seed)
    transformer = tiny_chroma_transformer(seed, flux.text_encoder_2.config.d_model)
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**flux.scheduler.config),
        vae=flux.vae,
        text_encoder=flux.text_encoder_2,
        tokenizer=flux.tokenizer_2,
        transformer=transformer,
    )


class DenseOracle:
    """FLUX-shaped attention with one dense boolean mask: the CLEAR rule AND Chroma's own mask (the
    [B, 1, S, S] outer product its blocks build). Padded text queries see nothing and output zeros
    (as diffusers' boolean mask gives)."""

    def __init__(self, radius: int, layout: TokenLayout):
        self.radius, self.layout = radius, layout

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        q, k, v = project_qkv(attn, hidden_states, encoder_hidden_states)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        pairs = attention_mask[:, 0] != 0  # [B, S, S]
        mask = allowed_mask(self.layout, self.radius)[None] & pairs
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        out = torch.where(pairs.any(-1)[:, None, :, None], out, torch.zeros_like(out))
        out = out.transpose(1, 2).flatten(2, 3)
        if encoder_hidden_states is None:
            return out
        t = self.layout.text_len
        return attn.to_out[1](attn.to_out[0](out[:, t:])), attn.to_add_out(out[:, :t])


def chroma_inputs(height: int, width: int, text_len: int, kept: list[int], float_mask: bool = False):
    g = torch.Generator().manual_seed(3)
    batch = len(kept)
    text_keep = torch.arange(text_len)[None, :] < torch.tensor(kept)[:, None]
    mask = torch.cat([text_keep, torch.ones(batch, height * width, dtype=torch.bool)], dim=1)
    ids = torch.zeros(height, width, 3)
    ids[..., 1] += torch.arange(height)[:, None]
    ids[..., 2] += torch.arange(width)[None, :]
    return dict(
        hidden_states=torch.randn(batch, height * width, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, TEXT_DIM, generator=g),
        timestep=torch.full((batch,), 0.6),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_len, 3),
        attention_mask=mask.float() if float_mask else mask,
        return_dict=False,
    )


@pytest.mark.parametrize(
    "height,width,radius,kept,float_mask,backend",
    [
        (10, 19, 3, [3, 7], False, "reference"),  # tile-major order (tile 8x16), two padding lengths
        (10, 19, 3, [3, 7], True, "tiled"),  # the pipelines' float 0/1 mask reads as keep/drop
        (5, 4, 2, [6, 6], False, "tiled"),  # same kept text in both samples: one batched call
        (6, 5, 30, [1, 8], False, "reference"),  # radius beyond the grid
    ],
)
def test_linearized_chroma_matches_dense_mask_oracle(height, width, radius, kept, float_mask, backend):
    model = tiny_chroma_transformer()
    inputs = chroma_inputs(height, width, 8, kept, float_mask)
    oracle_layout = TokenLayout(8, height, width)
    originals = {k: p for k, p in model.attn_processors.items()}
    model.set_attn_processor(DenseOracle(radius, oracle_layout))
    expected = model(**inputs)[0]
    model.set_attn_processor(originals)
    handle = linearize(model, radius=radius, backend=backend)
    got = model(**inputs)[0]
    handle.restore()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # padded text really is masked: changing it changes nothing
    changed = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    changed["encoder_hidden_states"][0, kept[0] :] += 3.0
    linearize(model, radius=radius, backend=backend)
    torch.testing.assert_close(model(**changed)[0][0], got[0], atol=1e-5, rtol=1e-5)


def test_radius_beyond_the_grid_equals_chroma_with_a_boolean_mask():
    model = tiny_chroma_transformer()
    inputs = chroma_inputs(6, 7, 8, [2, 5])
    expected = model(**inputs)[0]
    handle = linearize(model, radius=20)
    torch.testing.assert_close(model(**inputs)[0], expected, atol=1e-5, rtol=1e-5)
    handle.restore()
    assert torch.equal(model(**inputs)[0], expected)


def test_chroma_mask_errors_and_no_strips():
    model = tiny_chroma_transformer()
    inputs = chroma_inputs(4, 4, 8, [3])
    inputs["attention_mask"] = inputs["attention_mask"].clone()
    inputs["attention_mask"][0, -1] = False
    linearize(model, radius=2)
    with pytest.raises(ValueError, match="masks only text tokens"):
        model(**inputs)
    with pytest.raises(ValueError, match="boolean or 0/1"):
        keep_mask(torch.full((1, 4), 0.5), 1, 4)
    from cleardit.models.strips import parallelize

    with pytest.raises(ValueError, match="not supported for Chroma"):
        parallelize(tiny_chroma_transformer(), radius=2)


def test_chroma_weights_round_trip(tmp_path):
    model = tiny_chroma_transformer()
    handle = linearize(model, radius=2, down_factor=2)
    names = [n for n, _ in handle.named_clear_parameters()]
    assert len(names) == 4 * 2 + 2 * 3 * 2 + 3  # double: q, k, v, out; 2 singles: q, k, v (w, b); pooling
    path = save_weights(model, tmp_path / "chroma.safetensors")
    other = tiny_chroma_transformer(seed=5)
    linearize(other, radius=2, down_factor=2)
    load_weights(other, path)
    for (n, a), (_, b) in zip(handle.named_clear_parameters(), adapter_named(other), strict=True):
        assert torch.equal(a, b), n


def adapter_named(model):
    from cleardit.models import get_handle

    return list(get_handle(model).named_clear_parameters())


@pytest.fixture(scope="module")
def chroma_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chroma") / "tiny-chroma"
    tiny_chroma_pipeline().save_pretrained(str(folder), safe_serialization=True)
    mini_model_info("tiny", name="tiny-chroma", default_guidance=None).write(folder)
    return folder


def test_generate_with_a_tiny_chroma_pipeline(chroma_folder, tmp_path):
    result = generate(
        ["a red circle", "a blue square"], model=chroma_folder, height=64, width=96, steps=2, radius=2,
        true_cfg=2.0, compare=True, output=tmp_path, quiet=True,
    )  # fmt: skip
    assert len(result.images) == 2 and result.images[0].size == (96, 64)
    assert result.compare is not None and result.compare.flops_clear < result.compare.flops_full
    assert Image.open(result.paths[0]).text["true_cfg"] == "2.0"
    highres = generate(
        "a red circle", model=chroma_folder, height=96, width=96, steps=2, radius=2, highres=True, quiet=True
    )
    assert highres.images[0].size == (96, 96) and highres.base_images[0].size == (64, 64)


def test_distill_and_eval_on_a_tiny_chroma_pipeline(chroma_folder, tmp_path):
    data = tmp_path / "data"
    make_teacher_data(
        chroma_folder, ["a red circle", "a blue square"], data, resolution=64, steps=2, quiet=True
    )
    dataset = TeacherDataset(data)
    assert set(dataset[0]) >= {"latents", "prompt_embeds", "prompt_attention_mask"}
    pipe = ChromaPipeline.from_pretrained(str(chroma_folder))
    cfg = DistillConfig(radius=2, steps=2, batch_size=2, lr=1e-3, attention_layers="0,1")
    result = Distiller(cfg, dataset, tmp_path / "run", model=pipe).run()
    assert result.steps == 2 and result.weights.is_file()
    assert adapter_for(pipe.transformer).family == "chroma"
    report = evaluate_model(
        ["a red circle", "a blue square"], model=chroma_folder, radii=[2], output=tmp_path / "eval",
        steps=2, metrics=["psnr"], quiet=True,
    )  # fmt: skip
    assert report.teacher.generated == 2 and report.clear[0].generated == 2
    assert report.results["r2"].to_dict()


def test_the_blocks_get_no_mask_under_clear_and_the_teacher_keeps_it():
    """CLEAR reads the mask once per forward: the blocks never build their [B, 1, S, S] mask; with the
    original processors swapped back in (a distillation teacher pass) the mask reaches them."""
    model = tiny_chroma_transformer()
    inputs = chroma_inputs(5, 6, 8, [3, 5])
    seen = []
    hook = model.transformer_blocks[0].register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    handle = linearize(model, radius=2)
    model(**inputs)
    from cleardit.distill.teacher import TeacherView

    hook.remove()
    assert seen == [None]
    handle.restore()
    teacher = TeacherView(model)
    handle = linearize(model, radius=2)
    teacher.freeze_initial(handle)
    seen.clear()
    model.transformer_blocks[0].register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    expected = tiny_chroma_transformer()(**inputs)[0]
    torch.testing.assert_close(teacher.run(**inputs)[0], expected, atol=1e-5, rtol=1e-5)
    assert seen[0] is not None


def test_clear_beyond_the_grid_equals_full_attention_through_the_pipeline(chroma_folder):
    """Every generate run passes the mask as boolean (the pipelines' float mask is added to the logits
    by diffusers' attention), so CLEAR and full attention see the same, correctly masked model."""
    common = dict(model=chroma_folder, height=64, width=80, steps=2, true_cfg=2.0, quiet=True)
    full = generate("a red circle", radius=0, **common).images[0]
    clear = generate("a red circle", radius=20, **common).images[0]
    diff = np.abs(np.asarray(full, dtype=int) - np.asarray(clear, dtype=int))
    assert diff.max() <= 1


def test_chroma_has_no_distilled_guidance_and_encodes_its_prompts(chroma_folder):
    with pytest.raises(ValueError, match="--true-cfg"):
        generate("a red circle", model=chroma_folder, height=64, width=64, steps=1, guidance=3.0, quiet=True)
    pipe = ChromaPipeline.from_pretrained(str(chroma_folder))
    adapter = adapter_for(pipe)
    text = adapter.encode_prompt(
        pipe, ["a red circle"], images_per_prompt=2, text_len=12, true_cfg=2.0, negative_prompt=""
    )
    assert set(text) == {"prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                         "negative_prompt_attention_mask"}  # fmt: skip
    assert text["prompt_embeds"].shape[:2] == (2, 12) and text["prompt_attention_mask"].shape == (2, 12)
    noise = adapter.initial_noise(pipe, 2, 64, 80, torch.float32, "cpu", torch.Generator().manual_seed(0))
    assert noise.shape == (2, 4 * 5, 16)


def test_reference_release_weights_do_not_load_into_chroma(tmp_path):
    from safetensors.torch import save_file

    model = tiny_chroma_transformer()
    handle = linearize(model, radius=16)
    path = tmp_path / "clear_local_16.safetensors"  # a reference-release name, no cleardit metadata
    save_file({k: v.contiguous() for k, v in handle.clear_state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="for flux models, not for this chroma model"):
        load_weights(model, path)


def test_devices_with_chroma_is_refused_before_any_rank_starts(chroma_folder):
    from cleardit.parallel import generate_parallel

    with pytest.raises(ValueError, match="not supported for Chroma yet"):
        generate_parallel("a red circle", devices=2, model=chroma_folder, radius=2, quiet=True)
