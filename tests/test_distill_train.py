"""The distillation trainer on the tiny FLUX architecture, in process (fake teacher data)."""

from __future__ import annotations

import copy

import pytest
import torch

from cleardit.distill.losses import parse_attention_layers
from cleardit.distill.teacher import TeacherView
from cleardit.distill.trainer import DistillConfig, Distiller, RunOptions, batch_indices
from cleardit.mini.pipeline import build_mini_pipeline
from cleardit.models import linearize
from cleardit.weights import load_weights


class FakeTeacherData:
    """Random latents and embeddings with the shapes `TeacherDataset` gives for this transformer."""

    manifest = {"guidance": 3.5}
    folder = "fake"

    def __init__(self, transformer, n=6, grid=(8, 12), text_len=7, seed=0):
        g = torch.Generator().manual_seed(seed)
        c = transformer.config
        self.items = [
            dict(
                latents=torch.randn(c.in_channels // 4, *grid, generator=g),
                prompt_embeds=torch.randn(text_len, c.joint_attention_dim, generator=g),
                pooled_prompt_embeds=torch.randn(c.pooled_projection_dim, generator=g),
            )
            for _ in range(n)
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def tiny_transformer():
    torch.manual_seed(0)
    return build_mini_pipeline("tiny").transformer


CFG = DistillConfig(radius=2, steps=4, batch_size=4, grad_accum=2, lr=1e-3, attention_layers="every:1")
QUIET = RunOptions(checkpoint_every=2, quiet=True)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_only_attention_parameters_change(tmp_path):
    transformer = tiny_transformer()
    data = FakeTeacherData(transformer)
    d = Distiller(CFG, data, tmp_path / "run", model=transformer, opts=QUIET)
    before = params(transformer)
    trainable = {n for n, _ in d.named_trainable}
    cfg = transformer.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    per_linear = inner * inner + inner
    expected = (4 * cfg.num_layers + 3 * cfg.num_single_layers) * per_linear
    assert d.trainable_count == expected == sum(before[n].numel() for n in trainable)
    result = d.run()
    after = params(transformer)
    assert set(before) == set(after)
    for name in before:
        if name in trainable:
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"frozen {name} changed"
    # the exported file holds exactly the trained tensors, under the reference names
    fresh = tiny_transformer()
    linearize(fresh, radius=CFG.radius)
    report = load_weights(fresh, result.weights)
    assert report.radius == CFG.radius and not report.missing
    for n, p in fresh.named_parameters():
        assert torch.equal(p.detach().float(), after[n].float())
    assert result.weights.name == "clear_local_2.safetensors"
    assert [e["step"] for e in result.losses] == [1, 2, 3, 4]
    for e in result.losses:
        assert e["loss"] == pytest.approx(e["flow"] + 0.5 * e["output"] + 0.5 * e["attention"], rel=1e-5)


def test_teacher_is_the_original_model_and_stays_it():
    original = tiny_transformer()
    model = copy.deepcopy(original)
    teacher = TeacherView(model)
    handle = linearize(model, radius=1)
    teacher.freeze_initial(handle)
    data = FakeTeacherData(model, n=1)
    item = data[0]
    from diffusers import FluxPipeline

    x = FluxPipeline._pack_latents(item["latents"][None], 1, *item["latents"].shape)
    kwargs = dict(
        hidden_states=x,
        timestep=torch.tensor([0.6]),
        guidance=torch.tensor([3.5]),
        pooled_projections=item["pooled_prompt_embeds"][None],
        encoder_hidden_states=item["prompt_embeds"][None],
        txt_ids=torch.zeros(7, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32),
        return_dict=False,
    )
    with torch.no_grad():
        want = original(**kwargs)[0]
        student = model(**kwargs)[0]
        for _, p in handle.named_clear_parameters():
            p.add_(0.1)  # the student trains away from the initial projections
        got = teacher.run(**kwargs)[0]
        student_after = model(**kwargs)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(student, want, atol=1e-3)  # radius 1 on a 4x6 grid is not full attention
    assert not torch.allclose(student_after, student, atol=1e-3)
    assert teacher.extra_bytes == sum(p.numel() * 4 for _, p in handle.named_clear_parameters())


def test_radius_covering_the_grid_has_zero_distillation_terms(tmp_path):
    transformer = tiny_transformer()
    data = FakeTeacherData(transformer, grid=(4, 6))  # 2x3 tokens: radius 4 sees every token
    cfg = DistillConfig(radius=4, steps=1, batch_size=2, attention_layers="every:1")
    result = Distiller(cfg, data, tmp_path / "run", model=transformer, opts=QUIET).run()
    entry = result.losses[0]
    assert entry["output"] < 1e-10 and entry["attention"] < 1e-10
    assert entry["flow"] > 0.1


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    ref_model = tiny_transformer()
    data = FakeTeacherData(ref_model)
    Distiller(CFG, data, tmp_path / "ref", model=ref_model, opts=QUIET).run()
    want = {n: p.detach().clone() for n, p in ref_model.named_parameters()}

    model = tiny_transformer()
    d = Distiller(CFG, data, tmp_path / "run", model=model, opts=QUIET)
    original_step = Distiller._step

    def crash_at_3(self, m, opt, step):
        if step == 3:
            raise RuntimeError("simulated crash")
        return original_step(self, m, opt, step)

    monkeypatch.setattr(Distiller, "_step", crash_at_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        d.run()
    monkeypatch.setattr(Distiller, "_step", original_step)
    with pytest.raises(ValueError, match="--resume"):
        Distiller(CFG, data, tmp_path / "run", model=tiny_transformer(), opts=QUIET)
    resumed_model = tiny_transformer()
    result = Distiller(CFG, data, tmp_path / "run", model=resumed_model, resume=True, opts=QUIET).run()
    assert [e["step"] for e in result.losses] == [1, 2, 3, 4]
    for n, p in resumed_model.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=0, atol=1e-6)


def test_resume_with_other_settings_is_refused(tmp_path):
    transformer = tiny_transformer()
    data = FakeTeacherData(transformer)
    Distiller(CFG, data, tmp_path / "run", model=transformer, opts=QUIET).run()
    other = DistillConfig(radius=3, steps=4, batch_size=4, grad_accum=2, lr=1e-3, attention_layers="every:1")
    with pytest.raises(ValueError, match=r"radius: checkpoint 2, now 3"):
        Distiller(other, data, tmp_path / "run", model=tiny_transformer(), resume=True, opts=QUIET)


def test_bad_settings_and_data_give_clear_errors(tmp_path):
    transformer = tiny_transformer()
    data = FakeTeacherData(transformer)
    with pytest.raises(ValueError, match="multiple of processes x --grad-accum"):
        Distiller(
            DistillConfig(radius=2, batch_size=3, grad_accum=2), data, tmp_path / "a", model=transformer
        )
    with pytest.raises(ValueError, match="--radius must be"):
        DistillConfig(radius=0)
    with pytest.raises(ValueError, match="--mixed-precision"):
        DistillConfig(radius=2, mixed_precision="fp8")
    wrong = FakeTeacherData(transformer)
    wrong.items = [dict(it, prompt_embeds=it["prompt_embeds"][:, :5]) for it in wrong.items]
    with pytest.raises(ValueError, match="text embedding width is 5"):
        Distiller(DistillConfig(radius=2, batch_size=2), wrong, tmp_path / "b", model=tiny_transformer())


def test_attention_layer_selection():
    assert parse_attention_layers("every:4", 38) == list(range(0, 38, 4))
    assert parse_attention_layers("none", 4) == []
    assert parse_attention_layers("3, 1", 4) == [1, 3]
    for bad in ("every:0", "7", "a,b", ""):
        with pytest.raises(ValueError, match="--attention-layers"):
            parse_attention_layers(bad, 4)


def test_batches_cover_each_epoch_once_and_do_not_depend_on_the_step_split():
    n, batch = 10, 4
    seen = [i for s in range(5) for i in batch_indices(s, batch, n, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert batch_indices(2, batch, n, seed=3) == batch_indices(2, batch, n, seed=3)
    assert batch_indices(0, batch, n, seed=3) != batch_indices(0, batch, n, seed=4)


def test_gradient_checkpointing_trains_the_same_weights(tmp_path):
    """Checkpointing re-runs the CLEAR processors during backward, after the forward hooks ran."""
    results = []
    for flag in (False, True):
        model = tiny_transformer()
        data = FakeTeacherData(model)
        opts = RunOptions(checkpoint_every=0, gradient_checkpointing=flag, quiet=True)
        Distiller(CFG, data, tmp_path / f"gc{flag}", model=model, opts=opts).run()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n, p in results[0].items():
        torch.testing.assert_close(results[1][n], p, rtol=0, atol=1e-6)
