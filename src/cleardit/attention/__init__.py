"""The CLEAR attention rule: layouts, pair counts, and interchangeable backends."""

from .dispatch import BACKENDS, available_backends, choose_backend, clear_attention
from .flops import attention_flops, count_pairs
from .layout import TokenLayout
from .pooling import initial_pool_weight, pool_image_tokens

__all__ = [
    "BACKENDS",
    "TokenLayout",
    "attention_flops",
    "available_backends",
    "choose_backend",
    "clear_attention",
    "count_pairs",
    "initial_pool_weight",
    "pool_image_tokens",
]
