"""PARALLEL: bytes moved per denoising step by patch-parallel CLEAR vs other sequence parallelisms.

Part 1 (no compute): FLUX.1-dev's config (24 heads x 128, 512 text tokens, 57 attention layers,
bf16) at 2K / 4K / 8K and 2 / 4 / 8 ranks. cleardit's column is produced by
``cleardit.parallel.step_comm_bytes``, the same formulas and ``StripPlan`` the runtime counters
use (part 2 checks that they agree on a real run). The other columns are the usual analytical
volumes per step, summed over ranks, for S = 512 + H*W tokens and D = 3072 channels:
  * Ulysses: all-to-all of q, k, v and the output, each rank sending (N-1)/N of its shard:
    57 * 4 * S * D * 2 bytes * (N-1)/N;
  * ring attention: every K/V shard visits the N-1 other ranks: 57 * 2 * (N-1) * S * D * 2;
  * DistriFusion (full K/V all-gather each layer, ring algorithm): the same volume as ring.
cleardit counts what each rank sends: halo point-to-point messages, the text merge all-reduces
(ring volume) and the final output all-gather. Totals are over all ranks.

Part 2 (CPU, gloo): a small FLUX transformer; rank 0 alone (one thread) vs 2 ranks (one thread
each), alternating in one run, after checking that the 2-rank output equals one process and
that the counted bytes equal the dry accounting.

    python bench/parallel.py            # both parts
    python bench/parallel.py --quick    # smaller timing model, < 60 s on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_header, print_table  # noqa: E402

from cleardit.cli_options import add_radius_option  # noqa: E402
from cleardit.config import DEFAULT_RADIUS  # noqa: E402
from cleardit.parallel import CommCounter, StripPlan, spawn, step_comm_bytes  # noqa: E402

HEADS, HEAD_DIM, TEXT, LAYERS, BF16, OUT_CHANNELS = 24, 128, 512, 57, 2, 64
RESOLUTIONS = {"2K": 128, "4K": 256, "8K": 512}  # image tokens per side (pixels / 16)


def cleardit_bytes(side: int, ranks: int, radius: int, exchange: str = "input", down_factor=None) -> int:
    plan = StripPlan(side, side, ranks, radius, down_factor)
    per_rank = step_comm_bytes(
        plan, layers=LAYERS, out_channels=OUT_CHANNELS, batch=1, heads=HEADS, head_dim=HEAD_DIM,
        text_len=TEXT, elem_bytes=BF16, exchange=exchange,
    )  # fmt: skip
    return sum(sum(r.values()) for r in per_rank)


def baselines(side: int, ranks: int) -> dict[str, float]:
    s, d = TEXT + side * side, HEADS * HEAD_DIM
    ring = LAYERS * 2 * (ranks - 1) * s * d * BF16
    return {"ulysses": LAYERS * 4 * s * d * BF16 * (ranks - 1) / ranks, "ring": ring, "distrifusion": ring}


def bytes_table(radius: int) -> float:
    gb = 1e9
    rows, headline = [], None
    for name, side in RESOLUTIONS.items():
        for ranks in (2, 4, 8):
            ours = cleardit_bytes(side, ranks, radius)
            kv = cleardit_bytes(side, ranks, radius, exchange="kv")
            pooled = cleardit_bytes(side, ranks, radius, down_factor=4)
            base = baselines(side, ranks)
            rows.append(
                [
                    name, ranks, f"{ours / gb:.2f}", f"{kv / gb:.2f}", f"{pooled / gb:.2f}",
                    f"{base['ulysses'] / gb:.1f}", f"{base['ring'] / gb:.1f}",
                    f"{base['distrifusion'] / gb:.1f}",
                    f"{100 * ours / base['ulysses']:.1f}%", f"{100 * kv / base['ulysses']:.1f}%",
                ]
            )  # fmt: skip
            if name == "8K" and ranks == 8:
                headline = ours / base["ulysses"]
    print(f"\nGB sent per denoising step, all ranks together (FLUX.1-dev, bf16, r={radius}):")
    print_table(
        [
            "res", "ranks", "cleardit", "cleardit kv", f"cleardit r{radius} df4", "Ulysses", "ring",
            "DistriFusion", "cleardit/Ulysses", "kv/Ulysses",
        ],
        rows,
    )  # fmt: skip
    return headline


# ---- part 2: measured on CPU ------------------------------------------------------------------
def _timing_worker(rank: int, world: int, height: int, width: int, radius: int, reps: int, overrides: dict):
    import torch.distributed as dist

    import cleardit
    from cleardit.models.tiny import flux_inputs, tiny_flux_transformer
    from cleardit.parallel import parallelize

    single = tiny_flux_transformer(seed=0, **overrides)
    cleardit.linearize(single, radius=radius, tile=None)
    model = tiny_flux_transformer(seed=0, **overrides)
    counter = CommCounter()
    parallelize(model, radius=radius, counter=counter)
    inputs = flux_inputs(model, height, width, text_len=16, seed=1)
    with torch.no_grad():
        expected = single(**inputs).sample if rank == 0 else None
        got = model(**inputs).sample
    error = (got - expected).abs().max().item() if rank == 0 else None
    cfg = model.config
    dry = step_comm_bytes(
        StripPlan(height, width, world, radius), layers=cfg.num_layers + cfg.num_single_layers,
        out_channels=cfg.in_channels, batch=1, heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim,
        text_len=16, elem_bytes=4,
    )[rank]  # fmt: skip
    counted_ok = counter.by_kind(step=1) == dry

    def run_single():
        if rank == 0:
            with torch.no_grad():
                single(**inputs)
        dist.barrier()

    def run_parallel():
        with torch.no_grad():
            model(**inputs)
        dist.barrier()

    times = {"1 rank": [], "2 ranks": []}
    run_single(), run_parallel()  # warm-up
    for _ in range(reps):  # alternate A B A B so machine noise hits both
        for name, fn in (("1 rank", run_single), ("2 ranks", run_parallel)):
            dist.barrier()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return dict(error=error, counted_ok=counted_ok, bytes=sum(dry.values()), times=times)


def timing(quick: bool) -> None:
    height = width = 32 if quick else 64
    radius, reps = 8, 3 if quick else 5
    overrides = dict(num_attention_heads=4, attention_head_dim=32, axes_dims_rope=(8, 12, 12))
    results = spawn(_timing_worker, 2, (height, width, radius, reps, overrides), timeout_s=300, threads=1)
    r0 = results[0]
    print(
        f"\nCPU, gloo, tiny FLUX (2+2 blocks, 4 heads x 32), {height}x{width} tokens + 16 text, r={radius}, "
        f"1 thread per rank; 2-rank output vs 1 process: max abs error {r0['error']:.2e}; "
        f"counted bytes == dry accounting on every rank: {all(r['counted_ok'] for r in results)}"
    )
    if r0["error"] > 1e-4 or not all(r["counted_ok"] for r in results):
        raise SystemExit("parallel output or byte count is wrong; not timing it")
    med = {k: statistics.median(v) for k, v in r0["times"].items()}
    sent = sum(r["bytes"] for r in results)
    print_table(
        ["contender", "ms / forward (median)", "bytes sent / forward (all ranks)"],
        [
            ["1 rank (single process)", f"{med['1 rank'] * 1e3:.1f}", "0"],
            ["2 ranks (patch parallel)", f"{med['2 ranks'] * 1e3:.1f}", f"{sent:,}"],
        ],
    )
    print(f"2-rank speedup on CPU: {med['1 rank'] / med['2 ranks']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_radius_option(parser, default=DEFAULT_RADIUS)
    parser.add_argument("--quick", action="store_true", help="smaller timing model (< 60 s on 2 cores)")
    parser.add_argument("--no-timing", action="store_true", help="only the bytes table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_header("cpu"))
    if not args.no_timing:
        timing(args.quick)
    headline = bytes_table(args.radius)
    print(f"8K, 8 ranks, r={args.radius}: cleardit sends {100 * headline:.1f}% of Ulysses' bytes per step")


if __name__ == "__main__":
    main()
