"""The small demo text-to-image model's data side: a procedural dataset of coloured shapes, a
programmatic prompt-adherence check, and word-level tokenizers for diffusers' FluxPipeline.

Everything here is numpy-only except the dataset's tensors (torch) and :mod:`.vocab`
(tokenizers / transformers, imported when called).

The per-image check is ``cleardit.mini.adherence.adherence``; it is not re-exported here, where
its name would hide the ``adherence`` submodule.
"""

from .adherence import AdherenceResult, adherence_percent
from .dataset import (
    BACKGROUNDS,
    BASIC_SHAPES,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    ProceduralDataset,
    Scene,
    SceneObject,
    caption,
    parse_caption,
    render,
    sample_scene,
    vocabulary,
)
from .vocab import MAX_TEXT_TOKENS, build_tokenizers, clip_text_config, flux_text_dims, t5_config

__all__ = [
    "BACKGROUNDS",
    "BASIC_SHAPES",
    "COLORS",
    "MAX_TEXT_TOKENS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "AdherenceResult",
    "ProceduralDataset",
    "Scene",
    "SceneObject",
    "adherence_percent",
    "build_tokenizers",
    "caption",
    "clip_text_config",
    "flux_text_dims",
    "parse_caption",
    "render",
    "sample_scene",
    "t5_config",
    "vocabulary",
]
