"""Opening a run folder for training: one writer at a time, and nothing lost on overwrite.

A run holds an exclusive lock (``fcntl.flock`` on ``<out_dir>/.<run>.lock``) from before it
touches the folder until it exits, and removes the file as it lets go. The kernel drops the
lock when its process dies, however it dies, so a lock file left by a killed run is stale by
construction: the next run takes it over and says so. The pid written into the lock file
names the holder in the refusal message.

``overwrite=true`` does not delete the old run up front: the new run writes into a staging
folder beside it and only replaces the old one once it has saved its first good checkpoint
(``promote``). A run that fails before that leaves the old folder as it was (``abandon``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from minlm.outputs import _pid_alive, swap_in
from minlm.runs import RunError, check_run_target


class RunFolder:
    """The folder a run writes (``path``) and the name it ends up under (``final``)."""

    def __init__(self, out_dir: Path, name: str, resume: bool, overwrite: bool, say=print):
        self.final = Path(out_dir) / name
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.say = say
        self._lock_fd = self._lock()
        try:
            exists = check_run_target(self.final, resume=resume, overwrite=overwrite)
            self.resuming = exists and resume
            self.staging = exists and overwrite
            self.path = (self.final.parent / f".{name}.staging-{os.getpid()}" if self.staging
                         else self.final)
            if self.staging and self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
        except BaseException:
            self.release()
            raise

    @staticmethod
    def check(out_dir, name: str, resume: bool, overwrite: bool) -> bool:
        """The checks a run makes before any work, writing nothing (not even the lock file):
        a run of that name being trained right now, then ``runs.check_run_target``. True when
        the folder holds a run. ``RunFolder(...)`` checks again under the lock."""
        final = Path(out_dir) / name
        lock = final.parent / f".{name}.lock"
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:  # no lock file: no one is training into it
            fd = None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                raise RunError(f"run {name!r} in {final.parent} is in use by another training "
                               f"(process {holder or '?'}); wait for it to finish, stop it, or "
                               "choose another run_name") from None
            finally:
                os.close(fd)  # drops the shared lock taken to look
        return check_run_target(final, resume=resume, overwrite=overwrite)

    @classmethod
    def follower(cls, out_dir, name: str, resuming: bool) -> RunFolder:
        """The folder as another process of a torchrun job sees it: rank 0 locks and writes."""
        folder = cls.__new__(cls)
        folder.final = folder.path = Path(out_dir) / name
        folder.resuming, folder.staging, folder._lock_fd = resuming, False, None
        folder.say = lambda *a, **k: None
        return folder

    def _lock(self) -> int:
        self._lock_path = self.final.parent / f".{self.final.name}.lock"
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise RunError(f"run {self.final.name!r} in {self.final.parent} is in use by "
                               f"another training (process {holder or '?'}); wait for it to "
                               "finish, stop it, or choose another run_name") from None
            try:  # a holder that released meanwhile removed the file: lock the new one
                if os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if previous.isdigit() and int(previous) != os.getpid() and not _pid_alive(int(previous)):
            self.say(f"taking over a stale lock on {self.final.name!r} left by process "
                     f"{previous}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def promote(self) -> None:
        """Put the staged run in place of the old one (after its first good checkpoint)."""
        if not self.staging:
            return
        swap_in(self.path, self.final)
        self.path, self.staging = self.final, False

    def abandon(self) -> bool:
        """Drop a staged run that never saved a checkpoint; True when the old run was kept."""
        if not self.staging:
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        self.path, self.staging = self.final, False
        return True

    def release(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):  # removed while held, so no one locks a stale file
                os.unlink(self._lock_path)
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None
