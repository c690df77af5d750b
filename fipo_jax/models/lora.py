"""LoRA and QLoRA adapters on the decoder layers' projections, created and applied by qwix.

    y = x W + (α / r) · (x A) B        A: [D_in, r] (qwix: he-uniform), B: [r, D_out] (zeros)

W stays frozen; only A and B (`nnx.LoRAParam`) train. QLoRA holds W quantized by qwix
(`LoraConfig.base_dtype`: int8, int4 or nf4) and dequantizes it inside the GEMM; A and B keep the
model's parameter dtype. qwix (Tunix's LoRA library) does both by intercepting each projection's
``dot_general``: a `LoraConfig.module_path` regex over module paths inside a decoder layer
("self_attn/q_proj", "mlp/down_proj") picks the projections, as a qwix rule does.

How the decoder is made to work with qwix (both facts are tested in tests/test_lora.py):
  * qwix quantizes and adapts a weight in the shape the GEMM uses it, so an adapted projection holds
    its kernel in GEMM form [D_in, D_out] (q: [D, H·K]), logical axes (first input axis, first
    output axis): whole heads still shard on "heads" when the tensor axis divides H.
  * qwix creates variables on its first call, which a `lax.scan` body cannot do (new variables in
    the scanned layer fail at trace time), so `apply_lora` lets qwix adapt each layer alone and
    stacks the results on the ``layers`` axis; the scan then runs qwix's intercepted layer.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fipo_jax.core import _checks
from fipo_jax.models.attention import AttentionMask
from fipo_jax.models.decoder import CausalLM, DecoderLayer
from fipo_jax.models.layers import AXIS_LAYERS, DenseGeneral
from fipo_jax.models.rope import rope_cos_sin
from fipo_jax.models.weights import params_digest

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Every linear layer of the decoder layers; never the embedding or the LM head.
DEFAULT_MODULE_PATH = r"(self_attn/(q|k|v|o)_proj)|(mlp/(gate|up|down)_proj)"
BASE_DTYPES = ("int8", "int4", "nf4")  # QLoRA: qwix's weight types that run on every backend
FOUR_BIT_BLOCK = 64  # QLoRA's block: per-channel 4-bit scales lose too much (experiments/qlora_fidelity.py)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapters of rank r on the projections `module_path` matches (a `re.fullmatch` over paths inside
    a decoder layer, e.g. "self_attn/q_proj"), scaled α / r; `dropout` on the adapter's input;
    `base_dtype` None keeps the base as loaded, "int8" / "int4" / "nf4" holds it quantized (QLoRA), with
    one scale per output channel and block of `block_size` input rows (None: the whole input for int8,
    `FOUR_BIT_BLOCK` rows for the 4-bit types where that divides every adapted input width); `seed` draws A."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    module_path: str = DEFAULT_MODULE_PATH
    base_dtype: str | None = None
    block_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _checks.check_int("lora.rank", self.rank, minimum=1)
        _checks.require(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        # qwix draws the dropout mask from per-module RNG state, which the layer scan would slice and never
        # advance: every step would reuse one mask. RL recipes run LoRA without dropout.
        _checks.require(self.dropout == 0, f"lora.dropout {self.dropout} is not supported yet: the layer scan "
                                           "cannot advance qwix's per-module dropout RNG; use lora.dropout=0")
        if self.base_dtype is not None:
            _checks.check_choice("lora.base_dtype", self.base_dtype, BASE_DTYPES)
        _checks.check_int("lora.block_size", self.block_size, minimum=1, allow_none=True)
        try:
            re.compile(self.module_path)
        except re.error as error:
            raise ValueError(f"lora.module_path is not a regular expression ({error}): {self.module_path!r}") from None


# ----------------------------------------------------------------------------- which projections


def layer_projections(layer: DecoderLayer) -> dict[str, DenseGeneral]:
    """The decoder layer's projections by path ("self_attn/q_proj", …, "mlp/down_proj")."""
    return {f"{owner}/{name}": getattr(getattr(layer, owner), name)
            for owner, names in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:])) for name in names}


def adapted_paths(layer: DecoderLayer, lora: LoraConfig) -> list[str]:
    """The projection paths the rule matches; ValueError naming the regex when it matches none, or when
    the rank exceeds a matched projection's smaller side (the update would not be low-rank)."""
    projections = layer_projections(layer)
    paths = [p for p in projections if re.fullmatch(lora.module_path, p)]
    if not paths:
        raise ValueError(f"lora.module_path {lora.module_path!r} matches no projection of a decoder layer "
                         f"(paths: {', '.join(projections)})")
    gemm = {p: (math.prod(projections[p].in_shape), math.prod(projections[p].out_shape)) for p in paths}
    narrowest = min(paths, key=lambda p: min(gemm[p]))
    if lora.rank > min(gemm[narrowest]):
        raise ValueError(f"lora.rank {lora.rank} exceeds {narrowest}'s smaller side {min(gemm[narrowest])} "
                         f"({list(gemm[narrowest])})")
    return paths


# ----------------------------------------------------------------------------- applying qwix


def quantization_block(lora: LoraConfig, input_widths: list[int]) -> int | None:
    """The block of input rows one QLoRA scale covers (None: the whole input, or no quantization), for
    adapted projections of these GEMM input widths; ValueError when a set `block_size` divides not all."""
    if lora.base_dtype is None:
        return None
    if lora.block_size is not None:
        bad = sorted({w for w in input_widths if w % lora.block_size})
        if bad:
            raise ValueError(f"lora.block_size {lora.block_size} does not divide the input width {bad[0]} of an "
                             f"adapted projection")
        return lora.block_size
    four_bit = lora.base_dtype != "int8" and all(w % FOUR_BIT_BLOCK == 0 for w in input_widths)
    return FOUR_BIT_BLOCK if four_bit else None


def lora_provider(lora: LoraConfig, block: int | None = None):
    """qwix's `LoraProvider` with one `LoraRule` of these settings (QLoRA: `weight_qtype`, scales per
    `block` input rows)."""
    import qwix  # the models extra; only adapted models need it

    return qwix.LoraProvider([qwix.LoraRule(module_path=lora.module_path, rank=lora.rank, alpha=lora.alpha,
                                            weight_qtype=lora.base_dtype, tile_size=block)])


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _hold_in_gemm_form(projection: DenseGeneral, leading: int) -> None:
    """Kernel [(L,) *in, *out] → [(L,) D_in, D_out], logical axes (first in-axis, first out-axis)."""
    variable = projection.kernel
    value, axes = variable.get_value(), variable.get_metadata().get("out_sharding")
    shape = value.shape[:leading] + (math.prod(projection.in_shape), math.prod(projection.out_shape))
    if axes is not None:
        axes = (*axes[:leading], axes[leading], axes[leading + projection.num_contracted])
    setattr(projection, "kernel", variable.replace(value.reshape(shape), out_sharding=axes))


def _layer_slice(stacked: DecoderLayer, index: int) -> DecoderLayer:
    """Layer `index` of a stacked layer, the ``layers`` axis dropped from values and axes."""
    graphdef, state = nnx.split(stacked)

    def take(variable: nnx.Variable) -> nnx.Variable:
        axes = variable.get_metadata().get("out_sharding")
        return variable.replace(variable.get_value()[index], out_sharding=None if axes is None else axes[1:])

    return nnx.merge(graphdef, jax.tree.map(take, state, is_leaf=_is_variable))


def _probe_inputs(model: CausalLM) -> tuple[Any, ...]:
    """Two tokens' layer inputs (x, cos, sin, mask): what qwix runs a layer on to create its adapters."""
    config = model.config
    positions = jnp.arange(2, dtype=jnp.int32)[None]
    assert config.head_dim is not None
    cos, sin = rope_cos_sin(positions, config.head_dim, *config.rope(config.every_layer_type[0]))
    x = jnp.zeros((1, 2, config.hidden_size), config.activation_dtype)
    return x, cos, sin, AttentionMask(positions[0], jnp.ones((1, 2), jnp.bool_), positions, positions)


def _stack_layers(stacked_base: DecoderLayer, adapted: list[DecoderLayer]) -> DecoderLayer:
    """One stacked layer of qwix's adapted layers: base variables qwix left alone are the stacked
    base's own (no copy); new ones (adapters, quantized kernels) stacked on a ``layers`` axis."""
    base = dict(nnx.to_flat_state(nnx.state(stacked_base)))
    per_layer = [dict(nnx.to_flat_state(nnx.state(layer))) for layer in adapted]

    def stacked(path: tuple, first: nnx.Variable) -> nnx.Variable:
        kept = base.get(path)
        if kept is not None and type(kept) is type(first) and kept.shape[1:] == first.shape:
            return kept
        axes = first.get_metadata().get("out_sharding")
        return first.replace(jnp.stack([layer[path].get_value() for layer in per_layer]),
                             out_sharding=None if axes is None else (AXIS_LAYERS, *axes))

    state = nnx.from_flat_state([(path, stacked(path, first)) for path, first in per_layer[0].items()])
    return nnx.merge(nnx.graphdef(adapted[0]), state)


def apply_lora(model: CausalLM, lora: LoraConfig) -> CausalLM:
    """Adapt `model` in place and return it: qwix adapts each decoder layer (A drawn from
    ``fold_in(key(seed), layer)``, B = 0, so the model computes what it did), then the layers are
    stacked again. The embedding, the LM head and the norms stay as they are."""
    if is_adapted(model):
        raise ValueError("the model already has adapters (apply_lora once; merge_lora gives a plain model)")
    import qwix

    paths = adapted_paths(model.layers, lora)
    widths = [math.prod(layer_projections(model.layers)[p].in_shape) for p in paths]
    provider = lora_provider(lora, quantization_block(lora, widths))
    digest = params_digest(model)
    for path in paths:
        _hold_in_gemm_form(layer_projections(model.layers)[path], leading=1)
    probe, key = _probe_inputs(model), jax.random.key(lora.seed)
    adapted = [qwix.apply_lora_to_model(_layer_slice(model.layers, i), provider, *probe,
                                        rngs=nnx.Rngs(jax.random.fold_in(key, i)))
               for i in range(model.config.num_hidden_layers)]
    model.layers = _stack_layers(model.layers, adapted)
    setattr(model, "lora", lora)  # static attributes: they travel in the graphdef
    setattr(model, "lora_base_sha256", digest)
    return model


# ----------------------------------------------------------------------------- reading adapters


def lora_of(model: CausalLM) -> LoraConfig:
    """The `LoraConfig` `apply_lora` adapted `model` with; ValueError for a plain model."""
    lora = getattr(model, "lora", None)
    if lora is None:
        raise ValueError("this model has no adapters (apply_lora adds them)")
    return lora


def is_adapted(model: CausalLM) -> bool:
    return getattr(model, "lora", None) is not None


def adapter_variables(projection: DenseGeneral) -> tuple[nnx.Variable, nnx.Variable]:
    """(A [L, D_in, r], B [L, r, D_out]) of an adapted projection: the variables qwix created."""
    return getattr(projection, "kernel_lora_a"), getattr(projection, "kernel_lora_b")


def adapters_off(adapters: nnx.State) -> nnx.State:
    """The adapters with every B at 0: ``nnx.merge(graphdef, adapters_off(adapters), frozen)`` is the base
    model (a reference policy for a KL term) without a second copy of the base."""
    def off(path, variable: nnx.Variable) -> nnx.Variable:
        is_b = str(getattr(path[-1], "key", path[-1])) == "kernel_lora_b"
        return variable.replace(jnp.zeros_like(variable.get_value())) if is_b else variable

    return jax.tree_util.tree_map_with_path(off, adapters, is_leaf=_is_variable)


def _values(tree: Any) -> Any:
    return jax.tree.map(lambda v: v.get_value(), tree, is_leaf=_is_variable)


def base_kernel(projection: DenseGeneral) -> jax.Array:
    """The frozen W [L, D_in, D_out] of an adapted projection, dequantized under QLoRA."""
    kernel = projection.kernel
    if isinstance(kernel, nnx.Variable):
        return kernel.get_value()
    import qwix

    return qwix.dequantize(_values(kernel.array))


def adapter_delta(projection: DenseGeneral, lora: LoraConfig) -> jax.Array:
    """(α / r) · A B, [L, D_in, D_out] in float32: what the adapters add to W."""
    a, b = (v.get_value().astype(jnp.float32) for v in adapter_variables(projection))
    return (lora.alpha / lora.rank) * jnp.einsum("lir,lro->lio", a, b)


def merged_kernels(model: CausalLM) -> dict[tuple[str, ...], jax.Array]:
    """Each adapted projection's W + (α / r) A B in its declared shape [L, *in, *out] and the
    parameter dtype, by parameter path (``("layers", "self_attn", "q_proj", "kernel")``)."""
    lora = lora_of(model)
    out = {}
    for path in adapted_paths(model.layers, lora):
        projection = layer_projections(model.layers)[path]
        merged = base_kernel(projection).astype(jnp.float32) + adapter_delta(projection, lora)
        shape = (model.config.num_hidden_layers, *projection.in_shape, *projection.out_shape)
        out[("layers", *path.split("/"), "kernel")] = merged.astype(model.config.param_dtype).reshape(shape)
    return out


def merge_lora(model: CausalLM) -> CausalLM:
    """A plain `CausalLM` (no qwix, no adapters) computing what the adapted `model` computes, up to
    rounding: the adapted kernels merged (`merged_kernels`), every other parameter shared."""
    lora_of(model)
    plain = nnx.eval_shape(lambda: CausalLM(model.config, rngs=nnx.Rngs(0)))
    merged, ours = merged_kernels(model), dict(nnx.to_flat_state(nnx.state(model)))

    def fill(path: tuple, variable: nnx.Variable) -> nnx.Variable:
        path = tuple(str(k) for k in path)
        return variable.replace(merged[path] if path in merged else ours[path].get_value())

    state = nnx.from_flat_state([(p, fill(p, v)) for p, v in nnx.to_flat_state(nnx.state(plain))])
    return nnx.merge(nnx.graphdef(plain), state)


def base_digest(model: CausalLM) -> str:
    """`weights.params_digest` of the base before `apply_lora` adapted it (recorded then): what a
    checkpoint or a PEFT folder of these adapters names as their base."""
    lora_of(model)
    return getattr(model, "lora_base_sha256")
