"""Which adapter linearizes which model class; ``linearize`` is the public verb."""

from __future__ import annotations

from torch import nn

from ..config import ClearConfig
from .handle import ClearHandle, get_handle


def _adapters() -> dict[str, callable]:
    from .flux import linearize_flux

    return {"FluxTransformer2DModel": linearize_flux}


def supported_models() -> list[str]:
    return sorted(_adapters())


def linearize(
    model: nn.Module,
    radius: int = 16,
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
    adapters = _adapters()
    name = type(model).__name__
    adapter = next(
        (fn for cls, fn in adapters.items() if cls in {c.__name__ for c in type(model).__mro__}), None
    )
    if adapter is None or not isinstance(model, nn.Module):
        raise TypeError(
            f"cleardit cannot linearize a {name}; supported models: {', '.join(supported_models())} "
            "(pass the pipeline's transformer, e.g. linearize(pipe.transformer))"
        )
    if get_handle(model) is not None:
        raise ValueError(f"this {name} is already linearized; call handle.restore() before linearizing again")
    if config is None:
        config = ClearConfig(radius=radius, down_factor=down_factor, backend=backend, **options)
    elif options:
        raise TypeError(f"pass either config or keyword options, not both (got {sorted(options)})")
    handle = adapter(model, config)
    model._cleardit_handle = handle
    return handle
