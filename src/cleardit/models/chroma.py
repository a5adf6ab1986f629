"""Chroma adapter: diffusers' ``ChromaTransformer2DModel`` / ``ChromaPipeline``.

Chroma is FLUX-shaped (the same attention modules, ``[text | image]`` order, ``img_ids`` grid), with
a T5-only text encoder, no pooled text and no distilled guidance (its ``guidance_scale`` is true
classifier-free guidance). It pads the text to ``max_sequence_length`` and passes the transformer
an ``attention_mask`` [B, text + image] that CLEAR honours: padded text keys are dropped, and padded
text queries (which see nothing) output zeros, as under diffusers' boolean mask. The linearized
forward reads the mask once (``read_forward_inputs``) and takes it out of the blocks' inputs, so
they never build their [B, 1, S, S] outer-product mask (8.7 GB in bf16 at 4096 px).

diffusers' Chroma pipelines build that mask as float 0/1, which scaled dot-product attention adds to
the logits instead of dropping the keys (upstream issue diffusers#11724). Every run cleardit makes,
full attention included, passes the mask as boolean (``fixed_inputs``), so CLEAR and the original
attention are compared on the same, correctly masked model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from ..attention import clear_attention
from ..config import ClearConfig
from .adapter import ModelAdapter, check_teacher_data_fits
from .flux import ClearFluxAttnProcessor, FluxAdapter, IPAdapterBranch
from .handle import ForwardGrid, ForwardState


def keep_mask(attention_mask: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """The tokens [B, S] a Chroma transformer's ``attention_mask`` keeps (bool, or float 0/1)."""
    if tuple(attention_mask.shape) != (batch, seq_len):
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not fit {batch} x {seq_len} tokens "
            "(ChromaTransformer2DModel takes [batch, text + image])"
        )
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError(
            "Chroma's attention_mask must be boolean or 0/1 (1 = keep); this one has other values"
        )
    return attention_mask != 0


class TextMaskGrid(ForwardGrid):
    """ForwardGrid plus the kept text of the forward in flight: ``groups`` of samples that keep the
    same text tokens, as (sample rows, token index [kept text | image], kept text count); None when
    every text token is kept."""

    def __init__(self, config: ClearConfig):
        super().__init__(config)
        self.groups: list[tuple[torch.Tensor, torch.Tensor, int]] | None = None

    def snapshot(self) -> ForwardState:
        return ForwardState(self.require_layout(), self.groups)


class ClearChromaAttnProcessor(ClearFluxAttnProcessor):
    """ClearFluxAttnProcessor that honours Chroma's text-padding mask (read once per forward)."""

    def attend(self, q, k, v, state: ForwardState, attention_mask) -> torch.Tensor:
        groups, layout = state.extra, state.layout
        if attention_mask is not None or groups is None:
            return super().attend(q, k, v, state, attention_mask)
        out = torch.zeros_like(q)  # padded text queries see nothing: zeros
        for rows, index, kept in groups:
            part = clear_attention(
                *(t[rows][:, :, index] for t in (q, k, v)), dataclasses.replace(layout, text_len=kept),
                self.config.radius, pool_weight=self.pool_weight(), scale=self.config.scale,
                backend=self.config.backend,
            )  # fmt: skip
            out[rows[:, None], :, index[None, :]] = part.transpose(1, 2).to(out.dtype)
        return out


def text_groups(keep: torch.Tensor, text_len: int) -> list[tuple[torch.Tensor, torch.Tensor, int]] | None:
    """``TextMaskGrid.groups`` of a keep mask [B, S] whose image part is all kept."""
    if not bool(keep[:, text_len:].all()):
        raise ValueError("CLEAR masks only text tokens; this attention_mask drops image tokens")
    if bool(keep.all()):
        return None
    seq_len, device = keep.shape[1], keep.device
    by_kept: dict[tuple[int, ...], list[int]] = {}
    for b, row in enumerate(keep[:, :text_len].cpu()):
        by_kept.setdefault(tuple(row.nonzero().flatten().tolist()), []).append(b)
    return [
        (
            torch.tensor(rows, device=device),
            torch.tensor(list(kept) + list(range(text_len, seq_len)), device=device),
            len(kept),
        )
        for kept, rows in by_kept.items()
    ]


class ClearChromaIPAdapterAttnProcessor(IPAdapterBranch, ClearChromaAttnProcessor):
    """ClearChromaAttnProcessor with the IP-Adapter branch."""


class ChromaAdapter(FluxAdapter):
    """Chroma (lodestones/Chroma1-HD and relatives)."""

    family = "chroma"
    transformer_classes = ("ChromaTransformer2DModel",)
    pipeline_classes = ("ChromaPipeline",)
    img2img_class = "ChromaImg2ImgPipeline"
    text_conditions = ("prompt_embeds", "prompt_attention_mask")
    text_tokenizer = "tokenizer"  # T5 only
    processor_class = ClearChromaAttnProcessor
    ip_processor_class = ClearChromaIPAdapterAttnProcessor
    grid_class = TextMaskGrid
    default_steps = 35  # ChromaPipeline's defaults
    default_guidance = None  # no distilled guidance
    default_true_cfg = 5.0

    def strips_unsupported(self) -> str | None:
        return (
            "patch-parallel inference (--devices) is not supported for Chroma yet "
            "(its text-padding mask is not split into strips)"
        )

    install_strips = ModelAdapter.install_strips  # FLUX's strips do not honour the text mask: refuse

    def read_forward_inputs(self, transformer: nn.Module, bound, geometry: TextMaskGrid) -> None:
        geometry.groups = None
        mask = bound.arguments.get("attention_mask")
        if mask is None or geometry.original_pass:
            return  # no mask, or the original attention runs (a distillation teacher pass): it reads the mask
        hidden = bound.arguments["hidden_states"]
        keep = keep_mask(mask.to(hidden.device), hidden.shape[0], geometry.layout.seq_len)
        geometry.groups = text_groups(keep, geometry.layout.text_len)
        bound.arguments["attention_mask"] = None  # read here once; the blocks build no [B, 1, S, S] mask

    @contextlib.contextmanager
    def fixed_inputs(self, transformer: nn.Module) -> Iterator[None]:
        """Chroma's pipelines pass a float 0/1 mask (added to the logits: diffusers#11724); pass it as
        boolean so that padded text is dropped by the original attention too."""

        def as_bool(_module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.is_floating_point():
                kwargs["attention_mask"] = keep_mask(mask, mask.shape[0], mask.shape[1])
            return args, kwargs

        hook = transformer.register_forward_pre_hook(as_bool, with_kwargs=True, prepend=True)
        try:
            yield
        finally:
            hook.remove()

    def call_options(self, guidance: float, true_cfg: float, negative_prompt: str, text_len: int) -> dict:
        # Chroma has no distilled guidance: its guidance_scale is classifier-free guidance
        return self.cfg_guidance_scale_options(true_cfg, negative_prompt, text_len)

    def encode_prompt(self, pipe, prompt, *, images_per_prompt, text_len, true_cfg, negative_prompt) -> dict:
        embeds, _, mask, neg, _, neg_mask = pipe.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt if true_cfg > 1 else None,
            device=pipe._execution_device, num_images_per_prompt=images_per_prompt,
            do_classifier_free_guidance=true_cfg > 1, max_sequence_length=text_len,
        )  # fmt: skip
        kwargs = dict(prompt_embeds=embeds, prompt_attention_mask=mask)
        if true_cfg > 1:
            kwargs.update(negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask)
        return kwargs

    # -- training ----------------------------------------------------------------------------------
    def encode_text(self, pipe, prompt: str, text_len: int) -> dict[str, torch.Tensor]:
        embeds, _, mask, *_ = pipe.encode_prompt(
            prompt=prompt,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=text_len,
        )
        return {"prompt_embeds": embeds[0], "prompt_attention_mask": mask[0]}

    def check_conditions(self, transformer: nn.Module, sample: dict) -> None:
        cfg = transformer.config
        check_teacher_data_fits(
            [
                ("text embedding width", sample["prompt_embeds"].shape[-1], cfg.joint_attention_dim),
                (
                    "text mask length",
                    sample["prompt_attention_mask"].shape[-1],
                    sample["prompt_embeds"].shape[0],
                ),
                ("latent channels x 4", sample["latents"].shape[0] * 4, cfg.in_channels),
            ]
        )

    def training_inputs(self, transformer, noisy, sigma, conditions, guidance) -> dict:
        dev = sigma.device
        b, _, h, w = noisy.shape
        text = conditions["prompt_embeds"]
        image_len = (h // 2) * (w // 2)
        # a boolean mask: diffusers' own attention (the teacher) then drops padded text too
        keep = torch.cat(
            [
                conditions["prompt_attention_mask"].to(dev) != 0,
                torch.ones(b, image_len, dtype=torch.bool, device=dev),
            ],
            dim=1,
        )
        return dict(
            hidden_states=self.pack_latents(noisy),
            timestep=sigma,
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=dev),
            img_ids=self.image_ids(h // 2, w // 2, dev),
            attention_mask=keep,
            return_dict=False,
        )
