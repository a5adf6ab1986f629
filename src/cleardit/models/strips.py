"""Patch-parallel CLEAR for any family whose adapter has strip processors (``install_strips``).

``parallelize(transformer, radius=16)`` is ``linearize`` for a process group. Every rank calls the
model with the SAME full inputs; the family's forward pre-hook keeps this rank's rows (and what
positional encoding the band rows need), every attention processor exchanges the band and runs
``cleardit.attention.strips.strip_attention``, and a forward hook all-gathers the output strips,
so every rank returns the full output (``gather_output=False`` returns only the own strip, in
raster order).

With ``strip_input=True`` each rank passes only its own rows of the image tokens (the position
inputs still describe the full grid): a sampler loop can then keep just its strip of the latents
for the whole denoising and gather them once at the end (``cleardit.parallel.generate``).

By default the band's attention INPUT (``exchange="input"``) is sent once per layer and each rank
projects it to keys/values itself: half the bytes of sending keys and values (``exchange="kv"``).
The exchange starts as soon as the processor is called, so it overlaps the own rows' projection.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from ..attention.strips import TEXT_MERGES, Comm, CommCounter, StripPlan
from ..config import DEFAULT_RADIUS, ClearConfig
from .adapter import NotSupportedError
from .handle import ClearHandle, ForwardGrid, get_handle
from .registry import adapter_for

EXCHANGES = ("input", "kv")


class StripContext(ForwardGrid):
    """What all processors of one parallel model share: the group, the plan of the forward in flight."""

    def __init__(
        self,
        config: ClearConfig,
        comm: Comm,
        text_merge: str,
        exchange: str,
        gather_output: bool,
        strip_input: bool = False,
    ):
        super().__init__(config)
        self.comm = comm
        self.text_merge = text_merge
        self.exchange = exchange
        self.gather_output = gather_output
        self.strip_input = strip_input
        self.plan: StripPlan | None = None
        self.band_rope: tuple = (None, None)  # positional encoding of the rows above / below the strip

    @property
    def counter(self) -> CommCounter | None:
        return self.comm.counter


@dataclass
class ParallelHandle(ClearHandle):
    """A patch-parallel model; ``context.comm.counter`` holds the bytes sent."""

    context: StripContext | None = None


def parallelize(
    model: nn.Module,
    radius: int = DEFAULT_RADIUS,
    down_factor: int | None = None,
    backend: str = "auto",
    *,
    config: ClearConfig | None = None,
    group=None,
    text_merge: str = "exact",
    exchange: str = "input",
    gather_output: bool = True,
    strip_input: bool = False,
    counter: CommCounter | None = None,
    timeout_s: float | None = None,
) -> ParallelHandle:
    """Linearize a transformer for patch-parallel inference over ``group`` (in place).

    Call it on every rank after the process group exists (``init_distributed`` or ``spawn``),
    then call the model on every rank with the same full inputs.

    Args:
        radius, down_factor, backend / config: as for ``cleardit.linearize`` (the token order is
            always raster here: ``config.tile`` is ignored).
        group: the process group (default: the world).
        text_merge: "exact" (log-sum-exp merge of the text queries, equal to one device) or
            "average" (the paper's approximation: the mean of the per-rank text outputs).
        exchange: "input" (send the band's attention input, project k/v locally; default) or "kv".
        gather_output: all-gather the output strips so every rank returns the full output.
        strip_input: every rank passes only its own rows of the image tokens
            ([B, rows_of_this_rank * W, C], raster order; ``StripPlan(H, W, world, radius).strip``
            says which) with the full position inputs; default False: the full hidden states.
        counter: a CommCounter recording the bytes this rank sends (one is created if None).
        timeout_s: per-wait timeout for a peer (default: the process group's timeout).

    Returns:
        a ParallelHandle; ``restore()`` puts the original attention back. ``load_weights`` works
        as on a linearized model (same parameter names).
    """
    adapter = adapter_for(model)
    if adapter.strips_unsupported():
        raise NotSupportedError(f"{adapter.strips_unsupported()}; generate on one device")
    if get_handle(model) is not None:
        raise ValueError("this model is already linearized; call handle.restore() before parallelize()")
    if text_merge not in TEXT_MERGES:
        raise ValueError(f"text_merge must be one of {TEXT_MERGES}, got {text_merge!r}")
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    if config is None:
        config = ClearConfig(radius=radius, down_factor=down_factor, backend=backend, tile=None)
    config = replace(config, tile=None)
    comm = Comm(group, counter if counter is not None else CommCounter(), timeout_s)
    context_class = adapter.strip_context_class or StripContext  # a family may add per-forward fields
    context = context_class(config, comm, text_merge, exchange, gather_output, strip_input)
    handle = adapter.install_strips(model, config, context)
    model._cleardit_handle = handle
    return handle
