"""Helpers shared by the bench/ scripts (see shared/BENCHMARKS.md for the rules they follow).

* ``machine_header(device)``: the lines that state the machine at the top of every table;
* ``Timer(device)`` and ``alternate(contenders, timer, reps, warmup)``: contenders run in turn
  (A B A B ...) after a warm-up, and each gets its median time, so that noise from a shared machine
  hits all of them alike;
* ``print_table(header, rows)``: a ``|``-separated table (the last line a script prints after it
  is its headline);
* small formatting helpers.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_header(device: torch.device | str = "cpu") -> str:
    """Multi-line description of the machine: CPU, cores, threads, torch, device, date, load."""
    device = torch.device(device)
    lines = [
        f"machine: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"software: python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.system()} {platform.release()}",
    ]
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        lines.append(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    else:
        lines.append(f"device: {device.type}")
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        lines.append(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}, load average {load}")
    except OSError:
        lines.append(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    return "\n".join(lines)


class Timer:
    """Wall-clock time of one call, synchronising the device before and after."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


class OtherLoad:
    """Share of the machine's CPU time used by *other* processes between start() and share().

    Reads /proc/stat (Linux); share() returns None elsewhere. A run where others took a large share
    was measured on a busy machine, whatever the load average (which counts this process too).
    """

    def __init__(self) -> None:
        self.start()

    @staticmethod
    def _busy_total() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        total = sum(fields[:8]) / hz
        idle = (fields[3] + fields[4]) / hz
        return total - idle, total

    def start(self) -> None:
        self._stat = self._busy_total()
        t = os.times()
        self._own = t.user + t.system

    def share(self) -> float | None:
        now = self._busy_total()
        if now is None or self._stat is None:
            return None
        t = os.times()
        own = t.user + t.system - self._own
        busy, total = now[0] - self._stat[0], now[1] - self._stat[1]
        return max(0.0, busy - own) / total if total > 0 else None


def alternate_samples(
    contenders: dict[str, Callable[[], object]],
    timer: Timer | None = None,
    reps: int = 5,
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Run every contender ``warmup`` times, then ``reps`` rounds of A B C ...; all times in seconds."""
    timer = timer or Timer()
    for _ in range(warmup):
        for fn in contenders.values():
            timer(fn)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            samples[name].append(timer(fn))
    return samples


def alternate(
    contenders: dict[str, Callable[[], object]],
    timer: Timer | None = None,
    reps: int = 5,
    warmup: int = 1,
) -> dict[str, float]:
    """Median seconds per contender, measured alternately (see ``alternate_samples``)."""
    samples = alternate_samples(contenders, timer, reps=reps, warmup=warmup)
    return {name: statistics.median(times) for name, times in samples.items()}


def spread(times: Sequence[float]) -> float:
    """(max - min) / median of a list of times: how noisy the measurement was."""
    med = statistics.median(times)
    return (max(times) - min(times)) / med if med > 0 else 0.0


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a ``|``-separated table with aligned columns."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |"

    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(line(row))


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def errors_vs_reference(q, k, v, layout, radius, backend, with_grad, temporal_radius=None):
    """(max abs errors of ``backend`` against the ``reference`` backend, the reference output): output
    and log-sum-exp, and with ``with_grad`` the gradients w.r.t. q, k, v of a random projection of
    the output (dq, dk, dv)."""
    from cleardit.attention import clear_attention

    args = dict(temporal_radius=temporal_radius, return_lse=True)
    ref, ref_lse = clear_attention(q, k, v, layout, radius, backend="reference", **args)
    got, lse = clear_attention(q, k, v, layout, radius, backend=backend, **args)
    errs = {"out": max_abs_error(got, ref), "lse": max_abs_error(lse, ref_lse)}
    if with_grad:
        w = torch.randn_like(ref)
        grads_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
        grads = torch.autograd.grad((got * w).sum(), (q, k, v))
        for name, a, b in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
            errs[name] = max_abs_error(a, b)
    return errs, ref
