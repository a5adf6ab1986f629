"""Model adapters: one file per model family behind the ``ModelAdapter`` protocol."""

from .adapter import ModelAdapter, NotSupportedError
from .handle import ClearHandle, get_handle
from .registry import adapter_for, adapter_for_pipeline_class, adapters, linearize, supported_models

__all__ = [
    "ClearHandle",
    "ModelAdapter",
    "NotSupportedError",
    "adapter_for",
    "adapter_for_pipeline_class",
    "adapters",
    "get_handle",
    "linearize",
    "supported_models",
]
