"""Device meshes and the one logical-axis → mesh-axis rules table.

Every jitted training computation runs under a mesh from the start — one device by
default — so scaling out changes the mesh shape, not the code path. Mesh axes are named
``data``, ``fsdp``, ``tensor`` (in that order for as many axes as the shape has).

Every placed array names its dimensions with logical axes — parameters in their nnx
``out_sharding`` metadata (`fipo_jax.models.layers.LOGICAL_AXES`), batches, sampler rows and the
KV cache (`fipo_jax.models.kv_cache.KV_CACHE_AXES`) by the code that builds them — and
`DEFAULT_RULES` maps each logical axis to mesh axes, for the model's weights (`param_shardings`,
weight loading), the update's batch and state (`fipo_jax.train.update`), the sampler's rows
(`batch_sharding`) and checkpoint restore alike. `logical_to_mesh_spec` applies a rule: a rule that
cannot apply raises `ShardingRuleError` (naming the tensor, its shape, its logical axes and the
mesh) instead of silently replicating; only a rule that declares ``if_indivisible="replicate"``
falls back. Multi-host start-up and host views of global arrays live in `fipo_jax.parallel.distributed`.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Literal, Mapping, Sequence

import jax
import numpy as np

import fipo_jax._requires.models  # noqa: F401  one-line ImportError without fipo_jax[models]

# isort: split
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

IF_INDIVISIBLE = ("raise", "replicate")


class ShardingRuleError(ValueError):
    """A logical-axis rule that cannot apply to a tensor on a mesh."""


@dataclasses.dataclass(frozen=True)
class AxisRule:
    """The mesh axes one logical axis is split over (none: replicated), and what a dimension they
    do not divide does: ``"raise"`` (default) or ``"replicate"`` (a declared fallback)."""

    mesh_axes: tuple[str, ...] = ()
    if_indivisible: Literal["raise", "replicate"] = "raise"

    def __post_init__(self) -> None:
        axes = self.mesh_axes
        named = isinstance(axes, tuple) and all(isinstance(a, str) and a for a in axes)
        if not named or len(set(axes)) != len(axes):
            raise ShardingRuleError(f"AxisRule.mesh_axes must be a tuple of distinct mesh axis names, got {axes!r}")
        if self.if_indivisible not in IF_INDIVISIBLE:
            raise ShardingRuleError(f"AxisRule.if_indivisible must be one of {IF_INDIVISIBLE}, "
                                    f"got {self.if_indivisible!r}")


def rule(*mesh_axes: str, if_indivisible: Literal["raise", "replicate"] = "raise") -> AxisRule:
    """``AxisRule(mesh_axes, if_indivisible)``: ``rule()`` replicated, ``rule("tensor")`` split."""
    return AxisRule(tuple(mesh_axes), if_indivisible)


# The one table. A mesh axis the mesh lacks counts as size 1, so one table serves every mesh shape.
DEFAULT_RULES: Mapping[str, AxisRule] = types.MappingProxyType({
    # parameters (fipo_jax.models.layers.LOGICAL_AXES)
    "layers": rule(),             # never split: the layer scan reads one whole layer per step
    "vocab": rule("tensor"),      # no fallback: real vocabularies are multiples of 128, CharTokenizer's 20
    "embed": rule("fsdp"),
    "heads": rule("tensor"),
    "kv_heads": rule("tensor", if_indivisible="replicate"),  # GQA: 1 or 2 kv heads on a 4-way tensor axis
    "head_dim": rule(),
    "mlp": rule("tensor"),
    "norm": rule(),
    # batches, sampler rows, KV cache [batch, layers, kv_heads, length, head_dim] (models.kv_cache.KV_CACHE_AXES)
    "batch": rule("data"),        # rows of a batch / of the sampler / of the KV cache
    "length": rule(),             # sequence positions, cache slots
    "mini_batch": rule(),         # the update's [mini_batch, micro_batch, batch, ...] layout (train.update)
    "micro_batch": rule(),
})

# Logical axes no rules table may split (a custom table that tries raises ShardingRuleError).
NEVER_SPLIT = frozenset({"layers"})

RuleLike = AxisRule | str | Sequence[str] | None


def _as_rule(value: RuleLike) -> AxisRule:
    """A table entry as an `AxisRule`; custom tables may also write a mesh axis, a tuple of them or
    None (replicated), which raise when indivisible."""
    if isinstance(value, AxisRule):
        return value
    if value is None:
        return AxisRule()
    if isinstance(value, str):
        return AxisRule((value,))
    if isinstance(value, (tuple, list)):
        return AxisRule(tuple(value))
    raise ShardingRuleError(f"a rules-table entry must be an AxisRule, a mesh axis name, a tuple of them or None, "
                            f"got {value!r}")


def _present(axis_rule: AxisRule, mesh) -> tuple[str, ...]:
    """The rule's mesh axes that this mesh has (the others count as size 1)."""
    return tuple(a for a in axis_rule.mesh_axes if a in mesh.shape)


def _rule_for(logical: str, rules: Mapping[str, RuleLike] | None) -> AxisRule:
    rules = DEFAULT_RULES if rules is None else rules
    if logical not in rules:
        raise ShardingRuleError(f"no rule for logical axis {logical!r} (the table has {sorted(rules)})")
    return _as_rule(rules[logical])


def _spec_entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, RuleLike] | None = None,
    name: str = "a tensor",
) -> PartitionSpec:
    """PartitionSpec of a tensor ``name`` of ``shape`` whose dimensions have ``logical_axes``.

    Each logical axis is looked up in ``rules`` (default `DEFAULT_RULES`); a None logical axis, or
    no logical axes at all (a variable without ``out_sharding``), is replicated. Applying a rule:

        ==========================================  =========================================
        case                                        result
        ==========================================  =========================================
        rule's mesh axes all present, product       dimension split over them
        divides the dimension
        a mesh axis absent from the mesh            counts as size 1 (the mesh shape decides
                                                    which axes exist)
        logical axis not in the table               ShardingRuleError
        a mesh axis named by the rules of two       ShardingRuleError (whether or not the mesh
        dimensions of the tensor (collision)        has that axis: a table bug shows on any mesh)
        dimension not divisible by the product of   ShardingRuleError, unless the rule declares
        its present mesh axes' sizes                ``if_indivisible="replicate"``: replicated
        fewer or more logical axes than dimensions  ShardingRuleError
        a rule splitting an axis in `NEVER_SPLIT`   ShardingRuleError
        ==========================================  =========================================

    The error reads ``cannot shard <name> of shape <shape> with logical axes <axes> on mesh
    {axis: size}: <what failed>``. ``mesh`` may be a `Mesh` or an `AbstractMesh` (only its axis
    sizes are read).
    """
    rules = DEFAULT_RULES if rules is None else rules
    if logical_axes is None or (len(logical_axes) == 0 and len(shape) == 0):
        return PartitionSpec()
    logical_axes = tuple(logical_axes)

    def fail(what: str):
        raise ShardingRuleError(f"cannot shard {name} of shape {tuple(shape)} with logical axes {logical_axes} "
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
        try:
            axis_rule = _as_rule(rules[logical])
        except ShardingRuleError as error:
            fail(f"the rule for {logical!r} is malformed: {error}")
        if logical in NEVER_SPLIT and axis_rule.mesh_axes:
            fail(f"logical axis {logical!r} is never split (the layer scan reads one whole layer per step), "
                 f"but the rules table maps it to {axis_rule.mesh_axes}")
        for a in axis_rule.mesh_axes:
            if a in used:
                fail(f"mesh axis {a!r} would split both {used[a]!r} and {logical!r}")
            used[a] = logical
        axes = _present(axis_rule, mesh)
        size = math.prod(mesh.shape[a] for a in axes)
        if dim % size:
            if axis_rule.if_indivisible == "replicate":
                entries.append(None)
                continue
            fail(f"dimension {logical!r} of size {dim} is not divisible by mesh axes {axes} of total size {size} "
                 f"(use a mesh that divides it, or a rule declaring if_indivisible='replicate')")
        entries.append(_spec_entry(axes))
    return PartitionSpec(*entries)


def ways(logical: str, mesh, rules: Mapping[str, RuleLike] | None = None) -> int:
    """How many ways the rules table splits a ``logical`` axis on ``mesh`` (a `Mesh`, an
    `AbstractMesh` or a {axis: size} dict; axes the mesh lacks count as size 1)."""
    shape = mesh if isinstance(mesh, Mapping) else dict(mesh.shape)
    return math.prod(shape.get(axis, 1) for axis in _rule_for(logical, rules).mesh_axes)


def logical_sharding(logical_axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                     rules: Mapping[str, RuleLike] | None = None, name: str = "a tensor") -> NamedSharding:
    """`NamedSharding` of `logical_to_mesh_spec` (same arguments, same errors)."""
    return NamedSharding(mesh, logical_to_mesh_spec(logical_axes, shape, mesh, rules, name))


def param_shardings(tree, mesh: Mesh, rules: Mapping[str, RuleLike] | None = None) -> nnx.State:
    """State of `NamedSharding`s (one per variable, from its ``out_sharding`` logical axes), e.g.
    for jit or ``jax.device_put``.

    `tree` is a model or its (possibly abstract) state; an error names the parameter's path,
    e.g. ``layers.self_attn.q_proj.kernel``."""
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
    need = math.prod(shape)
    devices = _devices_for(need, f"mesh shape {shape}", devices)
    return Mesh(np.asarray(devices[:need]).reshape(shape), MESH_AXES[: len(shape)])


def _devices_for(need: int, what: str, devices=None) -> list:
    """The devices ``what`` (meshes needing ``need`` devices) is laid over: ``devices``, or all of
    `jax.devices()` — which a multi-process run's meshes must cover exactly."""
    all_devices = devices is None
    devices = list(jax.devices() if devices is None else devices)
    if jax.process_count() > 1 and all_devices and need != len(devices):
        raise ValueError(f"a multi-process run needs a mesh over all {len(devices)} devices of its "
                         f"{jax.process_count()} processes, got {what} ({need} devices)")
    if need > len(devices):
        raise ValueError(f"{what} needs {need} devices, only {len(devices)} available "
                         f"(for CPU tests set XLA_FLAGS=--xla_force_host_platform_device_count={need})")
    return devices


def make_meshes(train_shape: tuple[int, ...], rollout_shape: tuple[int, ...] = (), devices=None) -> tuple[Mesh, Mesh]:
    """(training mesh, rollout mesh): the training mesh over the first prod(``train_shape``) devices
    and, for a non-empty ``rollout_shape``, the rollout mesh over the next prod(``rollout_shape``);
    with ``()`` both are the one training mesh (the rollouts share its devices)."""
    if not rollout_shape:
        mesh = make_mesh(train_shape, devices)
        return mesh, mesh
    need = math.prod(train_shape) + math.prod(rollout_shape)
    devices = _devices_for(need, f"mesh shape {train_shape} + rollout mesh shape {rollout_shape}", devices)
    return make_mesh(train_shape, devices), make_mesh(rollout_shape, devices[math.prod(train_shape):need])


def batch_sharding(mesh: Mesh, rules: Mapping[str, RuleLike] | None = None) -> NamedSharding:
    """Rows (dim 0) as the table places logical ``batch`` (over ``data``), the rest replicated.

    For arrays of any shape (the sampler's rows, its KV cache rows); `shard_batch` and
    `logical_sharding` also check that the rows divide."""
    return NamedSharding(mesh, PartitionSpec(_spec_entry(_present(_rule_for("batch", rules), mesh))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: dict, mesh: Mesh, rules: Mapping[str, RuleLike] | None = None) -> dict:
    """Place host arrays on the mesh, rows split as logical ``batch`` (rows must divide evenly:
    `ShardingRuleError` naming the field otherwise)."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        axes = ("batch",) + (None,) * (value.ndim - 1)
        out[key] = jax.device_put(value, logical_sharding(axes, value.shape, mesh, rules, name=f"batch field {key!r}"))
    return out


# -- rows: the samplers' data parallelism --------------------------------------------------------


def row_split(sharding: NamedSharding | None) -> tuple[NamedSharding | None, int]:
    """(``sharding`` reduced to its row split — dim 0 split, the rest replicated — and the number of
    device groups rows are split over); (None, 1) for None."""
    if sharding is None:
        return None, 1
    rows = _row_axes(sharding)
    return (NamedSharding(sharding.mesh, PartitionSpec(rows)),
            math.prod(sharding.mesh.shape[a] for a in jax.tree.leaves(rows)))


def _row_axes(sharding: NamedSharding):
    """The mesh axis (or axes, or None) that ``sharding`` splits dim 0 over."""
    return sharding.spec[0] if len(sharding.spec) else None


def row_shardings(tree, row_sharding: NamedSharding):
    """Where `constrain_rows` pins each array of ``tree``: dim 0 split like ``row_sharding``, the
    rest replicated — except in a node whose type declares ``KV_HEAD_FIELDS`` (the KV cache:
    keys and values [B, layers, N, S, K]; the engine's slots are rows of one such cache): there the
    kv-head axis, third from last, is also split as the rules table places logical ``kv_heads``
    (over ``tensor``), so tensor parallelism divides the cache too."""
    mesh, rows = row_sharding.mesh, _row_axes(row_sharding)

    def split_rows(x):
        ndim = np.ndim(x)
        return NamedSharding(mesh, PartitionSpec(*([rows] + [None] * (ndim - 1))[:ndim]))

    def split_heads(x):
        spec = [rows] + [None] * (x.ndim - 1)
        spec[x.ndim - 3] = logical_to_mesh_spec(("kv_heads",), (x.shape[x.ndim - 3],), mesh,
                                                name=f"KV-cache array of shape {x.shape}")[0]
        return NamedSharding(mesh, PartitionSpec(*spec))

    def place(node):
        if not _has_kv_heads(node):
            return split_rows(node)
        heads = {name: split_heads(getattr(node, name)) for name in type(node).KV_HEAD_FIELDS}
        return jax.tree.map(split_rows, node)._replace(**heads)

    return jax.tree.map(place, tree, is_leaf=_has_kv_heads)


def _has_kv_heads(node) -> bool:
    return hasattr(type(node), "KV_HEAD_FIELDS")


def constrain_rows(tree, row_sharding: NamedSharding | None):
    """Pins every array of ``tree`` to its `row_shardings` placement (rows split; a KV cache's kv
    heads too). Inside jit this keeps the samplers data-parallel: the KV cache and the decode
    buffers stay split instead of being left to sharding propagation. No-op when None."""
    if row_sharding is None:
        return tree

    def one(x, sharding):
        if not isinstance(x, jax.Array) or x.ndim == 0:
            return x
        return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(one, tree, row_shardings(tree, row_sharding))
