"""Correctness first: GPU backends (compiled Triton kernel, compiled FlexAttention) vs the fp32
reference on the foundation issue's shape list, forward (out, lse) and gradients (q, k, v, pooling
weights); then a tiny FLUX model linearized with each backend vs the reference backend.

Exit status 1 if the Triton kernel fails anything (bench/gpu_suite.sh then times FlexAttention
instead). --dry-run checks two cases on the CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument(
        "--quick", action="store_true", help="4 cases, bf16 triton only (each shape compiles anew)"
    )
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from common import machine_header, print_table

    import cleardit
    from cleardit.models.tiny import flux_inputs, tiny_flux_transformer
    from tests.helpers import CASES, case_id, compare_backend

    device = "cpu" if args.dry_run else "cuda"
    print(machine_header(device))
    checks = []  # (backend, dtype, dim)
    if args.dry_run:
        cases = CASES[:2]
        checks = [("triton", torch.float32, 16)]
    elif args.quick:
        cases = [CASES[i] for i in (2, 4, 8, 11)]
        checks = [("triton", torch.bfloat16, 128), ("triton", torch.float32, 64)]
    else:
        cases = CASES
        checks = [
            ("triton", torch.float32, 64),
            ("triton", torch.bfloat16, 128),
            ("triton", torch.float16, 64),
            ("flex", torch.float32, 64),
        ]
    tolerance = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
    rows, triton_ok = [], True
    for backend, dtype, dim in checks:
        failures = []
        for case in cases:
            try:
                compare_backend(case, backend, dtype=dtype, atol=tolerance[dtype], device=device, dim=dim)
                print(f"ok   {backend} {dtype} d={dim} {case_id(case)}", flush=True)
            except Exception as exc:  # report every failing case, keep going
                failures.append(f"{case_id(case)}: {str(exc).splitlines()[0][:160]}")
        rows.append(
            [backend, str(dtype).replace("torch.", ""), dim, len(cases) - len(failures), len(failures)]
        )
        for f in failures:
            print(f"FAIL {backend} {dtype} d={dim} {f}")
        if backend == "triton" and failures:
            triton_ok = False

    # A linearized tiny FLUX transformer: every backend against the reference backend.
    model = tiny_flux_transformer(num_attention_heads=2, attention_head_dim=64, axes_dims_rope=(16, 24, 24))
    model = model.to(device)
    grid = (13, 18) if args.dry_run else (40, 56)
    inputs = flux_inputs(model, *grid, text_len=7, batch=2, device=device)
    outs = {}
    for backend in ["reference", "triton"] + ([] if args.dry_run else ["flex"]):
        try:
            handle = cleardit.linearize(model, radius=6, down_factor=2, backend=backend)
            with torch.no_grad():
                outs[backend] = model(**inputs).sample
            handle.restore()
        except Exception:
            traceback.print_exc()
            if backend == "triton":
                triton_ok = False
    for backend, out in outs.items():
        if backend == "reference":
            continue
        err = (out - outs["reference"]).abs().max().item()
        ok = err < 1e-3
        rows.append([f"FLUX {grid[0]}x{grid[1]} {backend}", "float32", 64, int(ok), int(not ok)])
        print(f"tiny FLUX {backend}: max |out - reference| = {err:.2e}")
        if backend == "triton" and not ok:
            triton_ok = False
    print_table(["backend", "dtype", "head dim", "cases passed", "failed"], rows)
    print(f"headline: triton kernel {'PASSES' if triton_ok else 'FAILS'} every correctness check")
    return 0 if triton_ok else 1


if __name__ == "__main__":
    sys.exit(main())
