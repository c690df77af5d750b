"""Hugging Face checkpoint import/export for the nnx Qwen2 model.

Import: `config.json` through `transformers.AutoConfig`, tensors from `model.safetensors` or a
sharded checkpoint (`model.safetensors.index.json`), one tensor at a time, through the explicit
table `weight_mapping(config)` (HF key → nnx path + layout transform). With a mesh, each tensor is
placed straight onto the `NamedSharding` its logical axes map to, so the host never holds more
than one tensor of the model.

Export: `save_pretrained` writes HF-layout safetensors (torch Linear weights are [out, in]) and a
transformers-5 `config.json` that `transformers.Qwen2ForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers "bfloat16" with numpy so safetensors can return BF16)
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import save_file

from fipo_jax.models.config import Qwen2Config
from fipo_jax.models.qwen2 import Qwen2ForCausalLM

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

# Logical axis → mesh axis (or a tuple of mesh axes, or None = replicated). Mesh axes absent
# from the mesh, already used by another dimension of the same tensor, or not dividing the
# dimension are dropped (that dimension is replicated).
DEFAULT_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
}

# Buffers some checkpoints carry that are recomputed from the config, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model: lists every problem at once."""


# ---------------------------------------------------------------------------------------------
# Layout transforms between HF tensors and our parameters
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one HF tensor maps onto one of our parameters.

    Attributes:
      name: short description, used in messages.
      hf_shape: our parameter shape → the HF tensor shape.
      to_ours: (HF array, our shape) → our array.
      to_hf: our array → HF array.
    """

    name: str
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


# Same shape (embedding [V, D], norm weights [D]).
COPY = Layout(
    "copy",
    hf_shape=lambda s: s,
    to_ours=lambda x, s: x,
    to_hf=lambda x: x,
)
# torch Linear [out, in] ↔ our kernel [in, out].
LINEAR = Layout(
    "transpose",
    hf_shape=lambda s: (s[1], s[0]),
    to_ours=lambda x, s: x.T,
    to_hf=lambda x: x.T,
)
# q/k/v Linear [N·K, D] ↔ our kernel [D, N, K] (output features split into heads).
HEADS_OUT = Layout(
    "transpose + split heads",
    hf_shape=lambda s: (s[1] * s[2], s[0]),
    to_ours=lambda x, s: x.T.reshape(s),
    to_hf=lambda x: x.reshape(x.shape[0], x.shape[1] * x.shape[2]).T,
)
# q/k/v bias [N·K] ↔ our bias [N, K].
HEADS_BIAS = Layout(
    "split heads",
    hf_shape=lambda s: (s[0] * s[1],),
    to_ours=lambda x, s: x.reshape(s),
    to_hf=lambda x: x.reshape(-1),
)
# o_proj Linear [D, H·K] ↔ our kernel [H, K, D] (input features split into heads).
HEADS_IN = Layout(
    "transpose + split heads",
    hf_shape=lambda s: (s[2], s[0] * s[1]),
    to_ours=lambda x, s: x.T.reshape(s),
    to_hf=lambda x: x.reshape(x.shape[0] * x.shape[1], x.shape[2]).T,
)


@dataclasses.dataclass(frozen=True)
class WeightMapping:
    """One row of the mapping table: HF key ↔ nnx path, with the layout transform."""

    hf_key: str
    path: tuple[str | int, ...]
    layout: Layout


_GLOBAL_TABLE = (
    ("model.embed_tokens.weight", ("embed_tokens", "embedding"), COPY),
    ("model.norm.weight", ("norm", "weight"), COPY),
)
_LM_HEAD_ROW = ("lm_head.weight", ("lm_head", "kernel"), LINEAR)
_LAYER_TABLE = (
    ("input_layernorm.weight", ("input_layernorm", "weight"), COPY),
    ("post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), COPY),
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), HEADS_OUT),
    ("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), HEADS_BIAS),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), HEADS_OUT),
    ("self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), HEADS_BIAS),
    ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), HEADS_OUT),
    ("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), HEADS_BIAS),
    ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), HEADS_IN),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), LINEAR),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), LINEAR),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), LINEAR),
)


def weight_mapping(config: Qwen2Config) -> tuple[WeightMapping, ...]:
    """The full HF ↔ nnx table for `config` (no lm_head row when embeddings are tied)."""
    rows = [WeightMapping(k, p, t) for k, p, t in _GLOBAL_TABLE]
    if not config.tie_word_embeddings:
        rows.append(WeightMapping(*_LM_HEAD_ROW))
    for i in range(config.num_hidden_layers):
        for suffix, sub_path, layout in _LAYER_TABLE:
            rows.append(WeightMapping(f"model.layers.{i}.{suffix}", ("layers", i, *sub_path), layout))
    return tuple(rows)


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None] | None = None,
) -> PartitionSpec:
    """PartitionSpec for a tensor with the given logical axes under `rules`.

    A logical axis maps to the mesh axes `rules[name]` that exist in `mesh`, are not already used
    by an earlier dimension, and whose total size divides the dimension; otherwise the dimension
    is replicated. Unknown logical names are replicated.
    """
    rules = DEFAULT_RULES if rules is None else rules
    if not logical_axes:
        return PartitionSpec()
    used: set[str] = set()
    entries: list[str | tuple[str, ...] | None] = []
    for name, dim in zip(logical_axes, shape, strict=True):
        target = rules.get(name) if name is not None else None
        candidates = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in candidates if a in mesh.shape and a not in used)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or dim % size != 0:
            entries.append(None)
            continue
        used.update(axes)
        entries.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def param_shardings(
    tree: nnx.Module | nnx.State,
    mesh: Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None] | None = None,
) -> nnx.State:
    """State of `NamedSharding`s (one per parameter, from its logical axes), e.g. for jit.

    `tree` is a model or its (possibly abstract) state.
    """
    state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree

    def to_sharding(variable: nnx.Variable) -> nnx.Variable:
        axes = variable.get_metadata().get("out_sharding")
        spec = logical_to_mesh_spec(axes, variable.shape, mesh, rules)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: str


def checkpoint_files(path: str | os.PathLike) -> list[str]:
    """The safetensors files of a checkpoint folder (sharded index first, then single file)."""
    path = os.fspath(path)
    index_path = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(path, SAFETENSORS_SINGLE)
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no {SAFETENSORS_INDEX} or {SAFETENSORS_SINGLE} in {path}")


def _scan_tensors(files: Sequence[str]) -> dict[str, _TensorInfo]:
    """Name → (file, shape, dtype) from the safetensors headers (no tensor data is read)."""
    found: dict[str, _TensorInfo] = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            for key in f.keys():
                if key in found:
                    raise CheckpointMismatchError(
                        f"tensor {key!r} appears in both {found[key].file} and {file}"
                    )
                tensor_slice = f.get_slice(key)
                found[key] = _TensorInfo(file, tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
    return found


def _check_tensors(
    table: Sequence[WeightMapping],
    param_shapes: Mapping[tuple, tuple[int, ...]],
    found: Mapping[str, _TensorInfo],
    config: Qwen2Config,
) -> None:
    """Raises one CheckpointMismatchError naming every missing/unexpected/mis-shaped tensor."""
    expected = {row.hf_key: row for row in table}
    allowed_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(
        k
        for k in found
        if k not in expected and k not in allowed_extra and not k.endswith(_IGNORED_SUFFIXES)
    )
    misshaped, bad_dtype = [], []
    for key, row in expected.items():
        if key not in found:
            continue
        want = tuple(row.layout.hf_shape(param_shapes[row.path]))
        if found[key].shape != want:
            misshaped.append(f"{key}: checkpoint {list(found[key].shape)}, expected {list(want)}")
        if found[key].dtype not in _FLOAT_DTYPES:
            bad_dtype.append(f"{key}: {found[key].dtype}")
    if "lm_head.weight" in allowed_extra and "lm_head.weight" in found:
        embed_shape = found.get("model.embed_tokens.weight", _TensorInfo("", (), "")).shape
        if found["lm_head.weight"].shape != embed_shape:
            misshaped.append(
                f"lm_head.weight: checkpoint {list(found['lm_head.weight'].shape)}, expected "
                f"{list(embed_shape)} (tied to model.embed_tokens.weight)"
            )
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped tensors ({len(misshaped)}): {misshaped}")
    if bad_dtype:
        problems.append(f"non-float tensors ({len(bad_dtype)}), quantised checkpoints are not supported: {bad_dtype}")
    if problems:
        raise CheckpointMismatchError(
            "checkpoint does not match the Qwen2 model "
            f"(layers={config.num_hidden_layers}, hidden={config.hidden_size}, "
            f"heads={config.num_attention_heads}/{config.num_key_value_heads}, "
            f"tied={config.tie_word_embeddings}):\n  " + "\n  ".join(problems)
        )


def _place(
    array: np.ndarray, variable: nnx.Variable, mesh: Mesh | None, rules: Mapping | None
) -> jax.Array:
    """Host array → device array, sharded by the parameter's logical axes when a mesh is given."""
    if mesh is None:
        return jax.device_put(array)
    spec = logical_to_mesh_spec(variable.get_metadata().get("out_sharding"), array.shape, mesh, rules)
    sharding = NamedSharding(mesh, spec)
    # Each addressable device receives only its own slice (works on multi-host meshes too).
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _check_tied_head(found: Mapping[str, _TensorInfo]) -> None:
    """A tied checkpoint may still carry lm_head.weight; accept it only if it equals the embedding."""
    with safe_open(found["lm_head.weight"].file, framework="numpy") as f:
        head = f.get_tensor("lm_head.weight")
    with safe_open(found["model.embed_tokens.weight"].file, framework="numpy") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    if not np.array_equal(head, embed):
        raise CheckpointMismatchError(
            "config has tie_word_embeddings=True but the checkpoint's lm_head.weight differs from "
            "model.embed_tokens.weight"
        )


def load_weights(
    path: str | os.PathLike,
    config: Qwen2Config,
    *,
    mesh: Mesh | None = None,
    rules: Mapping[str, str | tuple[str, ...] | None] | None = None,
) -> Qwen2ForCausalLM:
    """Builds the model abstractly (nnx.eval_shape) and fills it from safetensors, tensor by tensor.

    Checks every tensor name/shape against `weight_mapping(config)` before reading any data.
    Tensors are cast to `config.dtype`; with `mesh`, each lands directly on its NamedSharding.
    """
    files = checkpoint_files(path)
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(state))
    table = weight_mapping(config)
    table_paths = {row.path for row in table}
    if table_paths != set(variables):
        # Internal consistency between the model and the mapping table, not a checkpoint issue.
        raise AssertionError(
            f"mapping table and model disagree: {sorted(map(str, table_paths ^ set(variables)))}"
        )
    found = _scan_tensors(files)
    _check_tensors(table, {p: tuple(v.shape) for p, v in variables.items()}, found, config)
    if config.tie_word_embeddings and "lm_head.weight" in found:
        _check_tied_head(found)

    param_dtype = np.dtype(config.dtype)
    rows_by_file: dict[str, list[WeightMapping]] = {}
    for row in table:
        rows_by_file.setdefault(found[row.hf_key].file, []).append(row)
    for file, rows in rows_by_file.items():
        with safe_open(file, framework="numpy") as f:
            for row in rows:
                variable = variables[row.path]
                hf_array = f.get_tensor(row.hf_key)
                ours = np.ascontiguousarray(
                    row.layout.to_ours(hf_array, tuple(variable.shape)).astype(param_dtype)
                )
                variable.set_value(_place(ours, variable, mesh, rules))
                del hf_array, ours
    return nnx.merge(graphdef, state)


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    remat: bool = False,
    attention_chunk_size: int | None = None,
    mesh: Mesh | None = None,
    rules: Mapping[str, str | tuple[str, ...] | None] | None = None,
) -> Qwen2ForCausalLM:
    """Loads a HF Qwen2/Qwen2.5 checkpoint folder as an nnx `Qwen2ForCausalLM`.

    Args:
      path: local folder with config.json and model.safetensors (or a sharded index).
      dtype: parameter dtype ("float32" or "bfloat16"); checkpoint tensors are cast to it.
      compute_dtype: activation dtype; defaults to `dtype`.
      remat: rematerialise decoder layers in the backward pass.
      attention_chunk_size: query-chunked attention (`Qwen2Config.attention_chunk_size`).
      mesh: if given, every parameter is placed on NamedSharding(mesh, spec from its logical axes).
      rules: logical axis → mesh axis table; defaults to `DEFAULT_RULES`.

    Raises:
      UnsupportedConfigError: the config describes a model this implementation does not compute.
      CheckpointMismatchError: missing / unexpected / mis-shaped tensors (all listed at once).
    """
    import transformers  # local: transformers is heavy and only needed for config parsing

    hf_config = transformers.AutoConfig.from_pretrained(os.fspath(path))
    config = Qwen2Config.from_hf(hf_config, dtype=dtype, compute_dtype=compute_dtype, remat=remat,
                                 attention_chunk_size=attention_chunk_size)
    return load_weights(path, config, mesh=mesh, rules=rules)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _to_host(array: jax.Array) -> np.ndarray:
    """Full host copy of one (possibly multi-host sharded) array."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def save_pretrained(
    model: Qwen2ForCausalLM,
    path: str | os.PathLike,
    config: Qwen2Config | None = None,
    *,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> None:
    """Writes a HF-compatible checkpoint folder (safetensors + config.json).

    Args:
      model: the nnx model.
      path: output folder (created if needed).
      config: defaults to `model.config`.
      dtype: tensor dtype on disk ("float32"/"bfloat16"); defaults to `config.dtype`.
      max_shard_bytes: if given and the weights exceed it, writes
        model-0000i-of-0000n.safetensors shards plus model.safetensors.index.json.
      extra_config: extra config.json fields (e.g. eos_token_id, bos_token_id).

    Tensors are gathered to host one shard file at a time; only process 0 writes.
    """
    config = model.config if config is None else config
    out_dtype = np.dtype(dtype or config.dtype)
    path = os.fspath(path)
    variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    table = weight_mapping(config)
    sizes = [int(np.prod(variables[row.path].shape)) * out_dtype.itemsize for row in table]
    groups = _plan_shards(sizes, max_shard_bytes)
    names = (
        [SAFETENSORS_SINGLE]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
    weight_map = {}
    for name, group in zip(names, groups):
        tensors = {}
        for i in group:
            row = table[i]
            host = _to_host(variables[row.path].get_value())
            tensors[row.hf_key] = np.ascontiguousarray(row.layout.to_hf(host).astype(out_dtype))
            weight_map[row.hf_key] = name
        if writer:
            save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        del tensors
    if not writer:
        return
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        with open(os.path.join(path, SAFETENSORS_INDEX), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    hf_dict = config.to_hf_dict()
    hf_dict["dtype"] = out_dtype.name
    hf_dict.update(extra_config or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_dict, f, indent=2, sort_keys=True)


def _plan_shards(sizes: Sequence[int], max_shard_bytes: int | None) -> list[list[int]]:
    """Greedy, order-preserving split of tensors into files of at most max_shard_bytes
    (a single tensor larger than the limit gets a file of its own)."""
    if max_shard_bytes is None or sum(sizes) <= max_shard_bytes:
        return [list(range(len(sizes)))]
    groups: list[list[int]] = [[]]
    current = 0
    for i, size in enumerate(sizes):
        if groups[-1] and current + size > max_shard_bytes:
            groups.append([])
            current = 0
        groups[-1].append(i)
        current += size
    return groups
