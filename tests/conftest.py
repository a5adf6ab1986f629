"""Test-session setup shared by every test file."""

import os

# No GPU in CI: the Triton kernels run in Triton's interpreter. This must be set before anything
# imports triton (torch and diffusers may do so), so it lives here rather than in test_triton.py.
os.environ.setdefault("TRITON_INTERPRET", "1")
