"""Checkpoint files of the mini trainer: atomic writes, RNG states, configuration checks on resume.

A checkpoint is one ``torch.save`` file (``checkpoint.pt`` in the work dir) holding everything a
resumed run needs: the stage and the next step, the model and optimizer states, the EMA weights,
the per-step losses, the elapsed time and the RNG states of torch, numpy and Python. It is written
to a temporary file in the same folder, flushed to disk and renamed over the previous one
(``os.replace``), so a kill at any moment leaves either the previous or the new checkpoint, never a
half-written file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from cleardit.atomic import atomic_torch_save, atomic_write_text
from cleardit.training import config_differences

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "cleardit-mini-train-v1"


def rng_states() -> dict:
    """The global RNG states of torch (CPU), numpy and Python."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def checkpoint_path(work_dir: str | os.PathLike) -> Path:
    return Path(work_dir) / CHECKPOINT_FILE


def load_checkpoint(work_dir: str | os.PathLike) -> dict | None:
    """The work dir's checkpoint, or None when there is none. A file of another format is an error."""
    path = checkpoint_path(work_dir)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle / zip errors of a damaged file
        raise ValueError(f"{path} is not a readable mini-trainer checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a mini-trainer checkpoint of format {CHECKPOINT_FORMAT!r} "
            f"(found {state.get('format') if isinstance(state, dict) else type(state).__name__!r}); "
            "use another --work-dir"
        )
    return state


def check_same_config(work_dir, stored: dict, requested: dict) -> None:
    """Raise ValueError naming every field where the work dir's run differs from the requested one."""
    lines = config_differences(stored, requested, stored_as="work dir has", requested_as="this run asks for")
    if lines:
        raise ValueError(
            f"--resume: the work dir {work_dir} holds a run of another configuration ({lines}). "
            "Resume with the same options (e.g. the same --quick/--seed/--vae-steps/--dit-steps/--batch), "
            "or pass another --work-dir to start a new run."
        )


__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "atomic_torch_save",
    "atomic_write_text",
    "check_same_config",
    "checkpoint_path",
    "load_checkpoint",
    "rng_states",
    "set_rng_states",
]
