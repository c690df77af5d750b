"""The rollout pipeline: which weights sample each step, how they reach the rollout devices, and
the producer thread that draws the next steps' rollouts while the update runs.

Step t (0-based) trains the weights of version t (t updates applied) into version t + 1. With
``rollout.max_staleness`` k its rollouts are drawn with version

    v(t) = max(t₀, t − k)            (t₀: the step the trainer started or resumed at)

so every sample lags its update by t − v(t) ≤ k versions, and by exactly k from step t₀ + k on.
k = 0 is the sequential loop: sample, then update, with the same weights. For k ≥ 1 a producer
thread draws step t's rollouts (generation, scoring, packing) as soon as version v(t) is published,
while the main thread updates: the rollouts of steps t + 1 … t + k are made during update t. Step t
cannot start before version t − k exists, so at most k + 1 batches ever wait (the queue's bound).
The schedule is fixed by (t₀, k), not by timing: a run is deterministic and equals a sequential
loop fed the same stale weights (`sampling_version`).

The weights reach the rollout engine through `WeightSync`: on split device groups
(``rollout_mesh_shape``) a resharding ``jax.device_put`` from the training mesh to the rollout
mesh (device to device, no host round trip); on a shared mesh with k ≥ 1 a device copy (the update
donates the state, so the sampler cannot read the state's own buffers while it runs); on a shared
mesh with k = 0 nothing moves.

A checkpoint records the prompt position after the last trained step's rollouts; rollouts in flight
(drawn for steps not yet trained) are dropped and, on resume, drawn again from the same prompts
with the checkpoint's weights (t₀ = its step): nothing lost, nothing trained twice.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

import fipo_jax._requires.train  # noqa: F401  one-line ImportError without fipo_jax[train]

# isort: split
from flax import nnx

from fipo_jax.parallel.sharding import param_shardings


def sampling_version(step: int, start: int, max_staleness: int) -> int:
    """v(t) = max(t₀, t − k): the weights version that samples step ``step``'s rollouts."""
    return max(start, step - max_staleness)


@dataclasses.dataclass(frozen=True)
class Produced:
    """One step's rollouts, ready for its update (host arrays).

    Attributes:
      step: the step they are for; version: the weights version that drew them.
      rollouts: the kept batch (`fipo_jax.train.rollouts.Rollouts`).
      batch: the update's `RLBatch` on the host; metrics: the collection's metrics and the batch
        layout's, ``time/rollout_s`` (generation and scoring) and the prompt span.
      prompt_position: the prompt iterator's state after this step's prompts (what a checkpoint
        after this step records).
    """

    step: int
    version: int
    rollouts: Any
    batch: Any
    metrics: dict[str, float]
    prompt_position: dict[str, int]


class WeightSync:
    """Puts the training parameters where the rollout engine samples from (module docstring).

    ``sync(params)`` → (policy, metrics): the policy to sample from, ``time/weight_sync_s`` (until
    the weights are in place) and ``rollout/weight_sync_bytes`` (the parameter bytes moved or copied;
    0 when the sampler reads the state's own)."""

    def __init__(self, graphdef, rest, train_mesh, rollout_mesh, copy: bool):
        self.graphdef = graphdef
        self.split = rollout_mesh is not train_mesh
        self.moves = self.split or copy
        # The untrained part (a LoRA run's frozen base) moves once, placed by the rules table.
        self.rest = jax.device_put(rest, param_shardings(rest, rollout_mesh)) if self.split else rest
        self._shardings: Any = None
        self.rollout_mesh = rollout_mesh

    def __call__(self, params) -> tuple[Any, dict[str, float]]:
        start = time.perf_counter()
        if self.split:
            if self._shardings is None:  # the one rules table, on the rollout mesh
                self._shardings = param_shardings(params, self.rollout_mesh)
            params = jax.block_until_ready(jax.device_put(params, self._shardings))
        elif self.moves:
            params = jax.block_until_ready(_copy(params))
        moved = sum(x.nbytes for x in jax.tree.leaves(params)) if self.moves else 0
        return nnx.merge(self.graphdef, params, self.rest), {"time/weight_sync_s": time.perf_counter() - start,
                                                             "rollout/weight_sync_bytes": float(moved)}


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))

# `WeightSync`'s metrics of a step that moved no weights (its rollouts were drawn ahead).
NOTHING_MOVED = {"time/weight_sync_s": 0.0, "rollout/weight_sync_bytes": 0.0}


Produce = Callable[[int, Any, int], Produced]  # (step, policy, version) → that step's rollouts


class RolloutPipeline:
    """The producer thread of a run with ``rollout.max_staleness`` k ≥ 1 (module docstring).

    Args:
      produce: draws one step's rollouts from a policy of a given version.
      start: t₀, the first step to draw; end: the step after the last one.
      max_staleness: k ≥ 1.
      policy: the weights of version t₀ (`publish` adds later ones).
    """

    def __init__(self, produce: Produce, start: int, end: int, max_staleness: int, policy):
        self._produce, self.start, self.end, self.k = produce, start, end, max_staleness
        self._cond = threading.Condition()
        self._policies: dict[int, Any] = {start: policy}
        self._ready: dict[int, Produced | BaseException] = {}
        self._stop = False
        self.max_waiting = 0  # the most batches that waited at once (≤ k + 1)
        self._thread = threading.Thread(target=self._run, name="fipo-rollouts", daemon=True)
        self._thread.start()

    def needs(self, version: int) -> bool:
        """Whether a step still to be drawn samples with ``version`` (else `publish` can be skipped)."""
        return version + self.k < self.end

    def publish(self, version: int, policy) -> None:
        """The weights of ``version`` (after ``version`` updates), for the steps that sample with them."""
        with self._cond:
            self._policies[version] = policy
            self._cond.notify_all()

    def get(self, step: int) -> Produced:
        """Step ``step``'s rollouts, waiting for them; what the producer raised for it is raised here."""
        with self._cond:
            self._cond.wait_for(lambda: step in self._ready)
            item = self._ready.pop(step)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop drawing (a step being drawn finishes first) and drop what waits."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        self._ready.clear()
        self._policies.clear()

    def _run(self) -> None:
        for step in range(self.start, self.end):
            version = sampling_version(step, self.start, self.k)
            with self._cond:
                self._cond.wait_for(lambda: self._stop or version in self._policies)
                if self._stop:
                    return
                policy = self._policies[version]
            try:
                item: Produced | BaseException = self._produce(step, policy, version)
            except BaseException as err:  # noqa: BLE001 - raised again in the main thread by `get`
                item = err
            with self._cond:
                self._ready[step] = item
                self.max_waiting = max(self.max_waiting, len(self._ready))
                if sampling_version(step + 1, self.start, self.k) != version:
                    self._policies.pop(version, None)  # no later step samples with it
                self._cond.notify_all()
            if isinstance(item, BaseException):
                return
