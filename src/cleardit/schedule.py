"""Noise schedules that stay sane past a model's trained size, and img2img starts at a chosen noise level.

Flow-matching DiTs (FLUX, SD3, ...) denoise along sigmas from 1 (pure noise) to 0 and bend that path
towards high noise by a time shift: ``sigma = e^mu / (e^mu + 1/t - 1)`` (diffusers'
``FlowMatchEulerDiscreteScheduler``, "exponential" type; ``mu / (mu + 1/t - 1)`` for the "linear"
type; a fixed ``shift`` when the scheduler has no dynamic shifting). With dynamic shifting, diffusers
sets ``mu`` linearly in the image token count between ``base_image_seq_len`` and
``max_image_seq_len``, and keeps going in a straight line past them. For FLUX.1-dev (0.5 -> 1.15 over
256 -> 4096 tokens) that gives mu = 11.5 at 4K and 44.8 at 8K: every sigma but the last is ~1, so
the model denoises in one jump. ``SHIFT_RULES`` say what ``mu`` is past ``max_image_seq_len``:

* ``"hold"``: mu stays at its value at ``max_image_seq_len`` (``max_shift``).
* ``"sqrt"``: the shift factor grows with the square root of the token count, the resolution-
  dependent shift of the SD3 paper (Esser et al. 2024, sec. 5.3.2): ``e^mu`` (exponential type) or
  ``mu`` (linear type) times ``sqrt(N / max_image_seq_len)``.
* ``"linear"``: diffusers' straight-line extrapolation.

Below ``max_image_seq_len`` every rule is diffusers' own formula, so nothing changes at the sizes a
model was made for.

``denoising_sigmas`` gives the sigmas of a run. With ``strength`` < 1 (img2img / SDEdit) the first
sigma IS ``strength``: the input is re-noised to ``(1 - strength) * x0 + strength * noise`` and the
remaining steps follow the same shifted curve from there to 0. diffusers' img2img instead starts at a
step index (``int(steps * strength)`` steps before the end), whose sigma after a large shift is
close to 1 whatever the strength.

The pipelines take these sigmas as given inside ``sigmas_as_given`` (a copy of the scheduler that
applies no shift of its own).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np

SHIFT_RULES = ("hold", "sqrt", "linear")
DEFAULT_SHIFT_RULE = "hold"
# Scheduler options that remap sigmas after the shift; cleardit's schedule cannot reproduce them.
_REMAPPING_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")


def check_shift_rule(rule: str) -> str:
    if rule not in SHIFT_RULES:
        raise ValueError(f"--shift-rule must be one of {', '.join(SHIFT_RULES)}, got {rule!r}")
    return rule


def shift_mu(config, image_seq_len: int, rule: str = "linear") -> float:
    """The dynamic shift ``mu`` for ``image_seq_len`` image tokens under ``rule`` (see SHIFT_RULES).

    ``config``: a scheduler config (mapping) with diffusers' keys; missing keys take FLUX.1-dev's values.
    """
    check_shift_rule(rule)
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    if rule == "linear" or image_seq_len <= max_len:
        return base_shift + slope * (image_seq_len - base_len)
    if rule == "hold":
        return max_shift
    growth = math.sqrt(image_seq_len / max_len)
    if config.get("time_shift_type", "exponential") == "linear":
        return max_shift * growth
    return max_shift + math.log(growth)


def check_scheduler(scheduler) -> None:
    """A ValueError unless ``scheduler`` is a flow-matching scheduler whose sigmas cleardit can set."""
    config = getattr(scheduler, "config", None)
    if config is None or not hasattr(scheduler, "time_shift") or "num_train_timesteps" not in config:
        raise ValueError(
            f"the pipeline's scheduler is {type(scheduler).__name__}; cleardit sets the noise schedule "
            "of flow-matching schedulers (diffusers' FlowMatchEulerDiscreteScheduler)"
        )
    remapping = [name for name in _REMAPPING_OPTIONS if config.get(name)]
    if remapping:
        flags = ", ".join(f"{n}=True" for n in remapping)
        raise ValueError(
            f"the scheduler has {flags}, which remaps the sigmas after the shift; cleardit's schedule "
            "cannot follow it. Give the pipeline a scheduler without it: pipe.scheduler = "
            f"type(pipe.scheduler).from_config(pipe.scheduler.config, {remapping[0]}=False)"
        )


def _curve(scheduler, mu: float | None, steps: int):
    """sigma(t) for t in (0, 1] of the scheduler's ``steps``-step schedule (shift, then terminal stretch)."""
    config = scheduler.config

    def shifted(t):
        t = np.asarray(t, dtype=np.float64)
        if config.get("use_dynamic_shifting", False):
            return np.asarray(scheduler.time_shift(mu, 1.0, t), dtype=np.float64)
        s = float(config.get("shift", 1.0))
        return s * t / (1 + (s - 1) * t)

    terminal = config.get("shift_terminal")
    if not terminal:
        return shifted
    # diffusers stretches the schedule so that its LAST sigma (t = 1/steps) lands on shift_terminal
    stretch = (1 - shifted(1 / steps)) / (1 - terminal)
    return lambda t: 1 - (1 - shifted(t)) / stretch


def _solve(curve, sigma: float) -> float:
    """t in (0, 1] with curve(t) = sigma (curve increasing), by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if curve(mid) < sigma:
            lo = mid
        else:
            hi = mid
    return hi


def stage2_steps(steps: int, strength: float) -> int:
    """Steps an img2img run of ``strength`` takes: that share of ``steps``, at least one."""
    return max(1, round(steps * strength))


def denoising_sigmas(
    scheduler,
    steps: int,
    image_seq_len: int,
    rule: str = DEFAULT_SHIFT_RULE,
    strength: float = 1.0,
    mu: float | None = None,
) -> np.ndarray:
    """The sigmas (float32, decreasing, without the final 0) of one denoising run.

    ``strength`` = 1: ``steps`` sigmas from 1, the scheduler's own schedule with ``mu`` from ``rule``
    (identical to diffusers' with ``rule="linear"``), or the given ``mu`` (a family whose pipelines
    compute their own, ``ModelAdapter.schedule_mu``). ``strength`` < 1: ``stage2_steps`` sigmas,
    the first equal to ``strength``, spaced along the same shifted curve down to 0.
    """
    check_scheduler(scheduler)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--steps must be a positive whole number, got {steps!r}")
    if not 0 < strength <= 1:
        raise ValueError(f"--strength must be in (0, 1], got {strength}")
    dynamic = scheduler.config.get("use_dynamic_shifting", False)
    if mu is None and dynamic:
        mu = shift_mu(scheduler.config, image_seq_len, rule)
    curve = _curve(scheduler, mu, steps)
    if strength == 1:
        t = np.linspace(1.0, 1 / steps, steps)
    else:
        n = stage2_steps(steps, strength)
        t = _solve(curve, strength) * np.linspace(1.0, 1 / n, n)
    sigmas = curve(t)
    if strength < 1:
        sigmas[0] = strength  # exact, not the bisection's last digit
    return sigmas.astype(np.float32)


def verbatim_scheduler(scheduler):
    """A copy of ``scheduler`` that uses the sigmas it is given as they are (no shift of its own)."""
    check_scheduler(scheduler)
    return type(scheduler).from_config(
        scheduler.config, use_dynamic_shifting=False, shift=1.0, shift_terminal=None
    )


@contextlib.contextmanager
def sigmas_as_given(*pipes) -> Iterator[None]:
    """Inside the block, each pipeline (None skipped) denoises with exactly the ``sigmas=`` it is
    called with: its scheduler is swapped for ``verbatim_scheduler`` and put back afterwards."""
    pipes = [p for p in pipes if p is not None]
    originals = [p.scheduler for p in pipes]
    try:
        for p, s in zip(pipes, originals, strict=True):
            p.scheduler = verbatim_scheduler(s)
        yield
    finally:
        for p, s in zip(pipes, originals, strict=True):
            p.scheduler = s
