"""HunyuanVideo 1.5: CLEAR on a tiny HunyuanVideo15Transformer3DModel equals a hand-written dense
3D-mask oracle (forward and gradients), with its condition-token padding mask, image-condition
tokens and the temporal radius; every backend agrees; what is not supported is refused clearly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

from cleardit import linearize, load_weights, save_weights
from cleardit.models import NotSupportedError, adapter_for, adapter_for_pipeline_class, get_handle
from cleardit.models.tiny import tiny_flux_transformer

CHANNELS, TEXT_DIM, BYT5_DIM, IMAGE_DIM = 4, 12, 10, 8
TEXT_LEN, BYT5_LEN, IMAGE_LEN = 6, 4, 3


def tiny_hunyuanvideo15(seed: int = 0, **overrides) -> HunyuanVideo15Transformer3DModel:
    torch.manual_seed(seed)
    config = dict(
        in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=2, attention_head_dim=16,
        num_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=TEXT_DIM,
        text_embed_2_dim=BYT5_DIM, image_embed_dim=IMAGE_DIM, rope_axes_dim=(4, 6, 6),
    )  # fmt: skip
    model = HunyuanVideo15Transformer3DModel(**{**config, **overrides})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # diffusers zero-initialises some layers: random values make every path count
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval().requires_grad_(False)


def hy_inputs(shape, text_kept, byt5_kept, image=False, seed=3, dtype=torch.float32):
    """Forward kwargs for latents of ``shape`` (T, H, W); sample b keeps its first text_kept[b] MLLM
    and byt5_kept[b] ByT5 tokens; ``image``: image-to-video (the image-condition tokens are kept),
    else text-to-video (image_embeds zero: diffusers drops those tokens)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(text_kept)

    def kept(counts, length):
        return (torch.arange(length)[None, :] < torch.tensor(counts)[:, None]).long()

    image_embeds = (
        torch.randn(batch, IMAGE_LEN, IMAGE_DIM, generator=g)
        if image
        else torch.zeros(batch, IMAGE_LEN, IMAGE_DIM)
    )
    return dict(
        hidden_states=torch.randn(batch, CHANNELS, *shape, generator=g).to(dtype),
        timestep=torch.full((batch,), 600.0, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g).to(dtype),
        encoder_attention_mask=kept(text_kept, TEXT_LEN),
        encoder_hidden_states_2=torch.randn(batch, BYT5_LEN, BYT5_DIM, generator=g).to(dtype),
        encoder_attention_mask_2=kept(byt5_kept, BYT5_LEN),
        image_embeds=image_embeds.to(dtype),
        return_dict=False,
    )


def oracle_pool(k, grid, df, weight):
    """Pooled video keys of k [B, heads, T*H*W, d]: each frame pooled in space, a weighted sum per
    df x df block, the frame zero-padded at the bottom/right."""
    (frames, height, width), (b, h, _, d) = grid, k.shape
    x = k.reshape(b, h, frames, height, width, d)
    hp, wp = -(-height // df), -(-width // df)
    x = F.pad(x, (0, 0, 0, wp * df - width, 0, hp * df - height))
    blocks = x.reshape(b, h, frames, hp, df, wp, df, d)
    return (blocks * weight[:, None, :, None]).sum(dim=(4, 6)).reshape(b, h, frames * hp * wp, d)


class DenseOracle:
    """HunyuanVideo 1.5's joint attention (diffusers' math) with one explicit boolean mask: video
    queries see video keys with dt²r² + (dy² + dx²)rt² < r²rt² (rt None: dy² + dx² < r²), every
    condition token is global both ways, and diffusers' padding mask (kept query AND kept key) on
    top; with ``pool_weight`` the video queries also see every frame's pooled keys."""

    def __init__(self, grid, radius, temporal_radius=None, pool_weight=None):
        self.grid, self.radius, self.rt, self.pool_weight = grid, radius, temporal_radius, pool_weight

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        def heads(x):
            return x.unflatten(2, (attn.heads, -1))

        vq, vk, vv = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        vq, vk = attn.norm_q(vq), attn.norm_k(vk)
        vq, vk = (apply_rotary_emb(x, image_rotary_emb, sequence_dim=1) for x in (vq, vk))
        cq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
        ck = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        q, k, v = (torch.cat(p, dim=1).transpose(1, 2) for p in ((vq, cq), (vk, ck), (vv, cv)))

        frames, height, width = self.grid
        video, n, batch = vq.shape[1], q.shape[2], q.shape[0]
        assert video == frames * height * width
        index = torch.arange(n)
        on_grid = index < video
        t = torch.where(on_grid, index // (height * width), -1)
        y = torch.where(on_grid, index // width % height, -1)
        x = torch.where(on_grid, index % width, -1)
        space = (y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2
        if self.rt is None:
            near = space < self.radius**2
        else:
            dt2 = (t[:, None] - t[None, :]) ** 2
            near = dt2 * self.radius**2 + space * self.rt**2 < self.radius**2 * self.rt**2
        allowed = ~on_grid[:, None] | ~on_grid[None, :] | near
        kept = torch.cat([torch.ones(batch, video, dtype=torch.bool), attention_mask.bool()], dim=1)
        mask = allowed[None] & kept[:, :, None] & kept[:, None, :]
        if self.pool_weight is not None:
            df = self.pool_weight.shape[0]
            pk, pv = (oracle_pool(z[:, :, :video], self.grid, df, self.pool_weight) for z in (k, v))
            k, v = torch.cat([k, pk], dim=2), torch.cat([v, pv], dim=2)
            mask = torch.cat([mask, on_grid[None, :, None].expand(batch, n, pk.shape[2])], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None]).transpose(1, 2).flatten(2, 3)
        video_out = attn.to_out[1](attn.to_out[0](out[:, :video]))
        return video_out, attn.to_add_out(out[:, video:])


def oracle_model(model, grid, radius, temporal_radius=None, pool_weight=None):
    """A deep copy of the (unlinearized) model with the oracle in every block."""
    oracle = copy.deepcopy(model)
    if get_handle(oracle) is not None:
        get_handle(oracle).restore()
    for block in oracle.transformer_blocks:
        block.attn.set_processor(DenseOracle(grid, radius, temporal_radius, pool_weight))
    return oracle


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def run_with_grads(model, inputs):
    """(output, gradient of a fixed random projection of it w.r.t. the latents and every parameter)."""
    model = model.requires_grad_(True)
    latents = inputs["hidden_states"].clone().requires_grad_(True)
    out = model(**{**inputs, "hidden_states": latents})[0]
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(11))
    (out * weight).sum().backward()
    grads = {"hidden_states": latents.grad}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    model.requires_grad_(False).zero_grad(set_to_none=True)
    return out.detach(), grads


def assert_grads_close(got, expected):
    """Every gradient within 1e-5 of the expected one, relative to its largest entry when that is
    above 1 (fp32 sums over the whole model's tokens: the time embedding's gradient reaches ~20)."""
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        error, scale = (got[name] - g).abs().max().item(), max(1.0, g.abs().max().item())
        assert error <= 1e-5 * scale, f"{name}: gradient off by {error:.3g} (largest entry {scale:.3g})"


@pytest.mark.parametrize(
    "shape,radius,rt,text_kept,byt5_kept,image,backend,tile",
    [
        ((3, 5, 7), 2, 2, [2, 6], [4, 1], False, "reference", (2, 3)),  # odd T/H/W, two padding groups
        ((3, 5, 7), 2, None, [2, 6], [4, 1], False, "tiled", (2, 2, 3)),  # a cylinder; tiles 2 frames deep
        ((2, 4, 9), 3, 1, [6, 6], [4, 4], True, "tiled", None),  # non-square, image tokens, each frame alone
        pytest.param((4, 3, 5), 2, 3, [3, 3], [2, 2], True, "reference", (2, 2), marks=pytest.mark.slow),
    ],
)
def test_linearized_model_matches_dense_3d_oracle_forward_and_gradients(
    shape, radius, rt, text_kept, byt5_kept, image, backend, tile
):
    model = tiny_hunyuanvideo15()
    inputs = hy_inputs(shape, text_kept, byt5_kept, image)
    expected, expected_grads = run_with_grads(oracle_model(model, shape, radius, rt), inputs)
    handle = linearize(model, radius=radius, temporal_radius=rt, backend=backend, tile=tile)
    got, grads = run_with_grads(model, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert_grads_close(grads, expected_grads)
    handle.restore()  # the rule really cuts: full attention gives other numbers
    assert (run(model, inputs) - expected).abs().max() > 1e-3


def test_flex_forward_matches_the_oracle():
    shape, radius, rt = (3, 4, 5), 2, 2
    model = tiny_hunyuanvideo15()
    inputs = hy_inputs(shape, [2, 6], [4, 1])
    expected = run(oracle_model(model, shape, radius, rt), inputs)
    linearize(model, radius=radius, temporal_radius=rt, backend="flex", tile=(2, 2))
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=1e-5)


def test_triton_forward_matches_the_oracle():
    """Triton's interpreter runs every program in Python: one head, one block, a tiny video."""
    shape, radius, rt = (2, 3, 4), 2, 2
    model = tiny_hunyuanvideo15(num_attention_heads=1, num_layers=1)
    inputs = hy_inputs(shape, [3, 3], [2, 2])
    expected = run(oracle_model(model, shape, radius, rt), inputs)
    linearize(model, radius=radius, temporal_radius=rt, backend="triton", tile=(2, 2))
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "shape,radius,rt,backend",
    [
        ((3, 5, 7), 2, 2, "tiled"),
        pytest.param((2, 4, 9), 3, None, "tiled", marks=pytest.mark.slow),
        pytest.param((3, 5, 7), 2, 2, "triton", marks=pytest.mark.slow),  # minutes in the interpreter
        pytest.param((2, 4, 9), 3, None, "triton", marks=pytest.mark.slow),
        pytest.param((2, 4, 9), 3, None, "flex", marks=pytest.mark.slow),
    ],
)
def test_every_backend_agrees_with_reference(shape, radius, rt, backend):
    """Forward and (backends with a backward) gradients of the whole model, tile-major order, two
    padding groups and kept image-condition tokens."""
    inputs = hy_inputs(shape, [3, 6], [2, 4], image=True)
    results = []
    for name in ("reference", backend):
        model = tiny_hunyuanvideo15()
        linearize(model, radius=radius, temporal_radius=rt, backend=name, tile=(2, 4))
        results.append(run(model, inputs) if backend == "flex" else run_with_grads(model, inputs))
    if backend == "flex":  # FlexAttention runs forward only on the CPU
        torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)
        return
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    assert_grads_close(results[1][1], results[0][1])


def test_pooled_branch_matches_the_oracle():
    shape, radius, rt, df = (2, 5, 7), 2, 2, 2
    model = tiny_hunyuanvideo15()
    inputs = hy_inputs(shape, [3, 6], [4, 2])
    weight = 0.25 + 0.2 * torch.randn(df, df, generator=torch.Generator().manual_seed(9))
    linearize(model, radius=radius, temporal_radius=rt, down_factor=df, backend="tiled", tile=(2, 4))
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.attn.processor.spatial_weight.copy_(weight.reshape(1, 1, 1, df, 1, df, 1))
    expected = run(oracle_model(model, shape, radius, rt, pool_weight=weight), inputs)
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=1e-5)


def test_patched_latents_form_the_grid():
    """patch_size_t = patch_size = 2: the grid is the latents' (T, H, W) / patch (here 2 x 3 x 5)."""
    model = tiny_hunyuanvideo15(patch_size=2, patch_size_t=2)
    inputs = hy_inputs((4, 6, 10), [2, 6], [4, 1])
    expected = run(oracle_model(model, (2, 3, 5), 2, 2), inputs)
    linearize(model, radius=2, temporal_radius=2, backend="tiled", tile=(2, 2))
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rt", [None, 9])
def test_radius_beyond_the_grid_equals_the_original_model_and_restore_is_exact(rt):
    model = tiny_hunyuanvideo15()
    inputs = hy_inputs((3, 5, 7), [2, 6], [4, 1])
    original = run(model, inputs)
    handle = linearize(model, radius=9, temporal_radius=rt, tile=(2, 3))
    torch.testing.assert_close(run(model, inputs), original, atol=1e-5, rtol=1e-5)
    handle.restore()
    assert torch.equal(run(model, inputs), original)
    assert all(isinstance(b.attn.processor, HunyuanVideo15AttnProcessor2_0) for b in model.transformer_blocks)
    assert not any("_cleardit_grid" in m.__dict__ for m in model.modules())
    assert (
        not model._forward_pre_hooks and not model.rope._forward_hooks and not model.proj_out._forward_hooks
    )


def test_padding_mask_decides_what_is_seen():
    """Padded condition tokens are dropped (their embeddings do not matter), and the mask matters: the
    same inputs with nothing padded give other numbers."""
    model = tiny_hunyuanvideo15()
    inputs = hy_inputs((2, 4, 5), [2, 6], [1, 4])
    linearize(model, radius=2, temporal_radius=2, backend="tiled")
    got = run(model, inputs)
    changed = dict(inputs, encoder_hidden_states_2=inputs["encoder_hidden_states_2"].clone())
    changed["encoder_hidden_states_2"][0, 1:] += 3.0  # sample 0's padded ByT5 tokens
    torch.testing.assert_close(run(model, changed), got, atol=1e-6, rtol=0)
    unpadded = dict(inputs, encoder_attention_mask=torch.ones_like(inputs["encoder_attention_mask"]))
    assert (run(model, unpadded)[0] - got[0]).abs().max() > 1e-3


def reverse_condition_tokens(model):
    """Hooks that reverse each block's condition tokens and their mask on the way in and back on the
    way out: the kept tokens come last, so the processors get a mask that is not kept-first."""

    def flip_in(block, args, kwargs):
        hidden, cond, temb, mask, rope = args
        return (hidden, cond.flip(1), temb, mask.flip(1), rope), kwargs

    def flip_out(block, args, kwargs, output):
        return output[0], output[1].flip(1)

    for block in model.transformer_blocks:
        block.register_forward_pre_hook(flip_in, with_kwargs=True)
        block.register_forward_hook(flip_out, with_kwargs=True)
    return model


def test_kept_tokens_anywhere_in_the_condition_block_are_honoured():
    """diffusers puts each sample's kept condition tokens first (the processor then slices); a mask
    with kept tokens elsewhere gathers them, with the same result."""
    shape, radius, rt = (2, 4, 5), 2, 2
    model = tiny_hunyuanvideo15()
    inputs = hy_inputs(shape, [2, 6], [4, 1])
    expected = run(reverse_condition_tokens(oracle_model(model, shape, radius, rt)), inputs)
    linearize(model, radius=radius, temporal_radius=rt, backend="tiled", tile=(2, 2))
    got = run(model, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(reverse_condition_tokens(model), inputs), got, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_and_deepcopy_keep_each_forwards_grid():
    model = tiny_hunyuanvideo15()
    inputs = hy_inputs((2, 4, 5), [2, 6], [4, 1])
    linearize(model, radius=2, temporal_radius=2, backend="tiled", tile=(2, 2))
    expected, expected_grads = run_with_grads(model, inputs)
    twin = copy.deepcopy(model)
    twin.enable_gradient_checkpointing()
    twin.train()
    run(twin, hy_inputs((2, 3, 3), [1, 1], [1, 1]))  # another grid in between
    got, grads = run_with_grads(twin, inputs)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert_grads_close(grads, expected_grads)


def test_distillation_teacher_runs_the_original_model_in_tile_major_order():
    from cleardit.distill.teacher import TeacherView

    model = tiny_hunyuanvideo15()
    inputs = hy_inputs((3, 5, 7), [2, 6], [4, 1])
    original = run(model, inputs)
    teacher = TeacherView(model)
    handle = linearize(model, radius=2, temporal_radius=2, tile=(2, 3))
    teacher.freeze_initial(handle)
    assert adapter_for(model).teacher_keeps_tile_order
    torch.testing.assert_close(teacher.run(**inputs)[0], original, atol=1e-5, rtol=1e-5)


def test_bf16_error_is_the_models_own():
    shape, radius, rt = (2, 5, 7), 2, 2
    inputs, low = hy_inputs(shape, [2, 6], [4, 1]), hy_inputs(shape, [2, 6], [4, 1], dtype=torch.bfloat16)
    model = tiny_hunyuanvideo15()
    own_error = (run(copy.deepcopy(model).to(torch.bfloat16), low).float() - run(model, inputs)).abs().max()
    expected = run(oracle_model(model, shape, radius, rt), inputs)
    linearize(model, radius=radius, temporal_radius=rt, backend="tiled", tile=(2, 3))
    clear_error = (run(model.to(torch.bfloat16), low).float() - expected).abs().max()
    assert 0 < clear_error < 2 * own_error


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(hidden_states=torch.randn(2, CHANNELS, 4, 6)), "video latents \\[batch, channels, frames"),
        (dict(hidden_states=torch.randn(2, CHANNELS, 3, 6, 10)), "not a whole number of 2x2x2 patches"),
        (dict(hidden_states=torch.randn(2, CHANNELS, 4, 7, 10)), "multiples of \\(2, 2, 2\\)"),
        (dict(encoder_hidden_states_2=None), "needs encoder_hidden_states_2"),
        (dict(image_embeds=None, encoder_attention_mask_2=None), "encoder_attention_mask_2, image_embeds"),
    ],
)
def test_inputs_that_do_not_form_one_grid_are_refused(change, message):
    model = tiny_hunyuanvideo15(patch_size=2, patch_size_t=2)
    linearize(model, radius=2)
    with pytest.raises(ValueError, match=message):
        run(model, {**hy_inputs((4, 6, 10), [2, 6], [4, 1]), **change})


def test_trainable_parameters_geometry_and_description():
    model = tiny_hunyuanvideo15()
    handle = linearize(model, radius=2, temporal_radius=2, down_factor=2)
    names = [n for n, _ in handle.named_clear_parameters()]
    # 2 blocks x (to_q, to_k, to_v, to_out.0) x (weight, bias) + one pooling weight per block
    assert len(names) == 2 * 4 * 2 + 2
    assert "transformer_blocks.1.attn.to_out.0.bias" in names
    assert "transformer_blocks.0.attn.processor.spatial_weight" in names
    assert not any("add_" in n or "norm" in n or "to_add_out" in n or "refiner" in n for n in names)
    adapter = adapter_for(model)
    assert adapter.family == "hunyuanvideo15" and adapter.video
    assert adapter.attention_geometry(model) == (2, 16, 2)
    assert [n for n, _ in adapter.consistency_modules(model)] == [
        "transformer_blocks.0.attn",
        "transformer_blocks.1.attn",
    ]
    assert "temporal_radius" in adapter.describe() and "generate --frames" in adapter.describe()


def test_weights_round_trip_and_other_settings_or_families_are_refused(tmp_path):
    model = tiny_hunyuanvideo15()
    handle = linearize(model, radius=2, temporal_radius=2, down_factor=2)
    path = save_weights(model, tmp_path / "hy15.safetensors")
    other = tiny_hunyuanvideo15(seed=5)
    linearize(other, radius=2, temporal_radius=2, down_factor=2)
    load_weights(other, path)
    ours, theirs = dict(handle.named_clear_parameters()), dict(get_handle(other).named_clear_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    every_frame = tiny_hunyuanvideo15(seed=5)
    linearize(every_frame, radius=2, down_factor=2)
    with pytest.raises(ValueError, match="made for temporal_radius=2"):
        load_weights(every_frame, path)

    path = save_weights(every_frame, tmp_path / "hy15-every-frame.safetensors")
    flux = tiny_flux_transformer()
    linearize(flux, radius=2, down_factor=2)
    with pytest.raises(ValueError, match="holds weights for a HunyuanVideo15Transformer3DModel"):
        load_weights(flux, path)
    from safetensors.torch import save_file

    release = tmp_path / "clear_local_2_down_2.safetensors"  # a reference-release name: FLUX.1 weights
    save_file({k: v.contiguous() for k, v in handle.clear_state_dict().items()}, str(release))
    with pytest.raises(ValueError, match="for flux models, not for this hunyuanvideo15 model"):
        load_weights(every_frame, release)


def test_strips_and_image_to_video_jobs_are_refused_with_the_supported_way(tmp_path):
    from cleardit.models.strips import parallelize
    from cleardit.pipelines.loading import load_pipeline

    with pytest.raises(NotSupportedError, match="does not run video models"):
        parallelize(tiny_hunyuanvideo15(), radius=2)
    folder = tmp_path / "hy15-i2v"
    folder.mkdir()
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "HunyuanVideo15ImageToVideoPipeline"})
    )
    assert adapter_for_pipeline_class("HunyuanVideo15ImageToVideoPipeline").family == "hunyuanvideo15"
    with pytest.raises(
        ValueError, match=r"text to video.*linearize\(pipe.transformer, radius=\.\.\., temporal"
    ):
        load_pipeline(folder, torch.device("cpu"), torch.float32)
    from cleardit.distill.trainer import load_transformer

    with pytest.raises(ValueError, match="HunyuanVideo15ImageToVideoPipeline"):
        load_transformer(folder, torch.float32)
    model = tiny_hunyuanvideo15()  # teacher data of another model: its text width differs
    sample = dict(
        prompt_embeds=torch.zeros(6, TEXT_DIM + 1), prompt_embeds_mask=torch.ones(6),
        prompt_embeds_2=torch.zeros(4, BYT5_DIM), prompt_embeds_mask_2=torch.ones(4),
        latents=torch.zeros(CHANNELS, 2, 2, 2),
    )  # fmt: skip
    with pytest.raises(ValueError, match="MLLM text embedding width is 13 in the data, 12"):
        adapter_for(model).check_conditions(model, sample)


def test_replaced_processors_are_refused():
    model = tiny_hunyuanvideo15()
    linearize(model, radius=2)
    model.transformer_blocks[1].attn.set_processor(HunyuanVideo15AttnProcessor2_0())
    with pytest.raises(RuntimeError, match="1 of the 2 attention processors"):
        run(model, hy_inputs((2, 3, 4), [2, 6], [4, 1]))
