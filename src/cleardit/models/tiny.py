"""Small FLUX transformers built offline from a config, and matching random inputs.

Used by the tests, the demo and the benchmarks' dry runs; the real FLUX.1-dev config is here too
so benchmarks can build the full-size architecture with random weights (no download).
"""

from __future__ import annotations

import torch

# diffusers' FluxTransformer2DModel config of FLUX.1-dev (published with the model).
FLUX_DEV_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

TINY_CONFIG = dict(
    patch_size=1,
    in_channels=8,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=12,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)


def tiny_flux_transformer(seed: int = 0, **overrides):
    """A FluxTransformer2DModel small enough to run in milliseconds on a CPU (fp32, eval mode)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**TINY_CONFIG, **overrides})
    # diffusers zero-initialises some output layers; random values make every path matter in tests.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def flux_inputs(
    model,
    height: int,
    width: int,
    text_len: int = 5,
    batch: int = 1,
    seed: int = 0,
    device=None,
    dtype=torch.float32,
) -> dict:
    """Random forward kwargs for a FLUX transformer: an H x W token grid and ``text_len`` text tokens."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] += torch.arange(height)[:, None]
    img_ids[..., 2] += torch.arange(width)[None, :]
    kwargs = dict(
        hidden_states=torch.randn(batch, height * width, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_len, 3),
    )
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 3.5)
    return {k: v.to(device=device, dtype=dtype) for k, v in kwargs.items()}
