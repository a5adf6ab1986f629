"""``ModelAdapter``: everything a job may know about a model family.

Jobs (generation, patch-parallel, distillation, evaluation) never name a family's classes or
internals; they ask the adapter of the model in hand (``cleardit.models.adapter_for``). One file
per family subclasses this and fills in what differs. Tensors called "latents" here are the
unpacked VAE latents [B, C, H / vae_scale, W / vae_scale]; "packed" ones are what the family's
transformer takes as ``hidden_states``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from ..config import ClearConfig
from .errors import NotSupportedError
from .handle import ClearHandle, ForwardGrid


class ModelAdapter:
    """One model family. Subclasses set the class attributes and implement the methods they need.

    Attributes:
        family: short name ("flux", "chroma"), written into CLEAR weight files.
        transformer_classes: diffusers transformer class names this adapter handles.
        pipeline_classes: diffusers text-to-image pipeline class names (``model_index.json``).
        img2img_class: the family's image-to-image pipeline class (high-resolution stage 2).
        trainable_pattern: regex over ``named_parameters()`` names: what CLEAR fine-tunes and saves.
        text_conditions: the per-sample text tensors teacher data stores, in ``encode_text`` order;
            they are also the pipeline call's keyword arguments for pre-encoded text.
        strip_latents: patch-parallel generation keeps only each rank's strip of the packed latents
            through the denoising loop (``StripPipeline``); False: every rank runs the whole loop on
            the full latents and the transformer gathers its output strips at every step.
        strip_context_class: the ``StripContext`` subclass ``parallelize`` builds for this family
            (its per-forward fields beside the strip plan); None: ``StripContext`` itself.
        teacher_keeps_tile_order: the distillation teacher (the original processors swapped in,
            ``original_attention``) runs in the student's tile-major token order. False where the
            family's RoPE is built inside the forward and only CLEAR's processors reorder it: the
            student is then trained in raster order, so the attention-consistency loss compares
            the same tokens.
        video: the family's transformer denoises videos (a T x H x W token grid): ``temporal_radius``
            is its rule's second parameter; image families refuse it.
        default_steps, default_guidance, default_true_cfg: generation defaults when the model folder's
            ``cleardit.json`` gives none (``default_guidance`` None: the family has no distilled
            guidance, and ``--guidance`` is refused).
    """

    family: str = ""
    transformer_classes: tuple[str, ...] = ()
    pipeline_classes: tuple[str, ...] = ()
    img2img_class: str | None = None
    trainable_pattern: re.Pattern = re.compile(r"$^")
    text_conditions: tuple[str, ...] = ()
    text_tokenizer: str = "tokenizer"  # the pipeline's tokenizer that sets the text length
    text_token_limit: int = 512  # the most text tokens the family's pipelines take
    grid_class: type = ForwardGrid  # the per-forward state ``install`` shares between hooks and processors
    strip_latents: bool = False
    strip_context_class: type | None = None  # a StripContext subclass with the family's forward state
    teacher_keeps_tile_order: bool = True
    video: bool = False
    default_frames: int | None = None  # video families: frames of a video when the caller gives none
    default_steps: int = 28
    default_guidance: float | None = 3.5
    default_true_cfg: float = 1.0

    # -- which models ------------------------------------------------------------------------------
    def matches(self, transformer) -> bool:
        """Whether ``transformer`` is of this family (``adapter_for`` takes a pipeline's transformer)."""
        return bool({c.__name__ for c in type(transformer).__mro__} & set(self.transformer_classes))

    def loads_pipeline_class(self, name: str) -> bool:
        """Whether this family loads a folder whose ``model_index.json`` names pipeline class ``name``."""
        return name in self.pipeline_classes

    def describe(self) -> str:
        """One line for ``cleardit info``: the classes and what the family supports."""
        jobs = ["linearize", "weights", "generate", "--compare", "distill", "eval model"]
        if self.img2img_class:
            jobs.insert(3, f"--highres ({self.img2img_class})")
        jobs.append("--devices N" if self.strips_unsupported() is None else "--devices: not yet")
        classes = ", ".join(self.transformer_classes + self.pipeline_classes)
        return f"{self.family} ({classes}): {', '.join(jobs)}"

    # -- CLEAR attention ---------------------------------------------------------------------------
    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        """The attention modules whose processors CLEAR replaces, in layer order."""
        raise NotImplementedError

    def check_config(self, transformer: nn.Module, config: ClearConfig) -> None:
        """Refuse a ``config`` this family cannot run (before anything is changed)."""
        if self.video:
            return
        if config.temporal_radius is not None:
            raise ValueError(
                f"temporal_radius={config.temporal_radius} is for video models; this "
                f"{type(transformer).__name__} ({self.family}) makes images: drop temporal_radius"
            )
        if config.tile is not None and len(config.tile) == 3:
            raise ValueError(
                f"tile={config.tile} has a depth in frames, which is for video models; this "
                f"{type(transformer).__name__} ({self.family}) makes images: pass tile=(rows, cols)"
            )

    def install(self, transformer: nn.Module, config: ClearConfig) -> ClearHandle:
        """Put CLEAR processors and the grid hooks into ``transformer``; the handle undoes it."""
        return self.install_into(
            transformer, self.grid_class(config), ClearHandle(transformer, config, self.trainable_pattern)
        )

    def install_into(self, transformer: nn.Module, geometry: ForwardGrid, handle: ClearHandle) -> ClearHandle:
        """The family's CLEAR processors (sharing ``geometry``, the per-forward state: a ``grid_class``
        or, patch-parallel, a ``StripContext``) and hooks put into ``transformer``, recorded in ``handle``."""
        raise NotImplementedError

    def strips_unsupported(self) -> str | None:
        """Why patch-parallel inference cannot run this family (None: it can, ``install_strips``)."""
        return f"patch-parallel inference (--devices) is not supported for {self.family} models yet"

    def install_strips(self, transformer: nn.Module, config: ClearConfig, context) -> ClearHandle:
        """Patch-parallel CLEAR (``cleardit.models.strips.parallelize``): one strip of rows per rank. A
        family without ``strip_latents`` takes the full inputs on every rank and returns the full output:
        its hooks keep a rank's rows after embedding and gather them before the output."""
        from .strips import ParallelHandle  # strips builds on this module

        self.check_config(transformer, config)
        if self.strips_unsupported():
            raise NotSupportedError(f"{self.strips_unsupported()}; generate on one device")
        if not self.strip_latents and (context.strip_input or not context.gather_output):
            raise NotSupportedError(
                f"patch-parallel {self.family} takes the full latents on every rank and returns the full "
                "output (strip_input=False, gather_output=True): its transformer keeps a rank's rows after "
                "embedding and gathers them itself"
            )
        handle = ParallelHandle(transformer, config, self.trainable_pattern, context=context)
        return self.install_into(transformer, context, handle)

    def sync_fused_projections(self, transformer: nn.Module) -> None:
        """After CLEAR weights were loaded into the separate projections, bring fused copies of them
        (``fuse_qkv_projections``) up to date; nothing by default."""

    def attention_geometry(self, transformer: nn.Module) -> tuple[int, int, int]:
        """(heads, head_dim, attention layers) for FLOPs counts."""
        raise NotImplementedError

    def consistency_modules(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, module) of the attention modules whose outputs distillation's consistency loss may
        compare (``--attention-layers`` indexes this list)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def fixed_inputs(self, transformer: nn.Module) -> Iterator[None]:
        """Corrections to what the family's pipelines pass the transformer, applied to every run a
        job makes (full attention and CLEAR alike) so both see the same model; none by default."""
        yield

    # -- high-resolution hooks ---------------------------------------------------------------------
    @contextlib.contextmanager
    def rope_theta_scaled(self, transformer: nn.Module, factor: float) -> Iterator[None]:
        """RoPE's base theta multiplied by ``factor`` inside the block (NTK-scaled RoPE)."""
        raise NotSupportedError(f"NTK-scaled RoPE (--ntk-factor) is not supported for {self.family} models")
        yield

    def query_norms(self, transformer: nn.Module) -> list[nn.Module]:
        """Modules whose output is the query right before RoPE and the softmax (query scaling)."""
        raise NotSupportedError(
            f"proportional attention with full attention is not supported for {self.family} models"
        )

    # -- pipelines ---------------------------------------------------------------------------------
    def load_pipeline(self, folder, dtype: torch.dtype):
        """The text-to-image pipeline in ``folder``, offline."""
        raise NotImplementedError

    def load_transformer(self, folder, dtype: torch.dtype) -> nn.Module:
        """Only the transformer of the pipeline in ``folder``, offline."""
        import diffusers

        cls = getattr(diffusers, self.transformer_classes[0])
        return cls.from_pretrained(
            str(folder), subfolder="transformer", torch_dtype=dtype, local_files_only=True
        )

    def img2img_pipeline(self, pipe):
        """An image-to-image pipeline sharing every module of ``pipe`` (no copies)."""
        if self.img2img_class is None:
            raise NotSupportedError(f"--highres needs an image-to-image pipeline; {self.family} has none yet")
        img2img = self.img2img_pipeline_class()(**pipe.components)
        img2img._progress_bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
        return img2img

    def img2img_pipeline_class(self) -> type:
        """The class ``img2img_pipeline`` builds: diffusers' ``img2img_class``."""
        import diffusers

        return getattr(diffusers, self.img2img_class)

    def size_factor(self, pipe) -> int:
        """Pixels per token side: the VAE's factor times 2x2 patches (most families)."""
        return int(pipe.vae_scale_factor) * 2

    def default_size(self, pipe) -> int:
        """The pipeline's default image side in pixels."""
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    def default_video_size(self, pipe) -> tuple[int, int]:
        """Video families: the pipeline's default (height, width) in pixels."""
        side = self.default_size(pipe)
        return side, side

    def frames_factor(self, pipe) -> int:
        """Video families: the VAE's temporal factor c (videos have 1 + k c frames)."""
        return int(pipe.vae_scale_factor_temporal)

    def check_frames(self, pipe, num_frames: int) -> int:
        """Video families: ``num_frames`` when the pipeline's VAE takes it (1 + k x ``frames_factor``),
        else a ValueError naming the nearest counts it takes."""
        if not self.video:
            raise ValueError(
                f"--frames {num_frames}: {self.family} models make images, not videos; drop --frames"
            )
        if not self.pipeline_classes:  # a video family whose pipelines the jobs do not run (yet)
            raise NotSupportedError(
                f"cleardit's video jobs do not run {self.family} pipelines yet; linearize the transformer "
                "directly: cleardit.linearize(pipe.transformer, radius=..., temporal_radius=...)"
            )
        return check_num_frames(num_frames, self.frames_factor(pipe), self.family)

    def latent_frames(self, pipe, num_frames: int) -> int:
        """Latent frames T of a ``num_frames`` video (the token grid's depth: the VAE keeps the first
        frame, then one per ``frames_factor``); 1 for images."""
        if not self.video:
            return 1
        return (self.check_frames(pipe, num_frames) - 1) // self.frames_factor(pipe) + 1

    def attention_text_len(self, text_len: int) -> int:
        """Text tokens inside the attention CLEAR replaces, for ``text_len`` prompt tokens (0 where
        text comes in through cross-attention, e.g. Wan)."""
        return text_len

    def schedule_mu(self, pipe, image_seq_len: int, steps: int) -> float | None:
        """The dynamic shift ``mu`` the family's pipelines use for ``image_seq_len`` tokens and ``steps``
        steps where it is not the scheduler's linear rule; None: cleardit's ``--shift-rule``."""
        return None

    def max_text_tokens(self, pipe) -> int:
        """Text tokens per prompt when the model folder does not say: the length of the pipeline's
        ``text_tokenizer``, at most ``text_token_limit``."""
        length = getattr(getattr(pipe, self.text_tokenizer, None), "model_max_length", None)
        if not isinstance(length, int) or length <= 0:
            return self.text_token_limit
        return min(length, self.text_token_limit)

    def call_options(self, guidance: float, true_cfg: float, negative_prompt: str, text_len: int) -> dict:
        """Keyword arguments of a pipeline call for these generation settings."""
        raise NotImplementedError

    @staticmethod
    def cfg_guidance_scale_options(true_cfg: float, negative_prompt: str, text_len: int) -> dict:
        """``call_options`` of a family without distilled guidance whose pipeline's ``guidance_scale``
        is classifier-free guidance (Chroma, SD3)."""
        options = dict(guidance_scale=float(true_cfg), max_sequence_length=text_len)
        if true_cfg > 1:
            options.update(negative_prompt=negative_prompt)
        return options

    def run_pipeline(self, pipe, **kwargs):
        """One pipeline call of a job, with ``call_options``' keywords among ``kwargs``: ``pipe(**kwargs)``
        unless the family's pipelines take some of them another way."""
        return pipe(**kwargs)

    def encode_prompt(self, pipe, prompt, *, images_per_prompt: int, text_len: int, true_cfg: float,
                      negative_prompt: str | None) -> dict:  # fmt: skip
        """The encoded text as keyword arguments of a pipeline call (``prompt_embeds=...``)."""
        raise NotImplementedError

    def initial_noise(
        self,
        pipe,
        batch: int,
        height: int,
        width: int,
        dtype,
        device,
        generator,
        *,
        frames: int | None = None,
    ) -> torch.Tensor:
        """The packed starting noise the pipeline would draw from ``generator`` (its ``prepare_latents``;
        where that also returns the latents' ids, the latents). Video families: [B, C, T, h, w] of a
        ``frames`` x ``height`` x ``width`` video (``frames`` required)."""
        channels = self.latent_channels(pipe.transformer)
        if self.video:
            if frames is None:
                raise TypeError(
                    f"{self.family} makes videos: pass initial_noise(..., frames=N) with N = 1 + "
                    f"{self.frames_factor(pipe)}k frames (the pipeline's default is {self.default_frames})"
                )
            frames = self.check_frames(pipe, frames)
            return pipe.prepare_latents(batch, channels, height, width, frames, dtype, device, generator)
        noise = pipe.prepare_latents(batch, channels, height, width, dtype, device, generator)
        return noise[0] if isinstance(noise, tuple) else noise

    def unpack_latents(self, pipe, packed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Packed latents of a ``size`` (height, width) image -> latents [B, C, h, w]."""
        raise NotImplementedError

    def decode_latents(self, pipe, packed: torch.Tensor, size: tuple[int, int], output_type: str = "pil"):
        """Packed latents of a ``size`` image -> images, as the pipeline decodes them."""
        latents = self.unpack_latents(pipe, packed, size)
        vae = pipe.vae
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        with torch.no_grad():
            image = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)

    # -- training ----------------------------------------------------------------------------------
    def encode_text(self, pipe, prompt: str, text_len: int) -> dict[str, torch.Tensor]:
        """One prompt's text conditions (``text_conditions``), each without a batch dimension."""
        raise NotImplementedError

    def check_conditions(self, transformer: nn.Module, sample: dict) -> None:
        """Raise ValueError when teacher data (``sample``) was made for another model."""

    def training_inputs(self, transformer: nn.Module, noisy: torch.Tensor, sigma: torch.Tensor,
                        conditions: dict[str, torch.Tensor], guidance: float) -> dict:  # fmt: skip
        """Forward keyword arguments for latents ``noisy`` [B, C, h, w] at noise levels ``sigma`` [B]."""
        raise NotImplementedError

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> the transformer's token layout (``velocity`` gives the same)."""
        raise NotImplementedError

    def velocity(self, output) -> torch.Tensor:
        """The prediction in a transformer's forward ``output`` as the flow-matching velocity
        noise - x0, in ``pack_latents``' layout (what distillation's target is)."""
        return output[0]

    def latent_channels(self, transformer: nn.Module) -> int:
        """Channels C of the unpacked latents."""
        raise NotImplementedError


def check_teacher_data_fits(checks: list[tuple[str, int, int]]) -> None:
    """``check_conditions``' error for the first (what, in the data, in the transformer) that differ."""
    for what, got, want in checks:
        if got != want:
            raise ValueError(
                f"the teacher data does not fit this model: {what} is {got} in the data, {want} in the "
                "transformer; make the data with the same --model (cleardit distill data --model ...)"
            )


def nearest_frame_counts(num_frames: int, factor: int) -> list[int]:
    """The valid frame counts (1 + k x ``factor``) nearest ``num_frames``: one, or the two around it."""
    if num_frames <= 1:
        return [1]
    below = 1 + (num_frames - 1) // factor * factor
    return [below] if below == num_frames else [below, below + factor]


def check_num_frames(num_frames, factor: int, family: str) -> int:
    """``num_frames`` when a VAE of temporal factor ``factor`` takes it ((num_frames - 1) % factor == 0),
    else an error naming the nearest valid counts. (The pipelines do not check: they would silently
    make (num_frames - 1) // factor * factor + 1 frames.)"""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer (1 + {factor}k), got {num_frames!r}")
    if (num_frames - 1) % factor:
        nearest = " or ".join(str(n) for n in nearest_frame_counts(num_frames, factor))
        raise ValueError(
            f"num_frames={num_frames} does not fit the {family} VAE, which takes 1 + {factor}k frames "
            f"((num_frames - 1) must be a multiple of vae_scale_factor_temporal = {factor}); use {nearest}"
        )
    return num_frames
