"""Checkpoint import/export for the nnx decoder (every family in `fipo_jax.models.families`).

Import: `config.json` (normalised by transformers' config class of its model_type), tensors
from `model.safetensors`, a sharded checkpoint (`model.safetensors.index.json`) or a GGUF file
(`gguf_io`), one tensor at a time, through the explicit table `hf_weight_table(config)` (HF key →
nnx path + layout transform). With a mesh, each tensor is placed straight onto the
`NamedSharding` its logical axes map to, so the host never holds more than one tensor of the model.
Bad inputs fail in one line naming the path, file or tensor; those checks (missing paths, malformed
JSON, truncated safetensors files, NaN / ±inf weights) live in `file_checks`, re-exported here.

Export: `save_pretrained` writes HF-layout safetensors (torch Linear weights are [out, in]) and the
family's transformers-5 `config.json`, which `transformers.AutoModelForCausalLM` loads, into a new
or empty folder or over a previous export, never beside another model's files (`export_folder`).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers "bfloat16" with numpy so safetensors can return BF16)
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import SafetensorError
from safetensors.numpy import save_file

from fipo_jax import sharding as _sharding
from fipo_jax.models.file_checks import (
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    CheckpointFileError,
    check_model_path,
    checkpoint_files,
    finite_flags,
    nonfinite_tensors,
    open_safetensors,
    raise_if_nonfinite,
    read_json_object,
)
from fipo_jax.models.config import MODEL_TYPES, ModelConfig, UnsupportedConfigError
from fipo_jax.models.decoder import CausalLM
from fipo_jax.models.export_folder import ExportFolderError, check_export_folder, replacing
from fipo_jax.models.families import WeightMapping, config_from_hf, hf_weight_table
from fipo_jax.sharding import RuleLike, param_shardings

# The rules table lives in fipo_jax.sharding; these names stay importable from here (and fipo_jax.models).
DEFAULT_RULES = _sharding.DEFAULT_RULES
logical_to_mesh_spec = _sharding.logical_to_mesh_spec

# Buffers some checkpoints carry that are recomputed from the config, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# Alias of `hf_weight_table` under its original name.
weight_mapping = hf_weight_table

__all__ = [
    "DEFAULT_RULES", "SAFETENSORS_INDEX", "SAFETENSORS_SINGLE", "CheckpointFileError", "CheckpointMismatchError",
    "ExportFolderError",
    "SafetensorsSource", "TensorInfo", "TensorSource", "checkpoint_files", "load_pretrained", "load_weights",
    "logical_to_mesh_spec", "nonfinite_tensors", "param_shardings", "read_json_object", "save_pretrained",
    "weight_mapping",
]

_FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model: lists every problem at once."""


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint holds under one HF name, known before any tensor data is read."""

    shape: tuple[int, ...]
    dtype: str
    readable: bool = True  # False: a dtype / quantisation the loader cannot turn into floats


class TensorSource(abc.ABC):
    """A checkpoint seen through HF tensor names and layouts (safetensors folder or GGUF file)."""

    description: str = "checkpoint"
    readable_types: tuple[str, ...] = ()

    @abc.abstractmethod
    def infos(self) -> dict[str, TensorInfo]:
        """HF name → shape / dtype of every tensor (no data read)."""

    @abc.abstractmethod
    def read(self, names: Sequence[str]):
        """Yields (name, float numpy array in the HF layout), one tensor at a time."""

    def locate(self, name: str) -> tuple[str, str]:
        """(file, tensor name inside that file) of the HF tensor ``name``, for error messages."""
        return self.description, name


class SafetensorsSource(TensorSource):
    """The tensors of `model.safetensors` or a sharded checkpoint (`model.safetensors.index.json`)."""

    readable_types = tuple(_FLOAT_DTYPES)

    def __init__(self, path: str | os.PathLike):
        self.files = checkpoint_files(path)
        self.description = os.fspath(path)
        self._file_of: dict[str, str] = {}

    def infos(self) -> dict[str, TensorInfo]:
        found: dict[str, TensorInfo] = {}
        for file in self.files:
            with open_safetensors(file) as f:
                for key in f.keys():
                    if key in found:
                        raise CheckpointMismatchError(f"tensor {key!r} appears in both {self._file_of[key]} and {file}")
                    tensor_slice = f.get_slice(key)
                    dtype = tensor_slice.get_dtype()
                    found[key] = TensorInfo(tuple(tensor_slice.get_shape()), dtype, dtype in _FLOAT_DTYPES)
                    self._file_of[key] = file
        return found

    def read(self, names: Sequence[str]):
        if not self._file_of:
            self.infos()
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self._file_of[name], []).append(name)
        for file, keys in by_file.items():
            with open_safetensors(file) as f:
                for key in keys:
                    try:
                        tensor = f.get_tensor(key)
                    except (SafetensorError, OSError, ValueError) as error:
                        raise CheckpointFileError(f"{file}: tensor {key!r} cannot be read ({error})") from error
                    yield key, tensor

    def locate(self, name: str) -> tuple[str, str]:
        if not self._file_of:
            self.infos()
        return self._file_of.get(name, self.description), name


def _check_tensors(
    table: Sequence[WeightMapping],
    target_shapes: Mapping[str, tuple[int, ...]],
    found: Mapping[str, TensorInfo],
    config: ModelConfig,
    source: TensorSource,
) -> None:
    """Raises one CheckpointMismatchError naming every missing/unexpected/mis-shaped tensor."""
    expected = {row.hf_key: row for row in table}
    allowed_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found
                        if k not in expected and k not in allowed_extra and not k.endswith(_IGNORED_SUFFIXES))
    misshaped, bad_dtype = [], []
    for key, row in expected.items():
        if key not in found:
            continue
        want = tuple(row.layout.hf_shape(target_shapes[key]))
        if found[key].shape != want:
            misshaped.append(f"{key}: checkpoint {list(found[key].shape)}, expected {list(want)}")
        if not found[key].readable:
            bad_dtype.append(f"{key}: {found[key].dtype}")
    if "lm_head.weight" in allowed_extra and "lm_head.weight" in found:
        embed_shape = found["model.embed_tokens.weight"].shape if "model.embed_tokens.weight" in found else ()
        if found["lm_head.weight"].shape != embed_shape:
            misshaped.append(f"lm_head.weight: checkpoint {list(found['lm_head.weight'].shape)}, expected "
                             f"{list(embed_shape)} (tied to model.embed_tokens.weight)")
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped tensors ({len(misshaped)}): {misshaped}")
    if bad_dtype:
        problems.append(f"tensors of a type the loader cannot read ({len(bad_dtype)}): {bad_dtype} "
                        f"(readable: {', '.join(source.readable_types)})")
    if problems:
        raise CheckpointMismatchError(
            f"{source.description} does not match the {config.model_type} model "
            f"(layers={config.num_hidden_layers}, hidden={config.hidden_size}, "
            f"heads={config.num_attention_heads}/{config.num_key_value_heads}, head_dim={config.head_dim}, "
            f"tied={config.tie_word_embeddings}):\n  " + "\n  ".join(problems))


def _place(array: np.ndarray, sharding: jax.sharding.NamedSharding | None) -> jax.Array:
    """Host array → device array, on the parameter's sharding when there is a mesh."""
    if sharding is None:
        return jax.device_put(array)
    # Each addressable device receives only its own slice (works on multi-host meshes too).
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _layer_sharding(sharding: jax.sharding.NamedSharding | None) -> jax.sharding.NamedSharding | None:
    """The sharding of one layer of a stacked parameter (its leading ``layers`` axis is never split)."""
    if sharding is None:
        return None
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer_array: jax.Array, layer: jax.Array) -> jax.Array:
    """``stacked[layer] = layer_array`` in place (the stacked buffer is donated; one compile per
    parameter shape, the layer index is traced)."""
    return stacked.at[layer].set(layer_array.astype(stacked.dtype))


def _zeros(shape: tuple[int, ...], dtype, sharding: jax.sharding.NamedSharding | None) -> jax.Array:
    """A zero device array of ``shape`` made on its sharding (no host copy)."""
    return jnp.zeros(shape, dtype) if sharding is None else jnp.zeros(shape, dtype, device=sharding)


def _check_tied_head(source: TensorSource) -> None:
    """A tied checkpoint may still carry lm_head.weight; accept it only if it equals the embedding
    (NaNs in the same places count as equal here: the finiteness check names them afterwards)."""
    tensors = dict(source.read(["lm_head.weight", "model.embed_tokens.weight"]))
    if not np.array_equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"], equal_nan=True):
        raise CheckpointMismatchError("config has tie_word_embeddings=True but the checkpoint's lm_head.weight "
                                      "differs from model.embed_tokens.weight")


def load_weights(
    source: TensorSource | str | os.PathLike,
    config: ModelConfig,
    *,
    mesh: Mesh | None = None,
    rules: Mapping[str, RuleLike] | None = None,
) -> CausalLM:
    """Builds the model abstractly (nnx.eval_shape) and fills it from `source`, tensor by tensor.

    `source` is a `TensorSource` or a safetensors checkpoint folder. Every tensor name/shape is
    checked against `hf_weight_table(config)` before any data is read. Tensors are cast to
    `config.dtype`; a decoder layer's tensor is written into its slice of the stacked parameter
    on the device (the host holds one tensor at a time). With `mesh`, each lands directly on its
    NamedSharding (`param_shardings` by `rules`, all computed before any data is read: a rule that
    cannot apply raises `fipo_jax.sharding.ShardingRuleError` up front). One on-device all-finite
    reduction per tensor (`finite_flags`) refuses NaN / ±inf weights with a `CheckpointFileError`
    naming each such tensor and its file.
    """
    if not isinstance(source, TensorSource):
        source = SafetensorsSource(source)
    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(state))
    table = hf_weight_table(config)
    table_paths = {row.path for row in table}
    if table_paths != set(variables):
        # Internal consistency between the model and the mapping table, not a checkpoint issue.
        raise AssertionError(f"mapping table and model disagree: {sorted(map(str, table_paths ^ set(variables)))}")
    # Our shape of each HF tensor: a layer's slice of a stacked parameter, or the whole parameter.
    target_shapes = {row.hf_key: tuple(variables[row.path].shape)[0 if row.layer is None else 1:] for row in table}
    found = source.infos()
    _check_tensors(table, target_shapes, found, config, source)
    shardings = {} if mesh is None else {path: s.get_value() for path, s in
                                         nnx.to_flat_state(param_shardings(state, mesh, rules))}
    if config.tie_word_embeddings and "lm_head.weight" in found:
        _check_tied_head(source)
    param_dtype = np.dtype(config.dtype)
    rows = {row.hf_key: row for row in table}
    stacked: dict[tuple, jax.Array] = {}  # stacked parameters, filled layer by layer on the device
    flags: dict[str, jax.Array] = {}
    for key, hf_array in source.read(list(rows)):
        row = rows[key]
        ours = np.ascontiguousarray(row.layout.to_ours(hf_array, target_shapes[key]).astype(param_dtype))
        sharding = shardings.get(row.path)
        if row.layer is None:
            placed = _place(ours, sharding)
            variables[row.path].set_value(placed)
        else:
            placed = _place(ours, _layer_sharding(sharding))
            if row.path not in stacked:
                stacked[row.path] = _zeros(tuple(variables[row.path].shape), param_dtype, sharding)
            stacked[row.path] = _set_layer(stacked[row.path], placed, np.int32(row.layer))
        flags |= finite_flags({key: placed})
        del hf_array, ours, placed
    for path, value in stacked.items():
        variables[path].set_value(value)
    raise_if_nonfinite(flags, source.locate)
    return nnx.merge(graphdef, state)


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    remat: str | bool = "none",
    attention_chunk_size: int | None = None,
    mesh: Mesh | None = None,
    rules: Mapping[str, RuleLike] | None = None,
) -> CausalLM:
    """Loads a pretrained Qwen2/2.5, Qwen3, Llama 3 or Gemma 3 (text) model as an nnx `CausalLM`.

    Args:
      path: a Hugging Face checkpoint folder (config.json + model.safetensors or a sharded index;
        the family is read from config.json's model_type), or a `.gguf` file (llama.cpp format,
        float or quantised tensors, dequantised on load: see `fipo_jax.models.gguf_io`).
      dtype: parameter dtype ("float32" or "bfloat16"); checkpoint tensors are cast to it.
      compute_dtype: activation dtype; defaults to `dtype`.
      remat: what the layer scan keeps for the backward pass (`ModelConfig.remat`: "none", "full",
        "dots"; True / False mean "full" / "none").
      attention_chunk_size: query-chunked attention (`ModelConfig.attention_chunk_size`).
      mesh: if given, every parameter is placed on NamedSharding(mesh, spec from its logical axes).
      rules: logical axis → mesh axis table; defaults to `fipo_jax.sharding.DEFAULT_RULES`.

    Raises:
      FileNotFoundError: no such folder / file, or a folder without config.json or weights.
      NotADirectoryError: a file inside a checkpoint folder (config.json, a .safetensors file).
      UnsupportedConfigError: the config describes a model this implementation does not compute
        (the message starts with the config file's path).
      CheckpointFileError: config.json / the sharded index is not a JSON object, a safetensors
        file is truncated or corrupt, or a tensor holds NaN / ±inf (`gguf_io.GGUFError`, a
        subclass, for a damaged GGUF file).
      CheckpointMismatchError: missing / unexpected / mis-shaped tensors (all listed at once).
      fipo_jax.sharding.ShardingRuleError: with `mesh`, a rule that cannot apply to a parameter.
    """
    path = os.fspath(path)
    options = dict(dtype=dtype, compute_dtype=compute_dtype, remat=remat, attention_chunk_size=attention_chunk_size)
    check_model_path(path)
    if path.endswith(".gguf") or os.path.isfile(path):
        from fipo_jax.models import gguf_io

        return gguf_io.load_gguf(path, mesh=mesh, rules=rules, **options)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
    hf_dict = read_json_object(config_path)
    try:
        config = config_from_hf(_normalised_hf_config(hf_dict), **options)
    except ValueError as error:  # UnsupportedConfigError, or a value ModelConfig refuses (0 layers)
        raise UnsupportedConfigError(f"{config_path}: {error}") from error
    return load_weights(SafetensorsSource(path), config, mesh=mesh, rules=rules)


def _normalised_hf_config(hf_dict: dict[str, Any]) -> Any:
    """config.json through transformers' own config class when it knows the family (it fills the
    defaults a file may omit exactly as transformers would); the raw dict otherwise, so that
    `config_from_hf` names what is unsupported."""
    import transformers  # local: transformers is heavy and only needed for config parsing

    model_type = hf_dict.get("model_type")
    if model_type not in MODEL_TYPES:
        return hf_dict
    from huggingface_hub.errors import StrictDataclassError  # transformers' validation of config fields

    try:
        return transformers.AutoConfig.for_model(model_type, **{k: v for k, v in hf_dict.items() if k != "model_type"})
    except (TypeError, ValueError, StrictDataclassError) as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise UnsupportedConfigError(f"not a valid {model_type} config for transformers: {first}") from error


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
    model: CausalLM,
    path: str | os.PathLike,
    config: ModelConfig | None = None,
    *,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    extra_config: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
) -> None:
    """Writes a HF-compatible checkpoint folder (safetensors + config.json).

    Args:
      model: the nnx model.
      path: output folder: new, empty, or a previous export (replaced whole); a folder holding
        anything else raises `ExportFolderError` before any tensor is gathered (`export_folder`).
      config: defaults to `model.config`.
      dtype: tensor dtype on disk ("float32"/"bfloat16"); defaults to `config.dtype`.
      max_shard_bytes: if given and the weights exceed it, writes
        model-0000i-of-0000n.safetensors shards plus model.safetensors.index.json.
      extra_config: extra config.json fields (e.g. eos_token_id, bos_token_id).
      tokenizer: written into the same folder (anything with ``save_pretrained(folder)``).

    Everything is written into a temporary folder beside ``path`` and renamed into place once
    complete, so ``path`` never holds a mix of two exports or a half-written one. Tensors are
    gathered to host one shard file at a time; only process 0 writes.
    """
    config = model.config if config is None else config
    out_dtype = np.dtype(dtype or config.dtype)
    path = os.fspath(path)
    writer = jax.process_index() == 0
    if writer:
        check_export_folder(path)
    variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    table = hf_weight_table(config)
    hf_dict = config.to_hf_dict()  # raises before writing anything if the family cannot express it
    sizes = [int(np.prod(variables[row.path].shape[0 if row.layer is None else 1:])) * out_dtype.itemsize
             for row in table]
    groups = _plan_shards(sizes, max_shard_bytes)
    names = (
        [SAFETENSORS_SINGLE]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    with replacing(path, write=writer) as folder:
        weight_map = {}
        for name, group in zip(names, groups):
            tensors = {}
            for i in group:
                row = table[i]
                value = variables[row.path].get_value()
                host = _to_host(value if row.layer is None else value[row.layer])
                tensors[row.hf_key] = np.ascontiguousarray(row.layout.to_hf(host).astype(out_dtype))
                weight_map[row.hf_key] = name
            if writer:
                save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
            del tensors
        if not writer:
            return
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
            with open(os.path.join(folder, SAFETENSORS_INDEX), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        hf_dict["dtype"] = out_dtype.name
        hf_dict.update(extra_config or {})
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(hf_dict, f, indent=2, sort_keys=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)


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
