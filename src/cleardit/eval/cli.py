"""``cleardit eval``: ``add_eval_parser(subparsers)`` registers ``eval images``, ``eval model`` and
``eval plot``.

Each subcommand's ``func`` takes the parsed namespace and returns an exit code.
"""

from __future__ import annotations

import argparse
import sys

from ..argtypes import nonneg_int, positive_int
from ..cli_options import (
    add_device_option,
    add_down_factor_option,
    add_dtype_option,
    add_model_option,
    add_radius_option,
)
from .metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, METRIC_NAMES
from .weights import ENV_WEIGHTS_DIR


def _number(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return int(value) if value.is_integer() else value


def cmd_eval_images(args: argparse.Namespace) -> int:
    from .images import evaluate_folders
    from .report import format_table, write_report, write_results

    quiet = bool(args.quiet)

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)

    result = evaluate_folders(
        args.ref,
        args.test,
        args.metrics,
        batch_size=args.batch_size,
        device=args.device,
        weights_dir=args.weights_dir,
        strict=args.strict,
        clip_model=args.clip_model,
        dino_model=args.dino_model,
        progress=not quiet,
        log=log,
    )
    extra = {"radius": args.radius} if args.radius is not None else None
    print(format_table({**result.to_dict(), **(extra or {})}))
    if args.output:
        files = write_results(result, args.output, extra=extra)
        log("wrote " + ", ".join(str(p) for p in files.values()))
    if args.report:
        files = write_report(result, args.report, samples=args.samples, extra=extra)
        log("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def cmd_eval_model(args: argparse.Namespace) -> int:
    from .model import evaluate_model
    from .model_report import format_model_table

    result = evaluate_model(
        args.prompts,
        model=args.model,
        radii=args.radius,
        down_factor=args.down_factor,
        clear_weights=args.clear_weights or (),
        output=args.output,
        metrics=args.metrics,
        limit=args.limit,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        weights_dir=args.weights_dir,
        strict=args.strict,
        clip_model=args.clip_model,
        dino_model=args.dino_model,
        report=args.report,
        samples=args.samples,
        quiet=args.quiet,
        frames=args.frames,
        temporal_radius=args.temporal_radius,
    )
    print(result.markdown if hasattr(result, "markdown") else format_model_table(result.summary))
    if not args.quiet:
        print("wrote " + ", ".join(str(p) for p in result.files.values()), file=sys.stderr)
    return 0


def _add_model_parser(sub) -> None:
    from .model import DEFAULT_OUTPUT

    model = sub.add_parser(
        "model",
        help="generate full-attention (teacher) and CLEAR images of the same prompts, then compare them",
        description=(
            "Generates the teacher (full attention) and CLEAR images of the same prompts and seeds with "
            "cleardit generate's code, then computes the metrics of each CLEAR radius against the teacher "
            "(as eval images does), with attention FLOPs and seconds per image of both. Images already in "
            "--output with the same generation parameters are reused, so an interrupted run continues "
            "where it stopped. See docs/evaluation.md."
        ),
    )
    g = model.add_argument_group("generation")
    g.add_argument(
        "--prompts",
        metavar="FILE",
        default=None,
        help="one prompt per line (default: the 50 bundled prompts written for the mini model)",
    )
    g.add_argument("--limit", type=positive_int, default=None, help="use only the first N prompts")
    add_model_option(g)
    add_radius_option(  # 0 parses so that evaluate_model can say why it is refused
        g, many=True, zero_means_full=True, default_help="the model's CLEAR radius, else 16"
    )
    add_down_factor_option(g)
    g.add_argument(
        "--clear-weights",
        nargs="+",
        metavar="FILE",
        default=None,
        help="CLEAR weights files, each used for the radius it was made for",
    )
    g.add_argument("--height", type=positive_int, default=None, help="pixels (default: base size)")
    g.add_argument("--width", type=positive_int, default=None, help="pixels (default: base size)")
    g.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the model's)")
    g.add_argument(
        "--guidance",
        type=_number,
        default=None,
        help="distilled guidance, FLUX.1 only (default: the model's)",
    )
    g.add_argument("--seed", type=nonneg_int, default=0, help="prompt i uses seed + i (default 0)")
    g.add_argument(
        "--frames",
        type=positive_int,
        default=None,
        help="video families: frames per video (default the family's)",
    )
    g.add_argument(
        "--temporal-radius",
        type=positive_int,
        default=None,
        metavar="RT",
        help="video families: CLEAR's temporal radius in latent frames (default: every frame)",
    )
    add_dtype_option(g)
    g = model.add_argument_group("evaluation")
    g.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        help=f"folder for the images and results, reused across runs (default: {DEFAULT_OUTPUT})",
    )
    g.add_argument(
        "--metrics", default="all", help=f"comma-separated subset of {','.join(METRIC_NAMES)} (default: all)"
    )
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="prompts per generation call (saved after each) and pairs per metric batch (default 8)",
    )
    add_device_option(g)
    g.add_argument("--weights-dir", help=f"folder with metric weights (default: ${ENV_WEIGHTS_DIR})")
    g.add_argument("--clip-model", help=f"CLIP model id or folder (default {DEFAULT_CLIP_MODEL})")
    g.add_argument("--dino-model", help=f"DINO model id or folder (default {DEFAULT_DINO_MODEL})")
    g.add_argument("--strict", action="store_true", help="fail instead of skipping a metric")
    g.add_argument("--report", help="folder for report.md / report.html with a teacher | CLEAR image grid")
    g.add_argument("--samples", type=positive_int, default=8, help="prompts shown in the report grid (8)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    model.set_defaults(func=cmd_eval_model)


def cmd_eval_plot(args: argparse.Namespace) -> int:
    from .report import plot_metrics_vs_radius

    path = plot_metrics_vs_radius(args.results, args.output)
    print(f"wrote {path}")
    return 0


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` (with ``images``, ``model`` and ``plot``) to an argparse sub-parser collection."""
    ev = subparsers.add_parser(
        "eval",
        help="image metrics (PSNR, MS-SSIM, LPIPS, CLIP-I, DINO, FID, IS) of two folders or of a model",
        description="Evaluation metrics. See docs/evaluation.md.",
    )
    ev.set_defaults(func=lambda _args: (ev.print_help(), 0)[1])
    sub = ev.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")

    images = sub.add_parser(
        "images",
        help="metrics between a reference folder and a test folder, images paired by file name",
        description=(
            "Pairs images by file name (png/jpg/webp) and computes paired metrics (psnr, ms_ssim, lpips, "
            "clip_i, dino: mean over pairs) and set metrics (fid: reference vs test set; is: test set). "
            "Learned metrics load weights offline from --weights-dir / $" + ENV_WEIGHTS_DIR + ", the Hugging "
            "Face cache, then the torch hub cache; a metric whose weights are missing is skipped with a "
            "message saying what to fetch and where (--strict: an error instead). With only fid/is asked "
            "for, the folders need not pair (e.g. FID against real photos)."
        ),
    )
    images.add_argument("--ref", required=True, help="folder of reference images (e.g. full attention)")
    images.add_argument("--test", required=True, help="folder of test images (e.g. CLEAR)")
    images.add_argument("--output", help="folder for metrics.json, metrics.md and per_pair.csv")
    images.add_argument(
        "--metrics",
        default="all",
        help=f"comma-separated subset of {','.join(METRIC_NAMES)} (default: all)",
    )
    images.add_argument("--batch-size", type=positive_int, default=8, help="pairs per batch (default 8)")
    add_device_option(images)
    images.add_argument("--weights-dir", help=f"folder with metric weights (default: ${ENV_WEIGHTS_DIR})")
    images.add_argument("--clip-model", help=f"CLIP model id or folder (default {DEFAULT_CLIP_MODEL})")
    images.add_argument("--dino-model", help=f"DINO model id or folder (default {DEFAULT_DINO_MODEL})")
    images.add_argument("--strict", action="store_true", help="fail instead of skipping a metric")
    images.add_argument("--report", help="folder for report.md / report.html with an image grid")
    images.add_argument("--samples", type=positive_int, default=8, help="pairs shown in the report grid (8)")
    add_radius_option(images, default_help="none; recorded in metrics.json, for eval plot")
    images.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    images.set_defaults(func=cmd_eval_images)

    _add_model_parser(sub)

    plot = sub.add_parser(
        "plot",
        help="plot metrics against the CLEAR radius from several metrics.json files",
        description="Each metrics.json needs a radius field (eval images --radius R).",
    )
    plot.add_argument("results", nargs="+", help="metrics.json files")
    plot.add_argument("--output", required=True, help="PNG file to write")
    plot.set_defaults(func=cmd_eval_plot)
    return ev
