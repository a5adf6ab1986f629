"""The mini trainer (``python examples/mini_model/train.py``): determinism, checkpoints, resume, CLI errors.

Fast tests train the "tiny" architecture for a handful of steps on the CPU; the slow test runs
``--quick`` end to end on the real mini architecture and generates an image from the result.
"""

from __future__ import annotations

import json
import math
import signal
from dataclasses import replace

import pytest
import torch
from mini_lab import trainer as T
from mini_lab.dataset import ProceduralDataset, object_box
from mini_lab.train_state import checkpoint_path, load_checkpoint
from safetensors.torch import load_file

from cleardit.seeds import derive_seed


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny models' many small ops are faster without thread hand-offs and do
    not stall when the machine's cores are busy (bit-identity is compared within one setting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**overrides):
    cfg = dict(size="tiny", vae_steps=4, dit_steps=5, batch=4, vae_batch=2, stats_images=4)
    cfg.update(overrides)
    return T.quick_config(**cfg)


def opts(tmp_path, name: str, **overrides):
    o = dict(
        output=tmp_path / name / "model",
        work_dir=tmp_path / name / "work",
        eval_images=0,
        progress=False,
        checkpoint_minutes=1000.0,
    )
    o.update(overrides)
    return T.RunOptions(**o)


def safetensors_of(folder):
    return {p.relative_to(folder).as_posix(): load_file(p) for p in sorted(folder.rglob("*.safetensors"))}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same_tensors(a[k], b[k])
        else:
            assert torch.equal(a[k], b[k]), k


# -- data order ------------------------------------------------------------------------------


def test_data_order_is_a_function_of_seed_and_step():
    cfg = T.full_config()
    for stage in ("vae", "dit"):
        later = T.batch_plan(cfg, stage, 7)
        for s in range(12):  # other calls in between change nothing
            T.batch_plan(cfg, stage, s)
        assert T.batch_plan(cfg, stage, 7) == later
        assert T.batch_plan(cfg, stage, 8) != later
        assert T.batch_plan(T.full_config(seed=1), stage, 7) != later
        # successive steps never reuse a scene
        a, b = T.batch_plan(cfg, stage, 3), T.batch_plan(cfg, stage, 4)
        assert not set(a.indices) & set(b.indices)
    # the rendered batch of a plan is the same whenever it is rendered
    small = T.quick_config(size="tiny", batch=3, vae_batch=3)
    for stage in ("vae", "dit"):
        plan = T.batch_plan(small, stage, 5)
        x1, c1 = T.render_batch(small, plan)
        T.render_batch(small, T.batch_plan(small, stage, 6))
        x2, c2 = T.render_batch(small, plan)
        assert torch.equal(x1, x2) and c1 == c2
        assert x1.shape[0] == len(plan.indices) and x1.min() >= -1 and x1.max() <= 1
        if stage == "vae":
            assert x1.shape[-2:] == (small.vae_crop, small.vae_crop)
        else:
            assert x1.shape[-2:] == (plan.height, plan.width)


def test_render_workers_give_the_same_run(tmp_path):
    """Scenes rendered by worker processes: the same batches, so the same weights, bit for bit."""
    cfg = tiny_config(caption_dropout=0.3)
    pool = T.RenderPool(2)
    try:
        for stage, step in (("vae", 1), ("dit", 2), ("dit", 3)):
            plan = T.batch_plan(cfg, stage, step)
            x1, c1 = T.render_batch(cfg, plan)
            x2, c2 = T.render_batch(cfg, plan, pool)
            assert torch.equal(x1, x2) and c1 == c2
    finally:
        pool.close()
    T.train(cfg, opts(tmp_path, "inline"))
    T.train(cfg, opts(tmp_path, "workers", render_workers=2))
    assert_same_tensors(
        safetensors_of(tmp_path / "workers" / "model"), safetensors_of(tmp_path / "inline" / "model")
    )


def test_the_defaults_are_the_shipped_models_recipe():
    """`python examples/mini_model/train.py` trains what ships: the defaults equal the shipped run's logged
    configuration (mixed_precision aside: "auto" is logged as what the machine chose)."""
    logged = json.loads((T.DEFAULT_OUTPUT / "training_log.json").read_text())["config"]
    defaults = T.full_config().to_dict()
    assert logged.pop("mixed_precision") in ("no", "bf16") and defaults.pop("mixed_precision") == "auto"
    assert logged == defaults


def test_resolution_mix_and_batch_sizes():
    cfg = T.full_config(latent_reuse=1)  # a new size draw every step
    res = T.dit_resolutions(cfg)
    assert abs(sum(p for _, _, p in res) - 1) < 1e-9
    sizes = {(h, w) for h, w, _ in res}
    assert {(128, 128), (256, 256), (128, 512), (512, 128)} <= sizes
    for h, w, _ in res:
        assert h % cfg.size_factor == 0 and w % cfg.size_factor == 0
        n = T.dit_batch_size(cfg, h, w)
        assert 1 <= n <= cfg.batch and abs(n * h * w - cfg.batch * 128 * 128) <= h * w
    after = range(cfg.layout_steps, cfg.layout_steps + 300)
    seen = {(p.height, p.width) for p in (T.batch_plan(cfg, "dit", s) for s in after)}
    assert seen == sizes
    assert set(T.vae_render_sizes(cfg)) == {64, 96, 128, 192}


def test_schedules_match_the_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from cleardit.mini.pipeline import SCHEDULER_CONFIG as C

    for n in (16, 256, 1024, 4096):
        want = calculate_shift(
            n, C["base_image_seq_len"], C["max_image_seq_len"], C["base_shift"], C["max_shift"]
        )
        assert T.timestep_shift_mu(n) == pytest.approx(want)
    g = torch.Generator().manual_seed(0)
    s_small = T.sample_sigmas(4000, 256, g)
    s_big = T.sample_sigmas(4000, 4096, torch.Generator().manual_seed(0))
    assert 0 < s_small.min() and s_small.max() < 1
    assert s_big.mean() > s_small.mean()  # larger images: noisier on average, as in the scheduler
    lr = [T.learning_rate(1.0, s, 100, 10) for s in range(100)]
    assert (
        lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0) and lr[-1] == pytest.approx(0.1, abs=1e-3)
    )
    assert all(a >= b for a, b in zip(lr[9:], lr[10:], strict=False))


def record_transformer_input(trainer, name: str) -> list:
    """(DiT step, a copy of the transformer's keyword input ``name``) of every DiT step ``trainer`` runs."""
    seen, real_step = [], trainer._dit_step

    def spy(plan):
        hook = trainer.pipe.transformer.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append((plan.step, kwargs[name].clone())), with_kwargs=True
        )
        try:
            return real_step(plan)
        finally:
            hook.remove()

    trainer._dit_step = spy
    return seen


def test_layout_steps_train_at_sigma_one_on_base_images(tmp_path):
    """The layout phase: sigma = 1, base size, peak learning rate; bf16 autocast; resumable."""
    with pytest.raises(ValueError, match="layout_steps must be in"):
        T.full_config(layout_steps=T.full_config().dit_steps)
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        T.full_config(mixed_precision="fp16")
    cfg = T.full_config(layout_steps=300, layout_resolution=None, layout_batch=None)
    early = [T.batch_plan(cfg, "dit", s) for s in range(300)]
    assert {(p.height, p.width, len(p.indices)) for p in early} == {(128, 128, cfg.batch)}
    assert len({(p.height, p.width) for p in (T.batch_plan(cfg, "dit", s) for s in range(300, 600))}) > 3
    lr = [T.learning_rate(1.0, s, 100, 10, hold=40) for s in range(100)]
    assert lr[:40] == [T.learning_rate(1.0, s, 100, 10) for s in range(10)] + [1.0] * 30
    assert lr[41] < 1.0 and lr[-1] == pytest.approx(0.1, abs=1e-3)

    cfg = tiny_config(dit_steps=6, layout_steps=3, mixed_precision="bf16")
    trainer = T.MiniTrainer(cfg, opts(tmp_path, "seen"))
    seen = record_transformer_input(trainer, "timestep")
    trainer.run()
    assert [s for s, _ in seen] == list(range(6))
    assert all(bool((t == 1).all()) for s, t in seen if s < 3)
    assert all(bool((t < 1).all()) for s, t in seen if s >= 3)

    straight = opts(tmp_path, "straight")
    T.train(cfg, straight)
    o = opts(tmp_path, "killed", checkpoint_every=1)
    with pytest.raises(T.SimulatedKill):  # dies inside the layout phase
        T.train(cfg, o, kill_after_steps=6)
    log = T.train(cfg, o, resume=True)
    assert_same_tensors(safetensors_of(o.output), safetensors_of(straight.output))
    assert all(math.isfinite(v) for _, v in log["stages"]["dit"]["loss_curve"])


def test_layout_resolution_renders_small_and_stretches_the_position_ids(tmp_path):
    """Layout steps at a smaller side: smaller renders, ids spread over the base token grid."""
    for bad in (60, 0, 256, True, 64.0):
        with pytest.raises(ValueError, match="layout_resolution must be a multiple of 8"):
            T.full_config(layout_steps=10, layout_resolution=bad)
    for bad in (0, 2.5, False):
        with pytest.raises(ValueError, match="layout_batch must be a whole number"):
            T.full_config(layout_steps=10, layout_batch=bad)
    cfg = T.full_config(layout_steps=300, layout_resolution=64, layout_batch=None)
    assert cfg.layout_side == 64 and T.full_config(layout_resolution=None).layout_side == 128
    early = [T.batch_plan(cfg, "dit", s) for s in range(300)]
    assert {(p.height, p.width, len(p.indices)) for p in early} == {(64, 64, cfg.batch)}
    wide = T.full_config(layout_steps=300, layout_resolution=64, layout_batch=64)
    assert {len(T.batch_plan(wide, "dit", s).indices) for s in range(300)} == {64}
    assert T.batch_plan(wide, "dit", 7).indices == tuple(range(7 * 64, 8 * 64))
    later = [T.batch_plan(cfg, "dit", s) for s in range(300, 600)]
    assert later == [T.batch_plan(wide, "dit", s) for s in range(300, 600)]
    base = T.full_config(layout_steps=300, layout_resolution=None, layout_batch=None)
    assert later == [T.batch_plan(base, "dit", s) for s in range(300, 600)]

    _, ids = T.pack_latents(torch.zeros(1, 4, 4, 6))  # 2 x 3 tokens
    big = T.stretch_image_ids(ids, (2, 3), (4, 6))
    assert big[:, 0].eq(0).all()
    assert sorted(set(big[:, 1].tolist())) == [0.5, 2.5]
    assert sorted(set(big[:, 2].tolist())) == [0.5, 2.5, 4.5]
    assert torch.equal(T.stretch_image_ids(ids, (2, 3), (2, 3)), ids)

    cfg = tiny_config(dit_steps=4, layout_steps=2, layout_resolution=32)  # tiny: base 64, 16 px a token
    trainer = T.MiniTrainer(cfg, opts(tmp_path, "small"))
    seen = record_transformer_input(trainer, "img_ids")
    log = trainer.run()
    assert [s for s, _ in seen] == list(range(4))
    for _, ids in seen[:2]:  # 32 px = 2 x 2 tokens, at the centres of the 4 x 4 base grid's quarters
        assert len(ids) == 4 and sorted(set(ids[:, 1].tolist())) == [0.5, 2.5]
    for _, ids in seen[2:]:  # the other steps: the pipeline's own whole-number ids
        assert torch.equal(ids, ids.round())
    assert all(math.isfinite(v) for _, v in log["stages"]["dit"]["loss_curve"])


def test_encode_text_matches_the_pipeline():
    from cleardit.mini.pipeline import build_mini_pipeline

    pipe = build_mini_pipeline("tiny")
    caps = [
        "a small red circle at the top left on a plain white background",
        T.heldout_scenes(1)[0].caption(),
    ]
    embeds, pooled = T.encode_text(pipe, caps)
    want_e, want_p, _ = pipe.encode_prompt(caps, max_sequence_length=40)
    assert torch.equal(embeds, want_e) and torch.equal(pooled, want_p)


# -- checkpoints and resume ------------------------------------------------------------------


def test_resume_after_kills_is_bit_identical(tmp_path):
    cfg = tiny_config()
    ref_log = T.train(cfg, opts(tmp_path, "straight"))
    ref = load_checkpoint(tmp_path / "straight" / "work")
    assert ref["stage"] == "done" and len(ref["losses"]["vae"]) == 4 and len(ref["losses"]["dit"]) == 5

    o = opts(tmp_path, "killed", checkpoint_every=2)
    with pytest.raises(T.SimulatedKill):  # dies after VAE step 3; the checkpoint of step 2 survives
        T.train(cfg, o, kill_after_steps=3)
    state = load_checkpoint(o.work_dir)
    assert (state["stage"], state["step"], len(state["losses"]["vae"])) == ("vae", 2, 2)
    with pytest.raises(T.SimulatedKill):  # VAE steps 3-4, stage end, DiT steps 1-2
        T.train(cfg, o, resume=True, kill_after_steps=4)
    state = load_checkpoint(o.work_dir)
    assert (state["stage"], state["step"]) == ("dit", 2)
    log = T.train(cfg, o, resume=True)
    got = load_checkpoint(o.work_dir)

    assert_same_tensors(got["models"], ref["models"])
    assert_same_tensors(got["ema"], ref["ema"])
    assert got["losses"] == ref["losses"] and got["latent_stats"] == ref["latent_stats"]
    assert_same_tensors(safetensors_of(o.output), safetensors_of(tmp_path / "straight" / "model"))
    assert log["stages"]["dit"]["loss_curve"] == ref_log["stages"]["dit"]["loss_curve"]
    assert log["resumes"] == 2
    # the shipped VAE carries the latent statistics; cleardit.json the base size
    vae_cfg = json.loads((o.output / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(got["latent_stats"]["scaling_factor"])
    assert json.loads((o.output / "cleardit.json").read_text())["base_height"] == 64
    assert (o.output / T.LOG_FILE).is_file()


def test_signal_saves_a_checkpoint_and_resume_finishes(tmp_path):
    cfg = tiny_config(vae_steps=2, dit_steps=2)
    o = opts(tmp_path, "sig")
    trainer = T.MiniTrainer(cfg, o)
    trainer._on_signal(signal.SIGTERM, None)  # as if SIGTERM arrived during the first step
    with pytest.raises(T.TrainingInterrupted, match="--resume"):
        trainer.run()
    assert load_checkpoint(o.work_dir)["step"] == 1
    assert T.train(cfg, o, resume=True)["stages"]["dit"]["steps_done"] == 2


def test_resume_refuses_another_config_and_plain_rerun(tmp_path):
    o = opts(tmp_path, "cfg", checkpoint_every=1)
    with pytest.raises(T.SimulatedKill):
        T.train(tiny_config(), o, kill_after_steps=1)
    with pytest.raises(ValueError) as err:
        T.train(tiny_config(seed=3, dit_steps=9), o, resume=True)
    msg = str(err.value)
    assert str(o.work_dir) in msg and "seed: work dir has 0, this run asks for 3" in msg
    assert "dit_steps: work dir has 5, this run asks for 9" in msg
    with pytest.raises(ValueError, match="pass --resume"):
        T.train(tiny_config(), o)


def test_object_token_weights_follow_the_objects_and_weight_the_loss(tmp_path):
    """Tokens an object covers (or touches) weigh up to 1 + object_loss_weight, others 1; the layout
    steps stay unweighted."""
    with pytest.raises(ValueError, match="object_loss_weight must be >= 0"):
        T.full_config(object_loss_weight=-1.0)
    cfg = T.full_config(object_loss_weight=4.0)
    plan = T.batch_plan(cfg, "dit", cfg.layout_steps)
    weights = T.object_token_weights(cfg, plan)
    tokens = (plan.height // cfg.size_factor) * (plan.width // cfg.size_factor)
    assert weights.shape == (len(plan.indices), tokens)
    assert float(weights.min()) == 1.0 and float(weights.max()) == 5.0
    ds = ProceduralDataset(
        T._DATASET_SIZE, seed=derive_seed(cfg.seed, T._STREAMS["dit"]), resolution=(plan.height, plan.width)
    )
    for j, i in enumerate(plan.indices[:4]):
        grid = weights[j].view(plan.height // cfg.size_factor, plan.width // cfg.size_factor)
        for obj in ds.scene(i).objects:
            cx, cy, _ = object_box(obj, plan.height, plan.width)
            assert grid[int(cy) // cfg.size_factor, int(cx) // cfg.size_factor] > 3.0
        assert 0.02 < float((grid > 1).float().mean()) < 0.6  # objects are a part of the picture

    cfg = tiny_config(dit_steps=4, layout_steps=2, object_loss_weight=3.0)
    trainer = T.MiniTrainer(cfg, opts(tmp_path, "objw"))
    called = []
    real = T.object_token_weights
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "object_token_weights", lambda c, p: called.append(p.step) or real(c, p))
        trainer.run()
    assert called == [2, 3]  # not during the layout steps


def test_latent_reuse_repeats_a_batch_with_new_noise_and_base_tail_ends_at_base_size(tmp_path):
    """latent_reuse: consecutive steps share scenes, size and captions (one VAE encoding) but not
    noise; base_tail_steps: the last steps are base size; both resume bit-identically."""
    with pytest.raises(ValueError, match="latent_reuse must be a whole number >= 1"):
        T.full_config(latent_reuse=0)
    with pytest.raises(
        ValueError, match=r"base_tail_steps must be a whole number in \[0, dit_steps - layout"
    ):
        T.full_config(base_tail_steps=T.full_config().dit_steps)
    with pytest.raises(
        ValueError, match=r"got 700 \(with fewer --dit-steps, also pass --set base_tail_steps=N"
    ):
        T.full_config(dit_steps=1000)  # the default tail no longer fits: the message names the fix
    cfg = T.full_config(latent_reuse=3, base_tail_steps=100, caption_dropout=0.2)
    first = cfg.layout_steps
    plans = [T.batch_plan(cfg, "dit", s) for s in range(first, first + 30)]
    data = [(p.indices, p.height, p.width, p.dropped) for p in plans]
    assert all(data[i] == data[i - i % 3] for i in range(30))
    assert len(set(data)) == 10 and len({p.noise_seed for p in plans}) == 30
    assert plans[0].indices[0] == first * cfg.batch and plans[3].indices[0] == (first + 3) * cfg.batch
    assert len({(p.height, p.width) for p in plans}) > 1
    tail = [T.batch_plan(cfg, "dit", s) for s in range(cfg.dit_steps - 100, cfg.dit_steps)]
    assert {(p.height, p.width, len(p.indices)) for p in tail} == {(cfg.base, cfg.base, cfg.batch)}
    plain = T.full_config(latent_reuse=1)
    assert T.batch_plan(plain, "dit", first + 1).indices[0] == (first + 1) * plain.batch

    cfg = tiny_config(dit_steps=7, layout_steps=1, latent_reuse=3, base_tail_steps=2)
    trainer = T.MiniTrainer(cfg, opts(tmp_path, "seen"))
    encoded, real_latents = [], trainer._latents
    trainer._latents = lambda x, stats: encoded.append(x.shape) or real_latents(x, stats)
    seen = record_transformer_input(trainer, "hidden_states")
    trainer.run()
    plans = [T.batch_plan(cfg, "dit", s) for s in range(7)]
    keys = [(p.indices, p.height, p.width, p.dropped) for p in plans]
    assert keys[1] == keys[2] == keys[3] != keys[4] and keys[5] == keys[6]
    assert len(encoded) == 1 + sum(keys[i] != keys[i - 1] for i in range(1, 7)) <= 4
    inputs = dict(seen)
    assert not torch.equal(inputs[1], inputs[2])  # the same latents, other noise
    straight = opts(tmp_path, "straight")
    T.train(cfg, straight)
    o = opts(tmp_path, "killed", checkpoint_every=1)
    with pytest.raises(T.SimulatedKill):  # dies inside the first reuse group
        T.train(cfg, o, kill_after_steps=cfg.vae_steps + 3)
    T.train(cfg, o, resume=True)
    assert_same_tensors(safetensors_of(o.output), safetensors_of(straight.output))


def test_shape_swap_plans_renders_and_targets_the_captioned_picture(tmp_path):
    """shape_swap: some captioned samples after the layout steps get an input with other shapes,
    and their target still leads (in one Euler step to sigma 0) to the captioned picture."""
    with pytest.raises(ValueError, match=r"shape_swap must be in \[0, 1\)"):
        T.full_config(shape_swap=1.0)
    with pytest.raises(ValueError, match=r"shape_swap_min_sigma must be in \(0, 1\]"):
        T.full_config(shape_swap_min_sigma=0.0)
    cfg = T.full_config(shape_swap=0.4, shape_swap_last_steps=None, caption_dropout=0.2)
    plain = T.full_config(shape_swap=0.0, caption_dropout=0.2)
    steps = range(cfg.layout_steps - 5, cfg.layout_steps + 100)
    plans = [T.batch_plan(cfg, "dit", s) for s in steps]
    assert [replace(p, swapped=()) for p in plans] == [T.batch_plan(plain, "dit", s) for s in steps]
    assert not any(p.swapped for p in plans[:5])  # the layout steps (sigma = 1) never swap
    later = plans[5:]
    share = sum(len(p.swapped) for p in later) / sum(len(p.indices) - len(p.dropped) for p in later)
    assert 0.33 < share < 0.47 and not any(set(p.swapped) & set(p.dropped) for p in later)
    # shape_swap_last_steps: the same draws, only in the last N DiT steps
    tail = replace(cfg, shape_swap_last_steps=cfg.dit_steps - cfg.layout_steps - 40)
    assert tail.shape_swap_start == cfg.layout_steps + 40
    assert [T.batch_plan(tail, "dit", s) for s in steps] == [
        p if s >= tail.shape_swap_start else replace(p, swapped=()) for s, p in zip(steps, plans, strict=True)
    ]
    assert replace(cfg, shape_swap_last_steps=None).shape_swap_start == cfg.layout_steps
    for bad in (0, cfg.dit_steps - cfg.layout_steps + 1, 2.5, True):
        with pytest.raises(
            ValueError, match=rf"shape_swap_last_steps must be a whole number in \[1, .*{bad!r}"
        ):
            replace(cfg, shape_swap_last_steps=bad)

    plan = next(p for p in later if p.height == p.width == cfg.base and len(p.swapped) >= 2)
    ds = T.plan_dataset(cfg, plan)
    for j in plan.swapped:
        scene = ds.scene(plan.indices[j])
        other = T.swapped_scene(scene, 5)
        assert other == T.swapped_scene(scene, 5) and other.caption() != scene.caption()
        pairs = list(zip(other.objects, scene.objects, strict=True))
        assert [replace(o, shape=s.shape) for o, s in pairs] == list(scene.objects)
        assert all(o.shape != s.shape for o, s in pairs)
    with pytest.raises(ValueError, match=r"the scene has \d object\(s\); got 4 shapes"):
        scene.with_shapes(["circle"] * 4)
    with pytest.raises(ValueError, match="unknown shape .hexagon.; expected one of"):
        scene.with_shapes(["hexagon"] * len(scene.objects))
    images, _ = T.render_batch(cfg, plan)
    swapped = T.render_swapped(cfg, plan)
    assert swapped.shape == (len(plan.swapped), *images.shape[1:])
    assert all(not torch.equal(swapped[k], images[j]) for k, j in enumerate(plan.swapped))

    g = torch.Generator().manual_seed(0)
    x0, x_in, noise = (torch.randn(4, 8, 6, 10, generator=g) for _ in range(3))
    sigma = torch.tensor([0.9, 0.5, 0.2, 0.7]).view(4, 1, 1, 1)
    use = torch.tensor([True, True, False, False]).view(4, 1, 1, 1)
    xt, v = T.swapped_noising(x0, x_in, noise, sigma, use)
    torch.testing.assert_close(xt[:2], (1 - sigma[:2]) * x_in[:2] + sigma[:2] * noise[:2])
    torch.testing.assert_close(xt - sigma * v, x0)  # every x0 estimate is the captioned picture
    torch.testing.assert_close(xt[2:], (1 - sigma[2:]) * x0[2:] + sigma[2:] * noise[2:])
    torch.testing.assert_close(v[2:], noise[2:] - x0[2:])

    cfg = tiny_config(dit_steps=6, layout_steps=1, shape_swap=0.5, latent_reuse=2)
    trainer = T.MiniTrainer(cfg, opts(tmp_path, "seen"))
    encoded, real_latents = [], trainer._latents
    trainer._latents = lambda x, stats: encoded.append(len(x)) or real_latents(x, stats)
    trainer.run()
    groups = [T.batch_plan(cfg, "dit", s) for s in range(1, 6, 2)]  # one encoding per reuse group
    expected = [n for p in groups for n in (len(p.indices), len(p.swapped)) if n]
    assert len(expected) > len(groups) and encoded[-len(expected) :] == expected
    straight = opts(tmp_path, "straight")
    T.train(cfg, straight)
    o = opts(tmp_path, "killed", checkpoint_every=1)
    with pytest.raises(T.SimulatedKill):  # dies inside a reuse group
        T.train(cfg, o, kill_after_steps=cfg.vae_steps + 3)
    T.train(cfg, o, resume=True)
    assert_same_tensors(safetensors_of(o.output), safetensors_of(straight.output))


def test_auto_mixed_precision_follows_the_device_and_is_recorded(tmp_path, monkeypatch):
    """ "auto" becomes bf16 only where the device computes it natively (emulated bf16 made a CPU
    step over 10x slower); the chosen value is what the checkpoint records and --resume compares."""
    for native, chosen in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(T, "native_bf16", lambda device, native=native: native)
        assert T.resolve_mixed_precision(tiny_config(), "cpu").mixed_precision == chosen
        for explicit in ("bf16", "no"):
            cfg = tiny_config(mixed_precision=explicit)
            assert T.resolve_mixed_precision(cfg, "cpu") is cfg
    assert T.full_config().mixed_precision == "auto"
    assert T.native_bf16("meta") is False

    o = opts(tmp_path, "auto", checkpoint_every=1)
    monkeypatch.setattr(T, "native_bf16", lambda device: False)
    with pytest.raises(T.SimulatedKill):
        T.train(tiny_config(), o, kill_after_steps=1)
    assert load_checkpoint(o.work_dir)["config"]["mixed_precision"] == "no"
    monkeypatch.setattr(T, "native_bf16", lambda device: True)  # "another machine"
    with pytest.raises(ValueError, match="mixed_precision: work dir has 'no', this run asks for 'bf16'"):
        T.train(tiny_config(), o, resume=True)
    assert T.train(tiny_config(mixed_precision="no"), o, resume=True)["config"]["mixed_precision"] == "no"
    # a damaged checkpoint is a clear error, not a pickle traceback
    checkpoint_path(o.work_dir).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable mini-trainer checkpoint"):
        T.train(tiny_config(), o, resume=True)


def test_cli_runs_and_reports_bad_arguments(tmp_path, capsys):
    base = ["--size", "tiny", "--quick", "--vae-steps", "2", "--dit-steps", "2", "--batch", "2"]
    base += ["--vae-batch", "2", "--eval-images", "0", "--quiet"]
    where = ["--work-dir", str(tmp_path / "w"), "--output", str(tmp_path / "m")]
    assert T.main([*base, *where]) == 0
    out = capsys.readouterr().out
    assert "VAE: 2/2 steps" in out and "DIT: 2/2 steps" in out
    assert (tmp_path / "m" / "model_index.json").is_file() and (tmp_path / "w" / T.LOG_FILE).is_file()
    assert T.main([*base, *where, "--resume"]) == 0  # finished: nothing to do, same summary
    assert T.main([*base, *where, "--resume", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "seed: work dir has 0, this run asks for 1" in err and str(tmp_path / "w") in err
    for bad in (["--batch", "0"], ["--minutes-budget", "-1"], ["--seed", "x"], ["--size", "huge"]):
        with pytest.raises(SystemExit) as exc:
            T.main(bad)
        assert exc.value.code == 2
    assert "expected a whole number >= 1" in capsys.readouterr().err
    assert T.main([*base, *where, "--device", "tpu9"]) == 2
    assert "--device 'tpu9' is not a torch device" in capsys.readouterr().err
    args = T.build_parser().parse_args([*base, "--render-workers", "3"])
    assert T.config_from_args(args)[1].render_workers == 3
    with pytest.raises(SystemExit):
        T.main([*base, "--render-workers", "-1"])
    assert "--render-workers" in capsys.readouterr().err


def test_output_folder_is_never_clobbered(tmp_path):
    from cleardit.mini.pipeline import build_mini_pipeline

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to replace"):
        T.save_pipeline_atomically(build_mini_pipeline("tiny"), foreign, "tiny", progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_caption_dropout_is_planned_and_applied():
    cfg = T.full_config(caption_dropout=0.25)
    plans = [T.batch_plan(cfg, "dit", s) for s in range(200)]
    share = sum(len(p.dropped) for p in plans) / sum(len(p.indices) for p in plans)
    assert 0.2 < share < 0.3
    assert all(0 <= j < len(p.indices) for p in plans for j in p.dropped)
    # the scenes and sizes do not depend on the dropout (it is drawn after them)
    no_dropout = T.full_config(caption_dropout=0.0)
    same = [T.batch_plan(no_dropout, "dit", s) for s in range(20)]
    assert [(p.height, p.indices) for p in plans[:20]] == [(p.height, p.indices) for p in same]
    small = T.quick_config(size="tiny", batch=6, caption_dropout=0.5)
    plan = next(p for p in (T.batch_plan(small, "dit", s) for s in range(50)) if 0 < len(p.dropped) < 6)
    _, captions = T.render_batch(small, plan)
    assert all((c == "") == (j in plan.dropped) for j, c in enumerate(captions))


def test_summarize_adherence_counts_each_kind_and_shapes_by_size():
    from mini_lab.adherence import AdherenceResult

    def result(*objects, bg=(True, False)):
        facts = []
        for colour, size, present, shape_ok, size_ok in objects:
            where = "at the top"
            facts += [
                (f"a {colour} object {where}", present),
                (f"the {colour} object {where} is a circle", shape_ok),
                (f"the {colour} object {where} is {size}", size_ok),
            ]
        return AdherenceResult(facts=facts + [("colours", bg[0]), ("pattern", bg[1])])

    r = T.summarize_adherence(
        [
            result(("red", "small", True, False, True), ("blue", "large", True, True, False)),
            result(("green", "small", True, True, True), bg=(True, True)),
        ]
    )
    assert r["by_fact_percent"] == {
        "object present": 100.0,
        "shape": pytest.approx(200 / 3),
        "size": pytest.approx(200 / 3),
        "background colours": 100.0,
        "background pattern": 50.0,
    }
    assert r["by_object_size_percent"] == {
        "small": {"object present": 100.0, "shape": 50.0, "size": 100.0},
        "large": {"object present": 100.0, "shape": 100.0, "size": 0.0},
    }
    assert r["percent"] == pytest.approx(100 * (5 / 8 + 5 / 5) / 2) and r["strict_percent"] == 50.0
    lone = T.summarize_adherence([result(("red", "large", True, False, False))])
    assert lone["by_object_size_percent"] == {
        "small": {"object present": None, "shape": None, "size": None},
        "large": {"object present": 100.0, "shape": 0.0, "size": 0.0},
    }


def test_config_checks_and_overrides():
    with pytest.raises(ValueError, match="caption_dropout must be in"):
        T.full_config(caption_dropout=1.0)
    with pytest.raises(ValueError, match="true_cfg > 1 needs caption_dropout > 0"):
        T.full_config(caption_dropout=0.0, true_cfg=3.0)
    with pytest.raises(ValueError, match="true_cfg must be >= 1"):
        T.full_config(true_cfg=0.5)
    got = T.parse_overrides(["dit_lr=1e-3", "dit_mix=[[1, 1, 1]]", "train_text_encoders=false"])
    assert got == {"dit_lr": 1e-3, "dit_mix": ((1, 1, 1),), "train_text_encoders": False}
    assert T.full_config(**got).dit_mix == ((1, 1, 1),)
    with pytest.raises(ValueError, match="FIELD one of"):
        T.parse_overrides(["learning_rate=1"])
    with pytest.raises(ValueError, match="VALUE must be JSON"):
        T.parse_overrides(["dit_lr=fast"])


def test_noise_shift_is_trained_and_saved(tmp_path):
    """The training noise levels and the exported scheduler use the same (config) shift."""
    cfg = tiny_config(shift_base=1.7, shift_max=2.4, true_cfg=2.0, caption_dropout=0.1)
    o = opts(tmp_path, "shift")
    T.train(cfg, o)
    sched = json.loads((o.output / "scheduler" / "scheduler_config.json").read_text())
    assert sched["base_shift"] == 1.7 and sched["max_shift"] == 2.4
    assert json.loads((o.output / "cleardit.json").read_text())["default_true_cfg"] == 2.0
    flux = dict(T.SCHEDULER_CONFIG)
    mine = dict(flux, base_shift=1.7, max_shift=2.4)
    g = torch.Generator().manual_seed(0)
    s_flux = T.sample_sigmas(2000, 256, g, scheduler_config=flux)
    s_mine = T.sample_sigmas(2000, 256, torch.Generator().manual_seed(0), scheduler_config=mine)
    assert s_mine.mean() > s_flux.mean() + 0.1  # a larger shift: noisier training samples
    low = T.sample_sigmas(
        4000, 256, torch.Generator().manual_seed(1), scheduler_config=mine, uniform_share=0.4
    )
    assert (s_mine < 0.3).float().mean() < 0.01 and 0.08 < (low < 0.3).float().mean() < 0.16
    flat = T.sample_sigmas(4000, 256, torch.Generator().manual_seed(2), uniform_share=1.0)
    assert abs(float(flat.mean()) - 0.5) < 0.03 and 0 < flat.min() and flat.max() < 1
    with pytest.raises(ValueError, match="sigma_uniform_share must be in"):
        T.full_config(sigma_uniform_share=1.5)


def test_vae_from_starts_at_the_dit_stage_with_that_vae(tmp_path, capsys):
    """--vae-from: no VAE stage; the trained VAE and its latent scaling are kept bit for bit, the
    source is logged, and the DiT stage is the same as a full run's (same data, same init)."""
    first = opts(tmp_path, "first")
    T.train(tiny_config(), first)
    second = opts(tmp_path, "second", vae_from=first.output)
    log = T.train(tiny_config(), second)
    assert log["stages"]["vae"]["steps_done"] == 0 and log["stages"]["dit"]["steps_done"] == 5
    assert log["vae_from"]["path"] == str(first.output.resolve()) and len(log["vae_from"]["sha256"]) == 64
    a, b = safetensors_of(first.output), safetensors_of(second.output)
    assert_same_tensors(a, b)  # the DiT stage only depends on the VAE, so the whole pipeline matches
    vae_a = json.loads((first.output / "vae" / "config.json").read_text())
    vae_b = json.loads((second.output / "vae" / "config.json").read_text())
    assert (
        vae_a["scaling_factor"] == vae_b["scaling_factor"] and vae_a["shift_factor"] == vae_b["shift_factor"]
    )
    assert "taken from" in T.format_summary(log)
    # resuming with another source is refused; a folder without a VAE is a clear error
    with pytest.raises(ValueError, match="differs from the VAE this run started from"):
        T.train(tiny_config(), opts(tmp_path, "second", vae_from=tmp_path / "first" / "work"), resume=True)
    with pytest.raises(ValueError, match="no VAE there"):
        T.train(tiny_config(), opts(tmp_path, "third", vae_from=tmp_path / "nothing"))
    bad = T.main(
        [
            "--size",
            "mini",
            "--quick",
            "--quiet",
            "--eval-images",
            "0",
            "--vae-from",
            str(first.output),
            "--work-dir",
            str(tmp_path / "w4"),
            "--output",
            str(tmp_path / "m4"),
        ]
    )
    assert bad == 2 and "does not have the 'mini' size's architecture" in capsys.readouterr().err


def test_zero_init_starts_from_identity_blocks_and_still_learns(tmp_path):
    from cleardit.mini.pipeline import build_mini_pipeline

    pipe = build_mini_pipeline("tiny")
    tr = pipe.transformer
    assert T.zero_init_modulation(tr) > 4
    x, ids = T.pack_latents(torch.randn(2, tr.config.in_channels // 4, 8, 8))
    out = tr(
        hidden_states=x,
        timestep=torch.tensor([0.3, 0.9]),
        guidance=torch.full((2,), 3.5) if tr.config.guidance_embeds else None,
        pooled_projections=torch.randn(2, tr.config.pooled_projection_dim),
        encoder_hidden_states=torch.randn(2, 5, tr.config.joint_attention_dim),
        txt_ids=torch.zeros(5, 3),
        img_ids=ids,
        return_dict=False,
    )[0]
    assert torch.count_nonzero(out) == 0  # the prediction starts at 0
    o = opts(tmp_path, "zero")
    T.train(tiny_config(zero_init=True), o)
    trained = safetensors_of(o.output)["transformer/diffusion_pytorch_model.safetensors"]
    assert (
        torch.count_nonzero(trained["proj_out.weight"]) > 0
        and torch.count_nonzero(trained["norm_out.linear.weight"]) > 0
    )


# -- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path, capsys):
    from diffusers import FluxPipeline

    out, work = tmp_path / "model", tmp_path / "work"
    assert T.main(["--quick", "--output", str(out), "--work-dir", str(work), "--quiet"]) == 0
    summary = capsys.readouterr().out
    assert "adherence at 128x128" in summary
    log = json.loads((out / T.LOG_FILE).read_text())
    assert log["stages"]["vae"]["steps_done"] == 40 and log["stages"]["dit"]["steps_done"] == 60
    assert log["eval"]["images"] == 4 and 0 <= log["eval"]["adherence_percent"] <= 100
    assert log["safetensors_bytes"] <= 25 * 2**20
    pipe = FluxPipeline.from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a large red circle in the center on a plain white background",
        height=128,
        width=128,
        num_inference_steps=4,
        max_sequence_length=40,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (128, 128)
