"""Atomic file writes: a temporary file in the same folder, fsync'ed, then ``os.replace``.

A kill at any moment leaves either the previous file or the new one, never a half-written file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    return _atomic_write(path, lambda fh: torch.save(obj, fh))


def check_writable(paths) -> None:
    """A ValueError naming the first of ``paths`` whose folder cannot take a new file.

    Tries for real (root may pass ``os.access`` where the write would still fail, e.g. under /proc):
    creates the missing folders, writes and removes a probe file, then removes the folders it made,
    so nothing is left behind. Called before long work so that it fails in seconds, not after it.
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        if path.is_dir():
            raise ValueError(f"--output {path} is a folder, not a file name; pass another name")
    for folder in dict.fromkeys(p.parent for p in paths):
        made = []
        probe = folder / f".cleardit-write-test-{os.getpid()}"
        try:
            missing = [f for f in (folder, *folder.parents) if not f.exists()]
            for f in reversed(missing):
                f.mkdir()
                made.append(f)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ValueError(
                f"--output: cannot write files in {folder} ({exc.strerror or exc}); "
                "choose a folder you can write to"
            ) from exc
        finally:
            for f in reversed(made):
                with contextlib.suppress(OSError):
                    f.rmdir()


__all__ = ["atomic_torch_save", "atomic_write_bytes", "atomic_write_text", "check_writable"]
