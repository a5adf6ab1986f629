"""ATTN-CPU-3D (issue 28): one CLEAR video attention call on the CPU vs dense SDPA and FlexAttention.

fp32, batch 1, 4 heads, d=128, no text (Wan's self-attention: its text is cross-attention), a
13 x 30 x 52 latent grid (Wan 480p geometry at 49 frames: 20,280 tokens), r=8 with rt=2 and
rt=None (every frame). Contenders, measured alternately after a warm-up (medians):
  cleardit  clear_attention(..., temporal_radius=rt, backend="auto")  ("tiled" on the CPU)
  dense     F.scaled_dot_product_attention over all N tokens, no mask
  flex      FlexAttention compiled (torch.compile), same rule (cleardit.attention.flex), as ATTN-CPU
"Useful GFLOP/s" = 4 * d * heads * (allowed pairs) / time; dense SDPA's is 4 * d * heads * N^2 / time.
Forward+backward (dense vs cleardit; FlexAttention has no CPU backward) is timed for the first
temporal radius. Correctness of every timed backend is checked against the reference first.

  python bench/attention_cpu_3d.py            # full run (minutes: dense takes seconds per call)
  python bench/attention_cpu_3d.py --quick    # rt=2, forward, no flex, 2 rounds: < 60 s on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_cpu import FLEX_BYTES_PER_PAIR, available_memory, inputs, load_flex  # noqa: E402
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

HEADS, DIM = 4, 128
CHECK_TOL = 1e-4


def parse_grid(text: str) -> tuple[int, int, int]:
    try:
        t, h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(  # noqa: B904 - argparse prints this message alone
            f"--grid takes FRAMESxHEIGHTxWIDTH in tokens, e.g. 13x30x52; got {text!r}"
        )
    if min(t, h, w) < 1:
        raise argparse.ArgumentTypeError(f"--grid sides must be >= 1, got {text!r}")
    return t, h, w


def parse_rt(text: str) -> int | None:
    return None if text.lower() in ("none", "all") else int(text)


def rt_name(rt: int | None) -> str:
    return "all" if rt is None else str(rt)


def check_correctness(backend, radius, rts, flex, with_grad):
    """Max abs error of the timed backends vs the reference on a small video; abort when too large."""
    rows, worst, dim = [], 0.0, 32
    layout = TokenLayout(0, 13, 11, frames=5)  # odd sides: partial tiles and border regions
    r = min(radius, 4)
    for rt in rts:
        q, k, v = inputs(layout, requires_grad=with_grad, seed=1, heads=2, dim=dim)
        errs, ref = errors_vs_reference(q, k, v, layout, r, backend, with_grad, temporal_radius=rt)
        rows.append([f"{backend} r={r} rt={rt_name(rt)}", *(f"{n} {e:.2e}" for n, e in errs.items())])
        worst = max(worst, *errs.values())
        if flex is not None:
            with torch.no_grad():
                f_out = flex(q.detach(), k.detach(), v.detach(), layout, r, rt, dim**-0.5)
            e = max_abs_error(f_out, ref)
            rows.append([f"flex r={r} rt={rt_name(rt)}", f"out {e:.2e}"])
            worst = max(worst, e)
    for row in rows:
        print("check: " + ", ".join(row))
    if worst > CHECK_TOL:
        print(f"ABORT: max abs error {worst:.3g} > {CHECK_TOL:g}; not timing a wrong kernel")
        sys.exit(1)
    print(f"check: max abs error {worst:.2e} <= {CHECK_TOL:g} (small problem: 5x13x11 grid, r={r})")


def video_flex(flex2d):
    """The 2D bench's compiled-flex runner with a temporal radius (cleardit.attention.flex)."""
    from cleardit.attention.flex import flex_clear_attention

    def run(q, k, v, layout, radius, rt, scale):
        return flex_clear_attention(q, k, v, layout, radius, None, None, scale, False, rt, compile=True)[0]

    return run if flex2d is not None else None


def time_forward(layout, radius, rts, flex, backend, reps, flex_bytes_per_pair):
    scale = DIM**-0.5
    n = layout.seq_len
    q, k, v = inputs(layout)
    contenders = {"dense": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)}
    for rt in rts:
        contenders[f"cleardit rt={rt_name(rt)}"] = lambda rt=rt: clear_attention(
            q, k, v, layout, radius, temporal_radius=rt, scale=scale, backend=backend
        )
    need, have = flex_bytes_per_pair * n * n, available_memory()
    if flex is not None and have is not None and need > 0.8 * have:
        print(
            f"flex: skipped: building its block mask needs ~{need / 2**30:.0f} GiB "
            f"(create_block_mask evaluates all N^2 pairs), {have / 2**30:.0f} GiB available"
        )
        flex = None
    setup = {}
    if flex is not None:
        for rt in rts:
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    flex(q, k, v, layout, radius, rt, scale)  # builds the block mask and compiles
            except Exception as exc:  # noqa: BLE001
                print(f"flex: skipped at rt={rt_name(rt)}: {type(exc).__name__}: {exc}")
                continue
            setup[rt] = time.perf_counter() - t0
            contenders[f"flex rt={rt_name(rt)}"] = lambda rt=rt: flex(q, k, v, layout, radius, rt, scale)
    with torch.no_grad():
        times = alternate(contenders, reps=reps, warmup=1)
    print("forward medians (ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in times.items()))

    grid = layout.describe_grid()
    dense_t = times["dense"]
    dense_gf = 4 * DIM * HEADS * n * n / dense_t / 1e9
    rows = [[grid, "-", "-", "dense SDPA", fmt_ms(dense_t), "1.00x", f"{dense_gf:.1f}", "1.00", ""]]
    speedups = {}
    for rt in rts:
        pairs = count_pairs(layout, radius, rt)
        t = times[f"cleardit rt={rt_name(rt)}"]
        useful = 4 * DIM * HEADS * pairs / t / 1e9
        tf = times.get(f"flex rt={rt_name(rt)}")
        speedups[rt] = (dense_t / t, useful / dense_gf, tf / t if tf else None)
        rows.append(
            [grid, radius, rt_name(rt), f"cleardit ({backend})", fmt_ms(t), f"{dense_t / t:.2f}x",
             f"{useful:.1f}", f"{useful / dense_gf:.2f}", f"{tf / t:.2f}x" if tf else "n/a"]
        )  # fmt: skip
        if tf is not None:
            useful_f = 4 * DIM * HEADS * pairs / tf / 1e9
            rows.append(
                [grid, radius, rt_name(rt), f"flex (compiled; setup {setup[rt]:.0f} s)", fmt_ms(tf),
                 f"{dense_t / tf:.2f}x", f"{useful_f:.1f}", f"{useful_f / dense_gf:.2f}", "1.00x"]
            )  # fmt: skip
    return rows, speedups


def time_backward(layout, radius, rt, backend, reps):
    scale = DIM**-0.5
    n = layout.seq_len
    q, k, v = inputs(layout, requires_grad=True)
    w = torch.randn(1, HEADS, n, DIM)

    def dense_step():
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        torch.autograd.grad((out * w).sum(), (q, k, v))

    def clear_step():
        out = clear_attention(q, k, v, layout, radius, temporal_radius=rt, scale=scale, backend=backend)
        torch.autograd.grad((out * w).sum(), (q, k, v))

    times = alternate({"dense": dense_step, "cleardit": clear_step}, reps=reps, warmup=1)
    print("fwd+bwd medians (ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in times.items()))
    pairs = count_pairs(layout, radius, rt)
    # forward + backward: 4 + 10 = 14 d FLOPs per pair (the backward recomputes the scores)
    dense_gf = 14 * DIM * HEADS * n * n / times["dense"] / 1e9
    useful = 14 * DIM * HEADS * pairs / times["cleardit"] / 1e9
    grid, t = layout.describe_grid(), times["cleardit"]
    return [
        [grid, "-", "-", "dense SDPA", fmt_ms(times["dense"]), "1.00x", f"{dense_gf:.1f}", "1.00"],
        [grid, radius, rt_name(rt), f"cleardit ({backend})", fmt_ms(t), f"{times['dense'] / t:.2f}x",
         f"{useful:.1f}", f"{useful / dense_gf:.2f}"],
    ]  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--grid", type=parse_grid, default=(13, 30, 52), help="FRAMESxHEIGHTxWIDTH tokens (13x30x52)"
    )
    ap.add_argument("--radius", type=int, default=8, help="spatial radius r (8)")
    ap.add_argument(
        "--temporal-radius", default="2,none", help="comma-separated rt in latent frames; none = every frame"
    )
    ap.add_argument("--reps", type=int, default=3, help="timed rounds per contender (after 1 warm-up)")
    ap.add_argument("--quick", action="store_true", help="rt=2 only, forward, no flex, 2 rounds")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (block mask + compile)")
    ap.add_argument(
        "--flex-bytes-per-pair",
        type=float,
        default=FLEX_BYTES_PER_PAIR,
        help="memory FlexAttention's block-mask build needs per pair; skip flex where it exceeds 80%% "
        "of available memory (0: never skip)",
    )
    ap.add_argument("--backend", default="auto", help="cleardit backend (auto: what auto picks, printed)")
    ap.add_argument("--backward", default="first", choices=["first", "none"], help="fwd+bwd for the first rt")
    args = ap.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    if args.quick:
        args.temporal_radius, args.reps, args.no_flex, args.backward = "2", 2, True, "none"
    rts = [parse_rt(x) for x in args.temporal_radius.split(",")]
    frames, height, width = args.grid
    layout = TokenLayout(0, height, width, frames=frames)
    device = torch.device("cpu")
    start = time.perf_counter()

    print(
        f"ATTN-CPU-3D: one attention call, fp32, batch 1, {HEADS} heads, d={DIM}, no text, "
        f"grid {layout.describe_grid()} ({layout.image_len:,} tokens), r={args.radius}, "
        f"rt {[rt_name(rt) for rt in rts]}"
    )
    print(machine_header(device))
    flex = None
    if args.no_flex:
        print("flex: skipped: --no-flex" + (" (--quick)" if args.quick else ""))
    else:
        flex2d, why_not = load_flex()
        flex = video_flex(flex2d)
        if flex is None:
            print(f"flex: skipped: {why_not}")
    backend = args.backend
    if backend == "auto":
        backend = choose_backend(layout, device)
        print(f"cleardit auto backend on this problem: {backend}")
    check_correctness(backend, args.radius, rts, flex, with_grad=args.backward != "none")

    others = OtherLoad()
    rows, speedups = time_forward(
        layout, args.radius, rts, flex, backend, args.reps, args.flex_bytes_per_pair
    )
    bwd_rows = []
    if args.backward == "first":
        bwd_rows = time_backward(layout, args.radius, rts[0], backend, max(2, args.reps - 1))

    header = ["grid", "r", "rt", "contender", "ms", "vs dense", "useful GFLOP/s", "/ dense GFLOP/s"]
    print("\nforward (no grad):")
    print_table(header + ["cleardit vs flex"], rows)
    if bwd_rows:
        print("\nforward + backward (GFLOP/s counted as 14 d per pair):")
        print_table(header, bwd_rows)
    share = others.share()
    busy = "" if share is None else f"; other processes used {100 * share:.0f}% of the CPUs meanwhile"
    print(f"\ntotal {time.perf_counter() - start:.0f} s{busy}")
    if share is not None and share > 0.1:
        print("warning: the machine was busy; cleardit's many short calls lose more than one long dense call")
    rt = rts[0]
    speedup, ratio, vs_flex = speedups[rt]
    flex_part = f", {vs_flex:.2f}x faster than compiled flex" if vs_flex else ""
    print(
        f"headline: at {layout.describe_grid()} r={args.radius} rt={rt_name(rt)} cleardit ({backend}) "
        f"forward is {speedup:.2f}x faster than dense SDPA{flex_part}; "
        f"useful GFLOP/s = {ratio:.2f} of dense SDPA's"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
