"""Patch-parallel CLEAR inference: each rank holds a strip of image rows, only a band is exchanged.

``parallelize(transformer, radius=16)`` on every rank of a process group (``init_distributed``
under torchrun, or ``spawn`` for local processes), then call the model with the same full inputs
on every rank. ``strip_clear_attention`` is the attention-level function. ``generate_parallel``
is ``cleardit generate --devices N``. See docs/parallel.md.
"""

from ..attention.strips import (
    CommCounter,
    ParallelError,
    StripPlan,
    layer_comm_bytes,
    step_comm_bytes,
    strip_attention,
    strip_clear_attention,
)
from .launch import ParallelLaunchError, free_port, init_distributed, spawn

__all__ = [
    "CommCounter",
    "ParallelError",
    "ParallelHandle",
    "ParallelLaunchError",
    "StripPlan",
    "free_port",
    "generate_parallel",
    "init_distributed",
    "layer_comm_bytes",
    "parallelize",
    "spawn",
    "step_comm_bytes",
    "strip_attention",
    "strip_clear_attention",
]


def __getattr__(name: str):
    # The model adapters and the generation job import diffusers; load them only when asked for.
    if name in ("parallelize", "ParallelHandle"):
        from ..models import strips

        return getattr(strips, name)
    if name == "generate_parallel":
        from .generate import generate_parallel

        return generate_parallel
    raise AttributeError(f"module 'cleardit.parallel' has no attribute {name!r}")
