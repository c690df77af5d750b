"""A run directory's safety: one trainer at a time, and an earlier run's files never overwritten.

    with run_dir.lock(path):          # a second trainer on the same directory is refused
        ...
    moved = run_dir.set_aside(path)   # metrics / config / summary of a run that left no checkpoint

The lock is an advisory ``flock`` on ``<run_dir>/.lock`` (released by the OS when the process
dies, even by kill -9); the file names its holder. It holds on a local filesystem; shared
filesystems differ in how they honour ``flock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import time
from typing import Iterator

LOCK_FILE = ".lock"
# What a run writes besides its checkpoints (tensorboard/ is append-only and left in place).
RUN_FILES = ("metrics.jsonl", "metrics.jsonl.garbled", "config.json", "summary.json", "plots")


class RunDirectoryLocked(RuntimeError):
    """Another trainer is using the run directory."""


@contextlib.contextmanager
def lock(run_dir: str) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the duration; raise `RunDirectoryLocked` naming its holder."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise RunDirectoryLocked(f"run directory {run_dir} is in use by another trainer ({holder}); wait for it "
                                     f"to finish or stop it, or use another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def set_aside(run_dir: str) -> str | None:
    """Move an earlier run's files (`RUN_FILES`) into ``<run_dir>/previous-<time>/``; the folder, or
    None when there was nothing to move."""
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(run_dir, name))]
    if not present:
        return None
    base = target = os.path.join(run_dir, f"previous-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 1
    while os.path.exists(target):
        target, suffix = f"{base}.{suffix}", suffix + 1
    os.makedirs(target)
    for name in present:
        shutil.move(os.path.join(run_dir, name), os.path.join(target, name))
    return target
