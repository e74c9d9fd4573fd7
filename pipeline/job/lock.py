"""One driver per run directory: `<run_dir>/.lock`, held with `fcntl.flock` for the run's life.

The kernel drops a flock when its holder dies (SIGKILL, OOM, a lost machine's NFS client aside),
so the next driver on the same run_id takes over a killed one's run at once and resumes it; a
second driver while the first lives refuses in one line before it touches anything.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.job.outputs import DISK_FULL, DiskFullError

LOCK_NAME = ".lock"


class RunLocked(ConfigError):
    """Another live driver holds the run directory (exit 2, one line)."""


class RunLock:
    def __init__(self, run_dir: Path, run_id: str):
        self.path = run_dir / LOCK_NAME
        # the folders this lock brings into being (output_root too, when new): a refused run removes them
        self.created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise DiskFullError(f"no space left writing {self.path} ({exc.strerror}); "
                                    "free space and rerun with the same run_id to resume") from None
            raise ConfigError(f"run_id {run_id}: cannot create {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunLocked(f"run_id {run_id}: {run_dir} is held by another driver (pid {holder}); wait for it "
                            "to end, or choose another run_id") from None
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is only for the refusal's message

    def release(self, remove_if_unused: bool = False) -> None:
        """Let go; `remove_if_unused`: a run refused before it wrote anything leaves no directory."""
        if self.fd is None:
            return
        if remove_if_unused and self.created:
            self.path.unlink(missing_ok=True)
            for folder in self.created:  # innermost first; one another process wrote into stays
                try:
                    folder.rmdir()
                except OSError:
                    break
        os.close(self.fd)
        self.fd = None
