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

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers "bfloat16" with numpy so safetensors can return BF16)
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import SafetensorError
from safetensors.numpy import save_file

from fipo_jax.models.config import MODEL_TYPES, ModelConfig, ModelOptions, UnsupportedConfigError
from fipo_jax.models.decoder import CausalLM
from fipo_jax.models.export_folder import ExportFolderError, check_export_folder, replacing
from fipo_jax.models.families import config_from_hf, config_to_hf, hf_weight_table
from fipo_jax.models.file_checks import (
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    CheckpointFileError,
    check_model_path,
    checkpoint_files,
    nonfinite_tensors,
    open_safetensors,
    read_json_object,
)
from fipo_jax.models.weights import CheckpointMismatchError, TensorInfo, TensorSource, load_from_source
from fipo_jax.parallel.sharding import RuleLike

__all__ = [
    "SAFETENSORS_INDEX", "SAFETENSORS_SINGLE", "CheckpointFileError", "CheckpointMismatchError",
    "ExportFolderError",
    "SafetensorsSource", "TensorInfo", "TensorSource", "checkpoint_files", "load_pretrained", "load_weights",
    "nonfinite_tensors", "read_json_object", "save_pretrained",
]

_FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


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


def load_weights(source: TensorSource | str | os.PathLike, config: ModelConfig, *, mesh: Mesh | None = None,
                 rules: Mapping[str, RuleLike] | None = None) -> CausalLM:
    """`weights.load_from_source` of a `TensorSource` or a safetensors checkpoint folder."""
    if not isinstance(source, TensorSource):
        source = SafetensorsSource(source)
    return load_from_source(source, config, mesh=mesh, rules=rules)


def load_pretrained(
    path: str | os.PathLike,
    options: ModelOptions = ModelOptions(),
    *,
    mesh: Mesh | None = None,
    rules: Mapping[str, RuleLike] | None = None,
) -> CausalLM:
    """Loads a pretrained Qwen2/2.5, Qwen3, Llama 3 or Gemma 3 (text) model as an nnx `CausalLM`.

    Args:
      path: a Hugging Face checkpoint folder (config.json + model.safetensors or a sharded index;
        the family is read from config.json's model_type), or a `.gguf` file (llama.cpp format,
        float or quantised tensors, dequantised on load: see `fipo_jax.models.gguf_io`).
      options: how the model runs (`ModelOptions`): parameter dtype ("float32" or "bfloat16";
        checkpoint tensors are cast to it), compute dtype, remat policy, attention chunk and kernel.
      mesh: if given, every parameter is placed on NamedSharding(mesh, spec from its logical axes).
      rules: logical axis → mesh axis table; defaults to `fipo_jax.parallel.sharding.DEFAULT_RULES`.

    Raises:
      FileNotFoundError: no such folder / file, or a folder without config.json or weights.
      NotADirectoryError: a file inside a checkpoint folder (config.json, a .safetensors file).
      UnsupportedConfigError: the config describes a model this implementation does not compute
        (the message starts with the config file's path).
      CheckpointFileError: config.json / the sharded index is not a JSON object, a safetensors
        file is truncated or corrupt, or a tensor holds NaN / ±inf (`gguf_io.GGUFError`, a
        subclass, for a damaged GGUF file).
      CheckpointMismatchError: missing / unexpected / mis-shaped tensors (all listed at once).
      fipo_jax.parallel.sharding.ShardingRuleError: with `mesh`, a rule that cannot apply to a parameter.
    """
    path = os.fspath(path)
    check_model_path(path)
    if path.endswith(".gguf") or os.path.isfile(path):
        from fipo_jax.models import gguf_io

        return gguf_io.load_gguf(path, options, mesh=mesh, rules=rules)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
    hf_dict = read_json_object(config_path)
    try:
        config = config_from_hf(_normalised_hf_config(hf_dict), options)
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
    log: Callable[[str], None] = print,
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
      log: where the one-line notes go (the leftovers of an export killed mid-way, removed).

    Everything is written into a temporary folder beside ``path`` and renamed into place once
    complete, so ``path`` never holds a mix of two exports or a half-written one; every file gets
    the mode of an ordinary file (the umask's). Tensors are gathered to host one shard file at a
    time; only process 0 writes.

    Raises:
      ExportFolderError: ``path`` holds another model's files or cannot be created (before any
        tensor is gathered); `export_folder.ExportDiskFullError`, a subclass, when the disk fills
        up (``path`` is left as it was).
    """
    config = model.config if config is None else config
    out_dtype = np.dtype(dtype or config.dtype)
    path = os.fspath(path)
    writer = jax.process_index() == 0
    if writer:
        check_export_folder(path)
    variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    table = hf_weight_table(config)
    hf_dict = config_to_hf(config)  # raises before writing anything if the family cannot express it
    sizes = [int(np.prod(variables[row.path].shape[0 if row.layer is None else 1:])) * out_dtype.itemsize
             for row in table]
    groups = _plan_shards(sizes, max_shard_bytes)
    names = (
        [SAFETENSORS_SINGLE]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    with replacing(path, write=writer, log=log) as folder:
        weight_map = _write_shards(folder, names, groups, table, variables, out_dtype, writer)
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


def _write_shards(folder: str, names: Sequence[str], groups: Sequence[Sequence[int]], table, variables,
                  out_dtype: np.dtype, writer: bool) -> dict[str, str]:
    """Each group of table rows gathered to the host (a layer's slice of a stacked parameter, in
    the HF layout) and written as one safetensors file (only by the ``writer``); returns the
    weight map, HF key → file."""
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
    return weight_map


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
