"""Video comparisons: PSNR between two videos, and temporal consistency (the PSNR between consecutive
frames of one video: higher is steadier).

Videos are uint8 arrays [frames, height, width, 3]. A video's PSNR comes from the mean squared error
over all its frames (frames are not averaged in dB: an identical frame would count as infinitely
good), so it is +inf only when every frame is identical.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .image_metrics import psnr


def frames_tensor(video: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float64 [F, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2).double() / 255.0


def _psnr_of_mse(mse: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def frame_psnr(reference: np.ndarray, test: np.ndarray) -> list[float]:
    """PSNR (dB) of each frame of ``test`` against the same frame of ``reference``."""
    _check_same_shape(reference, test)
    return psnr(frames_tensor(reference), frames_tensor(test)).tolist()


def video_psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR (dB) of ``test`` against ``reference`` over all frames."""
    _check_same_shape(reference, test)
    return _psnr_of_mse(float((frames_tensor(test) - frames_tensor(reference)).square().mean()))


def temporal_psnr(video: np.ndarray) -> float | None:
    """Temporal consistency: the PSNR (dB) between each frame and the next, over all pairs; None for a
    one-frame video (nothing to compare)."""
    if video.shape[0] < 2:
        return None
    frames = frames_tensor(video)
    return _psnr_of_mse(float((frames[1:] - frames[:-1]).square().mean()))


def _check_same_shape(reference: np.ndarray, test: np.ndarray) -> None:
    if reference.shape != test.shape:
        raise ValueError(f"videos of different shapes cannot be compared: {reference.shape} vs {test.shape}")
