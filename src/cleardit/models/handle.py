"""``ClearHandle``: what ``linearize`` returns; knows what it changed and how to undo it."""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..attention import TokenLayout
from ..config import ClearConfig
from .errors import NotSupportedError


@dataclass
class ClearHandle:
    """A linearized model. ``restore()`` puts the original attention processors back.

    Everything it changed is recorded as data (the attention modules and their original
    processors, the hook functions), so ``copy.deepcopy`` of the model gives a copy whose handle
    undoes the copy's changes, and ``torch.save(model)`` pickles.

    Attributes:
        model: the model that was changed in place.
        config: the ClearConfig that was installed.
        trainable_pattern: regex over ``model.named_parameters()`` names selecting the parameters
            CLEAR trains and saves (reference-release key names).
        originals: (attention module, its processor before ``linearize``) pairs.
        hooks: the forward (pre-)hook functions installed on ``model`` and its sub-modules.
    """

    model: nn.Module
    config: ClearConfig
    trainable_pattern: re.Pattern
    originals: list[tuple[nn.Module, object]] = field(default_factory=list, repr=False)
    hooks: tuple = field(default=(), repr=False)
    active: bool = True

    def named_clear_parameters(self, real_names: bool = False) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters CLEAR fine-tunes and checkpoints, by their names in the model.

        Through PEFT adapters (LoRA ``add_adapter`` / ``load_lora_weights``) the wrapped layer's own
        weight is found under its plain name (``to_q.base_layer.weight`` is ``to_q.weight``); the
        adapters' own LoRA matrices are not CLEAR's. ``real_names``: the names in the model as they are
        (what ``torch.func.functional_call`` needs)."""
        for name, param in self.model.named_parameters():
            plain = name.replace(".base_layer.", ".")
            if self.trainable_pattern.match(plain):
                yield (name if real_names else plain), param

    def clear_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_clear_parameters()}

    def restore(self) -> nn.Module:
        """Undo ``linearize``: original processors back, hooks removed. Returns the model."""
        if not self.active:
            return self.model
        for attn, original in reversed(self.originals):
            attn.set_processor(original)
        remove_hooks(self.model, self.hooks)
        self.originals.clear()
        self.active = False
        if getattr(self.model, "_cleardit_handle", None) is self:
            del self.model._cleardit_handle
        for module in self.model.modules():
            if "_cleardit_grid" in module.__dict__:
                del module._cleardit_grid
        return self.model


@contextlib.contextmanager
def original_attention(model: nn.Module) -> Iterator[None]:
    """Let a linearized ``model`` run with its original processors swapped in on purpose (the
    distillation teacher); other foreign processors are still refused."""
    grid = getattr(model, "_cleardit_grid", None)
    if grid is None:
        yield
        return
    before, grid.original_pass = grid.original_pass, True
    try:
        yield
    finally:
        grid.original_pass = before


def add_hooks(module: nn.Module, pre_hook=None, post_hook=None, *, state=None) -> tuple:
    """Register a forward pre-hook and/or a forward hook (both with kwargs; the post-hook runs even
    when the forward raises). They must be module-level functions reading their state from the
    module (``module._cleardit_grid``, set to ``state`` when given), so that deepcopy and pickling
    carry them over."""
    if state is not None:
        module._cleardit_grid = state
    if pre_hook is not None:
        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    if post_hook is not None:
        module.register_forward_hook(post_hook, with_kwargs=True, always_call=True)
    return tuple(f for f in (pre_hook, post_hook) if f is not None)


def remove_hooks(model: nn.Module, functions) -> None:
    """Remove every forward (pre-)hook of ``model`` and its sub-modules that is one of ``functions``."""
    for module in model.modules():
        for table in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, fn in table.items() if any(fn is f for f in functions)]:
                del table[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)


def bind_forward_args(transformer: nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """A transformer forward's arguments by name (what a forward pre-hook reads and rewrites)."""
    return inspect.signature(type(transformer).forward).bind(transformer, *args, **kwargs)


def replace_sample(output, fn):
    """The transformer output with its sample replaced by ``fn(sample)`` (tuple or dataclass)."""
    if isinstance(output, tuple):
        return (fn(output[0]),) + tuple(output[1:])
    output.sample = fn(output.sample)
    return output


def get_handle(model: nn.Module) -> ClearHandle | None:
    """The active ClearHandle of a linearized model, or None."""
    handle = getattr(model, "_cleardit_handle", None)
    return handle if handle is not None and handle.active else None


@dataclass(frozen=True)
class ForwardState:
    """What CLEAR processors need of one forward: its layout and a family's extra data (Chroma: the
    groups of samples with the same kept text)."""

    layout: TokenLayout
    extra: object = None


class ForwardGrid:
    """The token layout of the forward in flight, shared by all CLEAR processors of one model.

    A family's forward pre-hook sets ``layout`` from the forward's own inputs; processors read it.
    """

    def __init__(self, config: ClearConfig):
        self.config = config
        self.layout: TokenLayout | None = None
        self.reorder = False  # this forward runs its image tokens in tile-major order
        self.check_ids = False  # compiled: the grid came from an eager forward; check the inputs in-graph
        self.adapter = None  # the family's adapter (reads its extra forward inputs)
        self.original_pass = False  # a forward with the original processors swapped in on purpose
        self.grids: dict[int, set[tuple[int, int]]] = {}  # image token count -> grids read eagerly

    def grid_of(self, image_tokens: int, read_grid) -> tuple[int, int]:
        """(H, W) of a forward. Eagerly ``read_grid()`` reads it from the inputs (and checks them);
        compiled code cannot branch on tensor data, so under ``torch.compile`` the grid is the one an
        eager forward read for this token count (one grid per token count), and the family checks the
        inputs against it inside the compiled forward (``check_ids``: a wrong grid fails, never runs)."""
        if not torch.compiler.is_compiling():
            grid = read_grid()
            self.grids.setdefault(image_tokens, set()).add(grid)
            return grid
        grids = self.grids.get(image_tokens, set())
        if len(grids) != 1:
            raise ValueError(
                f"under torch.compile the image grid of {image_tokens} tokens is taken from an eager "
                "forward at that size, and "
                + ("none ran" if not grids else f"several grids have that many tokens: {sorted(grids)}")
                + "; run the model once without torch.compile at this size first"
            )
        return next(iter(grids))

    def check_processors(self, transformer: nn.Module) -> None:
        """Refuse a forward whose attention processors are not this model's CLEAR processors (replaced
        after ``linearize``, e.g. by ``set_attn_processor``), unless ``original_attention`` is on."""
        if getattr(transformer, "_parallel_config", None) is not None:
            raise NotSupportedError(
                "diffusers' parallelism (enable_parallelism) is not supported with CLEAR (its context "
                "parallelism splits the sequence without knowing CLEAR's grid); use cleardit's exact patch "
                "parallelism instead: cleardit generate --devices N, or cleardit.parallel.parallelize on a "
                "plain model"
            )
        modules = self.adapter.attention_modules(transformer)
        ours = [getattr(m.processor, "geometry", None) is self for m in modules]
        if all(ours) or (self.original_pass and not any(ours)):
            return
        foreign = sorted(
            {type(m.processor).__name__ for m, mine in zip(modules, ours, strict=True) if not mine}
        )
        raise RuntimeError(
            f"{sum(not o for o in ours)} of the {len(ours)} attention processors of this linearized "
            f"{type(transformer).__name__} were replaced after linearize ({', '.join(foreign)}; e.g. by "
            "set_attn_processor or load_ip_adapter), so CLEAR would silently not run. Call "
            "handle.restore() before changing processors, then linearize again"
        )

    def snapshot(self) -> ForwardState:
        return ForwardState(self.require_layout())

    def state_for(self, key: torch.Tensor | None) -> ForwardState:
        """The state of the forward that made ``key``, a tensor each forward makes anew and passes to
        every block (its RoPE). Gradient checkpointing re-runs a block during backward with that
        forward's own tensors, possibly after other forwards changed the grid: the state recorded on
        the tensor the first time is the one that holds (without a key: the last forward's)."""
        if torch.compiler.is_compiling():  # compiled code keeps no Python state on tensors
            return self.snapshot()
        recorded = getattr(key, "_cleardit_forward", None) if key is not None else None
        if recorded is not None and recorded[0] is self:
            return recorded[1]
        state = self.snapshot()
        if key is not None:
            key._cleardit_forward = (self, state)
        return state

    def require_layout(self) -> TokenLayout:
        if self.layout is None:
            raise RuntimeError(
                "a CLEAR attention processor ran outside its transformer's forward, so the image grid "
                "is unknown; call the transformer itself (its inputs give the grid)"
            )
        return self.layout


class OrderedGrid(ForwardGrid):
    """ForwardGrid plus the token permutation of the forward in flight, for families whose hooks
    reorder the image tokens once per forward: ``order`` (sequence position -> raster cell, applied
    where the tokens are made) and ``inverse`` (raster cell -> sequence position, applied before the
    output); both None in raster order."""

    def __init__(self, config: ClearConfig):
        super().__init__(config)
        self.order: torch.Tensor | None = None
        self.inverse: torch.Tensor | None = None
        self.orders: dict = {}  # (layout, device) -> (order, inverse), or None where that is raster

    def use_tile_order(self, layout: TokenLayout, device) -> bool:
        """Set ``order`` / ``inverse`` to ``layout``'s tile-major order (None when it is the raster
        order already), built once per layout and device, not at every step; True when the tokens are
        permuted."""
        key = (layout, str(device))
        if key not in self.orders:
            order = None if layout.tile_order_is_raster else layout.sequence_to_raster(device)
            self.orders[key] = None if order is None else (order, torch.argsort(order))
        self.order, self.inverse = self.orders[key] or (None, None)
        return self.order is not None


def forget_token_order(module, args, kwargs, output):
    """Forward hook on an ``OrderedGrid`` family's transformer: this forward's permutation is spent (the
    layout stays set: gradient checkpointing re-runs blocks with it)."""
    module._cleardit_grid.order = module._cleardit_grid.inverse = None
    return output


def to_tile_order(module, args, kwargs, output):
    """Forward hook where the image tokens [B, N, ...] are made: raster into this forward's order."""
    order = module._cleardit_grid.order
    return output if order is None else output[:, order]


def to_raster_order(module, args, kwargs, output):
    """Forward hook before the unpatchify: image tokens [B, N, ...] back into raster order."""
    inverse = module._cleardit_grid.inverse
    return output if inverse is None or output is None else output[:, inverse]
