"""Device meshes and batch placement.

Every jitted training computation runs under a mesh from the start — one device by
default — so scaling out changes the mesh shape, not the code path. Mesh axes are named
``data``, ``fsdp``, ``tensor`` (in that order for as many axes as the shape has); rows of
a batch are split over ``data``. Parameter placement by logical axes lives in
`fipo_jax.models.hf_io` (`DEFAULT_RULES`, `param_shardings`); multi-host start-up and host
views of global arrays in `fipo_jax.distributed`.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(shape: tuple[int, ...] = (1,), devices=None) -> Mesh:
    """A mesh of `shape` over the first prod(shape) devices, axes named data/fsdp/tensor.

    Devices are taken in `jax.devices()` order (process-major), so with several processes
    the leading ``data`` axis spans hosts and the inner axes stay within a host.

    Built with `jax.sharding.Mesh` directly (Auto axis types), since `jax.make_mesh` defaults
    to Explicit axes that break `with_sharding_constraint` and sharded gathers.
    """
    if not shape or len(shape) > len(MESH_AXES) or any(int(s) < 1 for s in shape):
        raise ValueError(f"mesh shape must have 1..{len(MESH_AXES)} positive sizes, got {shape}")
    all_devices = devices is None
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(shape)
    if jax.process_count() > 1 and all_devices and need != len(devices):
        raise ValueError(f"a multi-process run needs a mesh over all {len(devices)} devices of its "
                         f"{jax.process_count()} processes, got mesh shape {shape} ({need} devices)")
    if need > len(devices):
        raise ValueError(f"mesh shape {shape} needs {need} devices, only {len(devices)} available "
                         f"(for CPU tests set XLA_FLAGS=--xla_force_host_platform_device_count={need})")
    return Mesh(np.asarray(devices[:need]).reshape(shape), MESH_AXES[: len(shape)])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over the `data` axis, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Place host arrays on the mesh, rows split over `data` (rows must divide evenly)."""
    size = mesh.shape["data"]
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.shape[0] % size:
            raise ValueError(f"batch field {key!r} has {value.shape[0]} rows, not divisible by the data axis ({size})")
        out[key] = jax.device_put(value, sharding)
    return out
