"""``cleardit.generate``: text-to-image at any resolution with a supported pipeline and CLEAR attention.

One call loads the model offline (:mod:`.loading`), linearizes its transformer for the target-size
denoising (radius 0 = the original attention), optionally runs the two-stage high-resolution recipe
(:mod:`.highres`), optionally runs full attention on the same seeds for a side-by-side comparison
(timings, attention FLOPs, PSNR, MS-SSIM), and writes PNGs that carry every generation parameter in
their text metadata.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import schedule
from ..atomic import atomic_write_bytes, check_writable
from ..attention.flops import format_flops
from ..config import ClearConfig
from ..image_grid import image_grid
from ..image_metrics import ms_ssim_images, psnr_images
from ..models import NotSupportedError
from ..prompt_list import prompt_list
from . import highres as hr
from .config import GenerateConfig
from .loading import ModelInfo
from .plan import RunPlan, plan_run


# ----------------------------------------------------------------------------- results
@dataclass
class CompareStats:
    """Full attention vs CLEAR on the same seeds.

    Attributes:
        clear_seconds, full_seconds: generation time of each run (all prompts; a shared high-res
            stage 1 counts in both).
        speedup: full_seconds / clear_seconds.
        flops_clear, flops_full: attention FLOPs of one transformer forward (all attention layers,
            one image) at the target size, counted by cleardit.attention.attention_flops.
        psnr, ms_ssim: per image (dB; MS-SSIM None when torchmetrics is missing).
        ms_ssim_note: how MS-SSIM was computed (scales/window adapted to small images) or why not.
        paths: side-by-side images written.
    """

    clear_seconds: float
    full_seconds: float
    speedup: float
    flops_clear: int
    flops_full: int
    psnr: list[float] = field(default_factory=list)
    ms_ssim: list[float] | None = None
    ms_ssim_note: str | None = None
    paths: list[Path] = field(default_factory=list)

    def line(self) -> str:
        fewer = 100 * (1 - self.flops_clear / self.flops_full) if self.flops_full else 0.0
        psnr = _mean(self.psnr)
        text = (
            f"compare: full attention {self.full_seconds:.2f} s vs CLEAR {self.clear_seconds:.2f} s = "
            f"{self.speedup:.2f}x speedup; attention FLOPs per step {format_flops(self.flops_full)} vs "
            f"{format_flops(self.flops_clear)} ({fewer:.1f}% fewer); PSNR {_fmt_db(psnr)}"
        )
        if self.ms_ssim is not None:
            text += f", MS-SSIM {_mean(self.ms_ssim):.4f}"
        else:
            text += " (MS-SSIM skipped)"
        return text


@dataclass
class GenerationResult:
    """What ``generate`` made.

    Attributes:
        images: the generated PIL images (CLEAR, or full attention with radius 0), prompt-major.
        paths: where they were written (empty without ``output``).
        metadata: per image, the parameters written into its PNG.
        seconds: generation time of the main images (model loading excluded; compare runs excluded).
        steps: denoising steps run for the main images (all prompts, both high-res stages).
        seconds_per_step: seconds / steps.
        peak_memory: bytes (CUDA: torch.cuda.max_memory_allocated; CPU: the process's max RSS).
        memory_source: "cuda max allocated" or "cpu max rss".
        load_seconds: model loading time.
        attention_flops: attention FLOPs of one transformer forward of the main images at the
            target size (all attention layers, one image).
        full_images, full_paths: the full-attention images of ``compare``.
        base_images, base_paths: ``highres``'s stage-1 images (base size, full attention).
        compare: CompareStats of ``compare``.
        summary: the one-line summary (plus the compare line).
    """

    images: list
    paths: list[Path]
    metadata: list[dict]
    seconds: float
    steps: int
    seconds_per_step: float
    peak_memory: int
    memory_source: str
    load_seconds: float = 0.0
    attention_flops: int = 0
    full_images: list | None = None
    full_paths: list[Path] = field(default_factory=list)
    base_images: list | None = None
    base_paths: list[Path] = field(default_factory=list)
    compare: CompareStats | None = None
    summary: str = ""


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _fmt_db(value: float) -> str:
    return "inf dB (identical)" if math.isinf(value) else f"{value:.2f} dB"


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- attention modes
class AttentionModes:
    """Switches a transformer between its original attention and CLEAR, per denoising run.

    CLEAR weights (``load_weights``) replace the image-stream projections, so the original tensors are
    kept aside and swapped back whenever full attention runs (high-res stage 1, compare runs): the
    fine-tuned projections never leak into a full-attention image. This costs one extra copy of
    those projections (FLUX.1-dev in bf16: about 4.3 GB) only when a weights file is used.

    ``install(transformer, config=...) -> handle`` puts CLEAR in (default ``cleardit.linearize``;
    a patch-parallel rank passes its ``parallelize``).
    """

    def __init__(self, transformer, config: ClearConfig | None, weights: Path | None, install=None):
        self.transformer = transformer
        self.config = config
        self.weights = weights
        self.install = install
        self._original: dict[str, torch.Tensor] | None = None
        self._clear: dict[str, torch.Tensor] | None = None

    @contextlib.contextmanager
    def clear(self) -> Iterator[None]:
        from ..models import adapter_for, linearize
        from ..weights import load_weights

        handle = (self.install or linearize)(self.transformer, config=self.config)
        params = dict(handle.named_clear_parameters())
        try:
            if self.weights is not None:
                if self._clear is None:
                    if self._original is None:
                        self._original = {
                            k: p.data for k, p in params.items() if not k.endswith("spatial_weight")
                        }
                    for k in self._original:
                        params[k].data = params[k].data.clone()
                    load_weights(self.transformer, self.weights)
                    self._clear = {k: p.data for k, p in params.items()}
                else:
                    for k, p in params.items():
                        p.data = self._clear[k]
                    adapter_for(self.transformer).sync_fused_projections(self.transformer)
            yield
        finally:
            if self._original is not None:
                for k, t in self._original.items():
                    params[k].data = t
                adapter_for(self.transformer).sync_fused_projections(self.transformer)  # fused copies too
            handle.restore()


# ----------------------------------------------------------------------------- images and metrics
def save_png(image, path: str | os.PathLike, metadata: dict) -> Path:
    """Write ``image`` as PNG, ``metadata`` as text chunks (one per key + ``parameters`` JSON), atomically."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, "none" if value is None else str(value))
    info.add_text("parameters", json.dumps(metadata, default=str))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return atomic_write_bytes(path, buf.getvalue())


def _slug(text: str, limit: int = 40) -> str:
    slug = "-".join(re.findall(r"[a-z0-9]+", text.lower()))[:limit].strip("-")
    return slug or "image"


def output_paths(
    output: str | os.PathLike, prompts: list[str], batch: int, suffix: str = ".png"
) -> list[Path]:
    """Main file of each image (video: ``suffix`` ".mp4"): ``output`` itself if it names a ``suffix``
    file (one image only), else ``output/NNNNN-<prompt><suffix>`` numbered after the highest number
    already in the folder."""
    output = Path(output)
    n = len(prompts) * batch
    kind = "video" if suffix == ".mp4" else "image"
    if output.suffix.lower() == suffix:
        if n != 1:
            raise ValueError(
                f"--output {output} names one {suffix} file but {n} {kind}s will be made "
                f"({len(prompts)} prompt(s) x batch {batch}); pass a folder instead"
            )
        return [output]
    if output.exists() and not output.is_dir():
        raise ValueError(
            f"--output {output} exists and is not a folder; pass a folder or a {suffix} file name"
        )
    start = 0
    if output.is_dir():
        numbers = [int(m.group(1)) for p in output.iterdir() if (m := re.match(r"(\d{5})-", p.name))]
        start = max(numbers, default=-1) + 1
    return [output / f"{start + i:05d}-{_slug(prompts[i // batch])}{suffix}" for i in range(n)]


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.stem}-{tag}{path.suffix}")


# ----------------------------------------------------------------------------- timing and memory
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu max rss"


# ----------------------------------------------------------------------------- generate
def make_config(config: GenerateConfig | None, options: dict) -> GenerateConfig:
    """``config`` with ``options`` (GenerateConfig fields) applied; a TypeError names unknown ones."""
    unknown = sorted(set(options) - GenerateConfig.names())
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; generate takes GenerateConfig's fields")
    return (config or GenerateConfig()).replace(**options)


def generate(
    prompt: str | Sequence[str],
    config: GenerateConfig | None = None,
    *,
    model=None,
    info: ModelInfo | None = None,
    parallel_rank=None,
    **options,
) -> GenerationResult:
    """Generate images with CLEAR attention at any resolution.

    Args:
        prompt: one prompt or a list; each prompt makes ``config.batch`` images.
        config: the settings (``GenerateConfig``); ``**options`` are GenerateConfig fields that
            build it (``generate(p, radius=8, steps=4)``) or change the given one.
        model: None (the shipped mini model), a diffusers pipeline folder of a supported family, a
            Hugging Face id in the local cache (never downloaded), or a loaded pipeline (used as it is).
        info: overrides the folder's ``cleardit.json`` (base size, text length, defaults).
        parallel_rank: set by ``cleardit.parallel.generate_parallel`` in each of its processes (its
            ``wrap(pipe)`` and ``install``); leave None. Several devices: ``generate_parallel``.

    Returns:
        GenerationResult (images, paths, timings, peak memory, compare stats, summary line); for a
        video family (or with ``frames``), a ``VideoResult`` (MP4s, previews, sidecars; see
        ``cleardit.pipelines.video``).
    """
    config = make_config(config, options)
    prompts = prompt_list(prompt)
    from .video import generate_video, makes_videos  # video imports this module's helpers

    if makes_videos(model, config):
        if parallel_rank is not None:
            raise NotSupportedError("patch-parallel generation (--devices) makes images only; use one device")
        return generate_video(prompts, config, model=model, info=info)
    if config.output is not None:  # a .png name for several images, or an unwritable place: refused first
        check_writable(output_paths(config.output, prompts, config.batch))
    log = (lambda msg: None) if config.quiet else (lambda msg: print(msg, file=sys.stderr))
    plan = plan_run(prompts, config, model, info, parallel_rank.wrap if parallel_rank else None, log)
    clear_config = None
    if plan.use_clear:
        clear_config = ClearConfig(
            radius=plan.radius, down_factor=plan.down_factor, backend=config.backend, scale=plan.scale
        )
    install = parallel_rank.install if parallel_rank else None
    modes = AttentionModes(plan.pipe.transformer, clear_config, plan.weights, install=install)
    runs = denoise(plan, modes)
    peak, memory_source = _peak_memory(plan.device)
    paths, full_paths, base_paths = _save_images(plan, runs)
    stats = _compare(plan, runs, paths, log) if config.compare else None
    summary = _summary(plan, runs, paths, peak, memory_source)
    if stats is not None:
        summary += "\n" + stats.line()
    return GenerationResult(
        images=runs.main,
        paths=paths,
        metadata=[plan.metadata(i, plan.use_clear) for i in range(plan.n_images)],
        seconds=runs.main_seconds,
        steps=runs.steps,
        seconds_per_step=runs.main_seconds / runs.steps,
        peak_memory=peak,
        memory_source=memory_source,
        load_seconds=plan.load_seconds,
        attention_flops=_attention_flops(plan, clear=plan.use_clear),
        full_images=runs.full if config.compare else None,
        full_paths=full_paths,
        base_images=runs.base if config.highres else None,
        base_paths=base_paths,
        compare=stats,
        summary=summary,
    )


@dataclass
class Runs:
    """The images of every run and their times (``main``: CLEAR, or full attention at radius 0)."""

    main: list = field(default_factory=list)
    full: list = field(default_factory=list)  # --compare: full attention, same seeds
    base: list = field(default_factory=list)  # --highres: stage 1
    main_seconds: float = 0.0
    full_seconds: float = 0.0
    stage1_seconds: float = 0.0
    steps: int = 0


def denoise(plan: RunPlan, modes: AttentionModes) -> Runs:
    """Every denoising run of the plan: per prompt the main run (and stage 1 before it with
    ``--highres``), and the full-attention run of the same seeds with ``--compare``."""
    c, pipe, dev = plan.config, plan.pipe, plan.device
    transformer = pipe.transformer
    height, width, s1, sigmas = plan.height, plan.width, plan.stage1, plan.sigmas

    @contextlib.contextmanager
    def target_mode(clear: bool) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(hr.ntk_rope(transformer, c.ntk_factor))
            if clear:
                stack.enter_context(modes.clear())
            elif plan.scale is not None:
                stack.enter_context(hr.query_scale(transformer, plan.scale * math.sqrt(plan.head_dim)))
            yield

    def gens(seeds, states=None):
        out = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        if states is not None:
            for g, st in zip(out, states, strict=True):
                g.set_state(st)
        return out

    def timed(fn):
        _sync(dev)
        t = time.perf_counter()
        value = fn()
        _sync(dev)
        return value, time.perf_counter() - t

    img2img = hr.img2img_pipeline(pipe) if c.highres else None
    for p in (pipe, img2img):
        if p is not None:
            p.set_progress_bar_config(disable=c.quiet, leave=False)
    common = plan.adapter.call_options(plan.guidance, plan.true_cfg, c.negative_prompt, plan.text_len)
    step_options = {} if c.on_step is None else {"callback_on_step_end": _step_counter(plan, c.on_step)}
    runs = Runs()
    # every run takes the plan's sigmas, the inputs the family's fixes ask for; the VAE tiles (if at
    # all) only past its size
    with (
        schedule.sigmas_as_given(pipe, img2img),
        hr.vae_tiles(pipe.vae, plan.vae_tiled),
        plan.adapter.fixed_inputs(transformer),
    ):
        if plan.use_clear and plan.weights is not None:
            with modes.clear():  # load and check the CLEAR weights once, before anything is timed
                pass
        if c.warmup:
            for clear in [True, False] if c.compare else [plan.use_clear]:
                with target_mode(clear):
                    pipe(
                        prompt=plan.prompts[0],
                        height=height,
                        width=width,
                        num_inference_steps=1,
                        sigmas=sigmas[:1],
                        output_type="latent",
                        generator=gens([c.seed]),
                        **common,
                    )

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        batch, n_images = c.batch, plan.n_images
        for pi, text in enumerate(plan.prompts):
            seeds = [c.seed + pi * batch + b for b in range(batch)]
            desc = (
                f"image {pi * batch + 1}/{n_images}"
                if batch == 1
                else (f"images {pi * batch + 1}-{pi * batch + batch}/{n_images}")
            )
            for p in (pipe, img2img):
                if p is not None:
                    p.set_progress_bar_config(disable=c.quiet, leave=False, desc=desc)
            call = dict(num_images_per_prompt=batch, **common, **step_options)
            if not c.highres:

                def run(clear, seeds=seeds, text=text, call=call):
                    with target_mode(clear):
                        return pipe(
                            prompt=text,
                            height=height,
                            width=width,
                            num_inference_steps=plan.steps,
                            sigmas=sigmas,
                            generator=gens(seeds),
                            **call,
                        ).images

                images, t = timed(lambda: run(plan.use_clear))
                runs.main += images
                runs.main_seconds += t
                runs.steps += plan.steps
                if c.compare:
                    images, t = timed(lambda: run(False))
                    runs.full += images
                    runs.full_seconds += t
                continue
            # two-stage: stage 1 near the base area with the original attention
            g1 = gens(seeds)
            kind = "latent" if c.upscale == "latent" else "pil"
            first, t1 = timed(
                lambda text=text, g1=g1, call=call, kind=kind: (
                    pipe(
                        prompt=text,
                        height=s1[0],
                        width=s1[1],
                        num_inference_steps=plan.steps,
                        sigmas=plan.stage1_sigmas,
                        generator=g1,
                        output_type=kind,
                        **call,
                    ).images
                )
            )
            states = [g.get_state() for g in g1]
            runs.base += first if kind == "pil" else hr.decode_latents(pipe, first, s1)
            init = hr.upscale_latents(pipe, first, s1, (height, width)) if kind == "latent" else first

            def run2(clear, text=text, init=init, states=states, call=call, seeds=seeds):
                with target_mode(clear):
                    return img2img(
                        prompt=text,
                        image=init,
                        height=height,
                        width=width,
                        strength=1.0,  # the noise level is sigmas[0] = strength
                        num_inference_steps=len(sigmas),
                        sigmas=sigmas,
                        generator=gens(seeds, states),
                        **call,
                    ).images

            images, t2 = timed(lambda: run2(plan.use_clear))
            runs.main += images
            runs.main_seconds += t1 + t2
            runs.stage1_seconds += t1
            runs.steps += plan.steps + len(sigmas)
            if c.compare:
                images, t2 = timed(lambda: run2(False))
                runs.full += images
                runs.full_seconds += t1 + t2
    return runs


def _step_counter(plan: RunPlan, on_step):
    """A diffusers ``callback_on_step_end`` that reports (steps done, steps in every run of the plan)."""
    per_prompt = len(plan.sigmas) * (2 if plan.config.compare else 1)  # target-size runs
    if plan.config.highres:
        per_prompt += len(plan.stage1_sigmas)  # stage 1, shared by both attention modes
    total, done = per_prompt * len(plan.prompts), 0

    def callback(_pipe, _step, _timestep, _tensors) -> dict:
        nonlocal done
        done += 1
        on_step(done, total)
        return {}  # no tensor replaced

    return callback


def _save_images(plan: RunPlan, runs: Runs) -> tuple[list[Path], list[Path], list[Path]]:
    """Write the PNGs (main, ``*-full``, ``*-base``), each with its metadata; their paths."""
    c = plan.config
    if c.output is None:
        return [], [], []
    paths = output_paths(c.output, plan.prompts, c.batch)
    for i, (image, path) in enumerate(zip(runs.main, paths, strict=True)):
        save_png(image, path, plan.metadata(i, plan.use_clear))
    full_paths = [_sibling(p, "full") for p in paths] if c.compare else []
    for i, (image, path) in enumerate(zip(runs.full, full_paths, strict=True)):
        save_png(image, path, plan.metadata(i, False))
    base_paths = [_sibling(p, "base") for p in paths] if c.highres else []
    for i, (image, path) in enumerate(zip(runs.base, base_paths, strict=True)):
        save_png(image, path, plan.stage1_metadata(i))
    return paths, full_paths, base_paths


def _attention_flops(plan: RunPlan, clear: bool) -> int:
    """Attention FLOPs of one transformer forward at the target size (all layers, one image)."""
    from ..attention import TokenLayout, attention_flops

    (gh, gw), t = plan.grid, plan.text_len
    if clear:
        layout, radius = TokenLayout(t, gh, gw, down_factor=plan.down_factor), plan.radius
    else:
        layout, radius = TokenLayout(t, gh, gw), None
    return attention_flops(layout, radius, plan.heads, plan.head_dim) * plan.layers


def _compare(plan: RunPlan, runs: Runs, paths: list[Path], log) -> CompareStats:
    """Full attention vs CLEAR: FLOPs, times, PSNR / MS-SSIM per image, and the side-by-side boards."""
    flops_clear, flops_full = _attention_flops(plan, clear=True), _attention_flops(plan, clear=False)
    main_s, full_s, stage1_s = runs.main_seconds, runs.full_seconds, runs.stage1_seconds
    stats = CompareStats(
        clear_seconds=main_s,
        full_seconds=full_s,
        speedup=full_s / main_s if main_s > 0 else float("inf"),
        flops_clear=flops_clear,
        flops_full=flops_full,
        ms_ssim=[],
    )
    for f_img, c_img in zip(runs.full, runs.main, strict=True):
        stats.psnr.append(psnr_images(f_img, c_img))
        value, stats.ms_ssim_note = ms_ssim_images(f_img, c_img)
        if value is None:
            stats.ms_ssim = None
        elif stats.ms_ssim is not None:
            stats.ms_ssim.append(value)
    if stats.ms_ssim_note and (stats.ms_ssim is None or "adapted" in stats.ms_ssim_note):
        log(stats.ms_ssim_note)
    height, width, s1, name = plan.height, plan.width, plan.stage1, plan.clear_name()
    for i, path in enumerate(paths):
        lines = [
            f"full attention: {full_s:.2f} s, {format_flops(flops_full)} attention/step",
            f"{name}: {main_s:.2f} s ({stats.speedup:.2f}x speedup), "
            f"{format_flops(flops_clear)} attention/step",
            f"PSNR {_fmt_db(stats.psnr[i])}"
            + (f", MS-SSIM {stats.ms_ssim[i]:.4f}" if stats.ms_ssim is not None else ""),
        ]
        panels = [runs.full[i], runs.main[i]]
        names = [f"full attention {height}x{width}", f"{name} {height}x{width}"]
        if plan.config.highres:  # what both started from
            stage2 = (full_s - stage1_s) / max(main_s - stage1_s, 1e-9)
            lines.insert(
                2,
                f"both include stage 1 ({stage1_s:.2f} s); at {height}x{width} alone: {stage2:.2f}x speedup",
            )
            panels.insert(0, runs.base[i])
            names.insert(0, f"stage 1: {s1[0]}x{s1[1]}, full")
        board = image_grid([panels], column_labels=names, footer=lines, cell=(width, height))
        stats.paths.append(
            save_png(board, _sibling(path, "compare"), {**plan.metadata(i, True), "compare": True})
        )
    return stats


def _summary(plan: RunPlan, runs: Runs, paths: list[Path], peak: int, memory_source: str) -> str:
    """The one-line report of a ``generate`` call."""
    c, s1 = plan.config, plan.stage1
    if plan.use_clear:
        attention = plan.clear_name() + (
            f" with {plan.weights.name}" if plan.weights is not None else " (no CLEAR weights: training-free)"
        )
    else:
        attention = "full attention"
    extras = [
        s
        for s in (
            f"highres from {s1[0]}x{s1[1]}, strength {c.strength}, {c.upscale} upscale" if c.highres else "",
            f"NTK x{c.ntk_factor:g}" if c.ntk_factor not in (None, 1) else "",
            f"proportional attention scale {plan.scale:.4f}" if plan.scale is not None else "",
        )
        if s
    ]
    where = ""
    if paths:
        where = f" -> {paths[0]}" if len(paths) == 1 else f" -> {paths[0].parent}/"
    n = plan.n_images
    return (
        f"generated {n} image{'s' if n != 1 else ''} of {plan.height}x{plan.width} px "
        f"in {runs.main_seconds:.2f} s "
        f"({runs.main_seconds / runs.steps:.3f} s/step, {runs.steps} steps), peak memory {_fmt_bytes(peak)} "
        f"({memory_source}); {attention}"
        + "".join(f"; {e}" for e in extras)
        + f"; model loaded in {plan.load_seconds:.1f} s{where}"
    )
