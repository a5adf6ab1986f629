"""Chroma: CLEAR honours its text-padding mask, and every job runs on a tiny Chroma pipeline built offline."""

from __future__ import annotations

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
from cleardit.models.chroma import key_keep_mask
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
    """FLUX-shaped attention with one dense boolean mask: the CLEAR rule AND the kept text tokens.

    Padded text queries see nothing and output zeros (as diffusers' boolean mask gives)."""

    def __init__(self, radius: int, layout: TokenLayout):
        self.radius, self.layout = radius, layout

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        q, k, v = project_qkv(attn, hidden_states, encoder_hidden_states)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        keep = key_keep_mask(attention_mask, q.shape[0], q.shape[2])
        mask = allowed_mask(self.layout, self.radius)[None] & keep[:, None, :] & keep[:, :, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        out = torch.where(keep[:, None, :, None], out, torch.zeros_like(out))
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
    with pytest.raises(ValueError, match="key-padding"):
        key_keep_mask(torch.full((1, 4), 0.5), 1, 4)
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
