"""The one model a ``cleardit serve`` process holds: loaded once at startup, used by every request."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import DEFAULT_RADIUS
from ..pipelines.loading import (
    ModelInfo,
    base_size,
    folder_adapter,
    load_pipeline,
    read_model_info,
    resolve_device,
    resolve_dtype,
    resolve_model,
    size_factor,
)


@dataclass
class LoadedModel:
    """A loaded pipeline and what the page needs to know about it.

    Attributes:
        pipe: the diffusers pipeline (``generate`` linearizes it per request and restores it after).
        info: its folder's ``cleardit.json``, with ``name`` set as ``cleardit generate`` names the model
            in the PNG metadata.
        folder: where it was loaded from.
        device: the torch device it lives on.
        size_factor: pixels per token side: width and height must be multiples of it.
        base_height, base_width: the size it was trained at (the page's default size).
        default_steps: the denoising steps used when the page asks for none.
        default_radius: the radius of the model's own CLEAR weights, else the library default.
        default_weights: the CLEAR weights file shipped in the folder (``cleardit.json``), or None.
        load_seconds: how long loading took.
    """

    pipe: object
    info: ModelInfo
    folder: Path
    device: object
    size_factor: int
    base_height: int
    base_width: int
    default_steps: int
    default_radius: int
    default_weights: Path | None
    load_seconds: float

    @property
    def name(self) -> str:
        return self.info.name


def load_model(
    model: str | None = None, device: str | None = "auto", dtype: str | None = "auto"
) -> LoadedModel:
    """Load ``model`` (None: the shipped mini model; a pipeline folder; a cached Hugging Face id).

    Raises ``ModelNotFoundError`` (what to download or pass) or ``ValueError`` (a bad folder, device or
    dtype), as ``cleardit generate`` does.
    """
    from ..models import adapter_for

    folder = resolve_model(model)
    if folder_adapter(folder).video:  # before loading gigabytes
        raise ValueError(
            f"{folder} holds a video model; cleardit serve makes images. Generate videos with "
            "cleardit generate --model ... --frames N (docs/video.md)"
        )
    info = read_model_info(folder)
    dev = resolve_device(device)
    start = time.perf_counter()
    pipe = load_pipeline(folder, dev, resolve_dtype(dtype, dev), progress=False)
    load_seconds = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    # the name cleardit generate writes into its PNGs, so both carry the same metadata
    name = str(model) if model is not None else f"cleardit-mini ({folder})"
    info = dataclasses.replace(info, name=name)
    base_h, base_w = base_size(pipe, info)
    weights = folder / info.clear_weights if info.clear_weights else None
    return LoadedModel(
        pipe=pipe,
        info=info,
        folder=folder,
        device=dev,
        size_factor=size_factor(pipe),
        base_height=base_h,
        base_width=base_w,
        default_steps=info.default_steps or adapter_for(pipe).default_steps,
        default_radius=info.clear_radius or DEFAULT_RADIUS,
        default_weights=weights,
        load_seconds=load_seconds,
    )
