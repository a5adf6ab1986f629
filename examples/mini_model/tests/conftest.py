"""Tests of the mini model's training lab. ``mini_lab`` and the scripts beside it import from
``examples/mini_model``; this folder has no ``__init__.py`` and its test files are named
``test_lab_*`` so that they never collide with the package ``tests`` of the library."""

import os
import sys
from pathlib import Path

# as in tests/conftest.py: no GPU in CI, Triton (if anything imports it) runs in its interpreter
os.environ.setdefault("TRITON_INTERPRET", "1")

LAB = Path(__file__).resolve().parents[1]  # examples/mini_model
ROOT = LAB.parents[1]  # the repository root
for path in (LAB, ROOT / "bench"):  # mini_lab and the scripts; bench/common.py, which they use
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
