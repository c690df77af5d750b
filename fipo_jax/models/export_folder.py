"""Where an export may go, and how it is written: never mixed with other files, never half written.

    check_export_folder(path)           # raises ExportFolderError before anything is built
    with replacing(path) as folder:     # write everything into `folder`; on success it becomes `path`
        ...

An export goes to a new or empty folder, or replaces a previous export of this project whole (it
carries `EXPORT_MARKER`). A folder holding anything else — another model's shards and config, a
run directory — is refused, naming it and what it holds, because files of two models side by side
load as neither (a new ``model.safetensors`` next to an old ``model.safetensors.index.json`` loads
the old weights in one library and the new in another).

The files are written into a temporary folder beside ``path`` that is renamed into place only once
complete; a previous export is moved out first and deleted after. A failure leaves ``path`` as it
was and removes the temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from typing import Iterator

EXPORT_MARKER = "fipo_jax_export.json"


class ExportFolderError(ValueError):
    """The export folder holds files this export would mix with or overwrite (names them)."""


def check_export_folder(path: str | os.PathLike) -> None:
    """Raises `ExportFolderError` unless ``path`` is new, an empty folder, or a previous export."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise ExportFolderError(f"export folder {path} is a file; choose a new or empty folder")
    contents = sorted(os.listdir(path))
    if contents and EXPORT_MARKER not in contents:
        shown = ", ".join(contents[:6]) + (f" and {len(contents) - 6} more" if len(contents) > 6 else "")
        raise ExportFolderError(f"export folder {path} already holds files ({shown}) that the export would mix with "
                                f"or overwrite; choose a new or empty folder")


@contextlib.contextmanager
def replacing(path: str | os.PathLike, write: bool = True) -> Iterator[str]:
    """A fresh temporary folder beside ``path`` to write an export into; on success it replaces
    ``path`` (checked first with `check_export_folder`). ``write=False`` (a process that does not
    write, on a multi-host run) yields ``path`` and touches nothing."""
    path = os.fspath(path)
    if not write:
        yield path
        return
    check_export_folder(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    stamp = f"{os.getpid()}-{time.strftime('%Y%m%d%H%M%S')}"
    staging = f"{path}.writing-{stamp}"
    os.makedirs(staging)
    try:
        yield staging
        with open(os.path.join(staging, EXPORT_MARKER), "w", encoding="utf-8") as f:
            json.dump({"written_by": "fipo_jax", "time": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        previous = None
        if os.path.exists(path):
            previous = f"{path}.replaced-{stamp}"
            os.rename(path, previous)
        os.rename(staging, path)
        if previous:
            shutil.rmtree(previous)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
