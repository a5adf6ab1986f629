"""Shared shapes and checks for the attention backends' tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cleardit.attention import TokenLayout, clear_attention, initial_pool_weight

# (text_len, height, width, text_first, down_factor, radius): square and non-square grids, odd
# sizes, sizes not divisible by tiles, radii 1..16, radius beyond the grid diagonal, no text,
# text after the image, with and without the pooled branch.
CASES = [
    (4, 6, 6, True, None, 1),
    (4, 6, 6, True, None, 2),
    (3, 7, 5, True, None, 5),
    (0, 9, 11, True, None, 3),
    (5, 13, 10, False, None, 5),
    (6, 17, 19, True, None, 8),
    (2, 20, 12, True, None, 16),
    (3, 5, 7, True, None, 40),  # radius beyond the grid diagonal: every image pair allowed
    (4, 8, 8, True, 2, 3),
    (3, 10, 7, False, 4, 5),  # grid not divisible by df
    (0, 12, 12, True, 4, 8),
    (4, 33, 21, True, None, 8),
]


def case_id(case) -> str:
    t, h, w, first, df, r = case
    return f"T{t}-{h}x{w}-{'tf' if first else 'tl'}-df{df}-r{r}"


def make_inputs(layout: TokenLayout, batch=2, heads=3, dim=16, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads, layout.seq_len, dim)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float32).to(device, dtype) for _ in range(3))
    pw = None
    if layout.down_factor is not None:
        df = layout.down_factor
        pw = initial_pool_weight(df) + 0.1 * torch.randn(df, df, generator=g)
        pw = pw.to(device)
    return q, k, v, pw


def run_with_grads(q, k, v, pw, layout, radius, backend, return_lse=True, temporal_radius=None):
    """Forward with return_lse, then backward of a random projection; returns (out, lse, grads)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    pw_leaf = pw.detach().clone().requires_grad_(True) if pw is not None else None
    out, lse = clear_attention(
        *leaves, layout, radius, temporal_radius, pool_weight=pw_leaf, return_lse=True, backend=backend
    )
    g = torch.Generator().manual_seed(123)
    w_out = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    w_lse = torch.randn(lse.shape, generator=g).to(lse.device, lse.dtype)
    ((out.float() * w_out.float()).sum() + (lse * w_lse).sum()).backward()
    grads = [t.grad for t in leaves] + ([pw_leaf.grad] if pw_leaf is not None else [])
    return out.detach(), lse.detach(), grads


def assert_close(actual, expected, atol, rtol=0.0, what=""):
    actual, expected = actual.float(), expected.float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs().max().item()
    bound = atol + rtol * expected.abs().max().item()
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def compare_backend(case, backend, dtype=torch.float32, atol=1e-5, device="cpu", dim=16):
    t, h, w, first, df, r = case
    layout = TokenLayout(t, h, w, text_first=first, down_factor=df)
    q, k, v, pw = make_inputs(layout, dtype=dtype, device=device, dim=dim)
    # the ground truth always runs in fp32, whatever dtype the backend is tested in
    ref = run_with_grads(q.float(), k.float(), v.float(), pw, layout, r, "reference")
    got = run_with_grads(q, k, v, pw, layout, r, backend)
    names = ["out", "lse", "dq", "dk", "dv", "dpool"]
    flat_ref = [ref[0], ref[1], *ref[2]]
    flat_got = [got[0], got[1], *got[2]]
    for name, a, e in zip(names[: len(flat_ref)], flat_got, flat_ref, strict=True):
        scale = max(1.0, math.sqrt(e.float().abs().max().item())) if name == "dpool" else 1.0
        assert_close(a, e, atol * scale, what=f"{backend} {case_id(case)} {name}")


def compare_layout(
    layout, radius, backend, temporal_radius=None, dtype=torch.float32, atol=1e-5, dim=16, batch=2, heads=3
):
    """``compare_backend`` for any TokenLayout (video included): out, lse and every gradient of
    ``backend`` in ``dtype`` against the fp32 reference on the same inputs."""
    q, k, v, pw = make_inputs(layout, batch=batch, heads=heads, dim=dim)
    ref = run_with_grads(q, k, v, pw, layout, radius, "reference", temporal_radius=temporal_radius)
    got = run_with_grads(
        q.to(dtype), k.to(dtype), v.to(dtype), pw, layout, radius, backend, temporal_radius=temporal_radius
    )
    names = ["out", "lse", "dq", "dk", "dv", "dpool"]
    for name, a, e in zip(names, [got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]], strict=False):
        scale = max(1.0, math.sqrt(e.float().abs().max().item())) if name == "dpool" else 1.0
        what = f"{backend} {layout.describe_grid()} r={radius} rt={temporal_radius} {name}"
        assert_close(a, e, atol * scale, what=what)


class DenseMaskProcessor:
    """Written independently of cleardit: FLUX attention with a brute-force CLEAR mask."""

    def __init__(self, height, width, text_len, radius):
        n = text_len + height * width
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            for j in range(n):
                if i < text_len or j < text_len:
                    mask[i, j] = True
                else:
                    (yi, xi), (yj, xj) = divmod(i - text_len, width), divmod(j - text_len, width)
                    mask[i, j] = (yi - yj) ** 2 + (xi - xj) ** 2 < radius**2
        self.mask = mask

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        q, k, v = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=self.mask
        )
        out = out.transpose(1, 2).flatten(2, 3)
        if encoder_hidden_states is None:
            return out
        t = encoder_hidden_states.shape[1]
        return attn.to_out[0](out[:, t:]), attn.to_add_out(out[:, :t])


def dense_oracle_output(model, inputs: dict, height: int, width: int, text_len: int, radius: int):
    """``model``'s output with every attention processor replaced by the brute-force CLEAR mask (the
    model is left as it was)."""
    import copy

    oracle = copy.deepcopy(model)
    from cleardit.models import get_handle

    if get_handle(oracle) is not None:
        get_handle(oracle).restore()
    oracle.set_attn_processor(DenseMaskProcessor(height, width, text_len, radius))
    with torch.no_grad():
        return oracle(**inputs).sample


def distill_resumed_after_a_crash(cfg, dataset, tmp_path, load, monkeypatch):
    """Distil with a crash in the second step, resume, and distil again without the crash (``load()``
    makes a fresh model each time): the resumed run logs steps 1 and 2 and its weights equal the
    uninterrupted run's within 1e-6. Returns (the resumed run's DistillResult, its weights by name)."""
    import pytest
    from safetensors.torch import load_file

    from cleardit.distill.trainer import Distiller, RunOptions

    opts = RunOptions(checkpoint_every=1, quiet=True)
    original_step = Distiller._step

    def crash_in_the_second_step(self, m, opt, step):  # step counts from 0
        if step == 1:
            raise RuntimeError("simulated crash")
        return original_step(self, m, opt, step)

    monkeypatch.setattr(Distiller, "_step", crash_in_the_second_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Distiller(cfg, dataset, tmp_path / "run", model=load(), opts=opts).run()
    monkeypatch.setattr(Distiller, "_step", original_step)
    result = Distiller(cfg, dataset, tmp_path / "run", model=load(), resume=True, opts=opts).run()
    assert result.steps == 2 and [e["step"] for e in result.losses] == [1, 2] and result.weights.is_file()
    again = Distiller(cfg, dataset, tmp_path / "again", model=load(), opts=opts).run()
    resumed, uninterrupted = load_file(str(result.weights)), load_file(str(again.weights))
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=0)
    return result, resumed
