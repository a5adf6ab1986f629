"""Jobs that make images: ``generate`` (any resolution, CLEAR attention, two-stage high resolution).

Heavy libraries (diffusers, transformers, PIL) are imported when a function runs, not here.
"""

from ..prompt_list import read_prompts
from .config import GenerateConfig
from .generate import CompareStats, GenerationResult, generate
from .loading import DEFAULT_MODEL_DIR, ModelInfo, ModelNotFoundError, read_model_info, resolve_model

__all__ = [
    "DEFAULT_MODEL_DIR",
    "CompareStats",
    "GenerateConfig",
    "GenerationResult",
    "ModelInfo",
    "ModelNotFoundError",
    "generate",
    "read_model_info",
    "read_prompts",
    "resolve_model",
]
