"""The ``cleardit`` command line: info, flops, check, generate, eval, distill, serve."""

from __future__ import annotations

import argparse
import json
import platform
import sys

from .argtypes import nonneg_int, positive_int
from .cli_options import add_down_factor_option, add_radius_option
from .config import DEFAULT_RADIUS
from .model_presets import (
    DEFAULT_FAMILY,
    PRESETS,
    family_names,
    geometry_from_config,
    preset,
    video_family_names,
)


def pixels_to_tokens(pixels: int, what: str, per_token: int = 16, model: str = "") -> int:
    """Token count along one side; a clear error (with the nearest valid sizes) if ``pixels`` is not
    a multiple of ``per_token`` (the model's pixels per token side: VAE factor x patch size)."""
    if pixels % per_token:
        lo = pixels // per_token * per_token
        hi = lo + per_token
        nearest = f"{hi}" if lo == 0 else f"{lo} or {hi}"
        whose = f" ({model}: {per_token} pixels per token side)" if model else ""
        raise ValueError(f"--{what} {pixels} is not a multiple of {per_token}{whose}; use {nearest}")
    return pixels // per_token


FLOPS_OVERRIDES = ("heads", "head_dim", "layers", "image_only_layers", "text_len", "pixels_per_token")


def flops_geometry(args: argparse.Namespace):
    """The model geometry of a ``cleardit flops`` call: --config, else --family (default FLUX.1-dev),
    with every explicit flag (--heads, --head-dim, --layers, ...) replacing the preset's value.
    Returns (geometry, {name: value} of the flags that replaced a value)."""
    base = geometry_from_config(args.config) if args.config else preset(args.family or DEFAULT_FAMILY)
    given = {k: getattr(args, k) for k in FLOPS_OVERRIDES if getattr(args, k) is not None}
    return base.with_overrides(**given), given


def flops_frames(args: argparse.Namespace, geo) -> tuple[int | None, int]:
    """(frames, latent frames) of a ``cleardit flops`` call: (None, 1) for an image model, which
    refuses --frames and --temporal-radius; a video family's default clip is its pipeline's."""
    if not geo.is_video:
        given = [f for f, v in (("--frames", args.frames), ("--temporal-radius", args.temporal_radius)) if v]
        if given:
            raise ValueError(
                f"{' and '.join(given)}: {geo.name} is an image model, it has no frames; for a video "
                f"use --family {' / '.join(video_family_names())}"
            )
        return None, 1
    frames = args.frames or geo.default_frames
    return frames, geo.latent_frames(frames)


def cmd_flops(args: argparse.Namespace) -> int:
    from .attention import TokenLayout, attention_flops, count_pairs
    from .attention.flops import format_flops

    geo, overrides = flops_geometry(args)
    frames, t = flops_frames(args, geo)
    rt = args.temporal_radius
    ppt = geo.pixels_per_token
    grid_h = pixels_to_tokens(args.height, "height", ppt, geo.name)
    grid_w = pixels_to_tokens(args.width, "width", ppt, geo.name)
    heads, head_dim, text_len = geo.heads, geo.head_dim, geo.text_len
    joint_full = TokenLayout(text_len, grid_h, grid_w, frames=t)
    joint_clear = TokenLayout(text_len, grid_h, grid_w, down_factor=args.down_factor, frames=t)
    full = attention_flops(joint_full, None, heads, head_dim)
    clear = attention_flops(joint_clear, args.radius, heads, head_dim, rt)
    # image-only layers (Z-Image's noise refiner, SD3.5-Medium's attn2): CLEAR without text
    image_full = TokenLayout(0, grid_h, grid_w)
    image_clear = TokenLayout(0, grid_h, grid_w, down_factor=args.down_factor)
    only = geo.image_only_layers
    only_full = attention_flops(image_full, None, heads, head_dim) if only else 0
    only_clear = attention_flops(image_clear, args.radius, heads, head_dim) if only else 0
    model_full = full * geo.layers + only_full * only
    model_clear = clear * geo.layers + only_clear * only
    result = {
        "height_px": args.height,
        "width_px": args.width,
        "grid": [t, grid_h, grid_w] if frames else [grid_h, grid_w],
        "text_len": text_len,
        "radius": args.radius,
        "down_factor": args.down_factor,
        "pairs_full": count_pairs(joint_full, None),
        "pairs_clear": count_pairs(joint_clear, args.radius, rt),
        "flops_per_layer_full": full,
        "flops_per_layer_clear": clear,
        "layers": geo.layers,
        "model": geo.name,
        "source": geo.source,
        "heads": heads,
        "head_dim": head_dim,
        "pixels_per_token": ppt,
        "image_only_layers": only,
        "pairs_image_only_full": count_pairs(image_full, None) if only else 0,
        "pairs_image_only_clear": count_pairs(image_clear, args.radius) if only else 0,
        "flops_per_image_only_layer_full": only_full,
        "flops_per_image_only_layer_clear": only_clear,
        "flops_model_full": model_full,
        "flops_model_clear": model_clear,
        "overrides": overrides,
    }
    if frames:
        result.update(frames=frames, latent_frames=t, temporal_radius=rt, video_tokens=t * grid_h * grid_w)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    name = f"CLEAR r={args.radius}" + (f" df={args.down_factor}" if args.down_factor else "")
    if frames:
        name += f" rt={rt if rt else 'all'}"
    layers = f"{geo.layers} layers" + (f" with text + {only} image-only layers" if only else "")
    if args.family or args.config:
        flags = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items())
        per_frame = f", {geo.temporal_compression} frames per latent frame" if frames else ""
        vae = f" and {geo.vae_source}" if geo.vae_source else ""
        print(
            f"{geo.name}: {ppt} px per token side{per_frame}; numbers from {geo.source}{vae}"
            + (f"; replaced on the command line: {flags}" if flags else "")
        )
    if frames:
        print(
            f"Attention FLOPs at {frames} frames of {args.height}x{args.width} px = {t}x{grid_h}x{grid_w} "
            f"video tokens ({t * grid_h * grid_w:,}) + {text_len} text tokens ({heads} heads x {head_dim}, "
            f"{layers}); CLEAR: radius {args.radius} tokens, temporal radius "
            + (f"{rt} latent frames" if rt else "all frames")
        )
    else:
        print(
            f"Attention FLOPs at {args.height}x{args.width} px = {grid_h}x{grid_w} image tokens + "
            f"{text_len} text tokens ({heads} heads x {head_dim}, {layers})"
        )
    rows = [
        ("allowed pairs", f"{result['pairs_full']:,}", f"{result['pairs_clear']:,}"),
        ("per layer", format_flops(full), format_flops(clear)),
    ]
    if only:
        rows += [
            (
                "allowed pairs, image-only",
                f"{result['pairs_image_only_full']:,}",
                f"{result['pairs_image_only_clear']:,}",
            ),
            ("per image-only layer", format_flops(only_full), format_flops(only_clear)),
        ]
    rows.append((f"whole model ({geo.total_layers})", format_flops(model_full), format_flops(model_clear)))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "full attention", "")])
    w2 = max(len(r[2]) for r in rows + [("", "", name)])
    print(f"{'':<{w0}}  {'full attention':>{w1}}  {name:>{w2}}")
    for label, a, b in rows:
        print(f"{label:<{w0}}  {a:>{w1}}  {b:>{w2}}")
    print(
        f"CLEAR computes {100 * (1 - model_clear / model_full):.2f}% fewer attention FLOPs "
        f"({model_full / model_clear:,.1f}x fewer)"
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

    default = PRESETS[DEFAULT_FAMILY]
    flops = sub.add_parser(
        "flops",
        help="attention FLOPs of full vs CLEAR attention (FLUX.1-dev geometry by default)",
        description="Exact allowed-pair counts and attention FLOPs (4 * head_dim * heads * pairs), with "
        "the published geometry of a model family (--family) or of a transformer config.json (--config); "
        "explicit flags replace the preset's values.",
    )
    flops.add_argument(
        "--height", type=positive_int, default=1024, help="image height in pixels (default 1024)"
    )
    flops.add_argument(
        "--width", type=positive_int, default=1024, help="image width in pixels (default 1024)"
    )
    add_radius_option(flops, default=DEFAULT_RADIUS)
    add_down_factor_option(flops)
    model = flops.add_mutually_exclusive_group()
    model.add_argument(
        "--family",
        metavar="NAME",
        help=f"a model's published geometry: {', '.join(family_names())} (default {DEFAULT_FAMILY})",
    )
    model.add_argument(
        "--config",
        metavar="PATH",
        help="a diffusers transformer config.json (or its folder): heads, head dim, layers and patch "
        "size from it, 8 px of VAE per latent pixel, the family's text length",
    )
    flops.add_argument(
        "--text-len",
        type=nonneg_int,
        help=f"text tokens (default: the family's; {default.text_len} for {default.name})",
    )
    flops.add_argument(
        "--heads",
        type=positive_int,
        help=f"attention heads (default: the family's; {default.heads} for {default.name})",
    )
    flops.add_argument(
        "--head-dim",
        type=positive_int,
        help=f"head dim (default: the family's; {default.head_dim} for {default.name})",
    )
    flops.add_argument(
        "--layers",
        type=positive_int,
        help="attention layers over text + image "
        f"(default: the family's; {default.layers} for {default.name})",
    )
    flops.add_argument(
        "--image-only-layers",
        type=nonneg_int,
        help="attention layers over the image tokens alone: Z-Image's noise refiner, SD3.5-Medium's "
        f"attn2 (default: the family's; {default.image_only_layers} for {default.name})",
    )
    flops.add_argument(
        "--pixels-per-token",
        type=positive_int,
        help="image pixels per token side, VAE factor x patch size (default: the family's; "
        f"{default.pixels_per_token} for {default.name})",
    )
    flops.add_argument(
        "--frames",
        type=positive_int,
        help="video families: frames of the clip, 1 + a multiple of the VAE's temporal compression "
        "(default: the family pipeline's, e.g. 81 for Wan)",
    )
    flops.add_argument(
        "--temporal-radius",
        type=positive_int,
        help="video families: CLEAR's temporal radius in latent frames (default: every frame)",
    )
    flops.add_argument("--json", action="store_true", help="print JSON instead of a table")
    flops.set_defaults(func=cmd_flops)

    from .commands.generate import add_generate_parser
    from .distill.cli import add_distill_parser
    from .eval.cli import add_eval_parser
    from .serve.cli import add_serve_parser

    add_generate_parser(sub)
    add_eval_parser(sub)
    add_distill_parser(sub)
    add_serve_parser(sub)
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
