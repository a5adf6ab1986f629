"""MINI-ADHERENCE: prompt adherence of the mini model at its base size and at 2x / 4x, full attention
vs CLEAR r=8, measured on generated images.

Prompts are held-out scenes (``mini_lab.trainer.heldout_scenes``: a scene stream the trainer
never trains on); image i of every row uses the same prompt and generator seed ``seed + i``, so the
rows differ only in resolution and attention. Every image is made by ``cleardit.generate`` (the model
loaded once) and scored by ``mini_lab.adherence`` (shapes limited to the three the model was
trained on). Scores: "facts" = mean fraction of the caption's facts an image satisfies; "strict" =
images with every fact right; then the rate per kind of fact, and the shape rate of small and of
large objects apart (HISTORY.md, round 10: small objects are where shapes fail). A "VAE
only" row per resolution encodes and decodes the rendered scene itself: the ceiling the decoder
allows.

Square sizes are base * scale (128, 256, 512 px for the shipped model). With ``--highres`` the
rows above the base size also run the two-stage recipe, with full attention and with CLEAR at the
target (stage 1 near the base size with full attention, re-noised to ``--strength``; see
docs/generate.md); ``--highres-only`` drops the plain rows there. ``--strength``, ``--shift-rule``,
``--ntk-factor`` and ``--proportional-attention`` are generate's options for the rows above the base.
Every row above the base also says how faithful it is to the base-size full-attention image of the
same prompt and seed, upscaled (Lanczos): PSNR and MS-SSIM ("vs base").

    python examples/mini_model/adherence_bench.py          # shipped model, 20 prompts, 20 steps, 1x 2x 4x
    python examples/mini_model/adherence_bench.py --quick  # 4 prompts, 8 steps, 1x 2x: < 60 s on 2 cores
    python examples/mini_model/adherence_bench.py --model DIR --n 50 --highres --json out/adherence.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "bench")]  # mini_lab, and bench/common.py
from common import machine_header, print_table  # noqa: E402
from mini_lab.adherence import adherence  # noqa: E402
from mini_lab.dataset import BASIC_SHAPES, render  # noqa: E402
from mini_lab.trainer import heldout_scenes, summarize_adherence  # noqa: E402

from cleardit.argtypes import positive_int, positive_int_list  # noqa: E402
from cleardit.image_grid import write_image_grid  # noqa: E402
from cleardit.image_metrics import ms_ssim_images as ms_ssim  # noqa: E402
from cleardit.image_metrics import psnr_images as psnr  # noqa: E402
from cleardit.pipelines import generate  # noqa: E402
from cleardit.pipelines import highres as hr  # noqa: E402
from cleardit.pipelines.config import DEFAULT_STRENGTH  # noqa: E402
from cleardit.pipelines.loading import (  # noqa: E402
    ModelNotFoundError,
    base_size,
    load_pipeline,
    read_model_info,
    resolve_model,
)
from cleardit.schedule import DEFAULT_SHIFT_RULE, SHIFT_RULES  # noqa: E402

KINDS = ("object present", "shape", "size", "background colours", "background pattern")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def vae_roundtrip(pipe, scenes, height: int, width: int) -> list:
    """Adherence of the rendered scenes after a VAE encode + decode (no diffusion), tiled as
    ``generate`` tiles by default (above the VAE's trained size)."""
    vae = pipe.vae
    out = []
    with torch.no_grad(), hr.vae_tiles(vae, hr.wants_vae_tiles(vae, height, width, None)):
        for s in scenes:
            img = render(s, height, width)
            x = torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)[None]
            x = x.to(vae.device, vae.dtype)
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample[0].float().clamp(-1, 1).cpu()
            out.append(adherence(rec, s, shapes=BASIC_SHAPES))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="pipeline folder (default: the shipped mini model)")
    ap.add_argument("--n", type=positive_int, default=None, help="held-out prompts (default 20; --quick 4)")
    ap.add_argument(
        "--steps", type=positive_int, default=None, help="denoising steps (default 20; --quick 8)"
    )
    ap.add_argument(
        "--scales",
        type=positive_int_list,
        default=None,
        help="sizes as multiples of the base (default 1,2,4)",
    )
    ap.add_argument("--radius", type=positive_int, default=8, help="CLEAR radius in tokens (default 8)")
    ap.add_argument("--seed", type=int, default=0, help="held-out scene stream and first generator seed")
    ap.add_argument(
        "--highres", action="store_true", help="also the two-stage recipe above the base (full and CLEAR)"
    )
    ap.add_argument(
        "--highres-only", action="store_true", help="with --highres: no plain rows above the base"
    )
    ap.add_argument(
        "--clear-only", action="store_true", help="no full-attention rows above the base (they are slow)"
    )
    ap.add_argument("--strength", type=float, default=DEFAULT_STRENGTH, help="--highres noise level")
    ap.add_argument("--shift-rule", choices=SHIFT_RULES, default=DEFAULT_SHIFT_RULE)
    ap.add_argument("--ntk-factor", type=float, default=None, help="RoPE theta factor above the base")
    ap.add_argument("--proportional-attention", action="store_true", help="above the base")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="4 prompts, 8 steps, scales 1,2")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ap.add_argument(
        "--grid",
        type=Path,
        default=None,
        help="also save a PNG grid: the first --grid-images prompts (columns), the rendered scene and "
        "every size x attention row",
    )
    ap.add_argument("--grid-images", type=positive_int, default=6)
    ap.add_argument("--grid-tile", type=positive_int, default=192, help="tile side in the grid (px)")
    args = ap.parse_args(argv)
    n = args.n or (4 if args.quick else 20)
    steps = args.steps or (8 if args.quick else 20)
    scales = args.scales or ([1, 2] if args.quick else [1, 2, 4])

    try:
        folder = resolve_model(args.model)
    except (ModelNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = read_model_info(folder)
    device = torch.device(args.device)
    pipe = load_pipeline(folder, device, torch.float32, progress=False)
    base_h, base_w = base_size(pipe, info)
    scenes = heldout_scenes(n, args.seed)
    prompts = [s.caption() for s in scenes]

    print(machine_header(device))
    options = dict(
        strength=args.strength,
        shift_rule=args.shift_rule,
        ntk_factor=args.ntk_factor,
        proportional_attention=args.proportional_attention,
    )
    print(
        f"model: {folder}; {n} held-out prompts (seed {args.seed}), {steps} steps, base {base_h}x{base_w}, "
        f"CLEAR r={args.radius}; above the base: {options}"
    )
    rows, results = [], []
    k = min(args.grid_images, n)
    grid_rows = [("scene", [render(s, base_h) for s in scenes[:k]])]

    base_images = None  # the base-size full-attention images, which the larger rows are held against
    upscaled = {}  # size -> base_images resized to it, made once for all rows of that size

    def add(size, label, scored, seconds, images=None):
        s = summarize_adherence(scored)
        faithful = {"psnr_vs_base": None, "ms_ssim_vs_base": None}
        if images is not None and base_images is not None and size != (base_h, base_w):
            if size not in upscaled:
                upscaled[size] = [b.resize((size[1], size[0]), Image.LANCZOS) for b in base_images]
            ups = upscaled[size]
            faithful["psnr_vs_base"] = float(
                np.mean([psnr(u, im) for u, im in zip(ups, images, strict=True)])
            )
            values = [ms_ssim(u, im)[0] for u, im in zip(ups, images, strict=True)]
            if None not in values:
                faithful["ms_ssim_vs_base"] = float(np.mean(values))
        per_image = f"{seconds / n:.2f}" if seconds is not None else "-"
        rows.append(
            [f"{size[0]}x{size[1]}", label, f"{s['percent']:.1f}", f"{s['strict_percent']:.1f}"]
            + [f"{s['by_fact_percent'][k]:.0f}" for k in KINDS]
            + [
                " / ".join(
                    _percent(s["by_object_size_percent"][z][k]) for k in ("object present", "shape", "size")
                )
                for z in ("small", "large")
            ]
            + [
                "-" if faithful["psnr_vs_base"] is None else f"{faithful['psnr_vs_base']:.1f}",
                "-" if faithful["ms_ssim_vs_base"] is None else f"{faithful['ms_ssim_vs_base']:.3f}",
                per_image,
            ]
        )
        results.append(
            {"height": size[0], "width": size[1], "attention": label, **s, **faithful, "seconds": seconds}
        )

    for scale in scales:
        h, w = base_h * scale, base_w * scale
        add((h, w), "VAE only", vae_roundtrip(pipe, scenes, h, w), None)
        modes = [("full", 0, False), (f"CLEAR r={args.radius}", args.radius, False)]
        if args.highres and scale > 1:
            if args.highres_only:
                modes = []
            modes += [("full + highres", 0, True), (f"CLEAR r={args.radius} + highres", args.radius, True)]
        if args.clear_only and scale > 1:
            modes = [m for m in modes if m[1] > 0]
        for label, radius, highres in modes:
            t0 = time.perf_counter()
            res = generate(
                prompts,
                model=pipe,
                info=info,
                height=h,
                width=w,
                steps=steps,
                seed=args.seed,
                radius=radius,
                highres=highres,
                quiet=True,
                **(options if scale > 1 else {}),
            )
            seconds = time.perf_counter() - t0
            scored = [adherence(im, s, shapes=BASIC_SHAPES) for im, s in zip(res.images, scenes, strict=True)]
            if scale == 1 and radius == 0:
                base_images = res.images
            add((h, w), label, scored, seconds, res.images)
            grid_rows.append((f"{h}x{w} {label}", res.images[:k]))
            print(
                f"  {h}x{w} {label}: {rows[-1][2]}% of facts ({seconds:.0f} s)", file=sys.stderr, flush=True
            )

    print()
    print_table(
        [
            "size",
            "attention",
            "facts %",
            "strict %",
            "present",
            "shape",
            "size",
            "bg colours",
            "bg pattern",
            "small: present / shape / size",
            "large: present / shape / size",
            "PSNR vs base",
            "MS-SSIM vs base",
            "s/image",
        ],
        rows,
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"model": str(folder), "n": n, "steps": steps, "rows": results}, indent=2)
        )
    if args.grid is not None:
        write_image_grid(
            args.grid,
            [images for _, images in grid_rows],
            row_labels=[label for label, _ in grid_rows],
            cell=(args.grid_tile, args.grid_tile),
        )
        print(f"grid: {args.grid}")
    top = max(scales)
    by = {(r["height"], r["attention"]): r["percent"] for r in results}
    suffix = " + highres" if args.highres and top > 1 and args.highres_only else ""
    full = by.get((base_h * top, "full" + suffix), float("nan"))
    clear = by[(base_h * top, f"CLEAR r={args.radius}" + suffix)]
    print(
        f"headline: at {top}x base ({base_h * top}x{base_w * top}{suffix}) CLEAR r={args.radius} keeps "
        f"{clear:.1f}% of the prompts' facts vs {full:.1f}% with full attention (base size, full attention: "
        f"{by[(base_h, 'full')]:.1f}%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
