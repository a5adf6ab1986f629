"""``ClearProcessor``: what every family's CLEAR attention processor holds."""

from __future__ import annotations

import torch
from torch import nn

from ..attention import TokenLayout, clear_attention, initial_pool_weight
from ..attention.strips import strip_clear_attention
from ..config import ClearConfig
from .handle import ForwardState


class ClearProcessor(nn.Module):
    """Base of the families' CLEAR processors: the model's per-forward state (``geometry``, a
    ``ForwardGrid``), the ``ClearConfig``, and with a down factor the pooled branch's weights.

    Built without arguments (diffusers' loaders rebuild processors as ``type(p)()``, e.g.
    ``load_ip_adapter``) it belongs to no linearized model, and the forward refuses it clearly.
    """

    def __init__(
        self, geometry=None, config: ClearConfig | None = None, param_like: torch.Tensor | None = None
    ):
        super().__init__()
        self.geometry = geometry
        self.config = config
        self.spatial_weight = None
        if config is not None and config.down_factor is not None:
            df = config.down_factor
            # the reference release's layout (1, 1, 1, df, 1, df, 1), one weight-file format for every
            # family; parameters follow the model's device and dtype (``param_like``)
            w = initial_pool_weight(df).reshape(1, 1, 1, df, 1, df, 1)
            self.spatial_weight = nn.Parameter(w.to(device=param_like.device, dtype=param_like.dtype))

    def forward_state(self, rope) -> ForwardState:
        """The state of the forward in flight (``ForwardGrid.state_for``) keyed by that forward's RoPE
        (a tensor, or a (cos, sin) pair: its first); a processor rebuilt without arguments (diffusers'
        loaders build ``type(p)()``) belongs to no model and is refused."""
        if self.geometry is None:
            raise RuntimeError(
                f"this {type(self).__name__} belongs to no linearized model (diffusers' loaders rebuild "
                "processors as type(p)()), so the grid is unknown; call handle.restore(), change the "
                "processors, then cleardit.linearize again"
            )
        return self.geometry.state_for(rope[0] if isinstance(rope, (tuple, list)) else rope)

    def pool_weight(self) -> torch.Tensor | None:
        """The (df, df) pooling weights, or None without a down factor."""
        if self.spatial_weight is None:
            return None
        return self.spatial_weight.reshape(self.config.down_factor, self.config.down_factor)

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout
    ) -> torch.Tensor:
        """CLEAR over [B, heads, N, d] tensors laid out as ``layout``. In a patch-parallel model
        (``geometry`` is a ``StripContext``) they hold the global tokens and this rank's image rows
        only, ``layout`` is the whole image's, and the band's keys and values come from the
        neighbouring ranks (``strip_clear_attention``)."""
        cfg = self.config
        options = dict(pool_weight=self.pool_weight(), scale=cfg.scale, backend=cfg.backend)
        comm = getattr(self.geometry, "comm", None)
        if comm is None:  # video: the window's depth in latent frames (None: every frame)
            return clear_attention(q, k, v, layout, cfg.radius, cfg.temporal_radius, **options)
        timeout_s = comm.timeout.total_seconds() if comm.timeout is not None else None
        return strip_clear_attention(
            q, k, v, layout, cfg.radius, group=comm.group, counter=comm.counter, timeout_s=timeout_s,
            text_merge=self.geometry.text_merge, **options,
        )  # fmt: skip
