"""Videos on disk: MP4 (H.264 through PyAV, whose wheel carries FFmpeg), an animated GIF preview and
a JSON sidecar, each written to a temporary file and renamed, so nothing half-written is left.

A video in memory is a uint8 array [frames, height, width, 3] (RGB).
"""

from __future__ import annotations

import io
import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes

DEFAULT_FPS = 16  # Wan 2.1's frame rate
PREVIEW_WIDTH = 320  # pixels: the GIF is a glance, the MP4 is the result


def _av():
    try:
        import av
    except ImportError as exc:
        raise ImportError(
            "writing and reading videos needs PyAV: pip install 'cleardit[video]' (or pip install av)"
        ) from exc
    return av


def as_uint8_video(frames) -> np.ndarray:
    """A pipeline's video (float frames in [0, 1] or uint8, [F, H, W, 3], or a list of PIL images) as
    uint8 [F, H, W, 3]."""
    if isinstance(frames, list | tuple):
        frames = np.stack([np.asarray(f.convert("RGB")) if hasattr(f, "convert") else f for f in frames])
    video = np.asarray(frames)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"a video is [frames, height, width, 3] RGB; got shape {video.shape}")
    if video.dtype != np.uint8:
        video = (np.clip(video.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return video


def encode_mp4(video: np.ndarray, fps: int = DEFAULT_FPS, crf: int = 18) -> bytes:
    """H.264 (yuv420p) MP4 bytes of a uint8 video; odd sizes are padded by one edge pixel (yuv420p
    needs even sides) and the frame count is kept exactly."""
    av = _av()

    video = as_uint8_video(video)
    frames, height, width, _ = video.shape
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        video = np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(int(fps), 1))
        stream.width, stream.height = video.shape[2], video.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return buffer.getvalue()


def save_mp4(video: np.ndarray, path: str | os.PathLike, fps: int = DEFAULT_FPS) -> Path:
    return atomic_write_bytes(path, encode_mp4(video, fps))


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Every frame of a video file as uint8 [F, H, W, 3]."""
    av = _av()

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    return np.stack(frames)


def save_gif_preview(video: np.ndarray, path: str | os.PathLike, fps: int = DEFAULT_FPS) -> Path:
    """A looping GIF at most ``PREVIEW_WIDTH`` pixels wide."""
    from PIL import Image

    video = as_uint8_video(video)
    height, width = video.shape[1:3]
    scale = min(1.0, PREVIEW_WIDTH / width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    images = [Image.fromarray(frame).resize(size, Image.Resampling.LANCZOS) for frame in video]
    buffer = io.BytesIO()
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
    )
    return atomic_write_bytes(path, buffer.getvalue())


def save_sidecar(metadata: dict, path: str | os.PathLike) -> Path:
    """Every parameter of a video as indented JSON."""
    return atomic_write_bytes(path, (json.dumps(metadata, indent=2, default=str) + "\n").encode())
