"""The teacher inside the student: one model in memory, two ways to run it.

Distillation compares the linearized model (the student) with the original one (the teacher).
Both share every frozen weight, so instead of a second copy of the model this keeps only what
differs: the original attention processors and a frozen copy of the trainable attention
projections' initial values (a few percent of the parameters). ``TeacherView.run`` swaps those in
for one forward pass and swaps the student's back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call

from ..models import adapter_for
from ..models.handle import original_attention


class TeacherView:
    """The original-attention model, built on the weights of a model about to be linearized.

    Create it BEFORE ``cleardit.linearize`` (it records the original processors), then call
    ``freeze_initial(handle)`` once the model is linearized.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._attention = adapter_for(model).attention_modules(model)
        self._original = [attn.processor for attn in self._attention]
        self._params: dict[str, torch.Tensor] | None = None

    def freeze_initial(self, handle) -> None:
        """Copy the trainable parameters' current values: the teacher's projections from now on.

        The pooling weights (``spatial_weight``) are student-only and not part of the teacher.
        """
        self._params = {
            name: p.detach().clone()
            for name, p in handle.named_clear_parameters(real_names=True)  # functional_call's names
            if not name.endswith("spatial_weight")
        }

    @property
    def extra_bytes(self) -> int:
        """Memory the teacher adds on top of the student: its copy of the attention projections."""
        return sum(t.numel() * t.element_size() for t in (self._params or {}).values())

    @contextlib.contextmanager
    def original_attention(self) -> Iterator[None]:
        student = [attn.processor for attn in self._attention]
        try:
            for attn, proc in zip(self._attention, self._original, strict=True):
                attn.set_processor(proc)
            with original_attention(self.model):  # on purpose: the linearized model lets it run
                yield
        finally:
            for attn, proc in zip(self._attention, student, strict=True):
                attn.set_processor(proc)

    @torch.no_grad()
    def run(self, *args, **kwargs):
        """``model(*args, **kwargs)`` as the teacher: original attention and initial projections."""
        if self._params is None:
            raise RuntimeError("TeacherView.freeze_initial(handle) must be called after linearize()")
        with self.original_attention():
            return functional_call(self.model, self._params, args, kwargs, strict=False)
