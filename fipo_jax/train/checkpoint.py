"""Orbax checkpoints of a state pytree and its JSON metadata, knowing nothing of the trainer.

    checkpointer.save(step, state, metadata)
    state, metadata = checkpointer.restore(abstract_state)      # the newest complete step

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
at any moment (even mid-save) leaves only complete checkpoints behind; the manager keeps the last
``max_to_keep``. `restore` places every array as ``abstract_state`` says (shape, dtype and
sharding of each leaf: `jax.ShapeDtypeStruct`s, e.g. from `abstract_like`), so a sharded state
is read straight into its shards. What the metadata means (config fingerprint, data position)
is the caller's business; `config_differences` helps compare a saved config with the current one.

A damaged directory (a truncated or garbage tensor file, unreadable metadata or metadata that
lacks what the caller declared required, an empty step folder, non-finite values) costs one
checkpoint, never the run: `restore_newest` falls back to the newest checkpoint that restores and
moves each damaged one aside, saying why. A failed tensor read leaves TensorStore reads in flight
whose completions reach Orbax's already closed event loop; the tracebacks Python would print for
them (``RuntimeError: Event loop is closed``, one per read) are dropped (`quiet_closed_loop_callbacks`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp

import fipo_jax._requires.train  # noqa: F401  one-line ImportError without fipo_jax[train]

# isort: split
import orbax.checkpoint as ocp

from fipo_jax.models.file_checks import nonfinite_tensors

# Bumped when the saved layout changes; a checkpoint of another format is refused with a clear message.
# v3: decoder layers stacked on a leading axis (one parameter per kind, not one per layer).
FORMAT = "fipo_jax.rl_state.v3"


class CheckpointFormatError(ValueError):
    """The checkpoint was written by a fipo_jax version whose state layout differs (one line: the
    folder, both formats, what to do)."""


class CheckpointMetadataError(ValueError):
    """A checkpoint's metadata lacks a required key or holds one of the wrong type (damage)."""


# What a checkpoint's metadata must hold: key -> type, or a nested schema for a dict (its own keys).
MetadataSchema = Mapping[str, "type | tuple[type, ...] | MetadataSchema"]


def metadata_problem(metadata: Any, schema: MetadataSchema, prefix: str = "") -> str | None:
    """What in ``metadata`` breaks ``schema`` (the first missing key or wrong type), or None.

    >>> metadata_problem({"iterator": {"offset": "3"}}, {"iterator": {"offset": int}, "fingerprint": dict})
    "'iterator.offset' is str, not int"
    >>> metadata_problem({"iterator": {"offset": 3}}, {"iterator": {"offset": int}, "fingerprint": dict})
    "no 'fingerprint'"
    """
    for key, want in schema.items():
        name = f"{prefix}{key}"
        if not isinstance(metadata, dict) or key not in metadata:
            return f"no {name!r}"
        value = metadata[key]
        if isinstance(want, Mapping):
            if not isinstance(value, dict):
                return f"{name!r} is {type(value).__name__}, not dict"
            problem = metadata_problem(value, want, f"{name}.")
        else:
            types = want if isinstance(want, tuple) else (want,)
            ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
            problem = None if ok else f"{name!r} is {type(value).__name__}, not {'/'.join(t.__name__ for t in types)}"
        if problem:
            return problem
    return None


def abstract_like(state: Any) -> Any:
    """`jax.ShapeDtypeStruct` (with sharding) of every array leaf of ``state``."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def config_differences(saved: Any, current: Any, prefix: str = "", defaults: Any = None) -> list[str]:
    """Dotted paths where two nested dicts differ, as "path: checkpoint X vs now Y". With ``defaults``
    (a dict shaped like ``current``), a key the checkpoint lacks is no difference while its value now
    is the default: a field added since the checkpoint was written, at the value it had implicitly."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        defaults = defaults if isinstance(defaults, dict) else {}
        for key in sorted(set(saved) | set(current)):
            if key not in saved and key in defaults and current.get(key) == defaults[key]:
                continue
            out += config_differences(saved.get(key), current.get(key), f"{prefix}.{key}" if prefix else key,
                                      defaults.get(key))
        return out
    saved = list(saved) if isinstance(saved, tuple) else saved
    current = list(current) if isinstance(current, tuple) else current
    return [] if saved == current else [f"{prefix}: checkpoint {saved!r} vs now {current!r}"]


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths of the floating-point leaves of ``tree`` that hold a NaN or ±inf (`nonfinite_tensors`)."""
    return nonfinite_tensors({jax.tree_util.keystr(path): jnp.asarray(x)
                              for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]})


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore_newest` found: the step restored (None if none could be) and
    the damaged checkpoints it set aside, as (step, reason, where it was moved)."""

    step: int | None
    state: Any
    metadata: dict
    skipped: tuple[tuple[int, str, str], ...]


class Checkpointer:
    """Numbered checkpoints of (state, metadata) in ``directory``.

    Args:
      directory: created if missing; on a filesystem every process sees (multi-host runs write
        one checkpoint together).
      max_to_keep: older complete checkpoints are deleted.
      required_metadata: what the caller's metadata must hold (`MetadataSchema`: key -> type, or
        a nested schema). `save` refuses metadata that lacks it (a bug of the caller); a saved
        checkpoint whose metadata lacks it is damage: `restore_newest` sets it aside.
    """

    def __init__(self, directory: str, max_to_keep: int | None = None,
                 required_metadata: MetadataSchema | None = None):
        self.directory = os.path.abspath(directory)
        self.required_metadata = dict(required_metadata or {})
        quiet_closed_loop_callbacks()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, metadata: dict) -> None:
        """Write ``state`` (any pytree of arrays) and ``metadata`` (JSON-serialisable, holding
        ``required_metadata``) as ``step``."""
        if problem := metadata_problem(metadata, self.required_metadata):
            raise CheckpointMetadataError(f"metadata for checkpoint {step} in {self.directory}: {problem} "
                                          f"(required: {', '.join(_schema_keys(self.required_metadata))})")
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            metadata=ocp.args.JsonSave({"format": FORMAT, **metadata}),
        ))

    def metadata(self, step: int | None = None) -> dict:
        """The metadata saved with ``step`` (default: the newest), without reading the state."""
        step = self._resolve(step)
        folder = os.path.join(self.directory, str(step))
        meta = {}
        if os.path.isdir(os.path.join(folder, "metadata")):  # older layouts lack it
            meta = self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
        elif not any(os.path.isdir(os.path.join(folder, name)) for name in _listdir(folder)):
            raise FileNotFoundError(f"checkpoint {step} in {self.directory} holds no items (an empty step folder)")
        if meta.get("format") != FORMAT:
            raise CheckpointFormatError(
                f"checkpoint {step} in {self.directory} has format {meta.get('format')!r}, this fipo_jax reads "
                f"{FORMAT!r}; resume it with the fipo_jax version that wrote it, or start a new run directory "
                f"(or move {self.directory} aside to start afresh in this one)")
        meta = {k: v for k, v in meta.items() if k != "format"}
        if problem := metadata_problem(meta, self.required_metadata):
            raise CheckpointMetadataError(f"checkpoint {step} in {self.directory}: the metadata has {problem}")
        return meta

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, metadata) of ``step`` (default: the newest), laid out as ``abstract_state``."""
        step = self._resolve(step)
        metadata = self.metadata(step)
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
        return state, metadata

    def restore_newest(self, abstract_state: Any, check: Callable[[int, dict], None] = lambda step, meta: None
                       ) -> Restored:
        """The newest checkpoint that restores completely, laid out as ``abstract_state``.

        Newer ones that cannot be read (unreadable or missing metadata or tensors, metadata
        without the ``required_metadata``, a tensor that does not match ``abstract_state``,
        non-finite values) are skipped and moved into
        ``<directory>.damaged/`` with a ``reason.txt``, so a later save of the same step works.
        ``check(step, metadata)`` runs before a step's tensors are read; what it raises (e.g. "made
        with a different config") propagates, as does `CheckpointFormatError`: those are not damage —
        except a `CheckpointMetadataError` (metadata the caller finds unusable), which is.
        """
        skipped = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                metadata = self.metadata(step)
            except CheckpointFormatError:
                raise
            except Exception as err:  # noqa: BLE001 - any failure to read is damage, reported below
                skipped.append((step, f"metadata unreadable: {_reason(err)}"))
                continue
            try:
                check(step, metadata)
            except CheckpointMetadataError as err:  # the caller found the metadata unusable: damage too
                skipped.append((step, f"metadata unusable: {_reason(err)}"))
                continue
            try:
                state = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))["state"]
            except Exception as err:  # noqa: BLE001
                skipped.append((step, f"tensors unreadable: {_reason(err)}"))
                continue
            bad = nonfinite_leaves(state)
            if bad:
                skipped.append((step, f"non-finite values in {', '.join(bad[:5])}" + (" …" if len(bad) > 5 else "")))
                continue
            return Restored(step, state, metadata, self._set_aside(skipped))
        return Restored(None, None, {}, self._set_aside(skipped))

    def _set_aside(self, skipped: list[tuple[int, str]]) -> tuple[tuple[int, str, str], ...]:
        """Move damaged step folders to ``<directory>.damaged/<step>-<time>`` (process 0 moves)."""
        out = []
        for step, reason in skipped:
            target = os.path.join(self.directory + ".damaged", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            if jax.process_index() == 0:
                os.makedirs(target, exist_ok=True)
                source = os.path.join(self.directory, str(step))
                if os.path.isdir(source):
                    shutil.move(source, os.path.join(target, str(step)))
                with open(os.path.join(target, "reason.txt"), "w", encoding="utf-8") as f:
                    f.write(reason + "\n")
            out.append((step, reason, target))
        if out:
            self.manager.reload()
        return tuple(out)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def _resolve(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        return step


def _schema_keys(schema: MetadataSchema, prefix: str = "") -> list[str]:
    """The required keys of a schema, dotted: ["fingerprint", "iterator.offset", …]."""
    keys = []
    for key, want in schema.items():
        keys += _schema_keys(want, f"{prefix}{key}.") if isinstance(want, Mapping) else [f"{prefix}{key}"]
    return keys


def _is_closed_loop_callback(unraisable: Any) -> bool:
    """Whether an unraisable exception is a C extension's thread (TensorStore's) scheduling a read's
    completion onto an asyncio loop already closed: ``RuntimeError('Event loop is closed')`` from
    ``call_soon_threadsafe`` called with no Python frame above it. Orbax closes its loop as soon
    as one read of a restore fails; the reads still in flight finish later, and nothing waits for
    them any more (the failure that matters was raised, and is reported as damage)."""
    error, trace = unraisable.exc_value, unraisable.exc_traceback
    if not isinstance(error, RuntimeError) or str(error) != "Event loop is closed" or trace is None:
        return False
    code = trace.tb_frame.f_code
    return code.co_name == "call_soon_threadsafe" and os.path.dirname(code.co_filename) == \
        os.path.dirname(asyncio.__file__)


def quiet_closed_loop_callbacks() -> None:
    """Installs, once, a `sys.unraisablehook` that drops the `_is_closed_loop_callback` events (a
    traceback per read in flight, dozens after one damaged checkpoint) and passes every other
    unraisable exception to the hook that was in place."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable: Any) -> None:
        if not _is_closed_loop_callback(unraisable):
            previous(unraisable)

    setattr(hook, "drops_closed_loop_callbacks", True)  # a mark on the function, read back above
    sys.unraisablehook = hook


def _reason(err: BaseException) -> str:
    """One line of an exception: its type and the first line of its message, shortened."""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:300]}"


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []
