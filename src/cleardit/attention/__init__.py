"""The CLEAR attention rule: layouts, pair counts, and interchangeable backends."""

from .dispatch import BACKENDS, available_backends, choose_backend, clear_attention
from .flops import attention_flops, count_pairs
from .layout import TokenLayout, frame_thresholds
from .pooling import initial_pool_weight, pool_image_tokens

__all__ = [
    "BACKENDS",
    "TokenLayout",
    "attention_flops",
    "available_backends",
    "choose_backend",
    "clear_attention",
    "count_pairs",
    "frame_thresholds",
    "initial_pool_weight",
    "pool_image_tokens",
]
