"""``cleardit distill data|train`` (also ``python -m cleardit.distill``, for ``accelerate launch``)."""

from __future__ import annotations

import argparse
import sys

from ..argtypes import nonneg_float, nonneg_int, positive_float, positive_int
from ..cli_options import add_backend_option, add_down_factor_option, add_model_option, add_radius_option


def cmd_distill_train(args: argparse.Namespace) -> int:
    from .teacher_data import TeacherDataset
    from .trainer import DistillConfig, Distiller, RunOptions

    cfg = DistillConfig(
        radius=args.radius,
        down_factor=args.down_factor,
        backend=args.backend,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        alpha=args.alpha,
        beta=args.beta,
        attention_layers=args.attention_layers,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        temporal_radius=args.temporal_radius,
    )
    opts = RunOptions(
        checkpoint_every=args.checkpoint_every,
        gradient_checkpointing=args.gradient_checkpointing,
        quiet=args.quiet,
    )
    data = TeacherDataset(args.data)
    distiller = Distiller(cfg, data, args.output, model=args.model, resume=args.resume, opts=opts)
    try:
        result = distiller.run()
    except KeyboardInterrupt as exc:
        print(f"cleardit distill train: {exc}", file=sys.stderr)
        return 130
    if distiller.accelerator.is_main_process and not args.quiet:
        last = result.losses[-1] if result.losses else {}
        print(
            f"distilled CLEAR r={cfg.radius}"
            + (f" df={cfg.down_factor}" if cfg.down_factor else "")
            + f": {result.steps} steps in {result.seconds:.1f} s on {distiller.accelerator.num_processes} "
            f"process(es); {result.trainable_parameters:,} trainable / {result.frozen_parameters:,} frozen "
            f"parameters; last loss {last.get('loss', float('nan')):.4f} "
            f"(flow {last.get('flow', float('nan')):.4f}, output {last.get('output', float('nan')):.4f}, "
            f"attention {last.get('attention', float('nan')):.4f}) -> {result.weights}"
        )
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    add_model_option(p, role="the teacher")
    p.add_argument("--data", required=True, help="teacher-data folder from `cleardit distill data`")
    p.add_argument(
        "--output", required=True, help="run folder: checkpoint, log, and the exported weights file"
    )
    add_radius_option(p, required=True)
    p.add_argument(
        "--temporal-radius",
        type=positive_int,
        default=None,
        metavar="RT",
        help="video families: the student's temporal radius in latent frames (default: every frame)",
    )
    add_down_factor_option(p)
    add_backend_option(p)
    p.add_argument("--steps", type=positive_int, default=500, help="optimizer steps (500)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="global batch per step (8)")
    p.add_argument(
        "--grad-accum", type=positive_int, default=1, help="micro-batches per step and process (1)"
    )
    p.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW learning rate (1e-4)")
    p.add_argument("--weight-decay", type=nonneg_float, default=0.0)
    p.add_argument("--warmup-steps", type=nonneg_int, default=0)
    p.add_argument("--max-grad-norm", type=positive_float, default=1.0)
    p.add_argument("--alpha", type=nonneg_float, default=0.5, help="output distillation weight (0.5)")
    p.add_argument("--beta", type=nonneg_float, default=0.5, help="attention consistency weight (0.5)")
    p.add_argument(
        "--attention-layers",
        default="every:4",
        help="blocks whose attention outputs the attention loss matches (FLUX.1 and Chroma: the "
        "single-stream blocks): every:N, none, or 0,4,9 (every:4)",
    )
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations (less memory)"
    )
    p.add_argument("--checkpoint-every", type=nonneg_int, default=100, help="steps between checkpoints (100)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_distill_train)


def add_distill_parser(subparsers) -> argparse.ArgumentParser:
    from .teacher_data import add_data_arguments, cmd_distill_data

    distill = subparsers.add_parser(
        "distill", help="distil CLEAR weights from the full-attention model (teacher data, training)"
    )
    sub = distill.add_subparsers(dest="distill_command", metavar="STEP", required=True)
    data = sub.add_parser("data", help="generate the teacher's samples (latents + text embeddings)")
    add_data_arguments(data)
    data.set_defaults(func=cmd_distill_data)
    train = sub.add_parser(
        "train",
        help="fine-tune the attention of the CLEAR student on teacher data",
        description="Single process as is; several with `accelerate launch -m cleardit.distill train ...` "
        "or `torchrun --nproc-per-node N -m cleardit.distill train ...`.",
    )
    add_train_arguments(train)
    return distill


def main(argv: list[str] | None = None) -> int:
    """``python -m cleardit.distill data|train ...`` (the launcher-friendly entry point)."""
    parser = argparse.ArgumentParser(prog="python -m cleardit.distill")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_distill_parser(sub)
    # accept both `python -m cleardit.distill train ...` and `... distill train ...`
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "distill":
        argv = ["distill", *argv]
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"cleardit distill: error: {exc}", file=sys.stderr)
        return 2
