"""HunyuanVideo 1.5 adapter: diffusers' ``HunyuanVideo15Transformer3DModel`` (the transformer only).

HunyuanVideo 1.5 has double-stream blocks only. Each block's joint attention runs over
``[video | conditions]``: the video tokens first, in raster order over the (T, H, W) latent grid
divided by the patch size (frames, then rows, then columns), then one block of condition tokens
that the forward builds per sample as ``[kept image | kept ByT5 | kept MLLM text | padded image |
padded ByT5 | padded MLLM text]`` (the SigLIP image-condition tokens are all padding in
text-to-video, where ``image_embeds`` is zero). The blocks get that block's mask ``attention_mask``
[B, conditions] and diffusers' processor attends with the outer product of [video (kept) | mask]:
padded keys are dropped for every query and padded queries see nothing (scaled dot-product
attention then gives zeros).

The rule here: video query (t, y, x) sees video key (t', y', x') iff
dt²·r² + (dy² + dx²)·rt² < r²·rt² (``temporal_radius`` None: every frame); every condition token
(image, ByT5, MLLM text) is global. The padding mask is honoured as diffusers does: samples that
keep the same condition tokens run as one smaller layout (``key_groups``), padded queries output
zeros. The grid comes from ``hidden_states`` (B, C, T, H, W) and the patch sizes, read by a forward
pre-hook. RoPE is built inside the forward from that shape in raster order, so the tile-major order
is applied once per forward by hooks on ``rope`` (its cos/sin rows) and ``x_embedder`` (the video
tokens), and undone on ``proj_out`` before the transformer unpatchifies; every op between them but
attention is token-wise, and the original processors (a distillation teacher pass) compute the
same numbers in that order.

Pipelines: the jobs run ``HunyuanVideo15Pipeline`` (text to video; image-to-video folders are
refused). It keeps latents unpacked [B, C, F, h, w] and calls the transformer with [latents | zero
condition latents | zero mask] (2C + 1 channels), ``image_embeds`` of zeros, both encoders'
embeddings and masks and ``timestep`` = the scheduler's (sigma x 1000). Classifier-free guidance is
its ``guider`` component's scale, not a call argument: ``run_pipeline`` sets it for one call and puts
it back. Latents are stored times the VAE's ``scaling_factor``. Not supported yet: patch-parallel
strips (images only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from ..attention import TokenLayout
from .adapter import ModelAdapter, check_teacher_data_fits
from .errors import NotSupportedError
from .handle import (
    ClearHandle,
    ForwardGrid,
    OrderedGrid,
    add_hooks,
    bind_forward_args,
    forget_token_order,
    to_raster_order,
    to_tile_order,
)
from .processor import ClearProcessor
from .qwenimage import key_groups

# The video stream's attention projections of each block (as the reference release trains the image
# stream of FLUX's double-stream blocks), plus the pooling weights of the down-sampled variant.
TRAINABLE_PATTERN = re.compile(
    r"^transformer_blocks\.\d+\.attn\.(?:(?:to_q|to_k|to_v|to_out\.0)\.(?:weight|bias)|processor\.spatial_weight)$"
)
# what the forward needs beyond the latents (diffusers' own forward fails obscurely without them)
CONDITION_INPUTS = (
    "encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2", "encoder_attention_mask_2",
    "image_embeds",
)  # fmt: skip
I2V_REFUSED = (
    "cleardit's generate, distill and eval model jobs run HunyuanVideo15Pipeline (text to video); "
    "image-to-video pipelines take an image they do not give. Use a text-to-video folder, or linearize "
    "the transformer directly: cleardit.linearize(pipe.transformer, radius=..., temporal_radius=...)"
)
# HunyuanVideo15Pipeline's fixed sizes: SigLIP image tokens (vision_num_semantic_tokens, zeros in
# text-to-video) and ByT5 tokens (tokenizer_2_max_length); its scheduler's timestep = sigma x 1000
IMAGE_TOKENS, BYT5_TOKENS, TRAIN_TIMESTEPS = 729, 256, 1000

# (sample rows, end of the kept keys or their index in [video | conditions], kept condition tokens)
KeptGroup = tuple[torch.Tensor | slice, int | torch.Tensor, int]


def latent_grid(hidden_states, patch_t: int, patch: int) -> tuple[int, int, int]:
    """(T, H, W) token grid of latents (B, C, T, H, W) cut into (patch_t, patch, patch) patches."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 5:
        shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else hidden_states
        raise ValueError(
            "HunyuanVideo15Transformer3DModel takes hidden_states as video latents [batch, channels, "
            f"frames, height, width], got {shape!r}"
        )
    frames, height, width = hidden_states.shape[2:]
    if frames % patch_t or height % patch or width % patch:
        raise ValueError(
            f"latents of {frames}x{height}x{width} (frames x height x width) are not a whole number of "
            f"{patch_t}x{patch}x{patch} patches, so they do not form one token grid (diffusers would "
            f"silently crop them); crop or pad the latents to multiples of ({patch_t}, {patch}, {patch})"
        )
    return frames // patch_t, height // patch, width // patch


def kept_groups(mask: torch.Tensor, video_len: int) -> list[KeptGroup] | None:
    """The condition-token mask [B, M] (as the blocks get it) as groups of samples keeping the same
    tokens; None when nothing is padded. diffusers puts each sample's kept tokens first, so the kept
    keys are usually the prefix [video | first n conditions] (a slice end, no gather)."""
    groups = key_groups(mask.bool())
    if groups is None:
        return None
    result = []
    for rows, kept, _ in groups:
        n = kept.numel()
        prefix = n == 0 or int(kept[-1]) == n - 1  # kept positions are sorted
        keys = (
            video_len + n
            if prefix
            else torch.cat([torch.arange(video_len, device=kept.device), video_len + kept])
        )
        result.append((slice(None) if len(groups) == 1 else rows, keys, n))
    return result


class ClearHunyuanVideo15AttnProcessor(ClearProcessor):
    """Replaces ``HunyuanVideo15AttnProcessor2_0``: the same projections, q/k norms and video RoPE;
    CLEAR over ``[video | conditions]`` instead of full attention, with the condition mask."""

    _attention_backend = None  # what diffusers' set_attention_backend writes; CLEAR picks its own
    _parallel_config = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("HunyuanVideo 1.5 attention needs encoder_hidden_states (the condition tokens)")
        layout = self.forward_state(image_rotary_emb).layout
        video_len, cond_len = hidden_states.shape[1], encoder_hidden_states.shape[1]
        if video_len != layout.image_len or cond_len != layout.text_len:
            raise ValueError(
                f"attention got {video_len} video + {cond_len} condition tokens but the forward's inputs "
                f"describe {layout.image_len} ({layout.describe_grid()}) + {layout.text_len}"
            )
        query, key, value = (
            f(hidden_states).unflatten(2, (attn.heads, -1)) for f in (attn.to_q, attn.to_k, attn.to_v)
        )
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:  # the hooks put its rows in this forward's token order
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        cq, ck, cv = (
            f(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = (torch.cat(p, dim=1).transpose(1, 2) for p in ((query, cq), (key, ck), (value, cv)))
        groups = None if attention_mask is None else self.groups(attention_mask, video_len)
        out = self.attend(q, k, v, layout, groups).transpose(1, 2).flatten(2, 3).to(query.dtype)
        video_out = attn.to_out[1](attn.to_out[0](out[:, :video_len]))
        return video_out, attn.to_add_out(out[:, video_len:])

    @staticmethod
    def groups(mask: torch.Tensor, video_len: int) -> list[KeptGroup] | None:
        """``kept_groups`` of a forward's mask, read once: every block gets the same mask tensor (also
        when gradient checkpointing re-runs a block), so the groups are kept on it."""
        if torch.compiler.is_compiling():
            return kept_groups(mask, video_len)
        cached = getattr(mask, "_cleardit_groups", None)
        if cached is None or cached[0] != video_len:
            cached = (video_len, kept_groups(mask, video_len))
            mask._cleardit_groups = cached
        return cached[1]

    def attend(self, q, k, v, layout: TokenLayout, groups: list[KeptGroup] | None) -> torch.Tensor:
        """CLEAR over [B, heads, N, d] in the order [video | conditions]. Padded condition keys are
        dropped for every query; padded queries see no key and output zeros, as diffusers' mask gives."""
        if groups is None:
            return self.attention(q, k, v, layout)
        out = torch.zeros_like(q)
        for rows, keys, kept in groups:
            index = slice(None, keys) if isinstance(keys, int) else keys
            part = self.attention(
                *(t[rows][:, :, index] for t in (q, k, v)), dataclasses.replace(layout, text_len=kept)
            )
            if isinstance(rows, slice):  # one group: every sample
                out[:, :, index] = part
            else:
                keys = torch.arange(keys, device=q.device) if isinstance(keys, int) else keys
                out[rows[:, None], :, keys[None, :]] = part.transpose(1, 2)
        return out


# ----------------------------------------------------------------------------- forward hooks
def _pre_hook(module, args, kwargs):
    """Read the grid from the latents, publish the layout and choose this forward's token order."""
    geometry: OrderedGrid = module._cleardit_grid
    geometry.check_processors(module)
    bound = bind_forward_args(module, args, kwargs)
    missing = [name for name in CONDITION_INPUTS if bound.arguments.get(name) is None]
    if missing:
        raise ValueError(
            f"a linearized HunyuanVideo15Transformer3DModel needs {', '.join(missing)}: its forward always "
            "joins the MLLM text, the ByT5 text and the image-condition tokens (image_embeds of zeros for "
            "text-to-video), as HunyuanVideo15Pipeline passes them"
        )
    cfg = module.config
    frames, height, width = latent_grid(bound.arguments["hidden_states"], cfg.patch_size_t, cfg.patch_size)
    conditions = sum(
        bound.arguments[n].shape[1]
        for n in ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds")
    )
    config = geometry.config
    layout = TokenLayout(
        conditions, height, width, text_first=False, down_factor=config.down_factor, tile=config.tile,
        frames=frames,
    )  # fmt: skip
    device = bound.arguments["hidden_states"].device
    geometry.use_tile_order(layout, device)
    geometry.layout = layout


def _rope_hook(module, args, kwargs, output):
    """On ``rope``: the (cos, sin) rows [N, head_dim] in this forward's token order."""
    order = module._cleardit_grid.order
    return output if order is None else tuple(f[order] for f in output)


# ----------------------------------------------------------------------------- the adapter
class HunyuanVideo15Adapter(ModelAdapter):
    """HunyuanVideo 1.5: linearize and weights for its text-to-video and image-to-video transformers;
    the jobs run ``HunyuanVideo15Pipeline`` (text to video)."""

    family = "hunyuanvideo15"
    transformer_classes = ("HunyuanVideo15Transformer3DModel",)
    pipeline_classes = ("HunyuanVideo15Pipeline",)
    trainable_pattern = TRAINABLE_PATTERN
    # the pipeline call's pre-encoded text: both encoders' embeddings and masks
    text_conditions = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")
    text_token_limit = 1000  # the pipeline's tokenizer_max_length (max_text_tokens reads it)
    grid_class = OrderedGrid
    video = True
    default_frames = 121  # HunyuanVideo15Pipeline's defaults
    default_steps = 50
    default_guidance = None  # no distilled guidance: the guider's scale is classifier-free guidance
    # the CFG scale HunyuanVideo 1.5's text-to-video examples use (ClassifierFreeGuidance's own default is
    # 7.5); a model folder's cleardit.json default_true_cfg overrides it
    default_true_cfg = 6.0

    def describe(self) -> str:
        classes = ", ".join(self.transformer_classes + self.pipeline_classes)
        jobs = (
            "linearize (T x H x W video grid, temporal_radius; image-condition, ByT5 and text tokens global; "
            "padding mask), weights, generate --frames, --compare, distill, eval model (text to video; "
            "image-to-video: linearize only)"
        )
        return f"{self.family} ({classes}): {jobs}, --devices: images only"

    # -- CLEAR attention ---------------------------------------------------------------------------
    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        """Every block's joint attention (the text token refiner's text-only attention stays full)."""
        return [block.attn for block in transformer.transformer_blocks]

    def strips_unsupported(self) -> str | None:
        return (
            "patch-parallel inference (--devices) splits an image into row strips; it does not run video "
            "models such as HunyuanVideo 1.5 yet"
        )

    def install_into(self, transformer: nn.Module, geometry: ForwardGrid, handle) -> ClearHandle:
        modules = self.attention_modules(transformer)
        foreign = sorted({type(a.processor).__name__ for a in modules} - {"HunyuanVideo15AttnProcessor2_0"})
        if foreign:
            raise NotSupportedError(
                "CLEAR for HunyuanVideo 1.5 replaces diffusers' HunyuanVideo15AttnProcessor2_0; this model "
                f"has {', '.join(foreign)}: put the original processors back before linearize"
            )
        geometry.adapter = self
        for attn in modules:
            handle.originals.append((attn, attn.processor))
            attn.set_processor(ClearHunyuanVideo15AttnProcessor(geometry, geometry.config, attn.to_q.weight))
        handle.hooks = (
            *add_hooks(transformer, _pre_hook, forget_token_order, state=geometry),
            *add_hooks(transformer.rope, post_hook=_rope_hook, state=geometry),
            *add_hooks(transformer.x_embedder, post_hook=to_tile_order, state=geometry),
            *add_hooks(transformer.proj_out, post_hook=to_raster_order, state=geometry),
        )
        return handle

    def attention_geometry(self, transformer: nn.Module) -> tuple[int, int, int]:
        cfg = transformer.config
        return int(cfg.num_attention_heads), int(cfg.attention_head_dim), int(cfg.num_layers)

    def consistency_modules(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every block's joint attention; its first output is the video stream's."""
        blocks = transformer.transformer_blocks
        return [(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(blocks)]

    # -- pipelines ---------------------------------------------------------------------------------
    def loads_pipeline_class(self, name: str) -> bool:
        # every HunyuanVideo 1.5 class is claimed, so that an image-to-video folder gets load_pipeline's
        # refusal rather than "unknown pipeline"
        return name.startswith("HunyuanVideo15")

    def load_pipeline(self, folder, dtype: torch.dtype):
        import diffusers

        index = Path(folder) / "model_index.json"
        name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
        if name is not None and name not in self.pipeline_classes:
            raise NotSupportedError(f"{folder} holds a {name}; {I2V_REFUSED}")
        cls = getattr(diffusers, self.pipeline_classes[0])
        return cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True)

    def check_pipeline(self, pipe) -> None:
        """Refuse a loaded pipeline the jobs cannot drive (image-to-video takes an image they lack)."""
        name = type(pipe).__name__
        if name not in self.pipeline_classes:
            raise NotSupportedError(f"this is a {name}; {I2V_REFUSED}")

    def size_factor(self, pipe) -> int:
        """Pixels per token side: the VAE's spatial factor (16) times the patch (1)."""
        return int(pipe.vae_scale_factor_spatial) * int(pipe.transformer.config.patch_size)

    def check_frames(self, pipe, num_frames: int) -> int:
        self.check_pipeline(pipe)  # an image-to-video pipeline is refused first
        return super().check_frames(pipe, num_frames)

    def default_video_size(self, pipe) -> tuple[int, int]:
        """The pipeline's default (height, width): the 16:9 bucket of its ``target_size`` (480 x 848 px
        for the 480p models), computed as the pipeline does."""
        ratio_w, ratio_h = pipe.default_aspect_ratio
        height, width = pipe.video_processor.calculate_default_height_width(
            ratio_h, ratio_w, pipe.target_size
        )
        return int(height), int(width)

    def default_size(self, pipe) -> int:
        return self.default_video_size(pipe)[0]

    def max_text_tokens(self, pipe) -> int:
        """The MLLM tokens the pipeline keeps per prompt (its fixed ``tokenizer_max_length``, 1000): it
        takes no max_sequence_length."""
        return int(pipe.tokenizer_max_length)

    def attention_text_len(self, text_len: int) -> int:
        """Condition tokens in the joint attention, an upper bound: the blocks attend to the kept MLLM
        tokens (at most ``text_len``; in practice the prompt's own, the rest is padding) and the kept
        ByT5 tokens (at most 256, none without quoted text); text-to-video keeps no image tokens."""
        return text_len + BYT5_TOKENS

    def call_options(self, guidance: float, true_cfg: float, negative_prompt: str, text_len: int) -> dict:
        # classifier-free guidance lives in the pipeline's guider component, not in a call argument:
        # run_pipeline takes guidance_scale off and sets the guider for that call only
        options = dict(guidance_scale=float(true_cfg))
        if true_cfg > 1:
            options.update(negative_prompt=negative_prompt)
        return options

    def run_pipeline(self, pipe, *, guidance_scale: float, callback_on_step_end=None, **kwargs):
        """``pipe(**kwargs)`` with, for this call only: the guider at ``guidance_scale``; the callback
        after each scheduler step (the pipeline has no ``callback_on_step_end``); and two corrections
        for several videos per prompt (diffusers 0.42 fails on them): ``image_embeds`` (zeros, made for
        one video per prompt) repeated to the latents' batch, and the VAE decoding one video at a time
        (its causal attention mask does not broadcast over a batch)."""
        self.check_pipeline(pipe)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_guided(pipe.guider, guidance_scale))
            stack.enter_context(_after_each_step(pipe, callback_on_step_end))
            stack.enter_context(_one_video_at_a_time(pipe.vae))
            hook = pipe.transformer.register_forward_pre_hook(_batch_image_embeds, with_kwargs=True)
            stack.callback(hook.remove)
            return pipe(**kwargs)

    def encode_prompt(self, pipe, prompt, *, images_per_prompt, text_len, true_cfg, negative_prompt) -> dict:
        self._check_text_len(pipe, text_len)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        names = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")
        encode = dict(
            device=pipe._execution_device, dtype=pipe.transformer.dtype, batch_size=len(prompts),
            num_videos_per_prompt=images_per_prompt,
        )  # fmt: skip
        with torch.no_grad():
            kwargs = dict(zip(names, pipe.encode_prompt(prompts, **encode), strict=True))
            if true_cfg > 1:
                negative = pipe.encode_prompt([negative_prompt or ""] * len(prompts), **encode)
                kwargs.update(zip((f"negative_{n}" for n in names), negative, strict=True))
        return kwargs

    def unpack_latents(self, pipe, packed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return packed  # the pipeline keeps latents unpacked [B, C, F, h, w]: the transformer patchifies

    def decode_latents(self, pipe, packed: torch.Tensor, size: tuple[int, int], output_type: str = "pil"):
        """Latents [B, C, F, h, w] -> the frames of each video, as the pipeline decodes them (divided by
        the VAE's ``scaling_factor``, decoded, ``postprocess_video``)."""
        vae = pipe.vae
        latents = (
            self.unpack_latents(pipe, packed, size).to(vae.device, vae.dtype) / vae.config.scaling_factor
        )
        with torch.no_grad(), _one_video_at_a_time(vae):
            video = vae.decode(latents, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type=output_type)

    # -- training ----------------------------------------------------------------------------------
    def load_transformer(self, folder, dtype: torch.dtype) -> nn.Module:
        index = Path(folder) / "model_index.json"
        name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
        if name is not None and name not in self.pipeline_classes:
            raise NotSupportedError(f"{folder} holds a {name}; {I2V_REFUSED}")
        return super().load_transformer(folder, dtype)

    def encode_text(self, pipe, prompt: str, text_len: int) -> dict[str, torch.Tensor]:
        """Both encoders' embeddings and masks of one prompt as the pipeline encodes them; the masks as
        integers (the pipeline casts them to the transformer's dtype when it calls it)."""
        self._check_text_len(pipe, text_len)
        with torch.no_grad():  # as in the pipeline's call (kernels differ in the last bit with grad on)
            embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(prompt, device=pipe._execution_device)
        return dict(
            prompt_embeds=embeds[0], prompt_embeds_mask=mask[0].long(),
            prompt_embeds_2=embeds_2[0], prompt_embeds_mask_2=mask_2[0].long(),
        )  # fmt: skip

    def check_conditions(self, transformer: nn.Module, sample: dict) -> None:
        cfg = transformer.config
        check_teacher_data_fits(
            [
                ("MLLM text embedding width", sample["prompt_embeds"].shape[-1], cfg.text_embed_dim),
                ("ByT5 text embedding width", sample["prompt_embeds_2"].shape[-1], cfg.text_embed_2_dim),
                (
                    "MLLM mask length",
                    sample["prompt_embeds_mask"].shape[-1],
                    sample["prompt_embeds"].shape[-2],
                ),
                (
                    "ByT5 mask length",
                    sample["prompt_embeds_mask_2"].shape[-1],
                    sample["prompt_embeds_2"].shape[-2],
                ),
                ("latent channels", sample["latents"].shape[0], self.latent_channels(transformer)),
            ]
        )

    def training_inputs(self, transformer, noisy, sigma, conditions, guidance) -> dict:
        """The pipeline's transformer call: latents joined with text-to-video's zero condition latents and
        zero mask ([latents | zeros | zero], 2C + 1 channels), timestep = the scheduler's (sigma x 1000) in
        the latents' dtype, both encoders' embeddings with their masks in the embeddings' dtype, and
        ``image_embeds`` of zeros (729 SigLIP tokens)."""
        batch, _, frames, height, width = noisy.shape
        hidden = torch.cat(
            [noisy, torch.zeros_like(noisy), noisy.new_zeros(batch, 1, frames, height, width)], 1
        )
        embeds, embeds_2 = conditions["prompt_embeds"], conditions["prompt_embeds_2"]
        image = embeds.new_zeros(batch, IMAGE_TOKENS, transformer.config.image_embed_dim)
        return dict(
            hidden_states=hidden, image_embeds=image, timestep=(sigma * TRAIN_TIMESTEPS).to(noisy.dtype),
            encoder_hidden_states=embeds,
            encoder_attention_mask=conditions["prompt_embeds_mask"].to(embeds.dtype),
            encoder_hidden_states_2=embeds_2,
            encoder_attention_mask_2=conditions["prompt_embeds_mask_2"].to(embeds_2.dtype),
            return_dict=False,
        )  # fmt: skip

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        # the velocity comes back [B, C, F, h, w]; training_inputs adds the condition channels itself
        return latents

    def latent_channels(self, transformer: nn.Module) -> int:
        """C of the latents: the transformer's output channels (its input is 2C + 1)."""
        return int(transformer.config.out_channels)

    def _check_text_len(self, pipe, text_len: int) -> None:
        if text_len != self.max_text_tokens(pipe):
            raise ValueError(
                f"HunyuanVideo15Pipeline encodes {self.max_text_tokens(pipe)} MLLM tokens per prompt (its "
                f"tokenizer_max_length) and takes no other length, but {text_len} were asked for; drop "
                "max_sequence_length from the model folder's cleardit.json"
            )


@contextlib.contextmanager
def _guided(guider, scale: float) -> Iterator[None]:
    """The guider at classifier-free guidance ``scale`` (1: off) inside the block, as it was after."""
    if not hasattr(guider, "guidance_scale") or getattr(guider, "use_original_formulation", False):
        raise NotSupportedError(
            f"cleardit sets classifier-free guidance through a ClassifierFreeGuidance guider in its "
            f"standard formulation; this pipeline's guider is a {type(guider).__name__} "
            f"(use_original_formulation={getattr(guider, 'use_original_formulation', None)}): put a "
            "ClassifierFreeGuidance() in pipe.guider"
        )
    saved = guider.guidance_scale, guider._enabled
    guider.guidance_scale, guider._enabled = float(scale), True
    try:
        yield
    finally:
        guider.guidance_scale, guider._enabled = saved


@contextlib.contextmanager
def _after_each_step(pipe, callback) -> Iterator[None]:
    """``callback(pipe, step, timestep, {})`` after each scheduler step of the block (what diffusers'
    ``callback_on_step_end`` would be called with), through the scheduler instance's ``step``."""
    if callback is None:
        yield
        return
    scheduler, count = pipe.scheduler, iter(range(1 << 62))

    def step(model_output, timestep, sample, *args, **kwargs):
        out = type(scheduler).step(scheduler, model_output, timestep, sample, *args, **kwargs)
        callback(pipe, next(count), timestep, {})
        return out

    scheduler.step = step
    try:
        yield
    finally:
        del scheduler.step  # the class's step again


@contextlib.contextmanager
def _one_video_at_a_time(vae) -> Iterator[None]:
    """The VAE decoding a batch one video at a time inside the block (its slicing), as it was after."""
    saved = vae.use_slicing
    vae.use_slicing = True
    try:
        yield
    finally:
        vae.use_slicing = saved


def _batch_image_embeds(module, args, kwargs):
    hidden, image = kwargs.get("hidden_states"), kwargs.get("image_embeds")
    if hidden is None or image is None or image.shape[0] == hidden.shape[0] or image.shape[0] != 1:
        return None
    return args, {**kwargs, "image_embeds": image.expand(hidden.shape[0], *image.shape[1:])}
