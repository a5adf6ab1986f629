"""The bundled prompt list of ``cleardit eval model``: 50 captions written for the shipped mini model.

``mini_prompts.txt`` (package data, one prompt per line) holds the captions of the first 50
scenes of the mini trainer's held-out stream for seed 0 (``heldout_scenes(50, 0)`` of the training
lab in ``examples/mini_model/``, not part of the package): valid sentences of the procedural
dataset's grammar with the three shapes the model is trained on, which training never draws. The
lab's adherence checker parses every one of them (``examples/mini_model/tests/test_lab_prompts.py``).
To rebuild the file from the repository root (only needed if that stream changes)::

    PYTHONPATH=examples/mini_model python -c "from mini_lab.trainer import heldout_scenes; \\
        print(*(s.caption() for s in heldout_scenes(50, 0)), sep='\\n')" \\
        > src/cleardit/eval/mini_prompts.txt
"""

from __future__ import annotations

import os
from pathlib import Path

from ..prompt_list import read_prompts

BUNDLED_PROMPTS_FILE = "mini_prompts.txt"


def bundled_prompts_path() -> Path:
    """Path of the bundled prompt list (``cleardit/eval/mini_prompts.txt``)."""
    return Path(__file__).resolve().parent / BUNDLED_PROMPTS_FILE


def load_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """The prompts of ``path`` (one per non-empty line), or the bundled list when ``path`` is None.

    Raises ``ValueError`` naming the file when it cannot be read or holds no prompt.
    """
    return read_prompts(bundled_prompts_path() if path is None else path)
