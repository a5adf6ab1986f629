"""Video comparisons: frame-by-frame PSNR between two videos, and temporal consistency (the mean PSNR
between consecutive frames of one video: higher is steadier).

Videos are uint8 arrays [frames, height, width, 3].
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .image_metrics import psnr


def frames_tensor(video: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float64 [F, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2).double() / 255.0


def _finite_mean(values: torch.Tensor) -> float:
    """The mean PSNR; identical frame pairs (inf dB) count as inf only when every pair is identical."""
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return math.inf
    return float(finite.mean())


def frame_psnr(reference: np.ndarray, test: np.ndarray) -> list[float]:
    """PSNR (dB) of each frame of ``test`` against the same frame of ``reference``."""
    if reference.shape != test.shape:
        raise ValueError(f"videos of different shapes cannot be compared: {reference.shape} vs {test.shape}")
    return psnr(frames_tensor(reference), frames_tensor(test)).tolist()


def video_psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean frame PSNR (dB) of ``test`` against ``reference`` (identical frames left out of the mean)."""
    return _finite_mean(torch.tensor(frame_psnr(reference, test)))


def temporal_psnr(video: np.ndarray) -> float:
    """Temporal consistency: the mean PSNR (dB) between consecutive frames (NaN for one frame)."""
    if video.shape[0] < 2:
        return math.nan
    frames = frames_tensor(video)
    return _finite_mean(psnr(frames[:-1], frames[1:]))
