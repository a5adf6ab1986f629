"""``cleardit generate``: ``add_generate_parser(subparsers)`` registers the subcommand.

Its ``func`` takes the parsed namespace and returns an exit code (0 ok, 2 user error).
"""

from __future__ import annotations

import argparse
import functools
import sys

from ..argtypes import nonneg_int, positive_float, positive_int
from ..cli_options import (
    add_backend_option,
    add_device_option,
    add_down_factor_option,
    add_dtype_option,
    add_model_option,
    add_radius_option,
)
from ..pipelines.config import DEFAULT_STRENGTH, GenerateConfig
from ..schedule import DEFAULT_SHIFT_RULE, SHIFT_RULES


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from ..parallel.launch import ParallelLaunchError
    from ..pipelines.generate import generate
    from ..pipelines.loading import ModelNotFoundError
    from ..prompt_list import read_prompts

    run = generate
    if args.devices != 1:
        from ..parallel.generate import generate_parallel

        run = functools.partial(generate_parallel, devices=args.devices)
    try:
        prompts = read_prompts(args.prompts) if args.prompts is not None else [args.prompt]
        result = run(prompts, GenerateConfig.from_args(args), model=args.model)
    except (ModelNotFoundError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"cleardit generate: error: {exc}", file=sys.stderr)
        return 2
    except ParallelLaunchError as exc:  # a rank crashed or stalled: its message, no parent traceback
        print(f"cleardit generate: error: {exc}", file=sys.stderr)
        return 1
    print(result.summary)
    return 0


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``generate`` to an argparse sub-parser collection; returns its parser."""
    gen = subparsers.add_parser(
        "generate",
        help="text-to-image at any resolution with CLEAR attention (supported families, offline)",
        description=(
            "Generate images with a diffusers pipeline of a supported family (cleardit info lists them) "
            "whose attention is replaced by CLEAR "
            "(local attention of radius r on the token grid) at the target size. Models load offline only: "
            "a local folder or a Hugging Face id already in the local cache. PNGs carry all parameters in "
            "their text metadata. See docs/generate.md."
        ),
    )
    g = gen.add_argument_group("model and prompt")
    add_model_option(g)
    p = g.add_mutually_exclusive_group(required=True)
    p.add_argument("--prompt", help="the text prompt")
    p.add_argument("--prompts", metavar="FILE", help="a text file with one prompt per line")

    g = gen.add_argument_group("image")
    g.add_argument(
        "--height",
        type=positive_int,
        default=None,
        help="pixels (multiple of VAE scale x 2; default: base size)",
    )
    g.add_argument(
        "--width",
        type=positive_int,
        default=None,
        help="pixels (multiple of VAE scale x 2; default: base size)",
    )
    g.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="denoising steps (default: the model's, else the family's: 28 FLUX.1, 35 Chroma)",
    )
    g.add_argument(
        "--guidance",
        type=_float,
        default=None,
        help="distilled guidance, FLUX.1 only (default: the model's, else 3.5)",
    )
    g.add_argument(
        "--true-cfg",
        type=_float,
        default=None,
        metavar="SCALE",
        help="classifier-free guidance scale, 1 = off; costs a second transformer pass per step "
        "(default: the model's, else the family's: 1 FLUX.1, 5 Chroma)",
    )
    g.add_argument(
        "--negative-prompt", default="", help="the unconditional prompt of --true-cfg (default: empty)"
    )
    g.add_argument(
        "--seed",
        type=nonneg_int,
        default=0,
        help="seed of the first image; image i uses seed + i (default 0)",
    )
    g.add_argument("--batch", type=positive_int, default=1, help="images per prompt (default 1)")
    add_device_option(g)
    add_dtype_option(g)
    g.add_argument(
        "--output",
        default="outputs",
        help="a folder (NNNNN-<prompt>.png files) or a .png file for one image (default: outputs/)",
    )
    g.add_argument(
        "--vae-tiling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="VAE encode/decode in tiles of its trained size (default: when the image is larger; "
        "keeps colours and bounds memory at very high resolution)",
    )
    g.add_argument(
        "--devices",
        type=positive_int,
        default=1,
        help="split each image over N local processes in row strips (patch-parallel CLEAR): one GPU "
        "per process with CUDA (needs N GPUs), else CPU processes; not with --compare/--highres/--full "
        "(default 1; see docs/parallel.md)",
    )
    g.add_argument(
        "--quiet", action="store_true", help="no progress bars or log lines (the summary still prints)"
    )

    g = gen.add_argument_group("CLEAR attention")
    add_radius_option(g, zero_means_full=True, default_help="the CLEAR weights' radius, else 16")
    g.add_argument("--full", action="store_true", help="original full attention (same as --radius 0)")
    add_down_factor_option(g)
    g.add_argument(
        "--clear-weights",
        metavar="FILE",
        default=None,
        help="CLEAR checkpoint (reference release clear_local_*.safetensors or cleardit save_weights)",
    )
    add_backend_option(g)

    g = gen.add_argument_group("high resolution")
    g.add_argument(
        "--highres",
        action="store_true",
        help="two stages: base size with full attention, upscale, re-noise to --strength, "
        "CLEAR at the target",
    )
    g.add_argument(
        "--strength",
        type=positive_float,
        default=DEFAULT_STRENGTH,
        help="the noise level --highres re-noises the upscaled image to, in (0, 1]: "
        "(1 - S) x image + S x noise; higher = more new detail, less of stage 1 kept "
        f"(default {DEFAULT_STRENGTH})",
    )
    g.add_argument(
        "--shift-rule",
        choices=SHIFT_RULES,
        default=DEFAULT_SHIFT_RULE,
        help="the scheduler's resolution shift past its max_image_seq_len: hold (mu stays at max_shift), "
        "sqrt (shift factor grows with sqrt(tokens), as SD3), linear (diffusers' extrapolation) "
        f"(default {DEFAULT_SHIFT_RULE}; see docs/generate.md)",
    )
    g.add_argument(
        "--upscale",
        choices=("image", "latent"),
        default="image",
        help="what --highres upscales (default: image)",
    )
    g.add_argument("--ntk-factor", type=positive_float, default=None, help="multiply RoPE theta (e.g. 10)")
    g.add_argument(
        "--proportional-attention",
        action="store_true",
        help="softmax scale sqrt(log_base(N)/d), base = training sequence length, N = target's",
    )

    g = gen.add_argument_group("video (Wan, HunyuanVideo 1.5; see docs/video.md)")
    g.add_argument(
        "--frames",
        type=positive_int,
        default=None,
        help="frames per video, 1 + k x the VAE's temporal factor (Wan, HunyuanVideo 1.5: 1 + 4k; default "
        "the family's: 81, 121); writes NNNNN-<prompt>.mp4 with a .gif preview and a .json sidecar",
    )
    g.add_argument(
        "--temporal-radius",
        type=positive_int,
        default=None,
        metavar="RT",
        help="CLEAR's temporal radius in latent frames: a query sees keys with "
        "dt²/RT² + (dy² + dx²)/r² < 1 (default: every frame)",
    )
    g.add_argument(
        "--fps", type=positive_int, default=16, help="frame rate of the written videos (default 16)"
    )

    g = gen.add_argument_group("comparison")
    g.add_argument(
        "--compare",
        action="store_true",
        help="also run full attention on the same seeds; write *-full.png and a side-by-side *-compare.png "
        "with timings, speedup, attention FLOPs, PSNR and MS-SSIM",
    )
    g.add_argument("--warmup", action="store_true", help="one untimed 1-step run per attention mode first")
    gen.set_defaults(func=cmd_generate)
    return gen
