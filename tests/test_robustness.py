"""A linearized model stays right where FLUX users' tools take it (issue 26): copies, pickles,
processors swapped behind its back, fused projections. Every check is against the dense-mask oracle."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import cleardit
from cleardit.models import get_handle
from cleardit.models.tiny import flux_inputs, tiny_flux_transformer
from tests.helpers import dense_oracle_output

RADIUS = 2


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def test_deepcopy_gives_an_independent_linearized_model():
    model = tiny_flux_transformer()
    cleardit.linearize(model, radius=RADIUS, backend="reference")
    a, b = flux_inputs(model, 6, 8, seed=1), flux_inputs(model, 8, 6, seed=2)  # same token count
    fresh = copy.deepcopy(model)  # before any forward
    torch.testing.assert_close(
        run(fresh, a), dense_oracle_output(model, a, 6, 8, 5, RADIUS), atol=1e-5, rtol=0
    )
    run(model, a)
    ema = copy.deepcopy(model)  # after a forward on another grid: no stale layout
    torch.testing.assert_close(run(ema, b), dense_oracle_output(model, b, 8, 6, 5, RADIUS), atol=1e-5, rtol=0)
    assert ema._cleardit_grid is not model._cleardit_grid
    assert get_handle(ema).model is ema and get_handle(ema) is not get_handle(model)
    # restoring the copy restores the copy only
    expected = run(model, a)
    get_handle(ema).restore()
    torch.testing.assert_close(run(ema, a), run(tiny_flux_transformer(), a), atol=1e-6, rtol=0)
    assert get_handle(model) is not None and torch.equal(run(model, a), expected)


def test_torch_save_and_load_of_a_linearized_model():
    model = tiny_flux_transformer()
    handle = cleardit.linearize(model, radius=RADIUS, down_factor=2)
    inputs = flux_inputs(model, 7, 9, batch=2)
    expected = run(model, inputs)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(run(loaded, inputs), expected, atol=0, rtol=0)
    get_handle(loaded).restore()
    assert not hasattr(loaded, "_cleardit_grid") and not loaded._forward_pre_hooks
    assert get_handle(model) is handle


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_restore_removes_exactly_what_linearize_added(backend):
    model = tiny_flux_transformer()
    model.register_forward_pre_hook(lambda _m, args: None)  # a user's hook stays
    before = dict(model.attn_processors)
    handle = cleardit.linearize(model, radius=RADIUS, backend=backend)
    handle.restore()
    assert list(model._forward_pre_hooks) and len(model._forward_pre_hooks) == 1 and not model._forward_hooks
    assert model.attn_processors == before


def test_processors_replaced_after_linearize_are_refused_not_silently_used():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model = tiny_flux_transformer()
    handle = cleardit.linearize(model, radius=RADIUS)
    inputs = flux_inputs(model, 5, 6)
    model.set_attn_processor(FluxAttnProcessor())  # CLEAR silently gone, the handle still active
    with pytest.raises(RuntimeError, match="were replaced after linearize"):
        run(model, inputs)
    handle.restore()  # the supported way: restore, then linearize again
    cleardit.linearize(model, radius=RADIUS, backend="reference")
    model.single_transformer_blocks[0].attn.set_processor(FluxAttnProcessor())  # one layer is enough
    with pytest.raises(RuntimeError, match="1 of the 4 attention processors"):
        run(model, inputs)


def test_weights_loaded_after_fuse_qkv_projections_reach_the_fused_projection(tmp_path):
    trained = tiny_flux_transformer(seed=3)  # stands in for CLEAR weights that differ from the model's
    cleardit.linearize(trained, radius=RADIUS, backend="reference")
    path = cleardit.save_weights(trained, tmp_path / "clear.safetensors")
    inputs = flux_inputs(trained, 6, 7)
    unfused = tiny_flux_transformer()
    cleardit.linearize(unfused, radius=RADIUS, backend="reference")
    cleardit.load_weights(unfused, path)
    fused = tiny_flux_transformer()
    fused.fuse_qkv_projections()
    cleardit.linearize(fused, radius=RADIUS, backend="reference")
    cleardit.load_weights(fused, path)
    torch.testing.assert_close(run(fused, inputs), run(unfused, inputs), atol=1e-5, rtol=1e-5)


def test_clear_parameters_are_found_through_peft_lora_wrappers(tmp_path):
    from peft import LoraConfig

    plain = tiny_flux_transformer()
    expected_names = [n for n, _ in cleardit.linearize(plain, radius=RADIUS).named_clear_parameters()]
    trained = tiny_flux_transformer(seed=3)
    cleardit.linearize(trained, radius=RADIUS, backend="reference")
    path = cleardit.save_weights(trained, tmp_path / "clear.safetensors")

    model = tiny_flux_transformer()
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    handle = cleardit.linearize(model, radius=RADIUS, backend="reference")
    assert [n for n, _ in handle.named_clear_parameters()] == expected_names  # plain names, no LoRA
    report = cleardit.load_weights(model, path)
    assert not report.missing
    # LoRA's B starts at zero: the model equals the plain one with the same CLEAR weights loaded
    inputs = flux_inputs(model, 5, 7, batch=2)
    cleardit.load_weights(plain, path)
    expected = dense_oracle_output(plain, inputs, 5, 7, 5, RADIUS)
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=1e-5)
    saved = cleardit.save_weights(model, tmp_path / "again.safetensors")
    from safetensors.torch import load_file

    assert sorted(load_file(str(saved))) == sorted(expected_names)


def test_gradient_checkpointing_two_forwards_then_one_backward():
    """Equal token counts, different grids: each block's recompute during backward must use the grid of
    the forward that made it, not the last one."""

    def grads(checkpointing: bool):
        model = tiny_flux_transformer()
        model.train()
        cleardit.linearize(model, radius=RADIUS, backend="reference")
        if checkpointing:
            model.enable_gradient_checkpointing()
        a, b = flux_inputs(model, 6, 8, seed=1), flux_inputs(model, 8, 6, seed=2)
        loss = model(**a).sample.square().mean() + 0.5 * model(**b).sample.square().mean()
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def _with_ip_adapter(model, tokens: int = 4):
    """diffusers' IP-Adapter processors in the dual-stream blocks (random weights), like load_ip_adapter."""
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    g = torch.Generator().manual_seed(7)
    for block in model.transformer_blocks:
        proc = FluxIPAdapterAttnProcessor(
            model.inner_dim, model.config.joint_attention_dim, num_tokens=(tokens,)
        )
        with torch.no_grad():
            for p in proc.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        block.attn.set_processor(proc)
    ip_tokens = torch.randn(2, tokens, model.config.joint_attention_dim, generator=g)
    return {"joint_attention_kwargs": {"ip_hidden_states": [ip_tokens]}}


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_ip_adapter_branch_is_kept_under_clear(backend):
    model = tiny_flux_transformer()
    extra = _with_ip_adapter(model)
    inputs = flux_inputs(model, 9, 18, batch=2)  # larger than a tile: tile-major order in the forward
    expected = run(model, {**inputs, **copy.deepcopy(extra)})
    ip_tokens = extra["joint_attention_kwargs"]["ip_hidden_states"][0]
    without_ip = run(model, {**inputs, "joint_attention_kwargs": {"ip_hidden_states": [ip_tokens * 0]}})
    assert (expected - without_ip).abs().max() > 1e-2  # the IP branch matters in this model
    handle = cleardit.linearize(model, radius=10_000, backend=backend)  # beyond the grid: equal to diffusers
    torch.testing.assert_close(run(model, {**inputs, **copy.deepcopy(extra)}), expected, atol=2e-5, rtol=1e-5)
    handle.restore()
    assert type(model.transformer_blocks[0].attn.processor).__name__ == "FluxIPAdapterAttnProcessor"


def test_ip_adapter_loaded_after_linearize_is_refused_clearly():
    model = tiny_flux_transformer()
    cleardit.linearize(model, radius=RADIUS)
    # load_ip_adapter rebuilds the single blocks' processors as type(p)() and puts IP processors in the others
    for block in model.single_transformer_blocks:
        block.attn.set_processor(type(block.attn.processor)())
    extra = _with_ip_adapter(model)
    with pytest.raises(RuntimeError, match="load_ip_adapter"):
        run(model, {**flux_inputs(model, 5, 6, batch=2), **extra})


def test_diffusers_context_parallelism_is_refused_with_the_supported_way():
    model = tiny_flux_transformer()
    cleardit.linearize(model, radius=RADIUS)
    model._parallel_config = object()  # what enable_parallelism(...) records on the model
    with pytest.raises(ValueError, match="--devices N"):
        run(model, flux_inputs(model, 4, 5))


def test_dtype_moves_and_save_pretrained_round_trip(tmp_path):
    inputs = flux_inputs(tiny_flux_transformer(), 6, 7, batch=2)
    low_inputs = {k: v.to(torch.bfloat16) for k, v in inputs.items()}

    def bf16_error(model):  # how far the model's bf16 output is from its fp32 output
        full = run(model, inputs)
        low = run(model.to(torch.bfloat16), low_inputs).float()
        model.to(torch.float32)
        return (low - full).abs().max().item()

    diffusers_error = bf16_error(tiny_flux_transformer())
    model = tiny_flux_transformer()
    cleardit.linearize(model, radius=RADIUS, down_factor=2, backend="reference")
    assert bf16_error(model) < 2 * diffusers_error  # CLEAR adds no bf16 error of its own
    model.to(torch.bfloat16)
    assert model.transformer_blocks[0].attn.processor.spatial_weight.dtype == torch.bfloat16
    model.to(torch.float32)
    assert model.transformer_blocks[0].attn.processor.spatial_weight.dtype == torch.float32
    # save_pretrained writes the model with its CLEAR parameters; from_pretrained + linearize brings it back
    plain = tiny_flux_transformer()
    cleardit.linearize(plain, radius=RADIUS, backend="reference")
    plain.save_pretrained(tmp_path / "m")
    again = type(plain).from_pretrained(tmp_path / "m").eval()
    assert get_handle(again) is None
    cleardit.linearize(again, radius=RADIUS, backend="reference")
    torch.testing.assert_close(run(again, inputs), run(plain, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "tiled", pytest.param("flex", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_matches_eager_without_graph_breaks(backend):
    """The grid is read from img_ids eagerly, once per size; compiled code takes it from there and
    checks the ids against it inside the graph. The tile-major order (a small tile here, so the
    tokens really move) and the tiled backend (custom operators) stay in the one graph."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = tiny_flux_transformer(num_layers=1, num_single_layers=1)  # compiles faster
    cleardit.linearize(model, radius=RADIUS, backend=backend, tile=(2, 3))
    a, b = flux_inputs(model, 6, 8, seed=1), flux_inputs(model, 5, 7, seed=2)
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=counter)
    with pytest.raises(Exception, match="run the model once without torch.compile at this size"):
        run(compiled, a)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=counter)
    expected_a = run(model, a)  # the eager forward that reads (and checks) the grid of this size
    torch.testing.assert_close(expected_a, dense_oracle_output(model, a, 6, 8, 5, RADIUS), atol=1e-5, rtol=0)
    torch.testing.assert_close(run(compiled, a), expected_a, atol=1e-4, rtol=1e-4)
    per_size = counter.frame_count
    torch.testing.assert_close(run(compiled, a), expected_a, atol=1e-4, rtol=1e-4)
    assert counter.frame_count == per_size  # no recompile at the same size
    expected_b = run(model, b)
    torch.testing.assert_close(run(compiled, b), expected_b, atol=1e-4, rtol=1e-4)
    assert counter.frame_count == 2 * per_size  # a second size compiles once more
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(**a)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    # 8x6 has the token count of 6x8, which ran eagerly: the compiled check refuses the other grid
    with pytest.raises(RuntimeError, match="do not form the grid compiled for this token count"):
        run(compiled, flux_inputs(model, 8, 6, seed=3))
    torch._dynamo.reset()


def test_torch_compile_backward_matches_eager_with_the_tiled_backend():
    """Gradients through the compiled model (the tiled backend's backward operator) equal eager ones."""
    torch._dynamo.reset()
    model = tiny_flux_transformer(num_layers=1, num_single_layers=1)  # compiles faster
    cleardit.linearize(model, radius=RADIUS, backend="tiled", down_factor=2, tile=(2, 3))
    inputs = flux_inputs(model, 6, 7, batch=2, seed=4)
    params = [p for _, p in get_handle(model).named_clear_parameters()]

    def grads(fn):
        for p in params:
            p.grad = None
        fn(**inputs).sample.square().mean().backward()
        return [p.grad.clone() for p in params]

    expected = grads(model)
    got = grads(torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager"))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


def test_compile_repeated_blocks_with_the_tiled_backend():
    """diffusers' regional compilation (each block compiled, fullgraph): the hooks stay eager, so
    every grid is read from the ids, also two grids with one token count."""
    torch._dynamo.reset()
    model = tiny_flux_transformer(num_layers=1, num_single_layers=1)
    cleardit.linearize(model, radius=RADIUS, backend="tiled", tile=(2, 3))
    a, b = flux_inputs(model, 6, 8, seed=1), flux_inputs(model, 8, 6, seed=2)
    expected = [run(model, a), run(model, b)]
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    for inputs, want in zip((a, b), expected, strict=True):
        torch.testing.assert_close(run(model, inputs), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(expected[1], dense_oracle_output(model, b, 8, 6, 5, RADIUS), atol=1e-5, rtol=0)
    torch._dynamo.reset()


def test_torch_export_of_a_linearized_model():
    """torch.export traces the forward like the compiler does (grid from an eager forward at that size)."""
    model = tiny_flux_transformer(num_layers=1, num_single_layers=1)
    cleardit.linearize(model, radius=RADIUS, backend="tiled", tile=(2, 3))
    inputs = flux_inputs(model, 6, 8, batch=2, seed=5)
    expected = run(model, inputs)
    with torch.no_grad():
        exported = torch.export.export(model, (), inputs).module()
        out = exported(**inputs)
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out.sample, expected, atol=1e-5, rtol=0)


def test_ip_adapter_scale_set_after_linearize_is_used():
    model = tiny_flux_transformer()
    extra = _with_ip_adapter(model)
    inputs = flux_inputs(model, 5, 6, batch=2)
    for proc in model.attn_processors.values():  # what pipe.set_ip_adapter_scale(0.0) does
        if hasattr(proc, "to_k_ip"):
            proc.scale = [0.0]
    expected = run(model, {**inputs, **copy.deepcopy(extra)})
    for proc in model.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.scale = [1.0]
    cleardit.linearize(model, radius=10_000, backend="reference")
    for proc in model.attn_processors.values():
        if hasattr(proc, "ip_adapter"):
            proc.scale = [0.0]
    torch.testing.assert_close(run(model, {**inputs, **copy.deepcopy(extra)}), expected, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="need ip_hidden_states"):
        run(model, inputs)


def test_distillation_teacher_runs_on_a_peft_model():
    from peft import LoraConfig

    from cleardit.distill.teacher import TeacherView

    model = tiny_flux_transformer()
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"]))
    inputs = flux_inputs(model, 5, 6)
    expected = run(model, inputs)  # LoRA's B is zero: the original model's output
    teacher = TeacherView(model)
    handle = cleardit.linearize(model, radius=RADIUS)
    teacher.freeze_initial(handle)
    torch.testing.assert_close(teacher.run(**inputs).sample, expected, atol=1e-5, rtol=1e-5)


def test_diffusers_first_block_cache_on_a_linearized_model():
    """The cache's decisions and reuse give the same numbers as on the dense-mask reference model."""
    from diffusers.hooks import FirstBlockCacheConfig

    from tests.helpers import DenseMaskProcessor

    model = tiny_flux_transformer()
    oracle = tiny_flux_transformer()
    oracle.set_attn_processor(DenseMaskProcessor(6, 8, 5, RADIUS))
    cleardit.linearize(model, radius=RADIUS, backend="reference")
    outputs = {}
    for name, m in (("clear", model), ("oracle", oracle)):
        m.enable_cache(FirstBlockCacheConfig(threshold=0.5))
        outputs[name] = []
        for step in range(3):
            inputs = flux_inputs(m, 6, 8, seed=1)
            inputs["hidden_states"] = inputs["hidden_states"] * (
                1 + 0.01 * step
            )  # the cache reuses steps 2-3
            with m.cache_context("cond"):
                outputs[name].append(run(m, inputs))
    for got, want in zip(outputs["clear"], outputs["oracle"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
