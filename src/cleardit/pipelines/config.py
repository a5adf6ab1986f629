"""``GenerateConfig``: every setting of one ``cleardit generate`` run, checked in one place.

The command line builds it from its options (``from_args``); ``generate``, ``generate_parallel``
and ``cleardit eval model`` take it as it is, so no job re-plumbs the settings by hand.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import schedule

DEFAULT_STRENGTH = 0.3
UPSCALE_MODES = ("image", "latent")


def _positive(name: str, value, kind=int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
        raise ValueError(
            f"--{name} must be a positive {'number' if kind is float else 'whole number'}, got {value!r}"
        )


@dataclass(frozen=True)
class GenerateConfig:
    """Generation settings (the model and prompts are passed beside it).

    Attributes:
        height, width: pixels, multiples of the pipeline's factor (VAE scale x 2: 16 for FLUX.1);
            default the model's base size.
        steps, guidance: denoising steps and distilled guidance (FLUX.1; defaults from cleardit.json,
            else the family's: 28 / 3.5 for FLUX.1).
        true_cfg: classifier-free guidance scale (two transformer passes per step, conditional and
            ``negative_prompt``); 1 = off. Default from cleardit.json (the mini model: its trained
            scale), else the family's (FLUX.1: 1; Chroma: 5).
        negative_prompt: the unconditional text of ``true_cfg`` (default "", as trained).
        seed, batch: each prompt makes ``batch`` images (seeds ``seed``, ``seed + 1``, ... across all
            images, so image i is reproducible on its own).
        device, dtype: default CUDA + bfloat16 when a GPU is visible, else CPU + float32.
        radius: CLEAR radius in tokens; 0 = the original full attention; None = the radius of the
            CLEAR weights in use (``clear_weights`` or the model's own), else 16.
        down_factor, backend: see ``ClearConfig``.
        clear_weights: a CLEAR checkpoint (reference release or ``save_weights``), loaded after
            ``linearize``; its radius / down factor must match (checked).
        highres: two-stage recipe: stage 1 at about the base area with full attention, upscale
            (``upscale``: "image" or "latent"), re-noise to the noise level ``strength``
            (``(1 - strength) * x0 + strength * noise``) and denoise from there at the target size
            with CLEAR (``round(steps * strength)`` steps along the model's shifted schedule).
        shift_rule: the resolution shift ``mu`` past the scheduler's ``max_image_seq_len``
            (``cleardit.schedule.SHIFT_RULES``): "hold" (default), "sqrt" or "linear" (diffusers').
        ntk_factor: multiply RoPE's theta by this at the target size (NTK-scaled RoPE).
        proportional_attention: softmax scale ``sqrt(log_base(N) / d)`` at the target size,
            ``base`` = the training sequence length (base-size image tokens + text tokens).
        compare: also run full attention on the same seeds; write ``*-full.png`` and a side-by-side
            ``*-compare.png`` (timings, speedup, attention FLOPs, PSNR, MS-SSIM).
        warmup: one untimed 1-step run per attention mode first (kernel compilation, caches).
        vae_tiling: encode/decode with the VAE in tiles; None (default) = when the image is larger
            than the VAE's ``sample_size`` (colours hold, less memory at very high resolution).
        output: a folder (``NNNNN-<prompt>.png``) or a ``.png`` file (one image); None: not saved.
        quiet: no progress bars or log lines.
        frames: video families: frames of each video (1 + k x the VAE's temporal factor; default the
            family's, e.g. 81 for Wan). Images: None (a number is refused for image families).
        temporal_radius: video families: the rule's temporal radius in latent frames (None: every
            frame, a cylinder in time).
        fps: frames per second of the written MP4s and previews.
        on_step: called after every denoising step as ``on_step(steps_done, steps_total)``, counting
            every run of the call (high-res stage 1, compare runs; not the warm-up): a progress bar
            outside the terminal, such as ``cleardit serve``'s. Not with ``generate_parallel``.
    """

    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    true_cfg: float | None = None
    negative_prompt: str = ""
    seed: int = 0
    batch: int = 1
    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    radius: int | None = None
    down_factor: int | None = None
    clear_weights: str | os.PathLike | None = None
    backend: str = "auto"
    highres: bool = False
    strength: float = DEFAULT_STRENGTH
    upscale: str = "image"
    shift_rule: str = schedule.DEFAULT_SHIFT_RULE
    ntk_factor: float | None = None
    proportional_attention: bool = False
    compare: bool = False
    warmup: bool = False
    vae_tiling: bool | None = None
    output: str | os.PathLike | None = None
    quiet: bool = False
    frames: int | None = None
    temporal_radius: int | None = None
    fps: int = 16
    on_step: Callable[[int, int], None] | None = None

    def __post_init__(self) -> None:
        _positive("batch", self.batch)
        _positive("fps", self.fps)
        if self.frames is not None:
            _positive("frames", self.frames)
        if self.temporal_radius is not None:
            _positive("temporal-radius", self.temporal_radius)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"--seed must be a whole number >= 0, got {self.seed!r}")
        if self.steps is not None:
            _positive("steps", self.steps)
        r = self.radius
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise ValueError(f"--radius must be a whole number >= 0 (0 = full attention), got {r!r}")
        if self.ntk_factor is not None:
            _positive("ntk-factor", self.ntk_factor, float)
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1:
            raise ValueError(f"--strength must be a noise level in (0, 1], got {s!r}")
        schedule.check_shift_rule(self.shift_rule)
        if self.upscale not in UPSCALE_MODES:
            raise ValueError(f"--upscale must be one of {UPSCALE_MODES}, got {self.upscale!r}")

    def replace(self, **changes) -> GenerateConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_args(cls, args, **changes) -> GenerateConfig:
        """The settings of a parsed ``cleardit generate`` (or ``eval model``) command line."""
        values = {name: getattr(args, name) for name in cls.names() if hasattr(args, name)}
        if getattr(args, "full", False):
            values["radius"] = 0
        return cls(**{**values, **changes})
