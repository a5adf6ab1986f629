"""Attention-only distillation of a CLEAR student from its own full-attention teacher.

The student is the model linearized with CLEAR; only the parameters the reference release trains
(image-stream to_q/to_k/to_v/to_out and the pooling weights) are trainable. The teacher is the
same model with its original attention and initial projections (:class:`TeacherView`: no second
copy of the model). Data is the teacher's own samples (:mod:`.teacher_data`).

Scale-out goes through ``accelerate``: one process, several CPU processes (gloo), several GPUs
(DDP or DeepSpeed ZeRO-2 from an accelerate config), mixed precision and gradient accumulation.

Determinism: the samples of step ``s`` (an epoch-wise permutation), their noise and noise levels
are drawn from generators seeded by ``(seed, s, position in the global batch)`` and the learning
rate is a function of ``s``, so a run does not depend on how many processes share a batch, and a
resumed run continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_write_text
from ..config import ClearConfig
from ..models import adapter_for
from ..seeds import derive_seed
from ..training import learning_rate
from .checkpoint import load_checkpoint, save_checkpoint
from .losses import (
    AttentionRecorder,
    LossWeights,
    distillation_loss,
    parse_attention_layers,
    sample_sigma,
)
from .teacher import TeacherView

LOG_FILE = "train_log.json"
DEEPSPEED_STATE = "checkpoint-deepspeed"  # accelerate.save_state folder, DeepSpeed runs only
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class DistillConfig:
    """Everything that decides the trained weights (a resumed run must use the same values).

    Attributes:
        radius, down_factor, backend: the CLEAR student (``ClearConfig``).
        temporal_radius: video families: the student's temporal radius in latent frames (None:
            every frame).
        steps: optimizer steps.
        batch_size: samples per optimizer step over all processes and accumulation steps.
        grad_accum: micro-batches per optimizer step and process.
        lr, weight_decay, warmup_steps, max_grad_norm: AdamW, linear warm-up then constant.
        alpha, beta: weights of the output-distillation and attention-consistency terms.
        attention_layers: the adapter's ``consistency_modules`` (FLUX.1, Chroma: single-stream blocks)
            whose attention outputs are matched ("every:4",
            "none" or "0,4,9").
        seed: data order, noise and noise levels.
        mixed_precision: "no", "bf16" or "fp16" (frozen weights are stored in that dtype;
            trainable ones stay fp32).
    """

    radius: int
    down_factor: int | None = None
    backend: str = "auto"
    steps: int = 500
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    alpha: float = 0.5
    beta: float = 0.5
    attention_layers: str = "every:4"
    seed: int = 0
    mixed_precision: str = "no"
    temporal_radius: int | None = None

    def __post_init__(self):
        for name in ("radius", "steps", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"--mixed-precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )
        rt = self.temporal_radius
        if rt is not None and (isinstance(rt, bool) or not isinstance(rt, int) or rt < 1):
            raise ValueError(f"--temporal-radius must be a whole number >= 1, got {rt!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"--alpha and --beta must be >= 0, got {self.alpha}, {self.beta}")

    def identity(self) -> dict:
        """The values a checkpoint records and a resumed run must match (``temporal_radius`` only when
        set, so image runs checkpointed before it existed still resume)."""
        values = asdict(self)
        if values["temporal_radius"] is None:
            del values["temporal_radius"]
        return values


@dataclass
class RunOptions:
    """How a run is carried out (free to change on ``--resume``)."""

    checkpoint_every: int = 100
    gradient_checkpointing: bool = False
    quiet: bool = False


@dataclass
class DistillResult:
    weights: Path
    steps: int
    seconds: float
    trainable_parameters: int
    frozen_parameters: int
    losses: list[dict] = field(default_factory=list)


def release_file_name(radius: int, down_factor: int | None) -> str:
    """The reference release's naming, so the file is recognised by ``load_weights`` alone."""
    return f"clear_local_{radius}" + (f"_down_{down_factor}" if down_factor else "") + ".safetensors"


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(derive_seed(seed, 1, epoch))
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Dataset indices of the global batch of ``step``: consecutive slices of per-epoch permutations."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(pos, n)
        out.append(_epoch_order(seed, epoch, n)[k])
    return out


def student_config(
    adapter, radius: int, down_factor: int | None, backend: str, temporal_radius: int | None = None
) -> ClearConfig:
    """The ClearConfig the student is linearized with: raster token order where the family's teacher
    cannot follow the tile-major order (``adapter.teacher_keeps_tile_order``), so that the attention
    outputs the consistency loss compares belong to the same tokens."""
    config = ClearConfig(
        radius=radius, down_factor=down_factor, backend=backend, temporal_radius=temporal_radius
    )
    return config if adapter.teacher_keeps_tile_order else replace(config, tile=None)


def load_transformer(model, dtype: torch.dtype) -> tuple[nn.Module, dict, str]:
    """(transformer, scheduler config, name) from a folder / cached id / None / pipeline / transformer."""
    if isinstance(model, nn.Module):
        adapter_for(model)  # a clear error for a model no adapter supports
        return model, {}, type(model).__name__
    if hasattr(model, "transformer") and hasattr(model, "scheduler"):
        return model.transformer, dict(model.scheduler.config), type(model).__name__
    from ..pipelines.loading import folder_adapter, resolve_model

    folder = resolve_model(model)
    adapter = folder_adapter(folder)
    try:
        transformer = adapter.load_transformer(folder, dtype)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load the transformer of {folder}: {exc}") from exc
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text(encoding="utf-8")) if sched_file.is_file() else {}
    return transformer, sched, str(model) if model is not None else "cleardit-mini"


class Distiller:
    """One distillation run in ``output``; ``run()`` trains (or resumes) and exports the weights."""

    def __init__(
        self,
        cfg: DistillConfig,
        data,
        output: str | os.PathLike,
        *,
        model=None,
        resume=False,
        opts: RunOptions | None = None,
    ):
        from accelerate import Accelerator

        self.cfg, self.opts = cfg, opts or RunOptions()
        self.data, self.output = data, Path(output)
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum,
            cpu=not torch.cuda.is_available(),
        )
        acc = self.accelerator
        world = acc.num_processes
        if cfg.batch_size % (world * cfg.grad_accum):
            raise ValueError(
                f"--batch-size {cfg.batch_size} must be a multiple of processes x --grad-accum "
                f"({world} x {cfg.grad_accum} = {world * cfg.grad_accum})"
            )
        self.micro = cfg.batch_size // (world * cfg.grad_accum)
        self.deepspeed = acc.state.deepspeed_plugin is not None
        if self.deepspeed:  # no dataloader is prepared, so DeepSpeed is told the micro-batch here
            ds = acc.state.deepspeed_plugin.deepspeed_config
            if ds.get("gradient_accumulation_steps", cfg.grad_accum) not in (cfg.grad_accum, "auto"):
                raise ValueError(
                    f"the DeepSpeed config accumulates {ds['gradient_accumulation_steps']} micro-batches but "
                    f"--grad-accum is {cfg.grad_accum}; make them equal"
                )
            ds["train_micro_batch_size_per_gpu"] = self.micro
            ds["gradient_accumulation_steps"] = cfg.grad_accum
            ds.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW as the client optimizer
        self.checkpoint = self.output / "checkpoint.pt"
        if self.checkpoint.exists() and not resume:
            raise ValueError(
                f"{self.output} already holds a distillation run; pass --resume to continue it, "
                "or another --output"
            )
        frozen_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            cfg.mixed_precision
        ]
        transformer, self.scheduler_config, self.model_name = load_transformer(model, frozen_dtype)
        transformer.to(acc.device)
        self.adapter = adapter_for(transformer)
        self.adapter.check_conditions(transformer, data[0])
        latents_dims = 4 if self.adapter.video else 3  # [C, F, h, w] or [C, h, w]
        if data[0]["latents"].dim() != latents_dims:
            shape = tuple(data[0]["latents"].shape)
            kind = "video" if len(shape) == 4 else "image"
            raise ValueError(
                f"{data.folder} holds {kind} teacher data (latents {shape}), but this {self.adapter.family} "
                f"model makes {'videos' if self.adapter.video else 'images'}; make the data with the same "
                "--model (cleardit distill data --model ...)"
            )
        if self.adapter.video and not self.scheduler_config:
            raise ValueError(
                "distilling a video model needs its pipeline's scheduler (its noise-level shift): pass the "
                "model folder or the pipeline, not the transformer alone"
            )
        self.guidance = float(data.manifest.get("guidance") or 3.5)
        self._build_student(transformer, frozen_dtype)
        self._resume_state = load_checkpoint(self.checkpoint, cfg.identity()) if resume else None

    def _build_student(self, transformer: nn.Module, frozen_dtype: torch.dtype) -> None:
        from ..models import linearize

        cfg = self.cfg
        transformer.requires_grad_(False)
        if transformer.dtype != frozen_dtype:
            transformer.to(frozen_dtype)
        self.teacher = TeacherView(transformer)
        self.handle = linearize(
            transformer,
            config=student_config(
                self.adapter, cfg.radius, cfg.down_factor, cfg.backend, cfg.temporal_radius
            ),
        )
        self.teacher.freeze_initial(self.handle)  # in the frozen dtype: the original values exactly
        self.named_trainable = list(self.handle.named_clear_parameters())
        for _, p in self.named_trainable:
            p.data = p.data.float()  # fp32 master copies of what is trained
            p.requires_grad_(True)
        if self.opts.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        candidates = self.adapter.consistency_modules(transformer)
        layers = parse_attention_layers(cfg.attention_layers, len(candidates))
        self.recorder = AttentionRecorder(dict(candidates[i] for i in layers))
        self.transformer = transformer
        self.trainable_count = sum(p.numel() for _, p in self.named_trainable)
        self.frozen_count = sum(p.numel() for p in transformer.parameters() if not p.requires_grad)

    # -- one step ----------------------------------------------------------------------------------
    def _inputs(self, positions: list[int], indices: list[int], step: int) -> tuple[dict, torch.Tensor]:
        """Transformer inputs of the samples at ``positions`` of the global batch, and the target."""
        dev = self.accelerator.device
        items = [self.data[i] for i in indices]
        x0 = torch.stack([it["latents"] for it in items]).float()  # [B, C, h, w] or video [B, C, F, h, w]
        seq = x0[0, 0].numel() // 4  # tokens of one sample: 2x2 latent pixels per token
        noise, sigmas = [], []
        for pos in positions:
            g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, 2, step, pos))
            noise.append(torch.randn(x0.shape[1:], generator=g))
            sigmas.append(sample_sigma(g, seq, self.scheduler_config))
        noise = torch.stack(noise)
        sigma = torch.tensor(sigmas, dtype=torch.float32)
        s = sigma.view(-1, *[1] * (x0.dim() - 1))
        x_t = (1 - s) * x0 + s * noise
        target = self.adapter.pack_latents(noise - x0).to(dev)
        conditions = {}
        for name in self.adapter.text_conditions:
            value = torch.stack([it[name] for it in items]).to(dev)
            conditions[name] = value.float() if value.is_floating_point() else value
        inputs = self.adapter.training_inputs(
            self.transformer, x_t.to(dev), sigma.to(dev), conditions, self.guidance
        )
        return inputs, target

    def _step(self, model, optimizer, step: int) -> dict[str, float]:
        acc, cfg = self.accelerator, self.cfg
        lr = learning_rate(cfg.lr, step, warmup=cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = batch_indices(step, cfg.batch_size, len(self.data), cfg.seed)
        per_rank = cfg.batch_size // acc.num_processes
        sums = torch.zeros(4, device=acc.device)
        for a in range(cfg.grad_accum):
            start = acc.process_index * per_rank + a * self.micro
            positions = list(range(start, start + self.micro))
            inputs, target = self._inputs(positions, [indices[p] for p in positions], step)
            with acc.autocast():
                teacher_pred = self.adapter.velocity(self.teacher.run(**inputs))
            teacher_att = self.recorder.take()
            with acc.accumulate(model):
                with acc.autocast():
                    pred = self.adapter.velocity(model(**inputs))
                terms = distillation_loss(
                    pred,
                    teacher_pred,
                    target,
                    self.recorder.take(),
                    teacher_att,
                    LossWeights(cfg.alpha, cfg.beta),
                )
                acc.backward(terms["total"])
                if acc.sync_gradients:
                    acc.clip_grad_norm_([p for _, p in self.named_trainable], cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sums += torch.stack([terms[k].detach().float() for k in ("total", "flow", "output", "attention")])
        mean = acc.reduce(sums / cfg.grad_accum, reduction="mean")
        return {
            "step": step + 1,
            "lr": lr,
            **dict(zip(("loss", "flow", "output", "attention"), mean.tolist(), strict=True)),
        }

    # -- the run -----------------------------------------------------------------------------------
    def _save(self, step: int, optimizer, log: list[dict], seconds: float) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        # DeepSpeed partitions the optimizer state: accelerate writes it; checkpoint.pt then points at it
        ds_state = self._save_deepspeed_state(step) if self.deepspeed else None
        acc.wait_for_everyone()
        if acc.is_main_process:
            params = {} if self.deepspeed else {n: p.detach().cpu().clone() for n, p in self.named_trainable}
            opt_state = {} if self.deepspeed else optimizer.state_dict()
            save_checkpoint(
                self.checkpoint, self.cfg.identity(), step, params, opt_state, log, seconds, ds_state
            )
            if ds_state:
                self._drop_old_deepspeed_states(keep=ds_state)
            atomic_write_text(self.output / LOG_FILE, json.dumps(self._log_doc(log, seconds), indent=1))
        acc.wait_for_everyone()

    def _save_deepspeed_state(self, step: int) -> str:
        """accelerate.save_state into a step-named folder; checkpoint.pt (written after) names it."""
        acc, name = self.accelerator, f"{DEEPSPEED_STATE}-{step:08d}"
        if acc.is_main_process and (self.output / name).exists():
            shutil.rmtree(self.output / name)
        acc.wait_for_everyone()
        acc.save_state(str(self.output / name))
        return name

    def _drop_old_deepspeed_states(self, keep: str) -> None:
        for old in self.output.glob(f"{DEEPSPEED_STATE}-*"):
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def _log_doc(self, log: list[dict], seconds: float) -> dict:
        return {
            "format": "cleardit-distill-log-v1",
            "config": self.cfg.identity(),
            "model": self.model_name,
            "data": str(getattr(self.data, "folder", "")),
            "processes": self.accelerator.num_processes,
            "trainable_parameters": self.trainable_count,
            "frozen_parameters": self.frozen_count,
            "teacher_extra_bytes": self.teacher.extra_bytes,
            "seconds": seconds,
            "steps": log,
        }

    def run(self) -> DistillResult:
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.cfg
        self.output.mkdir(parents=True, exist_ok=True)
        trainable = [p for _, p in self.named_trainable]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        state = self._resume_state
        start, log, seconds = 0, [], 0.0
        if state is not None:
            with torch.no_grad():
                for n, p in self.named_trainable:
                    p.copy_(state["params"][n].to(p.device))
            if not self.deepspeed:
                optimizer.load_state_dict(state["optimizer"])
            start, log, seconds = state["step"], list(state["log"]), float(state["seconds"])
        model, optimizer = acc.prepare(self.transformer, optimizer)
        if state is not None and self.deepspeed:
            acc.load_state(str(self.output / state["deepspeed_state"]))
        stop = {"signal": None}

        def on_signal(signum, frame):  # noqa: ARG001
            stop["signal"] = signum

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(
            total=cfg.steps,
            initial=start,
            desc=f"distill r={cfg.radius}",
            disable=self.opts.quiet or not acc.is_main_process,
            dynamic_ncols=True,
        )
        t0, seconds0, step = time.monotonic(), seconds, start
        try:
            model.train()
            while step < cfg.steps:
                entry = self._step(model, optimizer, step)
                step += 1
                log.append(entry)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{entry['loss']:.4f}", flow=f"{entry['flow']:.4f}", attn=f"{entry['attention']:.4f}"
                )
                seconds = seconds0 + time.monotonic() - t0
                if stop["signal"] is not None:
                    self._save(step, optimizer, log, seconds)
                    raise KeyboardInterrupt(
                        f"stopped by signal {stop['signal']} at step {step}; checkpoint saved, "
                        "run again with --resume to continue"
                    )
                if self.opts.checkpoint_every and step % self.opts.checkpoint_every == 0 and step < cfg.steps:
                    self._save(step, optimizer, log, seconds)
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        self._save(step, optimizer, log, seconds)
        weights = self.export()
        return DistillResult(weights, step, seconds, self.trainable_count, self.frozen_count, log)

    def export(self) -> Path:
        """The trained CLEAR weights in ``save_weights`` format (reference key names), main process."""
        from ..weights import save_weights

        path = self.output / release_file_name(self.cfg.radius, self.cfg.down_factor)
        if self.accelerator.is_main_process:
            save_weights(self.transformer, path)
        self.accelerator.wait_for_everyone()
        return path
