"""ATTN-CPU (shared/BENCHMARKS.md): one CLEAR attention call on the CPU vs dense SDPA and FlexAttention.

fp32, batch 1, 4 heads, d=128, text T=256, image grids 128x128 and 192x192, r in {8, 16}.
Contenders, measured alternately after a warm-up (medians):
  cleardit  clear_attention(..., backend="auto")  (what auto picks is printed; "tiled" on the CPU)
  dense     F.scaled_dot_product_attention over all N tokens, no mask
  flex      FlexAttention compiled (torch.compile), same rule (cleardit.attention.flex)
"Useful GFLOP/s" = 4 * d * heads * (allowed pairs) / time; dense SDPA's is 4 * d * heads * N^2 / time.
Forward+backward (dense vs cleardit; FlexAttention has no CPU backward) is timed for the first
grid/radius by default. Correctness of every timed backend is checked against the reference first.

  python bench/attention_cpu.py            # full run (minutes: flex builds and compiles per radius)
  python bench/attention_cpu.py --quick    # 128x128, r=8, forward, no flex: < 60 s on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    OtherLoad,
    alternate,
    errors_vs_reference,
    fmt_ms,
    machine_header,
    max_abs_error,
    print_table,
)

from cleardit.attention import TokenLayout, choose_backend, clear_attention, count_pairs  # noqa: E402

HEADS, DIM, TEXT = 4, 128, 256
CHECK_TOL = 1e-4
# torch's create_block_mask, built eagerly (as cleardit.attention.flex does on the CPU), evaluates
# the mask on all N^2 (query, key) pairs at once: measured peak ~22 bytes per pair (6 GB at
# 128x128), so 192x192 would need ~30 GB. --flex-bytes-per-pair 0 turns the check off.
FLEX_BYTES_PER_PAIR = 22


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_flex():
    """(callable, None) or (None, reason)."""
    try:
        from cleardit.attention.flex import flex_clear_attention
    except Exception as exc:  # noqa: BLE001 - any import problem means "no flex column"
        return None, f"cleardit.attention.flex not importable ({type(exc).__name__}: {exc})"

    def run(q, k, v, layout, radius, scale):
        try:
            return flex_clear_attention(q, k, v, layout, radius, None, None, scale, False, compile=True)[0]
        except TypeError:  # an older signature without the compile switch
            os.environ["CLEARDIT_FLEX_COMPILE"] = "1"
            return flex_clear_attention(q, k, v, layout, radius, None, None, scale, False)[0]

    return run, None


def inputs(layout, requires_grad=False, seed=0, heads=HEADS, dim=DIM):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1, heads, layout.seq_len, dim, generator=g).requires_grad_(requires_grad)
        for _ in range(3)
    ]


def check_correctness(backend, radii, flex, with_grad):
    """Max abs error of the timed backends vs the reference at a small size; abort when too large."""
    rows, worst, dim = [], 0.0, 32
    for radius in radii:
        layout = TokenLayout(24, 30, 26)  # grid not divisible by the tiles, several border regions
        q, k, v = inputs(layout, requires_grad=with_grad, seed=1, heads=2, dim=dim)
        errs, ref = errors_vs_reference(q, k, v, layout, radius, backend, with_grad)
        rows.append([f"{backend} r={radius}", *(f"{name} {e:.2e}" for name, e in errs.items())])
        worst = max(worst, *errs.values())
        if flex is not None:
            with torch.no_grad():
                f_out = flex(q.detach(), k.detach(), v.detach(), layout, radius, dim**-0.5)
            e = max_abs_error(f_out, ref)
            rows.append([f"flex r={radius}", f"out {e:.2e}"])
            worst = max(worst, e)
    for row in rows:
        print("check: " + ", ".join(row))
    if worst > CHECK_TOL:
        print(f"ABORT: max abs error {worst:.3g} > {CHECK_TOL:g}; not timing a wrong kernel")
        sys.exit(1)
    print(f"check: max abs error {worst:.2e} <= {CHECK_TOL:g} (small problem, T=24, 30x26 grid)")


def time_forward(grid, radii, flex, backend, reps, flex_bytes_per_pair=FLEX_BYTES_PER_PAIR):
    """Rows of the forward table for one grid; also (grid, r, speedup, useful ratio) of its first radius."""
    scale = DIM**-0.5
    layout = TokenLayout(TEXT, grid, grid)
    n = layout.seq_len
    q, k, v = inputs(layout)
    contenders = {"dense": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)}
    for r in radii:
        contenders[f"cleardit r={r}"] = lambda r=r: clear_attention(q, k, v, layout, r, scale=scale)
    flex_setup = {}
    need, have = flex_bytes_per_pair * n * n, available_memory()
    if flex is not None and have is not None and need > 0.8 * have:
        print(
            f"flex: skipped at {grid}x{grid}: building its block mask needs ~{need / 2**30:.0f} GiB "
            f"(create_block_mask evaluates all N^2 pairs), {have / 2**30:.0f} GiB available"
        )
        flex = None
    if flex is not None:
        for r in radii:
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    flex(q, k, v, layout, r, scale)  # builds the block mask and compiles
            except Exception as exc:  # noqa: BLE001
                print(f"flex: skipped at {grid}x{grid} r={r}: {type(exc).__name__}: {exc}")
                continue
            flex_setup[r] = time.perf_counter() - t0
            contenders[f"flex r={r}"] = lambda r=r: flex(q, k, v, layout, r, scale)
    with torch.no_grad():
        times = alternate(contenders, reps=reps, warmup=1)
    print(f"{grid}x{grid} forward medians (ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in times.items()))

    dense_t = times["dense"]
    dense_gf = 4 * DIM * HEADS * n * n / dense_t / 1e9
    g = f"{grid}x{grid}"
    rows = [[g, "-", "dense SDPA", fmt_ms(dense_t), "1.00x", f"{dense_gf:.1f}", "1.00", ""]]
    first = None
    for r in radii:
        pairs = count_pairs(layout, r)
        t = times[f"cleardit r={r}"]
        useful = 4 * DIM * HEADS * pairs / t / 1e9
        tf = times.get(f"flex r={r}")
        vs_flex = f"{tf / t:.2f}x" if tf is not None else "n/a"
        rows.append(
            [g, r, f"cleardit ({backend})", fmt_ms(t), f"{dense_t / t:.2f}x", f"{useful:.1f}",
             f"{useful / dense_gf:.2f}", vs_flex]
        )  # fmt: skip
        first = first or (grid, r, dense_t / t, useful / dense_gf)
        if tf is not None:
            useful_f = 4 * DIM * HEADS * pairs / tf / 1e9
            rows.append(
                [g, r, f"flex (compiled; setup {flex_setup[r]:.0f} s)", fmt_ms(tf), f"{dense_t / tf:.2f}x",
                 f"{useful_f:.1f}", f"{useful_f / dense_gf:.2f}", "1.00x"]
            )  # fmt: skip
    return rows, first


def time_backward(grid, r, backend, reps):
    """Rows of the forward+backward table: dense SDPA vs cleardit on one problem."""
    scale = DIM**-0.5
    layout = TokenLayout(TEXT, grid, grid)
    n = layout.seq_len
    q, k, v = inputs(layout, requires_grad=True)
    w = torch.randn(1, HEADS, n, DIM)

    def dense_step():
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        torch.autograd.grad((out * w).sum(), (q, k, v))

    def clear_step():
        out = clear_attention(q, k, v, layout, r, scale=scale)
        torch.autograd.grad((out * w).sum(), (q, k, v))

    times = alternate({"dense": dense_step, "cleardit": clear_step}, reps=reps, warmup=1)
    print(
        f"{grid}x{grid} r={r} fwd+bwd medians (ms): "
        + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in times.items())
    )
    pairs = count_pairs(layout, r)
    # forward + backward: 4 + 10 = 14 d FLOPs per pair (the backward recomputes the scores)
    dense_gf = 14 * DIM * HEADS * n * n / times["dense"] / 1e9
    useful = 14 * DIM * HEADS * pairs / times["cleardit"] / 1e9
    g, t = f"{grid}x{grid}", times["cleardit"]
    return [
        [g, "-", "dense SDPA", fmt_ms(times["dense"]), "1.00x", f"{dense_gf:.1f}", "1.00"],
        [g, r, f"cleardit ({backend})", fmt_ms(t), f"{times['dense'] / t:.2f}x", f"{useful:.1f}",
         f"{useful / dense_gf:.2f}"],
    ]  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="128,192", help="comma-separated square grid sides (tokens)")
    ap.add_argument("--radius", default="8,16", help="comma-separated radii")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds per contender (after 1 warm-up)")
    ap.add_argument("--quick", action="store_true", help="128x128, r=8, forward only, no flex, 3 reps")
    ap.add_argument(
        "--no-flex", action="store_true", help="skip FlexAttention (block mask + compile are slow)"
    )
    ap.add_argument(
        "--flex-bytes-per-pair",
        type=float,
        default=FLEX_BYTES_PER_PAIR,
        help="memory FlexAttention's block-mask build needs per (query, key) pair; skip flex where "
        "it exceeds 80%% of available memory (0: never skip)",
    )
    ap.add_argument(
        "--backward",
        default="first",
        choices=["first", "all", "none"],
        help="which problems get fwd+bwd timing",
    )
    args = ap.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines show up even when piped
    if args.quick:
        args.grid, args.radius, args.reps, args.no_flex, args.backward = "128", "8", 3, True, "none"
    grids = [int(g) for g in args.grid.split(",")]
    radii = [int(r) for r in args.radius.split(",")]
    device = torch.device("cpu")
    start = time.perf_counter()

    print(
        "ATTN-CPU: one attention call, fp32, batch 1, "
        f"{HEADS} heads, d={DIM}, text {TEXT}, grids {grids}, r {radii}"
    )
    print(machine_header(device))
    flex, why_not = (
        (None, "--no-flex" + (" (--quick)" if args.quick else "")) if args.no_flex else load_flex()
    )
    if flex is None:
        print(f"flex: skipped: {why_not}")
    backend = choose_backend(TokenLayout(TEXT, grids[0], grids[0]), device)
    print(f"cleardit auto backend on this problem: {backend}")
    check_correctness(backend, radii, flex, with_grad=args.backward != "none")

    rows, bwd_rows, headline = [], [], None
    others = OtherLoad()
    for gi, grid in enumerate(grids):
        fwd, first = time_forward(grid, radii, flex, backend, args.reps, args.flex_bytes_per_pair)
        rows += fwd
        headline = headline or first
        for r in radii:
            if args.backward == "all" or (args.backward == "first" and gi == 0 and r == radii[0]):
                bwd_rows += time_backward(grid, r, backend, max(2, args.reps // 2))

    header = ["grid", "r", "contender", "ms", "vs dense", "useful GFLOP/s", "/ dense GFLOP/s"]
    print("\nforward (no grad):")
    print_table(header + ["cleardit vs flex"], rows)
    if bwd_rows:
        print("\nforward + backward (GFLOP/s counted as 14 d per pair):")
        print_table(header, bwd_rows)
    share = others.share()
    busy = "" if share is None else f"; other processes used {100 * share:.0f}% of the CPUs meanwhile"
    print(f"\ntotal {time.perf_counter() - start:.0f} s{busy}")
    if share is not None and share > 0.1:
        print(
            "warning: the machine was busy; cleardit's many short kernel calls lose more than one long "
            "dense call when another process takes a core (each parallel region waits for its slowest "
            "thread), so its ratios here are pessimistic"
        )
    grid, r, speedup, ratio = headline
    print(
        f"headline: at {grid}x{grid} r={r} cleardit ({backend}) forward is {speedup:.2f}x faster "
        f"than dense SDPA; useful GFLOP/s = {ratio:.2f} of dense SDPA's"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
