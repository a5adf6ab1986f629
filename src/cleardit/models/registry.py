"""Which adapter serves which model; ``linearize`` is the public verb."""

from __future__ import annotations

from functools import cache

from torch import nn

from ..config import DEFAULT_RADIUS, ClearConfig
from .adapter import ModelAdapter
from .handle import ClearHandle, get_handle


@cache
def adapters() -> tuple[ModelAdapter, ...]:
    """Every family's adapter (imported on first use: they import diffusers). A model matches by its
    class names, so a subclass of a supported class is served by its parent's adapter."""
    from .chroma import ChromaAdapter
    from .flux import FluxAdapter
    from .flux2 import Flux2Adapter, Flux2DevAdapter
    from .hunyuanvideo15 import HunyuanVideo15Adapter
    from .ltx2 import LTX2Adapter
    from .qwenimage import QwenImageAdapter
    from .sd3 import SD3Adapter
    from .wan import WanAdapter
    from .zimage import ZImageAdapter

    return (
        FluxAdapter(),
        ChromaAdapter(),
        Flux2Adapter(),
        Flux2DevAdapter(),
        QwenImageAdapter(),
        SD3Adapter(),
        ZImageAdapter(),
        WanAdapter(),
        LTX2Adapter(),
        HunyuanVideo15Adapter(),
    )


def supported_models() -> list[str]:
    return sorted({name for a in adapters() for name in a.transformer_classes})


def adapter_for(model) -> ModelAdapter:
    """The adapter of a transformer or pipeline; a TypeError naming what is supported otherwise."""
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "transformer", None), nn.Module):
        model = model.transformer  # a pipeline, or a wrapper of one: its transformer says the family
    for adapter in adapters():
        if adapter.matches(model):
            return adapter
    raise TypeError(
        f"cleardit cannot linearize a {type(model).__name__}: no adapter supports it; supported models: "
        f"{', '.join(supported_models())} (pass the pipeline's transformer, e.g. linearize(pipe.transformer))"
    )


def adapter_for_pipeline_class(name: str) -> ModelAdapter | None:
    """The adapter whose text-to-image pipelines include the class ``name`` (from model_index.json)."""
    return next((a for a in adapters() if a.loads_pipeline_class(name)), None)


def linearize(
    model: nn.Module,
    radius: int = DEFAULT_RADIUS,
    down_factor: int | None = None,
    backend: str = "auto",
    *,
    config: ClearConfig | None = None,
    **options,
) -> ClearHandle:
    """Replace every attention layer of ``model`` with CLEAR attention, in place.

    Args:
        model: a supported diffusers transformer (``supported_models()``), e.g. FluxTransformer2DModel.
        radius, down_factor, backend: see ClearConfig (ignored when ``config`` is given).
        config: a full ClearConfig; other ClearConfig fields may also be passed as keyword options.

    Returns:
        a ClearHandle; ``handle.restore()`` puts the original attention back.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"cleardit cannot linearize a {type(model).__name__}; pass the pipeline's transformer, "
            "e.g. linearize(pipe.transformer)"
        )
    adapter = adapter_for(model)
    if get_handle(model) is not None:
        raise ValueError(
            f"this {type(model).__name__} is already linearized; "
            "call handle.restore() before linearizing again"
        )
    if config is None:
        config = ClearConfig(radius=radius, down_factor=down_factor, backend=backend, **options)
    elif options:
        raise TypeError(f"pass either config or keyword options, not both (got {sorted(options)})")
    adapter.check_config(model, config)
    handle = adapter.install(model, config)
    model._cleardit_handle = handle
    return handle
