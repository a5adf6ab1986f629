"""The bundled prompt list of ``cleardit eval model``: 50 captions written for the shipped mini model.

``mini_prompts.txt`` (package data, one prompt per line) holds the captions of the first 50
scenes of the mini trainer's held-out stream for seed 0 (``cleardit.mini.train.heldout_scenes(50,
0)``): valid sentences of the procedural dataset's grammar with the three shapes the model is
trained on, which training never draws. ``cleardit.mini.adherence`` parses every one of them. To
rebuild the file (only needed if that stream changes)::

    python -c "from cleardit.mini.train import heldout_scenes; \\
        print(*(s.caption() for s in heldout_scenes(50, 0)), sep='\\n')" \\
        > src/cleardit/eval/mini_prompts.txt
"""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_PROMPTS_FILE = "mini_prompts.txt"


def bundled_prompts_path() -> Path:
    """Path of the bundled prompt list (``cleardit/eval/mini_prompts.txt``)."""
    return Path(__file__).resolve().parent / BUNDLED_PROMPTS_FILE


def load_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """The prompts of ``path`` (one per non-empty line), or the bundled list when ``path`` is None.

    Raises ``ValueError`` naming the file when it cannot be read or holds no prompt.
    """
    from ..pipelines.generate import read_prompts

    return read_prompts(bundled_prompts_path() if path is None else path)
