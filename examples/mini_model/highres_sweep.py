"""HIGHRES-SWEEP: which high-resolution settings hold the mini model together above its base size.

Runs adherence_bench.py (two-stage rows only above the base, full attention and CLEAR) once per
variant: the --strength noise level, NTK-scaled RoPE, proportional attention, and the shift rule
past the scheduler's max_image_seq_len. The mini model's scheduler reaches it at 4x (4096 tokens),
so the rules only differ at 8x; --rules runs CLEAR only, plain generation and two-stage. Each
variant's JSON goes to --out; the table at the end gives, per size and attention, adherence (% of
facts) and PSNR / MS-SSIM against the upscaled base image.

    python examples/mini_model/highres_sweep.py --n 20        # the strength / NTK / proportional grid
    python examples/mini_model/highres_sweep.py --n 10 --plain  # NTK / proportional, from noise at the target
    python examples/mini_model/highres_sweep.py --n 10 --rules --scales 8   # shift rules at 8x (CLEAR only)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "bench")]  # adherence_bench, and bench/common.py
import adherence_bench  # noqa: E402
from common import print_table  # noqa: E402

from cleardit.argtypes import positive_int, positive_int_list  # noqa: E402
from cleardit.schedule import SHIFT_RULES  # noqa: E402

SETTINGS = {
    "S=0.2": ["--strength", "0.2"],
    "S=0.3": ["--strength", "0.3"],
    "S=0.5": ["--strength", "0.5"],
    "S=0.7": ["--strength", "0.7"],
    "S=0.3 NTK x10": ["--strength", "0.3", "--ntk-factor", "10"],
    "S=0.3 prop. attn": ["--strength", "0.3", "--proportional-attention"],
}
# Generation from noise at the target size (no --highres): do the tricks help there?
PLAIN_SETTINGS = {
    "plain": [],
    "plain NTK x10": ["--ntk-factor", "10"],
    "plain prop. attn": ["--proportional-attention"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=positive_int, default=20, help="held-out prompts per variant (default 20)")
    ap.add_argument("--scales", type=positive_int_list, default=[2, 4], help="sizes above the base (2,4)")
    ap.add_argument("--rules", action="store_true", help="compare the shift rules (at --strength) instead")
    ap.add_argument("--plain", action="store_true", help="NTK / proportional attention without --highres")
    ap.add_argument("--strength", default="0.3", help="the strength of --rules variants (default 0.3)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these variant names")
    ap.add_argument("--out", type=Path, default=Path("out/highres_sweep"))
    args = ap.parse_args(argv)
    if args.rules:
        variants = {
            f"S={args.strength} {r}": ["--strength", args.strength, "--shift-rule", r] for r in SHIFT_RULES
        }
    else:
        variants = dict(PLAIN_SETTINGS if args.plain else SETTINGS)
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only}
    args.out.mkdir(parents=True, exist_ok=True)
    scales = ",".join(str(s) for s in [1, *args.scales])
    results = {}
    for name, extra in variants.items():
        path = args.out / (name.replace(" ", "_").replace("=", "").replace(".", "") + ".json")
        if not path.exists():  # finished variants are kept: an interrupted sweep goes on where it was
            t0 = time.perf_counter()
            argv = ["--n", str(args.n), "--scales", scales, "--json", str(path)]
            if args.rules:  # CLEAR only (full attention at 8x is slow), plain generation and two-stage
                argv += ["--highres", "--clear-only"]
            elif not args.plain:
                argv += ["--highres", "--highres-only"]
            argv += extra
            adherence_bench.main(argv)
            print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        results[name] = json.loads(path.read_text())["rows"]

    rows = []
    for name, variant_rows in results.items():
        for r in variant_rows:
            if r["psnr_vs_base"] is None:  # the base size and the VAE-only rows
                continue
            ms = "-" if r["ms_ssim_vs_base"] is None else f"{r['ms_ssim_vs_base']:.3f}"
            rows.append(
                [name, f"{r['height']}x{r['width']}", r["attention"], f"{r['percent']:.1f}"]
                + [f"{r['psnr_vs_base']:.1f}", ms, f"{r['seconds'] / args.n:.2f}"]
            )
    base = next(r for r in next(iter(results.values())) if r["attention"] == "full")
    print()
    print_table(
        ["variant", "size", "attention", "facts %", "PSNR vs base", "MS-SSIM vs base", "s/image"], rows
    )
    size = f"{base['height']}x{base['width']}"
    print(f"headline: base size {size}, full attention: {base['percent']:.1f}% of facts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
