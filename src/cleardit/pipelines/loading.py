"""Find and load a supported diffusers pipeline offline: a local folder or the local HF cache.

``resolve_model`` turns what the user typed (nothing, a folder, a Hugging Face id) into a local
folder, without ever touching the network; ``load_pipeline`` loads it. A folder may carry a small
``cleardit.json`` (:class:`ModelInfo`) saying what diffusers' config cannot: the base resolution
the model was trained at, its text length, default steps and guidance, and an optional CLEAR
checkpoint shipped with it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..environment import hf_cache_dir, resolve_device  # noqa: F401 (re-exported)

# The shipped mini model lives here once trained (cleardit.mini.pipeline; trained by examples/mini_model).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "mini" / "weights"
MODEL_INFO_FILE = "cleardit.json"
MODEL_INFO_FORMAT = "cleardit-model-info-v1"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class ModelNotFoundError(FileNotFoundError):
    """The model is not on this machine; the message says what to download or pass."""


@dataclass
class ModelInfo:
    """What ``cleardit.json`` in a pipeline folder says (every field optional in the file).

    Attributes:
        name: a display name.
        base_height, base_width: the resolution the model was trained at (pixels). Defaults for a
            folder without the file: diffusers' FLUX default (128 latent px * vae scale = 1024).
        max_sequence_length: T5 tokens per prompt (FLUX.1-dev: 512; the mini model: 40).
        default_steps, default_guidance: generation defaults.
        default_true_cfg: classifier-free guidance scale used when the caller gives none (the
            model was trained with dropped captions); absent = 1 (off).
        clear_weights: a CLEAR checkpoint file inside the folder, used when the caller passes none.
        clear_radius, clear_down_factor: what that checkpoint was trained for.
    """

    name: str | None = None
    base_height: int | None = None
    base_width: int | None = None
    max_sequence_length: int | None = None
    default_steps: int | None = None
    default_guidance: float | None = None
    default_true_cfg: float | None = None
    clear_weights: str | None = None
    clear_radius: int | None = None
    clear_down_factor: int | None = None

    def to_json(self) -> str:
        data = {"format": MODEL_INFO_FORMAT}
        data.update({k: v for k, v in asdict(self).items() if v is not None})
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "cleardit.json") -> ModelInfo:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{source} must hold a JSON object")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, folder: str | os.PathLike) -> Path:
        """Write ``cleardit.json`` into ``folder`` (atomically)."""
        path = Path(folder) / MODEL_INFO_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, path)
        return path


def read_model_info(folder: str | os.PathLike) -> ModelInfo:
    """The folder's ``cleardit.json``, or an empty ModelInfo when it has none."""
    path = Path(folder) / MODEL_INFO_FILE
    if not path.is_file():
        return ModelInfo()
    return ModelInfo.from_json(path.read_text(encoding="utf-8"), source=str(path))


def download_hint(repo_id: str) -> str:
    """The exact commands that fetch ``repo_id`` into the cache on a machine with internet."""
    cache = hf_cache_dir()
    return (
        f"on a machine with internet run:\n"
        f"    pip install -U huggingface_hub\n"
        f"    hf auth login    # gated models (FLUX.1-dev): accept the license on the hub first\n"
        f"    hf download {repo_id}\n"
        f"then copy its cache folder models--{repo_id.replace('/', '--')} into {cache} here "
        f"(or set HF_HUB_CACHE), or pass --model with a local folder holding the pipeline"
    )


def resolve_model(model: str | os.PathLike | None) -> Path:
    """The local folder of a diffusers pipeline, found without network access.

    Args:
        model: None for the shipped mini model, a folder holding ``model_index.json``, or a Hugging
            Face id (``owner/name``) already in the local cache.

    Raises:
        ModelNotFoundError: the model is not on this machine (the message says what to do).
        ValueError: the folder exists but is no diffusers pipeline.
    """
    if model is None:
        folder = DEFAULT_MODEL_DIR
        if not (folder / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"the shipped mini model is missing from {folder} (an incomplete checkout or install?); "
                "reinstall cleardit, or rebuild it with `python examples/mini_model/train.py` (a source "
                "checkout), or pass --model "
                "with a diffusers pipeline folder (one with model_index.json), or a Hugging Face id "
                "already in the local cache, e.g. --model black-forest-labs/FLUX.1-dev"
            )
        return folder
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise ValueError(
                f"--model {text}: not a diffusers pipeline folder (no model_index.json in it); pass the "
                "folder written by pipe.save_pretrained(...) or a Hugging Face id"
            )
        return path
    if not _REPO_ID.match(text):
        raise ModelNotFoundError(f"--model {text}: no such folder, and not a Hugging Face id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(text, cache_dir=str(hf_cache_dir()), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        raise ModelNotFoundError(
            f"--model {text} is not in the local Hugging Face cache ({hf_cache_dir()}); cleardit never "
            f"downloads at run time. {download_hint(text)}"
        ) from exc
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"--model {text}: the cached snapshot {folder} has no model_index.json (incomplete download?). "
            + download_hint(text)
        )
    return folder


def pipeline_class_name(folder: Path) -> str:
    try:
        return str(json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{folder / 'model_index.json'} is not readable JSON ({exc})") from exc


def size_factor_of_folder(folder: Path) -> int | None:
    """Pixels per token side (VAE scale * 2x2 packing) from ``vae/config.json``, without loading weights."""
    try:
        cfg = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        if "spatial_compression_ratio" in cfg:  # a video VAE (HunyuanVideo 1.5): the adapter's size_factor
            return None
        return 2 ** (len(cfg["block_out_channels"]) - 1) * 2
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": bfloat16 on CUDA, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)} or auto") from None


def folder_adapter(folder: Path):
    """The model adapter of the pipeline in ``folder`` (its ``model_index.json`` class)."""
    from ..models import adapter_for_pipeline_class, adapters

    name = pipeline_class_name(folder)
    adapter = adapter_for_pipeline_class(name)
    if adapter is None:
        known = ", ".join(c for a in adapters() for c in a.pipeline_classes)
        raise ValueError(f"{folder} holds a {name}; cleardit runs these text-to-image pipelines: {known}")
    return adapter


def load_pipeline(folder: Path, device: torch.device, dtype: torch.dtype, *, progress: bool = True):
    """The folder's text-to-image pipeline, offline, moved to ``device`` (``progress``: loading bars)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    adapter = folder_adapter(folder)
    bars = [
        m for m in (diffusers_logging, transformers_logging) if not progress and m.is_progress_bar_enabled()
    ]
    for m in bars:
        m.disable_progress_bar()
    try:
        pipe = adapter.load_pipeline(folder, dtype)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load the pipeline in {folder}: {exc}") from exc
    finally:
        for m in bars:
            m.enable_progress_bar()
    return pipe.to(device)


def max_sequence_length(pipe, info: ModelInfo) -> int:
    """Text tokens per prompt: cleardit.json, else what the family's tokenizer allows."""
    if info.max_sequence_length:
        return int(info.max_sequence_length)
    from ..models import adapter_for

    return adapter_for(pipe).max_text_tokens(pipe)


def size_factor(pipe) -> int:
    """Pixels per token side of a loaded pipeline (16 for FLUX.1)."""
    from ..models import adapter_for

    return adapter_for(pipe).size_factor(pipe)


def base_size(pipe, info: ModelInfo) -> tuple[int, int]:
    """(height, width) the model was trained at: cleardit.json, else the pipeline's default."""
    from ..models import adapter_for

    default = adapter_for(pipe).default_size(pipe)
    return int(info.base_height or default), int(info.base_width or info.base_height or default)
