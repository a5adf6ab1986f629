"""Train the shipped mini text-to-image model: ``python examples/mini_model/train.py``.

The model is the real diffusers ``FluxPipeline`` of :mod:`cleardit.mini.pipeline` (AutoencoderKL,
FluxTransformer2DModel, CLIP + T5 text encoders, the word-level tokenizers of
:mod:`cleardit.mini.vocab`), trained from scratch on the procedural scenes of :mod:`.dataset` in two
stages:

1. **VAE**: reconstruction (L1 + L2) plus a small KL term on 64 px crops of scenes rendered at a
   few sizes (0.5x to 1.5x the base resolution, square and not). The VAE's ``shift_factor`` and
   ``scaling_factor`` are then set from the mean and standard deviation of the latents of
   held-apart base-resolution images (``register_to_config``).
2. **DiT**: the transformer and both text encoders, jointly, with FLUX's rectified-flow objective
   on VAE latents of scenes with their captions: ``x_t = (1 - sigma) x0 + sigma * noise``, target
   ``noise - x0``, ``sigma`` = sigmoid of a normal sample, shifted per resolution exactly as the
   pipeline's scheduler shifts it at inference (``mu`` from the image token count; a much larger
   shift than FLUX's, saved with the model), plus a share of uniform noise levels. Each step draws
   one resolution from a mix (mostly the base 128 px; 192 px, 256 px, 128x256 and 128x512 strips
   both ways), with the batch scaled to keep the pixels per step about constant, so the RoPE
   positions of a 4x-base (512 px) image have been seen along each axis. The first
   ``layout_steps`` are a layout phase instead: sigma = 1 only, on 64 px renders whose position ids
   are stretched onto the base token grid (``stretch_image_ids``), which teaches what goes where at
   a quarter of the cost of base-size images. After it the loss is weighted towards the objects,
   each encoded batch is trained on twice, and the last ``base_tail_steps`` train at the base size
   with some inputs drawn with other shapes than the caption's (``shape_swap``), which teaches the
   model to redraw a round blob as the stated shape. An exponential moving average (EMA) of the
   weights is what gets shipped.

For transformer experiments, ``--vae-from DIR`` skips stage 1 by taking the VAE (and its latent
scaling) of a trained pipeline; ``--set zero_init=true`` starts the transformer as adaLN-Zero.

Then the EMA pipeline is saved with ``save_mini_pipeline`` (plus ``cleardit.json``) and its prompt
adherence is measured on held-out scenes at the base resolution (``cleardit.generate`` +
:mod:`.adherence`); everything goes into ``training_log.json``.

Determinism and resuming: every random choice of step ``s`` (scenes, resolution, crops, noise,
timesteps) is drawn from generators seeded by ``(seed, stage, s)``, never from a running stream, and
the learning rate is a function of the step. A checkpoint (models, optimizer, EMA, step, losses,
RNG states) is written atomically every ``--checkpoint-minutes`` and at each stage end; ``--resume``
continues from it and reaches bit-identical weights to an uninterrupted run. SIGINT / SIGTERM
save a checkpoint at the next step boundary; a SIGKILL loses only the work since the last one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

import cleardit.mini
from cleardit import training
from cleardit.argtypes import nonneg_int, positive_float, positive_int
from cleardit.mini.pipeline import (
    MINI_SIZES,
    SCHEDULER_CONFIG,
    build_mini_pipeline,
    count_parameters,
    mini_model_info,
)
from cleardit.mini.vocab import MAX_TEXT_TOKENS
from cleardit.schedule import shift_mu
from cleardit.seeds import derive_seed

from .dataset import BASIC_SHAPES, ProceduralDataset, Scene, model_range, object_coverage, render
from .train_state import (
    CHECKPOINT_FORMAT,
    atomic_torch_save,
    atomic_write_text,
    check_same_config,
    checkpoint_path,
    load_checkpoint,
    rng_states,
    set_rng_states,
)

DEFAULT_OUTPUT = Path(cleardit.mini.__file__).resolve().parent / "weights"  # the shipped model (package data)
DEFAULT_WORK_DIR = Path("out") / "mini-train"
LOG_FILE = "training_log.json"
LOG_FORMAT = "cleardit-mini-train-log-v1"
STAGES = ("vae", "dit", "export", "done")
_STREAMS = {"vae": 1, "dit": 2, "stats": 3, "eval": 4}
MIXED_PRECISION = ("auto", "no", "bf16")
_DATASET_SIZE = 2**62  # scene index space of a stream: steps * batch never reaches it

# Resolution mix of the DiT stage: (height factor, width factor, weight), factors of the base
# resolution. The strips give RoPE positions up to 4x base along each axis at a strip's cost.
FULL_MIX: tuple[tuple[float, float, float], ...] = (
    (1.0, 1.0, 0.50),
    (1.5, 1.5, 0.14),
    (2.0, 2.0, 0.10),
    (3.0, 3.0, 0.04),
    (1.0, 2.0, 0.05),
    (2.0, 1.0, 0.05),
    (1.0, 4.0, 0.06),
    (4.0, 1.0, 0.06),
)
# Mostly the base size, where the adherence is measured (chosen in round 8: HISTORY.md); the strips
# keep RoPE positions up to 4x the base in training.
BASE_HEAVY_MIX: tuple[tuple[float, float, float], ...] = (
    (1.0, 1.0, 0.70),
    (1.5, 1.5, 0.10),
    (1.0, 2.0, 0.05),
    (2.0, 1.0, 0.05),
    (2.0, 2.0, 0.04),
    (1.0, 4.0, 0.03),
    (4.0, 1.0, 0.03),
)
QUICK_MIX: tuple[tuple[float, float, float], ...] = (
    (1.0, 1.0, 0.6),
    (1.5, 1.5, 0.2),
    (1.0, 2.0, 0.1),
    (2.0, 1.0, 0.1),
)
# The second-phase options switched off (no object weights, data echoing, base-size tail or shape
# swap): what --quick runs, and what the recipes before round 8 had.
PLAIN_SECOND_PHASE = {
    "object_loss_weight": 0.0,
    "latent_reuse": 1,
    "base_tail_steps": 0,
    "shape_swap": 0.0,
    "shape_swap_last_steps": None,
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (compared on ``--resume``).

    Attributes:
        size: the mini size to train ("mini": the shipped model; "tiny": tests).
        seed: seeds the initialisation and every per-step random choice.
        vae_steps, dit_steps: optimizer steps of each stage.
        batch: DiT images per step at the base resolution (fewer at larger sizes: same pixels).
        vae_batch, vae_crop: VAE crops per step and their side in pixels.
        vae_render_scales: scenes for the VAE are rendered at these factors of the base resolution
            (height and width drawn apart, at least ``vae_crop``), then cropped.
        vae_lr, dit_lr: peak AdamW learning rates (linear warm-up, cosine decay to 10%).
        warmup_steps: warm-up steps of each stage (capped at a tenth of the stage).
        kl_weight: weight of the mean per-element KL term of the VAE loss.
        vae_logvar_init: initial bias of the encoder's log-variance outputs: a small posterior
            noise (std e^(-3) ~ 0.05) from the start, so the decoder sees signal rather than unit
            noise and the VAE leaves its "predict the mean colour" plateau sooner.
        dit_mix: (height factor, width factor, weight) of each DiT training resolution.
        train_text_encoders: train CLIP and T5 with the transformer (else they stay random, frozen).
        ema_decay: decay of the weight EMA (warmed up as (1 + s) / (10 + s)).
        grad_clip: global gradient-norm clip.
        logit_mean, logit_std: sigma = sigmoid(N(logit_mean, logit_std)) before the resolution shift.
        stats_images: base-resolution images whose latents set the VAE scaling and shift.
        shift_base, shift_max: the scheduler's ``mu`` (noise-level shift ``exp(mu)``) at 256 and 4,096
            image tokens, saved in the pipeline's scheduler config and used for the training noise
            levels. FLUX.1 uses 0.5 / 1.15; the mini scenes (flat colours, a few shapes) stay
            recognisable under much more noise, so at FLUX's shift the transformer could denoise
            almost every training sample without reading the caption and never learned to.
        sigma_uniform_share: share of DiT samples whose noise level is uniform in (0, 1) instead of
            shifted logit-normal. At the shift above almost no sample falls below sigma = 0.4
            (about 1%), where the last sampling steps run; the uniform share trains those.
        caption_dropout: share of DiT training captions replaced by the empty prompt, so the model
            also learns the unconditional prediction that classifier-free guidance needs.
        true_cfg: the classifier-free guidance scale written to ``cleardit.json`` as the model's
            default (``cleardit generate --true-cfg``) and used by the final adherence check.
        zero_init: start the transformer as DiT's "adaLN-Zero": the modulation layers of every block
            and of the output norm, and the output projection, are zero, so each block starts as
            the identity and the prediction as 0 (diffusers' default init draws them at random).
        layout_steps: the first N DiT steps train only at sigma = 1, on one size
            (``layout_resolution``) and batch (``layout_batch``), at the peak learning rate (the
            cosine decay starts after them). From pure noise everything the transformer knows
            comes from the caption, so these steps teach it what goes where (mixed with the other
            noise levels it did not learn that within a CPU budget: HISTORY.md, rounds 4-7).
        layout_resolution: side in pixels of the layout steps' images; None: the base resolution.
            Smaller is cheaper: their image position ids are stretched onto the base token grid
            (``stretch_image_ids``), so the transformer sees the RoPE phases of a base-size image.
            From pure noise the answer is a blurred scene, which a small render carries (HISTORY.md,
            round 7).
        layout_batch: images per layout step; None: ``batch``. Layout needs large batches where the
            other steps do well with fewer (HISTORY.md, round 5).
        object_loss_weight: after the layout steps, the loss of a token is weighted by 1 + this x the
            share of it (or of its 8 neighbours) that objects cover, normalised over the batch.
            Objects are a small part of each picture, so their shapes barely move an unweighted
            loss (HISTORY.md, round 8). Default 4; 0: unweighted.
        latent_reuse: after the layout steps, each rendered and VAE-encoded batch is trained on for
            this many consecutive steps, each with its own noise and noise levels ("data echoing"):
            the repeats skip the rendering, the VAE encoding and the object weights (HISTORY.md,
            round 9). Default 2; 1: every step draws new scenes.
        base_tail_steps: the last N DiT steps train only at the base resolution (where adherence is
            measured), after the resolution mix of the steps before. Default 700; 0: none.
        shape_swap: after the layout steps, this share of each batch's captioned samples gets a
            noisy input rendered with every object's shape replaced by another (``swapped_scene``)
            whenever its noise level is at least ``shape_swap_min_sigma``, and the target is still
            the true scene (the velocity from the input straight to the captioned picture). In
            training the picture always matches the caption, so the transformer learned to copy
            an object's shape from the picture once sigma is low; in sampling the picture there is
            its own round blob, which it then kept as a circle. In every step of a second phase it
            cost object presence and size (HISTORY.md, rounds 10-11), so the default keeps it to a
            tail (``shape_swap_last_steps``). Default 0.3; 0: off.
        shape_swap_min_sigma: the lowest noise level that gets a swapped input.
        shape_swap_last_steps: swap only in the last N DiT steps, so that the model has learned
            to place and size its objects before it sees inputs that contradict their shapes.
            Default 700 (the base-size tail); None: every step after the layout steps.
        mixed_precision: "bf16" runs the DiT stage's forward passes (the VAE encoder that makes the
            training latents, the text encoders, the transformer) under bfloat16 autocast; weights,
            optimizer, loss and the VAE stage stay fp32. Faster on CPUs with AVX-512 BF16; on CPUs
            without it bf16 is emulated and a step was over 10x slower than fp32 (HISTORY.md,
            rounds 5 and 8). "no": fp32 throughout. "auto" (default): "bf16" where the device
            computes it natively (``native_bf16``), else "no"; the trainer records the
            value it chose, so ``--resume`` on a machine that would choose otherwise is refused.
    """

    size: str = "mini"
    seed: int = 0
    vae_steps: int = 2000
    dit_steps: int = 2500
    batch: int = 32
    vae_batch: int = 8
    vae_crop: int = 64
    vae_render_scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5)
    vae_lr: float = 2e-3
    dit_lr: float = 2e-3
    warmup_steps: int = 100
    kl_weight: float = 1e-4
    vae_logvar_init: float = -6.0
    dit_mix: tuple[tuple[float, float, float], ...] = BASE_HEAVY_MIX
    train_text_encoders: bool = True
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    stats_images: int = 64
    caption_dropout: float = 0.0
    shift_base: float = 2.0
    shift_max: float = 2.7
    sigma_uniform_share: float = 0.4
    true_cfg: float = 1.0
    zero_init: bool = False
    layout_steps: int = 750
    layout_resolution: int | None = 64
    layout_batch: int | None = 64
    object_loss_weight: float = 4.0
    latent_reuse: int = 2
    base_tail_steps: int = 700
    shape_swap: float = 0.3
    shape_swap_min_sigma: float = 0.3
    shape_swap_last_steps: int | None = 700
    mixed_precision: str = "auto"

    def __post_init__(self):
        if self.size not in MINI_SIZES:
            raise ValueError(f"size must be one of {sorted(MINI_SIZES)}, got {self.size!r}")
        for name in ("vae_steps", "dit_steps", "batch", "vae_batch", "vae_crop", "stats_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, got {self.seed!r}")
        factor = self.vae_factor
        if self.vae_crop % factor:
            raise ValueError(f"vae_crop must be a multiple of the VAE factor {factor}, got {self.vae_crop}")
        if not 0 <= self.sigma_uniform_share <= 1:
            raise ValueError(f"sigma_uniform_share must be in [0, 1], got {self.sigma_uniform_share!r}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout!r}")
        if self.true_cfg < 1:
            raise ValueError(f"true_cfg must be >= 1 (1 = no guidance), got {self.true_cfg!r}")
        if self.true_cfg > 1 and self.caption_dropout == 0:
            raise ValueError(
                "true_cfg > 1 needs caption_dropout > 0 (the unconditional prediction is never trained)"
            )
        if isinstance(self.layout_steps, bool) or not isinstance(self.layout_steps, int):
            raise ValueError(f"layout_steps must be a whole number, got {self.layout_steps!r}")
        if not 0 <= self.layout_steps < self.dit_steps:
            raise ValueError(
                f"layout_steps must be in [0, dit_steps = {self.dit_steps}), got {self.layout_steps}: "
                "the recipe needs steps at the other noise levels after the layout steps "
                "(with fewer --dit-steps, also pass --set layout_steps=N)"
            )
        lb = self.layout_batch
        if lb is not None and (isinstance(lb, bool) or not isinstance(lb, int) or lb < 1):
            raise ValueError(f"layout_batch must be a whole number >= 1 (or null: batch), got {lb!r}")
        side = self.layout_resolution
        if side is not None and (
            isinstance(side, bool)
            or not isinstance(side, int)
            or not 0 < side <= self.base
            or side % self.size_factor
        ):
            raise ValueError(
                f"layout_resolution must be a multiple of {self.size_factor} (the size factor) in "
                f"[{self.size_factor}, {self.base}] (the base resolution), got {side!r}"
            )
        if isinstance(self.object_loss_weight, bool) or not self.object_loss_weight >= 0:
            raise ValueError(
                f"object_loss_weight must be >= 0 (0: unweighted), got {self.object_loss_weight!r}"
            )
        reuse, tail = self.latent_reuse, self.base_tail_steps
        if isinstance(reuse, bool) or not isinstance(reuse, int) or reuse < 1:
            raise ValueError(f"latent_reuse must be a whole number >= 1 (1: no reuse), got {reuse!r}")
        if not _is_whole_in(tail, 0, self.dit_steps - self.layout_steps):
            raise ValueError(
                f"base_tail_steps must be a whole number in [0, dit_steps - layout_steps = "
                f"{self.dit_steps - self.layout_steps}], got {tail!r} (with fewer --dit-steps, also pass "
                "--set base_tail_steps=N and --set shape_swap_last_steps=N)"
            )
        if isinstance(self.shape_swap, bool) or not 0 <= self.shape_swap < 1:
            raise ValueError(f"shape_swap must be in [0, 1) (0: off), got {self.shape_swap!r}")
        if isinstance(self.shape_swap_min_sigma, bool) or not 0 < self.shape_swap_min_sigma <= 1:
            raise ValueError(
                f"shape_swap_min_sigma must be in (0, 1]: the target divides by sigma, "
                f"got {self.shape_swap_min_sigma!r}"
            )
        last = self.shape_swap_last_steps
        if last is not None and not _is_whole_in(last, 1, self.dit_steps - self.layout_steps):
            raise ValueError(
                f"shape_swap_last_steps must be a whole number in [1, dit_steps - layout_steps = "
                f"{self.dit_steps - self.layout_steps}] (or null: every step after the layout steps), "
                f"got {last!r} (with fewer --dit-steps, also pass --set shape_swap_last_steps=N)"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )
        if not self.dit_mix or any(w <= 0 or fh <= 0 or fw <= 0 for fh, fw, w in self.dit_mix):
            raise ValueError(
                f"dit_mix needs (height factor, width factor, weight > 0) rows, got {self.dit_mix}"
            )

    @property
    def base(self) -> int:
        return MINI_SIZES[self.size].base_resolution

    @property
    def layout_side(self) -> int:
        """Side of the layout steps' images (``layout_resolution``, else the base resolution)."""
        return self.layout_resolution or self.base

    @property
    def shape_swap_start(self) -> int:
        """The first DiT step that may get swapped inputs (``shape_swap_last_steps``)."""
        last = self.shape_swap_last_steps
        return self.layout_steps if last is None else self.dit_steps - last

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(MINI_SIZES[self.size].vae["block_out_channels"]) - 1)

    @property
    def size_factor(self) -> int:
        """Pixels per transformer token side (VAE factor x the 2x2 packing)."""
        return 2 * self.vae_factor

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, as stored in checkpoints


@dataclass
class RunOptions:
    """How a run is carried out (not part of the weights; free to change on ``--resume``).

    Attributes:
        output: the folder the trained pipeline is saved to.
        work_dir: checkpoints and logs of the run.
        minutes_budget: total wall-clock budget: the VAE stage stops at ``vae_budget_share`` of it,
            the DiT stage ``export_reserve_minutes`` before it (logged as stopped early). The
            default (130) lets the default recipe finish on 2 fp32-only (AVX2) cores, where its
            steps' measured speeds add up to 93-108 minutes; on 2 AVX-512 BF16 cores it took 55.
        checkpoint_minutes: checkpoint interval (also at every stage end and on SIGINT/SIGTERM).
        checkpoint_every: also checkpoint every N steps (tests; 0 = off).
        log_every: steps per point of the loss curve in the log.
        eval_images, eval_steps: held-out base-resolution prompts for the final adherence check and
            their denoising steps (0 images: skip the check).
        progress: tqdm bars and log lines on stderr.
        device: where the models train ("cpu", "cuda", ...). Data and random draws stay on the CPU,
            so the batches are the same everywhere; the float results differ slightly by device.
        vae_from: a trained mini pipeline folder (or its ``vae`` subfolder) whose VAE and latent
            scaling a fresh run takes instead of training its own: the run starts at the DiT stage.
            For recipe experiments on the transformer (saves the VAE stage's ~11 minutes per run);
            the source folder and the sha256 of its weights are recorded in the log.
        render_workers: processes that render the training scenes (0: the trainer's own process).
            Same batches either way; worth it on a GPU, where rendering a large batch in one
            process takes longer than the training step.
    """

    output: Path = DEFAULT_OUTPUT
    work_dir: Path = DEFAULT_WORK_DIR
    minutes_budget: float = 130.0
    vae_budget_share: float = 0.3
    export_reserve_minutes: float = 3.0
    checkpoint_minutes: float = 1.5
    checkpoint_every: int = 0
    log_every: int = 25
    eval_images: int = 50
    eval_steps: int = 20
    progress: bool = True
    device: str = "cpu"
    vae_from: Path | None = None
    render_workers: int = 0


def _is_whole_in(value, low: int, high: int) -> bool:
    """An int (not a bool) in [low, high]: the step-count options' check."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def full_config(**overrides) -> TrainConfig:
    """The configuration of the shipped model (``python examples/mini_model/train.py``)."""
    return TrainConfig(**overrides)


def quick_config(**overrides) -> TrainConfig:
    """``--quick``: a few minutes end to end (an untrained-looking model; for tests and smoke runs)."""
    cfg = dict(
        vae_steps=40, dit_steps=60, batch=8, vae_batch=8, warmup_steps=10, dit_mix=QUICK_MIX, stats_images=16
    )
    cfg.update(PLAIN_SECOND_PHASE)  # a smoke run needs none of the second phase's options
    cfg.update(overrides)
    cfg.setdefault("layout_steps", cfg["dit_steps"] // 3)  # the full recipe's shape, scaled down
    cfg.setdefault("layout_batch", None)
    return TrainConfig(**cfg)


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: a checkpoint was saved; ``--resume`` continues."""


class SimulatedKill(RuntimeError):
    """Raised by the test hook ``kill_after_steps``: the process 'dies' without saving."""


# ----------------------------------------------------------------------------- seeds and data
def heldout_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` scenes of the held-out stream of a run of ``seed`` (never used for training)."""
    ds = ProceduralDataset(n, seed=derive_seed(seed, _STREAMS["eval"]))
    return [ds.scene(i) for i in range(n)]


def _round_to(value: float, factor: int) -> int:
    return max(factor, int(round(value / factor)) * factor)


@dataclass(frozen=True)
class BatchPlan:
    """What step ``step`` of ``stage`` trains on; a function of (config, stage, step) only.

    ``height``/``width``: rendered size; ``indices``: scene indices in the stage's stream;
    ``crops``: VAE crop corners (top, left) of side ``crop``; ``noise_seed``: seeds the step's
    torch generator (VAE posterior samples; DiT noise and timesteps); ``dropped``: batch positions
    whose caption is replaced by the empty prompt (DiT); ``swapped``: batch positions whose noisy
    input shows other shapes (``TrainConfig.shape_swap``).
    """

    stage: str
    step: int
    height: int
    width: int
    indices: tuple[int, ...]
    noise_seed: int
    crop: int | None = None
    crops: tuple[tuple[int, int], ...] | None = None
    dropped: tuple[int, ...] = ()
    swapped: tuple[int, ...] = ()


def vae_render_sizes(cfg: TrainConfig) -> list[int]:
    sizes = {max(cfg.vae_crop, _round_to(cfg.base * s, cfg.vae_factor)) for s in cfg.vae_render_scales}
    return sorted(sizes)


def dit_resolutions(cfg: TrainConfig) -> list[tuple[int, int, float]]:
    """(height, width, probability) of each DiT training resolution."""
    total = sum(w for _, _, w in cfg.dit_mix)
    f = cfg.size_factor
    return [
        (_round_to(cfg.base * fh, f), _round_to(cfg.base * fw, f), w / total) for fh, fw, w in cfg.dit_mix
    ]


def dit_batch_size(cfg: TrainConfig, height: int, width: int) -> int:
    """Images per DiT step at a resolution: ``batch`` at the base size, same pixels elsewhere."""
    return max(1, min(cfg.batch, int(round(cfg.batch * cfg.base * cfg.base / (height * width)))))


def batch_plan(cfg: TrainConfig, stage: str, step: int) -> BatchPlan:
    """The data of one step, a pure function of (``cfg.seed``, ``stage``, ``step``) and the config."""
    if stage not in ("vae", "dit"):
        raise ValueError(f"stage must be 'vae' or 'dit', got {stage!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a whole number >= 0, got {step!r}")
    sid = _STREAMS[stage]
    rng = np.random.default_rng([cfg.seed, sid, step])
    noise_seed = derive_seed(cfg.seed, sid, step, 7)
    if stage == "vae":
        sizes = vae_render_sizes(cfg)
        h, w = (int(sizes[int(i)]) for i in rng.integers(len(sizes), size=2))
        tops = rng.integers(0, h - cfg.vae_crop + 1, size=cfg.vae_batch)
        lefts = rng.integers(0, w - cfg.vae_crop + 1, size=cfg.vae_batch)
        start = step * cfg.vae_batch
        return BatchPlan(
            stage,
            step,
            h,
            w,
            tuple(range(start, start + cfg.vae_batch)),
            noise_seed,
            crop=cfg.vae_crop,
            crops=tuple((int(t), int(le)) for t, le in zip(tops, lefts, strict=True)),
        )
    if step < cfg.layout_steps:  # one size, its own batch (a larger one may reuse later steps' scenes)
        h = w = cfg.layout_side
        n = cfg.layout_batch or cfg.batch
        start = step * n
    else:
        # the first step of this step's reuse group draws the group's scenes, size and dropped captions
        first = step - (step - cfg.layout_steps) % cfg.latent_reuse
        rng = np.random.default_rng([cfg.seed, sid, first])
        res = dit_resolutions(cfg)
        k = int(rng.choice(len(res), p=np.asarray([p for _, _, p in res])))
        h, w, _ = res[k]
        if step >= cfg.dit_steps - cfg.base_tail_steps:
            h = w = cfg.base
        n = dit_batch_size(cfg, h, w)
        start = first * cfg.batch
    dropped = tuple(int(j) for j in np.flatnonzero(rng.random(n) < cfg.caption_dropout))
    swapped = ()
    if step >= cfg.shape_swap_start and cfg.shape_swap > 0:  # drawn last: the fields above stay as they were
        swap = rng.random(n) < cfg.shape_swap
        swapped = tuple(int(j) for j in np.flatnonzero(swap) if j not in dropped)
    indices = tuple(range(start, start + n))
    return BatchPlan(stage, step, h, w, indices, noise_seed, dropped=dropped, swapped=swapped)


def plan_dataset(cfg: TrainConfig, plan: BatchPlan) -> ProceduralDataset:
    """The scene stream of a plan's stage, rendered at the plan's size (``plan.indices`` index it)."""
    return ProceduralDataset(
        _DATASET_SIZE, seed=derive_seed(cfg.seed, _STREAMS[plan.stage]), resolution=(plan.height, plan.width)
    )


def render_batch(
    cfg: TrainConfig, plan: BatchPlan, pool: RenderPool | None = None
) -> tuple[torch.Tensor, list[str]]:
    """(images B x 3 x H x W in [-1, 1] (VAE: the crops), captions) of a plan; ``pool`` renders
    them in worker processes, with the same result."""
    ds = plan_dataset(cfg, plan)
    render = ds.images_and_captions if pool is None else partial(pool.render, ds)
    images, captions = render(plan.indices)
    x = torch.from_numpy(model_range(images))
    if plan.crops is not None:
        x = torch.stack(
            [x[j, :, t : t + plan.crop, le : le + plan.crop] for j, (t, le) in enumerate(plan.crops)]
        )
    return x, ["" if j in plan.dropped else text for j, text in enumerate(captions)]


def swapped_scene(scene: Scene, seed: int) -> Scene:
    """``scene`` with every object's shape replaced by another of the basic shapes, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    others = [[s for s in BASIC_SHAPES if s != obj.shape] for obj in scene.objects]
    return scene.with_shapes([o[int(rng.integers(len(o)))] for o in others])


def render_swapped(cfg: TrainConfig, plan: BatchPlan) -> torch.Tensor:
    """Images (in [-1, 1]) of the plan's ``swapped`` positions, their objects' shapes swapped."""
    ds = plan_dataset(cfg, plan)
    sid = _STREAMS[plan.stage]
    images = [
        render(
            swapped_scene(ds.scene(plan.indices[j]), derive_seed(cfg.seed, sid, plan.indices[j], 13)),
            plan.height,
            plan.width,
        )
        for j in plan.swapped
    ]
    return torch.from_numpy(model_range(np.stack(images)))


def swapped_noising(
    x0: torch.Tensor, x_in: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, use: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target velocity) where samples ``use`` are noised from ``x_in`` instead of ``x0``
    (``shape_swap``): their target is (x_t - x0) / sigma, the velocity whose x0 estimate
    x_t - sigma * v is still ``x0``, the captioned picture. The others get the plain rectified flow."""
    x_in = torch.where(use, x_in, x0)
    xt = (1 - sigma) * x_in + sigma * noise
    return xt, noise - x0 + (1 - sigma) / sigma * (x_in - x0)


def object_token_weights(cfg: TrainConfig, plan: BatchPlan) -> torch.Tensor:
    """B x N loss weights of a DiT batch's tokens, in ``pack_latents`` order: 1 +
    ``cfg.object_loss_weight`` x the largest object coverage of the token and its 8 neighbours
    (shape edges blur into them)."""
    ds = plan_dataset(cfg, plan)
    cover = np.stack([object_coverage(ds.scene(i), plan.height, plan.width) for i in plan.indices])
    tokens = torch.nn.functional.avg_pool2d(torch.from_numpy(cover)[:, None], cfg.size_factor)
    tokens = torch.nn.functional.max_pool2d(tokens, 3, stride=1, padding=1)
    return 1.0 + cfg.object_loss_weight * tokens.flatten(1)


class RenderPool:
    """Worker processes that render training scenes (``RunOptions.render_workers``): on a GPU, one
    process renders a large batch slower than the GPU trains on it.

    Spawned, not forked: the trainer may already hold a CUDA context and OpenMP threads.
    """

    def __init__(self, workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            # Ctrl-C reaches the whole process group; the trainer finishes its step and checkpoints
            initializer=signal.signal,
            initargs=(signal.SIGINT, signal.SIG_IGN),
        )

    def render(self, ds: ProceduralDataset, indices: Sequence[int]) -> tuple[np.ndarray, list[str]]:
        chunks = [c.tolist() for c in np.array_split(np.asarray(indices), self.workers) if len(c)]
        parts = list(self._executor.map(ds.images_and_captions, chunks))  # contiguous chunks, in order
        return np.concatenate([p[0] for p in parts]), [text for p in parts for text in p[1]]

    def close(self) -> None:
        self._executor.shutdown(cancel_futures=True)


# ----------------------------------------------------------------------------- schedules


def learning_rate(peak: float, step: int, total: int, warmup: int, hold: int = 0) -> float:
    """The lab's schedule on ``cleardit.training.learning_rate``: warm-up over ``min(warmup, total //
    10)`` steps (at least 1), ``peak`` until step ``hold``, then cosine down to ``peak / 10``."""
    return training.learning_rate(peak, step, warmup=max(1, min(warmup, total // 10)), total=total, hold=hold)


def timestep_shift_mu(image_seq_len: int, scheduler_config: dict = SCHEDULER_CONFIG) -> float:
    """The pipeline scheduler's ``mu`` for an image token count (FLUX's linear rule)."""
    return shift_mu(scheduler_config, image_seq_len)


def sample_sigmas(
    n: int,
    image_seq_len: int,
    generator: torch.Generator,
    mean=0.0,
    std=1.0,
    scheduler_config: dict = SCHEDULER_CONFIG,
    uniform_share: float = 0.0,
) -> torch.Tensor:
    """Training noise levels: logit-normal, then the exponential time shift the scheduler applies;
    a ``uniform_share`` of them uniform in (0, 1) instead (every level gets trained)."""
    u = torch.sigmoid(torch.randn(n, generator=generator) * std + mean)
    e = math.exp(timestep_shift_mu(image_seq_len, scheduler_config))
    shifted = e / (e + (1 / u.clamp(1e-5, 1 - 1e-5) - 1))
    if uniform_share <= 0:
        return shifted
    pick = torch.rand(n, generator=generator) < uniform_share
    return torch.where(pick, torch.rand(n, generator=generator).clamp(1e-5, 1 - 1e-5), shifted)


# ----------------------------------------------------------------------------- model helpers
def encode_text(pipe, captions: Sequence[str], max_sequence_length: int = MAX_TEXT_TOKENS):
    """(T5 embeddings B x L x d, CLIP pooled B x d) exactly as FluxPipeline.encode_prompt computes
    them, but with gradients (no attention masks, CLIP padded to its tokenizer length)."""
    ids = pipe.tokenizer(
        list(captions),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    ids2 = pipe.tokenizer_2(
        list(captions),
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    device = pipe.text_encoder.device
    pooled = pipe.text_encoder(ids.to(device), output_hidden_states=False).pooler_output
    embeds = pipe.text_encoder_2(ids2.to(device), output_hidden_states=False)[0]
    return embeds, pooled


def pack_latents(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed B x (h/2 * w/2) x 4C, image ids) as FluxPipeline packs latents."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    packed = FluxPipeline._pack_latents(latents, b, c, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    return packed, ids


def stretch_image_ids(
    ids: torch.Tensor, tokens: tuple[int, int], base_tokens: tuple[int, int]
) -> torch.Tensor:
    """Image ids of a ``tokens`` (rows, columns) grid moved onto a ``base_tokens`` grid: token i of n
    goes to the base position of its centre, (i + 0.5) * N / n - 0.5, so a small image covers the
    same RoPE phases, edge to edge, as a base-size one (fractional positions: RoPE takes any)."""
    out = ids.clone()
    for axis, (n, big) in enumerate(zip(tokens, base_tokens, strict=True), start=1):
        f = big / n
        out[:, axis] = ids[:, axis] * f + (f - 1) / 2
    return out


def _dit_modules(pipe, cfg: TrainConfig) -> dict:
    mods = {"transformer": pipe.transformer}
    if cfg.train_text_encoders:
        mods.update(text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    return mods


def _named_params(modules: dict) -> list[tuple[str, torch.nn.Parameter]]:
    return [(f"{m}.{n}", p) for m, mod in modules.items() for n, p in mod.named_parameters()]


MODEL_NAMES = ("vae", "transformer", "text_encoder", "text_encoder_2")


def zero_init_modulation(transformer) -> int:
    """adaLN-Zero (the DiT paper's init): zero the adaptive-norm modulation of every block and of the
    output norm, and the output projection. Returns the number of tensors zeroed."""
    from diffusers.models.normalization import (
        AdaLayerNormContinuous,
        AdaLayerNormZero,
        AdaLayerNormZeroSingle,
    )

    zeroed = 0
    with torch.no_grad():
        for module in transformer.modules():
            if isinstance(module, AdaLayerNormZero | AdaLayerNormZeroSingle | AdaLayerNormContinuous):
                for t in (module.linear.weight, module.linear.bias):
                    if t is not None:
                        t.zero_()
                        zeroed += 1
        for t in (transformer.proj_out.weight, transformer.proj_out.bias):
            t.zero_()
            zeroed += 1
    return zeroed


def load_trained_vae(pipe, folder, size: str) -> dict:
    """Load the VAE of a trained mini pipeline ``folder`` (or its ``vae`` subfolder) into ``pipe``.

    Returns the state entries of a run that starts at the DiT stage with it: ``stage``,
    ``latent_stats`` (the VAE's saved shift and scaling) and ``vae_from`` (path, weights sha256).
    """
    import hashlib

    from diffusers import AutoencoderKL

    folder = Path(folder).resolve()
    vae_dir = folder / "vae" if (folder / "vae" / "config.json").is_file() else folder
    if not (vae_dir / "config.json").is_file():
        raise ValueError(
            f"--vae-from {folder}: no VAE there (expected a trained mini pipeline folder with "
            "vae/config.json, e.g. the output of an earlier run)"
        )
    vae = AutoencoderKL.from_pretrained(vae_dir)
    want, got = pipe.vae.state_dict(), vae.state_dict()
    if want.keys() != got.keys() or any(want[k].shape != got[k].shape for k in want):
        raise ValueError(
            f"--vae-from {folder}: its VAE does not have the {size!r} size's architecture "
            f"(latent channels {vae.config.latent_channels}, blocks {list(vae.config.block_out_channels)}); "
            f"pass a pipeline trained with --size {size}"
        )
    pipe.vae.load_state_dict(got)
    weights = sorted(vae_dir.glob("*.safetensors"))
    digest = hashlib.sha256(b"".join(w.read_bytes() for w in weights)).hexdigest()
    return {
        "stage": "dit",
        "latent_stats": {
            "shift_factor": float(vae.config.shift_factor),
            "scaling_factor": float(vae.config.scaling_factor),
        },
        "vae_from": {"path": str(folder), "sha256": digest},
    }


# ----------------------------------------------------------------------------- trainer
def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: CUDA GPUs that support it, CPUs with AVX-512
    BF16 or AMX. Elsewhere torch emulates it, which made a CPU training step over 10x slower than fp32
    (AMD EPYC with AVX2 only, HISTORY.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_mixed_precision(cfg: TrainConfig, device: str | torch.device) -> TrainConfig:
    """``cfg`` with ``mixed_precision="auto"`` replaced by what ``device`` runs fast."""
    if cfg.mixed_precision != "auto":
        return cfg
    return replace(cfg, mixed_precision="bf16" if native_bf16(device) else "no")


class MiniTrainer:
    """One training run in a work dir. ``run()`` goes through the stages from wherever the work
    dir's checkpoint left off (or from scratch) and returns the log dict."""

    def __init__(self, cfg: TrainConfig, opts: RunOptions | None = None, *, resume: bool = False):
        self.opts = opts or RunOptions()
        self.cfg = resolve_mixed_precision(cfg, self.opts.device)
        self.work_dir = Path(self.opts.work_dir)
        self.resume = resume
        self._stop_signal: str | None = None
        self._steps_this_process = 0
        self.kill_after_steps: int | None = None  # test hook: SimulatedKill after this many steps
        self._pool: RenderPool | None = None
        self._reused: tuple | None = None  # (plan key, latents, swapped-input latents, captions, weights)

    # -- messages --------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.opts.progress:
            print(f"[mini-train] {msg}", file=sys.stderr, flush=True)

    # -- state -----------------------------------------------------------------------------------
    def _fresh_state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "stage": "vae",
            "step": 0,
            "losses": {"vae": [], "dit": []},
            "stage_seconds": {"vae": 0.0, "dit": 0.0, "export": 0.0},
            "elapsed": 0.0,
            "stopped_early": {},
            "latent_stats": None,
            "optimizer": None,
            "ema": None,
            "models": None,
            "resumes": 0,
            "eval": None,
            "vae_from": None,
        }

    def _load_or_init(self) -> dict:
        state = load_checkpoint(self.work_dir)
        if state is None:
            if self.resume:
                self.log(f"--resume: no checkpoint in {self.work_dir} yet, starting from scratch")
            return self._fresh_state()
        if not self.resume:
            raise ValueError(
                f"the work dir {self.work_dir} already holds a checkpoint (stage {state['stage']}, step "
                f"{state['step']}); pass --resume to continue it, or another --work-dir (or delete "
                f"{checkpoint_path(self.work_dir)}) to start over"
            )
        check_same_config(self.work_dir, state["config"], self.cfg.to_dict())
        recorded = (state.get("vae_from") or {}).get("path")
        if self.opts.vae_from is not None and str(Path(self.opts.vae_from).resolve()) != recorded:
            raise ValueError(
                f"--vae-from {self.opts.vae_from} differs from the VAE this run started from "
                f"({recorded or 'trained by the run itself'}); resume without --vae-from, "
                "or use another --work-dir"
            )
        state["resumes"] = int(state.get("resumes", 0)) + 1
        self.log(f"resuming {self.work_dir}: stage {state['stage']}, step {state['step']}")
        return state

    def _save(self, state: dict) -> None:
        state["models"] = {name: getattr(self.pipe, name).state_dict() for name in MODEL_NAMES}
        state["optimizer"] = self.optimizer.state_dict() if self.optimizer is not None else None
        state["ema"] = self.ema
        state["rng"] = rng_states()
        state["elapsed"] = self._elapsed()
        atomic_torch_save(state, checkpoint_path(self.work_dir))
        self._last_save = time.monotonic()
        self._elapsed_base, self._t_start = state["elapsed"], time.monotonic()
        # the log so far, readable while the run goes on
        atomic_write_text(self.work_dir / LOG_FILE, json.dumps(self.summary(state), indent=2) + "\n")

    def _elapsed(self) -> float:
        return self._elapsed_base + (time.monotonic() - self._t_start)

    # -- signals ---------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):  # noqa: ARG002
        if self._stop_signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_signal = signal.Signals(signum).name
        self.log(f"{self._stop_signal}: saving a checkpoint after this step (Ctrl-C again to stop at once)")

    def _install_signals(self):
        old = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread: no handlers, a kill still loses little
            pass
        return old

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> dict:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        state = self._load_or_init()
        self._elapsed_base, self._t_start = float(state["elapsed"]), time.monotonic()
        self._last_save = time.monotonic()
        self.pipe = build_mini_pipeline(self.cfg.size, seed=self.cfg.seed)
        self.optimizer = None
        if self.cfg.mixed_precision == "bf16" and not native_bf16(self.opts.device):
            self.log(
                f"warning: mixed_precision='bf16' on {self.opts.device}, which emulates bfloat16 "
                "(no AVX-512 BF16/AMX): DiT steps may run over 10x slower than with --set "
                '\'mixed_precision="no"\' (or "auto")'
            )
        self.ema = state.get("ema")
        if state["models"] is not None:
            for name in MODEL_NAMES:
                getattr(self.pipe, name).load_state_dict(state["models"][name])
        elif self.opts.vae_from is not None:  # a fresh run on a trained VAE: straight to the DiT stage
            state.update(load_trained_vae(self.pipe, self.opts.vae_from, self.cfg.size))
            self.log(f"VAE taken from {state['vae_from']['path']}; starting at the DiT stage")
        else:  # a fresh run: the VAE's posterior starts narrow (see TrainConfig.vae_logvar_init)
            lc = self.pipe.vae.config.latent_channels
            with torch.no_grad():
                self.pipe.vae.encoder.conv_out.bias[lc:] = self.cfg.vae_logvar_init
        if state["models"] is None and self.cfg.zero_init:
            zero_init_modulation(self.pipe.transformer)
        # the noise-level shift is part of the model: training samples and the saved scheduler agree
        self.pipe.scheduler.register_to_config(base_shift=self.cfg.shift_base, max_shift=self.cfg.shift_max)
        self.device = torch.device(self.opts.device)
        self.pipe.to(self.device)
        if self.ema is not None:
            self.ema = {n: t.to(self.device) for n, t in self.ema.items()}
        if "rng" in state:
            set_rng_states(state["rng"])
        else:
            torch.manual_seed(self.cfg.seed)
            np.random.seed(self.cfg.seed % 2**32)
        if state["stage"] == "done" and not (Path(self.opts.output) / "model_index.json").is_file():
            self.log(f"the run is finished but {self.opts.output} holds no pipeline: exporting again")
            state["stage"] = "export"
        old = self._install_signals()
        self._pool = RenderPool(self.opts.render_workers) if self.opts.render_workers > 0 else None
        try:
            while state["stage"] != "done":
                if state["stage"] == "vae":
                    self._train_stage(state, "vae")
                elif state["stage"] == "dit":
                    self._train_stage(state, "dit")
                elif state["stage"] == "export":
                    self._export(state)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            if self._pool is not None:
                self._pool.close()
        log = self.summary(state)
        return log

    # -- training stages -------------------------------------------------------------------------
    def _setup_stage(self, state: dict, stage: str) -> tuple[list, list]:
        cfg = self.cfg
        for name in MODEL_NAMES:
            getattr(self.pipe, name).eval().requires_grad_(False)
        if stage == "vae":
            modules = {"vae": self.pipe.vae}
            lr, wd = cfg.vae_lr, 0.0
        else:
            modules = _dit_modules(self.pipe, cfg)
            lr, wd = cfg.dit_lr, 0.01
            # NHWC convolutions: the frozen VAE encoder (run on every DiT batch) took 25% less time
            # on 2 CPU cores (in VAE training, forward + backward, they were ~10% slower)
            self.pipe.vae.to(memory_format=torch.channels_last)
        for mod in modules.values():
            mod.train().requires_grad_(True)
        named = _named_params(modules)
        params = [p for _, p in named]
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=wd, eps=1e-8)
        if state["optimizer"] is not None and state["step"] > 0:
            self.optimizer.load_state_dict(state["optimizer"])
        if stage == "dit" and self.ema is None:
            self.ema = {n: p.detach().clone() for n, p in named}
        return named, params

    def _train_stage(self, state: dict, stage: str) -> None:
        from tqdm.auto import tqdm

        cfg, opts = self.cfg, self.opts
        total = cfg.vae_steps if stage == "vae" else cfg.dit_steps
        peak = cfg.vae_lr if stage == "vae" else cfg.dit_lr
        named, params = self._setup_stage(state, stage)
        self._stats = state["latent_stats"]
        budget = opts.minutes_budget * 60
        deadline = (
            budget * opts.vae_budget_share if stage == "vae" else budget - opts.export_reserve_minutes * 60
        )
        losses = state["losses"][stage]
        step_fn = self._vae_step if stage == "vae" else self._dit_step
        bar = tqdm(
            total=total,
            initial=state["step"],
            desc="VAE" if stage == "vae" else "DiT",
            disable=not opts.progress,
            dynamic_ncols=True,
            leave=True,
        )
        t_stage = time.monotonic()
        seconds_base = state["stage_seconds"][stage]
        try:
            while state["step"] < total:
                step = state["step"]
                if self._elapsed() >= deadline:
                    state["stopped_early"][stage] = {
                        "step": step,
                        "planned": total,
                        "reason": f"time budget ({opts.minutes_budget:g} min) reached",
                    }
                    self.log(f"{stage}: time budget reached at step {step} of {total}; ending the stage")
                    break
                hold = cfg.layout_steps if stage == "dit" else 0
                lr = learning_rate(peak, step, total, cfg.warmup_steps, hold)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                plan = batch_plan(cfg, stage, step)
                loss = step_fn(plan)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                self.optimizer.step()
                if stage == "dit":
                    decay = min(cfg.ema_decay, (1 + step) / (10 + step))
                    with torch.no_grad():
                        for n, p in named:
                            self.ema[n].lerp_(p.detach(), 1 - decay)
                losses.append(float(loss.detach()))
                state["step"] = step + 1
                state["stage_seconds"][stage] = seconds_base + time.monotonic() - t_stage
                self._steps_this_process += 1
                bar.update(1)
                recent = losses[-20:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", res=f"{plan.height}x{plan.width}")
                due = time.monotonic() - self._last_save >= opts.checkpoint_minutes * 60
                if opts.checkpoint_every and state["step"] % opts.checkpoint_every == 0:
                    due = True
                if self._stop_signal is not None:
                    self._save(state)
                    raise TrainingInterrupted(
                        f"{self._stop_signal}: checkpoint saved at {stage} step {state['step']} in "
                        f"{self.work_dir}; run again with --resume to continue"
                    )
                if due:
                    self._save(state)
                if self.kill_after_steps is not None and self._steps_this_process >= self.kill_after_steps:
                    raise SimulatedKill(f"simulated kill after {self._steps_this_process} steps")
        finally:
            bar.close()
        # stage end
        for mod in ("vae", "transformer", "text_encoder", "text_encoder_2"):
            getattr(self.pipe, mod).eval().requires_grad_(False)
        self.optimizer = None
        if stage == "vae":
            state["latent_stats"] = self._latent_stats()
            self.log(
                f"VAE done: scaling_factor {state['latent_stats']['scaling_factor']:.4f}, "
                f"shift_factor {state['latent_stats']['shift_factor']:.4f}"
            )
            state["stage"], state["step"], state["optimizer"] = "dit", 0, None
        else:
            state["stage"], state["step"], state["optimizer"] = "export", 0, None
        self._save(state)

    def _vae_step(self, plan: BatchPlan) -> torch.Tensor:
        x, _ = render_batch(self.cfg, plan, self._pool)
        x = x.to(self.device)
        g = torch.Generator().manual_seed(plan.noise_seed)
        post = self.pipe.vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(self.device)
        rec = self.pipe.vae.decode(z).sample
        err = rec - x
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        return err.abs().mean() + err.pow(2).mean() + self.cfg.kl_weight * kl

    def _autocast(self):
        """The DiT stage's forward passes under ``TrainConfig.mixed_precision``."""
        bf16 = self.cfg.mixed_precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def _latents(self, x: torch.Tensor, stats: dict) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            x = x.contiguous(memory_format=torch.channels_last)
            z = self.pipe.vae.encode(x).latent_dist.mode().float()
        return (z - stats["shift_factor"]) * stats["scaling_factor"]

    def _dit_step(self, plan: BatchPlan) -> torch.Tensor:
        cfg = self.cfg
        layout = plan.step < cfg.layout_steps
        key = (plan.indices, plan.height, plan.width, plan.dropped, plan.swapped)
        if self._reused is not None and self._reused[0] == key:  # TrainConfig.latent_reuse
            x0, x_in, captions, weights = self._reused[1:]
        else:
            x, captions = render_batch(cfg, plan, self._pool)
            x0 = self._latents(x.to(self.device), self._stats)
            x_in = x0
            if plan.swapped:
                x_in = x0.clone()
                x_in[list(plan.swapped)] = self._latents(
                    render_swapped(cfg, plan).to(self.device), self._stats
                )
            weighted = not layout and cfg.object_loss_weight > 0
            weights = object_token_weights(cfg, plan).to(self.device) if weighted else None
            self._reused = (key, x0, x_in, captions, weights) if cfg.latent_reuse > 1 else None
        g = torch.Generator().manual_seed(plan.noise_seed)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        b, _, h, w = x0.shape
        seq = (h // 2) * (w // 2)
        if layout:
            sigma = torch.ones(b)
        else:
            sigma = sample_sigmas(
                b, seq, g, cfg.logit_mean, cfg.logit_std, self.pipe.scheduler.config, cfg.sigma_uniform_share
            )
        sigma = sigma.view(b, 1, 1, 1).to(self.device)
        if plan.swapped:
            swapped = torch.zeros(b, 1, 1, 1, dtype=torch.bool, device=self.device)
            swapped[list(plan.swapped)] = True
            xt, velocity = swapped_noising(
                x0, x_in, noise, sigma, swapped & (sigma >= cfg.shape_swap_min_sigma)
            )
        else:
            xt, velocity = (1 - sigma) * x0 + sigma * noise, noise - x0
        packed, img_ids = pack_latents(xt)
        target, _ = pack_latents(velocity)
        if layout and (plan.height, plan.width) != (cfg.base, cfg.base):
            base_tokens = cfg.base // cfg.size_factor
            img_ids = stretch_image_ids(img_ids, (h // 2, w // 2), (base_tokens, base_tokens))
        tr = self.pipe.transformer
        guidance = torch.full((b,), 3.5, device=self.device) if tr.config.guidance_embeds else None
        with self._autocast():
            embeds, pooled = encode_text(self.pipe, captions)
            pred = tr(
                hidden_states=packed,
                timestep=sigma.view(b),
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=torch.zeros(embeds.shape[1], 3, device=self.device),
                img_ids=img_ids,
                return_dict=False,
            )[0]
        err = (pred.float() - target).pow(2)
        if weights is None:
            return err.mean()
        return (weights * err.mean(-1)).sum() / weights.sum()

    def _latent_stats(self) -> dict:
        """shift = mean and scaling = 1 / std of the VAE latents (posterior means) of base-size scenes."""
        cfg = self.cfg
        ds = ProceduralDataset(
            cfg.stats_images, seed=derive_seed(cfg.seed, _STREAMS["stats"]), resolution=cfg.base
        )
        zs = []
        with torch.no_grad():
            for start in range(0, len(ds), 16):
                x = torch.stack([ds[i][0] for i in range(start, min(start + 16, len(ds)))]).to(self.device)
                zs.append(self.pipe.vae.encode(x).latent_dist.mode().double().cpu())
        z = torch.cat(zs)
        std = float(z.std())
        return {"shift_factor": float(z.mean()), "scaling_factor": 1.0 / max(std, 1e-6)}

    # -- export and evaluation -------------------------------------------------------------------
    def _export(self, state: dict) -> None:
        t0 = time.monotonic()
        pipe = self.pipe
        stats = state["latent_stats"]
        if self.ema is not None:  # the shipped weights are the EMA
            modules = _dit_modules(pipe, self.cfg)
            with torch.no_grad():
                for n, p in _named_params(modules):
                    p.copy_(self.ema[n])
        pipe.vae.register_to_config(
            scaling_factor=stats["scaling_factor"], shift_factor=stats["shift_factor"]
        )
        for name in MODEL_NAMES:
            getattr(pipe, name).eval().requires_grad_(False)
        pipe.vae.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
        output = Path(self.opts.output)
        save_pipeline_atomically(
            pipe, output, self.cfg.size, progress=self.opts.progress, true_cfg=self.cfg.true_cfg
        )
        self.log(f"saved the pipeline to {output}")
        state["eval"] = self.evaluate(output, state) if self.opts.eval_images > 0 else None
        state["stage_seconds"]["export"] = state["stage_seconds"].get("export", 0.0) + time.monotonic() - t0
        state["stage"] = "done"
        state["elapsed"] = self._elapsed()
        log = self.summary(state)
        atomic_write_text(output / LOG_FILE, json.dumps(log, indent=2) + "\n")
        self._save(state)

    def evaluate(self, folder: Path, state: dict) -> dict:
        """Adherence of generated base-size images of held-out scenes (plus the VAE round trip)."""
        from cleardit.pipelines import generate

        from .adherence import adherence
        from .dataset import BASIC_SHAPES

        cfg, n = self.cfg, self.opts.eval_images
        scenes = heldout_scenes(n, cfg.seed)
        t0 = time.monotonic()
        result = generate(
            [s.caption() for s in scenes],
            model=str(folder),
            radius=0,
            steps=self.opts.eval_steps,
            seed=cfg.seed,
            device=str(self.device),
            dtype="fp32",
            quiet=True,
        )
        gen_seconds = time.monotonic() - t0
        gen = summarize_adherence(
            [adherence(im, s, shapes=BASIC_SHAPES) for im, s in zip(result.images, scenes, strict=True)]
        )
        # the VAE alone: encode + decode the rendered scenes (an upper bound for the model)
        from .dataset import render

        with torch.no_grad():
            rt = []
            for s in scenes:
                img = render(s, cfg.base)
                x = torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)[None]
                z = self.pipe.vae.encode(x.to(self.device)).latent_dist.mode()
                rec = self.pipe.vae.decode(z).sample[0].clamp(-1, 1).cpu()
                rt.append(adherence(rec, s, shapes=BASIC_SHAPES))
        vae = summarize_adherence(rt)
        out = {
            "images": n,
            "steps": self.opts.eval_steps,
            "resolution": [cfg.base, cfg.base],
            "attention": "full",
            "held_out_stream": "derive_seed(seed, 4), scenes 0..n-1; generator seeds seed + i",
            "adherence_percent": gen["percent"],
            "strict_percent": gen["strict_percent"],
            "by_fact_percent": gen["by_fact_percent"],
            "by_object_size_percent": gen["by_object_size_percent"],
            "vae_roundtrip_percent": vae["percent"],
            "vae_roundtrip_strict_percent": vae["strict_percent"],
            "seconds": gen_seconds,
        }
        self.log(
            f"adherence at {cfg.base}x{cfg.base} on {n} held-out prompts: {gen['percent']:.1f}% of facts, "
            f"{gen['strict_percent']:.1f}% of images fully right (VAE round trip: {vae['percent']:.1f}%)"
        )
        return out

    # -- log ---------------------------------------------------------------------------------------
    def summary(self, state: dict) -> dict:
        """The training log (written to ``training_log.json`` in the output folder and the work dir)."""
        import diffusers

        opts = self.opts
        stages = {}
        for stage in ("vae", "dit"):
            losses = state["losses"][stage]
            every = max(1, opts.log_every)
            curve = [
                [min(i + every, len(losses)), float(np.mean(losses[i : i + every]))]
                for i in range(0, len(losses), every)
            ]
            secs = state["stage_seconds"].get(stage, 0.0)
            stages[stage] = {
                "steps_done": len(losses),
                "planned_steps": self.cfg.vae_steps if stage == "vae" else self.cfg.dit_steps,
                "seconds": secs,
                "steps_per_second": len(losses) / secs if secs > 0 else None,
                "stopped_early": state["stopped_early"].get(stage),
                "loss_every": every,
                "loss_curve": curve,
            }
        output = Path(opts.output)
        st_bytes = sum(p.stat().st_size for p in output.rglob("*.safetensors")) if output.is_dir() else None
        log = {
            "format": LOG_FORMAT,
            "config": self.cfg.to_dict(),
            "options": {
                "minutes_budget": opts.minutes_budget,
                "checkpoint_minutes": opts.checkpoint_minutes,
                "eval_images": opts.eval_images,
                "eval_steps": opts.eval_steps,
                "output": str(output),
                "work_dir": str(self.work_dir),
            },
            "environment": {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "torch_threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            },
            "stages": stages,
            "latent_stats": state["latent_stats"],
            "total_seconds": float(state["elapsed"]) if state["stage"] == "done" else self._elapsed(),
            "export_seconds": state["stage_seconds"].get("export", 0.0),
            "resumes": state.get("resumes", 0),
            "vae_from": state.get("vae_from"),
            "parameters": count_parameters(self.pipe),
            "safetensors_bytes": st_bytes,
            "eval": state.get("eval"),
        }
        return log


def summarize_adherence(results) -> dict:
    """Percent of facts satisfied, of images with every fact right, per kind of fact, and the
    object facts (present, shape, size) of small and of large objects apart."""
    object_kinds = ("object present", "shape", "size")
    by_size = {z: {k: [] for k in object_kinds} for z in ("small", "large")}
    kinds: dict[str, list[bool]] = {
        k: [] for k in (*object_kinds, "background colours", "background pattern")
    }
    for r in results:
        objs, ((_, colours), (_, pattern)) = r.facts[:-2], r.facts[-2:]
        for facts in zip(objs[0::3], objs[1::3], objs[2::3], strict=True):
            stated = by_size[facts[2][0].rsplit(" ", 1)[1]]  # "the red object ... is small"
            for kind, (_, ok) in zip(object_kinds, facts, strict=True):
                kinds[kind].append(ok)
                stated[kind].append(ok)
        kinds["background colours"].append(colours)
        kinds["background pattern"].append(pattern)

    def percents(groups: dict) -> dict:
        return {k: 100.0 * float(np.mean(v)) if v else None for k, v in groups.items()}

    return {
        "percent": 100.0 * float(np.mean([r.score for r in results])) if results else float("nan"),
        "strict_percent": 100.0 * float(np.mean([r.all_ok for r in results])) if results else float("nan"),
        "by_fact_percent": percents(kinds),
        "by_object_size_percent": {z: percents(groups) for z, groups in by_size.items()},
    }


def save_pipeline_atomically(
    pipe, output: Path, size: str, *, progress: bool = True, true_cfg: float | None = None
) -> Path:
    """``save_mini_pipeline`` into a temporary sibling folder, then swap it in for ``output``.

    ``true_cfg`` (> 1) becomes the model's default classifier-free guidance scale in cleardit.json.

    An existing ``output`` must be a pipeline folder (``model_index.json``) or empty: anything else
    is refused rather than deleted.
    """
    from cleardit.mini.pipeline import save_mini_pipeline

    output = Path(output)
    if output.exists():
        if not output.is_dir():
            raise ValueError(f"--output {output} exists and is not a folder")
        if any(output.iterdir()) and not (output / "model_index.json").is_file():
            raise ValueError(
                f"--output {output} is a non-empty folder without model_index.json; refusing to replace it "
                "(pass an empty or new folder, or an earlier output of this trainer)"
            )
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    bars = [m for m in (dlog, tlog) if not progress and m.is_progress_bar_enabled()]
    for m in bars:
        m.disable_progress_bar()
    try:
        extra = {"default_true_cfg": true_cfg} if true_cfg is not None and true_cfg > 1 else {}
        save_mini_pipeline(pipe, tmp, mini_model_info(size, name=f"cleardit-{size}", **extra))
    finally:
        for m in bars:
            m.enable_progress_bar()
    if output.exists():
        os.replace(output, old)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)
    return output


def train(
    cfg: TrainConfig | None = None,
    opts: RunOptions | None = None,
    *,
    resume: bool = False,
    kill_after_steps: int | None = None,
) -> dict:
    """Run (or resume) a training run; returns the log dict. See the module docstring."""
    trainer = MiniTrainer(cfg or full_config(), opts, resume=resume)
    trainer.kill_after_steps = kill_after_steps
    return trainer.run()


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python examples/mini_model/train.py",
        description="Train the cleardit mini text-to-image model (a diffusers FluxPipeline) on procedural "
        "scenes: VAE, then transformer + text encoders; resumable, deterministic.",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"pipeline folder to write (default {DEFAULT_OUTPUT})",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help=f"checkpoints and logs (default {DEFAULT_WORK_DIR}; --quick: {DEFAULT_WORK_DIR}-quick)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --work-dir (starts fresh if it has none)"
    )
    p.add_argument(
        "--quick", action="store_true", help="a few minutes end to end: tiny step counts (smoke tests)"
    )
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument(
        "--minutes-budget",
        type=positive_float,
        default=None,
        help=f"wall-clock budget in minutes (default {RunOptions.minutes_budget:g}; --quick: 10)",
    )
    p.add_argument("--vae-steps", type=positive_int, default=None)
    p.add_argument("--dit-steps", type=positive_int, default=None)
    p.add_argument(
        "--batch", type=positive_int, default=None, help="DiT images per step at the base resolution"
    )
    p.add_argument("--vae-batch", type=positive_int, default=None, help="VAE crops per step")
    p.add_argument("--size", choices=sorted(MINI_SIZES), default="mini", help="architecture (tiny: tests)")
    p.add_argument("--checkpoint-minutes", type=positive_float, default=1.5)
    p.add_argument(
        "--eval-images",
        type=nonneg_int,
        default=None,
        help="held-out prompts for the final adherence check (default 50; --quick: 4; 0: skip)",
    )
    p.add_argument(
        "--eval-steps",
        type=positive_int,
        default=None,
        help="denoising steps of the check (default 20; --quick: 8)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch intra-op threads (default: torch's choice, one per core). Resume with the same count: "
        "other counts change float rounding, so the weights are no longer bit-identical",
    )
    p.add_argument("--device", default="cpu", help="where the models train: cpu (default), cuda, cuda:N")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any TrainConfig field, VALUE in JSON (e.g. --set dit_lr=1e-3 --set "
        "caption_dropout=0.2); for experiments: the defaults are the shipped model's recipe",
    )
    p.add_argument(
        "--vae-from",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="start at the DiT stage with the VAE of this trained mini pipeline (e.g. the shipped "
        "src/cleardit/mini/weights) instead of training one: for transformer recipe experiments",
    )
    p.add_argument(
        "--render-workers",
        type=nonneg_int,
        default=0,
        help="processes that render the training scenes (default 0: none); same batches, for GPU runs",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    return p


def parse_overrides(items: Sequence[str]) -> dict:
    """``["dit_lr=1e-3", "dit_mix=[[1,1,1]]"]`` -> TrainConfig keyword overrides (JSON values)."""
    from dataclasses import fields

    known = {f.name for f in fields(TrainConfig)}
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(known)}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"--set {item!r}: VALUE must be JSON (a number, true/false, a list)") from None
        if isinstance(value, list):  # dit_mix and other tuples, as the dataclass stores them
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        out[key] = value
    return out


def config_from_args(args) -> tuple[TrainConfig, RunOptions]:
    overrides = {
        k: v
        for k, v in dict(
            size=args.size,
            seed=args.seed,
            vae_steps=args.vae_steps,
            dit_steps=args.dit_steps,
            batch=args.batch,
            vae_batch=args.vae_batch,
        ).items()
        if v is not None
    }
    overrides.update(parse_overrides(args.set))
    cfg = quick_config(**overrides) if args.quick else full_config(**overrides)
    try:
        torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:N)") from None
    work_dir = args.work_dir or (Path(f"{DEFAULT_WORK_DIR}-quick") if args.quick else DEFAULT_WORK_DIR)
    opts = RunOptions(
        output=args.output,
        work_dir=work_dir,
        minutes_budget=args.minutes_budget or (10.0 if args.quick else RunOptions.minutes_budget),
        export_reserve_minutes=1.0 if args.quick else 3.0,
        checkpoint_minutes=args.checkpoint_minutes,
        eval_images=args.eval_images if args.eval_images is not None else (4 if args.quick else 50),
        eval_steps=args.eval_steps or (8 if args.quick else 20),
        progress=not args.quiet,
        device=args.device,
        vae_from=args.vae_from,
        render_workers=args.render_workers,
    )
    return cfg, opts


def format_summary(log: dict) -> str:
    lines = []
    for stage in ("vae", "dit"):
        s = log["stages"][stage]
        if stage == "vae" and log.get("vae_from"):
            lines.append(f"VAE: taken from {log['vae_from']['path']} (not trained by this run)")
            continue
        last = s["loss_curve"][-1][1] if s["loss_curve"] else float("nan")
        rate = f"{s['steps_per_second']:.3f} steps/s" if s["steps_per_second"] else "-"
        early = " (stopped early by the time budget)" if s["stopped_early"] else ""
        lines.append(
            f"{stage.upper()}: {s['steps_done']}/{s['planned_steps']} steps in {s['seconds'] / 60:.1f} min "
            f"({rate}), final loss {last:.4f}{early}"
        )
    mib = (log["safetensors_bytes"] or 0) / 2**20
    lines.append(f"total {log['total_seconds'] / 60:.1f} min; safetensors {mib:.1f} MiB")
    ev = log.get("eval")
    if ev:
        lines.append(
            f"adherence at {ev['resolution'][0]}x{ev['resolution'][1]} ({ev['images']} held-out prompts, "
            f"{ev['steps']} steps): {ev['adherence_percent']:.1f}% of facts, {ev['strict_percent']:.1f}% "
            f"of images fully right; VAE round trip {ev['vae_roundtrip_percent']:.1f}%"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg, opts = config_from_args(args)
        log = train(cfg, opts, resume=args.resume)
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_text(Path(opts.work_dir) / LOG_FILE, json.dumps(log, indent=2) + "\n")
    print(format_summary(log))
    print(f"model: {opts.output}; log: {Path(opts.output) / LOG_FILE}")
    return 0


def reexec_with_passive_openmp(script: str | os.PathLike) -> None:
    """Restart ``python SCRIPT ARGS`` with ``OMP_WAIT_POLICY=PASSIVE`` unless it is set.

    torch's CPU build runs its thread pool on OpenMP, whose idle threads spin by default. When other
    processes keep the cores busy, that spinning made a training step up to 5x slower in trials
    (idle threads steal the cores the working ones need); passive waiting costs nothing measurable
    on a quiet machine. OpenMP reads the variable when torch is first imported, hence the restart.
    Set OMP_WAIT_POLICY yourself (e.g. ACTIVE) to keep your own choice.
    """
    if os.environ.get("OMP_WAIT_POLICY"):
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, os.fspath(script), *sys.argv[1:]], env)
