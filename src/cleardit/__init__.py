"""cleardit: CLEAR (convolution-like linearization) for pretrained Diffusion Transformers."""

from .attention import TokenLayout, attention_flops, clear_attention, count_pairs
from .config import ClearConfig
from .models import ClearHandle, linearize, supported_models
from .pipelines import GenerateConfig, generate
from .weights import load_weights, save_weights

__version__ = "0.1.0"

__all__ = [
    "ClearConfig",
    "ClearHandle",
    "GenerateConfig",
    "TokenLayout",
    "__version__",
    "attention_flops",
    "clear_attention",
    "count_pairs",
    "generate",
    "linearize",
    "load_weights",
    "save_weights",
    "supported_models",
]
