"""diffusers' own tools on a linearized model (issue 26): the caches besides FirstBlockCache, LoRA through
diffusers' loaders (load, fuse, unfuse, delete, unload, hot-swap under torch.compile) and, where Chroma's
adapter differs from FLUX's (it reads an attention mask per forward), copies, pickles and swapped
processors of a linearized Chroma. Every number is checked against a model with the brute-force dense-mask
processors under the same tool."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import cleardit
from cleardit.models import get_handle
from cleardit.models.tiny import flux_inputs, tiny_flux_transformer
from tests.helpers import DenseMaskProcessor

RADIUS = 2
HEIGHT, WIDTH, TEXT = 6, 8, 5  # inside one default tile (8 x 16): raster order unless a test says
LAYERS = 4  # attention layers of the tiny FLUX: 2 dual-stream + 2 single-stream


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is as fast alone and far faster on a busy machine (threads
    handing off tiny matmuls slowed a forward 30x on a loaded 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def assert_close(got, want, atol=1e-5, what=""):
    torch.testing.assert_close(got, want, atol=atol, rtol=atol, msg=lambda m: f"{what}: {m}")


def clear_and_oracle(tile=(8, 16), **overrides):
    """A linearized tiny FLUX (reference backend) and a copy running the dense-mask oracle processors.
    ``tile``: the linearized model's token order inside its forward (None: raster)."""
    model = tiny_flux_transformer(**overrides)
    oracle = copy.deepcopy(model)
    oracle.set_attn_processor(DenseMaskProcessor(HEIGHT, WIDTH, TEXT, RADIUS))
    cleardit.linearize(model, radius=RADIUS, backend="reference", tile=tile)
    return model, oracle


class CountAttention(TorchFunctionMode):
    """Counts scaled_dot_product_attention calls: one per attention layer that really computes, for both
    the reference backend and the oracle."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- caches
def _faster_cache(clock):
    from diffusers.hooks import FasterCacheConfig

    # FLUX is guidance-distilled (and FasterCache's frequency-space guess of a batched uncond half needs
    # 4D outputs: on FLUX's [B, N, C] it fails with or without CLEAR): the attention layers reuse and
    # extrapolate their outputs every other step inside the timestep range
    return FasterCacheConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 681),
        current_timestep_callback=lambda: clock["t"],
        attention_weight_callback=lambda _: 0.5,
        tensor_format="BCHW",
        is_guidance_distilled=True,
    )


def _taylorseer(clock):
    from diffusers.hooks import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=2, max_order=1, taylor_factors_dtype=torch.float32
    )


def _taylorseer_lite(clock):
    from diffusers.hooks import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=torch.float32, use_lite_mode=True
    )


def _pyramid_attention_broadcast(clock):
    from diffusers.hooks import PyramidAttentionBroadcastConfig

    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=lambda: clock["t"],
    )


def _mag_cache(clock):
    from diffusers.hooks import MagCacheConfig

    # ratios as a calibration run would give them: steady residuals after the first step
    return MagCacheConfig(
        threshold=0.06, max_skip_steps=2, retention_ratio=0.2, num_inference_steps=5,
        mag_ratios=[1.0, 1.0, 1.01, 1.0, 1.0],
    )  # fmt: skip


# (config factory, batch, timesteps (0..1000, as pipe.current_timestep), SDPA calls per step under the cache)
CACHES = {
    # outside (-1, 681) every layer computes; inside, every other step extrapolates its last two outputs
    "faster_cache": (_faster_cache, 1, [900, 600, 500, 400], [LAYERS, 0, LAYERS, 0]),
    # two warm-up steps, then predict / compute alternately (attention modules hooked)
    "taylorseer": (_taylorseer, 1, [900, 800, 700, 600, 500], [LAYERS, LAYERS, 0, LAYERS, 0]),
    # lite: the blocks return zeros and proj_out is predicted on the cached steps
    "taylorseer_lite": (_taylorseer_lite, 1, [900, 800, 700, 600, 500], [LAYERS, LAYERS, 0, LAYERS, 0]),
    # Pyramid Attention Broadcast: inside (100, 800) every other step reuses the attention outputs
    "pab": (_pyramid_attention_broadcast, 1, [900, 700, 500, 300], [LAYERS, 0, LAYERS, 0]),
    # after the retention step the blocks are skipped (input + cached residual) until max_skip_steps
    "mag_cache": (_mag_cache, 1, [900, 700, 500, 300, 100], [LAYERS, 0, 0, LAYERS, 0]),
}  # fmt: skip


def denoise(model, config, batch, timesteps, clock):
    """Denoising-like calls: a drifting latent, the pipelines' timestep/1000, inside cache_context as
    diffusers pipelines call the transformer. Returns the outputs and the SDPA calls of each step."""
    if config is not None:
        model.enable_cache(config)
    outputs, calls = [], []
    base = flux_inputs(model, HEIGHT, WIDTH, TEXT, batch=batch, seed=1)
    for step, t in enumerate(timesteps):
        clock["t"] = t
        inputs = dict(base, hidden_states=base["hidden_states"] * (1 + 0.05 * step))
        inputs["timestep"] = torch.full((batch,), t / 1000)
        with model.cache_context("cond"), CountAttention() as counter:
            outputs.append(run(model, inputs))
        calls.append(counter.calls)
    return outputs, calls


@pytest.mark.parametrize("tile", [None, (4, 4)], ids=["raster", "tile-major"])
@pytest.mark.parametrize("cache", list(CACHES))
def test_diffusers_cache_on_a_linearized_model_matches_the_oracle_under_the_same_cache(cache, tile):
    """``tile`` (4, 4): the 6x8 grid runs in tile-major order inside the linearized forward, so the
    caches keep and reuse permuted tensors; the output must still be the oracle's, step by step."""
    make_config, batch, timesteps, expected_calls = CACHES[cache]
    model, oracle = clear_and_oracle(tile=tile)
    uncached, _ = denoise(copy.deepcopy(model), None, batch, timesteps, {})
    clock = {}
    got, clear_calls = denoise(model, make_config(clock), batch, timesteps, clock)
    want, oracle_calls = denoise(oracle, make_config(clock), batch, timesteps, clock)
    assert clear_calls == oracle_calls == expected_calls  # the cache really skips attention layers
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_close(g, w, what=f"{cache} step {step}")
    skipped = [s for s, n in enumerate(expected_calls) if n == 0]
    # the reused / predicted outputs differ from computing the step: the cache changed the numbers
    assert all((got[s] - uncached[s]).abs().max() > 1e-3 for s in skipped)
    assert_close(got[0], uncached[0], what=f"{cache}: the first step computes everything")
    model.disable_cache()
    assert_close(denoise(model, None, batch, timesteps[:1], clock)[0][0], uncached[0], what="disabled")


# ----------------------------------------------------------------------------- LoRA
LORA_TARGETS = [
    *(f"transformer_blocks.{i}.{m}" for i in range(2) for m in
      ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "ff.net.2")),
    *(f"single_transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn.to_q", "attn.to_v", "proj_out")),
]  # fmt: skip


def lora_state_dict(rank: int, seed: int, targets=tuple(LORA_TARGETS)) -> dict[str, torch.Tensor]:
    """A LoRA file's state dict as load_lora_adapter / load_lora_weights take it: PEFT key names under the
    pipeline component's prefix ("transformer."), random non-zero A and B."""
    shapes = dict(tiny_flux_transformer().named_modules())
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in targets:
        linear = shapes[name]
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=g) * 0.3
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=g) * 0.3
    return state


def test_lora_load_fuse_unfuse_delete_unload_match_the_oracle():
    from peft.tuners.tuners_utils import BaseTunerLayer

    model, oracle = clear_and_oracle()
    clear_names = [n for n, _ in get_handle(model).named_clear_parameters()]
    inputs = flux_inputs(model, HEIGHT, WIDTH, TEXT, batch=2, seed=4)
    plain = run(model, inputs)
    a, b = lora_state_dict(2, seed=1), lora_state_dict(3, seed=2)

    def both(what, op):
        for m in (model, oracle):
            op(m)
        got = run(model, inputs)
        assert_close(got, run(oracle, inputs), what=what)
        return got

    only_a = both("load a", lambda m: m.load_lora_adapter(copy.deepcopy(a), adapter_name="a"))
    assert (only_a - plain).abs().max() > 1e-2  # the LoRA changes the model
    both("load b", lambda m: m.load_lora_adapter(copy.deepcopy(b), adapter_name="b"))
    mixed = both("set_adapters", lambda m: m.set_adapters(["a", "b"], weights=[1.0, 0.5]))
    assert (mixed - only_a).abs().max() > 1e-2
    # the wrappers hide no CLEAR parameter (to_q.base_layer.weight is to_q.weight)
    assert [n for n, _ in get_handle(model).named_clear_parameters()] == clear_names
    fused = both("fuse_lora", lambda m: m.fuse_lora())
    assert_close(fused, mixed, atol=1e-4, what="fusing keeps the numbers")
    assert_close(both("unfuse_lora", lambda m: m.unfuse_lora()), mixed, atol=1e-4, what="unfuse")
    both("delete b", lambda m: m.delete_adapters("b"))
    assert_close(both("set_adapters a", lambda m: m.set_adapters("a")), only_a, what="a only again")
    both("disable_lora", lambda m: m.disable_lora())
    assert_close(run(model, inputs), plain, what="disabled LoRA: the linearized model")
    both("enable_lora", lambda m: m.enable_lora())
    # fuse then unload: the LoRA is baked into the base weights, the wrappers are gone
    baked = both("fuse + unload_lora", lambda m: (m.fuse_lora(), m.unload_lora()))
    assert_close(baked, only_a, atol=1e-4, what="baked-in LoRA")
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert get_handle(model) is not None
    assert [n for n, _ in get_handle(model).named_clear_parameters(real_names=True)] == clear_names
    # a plain unload (nothing fused) gives the linearized model without LoRA back
    again, _ = clear_and_oracle()
    again.load_lora_adapter(copy.deepcopy(b), adapter_name="b")
    again.unload_lora()
    assert_close(run(again, inputs), plain, atol=1e-6, what="unload_lora")


def test_lora_hotswap_under_torch_compile_does_not_recompile():
    from torch._dynamo.testing import CompileCounter

    small = dict(num_layers=1, num_single_layers=1)  # one block of each kind: a quicker compile
    targets = [t for t in LORA_TARGETS if ".0." in t]
    first_lora, second_lora = lora_state_dict(2, 1, targets), lora_state_dict(4, 2, targets)  # ranks differ
    torch._dynamo.reset()
    try:
        model = tiny_flux_transformer(**small)
        cleardit.linearize(model, radius=RADIUS, backend="reference")
        model.enable_lora_hotswap(target_rank=4)  # before the first LoRA, as diffusers asks
        model.load_lora_adapter(first_lora, adapter_name="style")
        inputs = flux_inputs(model, HEIGHT, WIDTH, TEXT, seed=4)
        first = run(model, inputs)  # the eager forward that reads this size's grid
        counter = CompileCounter()
        compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=counter)
        assert_close(run(compiled, inputs), first, atol=1e-4, what="compiled, first LoRA")
        frames = counter.frame_count
        assert frames >= 1
        model.load_lora_adapter(copy.deepcopy(second_lora), adapter_name="style", hotswap=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            swapped = run(compiled, inputs)
        assert counter.frame_count == frames  # the swap reused the compiled graph
        expected_model = tiny_flux_transformer(**small)
        cleardit.linearize(expected_model, radius=RADIUS, backend="reference")
        expected_model.load_lora_adapter(copy.deepcopy(second_lora), adapter_name="style")
        expected = run(expected_model, inputs)
        assert (expected - first).abs().max() > 1e-2  # the two LoRAs differ
        assert_close(swapped, expected, atol=1e-4, what="compiled after hot-swap vs eager")
        _, oracle = clear_and_oracle(**small)
        oracle.load_lora_adapter(copy.deepcopy(second_lora), adapter_name="style")
        assert_close(swapped, run(oracle, inputs), atol=1e-4, what="compiled after hot-swap vs oracle")
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- Chroma
CHROMA_TEXT = 8


def tiny_chroma_transformer(seed: int = 0):
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    model = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def chroma_inputs(height: int, width: int, kept: list[int], seed: int = 3, float_mask: bool = False) -> dict:
    """Forward kwargs of a Chroma transformer: ``kept[b]`` of sample b's CHROMA_TEXT text tokens are real,
    the rest padding (masked out), as ChromaPipeline passes them."""
    g = torch.Generator().manual_seed(seed)
    batch, image = len(kept), height * width
    text_keep = torch.arange(CHROMA_TEXT)[None, :] < torch.tensor(kept)[:, None]
    mask = torch.cat([text_keep, torch.ones(batch, image, dtype=torch.bool)], dim=1)
    ids = torch.zeros(height, width, 3)
    ids[..., 1] += torch.arange(height)[:, None]
    ids[..., 2] += torch.arange(width)[None, :]
    return dict(
        hidden_states=torch.randn(batch, image, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, CHROMA_TEXT, 32, generator=g),
        timestep=torch.full((batch,), 0.6),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(CHROMA_TEXT, 3),
        attention_mask=mask.float() if float_mask else mask,
        return_dict=False,
    )


class DenseChromaMask(DenseMaskProcessor):
    """The brute-force CLEAR mask AND Chroma's own text-padding mask (the [B, 1, S, S] outer product its
    blocks pass): padded text keys are dropped, padded text queries see nothing and output zeros (as
    under diffusers' boolean mask). Written without cleardit."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        def project(x, to_q, to_k, to_v, norm_q, norm_k):
            q, k, v = (f(x).unflatten(-1, (-1, attn.head_dim)) for f in (to_q, to_k, to_v))
            return norm_q(q), norm_k(k), v

        q, k, v = project(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        if encoder_hidden_states is not None:
            eq, ek, ev = project(
                encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                attn.norm_added_q, attn.norm_added_k,
            )  # fmt: skip
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        q, k = (apply_rotary_emb(t, image_rotary_emb, sequence_dim=1) for t in (q, k))
        mask = self.mask[None] & (attention_mask[:, 0] != 0)  # [B, S, S]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None]
        )
        out = torch.where(mask.any(-1)[:, None, :, None], out, torch.zeros_like(out))
        out = out.transpose(1, 2).flatten(2, 3)
        if encoder_hidden_states is None:
            return out
        t = encoder_hidden_states.shape[1]
        return attn.to_out[0](out[:, t:]), attn.to_add_out(out[:, :t])


def chroma_run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def chroma_oracle(model, inputs, height, width):
    """``model``'s output with the dense oracle in every attention layer of a copy with the original
    processors (a boolean mask: the pipelines' float 0/1 mask would be added to the logits)."""
    oracle = copy.deepcopy(model)
    if get_handle(oracle) is not None:
        get_handle(oracle).restore()
    oracle.set_attn_processor(DenseChromaMask(height, width, CHROMA_TEXT, RADIUS))
    return chroma_run(oracle, dict(inputs, attention_mask=inputs["attention_mask"] != 0))


def group_rows(model):
    groups = model._cleardit_grid.groups
    return None if groups is None else [(r.tolist(), i.tolist(), k) for r, i, k in groups]


def test_deepcopy_of_a_linearized_chroma_is_independent_and_honours_its_own_mask():
    model = tiny_chroma_transformer()
    cleardit.linearize(model, radius=RADIUS, backend="reference")
    a = chroma_inputs(6, 5, [3, 7])
    b = chroma_inputs(5, 6, [8, 2], seed=5)  # same token count, other grid, other padding
    want_a, want_b = chroma_oracle(model, a, 6, 5), chroma_oracle(model, b, 5, 6)
    fresh = copy.deepcopy(model)  # before any forward
    assert_close(chroma_run(fresh, a), want_a, what="copy made before a forward")
    assert_close(chroma_run(model, b), want_b, what="original")
    seen = group_rows(model)
    assert seen is not None and len(seen) == 2  # two padding lengths: two groups of samples
    ema = copy.deepcopy(model)  # after a forward on the other grid and mask
    assert ema._cleardit_grid is not model._cleardit_grid
    assert all(p.geometry is ema._cleardit_grid for p in ema.attn_processors.values())
    assert_close(chroma_run(ema, a), want_a, what="copy made after a forward")
    assert group_rows(model) == seen  # the copy's forward did not touch the original's state
    # a forward without a mask after one with a mask keeps no stale text groups
    keep_all = dict(a, attention_mask=torch.ones_like(a["attention_mask"]))
    assert_close(chroma_run(ema, dict(a, attention_mask=None)), chroma_oracle(model, keep_all, 6, 5),
                 what="no mask after a masked forward")  # fmt: skip
    assert group_rows(ema) is None
    # restoring the copy restores the copy only
    get_handle(ema).restore()
    assert_close(
        chroma_run(ema, a), chroma_run(tiny_chroma_transformer(), a), atol=1e-6, what="restored copy"
    )
    assert get_handle(model) is not None
    assert_close(chroma_run(model, a), want_a, what="original after the copy was restored")


def test_torch_save_and_load_of_a_linearized_chroma():
    model = tiny_chroma_transformer()
    handle = cleardit.linearize(model, radius=RADIUS, backend="reference")
    inputs = chroma_inputs(6, 5, [3, 7], float_mask=True)  # the pipelines' float 0/1 mask
    expected = chroma_run(model, inputs)
    assert_close(expected, chroma_oracle(model, inputs, 6, 5), what="before saving")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded._cleardit_grid).__name__ == "TextMaskGrid"
    assert_close(chroma_run(loaded, inputs), expected, atol=0, what="loaded")
    # the loaded model still drops padded text: changing it changes nothing
    changed = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    changed["encoder_hidden_states"][:, 7:] += 3.0
    assert_close(chroma_run(loaded, changed), expected, what="padded text changed")
    get_handle(loaded).restore()
    assert not hasattr(loaded, "_cleardit_grid") and not loaded._forward_pre_hooks
    assert get_handle(model) is handle


def test_processors_replaced_on_a_linearized_chroma_are_refused():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model = tiny_chroma_transformer()
    handle = cleardit.linearize(model, radius=RADIUS, backend="reference")
    inputs = chroma_inputs(5, 6, [3, 7])
    model.set_attn_processor(FluxAttnProcessor())
    with pytest.raises(RuntimeError, match="3 of the 3 attention processors of this linearized Chroma"):
        chroma_run(model, inputs)
    handle.restore()
    cleardit.linearize(model, radius=RADIUS, backend="reference")
    model.single_transformer_blocks[1].attn.set_processor(FluxAttnProcessor())
    with pytest.raises(RuntimeError, match="1 of the 3 attention processors"):
        chroma_run(model, inputs)
    # the supported way: restore, change processors, linearize again
    get_handle(model).restore()
    model.single_transformer_blocks[1].attn.set_processor(FluxAttnProcessor())
    cleardit.linearize(model, radius=RADIUS, backend="reference")
    assert_close(chroma_run(model, inputs), chroma_oracle(model, inputs, 5, 6), what="linearized again")
