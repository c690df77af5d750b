"""Multi-host (multi-process) runs: start-up, host views of global arrays, agreement checks.

fipo_jax runs one Python process per host (a TPU-pod host, or a GPU node); together they form
one JAX program over all devices ("multi-controller" JAX). The trainer's design for it:

- Device work is SPMD over the global mesh: the sampler, the old-log-prob pass and the updates
  are jitted on global arrays (parameters sharded by the logical-axis rules, batches split over
  the ``data`` axis), exactly the single-host code path with a bigger mesh.
- Host work is replicated: every process reads the same prompts in the same order, receives the
  full rollout batch (`to_host` gathers it), scores it, and makes the same dynamic-sampling
  decisions, so all processes feed identical host arrays to the next jitted call. Scoring is
  repeated on every host, which costs no more wall-clock than a single driver scoring it (as
  verl's reward manager does) and needs no second, scatter/gather code path.
- Only process 0 writes files other than checkpoints (metrics.jsonl, plots, summary, config);
  Orbax checkpoints are written by all processes together and need a run directory on a
  filesystem every host sees (NFS, GCS FUSE, ...).

On one host with one process, every function here is a cheap no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from fipo_jax.core import _checks


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
    timeout_s: float = 300.0,
) -> None:
    """`jax.distributed.initialize`, called before any other JAX use, with clear errors.

    With no arguments JAX detects the cluster itself (Cloud TPU pods, SLURM, Open MPI,
    Kubernetes, mpi4py; the coordinator may also come from ``JAX_COORDINATOR_ADDRESS``). On
    CPU, cross-process collectives use gloo. It says which processes it waits for; if they have
    not all joined within ``timeout_s`` seconds, the process prints one line and exits with code 2
    (JAX itself would abort with a stack trace once its own, longer deadline passes).
    """
    explicit = (coordinator_address, num_processes, process_id)
    _checks.require(all(v is None for v in explicit) or all(v is not None for v in explicit),
                    "give all of coordinator_address, num_processes and process_id, or none of them "
                    f"(auto-detection); got {coordinator_address!r}, {num_processes!r}, {process_id!r}")
    _checks.require(num_processes is None or (process_id is not None  # set with num_processes (checked above)
                                              and num_processes >= 1 and 0 <= process_id < num_processes),
                    "need num_processes >= 1 and 0 <= process_id < num_processes, "
                    f"got {num_processes} and {process_id}")
    _checks.check_number("timeout_s (seconds)", timeout_s, minimum=0, exclusive_minimum=True)
    who = ("the processes the cluster environment names" if num_processes is None else
           f"all {num_processes} processes at coordinator {coordinator_address} (this is process {process_id})")
    print(f"[distributed] waiting up to {timeout_s:.0f} s for {who}", file=sys.stderr, flush=True)
    watchdog = threading.Timer(timeout_s, _give_up, args=(
        f"not every process joined within {timeout_s:.0f} s ({who}): start each with the same --distributed and "
        f"--num-processes and its own --process-id, check the coordinator's host and port are reachable, or "
        f"raise --distributed-timeout",))
    watchdog.daemon = True
    watchdog.start()
    # Only selects the CPU backend's collectives; harmless on GPU/TPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=int(timeout_s) + 60)
    finally:
        watchdog.cancel()


def _give_up(message: str) -> None:
    """The start-up watchdog: one line, exit code 2 (the main thread is blocked inside JAX)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def is_primary() -> bool:
    """True on the process that writes logs, plots and summaries (process 0)."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """A numpy copy of every array in `tree`, whole, on every process.

    Fully addressable arrays are copied; fully replicated ones are read from a local shard;
    arrays sharded across processes are all-gathered (a collective: every process must call
    this with the same tree). Non-array leaves pass through.
    """

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def fingerprint(value: Any) -> str:
    """A short digest of a JSON-serialisable value (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_on_all_processes(value: Any, what: str) -> None:
    """Raises if `value` (JSON-serialisable) differs between processes, naming `what`.

    Replicated host logic is only correct when every process starts from the same config,
    data and code; a silent mismatch would train on inconsistent batches.
    """
    if jax.process_count() == 1:
        return
    digest = np.frombuffer(bytes.fromhex(fingerprint(value)), np.uint8).astype(np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(digest))
    differing = [i for i in range(gathered.shape[0]) if not np.array_equal(gathered[i], gathered[0])]
    if differing:
        raise RuntimeError(f"{what} differs between processes: process 0 and process(es) {differing} "
                           "(every host must run the same config, code and data files)")


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
