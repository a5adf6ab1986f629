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
from ..config import DEFAULT_RADIUS, ClearConfig
from ..image_grid import image_grid
from ..image_metrics import ms_ssim_images, psnr_images
from ..prompt_list import prompt_list, read_prompts  # noqa: F401 (read_prompts: re-exported)
from . import highres as hr
from .config import DEFAULT_STRENGTH, UPSCALE_MODES, GenerateConfig  # noqa: F401 (re-exported)
from .loading import (
    ModelInfo,
    base_size,
    load_pipeline,
    max_sequence_length,
    read_model_info,
    resolve_device,
    resolve_dtype,
    resolve_model,
    size_factor,
    size_factor_of_folder,
)


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


def sigmas_metadata(sigmas: Sequence[float]) -> str:
    """The noise levels of a run as PNG metadata: a JSON list, 4 decimals (the final 0 left out)."""
    return json.dumps([round(float(x), 4) for x in sigmas])


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- inputs
def _declared_clear_geometry(path: Path) -> tuple[int | None, int | None]:
    """(radius, down_factor) a CLEAR weights file was made for (metadata or reference file name)."""
    from safetensors import safe_open

    from .. import weights as clear_weights

    if not path.is_file():
        raise FileNotFoundError(f"--clear-weights {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors has its own error types for corrupt files
        raise ValueError(f"--clear-weights {path} is not a readable safetensors file ({exc})") from exc
    radius, down_factor, known = clear_weights.declared_geometry(path, metadata)
    return (radius, down_factor) if known else (None, None)


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
        from ..models import linearize
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
            yield
        finally:
            if self._original is not None:
                for k, t in self._original.items():
                    params[k].data = t
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


def output_paths(output: str | os.PathLike, prompts: list[str], batch: int) -> list[Path]:
    """Main file of each image: ``output`` itself if it names a .png (one image only), else
    ``output/NNNNN-<prompt>.png`` numbered after the highest number already in the folder."""
    output = Path(output)
    n = len(prompts) * batch
    if output.suffix.lower() == ".png":
        if n != 1:
            raise ValueError(
                f"--output {output} names one .png file but {n} images will be made "
                f"({len(prompts)} prompt(s) x batch {batch}); pass a folder instead"
            )
        return [output]
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} exists and is not a folder; pass a folder or a .png file name")
    start = 0
    if output.is_dir():
        numbers = [int(m.group(1)) for p in output.iterdir() if (m := re.match(r"(\d{5})-", p.name))]
        start = max(numbers, default=-1) + 1
    return [output / f"{start + i:05d}-{_slug(prompts[i // batch])}.png" for i in range(n)]


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


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except ImportError:
        return "unknown"


# ----------------------------------------------------------------------------- generate
def clear_settings(config: GenerateConfig, info: ModelInfo, folder: Path | None):
    """(radius, down_factor, CLEAR weights file or None) of a run: the caller's, else the weights
    file's, else the model folder's own CLEAR weights, else radius 16 training-free."""
    radius, down_factor, clear_weights = config.radius, config.down_factor, config.clear_weights
    weights_path = Path(clear_weights).expanduser() if clear_weights is not None else None
    if weights_path is not None:
        file_radius, file_df = _declared_clear_geometry(weights_path)
        if radius is None:
            radius = file_radius if file_radius is not None else DEFAULT_RADIUS
            down_factor = file_df if down_factor is None else down_factor
    elif (
        info.clear_weights
        and folder is not None
        and radius in (None, info.clear_radius)
        and (down_factor in (None, info.clear_down_factor))
    ):
        weights_path = folder / info.clear_weights
        radius, down_factor = info.clear_radius or radius, info.clear_down_factor
    if radius is None:
        radius = DEFAULT_RADIUS
    if radius == 0:
        if weights_path is not None and clear_weights is not None:
            raise ValueError(
                "--clear-weights needs CLEAR attention; drop --full / --radius 0 or the weights file"
            )
        if down_factor is not None:
            raise ValueError("--down-factor needs CLEAR attention (--radius > 0)")
        if config.compare:
            raise ValueError("--compare compares CLEAR with full attention; give a --radius > 0")
        weights_path = None
    return radius, down_factor, weights_path


def _load(model, folder: Path | None, info: ModelInfo, device, dtype, quiet: bool, log):
    """(pipeline, its device, the model's display name): loaded from ``folder``, or ``model`` as given."""
    if folder is not None:
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        log(f"loading {folder} on {dev} ({str(dt).replace('torch.', '')})")
        pipe = load_pipeline(folder, dev, dt, progress=not quiet)
        return pipe, dev, str(model) if model is not None else f"cleardit-mini ({folder})"
    pipe = model
    if not hasattr(pipe, "transformer") or not hasattr(pipe, "vae"):
        raise TypeError(
            f"model must be a path, a Hugging Face id or a diffusers pipeline, got {type(model).__name__}"
        )
    if device is not None or dtype is not None:
        dev = resolve_device(device) if device is not None else pipe._execution_device
        pipe.to(dev, resolve_dtype(dtype, dev) if dtype is not None else pipe.transformer.dtype)
    return pipe, torch.device(pipe._execution_device), info.name or type(pipe).__name__


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
        GenerationResult (images, paths, timings, peak memory, compare stats, summary line).
    """
    config = make_config(config, options)
    prompts = prompt_list(prompt)
    c = config
    height, width, steps, guidance, true_cfg = c.height, c.width, c.steps, c.guidance, c.true_cfg
    negative_prompt, seed, batch, device, dtype = c.negative_prompt, c.seed, c.batch, c.device, c.dtype
    backend = c.backend
    highres, strength, upscale, shift_rule, ntk_factor = (
        c.highres,
        c.strength,
        c.upscale,
        c.shift_rule,
        c.ntk_factor,
    )
    proportional_attention, compare, warmup = c.proportional_attention, c.compare, c.warmup
    vae_tiling, output, quiet = c.vae_tiling, c.output, c.quiet
    if output is not None:  # a .png name for several images, or an unwritable place: refused before any work
        check_writable(output_paths(output, prompts, batch))
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))

    # -- the model -----------------------------------------------------------------------------
    folder = None
    if model is None or isinstance(model, (str, os.PathLike)):
        folder = resolve_model(model)
        info = info or read_model_info(folder)
        factor = size_factor_of_folder(folder)
        if factor is not None:  # size mistakes are reported before loading gigabytes
            for value, what in ((height, "height"), (width, "width")):
                if value is not None:
                    hr.check_size(value, factor, what)
    info = info or ModelInfo()

    radius, down_factor, weights_path = clear_settings(config, info, folder)
    use_clear = radius > 0
    t0 = time.perf_counter()
    pipe, dev, model_name = _load(model, folder, info, device, dtype, quiet, log)
    load_seconds = time.perf_counter() - t0
    if parallel_rank is not None:
        pipe = parallel_rank.wrap(pipe)
    from ..models import adapter_for, get_handle

    transformer = pipe.transformer
    adapter = adapter_for(transformer)
    if get_handle(transformer) is not None:
        raise ValueError("the pipeline's transformer is already linearized; call handle.restore() first")
    factor = size_factor(pipe)
    base_h, base_w = base_size(pipe, info)
    height = height or base_h
    width = width or base_w
    grid = (hr.check_size(height, factor, "height"), hr.check_size(width, factor, "width"))
    text_len = max_sequence_length(pipe, info)
    steps = steps or info.default_steps or adapter.default_steps
    if guidance is None:
        guidance = info.default_guidance if info.default_guidance is not None else adapter.default_guidance
    if true_cfg is None:
        true_cfg = info.default_true_cfg if info.default_true_cfg is not None else adapter.default_true_cfg
    if isinstance(true_cfg, bool) or not isinstance(true_cfg, (int, float)) or true_cfg < 1:
        raise ValueError(
            f"--true-cfg must be a number >= 1 (1 = no classifier-free guidance), got {true_cfg!r}"
        )
    heads, head_dim, layers = adapter.attention_geometry(transformer)

    s1 = None
    if highres:
        if height * width <= base_h * base_w:
            raise ValueError(
                f"--highres upscales from the base size {base_h}x{base_w}; the target {height}x{width} "
                "is not larger (drop --highres, or ask for a larger --height/--width)"
            )
        s1 = hr.stage1_size(height, width, base_h, base_w, factor)
    # the sigmas of every run, set here so that the PNGs can say which were used
    sigmas = schedule.denoising_sigmas(
        pipe.scheduler, steps, grid[0] * grid[1], shift_rule, strength if highres else 1.0
    ).tolist()
    sigmas1 = None
    if highres:
        tokens1 = (s1[0] // factor) * (s1[1] // factor)
        sigmas1 = schedule.denoising_sigmas(pipe.scheduler, steps, tokens1, shift_rule).tolist()

    scale = None
    if proportional_attention:
        base_seq = (base_h // factor) * (base_w // factor) + text_len
        seq = grid[0] * grid[1] + text_len
        scale = hr.proportional_scale(seq, base_seq, head_dim)
    config = (
        ClearConfig(radius=radius, down_factor=down_factor, backend=backend, scale=scale)
        if use_clear
        else None
    )
    modes = AttentionModes(
        transformer, config, weights_path, install=parallel_rank.install if parallel_rank else None
    )

    @contextlib.contextmanager
    def target_mode(clear: bool) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(hr.ntk_rope(transformer, ntk_factor))
            if clear:
                stack.enter_context(modes.clear())
            elif scale is not None:
                stack.enter_context(hr.query_scale(transformer, scale * math.sqrt(head_dim)))
            yield

    # -- runs ------------------------------------------------------------------------------------
    img2img = hr.img2img_pipeline(pipe) if highres else None
    for p in (pipe, img2img):
        if p is not None:
            p.set_progress_bar_config(disable=quiet, leave=False)
    common = adapter.call_options(guidance, true_cfg, negative_prompt, text_len)

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

    tiled = hr.wants_vae_tiles(pipe.vae, height, width, vae_tiling)
    # every run takes the sigmas chosen above; the VAE tiles (if at all) only past its size
    with schedule.sigmas_as_given(pipe, img2img), hr.vae_tiles(pipe.vae, tiled):
        if use_clear and weights_path is not None:
            with modes.clear():  # load and check the CLEAR weights once, before anything is timed
                pass
        if warmup:
            for clear in [True, False] if compare else [use_clear]:
                with target_mode(clear):
                    pipe(
                        prompts[0],
                        height=height,
                        width=width,
                        num_inference_steps=1,
                        sigmas=sigmas[:1],
                        output_type="latent",
                        generator=gens([seed]),
                        **common,
                    )

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        main_images, full_images, base_images = [], [], []
        main_seconds = full_seconds = stage1_seconds = 0.0
        run_steps = 0
        n_images = len(prompts) * batch
        for pi, text in enumerate(prompts):
            seeds = [seed + pi * batch + b for b in range(batch)]
            desc = (
                f"image {pi * batch + 1}/{n_images}"
                if batch == 1
                else (f"images {pi * batch + 1}-{pi * batch + batch}/{n_images}")
            )
            for p in (pipe, img2img):
                if p is not None:
                    p.set_progress_bar_config(disable=quiet, leave=False, desc=desc)
            call = dict(num_images_per_prompt=batch, **common)
            if not highres:

                def run(clear, seeds=seeds, text=text, call=call):
                    with target_mode(clear):
                        return pipe(
                            text,
                            height=height,
                            width=width,
                            num_inference_steps=steps,
                            sigmas=sigmas,
                            generator=gens(seeds),
                            **call,
                        ).images

                images, t = timed(lambda: run(use_clear))
                main_images += images
                main_seconds += t
                run_steps += steps
                if compare:
                    images, t = timed(lambda: run(False))
                    full_images += images
                    full_seconds += t
                continue
            # two-stage: stage 1 near the base area with the original attention
            g1 = gens(seeds)
            kind = "latent" if upscale == "latent" else "pil"
            first, t1 = timed(
                lambda text=text, g1=g1, call=call, kind=kind: (
                    pipe(
                        text,
                        height=s1[0],
                        width=s1[1],
                        num_inference_steps=steps,
                        sigmas=sigmas1,
                        generator=g1,
                        output_type=kind,
                        **call,
                    ).images
                )
            )
            states = [g.get_state() for g in g1]
            base_images += first if kind == "pil" else hr.decode_latents(pipe, first, s1)
            init = hr.upscale_latents(pipe, first, s1, (height, width)) if upscale == "latent" else first

            def run2(clear, text=text, init=init, states=states, call=call, seeds=seeds):
                with target_mode(clear):
                    return img2img(
                        text,
                        image=init,
                        height=height,
                        width=width,
                        strength=1.0,  # the noise level is sigmas[0] = strength
                        num_inference_steps=len(sigmas),
                        sigmas=sigmas,
                        generator=gens(seeds, states),
                        **call,
                    ).images

            images, t2 = timed(lambda: run2(use_clear))
            main_images += images
            main_seconds += t1 + t2
            stage1_seconds += t1
            run_steps += steps + len(sigmas)
            if compare:
                images, t2 = timed(lambda: run2(False))
                full_images += images
                full_seconds += t1 + t2
    peak, memory_source = _peak_memory(dev)

    # -- metadata, files, comparison ------------------------------------------------------------
    version = _version()
    weights_name = str(weights_path) if weights_path is not None else None

    def meta(i: int, clear: bool) -> dict:
        return {
            "prompt": prompts[i // batch],
            "seed": seed + i,
            "steps": steps,
            "guidance": guidance,
            "true_cfg": true_cfg,
            "negative_prompt": negative_prompt if true_cfg > 1 else None,
            "height": height,
            "width": width,
            "attention": "clear" if clear else "full",
            "radius": radius if clear else 0,
            "down_factor": down_factor if clear else None,
            "clear_weights": weights_name if clear else None,
            "backend": backend if clear else None,
            "model": model_name,
            "highres": bool(highres),
            "stage1_size": f"{s1[0]}x{s1[1]}" if s1 else None,
            "strength": strength if highres else None,
            "upscale": upscale if highres else None,
            "shift_rule": shift_rule,
            "vae_tiling": tiled,
            "sigmas": sigmas_metadata(sigmas),
            "stage1_sigmas": sigmas_metadata(sigmas1) if highres else None,
            "ntk_factor": ntk_factor,
            "proportional_attention": bool(proportional_attention),
            "attention_scale": scale,
            "max_sequence_length": text_len,
            "cleardit_version": version,
            "Software": f"cleardit {version}",
        }

    def stage1_meta(i: int) -> dict:
        """The stage-1 image: the base-size generation that ``highres`` upscaled."""
        return {
            **meta(i, False),
            "height": s1[0],
            "width": s1[1],
            "highres": False,
            "highres_stage": "1 (base size, full attention; upscaled for stage 2)",
            "sigmas": sigmas_metadata(sigmas1),
            "stage1_sigmas": None,
            "strength": None,
            "upscale": None,
            "ntk_factor": None,
            "proportional_attention": False,
            "attention_scale": None,
        }

    metadata = [meta(i, use_clear) for i in range(n_images)]
    paths: list[Path] = []
    full_paths: list[Path] = []
    base_paths: list[Path] = []
    if output is not None:
        paths = output_paths(output, prompts, batch)
        for image, path, md in zip(main_images, paths, metadata, strict=True):
            save_png(image, path, md)
        if compare:
            full_paths = [_sibling(p, "full") for p in paths]
            for i, (image, path) in enumerate(zip(full_images, full_paths, strict=True)):
                save_png(image, path, meta(i, False))
        if highres:
            base_paths = [_sibling(p, "base") for p in paths]
            for i, (image, path) in enumerate(zip(base_images, base_paths, strict=True)):
                save_png(image, path, stage1_meta(i))

    stats = None
    if compare:
        from ..attention import TokenLayout, attention_flops

        layout = TokenLayout(text_len, grid[0], grid[1], down_factor=down_factor)
        flops_clear = attention_flops(layout, radius, heads, head_dim) * layers
        flops_full = attention_flops(TokenLayout(text_len, grid[0], grid[1]), None, heads, head_dim) * layers
        stats = CompareStats(
            clear_seconds=main_seconds,
            full_seconds=full_seconds,
            speedup=full_seconds / main_seconds if main_seconds > 0 else float("inf"),
            flops_clear=flops_clear,
            flops_full=flops_full,
            ms_ssim=[],
        )
        for f_img, c_img in zip(full_images, main_images, strict=True):
            stats.psnr.append(psnr_images(f_img, c_img))
            value, stats.ms_ssim_note = ms_ssim_images(f_img, c_img)
            if value is None:
                stats.ms_ssim = None
            elif stats.ms_ssim is not None:
                stats.ms_ssim.append(value)
        if stats.ms_ssim_note and (stats.ms_ssim is None or "adapted" in stats.ms_ssim_note):
            log(stats.ms_ssim_note)
        if paths:
            name = f"CLEAR r={radius}" + (f" df={down_factor}" if down_factor else "")
            for i, path in enumerate(paths):
                lines = [
                    f"full attention: {full_seconds:.2f} s, {format_flops(flops_full)} attention/step",
                    f"{name}: {main_seconds:.2f} s ({stats.speedup:.2f}x speedup), "
                    f"{format_flops(flops_clear)} attention/step",
                    f"PSNR {_fmt_db(stats.psnr[i])}"
                    + (f", MS-SSIM {stats.ms_ssim[i]:.4f}" if stats.ms_ssim is not None else ""),
                ]
                if highres:
                    stage2 = (full_seconds - stage1_seconds) / max(main_seconds - stage1_seconds, 1e-9)
                    lines.insert(
                        2,
                        f"both include stage 1 ({stage1_seconds:.2f} s); "
                        f"at {height}x{width} alone: {stage2:.2f}x speedup",
                    )
                panels = [full_images[i], main_images[i]]
                names = [f"full attention {height}x{width}", f"{name} {height}x{width}"]
                if highres:  # what both started from
                    panels.insert(0, base_images[i])
                    names.insert(0, f"stage 1: {s1[0]}x{s1[1]}, full")
                board = image_grid([panels], column_labels=names, footer=lines, cell=(width, height))
                stats.paths.append(
                    save_png(board, _sibling(path, "compare"), {**meta(i, True), "compare": True})
                )

    if use_clear:
        attention = f"CLEAR r={radius}" + (f" df={down_factor}" if down_factor else "")
        attention += (
            f" with {weights_path.name}" if weights_path is not None else " (no CLEAR weights: training-free)"
        )
    else:
        attention = "full attention"
    extras = [
        s
        for s in (
            f"highres from {s1[0]}x{s1[1]}, strength {strength}, {upscale} upscale" if highres else "",
            f"NTK x{ntk_factor:g}" if ntk_factor not in (None, 1) else "",
            f"proportional attention scale {scale:.4f}" if scale is not None else "",
        )
        if s
    ]
    where = ""
    if paths:
        where = f" -> {paths[0]}" if len(paths) == 1 else f" -> {paths[0].parent}/"
    summary = (
        f"generated {n_images} image{'s' if n_images != 1 else ''} of {height}x{width} px "
        f"in {main_seconds:.2f} s "
        f"({main_seconds / run_steps:.3f} s/step, {run_steps} steps), peak memory {_fmt_bytes(peak)} "
        f"({memory_source}); {attention}"
        + "".join(f"; {e}" for e in extras)
        + f"; model loaded in {load_seconds:.1f} s{where}"
    )
    if stats is not None:
        summary += "\n" + stats.line()
    return GenerationResult(
        images=main_images,
        paths=paths,
        metadata=metadata,
        seconds=main_seconds,
        steps=run_steps,
        seconds_per_step=main_seconds / run_steps,
        peak_memory=peak,
        memory_source=memory_source,
        load_seconds=load_seconds,
        full_images=full_images if compare else None,
        full_paths=full_paths,
        base_images=base_images if highres else None,
        base_paths=base_paths,
        compare=stats,
        summary=summary,
    )
