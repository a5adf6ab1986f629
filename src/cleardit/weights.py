"""CLEAR checkpoints in the reference release's key names (safetensors only).

A file holds only the linearized parameters (image-stream to_q/to_k/to_v/to_out and the pooling
``spatial_weight``), under the model's own parameter names, plus metadata saying what it is for.
Reference-release files carry no such metadata; their radius and down factor are read from the
released file names (``clear_local_16_down_4.safetensors``) when present.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .models.handle import ClearHandle, get_handle
from .models.registry import adapter_for

FORMAT = "cleardit-clear-weights-v1"
_RELEASE_NAME = re.compile(r"clear_local_(\d+)(?:_down_(\d+))?")


@dataclass
class LoadReport:
    """What ``load_weights`` did: keys it copied, keys the model has but the file lacks."""

    path: str
    used: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    radius: int | None = None
    down_factor: int | None = None

    def __str__(self) -> str:
        s = f"loaded {len(self.used)} tensors from {self.path}"
        return s + (f"; {len(self.missing)} model tensors not in the file" if self.missing else "")


def _require_handle(model: nn.Module) -> ClearHandle:
    handle = get_handle(model)
    if handle is None:
        raise ValueError(
            f"this {type(model).__name__} is not linearized; call cleardit.linearize(model, radius=...) "
            "with the checkpoint's radius and down factor first"
        )
    return handle


def save_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the linearized parameters of ``model`` to a safetensors file, atomically."""
    handle = _require_handle(model)
    cfg = handle.config
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in handle.clear_state_dict().items()}
    metadata = {
        "format": FORMAT,
        "radius": str(cfg.radius),
        "down_factor": "none" if cfg.down_factor is None else str(cfg.down_factor),
        "base_model": type(model).__name__,
        "family": adapter_for(model).family,
    }
    if cfg.temporal_radius is not None:  # video: the window's depth in latent frames
        metadata["temporal_radius"] = str(cfg.temporal_radius)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def declared_geometry(path: Path, metadata: dict[str, str]) -> tuple[int | None, int | None, bool]:
    """(radius, down_factor, known) from cleardit metadata, else from a reference-release file name."""
    if metadata.get("format") == FORMAT:
        df = metadata.get("down_factor", "none")
        return int(metadata["radius"]), None if df == "none" else int(df), True
    match = _RELEASE_NAME.search(path.name)
    if match:
        return int(match.group(1)), int(match.group(2)) if match.group(2) else None, True
    return None, None, False


def declared_temporal_radius(metadata: dict[str, str]) -> int | None:
    """The temporal radius cleardit metadata records (video weights); None: every frame, or images."""
    value = metadata.get("temporal_radius")
    return int(value) if value is not None else None


def load_weights(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> LoadReport:
    """Load a CLEAR checkpoint (reference release or ``save_weights``) into a linearized model.

    Checks that the file was made for the same radius / down factor (from its metadata or the
    reference file name) and, for video weights, the same temporal radius, and that every tensor's
    shape matches. With ``strict`` (default) a file
    missing some linearized parameter is an error; keys the model does not have always are.
    """
    handle = _require_handle(model)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLEAR weights file not found: {path}")
    cfg = handle.config
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc

    radius, down_factor, known = declared_geometry(path, metadata)
    if known and (radius, down_factor) != (cfg.radius, cfg.down_factor):
        raise ValueError(
            f"{path.name} was made for radius={radius}, down_factor={down_factor}, but the model is "
            f"linearized with radius={cfg.radius}, down_factor={cfg.down_factor}; linearize with the "
            "checkpoint's settings"
        )
    base = metadata.get("base_model")
    if base is not None and base != type(model).__name__:
        raise ValueError(f"{path.name} holds weights for a {base}, not a {type(model).__name__}")
    family = adapter_for(model).family
    # files without cleardit's metadata are the reference release's: FLUX.1 weights, whose names
    # and shapes another FLUX-shaped family (Chroma) would accept without complaint
    stored = metadata.get("family") or (None if metadata.get("format") == FORMAT else "flux")
    if stored is not None and stored != family:
        raise ValueError(
            f"{path.name} holds CLEAR weights for {stored} models, not for this {family} model "
            f"({type(model).__name__}); train weights for it with cleardit distill"
        )

    declared_rt = declared_temporal_radius(metadata)
    if metadata.get("format") == FORMAT and declared_rt != cfg.temporal_radius:
        raise ValueError(
            f"{path.name} was made for temporal_radius={declared_rt}, but the model is linearized with "
            f"temporal_radius={cfg.temporal_radius}; linearize with the checkpoint's settings"
        )

    params = dict(handle.named_clear_parameters())
    unexpected = [k for k in keys if k not in params]
    if unexpected:
        hint = ""
        if any(k.endswith("spatial_weight") for k in unexpected) and cfg.down_factor is None:
            hint = " (the file has pooling weights: linearize with down_factor=...)"
        raise ValueError(
            f"{path.name} has {len(unexpected)} tensors the linearized model does not, e.g. "
            f"{unexpected[:3]}{hint}"
        )
    missing = [k for k in params if k not in tensors]
    if missing and strict:
        hint = ""
        if any(k.endswith("spatial_weight") for k in missing):
            hint = " (the model has pooling weights the file lacks: was it trained without down_factor?)"
        raise ValueError(
            f"{path.name} lacks {len(missing)} of the model's {len(params)} CLEAR tensors, e.g. "
            f"{missing[:3]}{hint}; pass strict=False to load what is there"
        )
    for k in keys:
        if tuple(tensors[k].shape) != tuple(params[k].shape):
            raise ValueError(
                f"{path.name}: tensor {k} has shape {tuple(tensors[k].shape)}, the model expects "
                f"{tuple(params[k].shape)}; the checkpoint is for a different model size or down factor"
            )
    with torch.no_grad():
        for k in keys:
            params[k].copy_(tensors[k].to(device=params[k].device, dtype=params[k].dtype))
    adapter_for(model).sync_fused_projections(model)
    return LoadReport(str(path), used=sorted(keys), missing=missing, radius=radius, down_factor=down_factor)
