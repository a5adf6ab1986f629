"""Find the network weights of the learned metrics on this machine, offline.

Learned metrics (LPIPS, CLIP-I, DINO, FID, IS) need pretrained networks. Nothing is downloaded at
run time: every lookup is a path check on local folders, in this order:

1. an explicit weights folder (``--weights-dir``, else the ``CLEARDIT_WEIGHTS_DIR`` variable);
2. the local Hugging Face cache (``cleardit.environment.hf_cache_dir``: ``HF_HUB_CACHE``, else
   ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), layout ``models--ORG--NAME/snapshots/REV/``;
3. the torch hub cache (``TORCH_HOME/hub/checkpoints``, as ``torch.hub.get_dir()`` says);
4. data files that an installed package ships (found without importing the package).

When something is missing, :class:`MissingWeightsError` says in one line which model id or file
to fetch and the folder to put it in.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ..environment import hf_cache_dir

ENV_WEIGHTS_DIR = "CLEARDIT_WEIGHTS_DIR"

# Files that hold a transformers model's weights (one of them must be present).
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class MissingWeightsError(FileNotFoundError):
    """A learned metric's weights are not on this machine; the message says what to fetch and where."""


def torch_checkpoints_dir() -> Path:
    """The torch hub checkpoint folder (``TORCH_HOME/hub/checkpoints``), read at call time."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def package_file(package: str, *parts: str) -> Path | None:
    """A data file shipped inside an installed package, located without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*parts)
        if path.is_file():
            return path
    return None


def sha1_of(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _hf_folder_problem(folder: Path, required: tuple[str, ...]) -> str | None:
    """None if ``folder`` holds a loadable model, else the name of what is missing."""
    missing = [name for name in ("config.json", *required) if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in HF_WEIGHT_FILES):
        missing.append("model.safetensors (or pytorch_model.bin)")
    return ", ".join(missing) if missing else None


def _snapshots(repo_dir: Path) -> list[Path]:
    """Snapshot folders of one cached repo: the one ``refs/main`` names first, then newest first."""
    snap_root = repo_dir / "snapshots"
    if not snap_root.is_dir():
        return []
    found = sorted((p for p in snap_root.iterdir() if p.is_dir()), key=lambda p: -p.stat().st_mtime)
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        main = snap_root / ref.read_text().strip()
        if main in found:
            found.remove(main)
            found.insert(0, main)
    return found


@dataclass
class WeightsResolver:
    """Looks up metric weights in local folders only; see the module docstring for the order.

    ``weights_dir`` None means the ``CLEARDIT_WEIGHTS_DIR`` variable (if set).
    """

    weights_dir: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        chosen = self.weights_dir if self.weights_dir is not None else os.environ.get(ENV_WEIGHTS_DIR)
        self.weights_dir = Path(chosen).expanduser() if chosen else None
        if self.weights_dir is not None and not self.weights_dir.is_dir():
            raise ValueError(
                f"weights folder {self.weights_dir} does not exist; create it or fix --weights-dir / "
                f"{ENV_WEIGHTS_DIR}"
            )

    # ----------------------------------------------------------------- Hugging Face models
    def hf_candidates(self, model_id: str) -> list[Path]:
        """Folders that could hold ``model_id`` (existing ones only), best first."""
        flat = model_id.replace("/", "--")
        cands: list[Path] = []
        if self.weights_dir is not None:
            w = self.weights_dir
            cands += [w / model_id, w / flat, w / model_id.split("/")[-1]]
            cands += _snapshots(w / f"models--{flat}")
        cands += _snapshots(hf_cache_dir() / f"models--{flat}")
        seen, out = set(), []
        for c in cands:
            if c.is_dir() and c not in seen:
                seen.add(c)
                out.append(c)
        return out

    def find_hf_model(self, model_id: str, *, required: tuple[str, ...] = (), what: str = "") -> Path:
        """The local folder of a transformers model (``config.json`` + weights + ``required``).

        ``model_id`` may also be a local folder. Raises :class:`MissingWeightsError`.
        """
        local = Path(model_id).expanduser()
        if local.is_dir():
            problem = _hf_folder_problem(local, required)
            if problem:
                raise MissingWeightsError(f"{what or model_id}: folder {local} lacks {problem}")
            return local
        problems = []
        for folder in self.hf_candidates(model_id):
            problem = _hf_folder_problem(folder, required)
            if problem is None:
                return folder
            problems.append(f"{folder} lacks {problem}")
        files = " ".join(("config.json", *required, "model.safetensors"))
        where = f"{hf_cache_dir()}/models--{model_id.replace('/', '--')}/ (the Hugging Face cache)"
        if self.weights_dir is not None:
            where += f" or {self.weights_dir / model_id.replace('/', '--')}/"
        found = f" (found {'; '.join(problems)})" if problems else ""
        raise MissingWeightsError(
            f"{what + ': ' if what else ''}model {model_id} is not on this machine{found}; on a machine with "
            f"internet run `hf download {model_id} {files}` and copy it to {where}"
        )

    # ----------------------------------------------------------------- single files
    def file_candidates(self, filename: str) -> list[Path]:
        dirs = ([self.weights_dir] if self.weights_dir is not None else []) + [torch_checkpoints_dir()]
        return [d / filename for d in dirs]

    def find_file(self, filename: str, *, what: str, source: str) -> Path:
        """A weights file by name in the weights folder, then the torch hub checkpoint folder.

        ``what`` names the network, ``source`` says where the file comes from (for the message).
        """
        for path in self.file_candidates(filename):
            if path.is_file():
                return path
        dirs = " or ".join(str(p.parent) for p in self.file_candidates(filename))
        raise MissingWeightsError(f"{what}: file {filename} ({source}) not found; put it in {dirs}")
