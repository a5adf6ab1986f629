"""``RunPlan``: one ``generate`` call resolved before any denoising: the loaded pipeline, its family's
adapter, the size, steps, guidance, CLEAR settings, the sigmas of every run and the metadata each
written image will carry.

``plan_run`` does the resolving; every user mistake it can see (a size that is not a multiple, a
weights file for another radius, ``--highres`` without a larger target) is reported here, before
the first step, and when the model comes from a folder before gigabytes are loaded.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import schedule
from ..config import DEFAULT_RADIUS
from ..models import NotSupportedError
from . import highres as hr
from .config import GenerateConfig
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


def sigmas_metadata(sigmas) -> str:
    """The noise levels of a run as PNG metadata: a JSON list, 4 decimals (the final 0 left out)."""
    return json.dumps([round(float(x), 4) for x in sigmas])


def _version() -> str:
    from .. import __version__

    return __version__


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


def _load(model, folder: Path | None, info: ModelInfo, config: GenerateConfig, log):
    """(pipeline, its device, the model's display name): loaded from ``folder``, or ``model`` as given."""
    device, dtype = config.device, config.dtype
    if folder is not None:
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        log(f"loading {folder} on {dev} ({str(dt).replace('torch.', '')})")
        pipe = load_pipeline(folder, dev, dt, progress=not config.quiet)
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


@dataclass
class RunPlan:
    """What one ``generate`` call will do; every field is resolved (no None meaning "default").

    Attributes:
        config: the caller's settings (its None fields are resolved in the fields below).
        prompts: the prompts; ``n_images`` = prompts x ``config.batch``.
        pipe, adapter, device, model_name, load_seconds: the loaded pipeline and its family.
        height, width, grid: target size in pixels and in tokens.
        text_len, steps, guidance, true_cfg: text tokens per prompt and the sampler settings.
        radius, down_factor, weights: CLEAR settings (radius 0 = full attention).
        stage1: (height, width) of the high-resolution stage 1, or None.
        sigmas, stage1_sigmas: the noise levels of the target-size runs and of stage 1.
        scale: the proportional-attention softmax scale, or None.
        heads, head_dim, layers: attention geometry (FLOPs counts).
        vae_tiled: whether the VAE works in tiles.
    """

    config: GenerateConfig
    prompts: list[str]
    pipe: object
    adapter: object
    device: torch.device
    model_name: str
    load_seconds: float
    height: int
    width: int
    grid: tuple[int, int]
    text_len: int
    steps: int
    guidance: float | None
    true_cfg: float
    radius: int
    down_factor: int | None
    weights: Path | None
    stage1: tuple[int, int] | None
    sigmas: list[float]
    stage1_sigmas: list[float] | None
    scale: float | None
    heads: int
    head_dim: int
    layers: int
    vae_tiled: bool

    @property
    def use_clear(self) -> bool:
        return self.radius > 0

    @property
    def n_images(self) -> int:
        return len(self.prompts) * self.config.batch

    def clear_name(self) -> str:
        return f"CLEAR r={self.radius}" + (f" df={self.down_factor}" if self.down_factor else "")

    def metadata(self, i: int, clear: bool) -> dict:
        """The PNG text metadata of image ``i`` (made with CLEAR or full attention)."""
        c, s1, version = self.config, self.stage1, _version()
        return {
            "prompt": self.prompts[i // c.batch],
            "seed": c.seed + i,
            "steps": self.steps,
            "guidance": self.guidance,
            "true_cfg": self.true_cfg,
            "negative_prompt": c.negative_prompt if self.true_cfg > 1 else None,
            "height": self.height,
            "width": self.width,
            "attention": "clear" if clear else "full",
            "radius": self.radius if clear else 0,
            "down_factor": self.down_factor if clear else None,
            "clear_weights": str(self.weights) if clear and self.weights is not None else None,
            "backend": c.backend if clear else None,
            "model": self.model_name,
            "highres": bool(c.highres),
            "stage1_size": f"{s1[0]}x{s1[1]}" if s1 else None,
            "strength": c.strength if c.highres else None,
            "upscale": c.upscale if c.highres else None,
            "shift_rule": c.shift_rule,
            "vae_tiling": self.vae_tiled,
            "sigmas": sigmas_metadata(self.sigmas),
            "stage1_sigmas": sigmas_metadata(self.stage1_sigmas) if c.highres else None,
            "ntk_factor": c.ntk_factor,
            "proportional_attention": bool(c.proportional_attention),
            "attention_scale": self.scale,
            "max_sequence_length": self.text_len,
            "cleardit_version": version,
            "Software": f"cleardit {version}",
        }

    def stage1_metadata(self, i: int) -> dict:
        """The stage-1 image: the base-size generation that ``highres`` upscaled."""
        return {
            **self.metadata(i, False),
            "height": self.stage1[0],
            "width": self.stage1[1],
            "highres": False,
            "highres_stage": "1 (base size, full attention; upscaled for stage 2)",
            "sigmas": sigmas_metadata(self.stage1_sigmas),
            "stage1_sigmas": None,
            "strength": None,
            "upscale": None,
            "ntk_factor": None,
            "proportional_attention": False,
            "attention_scale": None,
        }


def resolve_guidance(guidance: float | None, info: ModelInfo, adapter) -> float | None:
    """The distilled guidance of a run: the caller's, the model folder's, the family's; None (and
    ``--guidance`` refused) for families without one."""
    if adapter.default_guidance is None:
        if guidance is not None:
            raise NotSupportedError(
                f"--guidance is distilled guidance, which {adapter.family} models do not have; "
                "use --true-cfg for classifier-free guidance"
            )
        return None
    if guidance is not None:
        return guidance
    return info.default_guidance if info.default_guidance is not None else adapter.default_guidance


def resolve_true_cfg(true_cfg: float | None, info: ModelInfo, adapter) -> float:
    """The classifier-free guidance scale of a run: the caller's, the model folder's, the family's."""
    if true_cfg is None:
        true_cfg = info.default_true_cfg if info.default_true_cfg is not None else adapter.default_true_cfg
    if isinstance(true_cfg, bool) or not isinstance(true_cfg, (int, float)) or true_cfg < 1:
        raise ValueError(
            f"--true-cfg must be a number >= 1 (1 = no classifier-free guidance), got {true_cfg!r}"
        )
    return true_cfg


def plan_run(prompts: list[str], config: GenerateConfig, model, info: ModelInfo | None, wrap, log) -> RunPlan:
    """Resolve ``config`` against the model (loading it); ``wrap(pipe)`` replaces the pipeline
    (a patch-parallel rank's strip pipeline), or None."""
    from ..models import adapter_for, get_handle

    c = config
    folder = None
    if model is None or isinstance(model, (str, os.PathLike)):
        folder = resolve_model(model)
        info = info or read_model_info(folder)
        factor = size_factor_of_folder(folder)
        if factor is not None:  # size mistakes are reported before loading gigabytes
            for value, what in ((c.height, "height"), (c.width, "width")):
                if value is not None:
                    hr.check_size(value, factor, what)
    info = info or ModelInfo()
    radius, down_factor, weights = clear_settings(c, info, folder)

    t0 = time.perf_counter()
    pipe, dev, model_name = _load(model, folder, info, c, log)
    load_seconds = time.perf_counter() - t0
    if wrap is not None:
        pipe = wrap(pipe)
    transformer = pipe.transformer
    adapter = adapter_for(transformer)
    if get_handle(transformer) is not None:
        raise ValueError("the pipeline's transformer is already linearized; call handle.restore() first")

    factor = size_factor(pipe)
    base_h, base_w = base_size(pipe, info)
    height, width = c.height or base_h, c.width or base_w
    grid = (hr.check_size(height, factor, "height"), hr.check_size(width, factor, "width"))
    text_len = max_sequence_length(pipe, info)
    steps = c.steps or info.default_steps or adapter.default_steps
    guidance = resolve_guidance(c.guidance, info, adapter)
    true_cfg = resolve_true_cfg(c.true_cfg, info, adapter)
    heads, head_dim, layers = adapter.attention_geometry(transformer)

    stage1 = stage1_sigmas = None
    if c.highres:
        if height * width <= base_h * base_w:
            raise ValueError(
                f"--highres upscales from the base size {base_h}x{base_w}; the target {height}x{width} "
                "is not larger (drop --highres, or ask for a larger --height/--width)"
            )
        stage1 = hr.stage1_size(height, width, base_h, base_w, factor)
        tokens1 = (stage1[0] // factor) * (stage1[1] // factor)
        stage1_sigmas = schedule.denoising_sigmas(
            pipe.scheduler, steps, tokens1, c.shift_rule, mu=adapter.schedule_mu(pipe, tokens1, steps)
        ).tolist()
    # the sigmas of every run, set here so that the PNGs can say which were used
    tokens = grid[0] * grid[1]
    sigmas = schedule.denoising_sigmas(
        pipe.scheduler, steps, tokens, c.shift_rule, c.strength if c.highres else 1.0,
        mu=adapter.schedule_mu(pipe, tokens, steps),
    ).tolist()  # fmt: skip

    scale = None
    if c.proportional_attention:
        base_seq = (base_h // factor) * (base_w // factor) + text_len
        scale = hr.proportional_scale(grid[0] * grid[1] + text_len, base_seq, head_dim)
    return RunPlan(
        config=c, prompts=prompts, pipe=pipe, adapter=adapter, device=dev, model_name=model_name,
        load_seconds=load_seconds, height=height, width=width, grid=grid, text_len=text_len, steps=steps,
        guidance=guidance, true_cfg=true_cfg, radius=radius, down_factor=down_factor, weights=weights,
        stage1=stage1, sigmas=sigmas, stage1_sigmas=stage1_sigmas, scale=scale, heads=heads,
        head_dim=head_dim, layers=layers, vae_tiled=hr.wants_vae_tiles(pipe.vae, height, width, c.vae_tiling),
    )  # fmt: skip
