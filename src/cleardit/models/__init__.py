"""Model adapters: one file per model family."""

from .handle import ClearHandle, get_handle
from .registry import linearize, supported_models

__all__ = ["ClearHandle", "get_handle", "linearize", "supported_models"]
