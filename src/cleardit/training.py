"""Pieces every trainer shares (the distillation trainer, the mini model's lab): the learning-rate
schedule and the check that a resumed run asks for the configuration its checkpoint was made with."""

from __future__ import annotations

import math
from collections.abc import Mapping


def learning_rate(
    peak: float, step: int, *, warmup: int = 0, total: int | None = None, hold: int = 0, floor: float = 0.1
) -> float:
    """The learning rate of 0-based ``step``: linear warm-up to ``peak`` over ``warmup`` steps (step
    0 gets ``peak / warmup``), then ``peak``; with ``total``, ``peak`` until step ``max(warmup,
    hold)`` and a cosine from there down to ``floor * peak`` at ``total``."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if total is None:
        return peak
    start = max(warmup, hold)
    if step < start:
        return peak
    t = (step - start) / max(1, total - start)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _norm(value):
    """Tuples and lists compare equal (a configuration read back from a checkpoint has lists)."""
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    return value


def config_differences(
    stored: Mapping, requested: Mapping, *, stored_as: str = "checkpoint", requested_as: str = "now"
) -> str | None:
    """None when the two configurations agree, else one ``"key: <stored_as> X, <requested_as> Y"``
    per differing key (sorted, joined by "; "; a key one side lacks shows as ``<missing>``)."""
    missing = object()

    def shown(value) -> str:
        return "<missing>" if value is missing else repr(value)

    diffs = [
        f"{k}: {stored_as} {shown(stored.get(k, missing))}, {requested_as} {shown(requested.get(k, missing))}"
        for k in sorted(set(stored) | set(requested))
        if _norm(stored.get(k, missing)) != _norm(requested.get(k, missing))
    ]
    return "; ".join(diffs) or None
