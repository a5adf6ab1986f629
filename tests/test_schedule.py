"""cleardit.schedule: diffusers' own schedules where a model was made for, sane ones past it, and
``--strength`` as the noise level stage 2 really starts from, at every size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from cleardit import schedule
from cleardit.mini.pipeline import SCHEDULER_CONFIG, build_mini_pipeline, mini_model_info
from cleardit.pipelines import generate

FLUX_DEV = SCHEDULER_CONFIG  # FLUX.1-dev's published scheduler settings
PROMPT = "a small red circle at the top left on a plain white background"


def flux_scheduler(**overrides) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**{**FLUX_DEV, **overrides})


def diffusers_sigmas(scheduler, steps: int, tokens: int) -> np.ndarray:
    """What FluxPipeline itself runs: its default sigmas, shifted by its own mu."""
    c = scheduler.config
    mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas[:-1].numpy()


@pytest.mark.parametrize("tokens", [64, 256, 1024, 4096, 16384, 65536, 262144])
def test_linear_rule_is_diffusers_schedule(tokens):
    scheduler = flux_scheduler()
    ours = schedule.denoising_sigmas(scheduler, 28, tokens, "linear")
    np.testing.assert_allclose(ours, diffusers_sigmas(scheduler, 28, tokens), atol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(shift_terminal=0.02),  # Qwen-Image style: stretched to end at 0.02
        dict(time_shift_type="linear"),
        dict(use_dynamic_shifting=False, shift=3.0),  # SD3 style: one static shift
    ],
)
def test_other_shift_kinds_match_the_scheduler(overrides):
    scheduler = flux_scheduler(**overrides)
    steps, tokens = 20, 2000
    mu = schedule.shift_mu(scheduler.config, tokens) if scheduler.config.use_dynamic_shifting else None
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = schedule.denoising_sigmas(scheduler, steps, tokens)
    np.testing.assert_allclose(ours, scheduler.sigmas[:-1].numpy(), atol=1e-6)
    # the img2img start is the strength whatever the kind of shift
    assert schedule.denoising_sigmas(scheduler, steps, tokens, strength=0.35)[0] == pytest.approx(0.35)


def test_rules_agree_up_to_max_image_seq_len_and_differ_past_it():
    c = flux_scheduler().config
    for tokens in (16, 256, 1000, 4096):
        mus = {rule: schedule.shift_mu(c, tokens, rule) for rule in schedule.SHIFT_RULES}
        assert max(mus.values()) - min(mus.values()) < 1e-12, mus
    # FLUX.1-dev at 4K / 8K (65,536 / 262,144 tokens)
    assert schedule.shift_mu(c, 65536, "linear") == pytest.approx(11.55)
    assert schedule.shift_mu(c, 262144, "linear") == pytest.approx(44.83)
    assert schedule.shift_mu(c, 65536, "hold") == schedule.shift_mu(c, 262144, "hold") == 1.15
    # sqrt: the shift factor e^mu grows with sqrt(tokens / 4096): x4 at 4K, x8 at 8K
    assert math.exp(schedule.shift_mu(c, 65536, "sqrt")) == pytest.approx(math.exp(1.15) * 4)
    assert math.exp(schedule.shift_mu(c, 262144, "sqrt")) == pytest.approx(math.exp(1.15) * 8)
    linear_type = flux_scheduler(time_shift_type="linear").config
    assert schedule.shift_mu(linear_type, 65536, "sqrt") == pytest.approx(1.15 * 4)
    with pytest.raises(ValueError, match="--shift-rule must be one of hold, sqrt, linear"):
        schedule.shift_mu(c, 10, "clamp")


def test_past_the_trained_size_hold_and_sqrt_keep_a_spread_schedule():
    """diffusers' extrapolation puts every sigma but the last at ~1 at 8K; hold and sqrt do not."""
    scheduler = flux_scheduler()
    tokens = 262144  # FLUX.1-dev at 8192 px
    linear = schedule.denoising_sigmas(scheduler, 28, tokens, "linear")
    assert linear[-1] > 0.999  # the model would denoise in one jump from ~1 to 0
    for rule in ("hold", "sqrt"):
        sigmas = schedule.denoising_sigmas(scheduler, 28, tokens, rule)
        assert sigmas[0] == 1 and np.all(np.diff(sigmas) < 0)
        assert sigmas[-1] < 0.5 and sigmas[len(sigmas) // 2] < 0.97, (rule, sigmas)
    hold = schedule.denoising_sigmas(scheduler, 28, tokens, "hold")
    np.testing.assert_allclose(hold, schedule.denoising_sigmas(scheduler, 28, 4096, "hold"))
    assert np.all(schedule.denoising_sigmas(scheduler, 28, tokens, "sqrt")[1:] > hold[1:])


@pytest.mark.parametrize("rule", schedule.SHIFT_RULES)
@pytest.mark.parametrize("strength", [0.05, 0.3, 0.7, 1.0])
def test_img2img_starts_at_the_strength_and_follows_the_curve(rule, strength):
    scheduler = flux_scheduler()
    for tokens in (1024, 65536, 262144):
        sigmas = schedule.denoising_sigmas(scheduler, 20, tokens, rule, strength=strength)
        assert len(sigmas) == schedule.stage2_steps(20, strength) == max(1, round(20 * strength))
        assert sigmas[0] == pytest.approx(strength, abs=1e-6)
        assert np.all(np.diff(sigmas) <= 0) and sigmas[-1] > 0
        if rule != "linear" or strength < 1:  # linear from noise past 4096 tokens: all ~1 (the bug)
            assert np.all(np.diff(sigmas) < 0)
    # the stage-2 sigmas lie on the full run's shifted curve, evenly spaced in its time t from the
    # strength's t down: undo the shift (e^mu, mu = 1.15 at 4096 tokens) and the t's are a linspace
    sigmas = schedule.denoising_sigmas(scheduler, 20, 4096, rule, strength=strength).astype(np.float64)
    t = 1 / (1 + math.exp(1.15) * (1 / sigmas - 1))
    np.testing.assert_allclose(t, t[0] * np.linspace(1, 1 / len(t), len(t)), rtol=1e-5)


def test_bad_schedulers_and_values_are_refused():
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        schedule.denoising_sigmas(flux_scheduler(use_karras_sigmas=True), 10, 256)
    with pytest.raises(ValueError, match="flow-matching"):
        schedule.denoising_sigmas(object(), 10, 256)
    with pytest.raises(ValueError, match="--strength must be in"):
        schedule.denoising_sigmas(flux_scheduler(), 10, 256, strength=0)


def test_sigmas_as_given_swaps_and_restores():
    pipe = build_mini_pipeline("tiny")
    original = pipe.scheduler
    with schedule.sigmas_as_given(pipe, None):
        assert pipe.scheduler is not original and not pipe.scheduler.config.use_dynamic_shifting
        pipe.scheduler.set_timesteps(sigmas=[0.9, 0.5, 0.1])
        np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), [0.9, 0.5, 0.1, 0.0], atol=1e-7)
    assert pipe.scheduler is original


# -- the noise level generate() really applies, at FLUX.1-dev's 1K / 4K / 8K ---------------------------


class _Noised(Exception):
    """Raised by the spy once stage 2 has re-noised its input: the test has what it needs."""


@pytest.fixture
def noising_spy(monkeypatch):
    """Records (sigma, x0, noise, noised) of every FlowMatchEulerDiscreteScheduler.scale_noise call,
    then stops the run (no need to denoise or decode a 8192 px image to know where it started)."""
    seen = []
    original = FlowMatchEulerDiscreteScheduler.scale_noise

    def spy(self, sample, timestep, noise=None):
        noised = original(self, sample, timestep, noise)
        index = self.index_for_timestep(timestep[0]) if self.begin_index is None else self.begin_index
        seen.append(dict(sigma=float(self.sigmas[index]), x0=sample, noise=noise, noised=noised))
        raise _Noised

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "scale_noise", spy)
    return seen


@pytest.mark.parametrize("pixels", [1024, 4096, 8192])
@pytest.mark.parametrize("rule", schedule.SHIFT_RULES)
def test_stage2_starts_at_strength_at_flux_dev_sizes(noising_spy, pixels, rule):
    """A tiny FLUX with FLUX.1-dev's scheduler (16 px per token, as FLUX): the first stage-2 sigma is
    the strength at 1K / 4K / 8K. diffusers' own img2img starts at sigma ~0.92 / 1.0 / 1.0 there."""
    pipe = build_mini_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.max_shift == 1.15  # FLUX.1-dev's settings
    strength = 0.3
    with pytest.raises(_Noised):
        generate(
            PROMPT,
            model=pipe,
            info=mini_model_info("tiny"),
            height=pixels,
            width=pixels,
            steps=20,
            radius=2,
            highres=True,
            strength=strength,
            upscale="latent",  # no VAE encode of a 8192 px image before the point under test
            shift_rule=rule,
            quiet=True,
        )
    (call,) = noising_spy
    assert abs(call["sigma"] - strength) < 1e-3
    expected = (1 - strength) * call["x0"] + strength * call["noise"]
    torch.testing.assert_close(call["noised"], expected, atol=1e-5, rtol=1e-5)
    assert pipe.scheduler.config.use_dynamic_shifting  # the user's scheduler is back


def test_metadata_records_the_sigmas_used(tmp_path):
    import json

    from PIL import Image

    pipe = build_mini_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    out = tmp_path / "x.png"
    generate(
        PROMPT,
        model=pipe,
        info=mini_model_info("tiny"),
        height=128,
        width=128,
        steps=4,
        radius=2,
        highres=True,
        strength=0.5,
        output=out,
        quiet=True,
    )
    text = Image.open(out).text
    sigmas = json.loads(text["sigmas"])
    assert sigmas[0] == 0.5 and len(sigmas) == 2 and text["shift_rule"] == schedule.DEFAULT_SHIFT_RULE
    stage1 = json.loads(text["stage1_sigmas"])
    assert stage1[0] == 1.0 and len(stage1) == 4
