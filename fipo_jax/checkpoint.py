"""Orbax checkpoints of the full RL state: parameters, optimizer state, step, prompt
iterator position, RNG seed and the run config.

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed at any moment (even mid-save) leaves only complete checkpoints behind; the manager
keeps the last ``keep_checkpoints``. Resuming compares the saved config fingerprint with the
current one and refuses a run whose settings changed in a way that matters.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from fipo_jax.config import ConfigError, TrainConfig


def _diff(saved, current, prefix=""):
    """Dotted paths where two nested dicts differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _diff(saved.get(key), current.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    saved = list(saved) if isinstance(saved, tuple) else saved
    current = list(current) if isinstance(current, tuple) else current
    return [] if saved == current else [f"{prefix}: checkpoint {saved!r} vs now {current!r}"]


class RunCheckpointer:
    def __init__(self, directory: str, config: TrainConfig):
        self.directory = os.path.abspath(directory)
        self.config = config
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, trainer) -> None:
        meta = {"step": trainer.step_index, "iterator": trainer.iterator.state(), "seed": self.config.seed,
                "fingerprint": json.loads(json.dumps(self.config.fingerprint()))}
        self.manager.save(trainer.step_index, args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.state(trainer.model, nnx.Param)),
            opt_state=ocp.args.StandardSave(trainer.opt_state),
            meta=ocp.args.JsonSave(meta),
        ))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, trainer) -> int | None:
        """Load the newest complete checkpoint into `trainer`; its step, or None if none."""
        step = self.manager.latest_step()
        if step is None:
            return None
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        differences = _diff(meta["fingerprint"], json.loads(json.dumps(self.config.fingerprint())))
        if differences:
            raise ConfigError(f"the run directory's checkpoint (step {step}) was made with different settings; use "
                              f"a new --run-dir or the original config. Differences:\n  " + "\n  ".join(differences))
        params = nnx.state(trainer.model, nnx.Param)
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(params)),
            opt_state=ocp.args.StandardRestore(abstract(trainer.opt_state)),
        ))
        nnx.update(trainer.model, restored["params"])
        trainer.opt_state = restored["opt_state"]
        trainer.iterator.restore(meta["iterator"])
        trainer.step_index = int(meta["step"])
        return step
