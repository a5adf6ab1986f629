"""Process groups for patch-parallel inference: join one from torchrun, or spawn N local ranks.

Every group is created with a timeout, so a rank whose peer died or stalled fails with an error
within that time instead of hanging (the patch-parallel code turns the backend's error into a
``ParallelError`` that names the rank, the layer and the operation). ``spawn`` additionally
watches its children: when one rank fails, the others get ``grace_s`` seconds to notice on their
own and are then killed, so a launch always ends.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_mod
import signal
import socket
import time
import traceback
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LOCALHOST = "127.0.0.1"


class ParallelLaunchError(RuntimeError):
    """One or more spawned ranks failed. ``failures`` maps rank -> message, ``exitcodes`` rank -> code."""

    def __init__(self, failures: dict[int, str], exitcodes: dict[int, int | None]):
        self.failures = dict(sorted(failures.items()))
        self.exitcodes = exitcodes
        lines = [f"{len(self.failures)} of {len(exitcodes)} ranks failed:"]
        for rank, msg in self.failures.items():
            first = msg.strip().splitlines()[0] if msg.strip() else "(no message)"
            lines.append(f"  rank {rank} (exit code {exitcodes.get(rank)}): {first}")
        super().__init__("\n".join(lines))


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that is free on ``host`` right now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_distributed(
    backend: str | None = None,
    timeout_s: float = 600.0,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
) -> dist.ProcessGroup:
    """Join the default process group, with a timeout, and return it.

    Without arguments this reads torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK). ``backend`` defaults to "nccl" when CUDA is available, else "gloo";
    with nccl the current CUDA device is set to LOCAL_RANK. Any collective or halo exchange that
    waits longer than ``timeout_s`` for a peer raises instead of hanging.
    """
    if timeout_s is None or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if dist.is_initialized():
        return dist.group.WORLD
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    rank = int(os.environ["RANK"]) if rank is None and "RANK" in os.environ else rank
    world_size = (
        int(os.environ["WORLD_SIZE"]) if world_size is None and "WORLD_SIZE" in os.environ else world_size
    )
    if rank is None or world_size is None:
        raise ValueError(
            "init_distributed needs rank and world_size: launch with torchrun (it sets RANK, WORLD_SIZE) "
            "or pass rank=..., world_size=..., init_method='tcp://host:port'"
        )
    kwargs = {}
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(
        backend,
        init_method=init_method or "env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    return dist.group.WORLD


def _run_rank(fn, rank, world_size, port, timeout_s, backend, threads, args, results) -> None:
    code = 0
    try:
        torch.set_num_threads(threads)
        init_distributed(
            backend,
            timeout_s,
            rank=rank,
            world_size=world_size,
            init_method=f"tcp://{LOCALHOST}:{port}",
        )
        value = fn(rank, world_size, *args)
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException as exc:  # report everything, KeyboardInterrupt included
        code = 1
        text = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        results.put((rank, "error", text))
    finally:
        results.close()
        results.join_thread()  # make sure the message left before exiting
    if code == 0:
        try:
            dist.destroy_process_group()
        except Exception:  # peers may be gone already; nothing to clean up then
            pass
    os._exit(code)  # skip atexit handlers that could wait on dead peers


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code} without a message"


def spawn(
    fn: Callable,
    world_size: int,
    args: Sequence = (),
    *,
    timeout_s: float = 60.0,
    grace_s: float | None = None,
    deadline_s: float | None = None,
    backend: str = "gloo",
    start_method: str = "spawn",
    threads: int = 1,
) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` local processes joined in one group.

    The group is created on 127.0.0.1 (a free port) with ``timeout_s``; ``fn`` and ``args`` must
    be picklable (a module-level function). Returns the values of ``fn`` in rank order.

    Args:
        timeout_s: process-group timeout: how long a rank waits for a peer before failing.
        grace_s: after the first rank fails, how long the others get to fail or finish on their
            own before they are killed (default ``timeout_s`` + 5).
        deadline_s: kill everything after this many seconds in total (default: no limit).
        start_method: "spawn" (safe anywhere) or "forkserver" (faster repeated launches).
        threads: torch intra-op threads per rank.

    Raises:
        ParallelLaunchError: some rank raised, was killed, or was still running at the deadline;
            ``failures`` holds each failing rank's message.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if grace_s is None:
        grace_s = timeout_s + 5.0
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_run_rank,
            args=(fn, rank, world_size, port, timeout_s, backend, threads, tuple(args), results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, object] = {}
    failures: dict[int, str] = {}
    start = time.monotonic()
    first_failure: float | None = None

    def drain(block_s: float) -> None:
        try:
            rank, status, payload = results.get(timeout=block_s)
        except queue_mod.Empty:
            return
        if status == "ok":
            values[rank] = pickle.loads(payload)
        else:
            failures[rank] = payload

    try:
        while any(p.is_alive() for p in procs):
            drain(0.05)
            now = time.monotonic()
            for rank, p in enumerate(procs):
                if not p.is_alive() and p.exitcode not in (0, None) and rank not in failures:
                    drain(0.2)  # its message may still be in flight
                    failures.setdefault(rank, _describe_exit(p.exitcode))
            if failures and first_failure is None:
                first_failure = now
            late = first_failure is not None and now - first_failure > grace_s
            overdue = deadline_s is not None and now - start > deadline_s
            if late or overdue:
                why = (
                    f"killed: still running {grace_s:.0f}s after another rank failed"
                    if late
                    else f"killed: still running at the {deadline_s:.0f}s deadline"
                )
                for rank, p in enumerate(procs):
                    if p.is_alive():
                        p.kill()
                        failures.setdefault(rank, why)
                break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():  # never leave a child behind
                p.kill()
                p.join(timeout=5)
    while len(values) + len(failures) < world_size:
        before = len(values) + len(failures)
        drain(0.2)
        if len(values) + len(failures) == before:
            break
    exitcodes = {rank: p.exitcode for rank, p in enumerate(procs)}
    for rank, p in enumerate(procs):
        if rank not in values and rank not in failures:
            failures[rank] = _describe_exit(p.exitcode)
    if failures:
        raise ParallelLaunchError(failures, exitcodes)
    return [values[rank] for rank in range(world_size)]
