"""The distillation checkpoint: one file, written atomically, holding what a resumed run needs.

Only the trainable parameters are stored (the frozen ones are the original model, loaded again on
resume), with the optimizer state, the next step, the loss log and the elapsed time. Data order,
noise and learning rate are functions of the step, so no RNG state is needed to continue exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..atomic import atomic_torch_save
from ..training import config_differences

FORMAT = "cleardit-distill-checkpoint-v1"


def save_checkpoint(
    path: str | os.PathLike,
    config: dict,
    step: int,
    params: dict[str, torch.Tensor],
    optimizer_state: dict,
    log: list[dict],
    seconds: float,
    deepspeed_state: str | None = None,
) -> Path:
    """Write the checkpoint; ``deepspeed_state`` names the accelerate.save_state folder of DeepSpeed runs."""
    state = {
        "format": FORMAT,
        "config": config,
        "step": step,
        "params": params,
        "optimizer": optimizer_state,
        "log": log,
        "seconds": seconds,
        "deepspeed_state": deepspeed_state,
    }
    return atomic_torch_save(state, path)


def load_checkpoint(path: str | os.PathLike, config: dict) -> dict | None:
    """The checkpoint at ``path`` (None if there is none), refused if made with another ``config``."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip / unpickling errors of a damaged or foreign file
        raise ValueError(
            f"{path} is not a readable distillation checkpoint ({exc}); use another --output"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a cleardit distillation checkpoint; use another --output")
    detail = config_differences(state["config"], config)
    if detail:
        raise ValueError(
            f"--resume: {path} was made with other settings ({detail}); resume with the same options, "
            "or pass another --output to start a new run"
        )
    return state
