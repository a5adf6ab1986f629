"""Chroma adapter: diffusers' ``ChromaTransformer2DModel`` / ``ChromaPipeline``.

Chroma is FLUX-shaped (the same attention modules, ``[text | image]`` order, ``img_ids`` grid), with
a T5-only text encoder, no pooled text and no distilled guidance (its ``guidance_scale`` is true
classifier-free guidance). It pads the text to ``max_sequence_length`` and passes an
``attention_mask`` that every processor must honour: padded text keys stay masked, and padded
text queries (rows that see nothing) output zeros, as under diffusers' boolean mask.

diffusers' Chroma pipelines build that mask as float 0/1, which scaled dot-product attention adds
to the logits instead of dropping the keys (upstream issue diffusers#11724); CLEAR reads 0/1 as
keep/drop, so padded text is masked whatever the mask's dtype.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..attention import TokenLayout, clear_attention
from .flux import ClearFluxAttnProcessor, FluxAdapter, _check_fits


def key_keep_mask(attention_mask: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """The keys [B, S] a Chroma attention mask keeps (bool, 0/1 float, or additive 0/-inf float)."""
    mask = attention_mask
    if (
        mask.ndim == 4
    ):  # [B, 1, S, S] outer product: the last query is an image token, which sees every kept key
        mask = mask[:, 0, -1, :]
    elif mask.ndim == 3:
        mask = mask[:, -1, :]
    if mask.shape != (batch, seq_len):
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not fit {batch} x {seq_len} tokens"
        )
    if mask.dtype == torch.bool:
        return mask
    values = set(torch.unique(mask).tolist())
    if values <= {0.0, 1.0}:
        return mask != 0
    if values <= {0.0, float("-inf")}:
        return mask == 0
    raise ValueError(
        "CLEAR takes a key-padding attention_mask (bool, 0/1, or additive 0/-inf); this one has other values"
    )


class ClearChromaAttnProcessor(ClearFluxAttnProcessor):
    """ClearFluxAttnProcessor that honours Chroma's text-padding mask."""

    def attend(self, q, k, v, layout: TokenLayout, attention_mask) -> torch.Tensor:
        if attention_mask is None:
            return super().attend(q, k, v, layout, None)
        batch, text_len = q.shape[0], layout.text_len
        keep = key_keep_mask(attention_mask.to(q.device), batch, layout.seq_len)
        if not bool(keep[:, text_len:].all()):
            raise ValueError("CLEAR masks only text tokens; this attention_mask drops image tokens")
        out = torch.zeros_like(q)
        # samples with the same kept text run together: [kept text | image] is one smaller layout
        groups: dict[tuple[int, ...], list[int]] = {}
        for b in range(batch):
            groups.setdefault(tuple(keep[b, :text_len].nonzero().flatten().tolist()), []).append(b)
        for kept, rows in groups.items():
            index = torch.tensor(list(kept) + list(range(text_len, layout.seq_len)), device=q.device)
            sub = dataclasses.replace(layout, text_len=len(kept))
            rows_t = torch.tensor(rows, device=q.device)
            part = clear_attention(
                *(t[rows_t][:, :, index] for t in (q, k, v)), sub, self.config.radius,
                pool_weight=self.pool_weight(), scale=self.config.scale, backend=self.config.backend,
            )  # fmt: skip
            out[rows_t[:, None], :, index[None, :]] = part.transpose(1, 2).to(out.dtype)
        return out


class ChromaAdapter(FluxAdapter):
    """Chroma (lodestones/Chroma1-HD and relatives)."""

    family = "chroma"
    transformer_classes = ("ChromaTransformer2DModel",)
    pipeline_classes = ("ChromaPipeline",)
    img2img_class = "ChromaImg2ImgPipeline"
    text_conditions = ("prompt_embeds", "prompt_attention_mask")
    processor_class = ClearChromaAttnProcessor
    default_steps = 35  # ChromaPipeline's defaults
    default_true_cfg = 5.0

    def strips_unsupported(self) -> str | None:
        return (
            "patch-parallel inference (--devices) is not supported for Chroma yet "
            "(its text-padding mask is not split into strips)"
        )

    def max_text_tokens(self, pipe) -> int:
        length = getattr(getattr(pipe, "tokenizer", None), "model_max_length", None)
        return min(length, 512) if isinstance(length, int) and length > 0 else 512

    def call_options(self, guidance: float, true_cfg: float, negative_prompt: str, text_len: int) -> dict:
        # Chroma has no distilled guidance: its guidance_scale is classifier-free guidance
        options = dict(guidance_scale=float(true_cfg), max_sequence_length=text_len)
        if true_cfg > 1:
            options.update(negative_prompt=negative_prompt)
        return options

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
        _check_fits(
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
