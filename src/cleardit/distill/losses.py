"""The distillation objective and the hooks that record attention outputs.

loss = flow matching (student vs ``noise - x0``)
     + alpha * MSE(student prediction, teacher prediction)
     + beta  * mean over the selected layers of MSE(student attention output, teacher's)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..schedule import shift_mu


def parse_attention_layers(spec: str, count: int) -> list[int]:
    """Indices into the adapter's ``consistency_modules`` (FLUX: the single-stream blocks) from
    ``"every:N"`` (0, N, 2N, ...), ``"none"`` or ``"0,4,9"``; ``count`` modules exist."""
    spec = spec.strip().lower()
    if spec == "none":
        return []
    if spec.startswith("every:"):
        try:
            step = int(spec.split(":", 1)[1])
        except ValueError:
            step = 0
        if step < 1:
            raise ValueError(f"--attention-layers {spec!r}: write every:N with N >= 1, e.g. every:4")
        return list(range(0, count, step))
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(
            f"--attention-layers {spec!r}: expected every:N, none, or comma-separated block indices"
        ) from None
    bad = [i for i in layers if not 0 <= i < count]
    if bad or not layers:
        raise ValueError(f"--attention-layers {spec!r}: block indices must be in 0..{count - 1}")
    return layers


class AttentionRecorder:
    """Forward hooks on chosen attention modules that store each module's output in ``self.outputs``.

    The same hooks serve the teacher pass and the student pass: read ``outputs`` after each pass.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """The outputs recorded since the last call (and forget them)."""
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass
class LossWeights:
    alpha: float = 0.5  # output distillation
    beta: float = 0.5  # attention consistency


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    student_attention: dict[str, torch.Tensor],
    teacher_attention: dict[str, torch.Tensor],
    weights: LossWeights,
) -> dict[str, torch.Tensor]:
    """The three terms and their weighted sum ("total"), each a scalar mean over the batch.

    Args:
        student, teacher: transformer predictions [B, N, C] (teacher without grad).
        target: the flow-matching target ``noise - x0`` [B, N, C].
        student_attention, teacher_attention: recorded attention outputs by layer name.
    """
    flow = F.mse_loss(student.float(), target.float())
    output = F.mse_loss(student.float(), teacher.float())
    if set(student_attention) != set(teacher_attention):
        raise RuntimeError(
            f"attention outputs recorded for {sorted(student_attention)} (student) and "
            f"{sorted(teacher_attention)} (teacher) differ"
        )
    if student_attention:
        attention = torch.stack(
            [
                F.mse_loss(student_attention[k].float(), teacher_attention[k].float())
                for k in student_attention
            ]
        ).mean()
    else:
        attention = flow.new_zeros(())
    total = flow + weights.alpha * output + weights.beta * attention
    return {"total": total, "flow": flow, "output": output, "attention": attention}


def sample_sigma(generator: torch.Generator, image_seq_len: int, scheduler_config: dict) -> float:
    """One training noise level: logit-normal, then the exponential time shift of the scheduler."""
    sigma = torch.sigmoid(torch.randn((), generator=generator)).item()
    if not scheduler_config.get("use_dynamic_shifting", True):
        # FlowMatchEuler names its static shift "shift"; UniPC (Wan's folders) names it "flow_shift"
        shift = scheduler_config.get("shift", scheduler_config.get("flow_shift", 1.0))
        return shift * sigma / (1 + (shift - 1) * sigma)
    e = math.exp(shift_mu(scheduler_config, image_seq_len))  # the model's own (linear) rule
    return e / (e + 1 / sigma - 1)
