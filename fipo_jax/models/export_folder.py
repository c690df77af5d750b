"""Where an export may go, and how it is written: never mixed with other files, never half written.

    check_export_folder(path)           # raises ExportFolderError before anything is built
    with replacing(path) as folder:     # write everything into `folder`; on success it becomes `path`
        ...

An export goes to a new or empty folder, or replaces a previous export of this project whole (it
carries `EXPORT_MARKER`). A folder holding anything else — another model's shards and config, a
run directory — is refused, naming it and what it holds, because files of two models side by side
load as neither (a new ``model.safetensors`` next to an old ``model.safetensors.index.json`` loads
the old weights in one library and the new in another).

The files are written into a temporary folder beside ``path`` (``<path>.writing-<pid>-<time>``)
that is renamed into place only once complete; a previous export is moved out first
(``<path>.replaced-<pid>-<time>``) and deleted after. A failure leaves ``path`` as it was and removes
the temporary folder; a full disk says so in one line (`ExportDiskFullError`). A process killed
mid-export (kill -9) cannot clean up: the next export to ``path`` removes the folders of dead
processes and says so. A place the export can never be written (under a file, in a read-only
folder) is refused by `check_export_folder`, before a run trains for it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
from typing import Callable, Iterator

from fipo_jax.models.file_checks import disk_full

EXPORT_MARKER = "fipo_jax_export.json"


class ExportFolderError(ValueError):
    """The export folder holds files this export would mix with or overwrite (names them), or
    cannot be created."""


class ExportDiskFullError(ExportFolderError, OSError):
    """The disk filled up during an export (an OSError with errno ENOSPC, too); the target is as it was."""


def check_export_folder(path: str | os.PathLike) -> None:
    """Raises `ExportFolderError` unless ``path`` is new, an empty folder, or a previous export, and
    the folder holding it can be created and written (the export is staged beside ``path``)."""
    path = os.fspath(path)
    _check_creatable(path)
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise ExportFolderError(f"export folder {path} is a file; choose a new or empty folder")
    contents = sorted(os.listdir(path))
    if contents and EXPORT_MARKER not in contents:
        shown = ", ".join(contents[:6]) + (f" and {len(contents) - 6} more" if len(contents) > 6 else "")
        raise ExportFolderError(f"export folder {path} already holds files ({shown}) that the export would mix with "
                                f"or overwrite; choose a new or empty folder")


def _check_creatable(path: str) -> None:
    """``path``'s parent exists as a writable folder, or can be made inside the nearest existing
    folder above it; else `ExportFolderError` (a file on the way, or no permission to write)."""
    parent = os.path.dirname(os.path.abspath(path))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ExportFolderError(f"export folder {path} lies under {existing}, which is a file; choose a folder "
                                f"that can be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportFolderError(f"export folder {path} cannot be created: {existing} is not writable; choose a "
                                f"writable place")


def ordinary_file_mode() -> int:
    """The mode of a file this process creates with ``open``: 0o666 less the umask."""
    umask = os.umask(0o022)  # reading the umask means setting it; put it back at once
    os.umask(umask)
    return 0o666 & ~umask


def _give_ordinary_modes(folder: str) -> None:
    """Every file under ``folder`` gets `ordinary_file_mode`: safetensors (≥ 0.6) writes through a
    temporary file, which is created 0600, so ``model.safetensors`` would be unreadable to the
    group and others while ``config.json`` beside it is not."""
    mode = ordinary_file_mode()
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), mode)


_LEFTOVER = r"\.(writing|replaced)-(\d+)-\d{14}"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one of another user counts as alive) and is
    not this one: a folder named with our own id was left by an earlier process that had it (in
    a container a run often gets the same id), since this process stages only after cleaning."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(path: str) -> list[str]:
    """Removes the staging (``<path>.writing-<pid>-<time>``) and replaced (``.replaced-…``) folders
    that an export killed mid-way left beside ``path``, when their process is gone: a staging
    folder holds partial shards, a replaced one a previous export that a complete ``path`` has
    superseded (kept and named when ``path`` is missing: it is then the only copy). Returns one
    note per folder; folders of live processes (an export in progress) are left alone, and named.
    A process id is judged on this machine: exports to one target from two machines sharing a
    filesystem at the same time are not supported (the second would replace the first anyway)."""
    parent, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent):
        return []
    notes = []
    for name in sorted(os.listdir(parent)):
        match = re.fullmatch(re.escape(base) + _LEFTOVER, name)
        if not match:
            continue
        kind, pid, folder = match.group(1), match.group(2), os.path.join(parent, name)
        if _alive(int(pid)):
            notes.append(f"[export] left {folder} alone: its process {pid} is running (an export in progress?); "
                         f"remove it if that process is not exporting")
        elif kind == "replaced" and not os.path.isdir(path):
            notes.append(f"[export] kept {folder}: the previous export, moved aside by process {pid}, which was "
                         f"killed before its new export was in place; rename it to {path} to get it back")
        else:
            shutil.rmtree(folder, ignore_errors=True)
            what = "the partial files of an export" if kind == "writing" else "a previous export already replaced"
            notes.append(f"[export] removed {folder}: {what}, left by process {pid}, which was killed mid-export")
    return notes


def _disk_full_error(path: str) -> ExportDiskFullError:
    """The one line for an export that ran out of disk space (its staging folder already removed)."""
    error = ExportDiskFullError(f"export folder {path} could not be written: the disk is full; {path} is as it was "
                                f"and the partial files were removed; free space, then export again (Trainer.export, "
                                f"or the same train.py command: it resumes the finished run and exports it)")
    error.errno = errno.ENOSPC
    return error


@contextlib.contextmanager
def replacing(path: str | os.PathLike, write: bool = True, log: Callable[[str], None] = print) -> Iterator[str]:
    """A fresh temporary folder beside ``path`` to write an export into; on success it replaces
    ``path`` (checked first with `check_export_folder`; leftovers of killed exports are removed
    first, each with a note to ``log``). A full disk raises `ExportDiskFullError`. ``write=False``
    (a process that does not write, on a multi-host run) yields ``path`` and touches nothing."""
    path = os.fspath(path)
    if not write:
        yield path
        return
    check_export_folder(path)
    for note in remove_leftovers(path):
        log(note)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    stamp = f"{os.getpid()}-{time.strftime('%Y%m%d%H%M%S')}"
    staging = f"{path}.writing-{stamp}"
    os.makedirs(staging)
    try:
        yield staging
        with open(os.path.join(staging, EXPORT_MARKER), "w", encoding="utf-8") as f:
            json.dump({"written_by": "fipo_jax", "time": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        _give_ordinary_modes(staging)
        previous = None
        if os.path.exists(path):
            previous = f"{path}.replaced-{stamp}"
            os.rename(path, previous)
        os.rename(staging, path)
        if previous:
            shutil.rmtree(previous)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, Exception) and disk_full(err):
            raise _disk_full_error(path) from None
        raise
