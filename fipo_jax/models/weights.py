"""Loading a model's weights from any tensor source, one tensor at a time (the core of `hf_io` and
`gguf_io`): a `TensorSource` lists and reads tensors by checkpoint key; `load_weights` checks them all
against the family's table (`hf_weight_table`) before reading any, then places each on the
`NamedSharding` its logical axes map to — a layer's tensor into its slice of the stacked parameter.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from fipo_jax.models.config import ModelConfig
from fipo_jax.models.decoder import CausalLM
from fipo_jax.models.families import WeightMapping, hf_weight_table
from fipo_jax.models.file_checks import finite_flags, raise_if_nonfinite
from fipo_jax.parallel.sharding import RuleLike, param_shardings

# Buffers some checkpoints carry that are recomputed from the config, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

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
                        if k not in expected and k not in allowed_extra and not k.endswith(IGNORED_SUFFIXES))
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


def load_from_source(
    source: TensorSource,
    config: ModelConfig,
    *,
    mesh: Mesh | None = None,
    rules: Mapping[str, RuleLike] | None = None,
) -> CausalLM:
    """Builds the model abstractly (nnx.eval_shape) and fills it from `source`, tensor by tensor.

    Every tensor name/shape is
    checked against `hf_weight_table(config)` before any data is read. Tensors are cast to
    `config.dtype`; a decoder layer's tensor is written into its slice of the stacked parameter
    on the device (the host holds one tensor at a time). With `mesh`, each lands directly on its
    NamedSharding (`param_shardings` by `rules`, all computed before any data is read: a rule that
    cannot apply raises `fipo_jax.parallel.sharding.ShardingRuleError` up front). One on-device all-finite
    reduction per tensor (`finite_flags`) refuses NaN / ±inf weights with a `CheckpointFileError`
    naming each such tensor and its file.
    """
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


# ---------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------


def _path_name(key_path) -> str:
    return "/".join(str(getattr(e, "key", getattr(e, "idx", e))) for e in key_path)


def flat_params(model) -> dict[str, np.ndarray]:
    """The model's parameters on the host, keyed by their '/'-joined nnx paths."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {_path_name(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(pure)[0]}


def params_digest(model) -> str:
    """SHA-256 over the parameters' names, dtypes, shapes and bytes, in name order: equal digests mean
    bit-identical weights, whatever file or process they came from."""
    digest = hashlib.sha256()
    for name, value in sorted(flat_params(model).items()):
        digest.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()
