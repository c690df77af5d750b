"""The decoder's building blocks as nnx modules: RMSNorm, embedding, dense projections, gated MLP,
grouped-query attention with RoPE. Each reads its family switches from `ModelConfig`.

Parameters carry logical axis names in their `out_sharding` metadata (`LOGICAL_AXES`); one rules
table (`fipo_jax.parallel.sharding.DEFAULT_RULES`) maps them to mesh axes. Head axes stay separate in
the kernels (q kernel [embed, heads, head_dim]) so "heads → tensor" shards whole heads.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fipo_jax.models.attention import AttentionMask, decode_attention, grouped_query_attention
from fipo_jax.models.attention_kernels import full_attention
from fipo_jax.models.config import ModelConfig
from fipo_jax.models.kv_cache import LayerCache
from fipo_jax.models.rope import apply_rope

AXIS_LAYERS = "layers"  # the leading axis of the decoder layers' stacked parameters (never split)
AXIS_VOCAB = "vocab"
AXIS_EMBED = "embed"
AXIS_HEADS = "heads"
AXIS_KV_HEADS = "kv_heads"
AXIS_HEAD_DIM = "head_dim"
AXIS_MLP = "mlp"
AXIS_NORM = "norm"
LOGICAL_AXES = (AXIS_LAYERS, AXIS_VOCAB, AXIS_EMBED, AXIS_HEADS, AXIS_KV_HEADS, AXIS_HEAD_DIM, AXIS_MLP, AXIS_NORM)


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def rms_norm(x_BxTxD: jax.Array, weight_D: jax.Array, eps: float, unit_offset: bool = False) -> jax.Array:
    """RMSNorm, statistics in float32, result in x's dtype; x̂ = x / sqrt(mean(x²) + ε).

    unit_offset=False (Llama / Qwen): w ⊙ cast(x̂), the product in x's dtype.
    unit_offset=True  (Gemma):        cast(x̂ ⊙ (1 + w)), the product in float32.
    """
    x32 = x_BxTxD.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    weight = weight_D.reshape((1,) * (x_BxTxD.ndim - 1) + weight_D.shape)
    if unit_offset:
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x_BxTxD.dtype)
    return normed.astype(x_BxTxD.dtype) * weight.astype(x_BxTxD.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))), torch's `gelu(approximate="tanh")`."""
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": gelu_tanh}


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def _normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], config: ModelConfig) -> nnx.Param:
    value = config.initializer_range * jax.random.normal(rngs.params(), shape, config.param_dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _constant_param(shape: tuple[int, ...], axes: tuple[str, ...], fill: float, config: ModelConfig) -> nnx.Param:
    return nnx.Param(jnp.full(shape, fill, config.param_dtype), out_sharding=axes, eager_sharding=False)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale `weight` (1 at init: w = 1, or w = 0 with a unit offset)."""

    def __init__(self, config: ModelConfig, size: int | None = None, axis: str = AXIS_NORM):
        self.eps = config.rms_norm_eps
        self.unit_offset = config.norm_unit_offset
        fill = 0.0 if self.unit_offset else 1.0
        self.weight = _constant_param((size or config.hidden_size,), (axis,), fill, config)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps, self.unit_offset)


class Embed(nnx.Module):
    """Token embedding table `embedding` [V, D]; rows × √D when the config scales embeddings."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.embedding = _normal_param(rngs, (config.vocab_size, config.hidden_size), (AXIS_VOCAB, AXIS_EMBED), config)
        self.scale = math.sqrt(config.hidden_size) if config.scale_embeddings else None

    def __call__(self, ids_BxT: jax.Array, dtype: jnp.dtype) -> jax.Array:
        x_BxTxD = jnp.take(self.embedding[...], ids_BxT, axis=0).astype(dtype)
        if self.scale is None:
            return x_BxTxD
        return x_BxTxD * jnp.asarray(self.scale, dtype)  # the scale rounded to the compute dtype, as in HF


class DenseGeneral(nnx.Module):
    """y = einsum(equation, x, kernel) (+ bias), kernel axes kept separate for sharding.

    The equation must contract the trailing axes of x with the leading axes of the kernel
    (``"btd,dhk->bthk"``, ``"bthk,hkd->btd"``). It is computed as one 2-D GEMM
    ``[B·T, D_in] @ [D_in, D_out]``: XLA:CPU lowers dots with several contracting dimensions
    (the weight gradient of a 3-D einsum contracts B and T) to a slow generic loop.
    """

    def __init__(
        self,
        equation: str,
        kernel_shape: tuple[int, ...],
        kernel_axes: tuple[str, ...],
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        bias: bool = False,
    ):
        inputs, output = equation.split("->")
        x_axes, k_axes = inputs.split(",")
        n = len([a for a in x_axes if a in k_axes])
        if x_axes[len(x_axes) - n :] != k_axes[:n] or output != x_axes[: len(x_axes) - n] + k_axes[n:]:
            raise ValueError(f"DenseGeneral needs '<batch><contracted>,<contracted><features>->"
                             f"<batch><features>', got {equation!r}")
        self.equation = equation
        self.num_contracted = n
        self.in_shape, self.out_shape = tuple(kernel_shape[:n]), tuple(kernel_shape[n:])
        self.kernel = _normal_param(rngs, kernel_shape, kernel_axes, config)
        self.bias = _constant_param(kernel_shape[n:], kernel_axes[n:], 0.0, config) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        # The GEMM's shapes come from the declared kernel shape, not the stored one: an adapted
        # projection (`fipo_jax.models.lora`) holds its kernel in GEMM form [D_in, D_out], quantized
        # under QLoRA (a qwix array, which `jnp.asarray` casts under qwix's interception).
        kernel = jnp.asarray(self.kernel[...], x.dtype)
        d_in, d_out = math.prod(self.in_shape), math.prod(self.out_shape)
        batch_shape = x.shape[: x.ndim - self.num_contracted]
        y = jnp.dot(x.reshape(-1, d_in), kernel.reshape(d_in, d_out))
        y = y.reshape(batch_shape + self.out_shape)
        if self.bias is not None:
            bias = self.bias[...]
            y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape).astype(x.dtype)
        return y


class MLP(nnx.Module):
    """Gated MLP: down(act(x W_gate) ⊙ x W_up), act = silu (SwiGLU) or tanh-GELU (GeGLU)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.activation = config.hidden_activation
        self.gate_proj = DenseGeneral("btd,df->btf", (d, f), (AXIS_EMBED, AXIS_MLP), config, rngs=rngs, bias=bias)
        self.up_proj = DenseGeneral("btd,df->btf", (d, f), (AXIS_EMBED, AXIS_MLP), config, rngs=rngs, bias=bias)
        self.down_proj = DenseGeneral("btf,fd->btd", (f, d), (AXIS_MLP, AXIS_EMBED), config, rngs=rngs, bias=bias)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return self.down_proj(ACTIVATIONS[self.activation](self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD))


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional q/k norms, biases and sliding window.

    Kernels: q [embed, heads, head_dim], k/v [embed, kv_heads, head_dim], o [heads, head_dim, embed].
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, h, n, k = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        assert k is not None  # ModelConfig.__post_init__ resolves head_dim
        self.scale = config.attention_scale
        self.attention_chunk_size = config.attention_chunk_size
        self.attention_impl = config.attention_impl
        self.sliding_window = config.sliding_window
        self.decode_block_size = config.decode_block_size
        qkv: dict[str, Any] = dict(rngs=rngs, bias=config.qkv_bias)
        self.q_proj = DenseGeneral("btd,dhk->bthk", (d, h, k), (AXIS_EMBED, AXIS_HEADS, AXIS_HEAD_DIM), config, **qkv)
        kv_axes = (AXIS_EMBED, AXIS_KV_HEADS, AXIS_HEAD_DIM)
        self.k_proj = DenseGeneral("btd,dnk->btnk", (d, n, k), kv_axes, config, **qkv)
        self.v_proj = DenseGeneral("btd,dnk->btnk", (d, n, k), kv_axes, config, **qkv)
        self.o_proj = DenseGeneral("bthk,hkd->btd", (h, k, d), (AXIS_HEADS, AXIS_HEAD_DIM, AXIS_EMBED), config,
                                   rngs=rngs, bias=config.o_proj_bias)
        self.q_norm: RMSNorm | None
        self.k_norm: RMSNorm | None
        if config.qk_norm:
            self.q_norm = RMSNorm(config, k, AXIS_HEAD_DIM)
            self.k_norm = RMSNorm(config, k, AXIS_HEAD_DIM)
        else:
            self.q_norm = self.k_norm = None

    def __call__(
        self,
        x_BxTxD: jax.Array,
        cos_BxTxK: jax.Array,
        sin_BxTxK: jax.Array,
        mask: AttentionMask,
        window: int | jax.Array | None = None,
        cache: LayerCache | None = None,
        write_index: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """Without a cache S = T; with one, the T new keys/values are written into layer
        ``cache.layer`` of the stacked cache at slots [write_index, write_index + T) and the queries
        attend over all S_max slots of that layer (a single decode query over the visible blocks
        only: `decode_attention`). `window`: the sliding window of this layer (None: full
        attention; a traced int when some layers slide)."""
        q_BxTxHxK, k_BxTxNxK = self.q_proj(x_BxTxD), self.k_proj(x_BxTxD)
        if self.q_norm is not None and self.k_norm is not None:  # both or neither (qk_norm)
            q_BxTxHxK, k_BxTxNxK = self.q_norm(q_BxTxHxK), self.k_norm(k_BxTxNxK)
        q_BxTxHxK = apply_rope(q_BxTxHxK, cos_BxTxK, sin_BxTxK)
        k_BxNxTxK = apply_rope(k_BxTxNxK, cos_BxTxK, sin_BxTxK).transpose(0, 2, 1, 3)
        v_BxNxTxK = self.v_proj(x_BxTxD).transpose(0, 2, 1, 3)
        if cache is None:
            out_BxTxHxK = full_attention(q_BxTxHxK, k_BxNxTxK, v_BxNxTxK, mask, self.scale, window,
                                         self.attention_chunk_size, self.attention_impl, self.sliding_window)
            return self.o_proj(out_BxTxHxK), None
        assert write_index is not None, "a cached forward names its write_index"
        cache = cache.write(k_BxNxTxK, v_BxNxTxK, write_index)  # write_index [B]: each row at its own slot
        keys, values = cache.keys, cache.values
        block = self.decode_block_size
        if q_BxTxHxK.shape[1] == 1 and block is not None and keys.shape[3] > block:
            out_BxHxK = decode_attention(q_BxTxHxK[:, 0], keys, values, mask, self.scale, block, window, cache.layer)
            return self.o_proj(out_BxHxK[:, None]), cache
        k_BxNxSxK = jax.lax.dynamic_index_in_dim(keys, cache.layer, axis=1, keepdims=False).astype(x_BxTxD.dtype)
        v_BxNxSxK = jax.lax.dynamic_index_in_dim(values, cache.layer, axis=1, keepdims=False).astype(x_BxTxD.dtype)
        out_BxTxHxK = grouped_query_attention(q_BxTxHxK, k_BxNxSxK, v_BxNxSxK, mask, self.scale, window,
                                              self.attention_chunk_size)
        return self.o_proj(out_BxTxHxK), cache
