"""Atomic file writes: a crash leaves either the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    mode = 0o666 & ~_umask()
    os.chmod(tmp_path, mode)  # mkstemp makes 0600; give the file normal permissions
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)  # again: a writer may have replaced the file (safetensors: 0600)
        _crash_point(path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _crash_point(path: Path) -> None:
    """Fault injection for the crash tests: die mid-write when MINLM_CRASH_DURING_WRITE names
    this file (the temp file is written, the rename has not happened)."""
    target = os.environ.get("MINLM_CRASH_DURING_WRITE")
    if target and path.name == target:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], object]) -> None:
    """Call ``writer(tmp_path)`` and move the result into place atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda p: p.write_bytes(data))


@contextlib.contextmanager
def waiting_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing), waiting for any holder.
    The kernel drops the lock when its holder dies, however it dies, so none goes stale."""
    import fcntl  # POSIX only, like the run lock (runfolder.py); imported here so Windows can
    # still import fileio for everything else

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
