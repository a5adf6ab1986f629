"""High-resolution tricks of the CLEAR reference notebooks, as small reusable pieces.

* Two-stage "SDEdit" upscaling: generate near the model's base size with full attention, upscale
  the image (or the latents), re-noise to the noise level ``strength`` and denoise at the target
  size with CLEAR. The family's image-to-image pipeline built from the same components runs stage 2
  on the sigmas of ``cleardit.schedule.denoising_sigmas``, whose first sigma is ``strength``.
* NTK-scaled RoPE: the rotary base ``theta`` multiplied by a factor while generating.
* Proportional attention: softmax scale ``sqrt(log_base(N) / d)``, ``base`` the sequence length the
  model was trained at, ``N`` the one at the target size (equal to 1/sqrt(d) at the base size).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..models import adapter_for


def check_size(pixels: int, factor: int, what: str) -> int:
    """Tokens along one side; a ValueError naming the nearest valid sizes if not a multiple of ``factor``."""
    if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 1:
        raise ValueError(f"--{what} must be a positive whole number of pixels, got {pixels!r}")
    if pixels % factor:
        lo = pixels // factor * factor
        hi = lo + factor
        nearest = f"{hi}" if lo == 0 else f"{lo} or {hi}"
        raise ValueError(
            f"--{what} {pixels} is not a multiple of {factor} (pixels per token: VAE scale x 2); "
            f"nearest valid sizes: {nearest}"
        )
    return pixels // factor


def stage1_size(height: int, width: int, base_height: int, base_width: int, factor: int) -> tuple[int, int]:
    """Stage-1 size of the two-stage recipe: the target's aspect ratio at about the base area.

    Rounded to multiples of ``factor`` and never larger than the target.
    """
    area = base_height * base_width
    h = math.sqrt(area * height / width)
    w = area / h
    h1 = max(factor, min(height, int(round(h / factor)) * factor))
    w1 = max(factor, min(width, int(round(w / factor)) * factor))
    return h1, w1


def proportional_scale(seq_len: int, base_seq_len: int, head_dim: int) -> float:
    """Softmax scale ``sqrt(log_base(N) / d)`` for ``N = seq_len`` tokens, ``base = base_seq_len``."""
    if base_seq_len < 2 or seq_len < 2:
        raise ValueError(
            f"proportional attention needs sequence lengths >= 2, got {seq_len} and {base_seq_len}"
        )
    return math.sqrt(math.log(seq_len) / math.log(base_seq_len) / head_dim)


@contextlib.contextmanager
def ntk_rope(transformer: nn.Module, factor: float | None) -> Iterator[None]:
    """Multiply the transformer's RoPE ``theta`` by ``factor`` inside the block (None/1: no change)."""
    if factor is None or factor == 1:
        yield
        return
    if not factor > 0:
        raise ValueError(f"--ntk-factor must be positive, got {factor}")
    with adapter_for(transformer).rope_theta_scaled(transformer, factor):
        yield


@contextlib.contextmanager
def query_scale(transformer: nn.Module, multiplier: float | None) -> Iterator[None]:
    """Scale every attention query by ``multiplier`` (after its norm; RoPE is linear, so this is the
    same as multiplying the softmax scale). Used for full attention, whose processor has no scale
    argument; CLEAR takes its scale from ``ClearConfig(scale=...)`` instead."""
    if multiplier is None or multiplier == 1:
        yield
        return
    hooks = []

    def hook(_module, _args, output):
        return output * multiplier

    try:
        for norm in adapter_for(transformer).query_norms(transformer):
            hooks.append(norm.register_forward_hook(hook))
        yield
    finally:
        for h in hooks:
            h.remove()


def upscale_latents(
    pipe, packed: torch.Tensor, size: tuple[int, int], target: tuple[int, int]
) -> torch.Tensor:
    """Packed latents of a ``size`` image -> unpacked latents of a ``target`` image (bicubic)."""
    latents = adapter_for(pipe).unpack_latents(pipe, packed, size)
    th, tw = (t * n // s for t, n, s in zip(target, latents.shape[-2:], size, strict=True))
    return F.interpolate(latents.float(), size=(th, tw), mode="bicubic", align_corners=False).to(
        latents.dtype
    )


def wants_vae_tiles(vae, height: int, width: int, tiling: bool | None) -> bool:
    """Whether ``height`` x ``width`` images go through the VAE in tiles; ``tiling`` None = auto.

    Auto tiles images larger than the VAE's ``sample_size`` (the size it was trained at). A VAE's
    GroupNorm statistics are those of a whole image: on a much larger one they drift, and so do the
    colours (the mini VAE at 4x its size kept 67% of held-out scenes' facts in a plain encode +
    decode, 100% in 128 px tiles; docs/mini_model.md). Tiles also bound the memory at 4K-8K.
    """
    if tiling is not None:
        return bool(tiling)
    trained = getattr(vae.config, "sample_size", None)
    trained = trained[0] if isinstance(trained, (list, tuple)) else trained
    return hasattr(vae, "enable_tiling") and isinstance(trained, int) and max(height, width) > trained


@contextlib.contextmanager
def vae_tiles(vae, on: bool) -> Iterator[None]:
    """The VAE encodes and decodes in its tiles inside the block when ``on``; its setting is restored."""
    if not on:
        yield
        return
    if not hasattr(vae, "enable_tiling"):
        raise ValueError(f"--vae-tiling: {type(vae).__name__} has no tiled mode; drop --vae-tiling")
    before = getattr(vae, "use_tiling", False)
    vae.enable_tiling()
    try:
        yield
    finally:
        vae.use_tiling = before


def decode_latents(pipe, packed: torch.Tensor, size: tuple[int, int], output_type: str = "pil"):
    """Packed latents of a ``size`` image -> images (PIL by default), as the pipeline decodes them."""
    return adapter_for(pipe).decode_latents(pipe, packed, size, output_type)


def img2img_pipeline(pipe):
    """The family's image-to-image pipeline sharing every module of ``pipe`` (no copies)."""
    return adapter_for(pipe).img2img_pipeline(pipe)
