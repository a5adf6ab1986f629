"""``cleardit generate --devices N``: one image generation split over N local processes.

``generate_parallel(prompt, devices=N, **generate_options)`` spawns N ranks (one per GPU with
NCCL, rank i on ``cuda:i``; CPU processes with gloo otherwise). Every rank runs
``cleardit.pipelines.generate`` with a ``PatchParallelRank``:

* its transformer is ``parallelize``-d with ``strip_input=True`` instead of ``linearize``-d;
* its pipeline is wrapped in a ``StripPipeline``: every rank encodes the prompt (cheap, so nothing
  is broadcast), draws the same full noise from the seeds, keeps its strip of latent rows
  ([B, rows_i * W, C]) and runs the family's own denoising loop on the strip (the scheduler step is
  token-wise; the timestep shift is computed from the full image). The strips are all-gathered
  once after the last step; rank 0 decodes with the VAE (``vae_tiling`` for large images) and
  is the only rank that prints and writes files.

Families whose latents are not packed token rows (``adapter.strip_latents`` False, e.g. SD3's
[B, C, h, w]) run the pipeline unwrapped on every rank with the full latents; the transformer keeps
its rows after embedding and gathers its output strips at every step (``gather_output=True``).

The result equals one process up to float rounding (tests: max pixel difference <= 1/255).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.multiprocessing as mp

from ..atomic import check_writable
from ..attention.strips import KINDS, CommCounter, StripPlan
from ..pipelines.config import GenerateConfig
from ..pipelines.generate import GenerationResult, generate, make_config, output_paths
from ..pipelines.highres import decode_latents
from ..pipelines.loading import (
    folder_adapter,
    read_model_info,
    resolve_device,
    resolve_model,
    size_factor,
    size_factor_of_folder,
)
from ..prompt_list import prompt_list
from ..schedule import sigmas_as_given
from .launch import ParallelLaunchError, spawn

PRELOAD = ["torch", "diffusers", "cleardit.parallel.generate"]
USER_ERRORS = ("ValueError", "TypeError", "FileNotFoundError", "ModelNotFoundError", "NotSupportedError")
UNSUPPORTED = {
    "compare": "its full-attention runs see every token, so they cannot be split into strips; "
    "run --compare without --devices",
    "highres": "its stage 2 is an image-to-image pass that is not split into strips yet; "
    "run --highres without --devices",
}


@dataclass
class ParallelGenerationResult(GenerationResult):
    """``GenerationResult`` of rank 0, plus how the work was split.

    Attributes:
        devices: number of ranks.
        launch: "nccl on cuda" or "gloo on cpu".
        comm_bytes: bytes sent by all ranks together, by kind (halo, text, pooled: per attention
            layer and step; output: the one gather of the final latents per image).
        wall_seconds: the whole call: spawning, model loading on every rank, generation, decoding.
    """

    devices: int = 1
    launch: str = ""
    comm_bytes: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0


# ----------------------------------------------------------------------------- one rank
def _check_scheduler(scheduler) -> None:
    name = type(scheduler).__name__
    if name != "FlowMatchEulerDiscreteScheduler" or scheduler.config.get("stochastic_sampling", False):
        raise ValueError(
            f"--devices needs a token-wise sampler step (the deterministic "
            f"FlowMatchEulerDiscreteScheduler); this pipeline has {name}"
            + (" with stochastic_sampling" if name == "FlowMatchEulerDiscreteScheduler" else "")
            + "; generate on one device"
        )


@dataclass
class StripOutput:
    """What a ``StripPipeline`` call returns, like a diffusers pipeline output."""

    images: object


class StripPipeline:
    """A pipeline whose denoising runs on this rank's strip of latent rows (the family's own loop).

    Attributes are the wrapped pipeline's. ``__call__`` takes the arguments ``generate`` passes
    and needs the transformer ``parallelize``-d with ``strip_input=True`` (``PatchParallelRank``).
    """

    def __init__(self, pipe):
        self.pipe = pipe

    def __getattr__(self, name: str):
        return getattr(self.pipe, name)

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @scheduler.setter
    def scheduler(self, value) -> None:  # cleardit.schedule.sigmas_as_given swaps the wrapped one's
        self.pipe.scheduler = value

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        height: int,
        width: int,
        num_inference_steps: int,
        sigmas: list[float],
        generator,
        max_sequence_length: int,
        guidance_scale: float,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        true_cfg_scale: float = 1.0,
        negative_prompt: str | None = None,
    ):
        """Latents [B, H*W, C] (``output_type="latent"``, every rank) or images (rank 0; None elsewhere)."""
        from ..models import adapter_for, get_handle
        from ..models.strips import ParallelHandle

        pipe = self.pipe
        handle = get_handle(pipe.transformer)
        if not isinstance(handle, ParallelHandle) or not handle.context.strip_input:
            raise ValueError(
                "StripPipeline needs the transformer parallelized with strip_input=True (CLEAR attention); "
                "full attention cannot be split into strips"
            )
        _check_scheduler(pipe.scheduler)
        adapter = adapter_for(pipe.transformer)
        comm = handle.context.comm
        factor = size_factor(pipe)
        rows, cols = height // factor, width // factor
        plan = StripPlan(rows, cols, comm.world, handle.config.radius, handle.config.down_factor)
        device = pipe._execution_device
        # every rank encodes the text itself (cheap, so nothing is broadcast)
        text = adapter.encode_prompt(
            pipe, prompt, images_per_prompt=num_images_per_prompt, text_len=max_sequence_length,
            true_cfg=true_cfg_scale, negative_prompt=negative_prompt,
        )  # fmt: skip
        batch = text["prompt_embeds"].shape[0]
        noise = adapter.initial_noise(
            pipe, batch, height, width, text["prompt_embeds"].dtype, device, generator
        )
        # [B, rows * cols, C]: the same full noise as on one device
        y0, y1 = plan.strip(comm.rank)
        options = adapter.call_options(guidance_scale, true_cfg_scale, negative_prompt, max_sequence_length)
        options.pop("negative_prompt", None)  # encoded above
        # the sigmas are the whole image's (``generate`` sets them with the scheduler's own shift
        # turned off); the pipeline would otherwise shift by the strip's token count
        with sigmas_as_given(pipe):
            strip = pipe(
                **text,
                **options,
                latents=noise[:, y0 * cols : y1 * cols],
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                sigmas=sigmas,
                output_type="latent",
            ).images  # [B, rows_i * cols, C]
        counts = [plan.rows(r) * cols for r in range(comm.world)]
        latents = torch.cat(comm.all_gather(strip, counts, 1, "output", "final latent gather", None), 1)
        if output_type == "latent":
            return StripOutput(latents)
        if comm.rank != 0:
            return StripOutput([None] * latents.shape[0])
        return StripOutput(self.decode(latents, height, width, output_type))

    def decode(self, latents: torch.Tensor, height: int, width: int, output_type: str = "pil"):
        """Packed latents [B, H*W, C] -> images, as the pipeline decodes them."""
        return decode_latents(self.pipe, latents, (height, width), output_type)


class PatchParallelRank:
    """This process's part of a patch-parallel ``generate``: ``generate(..., parallel_rank=this)``.

    ``install`` replaces ``linearize`` (CLEAR weights load into the parallel processors under the
    same names); ``wrap`` replaces the pipeline call. ``counter`` accumulates the bytes this rank
    sends over all images.
    """

    def __init__(self, group=None, timeout_s: float | None = None):
        self.group = group
        self.timeout_s = timeout_s
        self.counter = CommCounter()

    def install(self, transformer, *, config):
        from ..models import adapter_for
        from ..models.strips import parallelize

        split = adapter_for(transformer).strip_latents
        return parallelize(
            transformer,
            config=config,
            group=self.group,
            strip_input=split,
            gather_output=not split,
            counter=self.counter,
            timeout_s=self.timeout_s,
        )

    def wrap(self, pipe):
        """The pipeline each rank calls: a ``StripPipeline`` where the family's latents split into
        strips (``adapter.strip_latents``), else the pipeline itself (every rank runs the whole loop;
        the transformer gathers its output strips every step)."""
        from ..models import adapter_for

        return StripPipeline(pipe) if adapter_for(pipe).strip_latents else pipe


def _rank_main(
    rank: int,
    world: int,
    prompts: list[str],
    config: GenerateConfig,
    model,
    info,
    device_type: str,
    timeout_s: float,
) -> tuple[GenerationResult | None, dict[str, int]]:
    """One spawned rank: ``generate`` on its strip; rank 0 alone prints and writes files."""
    from tqdm.std import tqdm

    # tqdm's default lock is a multiprocessing semaphore, which a rank's hard exit would leak.
    tqdm.set_lock(threading.RLock())
    runner = PatchParallelRank(timeout_s=timeout_s)
    config = config.replace(device=f"cuda:{rank}" if device_type == "cuda" else "cpu")
    if rank != 0:
        config = config.replace(output=None, quiet=True)
    result = generate(prompts, config, model=model, info=info, parallel_rank=runner)
    return (result if rank == 0 else None), runner.counter.by_kind()


# ----------------------------------------------------------------------------- launching
def _launch_backend(device, devices: int) -> tuple[str, str]:
    """(device type, process-group backend) for ``devices`` ranks on ``device`` (cpu/cuda/auto)."""
    dev = resolve_device(device)
    if dev.type == "cpu":
        return "cpu", "gloo"
    if dev.type != "cuda":
        raise ValueError(f"--devices runs on cpu or cuda, got --device {device}")
    if dev.index is not None:
        raise ValueError(
            f"--device {device} names one GPU, but with --devices {devices} rank i runs on cuda:i; "
            "pass --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs"
        )
    visible = torch.cuda.device_count()
    if devices > visible:
        raise ValueError(
            f"--devices {devices} but {visible} CUDA GPU(s) are visible; use --devices {visible} or "
            "fewer, or --device cpu for CPU processes"
        )
    return "cuda", "nccl"


def check_rows(devices: int, height: int, factor: int) -> None:
    """Every rank needs at least one token row: ``devices`` <= height // factor."""
    rows = height // factor
    if rows >= 1 and devices > rows:
        raise ValueError(
            f"--devices {devices} but a {height} px tall image has only {rows} token rows "
            f"({factor} px each) and every device needs at least one; use --devices {rows} or "
            "fewer, or a larger --height"
        )


def user_error(err: ParallelLaunchError) -> str | None:
    """The message of the first rank that failed on a user mistake (bad option, missing file)."""
    for text in err.failures.values():
        kind, sep, rest = text.partition(": ")
        if sep and kind in USER_ERRORS:
            return rest.split("\nTraceback (most recent call last):")[0].strip()
    return None


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def generate_parallel(
    prompt: str | Sequence[str],
    config: GenerateConfig | None = None,
    *,
    devices: int,
    model=None,
    info=None,
    timeout_s: float = 1800.0,
    start_method: str | None = None,
    **options,
) -> GenerationResult:
    """``cleardit.pipelines.generate`` split over ``devices`` local processes (patch-parallel CLEAR).

    Args:
        prompt, config, model, info, **options: as for ``generate`` (``compare`` and ``highres`` are
            refused; the model must be a folder or cached Hugging Face id, or None, since every
            rank loads it).
        devices: ranks; 1 runs ``generate`` in this process. With CUDA one GPU per rank (NCCL,
            rank i on cuda:i, needs ``devices`` visible GPUs); on the CPU, gloo processes with
            ``cpu_count // devices`` threads each. Needs ``devices`` <= image token rows.
        timeout_s: how long a rank may wait for a peer (model loading included) before failing.
        start_method: how the ranks start: None = "forkserver" with torch and diffusers preloaded
            (imported once, not once per rank; sets this process's forkserver preload list if its
            forkserver has not started yet) where available, else "spawn".

    Returns:
        ``ParallelGenerationResult`` (rank 0's images, paths, timings; bytes sent; a summary
        with one more line), or ``generate``'s result for ``devices == 1``.

    Raises:
        ValueError / TypeError: bad options, before anything is spawned when possible, else the
            first rank's message. ParallelLaunchError: a rank crashed or stalled.
    """
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"--devices must be a whole number >= 1, got {devices!r}")
    config = make_config(config, options)
    if devices == 1:
        return generate(prompt, config, model=model, info=info)
    for name, why in UNSUPPORTED.items():
        if getattr(config, name):
            raise ValueError(f"--devices {devices} with --{name} is not supported: {why}")
    if config.radius == 0:
        raise ValueError(
            f"--devices {devices} needs CLEAR attention: full attention (--full / --radius 0) mixes every "
            "token, so it cannot be split into strips; give a --radius > 0 or drop --devices"
        )
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"with devices={devices} every rank loads the model itself: pass a folder or a Hugging Face "
            f"id, not a loaded {type(model).__name__}"
        )
    prompts = prompt_list(prompt)
    if config.output is not None:
        check_writable(output_paths(config.output, prompts, config.batch))
    folder = resolve_model(model)
    problem = folder_adapter(folder).strips_unsupported()
    if problem:  # said before any rank starts and loads the model
        raise ValueError(f"{problem}; run without --devices")
    factor = size_factor_of_folder(folder)
    height = config.height or (info or read_model_info(folder)).base_height
    if factor and height:
        check_rows(devices, height, factor)
    device_type, backend = _launch_backend(config.device, devices)
    if start_method is None:
        start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        if start_method == "forkserver":
            mp.get_context(start_method).set_forkserver_preload(PRELOAD)

    start = time.perf_counter()
    try:
        ranks = spawn(
            _rank_main,
            devices,
            (prompts, config, model, info, device_type, timeout_s),
            timeout_s=timeout_s,
            grace_s=15.0,
            backend=backend,
            start_method=start_method,
            threads=max(1, _cpu_count() // devices) if device_type == "cpu" else 1,
        )
    except ParallelLaunchError as err:
        message = user_error(err)
        if message is not None:
            raise ValueError(message) from err
        raise
    wall = time.perf_counter() - start
    result = ranks[0][0]
    sent = {k: sum(r[1].get(k, 0) for r in ranks) for k in KINDS}
    launch = f"{backend} on {device_type}"
    line = (
        f"patch-parallel: {devices} ranks ({launch}), latents split into row strips once and gathered "
        f"once for the VAE decode on rank 0; {_size(sum(sent.values()))} sent by all ranks (halo "
        f"{_size(sent['halo'])}, text merge {_size(sent['text'])}, pooled {_size(sent['pooled'])}, "
        f"final latents {_size(sent['output'])}); {wall:.1f} s in all with starting and loading"
    )
    fields = {k: getattr(result, k) for k in GenerationResult.__dataclass_fields__}
    fields["summary"] = f"{result.summary}\n{line}"
    return ParallelGenerationResult(
        **fields, devices=devices, launch=launch, comm_bytes=sent, wall_seconds=wall
    )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
