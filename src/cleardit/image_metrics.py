"""PSNR and MS-SSIM between images: the one implementation behind ``cleardit eval`` and ``generate
--compare``. Torch only; MS-SSIM uses torchmetrics (the ``eval`` extra), imported when called.

Tensors are batches of pairs ``[B, 3, H, W]`` of floats in [0, 1] (data range 1), computed in
float64; the ``*_images`` functions take two PIL images.

MS-SSIM comes in two flavours:

* standard (``adapt=False``): torchmetrics' defaults, 5 scales, 11-px Gaussian window (sigma 1.5);
  it needs at least :data:`MS_SSIM_MIN_SIDE` px per side and refuses smaller images;
* adapted (``adapt=True``): :func:`ms_ssim_settings` picks as many scales and as wide a window as
  the image size allows (the mini model's 64-256 px images), the first scales' standard weights
  renormalised to sum 1.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# torchmetrics' (and the MS-SSIM paper's) weights of the 5 scales
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# standard MS-SSIM (5 scales, 11-px window) needs side // 16 > 10, i.e. at least 176 px per side
MS_SSIM_MIN_SIDE = 176


def psnr(ref: Tensor, test: Tensor) -> Tensor:
    """PSNR in dB per image pair ``[B, 3, H, W]`` -> ``[B]``: 10 log10(1 / MSE) in float64; identical
    images give +inf."""
    mse = (test.double() - ref.double()).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / mse)


def ms_ssim_settings(height: int, width: int) -> tuple[int, int, float]:
    """(scales, window, sigma) of the adapted MS-SSIM for an image size.

    torchmetrics' defaults (5 scales, 11-px window, sigma 1.5) need at least 176 px per side: it
    requires ``side >= 2**scales`` and ``side // (scales - 1)**2 > window - 1``, and the reflect
    padding needs the smallest scale wider than half the window. Smaller images keep as many scales
    as fit with a window of at least 7 px, then allow 5 and 3 px; the window's sigma shrinks with it
    (1.5 * (window - 1) / 10).
    """
    side = min(height, width)

    def fits(n: int, k: int) -> bool:
        return side >= 2**n and side // max(1, n - 1) ** 2 > k - 1 and side // 2 ** (n - 1) > (k - 1) // 2

    for windows in ((11, 9, 7), (5, 3)):
        for n in range(5, 0, -1):
            for k in windows:
                if fits(n, k):
                    return n, k, 1.5 * (k - 1) / 10
    raise ValueError(f"images of {height}x{width} px are too small for MS-SSIM")


def ms_ssim_note(height: int, width: int) -> str:
    """What the adapted MS-SSIM computes at this size, in words (for reports)."""
    n, k, sigma = ms_ssim_settings(height, width)
    if (n, k) == (5, 11):
        return "MS-SSIM: standard 5 scales, 11-px window"
    return f"MS-SSIM adapted to {height}x{width} px: {n} scales, {k}-px window (sigma {sigma:.2f})"


def ms_ssim(ref: Tensor, test: Tensor, *, adapt: bool = False) -> Tensor:
    """MS-SSIM per image pair ``[B, 3, H, W]`` -> ``[B]`` with torchmetrics, in float64 (in float32 the
    local variances E[x^2] - E[x]^2 lose enough digits to move the fourth decimal on flat regions).

    ``adapt=False``: the standard metric, ValueError below :data:`MS_SSIM_MIN_SIDE` px per side.
    ``adapt=True``: scales and window fitted to the size (:func:`ms_ssim_settings`).
    """
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    height, width = ref.shape[-2:]
    if not adapt:
        if min(height, width) < MS_SSIM_MIN_SIDE:
            raise ValueError(
                f"MS-SSIM needs images of at least {MS_SSIM_MIN_SIDE} px per side (5 scales, 11-px "
                f"window); these are {height}x{width}"
            )
        options = {}
    else:
        n, k, sigma = ms_ssim_settings(height, width)
        betas = MS_SSIM_BETAS[:n]
        options = {"kernel_size": k, "sigma": sigma, "betas": tuple(b / sum(betas) for b in betas)}
    out = multiscale_structural_similarity_index_measure(
        test.double(), ref.double(), data_range=1.0, reduction="none", **options
    )
    return out.reshape(-1)


def image_tensor(image) -> Tensor:
    """A PIL image as float64 ``[1, 3, H, W]`` in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def psnr_images(a, b) -> float:
    """PSNR in dB between two PIL images (data range 1); inf for identical images."""
    return float(psnr(image_tensor(a), image_tensor(b))[0])


def ms_ssim_images(a, b) -> tuple[float | None, str]:
    """Adapted MS-SSIM between two PIL images, and a note saying how (or why it was skipped: images
    too small, or torchmetrics not installed)."""
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        return None, "MS-SSIM skipped: torchmetrics is not installed (pip install torchmetrics)"
    ta, tb = image_tensor(a), image_tensor(b)
    try:
        note = ms_ssim_note(ta.shape[-2], ta.shape[-1])
    except ValueError as exc:
        return None, f"MS-SSIM skipped: {exc}"
    return float(ms_ssim(ta, tb, adapt=True)[0]), note
