"""Device meshes and the one logical-axis → mesh-axis rules table.

Every jitted training computation runs under a mesh from the start — one device by
default — so scaling out changes the mesh shape, not the code path. Mesh axes are named
``data``, ``fsdp``, ``tensor`` (in that order for as many axes as the shape has).

Every placed array names its dimensions with logical axes — parameters in their nnx
``out_sharding`` metadata (`fipo_jax.models.layers`), batches, sampler rows and the KV cache by
the code that builds them — and `DEFAULT_RULES` maps each logical axis to mesh axes, for the
model's weights (`param_shardings`, weight loading), the update's batch and state
(`fipo_jax.rl_step`), the sampler's rows and checkpoint restore alike. Applying a rule:

    mesh axis absent from the mesh     → size 1 (the mesh shape decides what exists)
    logical axis missing from the table → ShardingRuleError
    mesh axis used by two dimensions    → ShardingRuleError
    dimension not divisible             → ShardingRuleError, unless the rule declares
                                           ``if_indivisible="replicate"``

Errors name the tensor, its shape, its logical axes and the mesh. Multi-host start-up and host
views of global arrays live in `fipo_jax.distributed`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


class ShardingRuleError(ValueError):
    """A logical-axis rule that cannot apply to a tensor on a mesh."""


@dataclasses.dataclass(frozen=True)
class AxisRule:
    """The mesh axes one logical axis is split over (none: replicated), and what a dimension they
    do not divide does: ``"raise"`` (default) or ``"replicate"`` (a declared fallback)."""

    mesh_axes: tuple[str, ...] = ()
    if_indivisible: Literal["raise", "replicate"] = "raise"


def rule(*mesh_axes: str, if_indivisible: Literal["raise", "replicate"] = "raise") -> AxisRule:
    return AxisRule(tuple(mesh_axes), if_indivisible)


DEFAULT_RULES: Mapping[str, AxisRule] = {
    # parameters
    "embed": rule("fsdp"),
    "vocab": rule("tensor"),
    "heads": rule("tensor"),
    "kv_heads": rule("tensor", if_indivisible="replicate"),  # GQA: fewer kv heads than tensor shards
    "mlp": rule("tensor"),
    "head_dim": rule(),
    "norm": rule(),
    # batches, sampler rows, KV cache [batch, kv_heads, length, head_dim]
    "batch": rule("data"),
    "length": rule(),
    "mini_batch": rule(),
    "micro_batch": rule(),
}

RuleLike = AxisRule | str | Sequence[str] | None


def _as_rule(value: RuleLike) -> AxisRule:
    """Plain table entries: a mesh axis, a tuple of them, or None (replicated)."""
    if isinstance(value, AxisRule):
        return value
    if value is None:
        return AxisRule()
    return AxisRule((value,) if isinstance(value, str) else tuple(value))


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, RuleLike] | None = None,
    name: str = "a tensor",
) -> PartitionSpec:
    """PartitionSpec of a tensor whose dimensions have ``logical_axes`` (None: replicated), by
    ``rules`` (default `DEFAULT_RULES`; see the module docstring for how a rule applies)."""
    rules = DEFAULT_RULES if rules is None else rules
    if not logical_axes:
        return PartitionSpec()

    def fail(what: str):
        raise ShardingRuleError(f"cannot shard {name} of shape {tuple(shape)} with logical axes {tuple(logical_axes)} "
                                f"on mesh {dict(mesh.shape)}: {what}")

    if len(logical_axes) != len(shape):
        fail(f"{len(logical_axes)} logical axes for {len(shape)} dimensions")
    used: dict[str, str] = {}
    entries: list[str | tuple[str, ...] | None] = []
    for logical, dim in zip(logical_axes, shape):
        if logical is None:
            entries.append(None)
            continue
        if logical not in rules:
            fail(f"no rule for logical axis {logical!r} (the table has {sorted(rules)})")
        axis_rule = _as_rule(rules[logical])
        axes = tuple(a for a in axis_rule.mesh_axes if a in mesh.shape)
        for a in axes:
            if a in used:
                fail(f"mesh axis {a!r} would split both {used[a]!r} and {logical!r}")
        size = math.prod(mesh.shape[a] for a in axes)
        if dim % size:
            if axis_rule.if_indivisible == "replicate":
                entries.append(None)
                continue
            fail(f"dimension {logical!r} of size {dim} is not divisible by mesh axes {axes} of total size {size}")
        used.update({a: logical for a in axes})
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def logical_sharding(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                     rules: Mapping[str, RuleLike] | None = None, name: str = "a tensor") -> NamedSharding:
    """`NamedSharding` of `logical_to_mesh_spec`."""
    return NamedSharding(mesh, logical_to_mesh_spec(logical_axes, shape, mesh, rules, name))


def param_shardings(tree, mesh: Mesh, rules: Mapping[str, RuleLike] | None = None) -> nnx.State:
    """State of `NamedSharding`s (one per parameter, from its logical axes), e.g. for jit.

    `tree` is a model or its (possibly abstract) state; errors name the parameter's path."""
    state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree

    def to_sharding(path, variable: nnx.Variable) -> nnx.Variable:
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        axes = variable.get_metadata().get("out_sharding")
        return variable.replace(logical_sharding(axes, variable.shape, mesh, rules, name))

    return jax.tree_util.tree_map_with_path(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


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
    """Rows as the table places logical ``batch`` (over ``data``), everything else replicated."""
    axes = tuple(a for a in _as_rule(DEFAULT_RULES["batch"]).mesh_axes if a in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(axes[0] if len(axes) == 1 else (axes or None)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Place host arrays on the mesh, rows split as logical ``batch`` (rows must divide evenly)."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        axes = ("batch",) + (None,) * (value.ndim - 1)
        out[key] = jax.device_put(value, logical_sharding(axes, value.shape, mesh, name=f"batch field {key!r}"))
    return out
