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
# Everything of a run directory an export must not be written into (a subfolder of its own is fine).
BOOKKEEPING = RUN_FILES + (LOCK_FILE, "checkpoints", "checkpoints.damaged", "views", "tensorboard")


class RunDirectoryLocked(RuntimeError):
    """Another trainer is using the run directory."""


class RunDirectoryError(OSError):
    """The run directory cannot hold the run: a file, not writable, or the disk is full (one line)."""


# Folders of a run directory the trainer writes into: a file of that name would fail the run only
# after the earlier run's files were moved aside (`set_aside`), so it is refused first.
RUN_FOLDERS = ("checkpoints", "checkpoints.damaged")


def ensure_writable(run_dir: str) -> None:
    """Create ``run_dir`` and check it can be written (a probe file) and that its `RUN_FOLDERS`, where
    present, are folders; or raise `RunDirectoryError`. Runs before anything is built or moved."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except (FileExistsError, NotADirectoryError):
        raise RunDirectoryError(f"run directory {run_dir} is a file (or lies under one); choose another --run-dir") \
            from None
    except OSError as err:
        raise RunDirectoryError(f"run directory {run_dir} cannot be written ({err.strerror or err}); choose a writable "
                                f"--run-dir") from None
    for name in RUN_FOLDERS:
        path = os.path.join(run_dir, name)
        if os.path.lexists(path) and not os.path.isdir(path):
            raise RunDirectoryError(f"{path} is a file, not the run's {name} folder; move or remove it, or choose "
                                    f"another --run-dir")


class ExportDestinationError(ValueError):
    """An export folder that is the run directory, holds it, or lies inside its bookkeeping."""


def check_export_destination(export: str, run_dir: str) -> None:
    """Refuses an export folder that would overwrite the run's own files: the run directory itself,
    a folder holding it, or a place inside its bookkeeping (``checkpoints/``, ``plots/``, … and the
    ``previous-*`` folders). A subfolder of its own (``<run-dir>/export``) is fine."""
    export_path, run_path = os.path.realpath(export), os.path.realpath(run_dir)
    if export_path == run_path or run_path.startswith(export_path.rstrip(os.sep) + os.sep):
        raise ExportDestinationError(f"export folder {export} {'is' if export_path == run_path else 'holds'} the run "
                                     f"directory {run_dir}; export into a folder of its own, e.g. {run_dir}/export")
    if export_path.startswith(run_path + os.sep):
        first = os.path.relpath(export_path, run_path).split(os.sep)[0]
        if first in BOOKKEEPING or first.startswith("previous-"):
            raise ExportDestinationError(f"export folder {export} is inside the run's {first!r}; export into a folder "
                                         f"of its own, e.g. {run_dir}/export")


@contextlib.contextmanager
def lock(run_dir: str, claim: bool = True) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the duration; raise `RunDirectoryLocked` naming its holder.
    ``claim=False`` only checks that it is free (the trainer does so before it builds anything)."""
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
        if not claim:
            yield
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def check_free(run_dir: str) -> None:
    """Raise `RunDirectoryLocked` if a trainer holds ``run_dir``'s lock (nothing is claimed)."""
    with lock(run_dir, claim=False):
        pass


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
