"""The ``cleardit`` command line: info, flops, check, generate, eval, distill."""

from __future__ import annotations

import argparse
import json
import platform
import sys

from .argtypes import positive_int
from .cli_options import add_down_factor_option, add_radius_option
from .config import DEFAULT_RADIUS

# FLUX.1-dev's attention geometry: pixels per token side (VAE x8, patch x2), 512 T5 tokens,
# 24 heads of 128, 19 double-stream + 38 single-stream blocks.
PIXELS_PER_TOKEN = 16
FLUX_DEV = dict(text_len=512, heads=24, head_dim=128, layers=19 + 38)


def pixels_to_tokens(pixels: int, what: str) -> int:
    """Token count along one side; a clear error (with the nearest valid sizes) if not a multiple of 16."""
    if pixels % PIXELS_PER_TOKEN:
        lo = pixels // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
        hi = lo + PIXELS_PER_TOKEN
        nearest = f"{hi}" if lo == 0 else f"{lo} or {hi}"
        raise ValueError(f"--{what} {pixels} is not a multiple of {PIXELS_PER_TOKEN}; use {nearest}")
    return pixels // PIXELS_PER_TOKEN


def cmd_flops(args: argparse.Namespace) -> int:
    from .attention import TokenLayout, attention_flops, count_pairs
    from .attention.flops import format_flops

    grid_h = pixels_to_tokens(args.height, "height")
    grid_w = pixels_to_tokens(args.width, "width")
    layout = TokenLayout(args.text_len, grid_h, grid_w, down_factor=args.down_factor)
    full = attention_flops(TokenLayout(args.text_len, grid_h, grid_w), None, args.heads, args.head_dim)
    clear = attention_flops(layout, args.radius, args.heads, args.head_dim)
    result = {
        "height_px": args.height,
        "width_px": args.width,
        "grid": [grid_h, grid_w],
        "text_len": args.text_len,
        "radius": args.radius,
        "down_factor": args.down_factor,
        "pairs_full": count_pairs(TokenLayout(args.text_len, grid_h, grid_w), None),
        "pairs_clear": count_pairs(layout, args.radius),
        "flops_per_layer_full": full,
        "flops_per_layer_clear": clear,
        "layers": args.layers,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    name = f"CLEAR r={args.radius}" + (f" df={args.down_factor}" if args.down_factor else "")
    print(
        f"Attention FLOPs at {args.height}x{args.width} px = {grid_h}x{grid_w} image tokens + "
        f"{args.text_len} text tokens ({args.heads} heads x {args.head_dim}, {args.layers} layers)"
    )
    rows = [
        ("allowed pairs", f"{result['pairs_full']:,}", f"{result['pairs_clear']:,}"),
        ("per layer", format_flops(full), format_flops(clear)),
        (f"whole model ({args.layers})", format_flops(full * args.layers), format_flops(clear * args.layers)),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "full attention", "")])
    w2 = max(len(r[2]) for r in rows + [("", "", name)])
    print(f"{'':<{w0}}  {'full attention':>{w1}}  {name:>{w2}}")
    for label, a, b in rows:
        print(f"{label:<{w0}}  {a:>{w1}}  {b:>{w2}}")
    print(
        f"CLEAR computes {100 * (1 - clear / full):.2f}% fewer attention FLOPs ({full / clear:,.1f}x fewer)"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import diffusers
    import torch

    from . import __version__
    from .attention import available_backends, choose_backend
    from .attention.layout import TokenLayout

    print(f"cleardit   {__version__}")
    print(f"python     {platform.python_version()} ({platform.machine()})")
    print(f"torch      {torch.__version__} ({torch.get_num_threads()} CPU threads)")
    print(f"diffusers  {diffusers.__version__}")
    try:
        import triton

        print(f"triton     {triton.__version__}")
    except ImportError:
        print("triton     not installed (GPU kernel unavailable; pip install 'cleardit[gpu]')")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        print(f"GPU        {torch.cuda.get_device_name(0)}")
    else:
        print("GPU        none visible")
    from .models import adapters

    for i, adapter in enumerate(adapters()):
        print(f"{'families' if i == 0 else '':10} {adapter.describe()}")
    example = TokenLayout(512, 128, 128)
    for dev in devices:
        auto = choose_backend(example, torch.device(dev))
        print(f"backends   {dev}: {', '.join(available_backends(dev))} (auto at 2K: {auto})")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .selfcheck import run_check

    return run_check(grid=args.grid, radius=args.radius, reps=args.reps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cleardit",
        description="CLEAR: make pretrained Diffusion Transformers fast at high resolution.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="versions, devices and available attention backends")
    info.set_defaults(func=cmd_info)

    check = sub.add_parser(
        "check", help="self-check: backends agree, and CLEAR vs full timing on a small FLUX"
    )
    check.add_argument("--grid", type=positive_int, default=96, help="token grid side for the timing (96)")
    add_radius_option(check, default=8)
    check.add_argument("--reps", type=positive_int, default=2, help="timed repetitions (2)")
    check.set_defaults(func=cmd_check)

    flops = sub.add_parser(
        "flops",
        help="attention FLOPs of full vs CLEAR attention (FLUX.1-dev geometry by default)",
        description="Exact allowed-pair counts and attention FLOPs (4 * head_dim * heads * pairs).",
    )
    flops.add_argument(
        "--height", type=positive_int, default=1024, help="image height in pixels (default 1024)"
    )
    flops.add_argument(
        "--width", type=positive_int, default=1024, help="image width in pixels (default 1024)"
    )
    add_radius_option(flops, default=DEFAULT_RADIUS)
    add_down_factor_option(flops)
    flops.add_argument("--text-len", type=int, default=FLUX_DEV["text_len"], help="text tokens (default 512)")
    flops.add_argument("--heads", type=positive_int, default=FLUX_DEV["heads"], help="attention heads (24)")
    flops.add_argument("--head-dim", type=positive_int, default=FLUX_DEV["head_dim"], help="head dim (128)")
    flops.add_argument(
        "--layers", type=positive_int, default=FLUX_DEV["layers"], help="attention layers (57)"
    )
    flops.add_argument("--json", action="store_true", help="print JSON instead of a table")
    flops.set_defaults(func=cmd_flops)

    from .commands.generate import add_generate_parser
    from .distill.cli import add_distill_parser
    from .eval.cli import add_eval_parser

    add_generate_parser(sub)
    add_eval_parser(sub)
    add_distill_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"cleardit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
