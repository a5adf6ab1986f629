"""``cleardit check``: prove the install works on this machine, in under a minute.

Builds a small FLUX transformer offline, checks that every available attention backend gives the
reference's output after ``linearize``, then times one forward with full attention against CLEAR
at a larger grid (same model, same inputs, alternating runs, medians).
"""

from __future__ import annotations

import statistics
import time

import torch

from .attention import TokenLayout, available_backends, choose_backend, count_pairs
from .models import linearize
from .models.tiny import flux_inputs, tiny_flux_transformer

CHECK_MODEL = dict(num_attention_heads=4, attention_head_dim=32, axes_dims_rope=(8, 12, 12))


def check_backends(device: torch.device) -> float:
    """Largest output difference between any backend and the reference on a small odd-shaped grid."""
    model = tiny_flux_transformer(**CHECK_MODEL).to(device)
    inputs = flux_inputs(model, 13, 18, text_len=6, batch=2, device=device)
    worst = 0.0
    outputs = {}
    for backend in available_backends(device):
        handle = linearize(model, radius=5, down_factor=2, backend=backend)
        with torch.no_grad():
            outputs[backend] = model(**inputs).sample
        handle.restore()
    for backend, out in outputs.items():
        err = (out - outputs["reference"]).abs().max().item()
        worst = max(worst, err)
        print(f"  {backend:<9} max |out - reference| = {err:.2e}")
    return worst


def time_full_vs_clear(device: torch.device, grid: int, radius: int, reps: int) -> tuple[float, float]:
    model = tiny_flux_transformer(**CHECK_MODEL).to(device)
    inputs = flux_inputs(model, grid, grid, text_len=32, device=device)
    times = {"full": [], "clear": []}
    for i in range(reps + 1):  # first round is warm-up
        for mode in ("full", "clear"):
            h = linearize(model, radius=radius) if mode == "clear" else None
            start = time.perf_counter()
            with torch.no_grad():
                model(**inputs)
            elapsed = time.perf_counter() - start
            if h is not None:
                h.restore()
            if i:
                times[mode].append(elapsed)
    return statistics.median(times["full"]), statistics.median(times["clear"])


def run_check(grid: int = 96, radius: int = 8, reps: int = 2) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"cleardit check on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print("1. every backend against the reference (tiny FLUX, 13x18 grid, r=5, pooled df=2):")
    worst = check_backends(device)
    if worst > 1e-4:
        print(f"FAILED: a backend differs from the reference by {worst:.2e}")
        return 1
    layout = TokenLayout(32, grid, grid)
    full_t, clear_t = time_full_vs_clear(device, grid, radius, reps)
    ratio = count_pairs(layout, None) / count_pairs(layout, radius)
    print(
        f"2. one forward of a small FLUX at {grid}x{grid} tokens ({grid * 16}x{grid * 16} px), "
        f"auto backend = {choose_backend(layout, device)}:"
    )
    print(
        f"  full attention {full_t:.3f} s | CLEAR r={radius} {clear_t:.3f} s | "
        f"{ratio:.1f}x fewer attention pairs"
    )
    print(f"  speedup of the whole forward: {full_t / clear_t:.2f}x")
    return 0
