"""Orbax checkpoints of a state pytree and its JSON metadata, knowing nothing of the trainer.

    checkpointer.save(step, state, metadata)
    state, metadata = checkpointer.restore(abstract_state)      # the newest complete step

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
at any moment (even mid-save) leaves only complete checkpoints behind; the manager keeps the last
``max_to_keep``. `restore` places every array as ``abstract_state`` says (shape, dtype and
sharding of each leaf: `jax.ShapeDtypeStruct`s, e.g. from `abstract_like`), so a sharded state
is read straight into its shards. What the metadata means (config fingerprint, data position)
is the caller's business; `config_differences` helps compare a saved config with the current one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

# Bumped when the saved layout changes; a checkpoint of another format is refused with a clear message.
FORMAT = "fipo_jax.rl_state.v2"


class CheckpointFormatError(ValueError):
    """The checkpoint was written by a fipo_jax version whose state layout differs."""


def abstract_like(state: Any) -> Any:
    """`jax.ShapeDtypeStruct` (with sharding) of every array leaf of ``state``."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two nested dicts differ, as "path: checkpoint X vs now Y"."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += config_differences(saved.get(key), current.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    saved = list(saved) if isinstance(saved, tuple) else saved
    current = list(current) if isinstance(current, tuple) else current
    return [] if saved == current else [f"{prefix}: checkpoint {saved!r} vs now {current!r}"]


class Checkpointer:
    """Numbered checkpoints of (state, metadata) in ``directory``.

    Args:
      directory: created if missing; on a filesystem every process sees (multi-host runs write
        one checkpoint together).
      max_to_keep: older complete checkpoints are deleted.
    """

    def __init__(self, directory: str, max_to_keep: int | None = None):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, metadata: dict) -> None:
        """Write ``state`` (any pytree of arrays) and ``metadata`` (JSON-serialisable) as ``step``."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            metadata=ocp.args.JsonSave({"format": FORMAT, **metadata}),
        ))

    def metadata(self, step: int | None = None) -> dict:
        """The metadata saved with ``step`` (default: the newest), without reading the state."""
        step = self._resolve(step)
        meta = {}
        if os.path.isdir(os.path.join(self.directory, str(step), "metadata")):  # older layouts lack it
            meta = self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
        if meta.get("format") != FORMAT:
            raise CheckpointFormatError(
                f"checkpoint {step} in {self.directory} has format {meta.get('format')!r}, this fipo_jax reads "
                f"{FORMAT!r}; resume it with the version that wrote it, or start a new run directory")
        return {k: v for k, v in meta.items() if k != "format"}

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, metadata) of ``step`` (default: the newest), laid out as ``abstract_state``."""
        step = self._resolve(step)
        metadata = self.metadata(step)
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
        return state, metadata

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def _resolve(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        return step
