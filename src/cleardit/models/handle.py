"""``ClearHandle``: what ``linearize`` returns; knows what it changed and how to undo it."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..attention import TokenLayout
from ..config import ClearConfig


@dataclass
class ClearHandle:
    """A linearized model. ``restore()`` puts the original attention processors back.

    Attributes:
        model: the model that was changed in place.
        config: the ClearConfig that was installed.
        trainable_pattern: regex over ``model.named_parameters()`` names selecting the parameters
            CLEAR trains and saves (reference-release key names).
    """

    model: nn.Module
    config: ClearConfig
    trainable_pattern: re.Pattern
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)
    active: bool = True

    def named_clear_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters CLEAR fine-tunes and checkpoints, by their names in the model."""
        for name, param in self.model.named_parameters():
            if self.trainable_pattern.match(name):
                yield name, param

    def clear_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_clear_parameters()}

    def restore(self) -> nn.Module:
        """Undo ``linearize``: original processors back, hooks removed. Returns the model."""
        if not self.active:
            return self.model
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.active = False
        if getattr(self.model, "_cleardit_handle", None) is self:
            del self.model._cleardit_handle
        return self.model


def get_handle(model: nn.Module) -> ClearHandle | None:
    """The active ClearHandle of a linearized model, or None."""
    handle = getattr(model, "_cleardit_handle", None)
    return handle if handle is not None and handle.active else None


class ForwardGrid:
    """The token layout of the forward in flight, shared by all CLEAR processors of one model.

    A family's forward pre-hook sets ``layout`` from the forward's own inputs; processors read it.
    """

    def __init__(self, config: ClearConfig):
        self.config = config
        self.layout: TokenLayout | None = None

    def require_layout(self) -> TokenLayout:
        if self.layout is None:
            raise RuntimeError(
                "a CLEAR attention processor ran outside its transformer's forward, so the image grid "
                "is unknown; call the transformer itself (its inputs give the grid)"
            )
        return self.layout
