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


__all__ = ["atomic_torch_save", "atomic_write_bytes", "atomic_write_text"]
