"""The mini demo model as the package uses it at run time: the default model of ``cleardit generate``.

* :mod:`.pipeline`: the architecture, an untrained diffusers ``FluxPipeline`` built offline from
  configs (``build_mini_pipeline``; the "tiny" size serves the tests), and ``save_mini_pipeline``.
* :mod:`.vocab`: the offline word-level tokenizers (its closed word list ``WORDS``) and small
  text-encoder configs (``tokenizers`` / ``transformers`` are imported when called).
* ``weights/`` (package data): the trained pipeline, found by ``cleardit.pipelines.loading``.

The training lab that made ``weights/`` (procedural scenes and captions, the adherence checker,
the trainer, its benchmarks and recipe history) is not part of the package: it lives in
``examples/mini_model/`` of the repository.
"""

from .vocab import MAX_TEXT_TOKENS, WORDS, build_tokenizers, clip_text_config, flux_text_dims, t5_config

__all__ = [
    "MAX_TEXT_TOKENS",
    "WORDS",
    "build_tokenizers",
    "clip_text_config",
    "flux_text_dims",
    "t5_config",
]
