"""``generate`` for video families: text-to-video with CLEAR in space and time.

``cleardit.generate`` hands a run here when the model makes videos (its adapter's ``video``) or
``frames`` is given. Each video is written as an MP4 (H.264), a looping GIF preview and a JSON
sidecar with every parameter; ``compare`` also runs full attention on the same seeds and writes a
side-by-side MP4 with timings, attention FLOPs, frame PSNR and temporal consistency.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..attention import TokenLayout, attention_flops
from ..attention.flops import format_flops
from ..config import ClearConfig
from ..image_grid import image_grid
from ..models import NotSupportedError, adapter_for
from ..video_io import as_uint8_video, save_gif_preview, save_mp4, save_sidecar
from ..video_metrics import temporal_psnr, video_psnr
from . import highres as hr
from .config import GenerateConfig
from .loading import ModelInfo, folder_adapter, max_sequence_length, read_model_info, resolve_model
from .plan import _load, _version, clear_settings, resolve_guidance, resolve_true_cfg


# ----------------------------------------------------------------------------- results
@dataclass
class VideoCompareStats:
    """Full attention vs CLEAR on the same seeds.

    Attributes:
        clear_seconds, full_seconds, speedup: generation times (all prompts) and their ratio.
        flops_clear, flops_full: attention FLOPs of one transformer forward (all replaced layers).
        psnr: per video, the mean frame PSNR (dB) of CLEAR against full attention.
        temporal_clear, temporal_full: per video, the PSNR between consecutive frames (None for
            one-frame videos).
        paths: the side-by-side MP4s written.
    """

    clear_seconds: float
    full_seconds: float
    speedup: float
    flops_clear: int
    flops_full: int
    psnr: list[float] = field(default_factory=list)
    temporal_clear: list[float | None] = field(default_factory=list)
    temporal_full: list[float | None] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)

    def line(self) -> str:
        fewer = 100 * (1 - self.flops_clear / self.flops_full) if self.flops_full else 0.0
        return (
            f"compare: full attention {self.full_seconds:.2f} s vs CLEAR {self.clear_seconds:.2f} s = "
            f"{self.speedup:.2f}x speedup; attention FLOPs per transformer forward "
            f"{format_flops(self.flops_full)} vs {format_flops(self.flops_clear)} ({fewer:.1f}% fewer); PSNR "
            f"{np.mean(self.psnr):.2f} dB; temporal consistency (consecutive-frame PSNR) CLEAR "
            f"{_db(self.temporal_clear)}, full {_db(self.temporal_full)}"
        )


def _db(values: list[float | None]) -> str:
    """The mean of PSNR values in dB, "n/a" where there is none (one-frame videos)."""
    return "n/a" if not values or None in values else f"{np.mean(values):.2f} dB"


@dataclass
class VideoResult:
    """What ``generate`` made for a video family.

    Attributes:
        videos: uint8 [frames, height, width, 3] per video (CLEAR, or full attention at radius 0),
            prompt-major.
        paths, preview_paths, sidecar_paths: the MP4s, GIF previews and JSON sidecars written (empty
            without ``output``).
        metadata: per video, the parameters in its sidecar.
        frames, fps: frames per video and the frame rate written.
        seconds, steps, seconds_per_step: generation time of the main videos and their steps.
        peak_memory, memory_source: as ``GenerationResult``'s.
        load_seconds: model loading time.
        attention_flops: attention FLOPs of one transformer forward of the main videos.
        full_videos, full_paths: ``compare``'s full-attention videos.
        compare: VideoCompareStats of ``compare``.
        summary: the one-line summary (plus the compare line).
    """

    videos: list[np.ndarray]
    paths: list[Path]
    preview_paths: list[Path]
    sidecar_paths: list[Path]
    metadata: list[dict]
    frames: int
    fps: int
    seconds: float
    steps: int
    seconds_per_step: float
    peak_memory: int
    memory_source: str
    load_seconds: float = 0.0
    attention_flops: int = 0
    full_videos: list[np.ndarray] | None = None
    full_paths: list[Path] = field(default_factory=list)
    compare: VideoCompareStats | None = None
    summary: str = ""

    @property
    def images(self) -> list[np.ndarray]:
        """The videos (``GenerationResult.images``' place: what callers of ``generate`` read)."""
        return self.videos


# ----------------------------------------------------------------------------- which runs are videos
def makes_videos(model, config: GenerateConfig) -> bool:
    """Whether ``generate`` with ``model`` runs here: ``frames`` given, or a video family's model."""
    if config.frames is not None or config.temporal_radius is not None:
        return True
    if model is None:
        return False  # the shipped mini model makes images
    if isinstance(model, (str, os.PathLike)):
        return folder_adapter(resolve_model(model)).video
    transformer = getattr(model, "transformer", None)
    return transformer is not None and adapter_for(transformer).video


def _refuse_image_options(c: GenerateConfig) -> None:
    refused = [
        (c.highres, "--highres"),
        (c.ntk_factor is not None, "--ntk-factor"),
        (c.proportional_attention, "--proportional-attention"),
    ]
    for on, name in refused:
        if on:
            raise NotSupportedError(f"{name} is an image recipe; video generation does not take it")


@dataclass
class VideoPlan:
    """One video run resolved: the pipeline, sizes, frames, steps, guidance and CLEAR settings."""

    config: GenerateConfig
    prompts: list[str]
    pipe: object
    adapter: object
    device: torch.device
    model_name: str
    load_seconds: float
    height: int
    width: int
    frames: int
    grid: tuple[int, int, int]  # latent frames, token rows, token columns
    text_len: int
    steps: int
    guidance: float | None
    true_cfg: float
    clear: ClearConfig | None
    weights: Path | None
    heads: int
    head_dim: int
    layers: int

    @property
    def n_videos(self) -> int:
        return len(self.prompts) * self.config.batch

    def attention_name(self, clear: bool) -> str:
        if not clear:
            return "full attention"
        rt = self.clear.temporal_radius
        return f"CLEAR r={self.clear.radius}, rt={'all frames' if rt is None else rt}"

    def flops(self, clear: bool) -> int:
        """Attention FLOPs of one transformer forward (every layer CLEAR replaces, one video)."""
        t, h, w = self.grid
        layout = TokenLayout(self.adapter.attention_text_len(self.text_len), h, w, frames=t)
        if not clear:
            return attention_flops(layout, None, self.heads, self.head_dim) * self.layers
        cfg = self.clear
        layout = TokenLayout(layout.text_len, h, w, frames=t, down_factor=cfg.down_factor)
        flops = attention_flops(layout, cfg.radius, self.heads, self.head_dim, cfg.temporal_radius)
        return flops * self.layers

    def metadata(self, index: int, clear: bool) -> dict:
        c = self.config
        prompt_index, in_batch = divmod(index, c.batch)
        cfg = self.clear if clear else None
        return {
            "prompt": self.prompts[prompt_index],
            "negative_prompt": c.negative_prompt,
            "seed": c.seed + prompt_index * c.batch + in_batch,
            "height": self.height,
            "width": self.width,
            "frames": self.frames,
            "latent_frames": self.grid[0],
            "fps": c.fps,
            "steps": self.steps,
            "guidance": self.guidance,
            "true_cfg": self.true_cfg,
            "attention": "clear" if cfg else "full",
            "radius": cfg.radius if cfg else 0,
            "temporal_radius": cfg.temporal_radius if cfg else None,
            "down_factor": cfg.down_factor if cfg else None,
            "backend": cfg.backend if cfg else None,
            "clear_weights": str(self.weights) if cfg and self.weights else None,
            "attention_flops_per_forward": self.flops(clear),
            "text_tokens": self.text_len,
            "model": self.model_name,
            "family": self.adapter.family,
            "dtype": str(self.pipe.transformer.dtype).replace("torch.", ""),
            "device": str(self.device),
            "cleardit": _version(),
        }


def _declared_temporal_radius(path: Path) -> int | None:
    from safetensors import safe_open

    from ..weights import declared_temporal_radius

    with safe_open(str(path), framework="pt") as f:
        return declared_temporal_radius(f.metadata() or {})


def plan_video(prompts: list[str], c: GenerateConfig, model, info: ModelInfo | None, log) -> VideoPlan:
    """Resolve ``c`` against the model (loading it); mistakes are reported before the first step."""
    _refuse_image_options(c)
    folder = None
    if model is None or isinstance(model, (str, os.PathLike)):
        folder = resolve_model(model)
        info = info or read_model_info(folder)
        if not folder_adapter(folder).video:
            raise ValueError(
                f"--frames / --temporal-radius make videos; {folder} holds an image model (drop them)"
            )
    info = info or ModelInfo()
    radius, down_factor, weights = clear_settings(c, info, folder)
    temporal_radius = c.temporal_radius
    if weights is not None and temporal_radius is None:  # CLEAR weights say which window they learned
        temporal_radius = _declared_temporal_radius(weights)
    if radius == 0 and c.temporal_radius is not None:
        raise ValueError("--temporal-radius needs CLEAR attention (--radius > 0); drop it with --full")
    t0 = time.perf_counter()
    pipe, dev, model_name = _load(model, folder, info, c, log)
    load_seconds = time.perf_counter() - t0
    adapter = adapter_for(pipe.transformer)
    if not adapter.video:
        raise ValueError(
            f"--frames / --temporal-radius make videos; this {adapter.family} model makes images (drop them)"
        )
    frames = adapter.check_frames(pipe, c.frames or adapter.default_frames)  # first: refuses what cannot run
    factor = adapter.size_factor(pipe)
    default_h, default_w = adapter.default_video_size(pipe)
    height = c.height or info.base_height or default_h
    width = c.width or info.base_width or default_w
    rows, cols = hr.check_size(height, factor, "height"), hr.check_size(width, factor, "width")
    clear = None
    if radius > 0:
        clear = ClearConfig(
            radius=radius, down_factor=down_factor, backend=c.backend, temporal_radius=temporal_radius
        )
    heads, head_dim, layers = adapter.attention_geometry(pipe.transformer)
    return VideoPlan(
        config=c, prompts=prompts, pipe=pipe, adapter=adapter, device=dev, model_name=model_name,
        load_seconds=load_seconds, height=height, width=width, frames=frames,
        grid=(adapter.latent_frames(pipe, frames), rows, cols), text_len=max_sequence_length(pipe, info),
        steps=c.steps or info.default_steps or adapter.default_steps,
        guidance=resolve_guidance(c.guidance, info, adapter),
        true_cfg=resolve_true_cfg(c.true_cfg, info, adapter),
        clear=clear, weights=weights, heads=heads, head_dim=head_dim, layers=layers,
    )  # fmt: skip


# ----------------------------------------------------------------------------- generate
def generate_video(prompts: list[str], config: GenerateConfig, *, model=None, info=None) -> VideoResult:
    """``generate`` for a video family (see ``cleardit.generate``; ``VideoResult`` for what it gives)."""
    from .generate import AttentionModes, _fmt_bytes, _peak_memory, _sync, output_paths

    c = config
    if c.output is not None:
        from ..atomic import check_writable

        check_writable(output_paths(c.output, prompts, c.batch, suffix=".mp4"))
    log = (lambda msg: None) if c.quiet else (lambda msg: print(msg, file=sys.stderr))
    plan = plan_video(prompts, c, model, info, log)
    pipe, dev = plan.pipe, plan.device
    modes = AttentionModes(pipe.transformer, plan.clear, plan.weights)
    common = plan.adapter.call_options(plan.guidance, plan.true_cfg, c.negative_prompt, plan.text_len)
    runs_per_prompt = 2 if c.compare else 1
    total_steps, done = plan.steps * runs_per_prompt * len(prompts), 0

    def step_callback(_pipe, _step, _timestep, _tensors) -> dict:
        nonlocal done
        done += 1
        c.on_step(done, total_steps)
        return {}

    def run(text: str, seeds: list[int], clear: bool, steps: int) -> list[np.ndarray]:
        mode = modes.clear() if clear else contextlib.nullcontext()
        options = {} if c.on_step is None or steps == 1 else {"callback_on_step_end": step_callback}
        with mode:
            out = plan.adapter.run_pipeline(
                pipe, prompt=text, height=plan.height, width=plan.width, num_frames=plan.frames,
                num_inference_steps=steps, num_videos_per_prompt=len(seeds), output_type="np",
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **common, **options,
            )  # fmt: skip
        return [as_uint8_video(v) for v in out.frames]

    use_clear = plan.clear is not None
    pipe.set_progress_bar_config(disable=c.quiet, leave=False)
    with plan.adapter.fixed_inputs(pipe.transformer):
        if c.warmup:
            for clear in [True, False] if c.compare else [use_clear]:
                run(prompts[0], [c.seed], clear, 1)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        main, full, main_s, full_s = [], [], 0.0, 0.0
        for pi, text in enumerate(prompts):
            seeds = [c.seed + pi * c.batch + b for b in range(c.batch)]
            for clear in [use_clear, False] if c.compare else [use_clear]:
                _sync(dev)
                t = time.perf_counter()
                videos = run(text, seeds, clear, plan.steps)
                _sync(dev)
                if clear == use_clear and (not c.compare or clear):
                    main += videos
                    main_s += time.perf_counter() - t
                else:
                    full += videos
                    full_s += time.perf_counter() - t
    peak, memory_source = _peak_memory(dev)
    metadata = [
        {**plan.metadata(i, use_clear), "seconds": main_s / plan.n_videos} for i in range(plan.n_videos)
    ]
    paths, previews, sidecars, full_paths = [], [], [], []
    if c.output is not None:
        paths = output_paths(c.output, prompts, c.batch, suffix=".mp4")
        for video, path, meta in zip(main, paths, metadata, strict=True):
            previews.append(save_gif_preview(video, path.with_suffix(".gif"), c.fps))
            sidecars.append(save_sidecar(meta, path.with_suffix(".json")))
            save_mp4(video, path, c.fps)  # the MP4 last: its presence means the video is complete
        if c.compare:
            for i, (video, path) in enumerate(zip(full, paths, strict=True)):
                full_path = path.with_name(f"{path.stem}-full.mp4")
                save_sidecar(plan.metadata(i, False), full_path.with_suffix(".json"))
                full_paths.append(save_mp4(video, full_path, c.fps))
    stats = _compare(plan, main, full, main_s, full_s, paths) if c.compare else None
    steps = plan.steps * len(prompts)
    attention = plan.attention_name(use_clear)
    if use_clear and plan.weights is not None:
        attention += f" with {plan.weights.name}"
    where = ""
    if paths:
        where = f" -> {paths[0]}" if len(paths) == 1 else f" -> {paths[0].parent}/"
    summary = (
        f"generated {plan.n_videos} video{'s' if plan.n_videos != 1 else ''} of {plan.frames} frames at "
        f"{plan.height}x{plan.width} px in {main_s:.2f} s ({main_s / steps:.3f} s/step, {steps} steps), "
        f"peak memory {_fmt_bytes(peak)} ({memory_source}); {attention}; model loaded in "
        f"{plan.load_seconds:.1f} s{where}"
    )
    if stats is not None:
        summary += "\n" + stats.line()
    return VideoResult(
        videos=main, paths=paths, preview_paths=previews, sidecar_paths=sidecars, metadata=metadata,
        frames=plan.frames, fps=c.fps, seconds=main_s, steps=steps, seconds_per_step=main_s / steps,
        peak_memory=peak, memory_source=memory_source, load_seconds=plan.load_seconds,
        attention_flops=plan.flops(use_clear), full_videos=full if c.compare else None,
        full_paths=full_paths, compare=stats, summary=summary,
    )  # fmt: skip


def _compare(
    plan: VideoPlan, main, full, main_s: float, full_s: float, paths: list[Path]
) -> VideoCompareStats:
    """Metrics of CLEAR against full attention, and (with ``output``) the side-by-side MP4s."""
    stats = VideoCompareStats(
        clear_seconds=main_s, full_seconds=full_s, speedup=full_s / main_s if main_s > 0 else float("inf"),
        flops_clear=plan.flops(True), flops_full=plan.flops(False),
        psnr=[video_psnr(f, m) for f, m in zip(full, main, strict=True)],
        temporal_clear=[temporal_psnr(v) for v in main], temporal_full=[temporal_psnr(v) for v in full],
    )  # fmt: skip
    names = [plan.attention_name(False), plan.attention_name(True)]
    for i, path in enumerate(paths):
        footer = [
            f"full attention: {full_s:.2f} s, {format_flops(stats.flops_full)} attention per forward",
            f"{names[1]}: {main_s:.2f} s ({stats.speedup:.2f}x), "
            f"{format_flops(stats.flops_clear)} attention per forward",
            f"PSNR {stats.psnr[i]:.2f} dB; consecutive-frame PSNR {_db([stats.temporal_clear[i]])} "
            f"(full {_db([stats.temporal_full[i]])})",
        ]
        boards = [
            np.asarray(image_grid([[f, m]], column_labels=names, footer=footer))
            for f, m in zip(full[i], main[i], strict=True)
        ]
        stats.paths.append(
            save_mp4(np.stack(boards), path.with_name(f"{path.stem}-compare.mp4"), plan.config.fps)
        )
    return stats
