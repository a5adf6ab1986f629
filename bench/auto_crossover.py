"""Where dense masked SDPA ("reference") stops beating the tiled backend on this CPU.

Feeds the thresholds of `choose_backend` (attention/dispatch.py); results in docs/benchmarks.md.
Forward only, 4 heads, 40 text tokens; best of 2 rounds of 3 calls, contenders alternating.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_header  # noqa: E402

from cleardit.attention import TokenLayout, clear_attention  # noqa: E402


def mean_time(q, k, v, layout, radius, backend, calls: int = 3) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        clear_attention(q, k, v, layout, radius, backend=backend)
    return (time.perf_counter() - start) / calls


def main() -> int:
    print(machine_header("cpu"))
    torch.manual_seed(0)
    for d in (32, 128):
        for grid in (24, 32, 48, 64, 96):
            for radius in (8, 16):
                layout = TokenLayout(40, grid, grid)
                q, k, v = (torch.randn(1, 4, layout.seq_len, d) for _ in range(3))
                times: dict[str, list[float]] = {"reference": [], "tiled": []}
                with torch.no_grad():
                    for _ in range(2):
                        for backend in times:
                            times[backend].append(mean_time(q, k, v, layout, radius, backend))
                dense, tiled = min(times["reference"]), min(times["tiled"])
                print(
                    f"d={d} grid {grid}x{grid} N={layout.seq_len} r={radius}: "
                    f"dense-mask {dense * 1e3:.1f} ms, "
                    f"tiled {tiled * 1e3:.1f} ms, tiled speedup {dense / tiled:.2f}x",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
