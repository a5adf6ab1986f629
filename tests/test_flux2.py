"""FLUX.2: CLEAR on a tiny Flux2Transformer2DModel with a reference image, against a dense-mask oracle."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import Flux2Transformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2KVAttnProcessor,
    Flux2KVParallelSelfAttnProcessor,
    Flux2ParallelSelfAttnProcessor,
)

from cleardit import generate, linearize, load_weights, save_weights
from cleardit.models import adapter_for, get_handle
from cleardit.models.flux2 import ClearFlux2AttnProcessor, ClearFlux2ParallelSelfAttnProcessor
from cleardit.models.tiny import tiny_flux_transformer
from tests.helpers import distill_resumed_after_a_crash

TEXT_DIM = 24
CHANNELS = 8


def tiny_flux2_transformer(seed: int = 0) -> Flux2Transformer2DModel:
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=CHANNELS, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, timestep_guidance_channels=16, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but random values make every path count
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def image_ids(t: int, height: int, width: int) -> torch.Tensor:
    """(t, h, w, l) ids of one image, row-major, as FLUX.2 pipelines make them."""
    ids = torch.cartesian_prod(*(torch.arange(n) for n in (1, height, width, 1)))
    return ids + torch.tensor([t, 0, 0, 0])


def flux2_inputs(height, width, references=((3, 4),), text_len=4, batch=2, seed=0, refs_first=False):
    """Forward kwargs: target grid (t = 0) then reference images (t = 10, 20, ...), as Flux2Pipeline
    concatenates them (``refs_first``: the references prepended, as the KV-cache extraction does)."""
    g = torch.Generator().manual_seed(seed)
    refs = [image_ids(10 * (i + 1), h, w) for i, (h, w) in enumerate(references)]
    parts = [*refs, image_ids(0, height, width)] if refs_first else [image_ids(0, height, width), *refs]
    ids = torch.cat(parts)
    text_ids = torch.cartesian_prod(*(torch.arange(n) for n in (1, 1, 1, text_len)))  # (0, 0, 0, l)
    return dict(
        hidden_states=torch.randn(batch, ids.shape[0], CHANNELS, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, TEXT_DIM, generator=g),
        timestep=torch.rand(batch, generator=g),
        guidance=torch.full((batch,), 3.5),
        img_ids=ids[None].expand(batch, -1, -1),  # the pipelines pass batched ids
        txt_ids=text_ids[None].expand(batch, -1, -1),
        return_dict=False,
    )


# ----------------------------------------------------------------------------- the oracle
def rule_mask(queries: list, keys: list, radius: int, references_see_only_references=False) -> torch.Tensor:
    """Brute force: token kinds are "text", "ref" or the target's (h, w). Target queries see target keys
    in the disc; every other pair is allowed (text and references are global). While the KV cache is
    extracted, reference queries see only reference keys (diffusers' rule there)."""
    mask = torch.zeros(len(queries), len(keys), dtype=torch.bool)
    for i, a in enumerate(queries):
        for j, b in enumerate(keys):
            if references_see_only_references and a == "ref":
                mask[i, j] = b == "ref"
            elif isinstance(a, str) or isinstance(b, str):
                mask[i, j] = True
            else:
                mask[i, j] = (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 < radius**2
    return mask


class Oracle:
    """The token kinds of the forward in flight (set from its inputs by a pre-hook) and the radius."""

    def __init__(self, radius: int):
        self.radius, self.text, self.stream, self.mode = radius, 0, [], None
        self.masks = {}  # built once per token layout: every layer of a forward shares it

    def read_inputs(self, _module, _args, kwargs):
        ids = kwargs["img_ids"][0] if kwargs["img_ids"].ndim == 3 else kwargs["img_ids"]
        self.text = kwargs["encoder_hidden_states"].shape[1]
        self.stream = [(int(h), int(w)) if int(t) == 0 else "ref" for t, h, w, _ in ids.tolist()]
        self.mode = kwargs.get("kv_cache_mode")

    def attention(self, query, key, value, rope, kv_cache):
        """diffusers' FLUX.2 attention (RoPE, KV cache, SDPA) with the rule's explicit mask."""
        query = apply_rotary_emb(query, rope, sequence_dim=1)
        key = apply_rotary_emb(key, rope, sequence_dim=1)
        tokens = ["text"] * self.text + self.stream
        keys, only_refs = tokens, False
        if self.mode == "extract":
            refs = slice(self.text, self.text + self.stream.count("ref"))
            kv_cache.store(key[:, refs].clone(), value[:, refs].clone())
            only_refs = True
        elif self.mode == "cached":
            k_ref, v_ref = kv_cache.get()
            key = torch.cat([key[:, : self.text], k_ref, key[:, self.text :]], dim=1)
            value = torch.cat([value[:, : self.text], v_ref, value[:, self.text :]], dim=1)
            keys = ["text"] * self.text + ["ref"] * k_ref.shape[1] + self.stream
        signature = (tuple(tokens), tuple(keys), only_refs)
        if signature not in self.masks:
            self.masks[signature] = rule_mask(tokens, keys, self.radius, only_refs)
        mask = self.masks[signature]
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
        )
        return out.transpose(1, 2).flatten(2, 3)


class OracleDouble:
    def __init__(self, oracle: Oracle):
        self.oracle = oracle

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, kv_cache=None, kv_cache_mode=None, num_ref_tokens=0):  # fmt: skip
        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        q, k, v = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        text = encoder_hidden_states
        eq, ek, ev = (heads(f(text)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        q = torch.cat([attn.norm_added_q(eq), attn.norm_q(q)], dim=1)
        k = torch.cat([attn.norm_added_k(ek), attn.norm_k(k)], dim=1)
        v = torch.cat([ev, v], dim=1)
        out = self.oracle.attention(q, k, v, image_rotary_emb, kv_cache)
        t = encoder_hidden_states.shape[1]
        return attn.to_out[0](out[:, t:]), attn.to_add_out(out[:, :t])


class OracleSingle:
    def __init__(self, oracle: Oracle):
        self.oracle = oracle

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, kv_cache=None,
                 kv_cache_mode=None, num_txt_tokens=0, num_ref_tokens=0):  # fmt: skip
        projected = attn.to_qkv_mlp_proj(hidden_states)
        inner = attn.inner_dim
        q, k, v = (projected[..., i * inner : (i + 1) * inner] for i in range(3))
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))
        out = self.oracle.attention(attn.norm_q(q), attn.norm_k(k), v, image_rotary_emb, kv_cache)
        gate, linear = projected[..., 3 * inner :].chunk(2, dim=-1)
        return attn.to_out(torch.cat([out, F.silu(gate) * linear], dim=-1))


def oracle_model(model, radius: int):
    """A deep copy of ``model`` (restored if linearized) with the dense-mask oracle's processors."""
    oracle = copy.deepcopy(model)
    if get_handle(oracle) is not None:
        get_handle(oracle).restore()
    state = Oracle(radius)
    for block in oracle.transformer_blocks:
        block.attn.set_processor(OracleDouble(state))
    for block in oracle.single_transformer_blocks:
        block.attn.set_processor(OracleSingle(state))
    oracle.register_forward_pre_hook(state.read_inputs, with_kwargs=True)
    return oracle


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "height,width,radius,references,batch,backend",
    [
        (5, 7, 2, ((3, 4),), 2, "reference"),  # non-square, odd, one reference, batch 2
        (7, 5, 1, ((2, 3),), 1, "reference"),  # radius 1: the target sees only itself and the globals
        (9, 19, 3, ((3, 4),), 2, "tiled"),  # wider than the 8x16 tile: tile-major order
        (11, 6, 4, ((2, 2), (3, 1)), 1, "tiled"),  # two references (t = 10, 20)
        (6, 9, 3, ((3, 4),), 2, "flex"),
        (6, 5, 2, ((2, 3),), 1, "triton"),
        (4, 6, 9, ((3, 4),), 2, "reference"),  # radius beyond the grid
    ],
)
def test_linearized_flux2_matches_the_dense_mask_oracle(height, width, radius, references, batch, backend):
    model = tiny_flux2_transformer()
    inputs = flux2_inputs(height, width, references, batch=batch, seed=radius)
    full = run(model, inputs)
    expected = run(oracle_model(model, radius), inputs)
    linearize(model, radius=radius, backend=backend)
    got = run(model, inputs)
    assert got.shape == (batch, inputs["hidden_states"].shape[1], CHANNELS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the disc really cuts, except beyond the grid, where CLEAR is the original model
    beyond = radius**2 > (height - 1) ** 2 + (width - 1) ** 2
    assert torch.allclose(got, full, atol=1e-5) == beyond


def test_radius_beyond_the_grid_equals_flux2_and_restore_is_exact():
    model = tiny_flux2_transformer()
    inputs = flux2_inputs(9, 18, ((3, 4),), batch=2)
    original = run(model, inputs)
    handle = linearize(model, radius=30, backend="tiled")
    torch.testing.assert_close(run(model, inputs), original, atol=1e-5, rtol=0)
    handle.restore()
    assert torch.equal(run(model, inputs), original)
    assert all(type(b.attn.processor) is Flux2AttnProcessor for b in model.transformer_blocks)
    singles = model.single_transformer_blocks
    assert all(type(b.attn.processor) is Flux2ParallelSelfAttnProcessor for b in singles)
    assert not hasattr(model, "_cleardit_grid") and not model._forward_pre_hooks


def test_reference_tokens_are_global():
    """Changing a reference token changes every target token's output (it is a global key), while
    changing a far target token does not reach across the disc."""
    model = tiny_flux2_transformer()
    inputs = flux2_inputs(6, 9, ((2, 3),), batch=1)
    linearize(model, radius=2, backend="reference")
    base = run(model, inputs)
    poked = dict(inputs, hidden_states=inputs["hidden_states"].clone())
    poked["hidden_states"][0, -1] += 5.0  # the last reference token
    diff = (run(model, poked) - base)[0, : 6 * 9].abs().amax(-1)
    assert bool((diff > 1e-4).all())


def flux2_kv_model(seed: int = 0) -> Flux2Transformer2DModel:
    """A tiny FLUX.2 with the KV-cache processors Flux2KleinKVPipeline installs."""
    model = tiny_flux2_transformer(seed)
    for block in model.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return model


def kv_steps(model, height, width, references):
    """Step 0 with the references prepended (extract), then step 1 with the cache (cached)."""
    extract = flux2_inputs(height, width, references, refs_first=True, seed=4)
    refs = extract["hidden_states"].shape[1] - height * width
    first, cache = model(**extract, kv_cache_mode="extract", num_ref_tokens=refs, ref_fixed_timestep=0.0)
    target = dict(
        extract, hidden_states=extract["hidden_states"][:, refs:] * 0.5, img_ids=extract["img_ids"][:, refs:]
    )
    second = model(**target, kv_cache=cache, kv_cache_mode="cached")[0]
    return first, second


@pytest.mark.parametrize("radius,backend", [(2, "reference"), (3, "tiled"), (40, "tiled")])
@torch.no_grad()
def test_kv_cache_extract_then_cached_matches_the_oracle(radius, backend):
    model = flux2_kv_model()
    height, width, references = 9, 17, ((3, 4),)
    expected = kv_steps(oracle_model(model, radius), height, width, references)
    if radius == 40:  # beyond the grid: the oracle is diffusers' own KV-cache model
        original = kv_steps(model, height, width, references)
        for a, b in zip(original, expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    handle = linearize(model, radius=radius, backend=backend)
    got = kv_steps(model, height, width, references)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == (2, height * width, CHANNELS)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    handle.restore()
    assert type(model.transformer_blocks[0].attn.processor) is Flux2KVAttnProcessor


def test_bf16_error_is_the_models_own():
    inputs = flux2_inputs(6, 7, ((3, 4),), batch=2)
    low_inputs = {
        k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in inputs.items()
    }

    def bf16_error(model, reference):  # how far the model's bf16 output is from ``reference`` (fp32)
        low = run(model.to(torch.bfloat16), low_inputs).float()
        model.to(torch.float32)
        return (low - reference).abs().max().item()

    model = tiny_flux2_transformer()
    diffusers_error = bf16_error(model, run(model, inputs))
    expected = run(oracle_model(model, 2), inputs)
    linearize(model, radius=2, backend="reference")
    clear_error = bf16_error(model, expected)
    assert 0 < clear_error < 2 * diffusers_error  # CLEAR adds no bf16 error of its own


def test_inputs_that_are_not_one_grid_are_refused():
    model = tiny_flux2_transformer()
    linearize(model, radius=2)
    inputs = flux2_inputs(4, 5, ((2, 2),), batch=1)
    shuffled = inputs["img_ids"][0].clone()
    shuffled[:20] = shuffled[torch.randperm(20, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ValueError, match="not one row-major grid"):
        run(model, dict(inputs, img_ids=shuffled))
    no_target = inputs["img_ids"][0].clone()
    no_target[:, 0] += 1
    with pytest.raises(ValueError, match="no target-image token"):
        run(model, dict(inputs, img_ids=no_target))
    with pytest.raises(ValueError, match="kv_cache_mode must be one of"):
        run(model, dict(inputs, kv_cache_mode="prefill"))
    # diffusers' plain processors ignore the KV cache: a KV mode there is refused, not run differently
    with pytest.raises(ValueError, match="plain FLUX.2 processors.*Flux2KleinKVPipeline"):
        run(model, dict(inputs, kv_cache_mode="extract", num_ref_tokens=4))
    kv_model = flux2_kv_model()
    linearize(kv_model, radius=2)
    with pytest.raises(ValueError, match="first num_ref_tokens=4"):  # the references are not prepended
        run(kv_model, dict(inputs, kv_cache_mode="extract", num_ref_tokens=4))


def test_trainable_parameters_weights_round_trip_and_family_checks(tmp_path):
    model = tiny_flux2_transformer()
    handle = linearize(model, radius=2, down_factor=2)
    names = [n for n, _ in handle.named_clear_parameters()]
    # 1 double block: to_q, to_k, to_v, to_out.0 (no biases in FLUX.2); 2 single blocks: the fused
    # to_qkv_mlp_proj; one pooling weight per attention layer
    assert sorted(names) == sorted(
        [f"transformer_blocks.0.attn.{p}.weight" for p in ("to_q", "to_k", "to_v", "to_out.0")]
        + [f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj.weight" for i in (0, 1)]
        + ["transformer_blocks.0.attn.processor.spatial_weight"]
        + [f"single_transformer_blocks.{i}.attn.processor.spatial_weight" for i in (0, 1)]
    )
    # every CLEAR parameter is used: the pooled branch and the fused projections get gradients
    model(**flux2_inputs(5, 6, ((2, 2),), batch=1))[0].square().mean().backward()
    for name, p in handle.named_clear_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        for _, p in handle.named_clear_parameters():
            p.add_(0.01)
    path = save_weights(model, tmp_path / "flux2.safetensors")
    other = tiny_flux2_transformer(seed=5)
    linearize(other, radius=2, down_factor=2)
    load_weights(other, path)
    theirs = dict(get_handle(other).named_clear_parameters())
    for name, p in handle.named_clear_parameters():
        assert torch.equal(p, theirs[name]), name
    # a FLUX.1 checkpoint is refused by name, and FLUX.2's by a FLUX.1 model
    flux = tiny_flux_transformer()
    linearize(flux, radius=2, down_factor=2)
    flux_path = save_weights(flux, tmp_path / "flux.safetensors")
    with pytest.raises(ValueError, match="FluxTransformer2DModel, not a Flux2Transformer2DModel"):
        load_weights(other, flux_path)
    with pytest.raises(ValueError, match="Flux2Transformer2DModel, not a FluxTransformer2DModel"):
        load_weights(flux, path)


def test_adapter_registry_and_modules():
    model = tiny_flux2_transformer()
    adapter = adapter_for(model)
    assert adapter.family == "flux2"
    assert adapter.attention_geometry(model) == (2, 16, 3)
    assert [n for n, _ in adapter.consistency_modules(model)] == [
        "single_transformer_blocks.0.attn",
        "single_transformer_blocks.1.attn",
    ]
    assert "Flux2Transformer2DModel" in adapter.describe() and "--devices N" in adapter.describe()
    handle = linearize(model, radius=3)
    assert isinstance(model.transformer_blocks[0].attn.processor, ClearFlux2AttnProcessor)
    assert isinstance(model.single_transformer_blocks[1].attn.processor, ClearFlux2ParallelSelfAttnProcessor)
    handle.restore()
    with adapter.rope_theta_scaled(model, 10):  # NTK RoPE for --highres
        assert model.pos_embed.theta == 20_000
    assert model.pos_embed.theta == 2000
    assert len(adapter.query_norms(model)) == 2 + 2  # the double block's image and text queries, 2 singles


def test_fused_qkv_projections_follow_loaded_weights(tmp_path):
    """fuse_qkv_projections() gives the double blocks a to_qkv the processors read; weights loaded into
    to_q/k/v reach it (beyond the grid: the same numbers as the unfused model with those weights)."""
    trained = tiny_flux2_transformer()
    handle = linearize(trained, radius=50)
    with torch.no_grad():  # "training": new CLEAR weights
        for _, p in handle.named_clear_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    path = save_weights(trained, tmp_path / "trained.safetensors")
    inputs = flux2_inputs(5, 6, ((2, 2),), batch=1)
    expected = run(trained, inputs)
    handle.restore()
    model = tiny_flux2_transformer()
    model.fuse_qkv_projections()
    linearize(model, radius=50)
    load_weights(model, path)
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the pipeline side
TEXT_LAYERS = 27  # Flux2KleinPipeline stacks the text encoder's hidden states 9, 18 and 27


def tiny_klein_pipeline(seed: int = 0):
    """A Flux2KleinPipeline built offline: the mini model's word-level tokenizer (with a chat template)
    and a tiny Qwen3 text encoder, a tiny FLUX.2 VAE with batch-norm statistics, a tiny transformer."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from cleardit.mini.pipeline import SCHEDULER_CONFIG
    from cleardit.mini.vocab import PAD_ID, build_t5_tokenizer, vocab_size

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=vocab_size(), hidden_size=16, intermediate_size=32, num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
            pad_token_id=PAD_ID,
        )
    )  # fmt: skip
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        mid_block_add_attention=False, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 2)
    vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape, generator=g))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=g))
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=16, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )  # fmt: skip
    with torch.no_grad():
        for p in transformer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    for module in (vae, text_encoder, transformer):
        module.eval().requires_grad_(False)
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, transformer=transformer,
    )  # fmt: skip


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory):
    from cleardit.mini.pipeline import mini_model_info

    folder = tmp_path_factory.mktemp("klein") / "tiny-klein"
    tiny_klein_pipeline().save_pretrained(str(folder), safe_serialization=True)
    mini_model_info("tiny", name="tiny-klein", default_guidance=None, default_true_cfg=2.0).write(folder)
    return folder


def test_generate_compare_and_highres_with_a_tiny_klein_pipeline(klein_folder, tmp_path):
    from PIL import Image

    result = generate(
        ["a red circle", "a blue square"], model=klein_folder, height=64, width=96, steps=2, radius=2,
        compare=True, output=tmp_path, quiet=True,
    )  # fmt: skip
    assert len(result.images) == 2 and result.images[0].size == (96, 64)
    assert result.compare is not None and result.compare.flops_clear < result.compare.flops_full
    assert Image.open(result.paths[0]).text["true_cfg"] == "2.0"
    for upscale in ("latent", "image"):
        highres = generate(
            "a red circle", model=klein_folder, height=96, width=128, steps=2, radius=2, highres=True,
            upscale=upscale, batch=2, quiet=True,
        )  # fmt: skip
        assert [im.size for im in highres.images] == [(128, 96)] * 2
        assert highres.base_images[0].size == (80, 48)  # stage 1 near the 64x64 base area


def test_clear_beyond_the_grid_equals_full_attention_through_the_klein_pipeline(klein_folder):
    common = dict(model=klein_folder, height=64, width=80, steps=2, quiet=True)
    full = generate("a red circle", radius=0, **common).images[0]
    clear = generate("a red circle", radius=20, **common).images[0]
    small = generate("a red circle", radius=1, **common).images[0]
    as_array = np.asarray  # noqa: E731
    assert np.abs(as_array(full, dtype=int) - as_array(clear, dtype=int)).max() <= 1
    assert np.abs(as_array(full, dtype=int) - as_array(small, dtype=int)).max() > 1


@pytest.mark.parametrize("which", ["klein", "dev"])
def test_generate_follows_the_pipelines_own_schedule(which, request):
    """With full attention, ``generate`` makes what the FLUX.2 pipeline itself makes from the same seed:
    its noise schedule is the pipelines' own (their empirical mu), not FLUX.1's shift rule."""
    import diffusers

    from cleardit.pipelines import read_model_info

    folder = request.getfixturevalue(f"{which}_folder")
    info = read_model_info(folder)
    ours = generate(
        "a red circle", model=folder, height=64, width=80, steps=4, radius=0, vae_tiling=False, quiet=True
    )
    pipe = getattr(diffusers, "Flux2KleinPipeline" if which == "klein" else "Flux2Pipeline").from_pretrained(
        str(folder)
    )
    scale = info.default_true_cfg if which == "klein" else info.default_guidance
    theirs = pipe(
        prompt="a red circle", height=64, width=80, num_inference_steps=4, guidance_scale=scale,
        max_sequence_length=info.max_sequence_length, generator=[torch.Generator().manual_seed(0)],
    ).images[0]  # fmt: skip
    assert np.abs(np.asarray(ours.images[0], dtype=int) - np.asarray(theirs, dtype=int)).max() <= 1


def test_the_adapters_latents_are_the_transformers_space(klein_folder):
    """What the pipeline's last step fed the transformer, moved by the last Euler step, is the adapter's
    ``pack_latents(unpack_latents(pipeline output))``; ``training_inputs`` rebuilds the pipeline's call."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(str(klein_folder))
    adapter = adapter_for(pipe)
    calls = []
    pipe.transformer.register_forward_hook(
        lambda _m, _a, kwargs, out: calls.append((kwargs, out[0])), with_kwargs=True
    )
    raw = pipe(
        prompt="a red circle", height=64, width=80, num_inference_steps=2, max_sequence_length=12,
        guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    last, velocity = calls[-1]
    last_sigma = float(pipe.scheduler.sigmas[-2])  # the scheduler shifted the sigmas; then 0
    expected = last["hidden_states"] + (0.0 - last_sigma) * velocity
    latents = adapter.unpack_latents(pipe, raw, (64, 80))
    assert latents.shape == (1, 4, 8, 10)
    torch.testing.assert_close(adapter.pack_latents(latents), expected, atol=1e-5, rtol=1e-5)
    # training_inputs makes the call the pipeline makes: same input, same velocity
    patches = last["hidden_states"].transpose(1, 2).reshape(1, 16, 4, 5)
    noisy = Flux2KleinPipeline._unpatchify_latents(patches)
    inputs = adapter.training_inputs(
        pipe.transformer, noisy, last["timestep"], {"prompt_embeds": last["encoder_hidden_states"]}, 1.0
    )
    assert torch.equal(inputs["hidden_states"], last["hidden_states"])
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**inputs)[0], velocity, atol=1e-6, rtol=0)
    text = adapter.encode_prompt(
        pipe, ["a red circle"], images_per_prompt=2, text_len=12, true_cfg=2.0, negative_prompt=""
    )
    assert text["prompt_embeds"].shape == (2, 12, 48) and text["negative_prompt_embeds"].shape == (2, 12, 48)
    noise = adapter.initial_noise(pipe, 2, 64, 80, torch.float32, "cpu", torch.Generator().manual_seed(0))
    assert noise.shape == (2, 4 * 5, 16)
    with pytest.raises(ValueError, match="empty negative prompt"):
        adapter.call_options(None, 2.0, "blurry", 12)
    with pytest.raises(ValueError, match="--true-cfg"):
        generate("a red circle", model=klein_folder, height=64, width=64, steps=1, guidance=3.0, quiet=True)


def test_a_flux2_folder_of_another_pipeline_is_refused_clearly(klein_folder, tmp_path):
    import json
    import shutil

    folder = tmp_path / "other"
    shutil.copytree(klein_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, _class_name="Flux2FillPipeline")))
    with pytest.raises(ValueError, match=r"Flux2FillPipeline.*FLUX.2 \[dev\] \(Flux2Pipeline\) and klein"):
        generate("a red circle", model=folder, height=64, width=64, steps=1, quiet=True)


# ----------------------------------------------------------------------------- FLUX.2 [dev]
DEV_TEXT_LAYERS = 30  # Flux2Pipeline stacks the text encoder's hidden states 10, 20 and 30


def tiny_dev_pipeline(seed: int = 0):
    """A FLUX.2 [dev] ``Flux2Pipeline`` built offline: a tiny Mistral 3 text encoder (with its vision
    tower), the mini model's word-level tokenizer with a chat template that renders the user's text
    (the pipeline only calls ``apply_chat_template``; a real folder holds Pixtral's processor), the
    tiny FLUX.2 VAE and a tiny transformer with distilled guidance (``guidance_embeds``)."""
    from diffusers import Flux2Pipeline
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    from cleardit.mini.vocab import PAD_ID, vocab_size

    klein = tiny_klein_pipeline(seed)
    klein.tokenizer.chat_template = (
        "{% for message in messages %}{% if message['role'] == 'user' %}{% for part in message['content'] %}"
        "{{ part['text'] }}{% endfor %}{% endif %}{% endfor %}"
    )
    torch.manual_seed(seed)
    text_encoder = Mistral3ForConditionalGeneration(
        Mistral3Config(
            vision_config=PixtralVisionConfig(
                hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                image_size=32, patch_size=4,
            ),
            text_config=MistralConfig(
                vocab_size=vocab_size(), hidden_size=16, intermediate_size=32,
                num_hidden_layers=DEV_TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=64, pad_token_id=PAD_ID,
            ),
            image_token_index=vocab_size() - 1,
        )
    ).eval()  # fmt: skip
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=16, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for p in transformer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    for module in (text_encoder, transformer):
        module.eval().requires_grad_(False)
    return Flux2Pipeline(
        scheduler=klein.scheduler, vae=klein.vae, text_encoder=text_encoder, tokenizer=klein.tokenizer,
        transformer=transformer,
    )  # fmt: skip


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
    from cleardit.mini.pipeline import mini_model_info

    folder = tmp_path_factory.mktemp("dev") / "tiny-flux2-dev"
    tiny_dev_pipeline().save_pretrained(str(folder), safe_serialization=True)
    mini_model_info("tiny", name="tiny-flux2-dev", default_guidance=3.0).write(folder)
    return folder


def test_dev_and_klein_transformers_get_their_own_adapters(dev_folder, klein_folder):
    from diffusers import Flux2Pipeline

    from cleardit.models.flux2 import Flux2Adapter, Flux2DevAdapter

    dev = Flux2Pipeline.from_pretrained(str(dev_folder))
    assert type(adapter_for(dev)) is Flux2DevAdapter and adapter_for(dev).family == "flux2"
    assert type(adapter_for(tiny_klein_pipeline().transformer)) is Flux2Adapter
    assert "Flux2Pipeline" in Flux2DevAdapter().describe()
    linearize(dev.transformer, radius=2).restore()  # CLEAR itself is the same for both


def test_generate_compare_and_highres_with_a_tiny_dev_pipeline(dev_folder, tmp_path):
    from PIL import Image

    result = generate(
        ["a red circle", "a blue square"], model=dev_folder, height=64, width=96, steps=2, radius=2,
        compare=True, output=tmp_path, quiet=True,
    )  # fmt: skip
    assert len(result.images) == 2 and result.images[0].size == (96, 64)
    assert result.compare is not None and result.compare.flops_clear < result.compare.flops_full
    assert Image.open(result.paths[0]).text["guidance"] == "3.0"  # the folder's distilled guidance
    for upscale in ("latent", "image"):
        highres = generate(
            "a red circle", model=dev_folder, height=96, width=128, steps=2, radius=2, highres=True,
            upscale=upscale, quiet=True,
        )  # fmt: skip
        assert [im.size for im in highres.images] == [(128, 96)]
        assert highres.base_images[0].size == (80, 48)  # stage 1 near the 64x64 base area
    with pytest.raises(ValueError, match="no classifier-free guidance.*--guidance"):
        generate("a red circle", model=dev_folder, height=64, width=64, steps=1, true_cfg=2.0, quiet=True)


def test_the_dev_adapters_latents_are_the_transformers_space(dev_folder):
    """Flux2Pipeline's latent output is packed tokens: the adapter unpacks them to the transformer's
    space, decodes them as the pipeline does, and ``training_inputs`` rebuilds its transformer call
    (distilled guidance included)."""
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline.from_pretrained(str(dev_folder))
    adapter = adapter_for(pipe)
    calls = []
    pipe.transformer.register_forward_hook(
        lambda _m, _a, kwargs, out: calls.append((kwargs, out[0])), with_kwargs=True
    )
    options = dict(
        prompt="a red circle", height=64, width=80, num_inference_steps=2,
        **adapter.call_options(2.5, 1.0, "", 12),
    )  # fmt: skip
    packed = pipe(**options, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    images = pipe(**options, output_type="np", generator=torch.Generator().manual_seed(0)).images
    last, velocity = calls[-1]
    assert float(last["guidance"][0]) == 2.5
    last_sigma = float(pipe.scheduler.sigmas[-2])
    expected = last["hidden_states"] + (0.0 - last_sigma) * velocity
    latents = adapter.unpack_latents(pipe, packed, (64, 80))
    assert latents.shape == (1, 4, 8, 10)
    torch.testing.assert_close(adapter.pack_latents(latents), expected, atol=1e-5, rtol=1e-5)
    decoded = adapter.decode_latents(pipe, packed, (64, 80), output_type="np")
    np.testing.assert_allclose(decoded, images, atol=1e-5)
    # training_inputs makes the pipeline's call of that step: every input, the same velocity
    noisy = pipe._unpatchify_latents(last["hidden_states"].transpose(1, 2).reshape(1, 16, 4, 5))
    inputs = adapter.training_inputs(
        pipe.transformer, noisy, last["timestep"], {"prompt_embeds": last["encoder_hidden_states"]}, 2.5
    )
    for name in ("hidden_states", "timestep", "encoder_hidden_states", "txt_ids", "img_ids", "guidance"):
        assert torch.equal(inputs[name].to(last[name].dtype), last[name]), name
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**inputs)[0], velocity, atol=1e-6, rtol=0)
    text = adapter.encode_prompt(
        pipe, ["a red circle"], images_per_prompt=2, text_len=12, true_cfg=1.0, negative_prompt=""
    )
    assert set(text) == {"prompt_embeds"} and text["prompt_embeds"].shape == (2, 12, 48)


@pytest.mark.parametrize("which", ["klein", "dev"])
def test_distill_with_resume_and_eval_on_tiny_flux2_pipelines(which, request, tmp_path, monkeypatch):
    import diffusers

    from cleardit.distill.teacher_data import TeacherDataset, make_teacher_data
    from cleardit.distill.trainer import DistillConfig
    from cleardit.eval import evaluate_model

    folder = request.getfixturevalue(f"{which}_folder")
    data = tmp_path / "data"
    make_teacher_data(folder, ["a red circle", "a blue square"], data, resolution=64, steps=2, quiet=True)
    dataset = TeacherDataset(data)
    assert set(dataset[0]) >= {"latents", "prompt_embeds"} and dataset[0]["latents"].shape == (4, 8, 8)
    cfg = DistillConfig(radius=2, steps=2, batch_size=2, lr=1e-3, attention_layers="0")

    def load():
        pipeline = "Flux2KleinPipeline" if which == "klein" else "Flux2Pipeline"
        return getattr(diffusers, pipeline).from_pretrained(str(folder))

    _, resumed = distill_resumed_after_a_crash(cfg, dataset, tmp_path, load, monkeypatch)
    assert any("to_qkv_mlp_proj" in k for k in resumed)
    report = evaluate_model(
        ["a red circle", "a blue square"], model=folder, radii=[2], output=tmp_path / "eval",
        steps=2, metrics=["psnr"], quiet=True,
    )  # fmt: skip
    assert report.teacher.generated == 2 and report.clear[0].generated == 2
    assert report.results["r2"].to_dict()


# ----------------------------------------------------------------------------- patch parallelism
def _flux2_strips_worker(rank: int, world: int) -> list[float]:
    """Each case: the parallel model's full output vs the single-process linearized model's."""
    from cleardit.models import NotSupportedError
    from cleardit.parallel import parallelize

    def compare(model, radius, down_factor, outputs):  # outputs(model): the tensors to compare
        handle = linearize(model, radius=radius, down_factor=down_factor, backend="reference", tile=None)
        expected = outputs(model)
        handle.restore()
        parallelize(model, radius=radius, down_factor=down_factor, backend="reference", timeout_s=30)
        got = outputs(model)
        get_handle(model).restore()
        return max((a - b).abs().max().item() for a, b in zip(got, expected, strict=True))

    errors = []
    for i, (height, width, radius, down_factor, references) in enumerate(
        [
            (7, 5, 2, None, ((3, 4),)),  # odd sizes
            (6, 5, 4, None, ((2, 3), (3, 1))),  # 2-row strips, thinner than the 3-row band
            (9, 6, 3, 2, ((3, 4),)),  # pooled branch
            (5, 4, 30, None, ()),  # radius beyond the grid, text the only global tokens
        ]
    ):
        model, inputs = tiny_flux2_transformer(seed=i), flux2_inputs(height, width, references, seed=10 + i)
        errors.append(compare(model, radius, down_factor, lambda m, inputs=inputs: [run(m, inputs)]))
    # the KV cache: the references, extracted then cached, are global on every rank
    errors.append(compare(flux2_kv_model(), 2, None, lambda m: kv_steps(m, 7, 6, ((3, 4),))))
    try:
        parallelize(tiny_flux2_transformer(), radius=2, strip_input=True)
    except NotSupportedError as exc:
        assert "strip_input=False" in str(exc)
    else:
        raise AssertionError("strip_input=True was not refused")
    return errors


def test_patch_parallel_flux2_equals_one_process():
    """Every rank keeps [references | its target rows] of the image stream and img_ids, exchanges the
    band's keys and values in every double and single block, and gathers the target rows into the
    caller's order (3 ranks: a middle strip with two neighbours)."""
    from cleardit.parallel import spawn

    for rank_errors in spawn(
        _flux2_strips_worker, 3, timeout_s=60, deadline_s=120, start_method="forkserver"
    ):
        assert max(rank_errors) <= 1e-5, rank_errors


@pytest.mark.slow  # the job path of --devices with full latents runs by default in tests/test_sd3.py
@pytest.mark.parametrize("which", ["klein", "dev"])
def test_generate_on_two_devices_equals_one(which, request):
    """Every rank runs the FLUX.2 pipeline on the full latents; the transformer gathers its output rows
    at every step."""
    from cleardit.parallel import generate_parallel

    common = dict(
        model=request.getfixturevalue(f"{which}_folder"),
        height=64,
        width=80,
        steps=2,
        radius=2,
        quiet=True,
        seed=3,
    )
    one = generate("a red circle", **common)
    two = generate_parallel("a red circle", devices=2, **common)
    diff = np.abs(np.asarray(one.images[0], dtype=int) - np.asarray(two.images[0], dtype=int)).max()
    assert diff <= 1 and two.devices == 2 and two.comm_bytes["halo"] > 0
