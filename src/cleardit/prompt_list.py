"""Prompt lists: the ``--prompts FILE`` format (one prompt per non-empty line, UTF-8) and the checks
of a prompt list given in Python. One home for ``generate``, ``eval model`` and ``distill data``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file (each stripped); a clear ValueError naming
    the file if it cannot be read or holds no prompt."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--prompts {path}: cannot read the file ({exc})") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: the file has no prompts (one prompt per line)")
    return prompts


def prompt_list(prompts: str | Sequence[str], *, one_line: bool = False) -> list[str]:
    """``prompts`` (one string, or a sequence of strings) as a list; ValueError unless it holds at
    least one prompt and every prompt is a non-empty string. ``one_line``: also refuse line breaks
    inside a prompt (lists that are written back one prompt per line)."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items or any(not isinstance(p, str) for p in items):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    if any(not p.strip() for p in items):
        raise ValueError("prompts must not be empty")
    if one_line and any("\n" in p or "\r" in p for p in items):
        raise ValueError("prompts must be one line each (they are stored one prompt per line)")
    return items
