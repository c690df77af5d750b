"""Qwen2 / Qwen2.5 causal language model in flax.nnx.

Architecture (matches `transformers.Qwen2ForCausalLM` with full attention):

    h⁰ = E[ids]                                                   E: [V, D]
    for each layer ℓ:
        a  = RMSNorm(hˡ) ;  q = RoPE(a W_q + b_q), k = RoPE(a W_k + b_k), v = a W_v + b_v
        hˡ' = hˡ + Attn(q, k, v) W_o                               grouped-query, causal
        hˡ⁺¹ = hˡ' + (silu(m W_gate) ⊙ (m W_up)) W_down,  m = RMSNorm(hˡ')
    logits = RMSNorm(hᴸ) W_lm                                      W_lm = Eᵀ when tied

Parameters carry logical axis names in their `out_sharding` metadata (see `LOGICAL_AXES`);
`fipo_jax.models.hf_io.param_shardings` maps them to a mesh. Head axes stay separate in the
kernels (q kernel [embed, heads, head_dim]) so "heads → tensor" shards whole heads.

Padding: `attention_mask` [B, T] (True = real token) removes pad keys from attention; RoPE
positions default to `cumsum(mask) - 1`, so a left-padded row gets positions 0, 1, ... for its
real tokens and computes exactly what that row would compute alone.

KV cache (for the sampler): see `KVCache`, `init_kv_cache` and `Qwen2ForCausalLM.__call__`.
"""

from __future__ import annotations

import math

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from fipo_jax.models.config import Qwen2Config

# Logical axis names used in parameter metadata (one rules table maps them to mesh axes).
AXIS_VOCAB = "vocab"
AXIS_EMBED = "embed"
AXIS_HEADS = "heads"
AXIS_KV_HEADS = "kv_heads"
AXIS_HEAD_DIM = "head_dim"
AXIS_MLP = "mlp"
AXIS_NORM = "norm"
LOGICAL_AXES = (AXIS_VOCAB, AXIS_EMBED, AXIS_HEADS, AXIS_KV_HEADS, AXIS_HEAD_DIM, AXIS_MLP, AXIS_NORM)

# Logical axes of each per-layer KV-cache array [B, S_max, N, K] (batch / length are activation
# axes: the sampler decides how to shard them).
KV_CACHE_AXES = ("batch", "length", AXIS_KV_HEADS, AXIS_HEAD_DIM)

# Finite "minus infinity": a query whose keys are all masked (a pad position) gets a uniform,
# finite distribution instead of NaN, so pad rows never poison gradients.
_MASKED_SCORE = float(jnp.finfo(jnp.float32).min)


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def rms_norm(x_BxTxD: jax.Array, weight_D: jax.Array, eps: float) -> jax.Array:
    """y = w ⊙ x / sqrt(mean(x²) + ε), statistics in float32, result in x's dtype.

    As in HF Qwen2RMSNorm: normalise in float32, cast back, then scale by the weight.
    """
    x32 = x_BxTxD.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    weight_1xD = weight_D.reshape((1,) * (x_BxTxD.ndim - 1) + weight_D.shape)
    return (x32 * inv_rms).astype(x_BxTxD.dtype) * weight_1xD.astype(x_BxTxD.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
    """ω_i = θ^(-2i/K) for i = 0 .. K/2-1, float32 [K/2]."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents)


def rope_cos_sin(positions_BxT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, K] (float32) in HF's rotate-half layout: angles = concat(pω, pω)."""
    inv_freq_1x1xHalf = rope_inverse_frequencies(head_dim, theta)[None, None, :]
    angles_BxTxHalf = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_1x1xHalf
    angles_BxTxK = jnp.concatenate([angles_BxTxHalf, angles_BxTxHalf], axis=-1)
    return jnp.cos(angles_BxTxK), jnp.sin(angles_BxTxK)


def apply_rope(x_BxTxNxK: jax.Array, cos_BxTxK: jax.Array, sin_BxTxK: jax.Array) -> jax.Array:
    """x·cos + rotate_half(x)·sin with rotate_half([x₁, x₂]) = [-x₂, x₁] (HF convention).

    Computed in float32, returned in x's dtype.
    """
    x32 = x_BxTxNxK.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x32 * cos_BxTxK[:, :, None, :] + rotated * sin_BxTxK[:, :, None, :]
    return out.astype(x_BxTxNxK.dtype)


def positions_from_mask(mask_BxT: jax.Array, start_B: jax.Array | None = None) -> jax.Array:
    """RoPE positions p_bt = start_b + (#real tokens in row b up to and including t) − 1.

    Real tokens get consecutive positions starting at `start_b` (0 by default) whatever the
    padding; pad tokens get the position of the preceding real token (clipped at 0), which is
    harmless because pad keys are masked out.
    """
    counts_BxT = jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1)
    if start_B is not None:
        counts_BxT = counts_BxT + start_B.astype(jnp.int32)[:, None]
    return jnp.maximum(counts_BxT - 1, 0)


class AttentionMask(NamedTuple):
    """Which key slots each query may attend to, without a [B, T, S] tensor.

    allowed[b, t, s] = (s ≤ query_slots[t]) ∧ key_valid[b, s]: causal over slot indices (a
    full forward has query t at slot t; a cached forward writes its T queries at slots
    index … index + T − 1), restricted to slots holding a real token of row b. Built per query
    chunk, so masks cost O(B·S) memory, not O(B·T·S).
    """

    query_slots_T: jax.Array  # int32 [T]
    key_valid_BxS: jax.Array  # bool [B, S]

    def allowed(self) -> jax.Array:
        """bool [B, T, S]."""
        key_slots_S = jnp.arange(self.key_valid_BxS.shape[1], dtype=jnp.int32)
        causal_TxS = key_slots_S[None, :] <= self.query_slots_T[:, None]
        return causal_TxS[None] & self.key_valid_BxS[:, None, :]


def grouped_query_attention(
    q_BxTxHxK: jax.Array,
    k_BxNxSxK: jax.Array,
    v_BxNxSxK: jax.Array,
    mask: AttentionMask,
    query_chunk_size: int | None = None,
) -> jax.Array:
    """softmax(q kᵀ / sqrt(K) masked by `mask`) v, optionally over chunks of queries.

    Each query row's softmax involves only its own scores, so splitting the T queries into
    chunks of `query_chunk_size` (a `lax.map`, each chunk rematerialised in the backward pass)
    gives the same result with O(chunk × S) score memory per layer instead of O(T × S) — what
    makes 20k-token training sequences fit. The last chunk is padded with queries that may
    attend to nothing; their outputs are dropped.
    """
    q_len = q_BxTxHxK.shape[1]
    if query_chunk_size is None or q_len <= query_chunk_size:
        return _attention(q_BxTxHxK, k_BxNxSxK, v_BxNxSxK, mask.allowed())
    batch, _, num_heads, head_dim = q_BxTxHxK.shape
    num_chunks = -(-q_len // query_chunk_size)
    pad = num_chunks * query_chunk_size - q_len
    q_CxBxcxHxK = jnp.moveaxis(
        jnp.pad(q_BxTxHxK, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(
            batch, num_chunks, query_chunk_size, num_heads, head_dim
        ),
        1,
        0,
    )
    slots_Cxc = jnp.pad(mask.query_slots_T, (0, pad), constant_values=-1).reshape(num_chunks, query_chunk_size)

    def attend_chunk(q_and_slots):
        q_BxcxHxK, slots_c = q_and_slots
        allowed_BxcxS = AttentionMask(slots_c, mask.key_valid_BxS).allowed()
        return _attention(q_BxcxHxK, k_BxNxSxK, v_BxNxSxK, allowed_BxcxS)

    out_CxBxcxHxK = jax.lax.map(jax.checkpoint(attend_chunk, prevent_cse=False), (q_CxBxcxHxK, slots_Cxc))
    out_BxTpxHxK = jnp.moveaxis(out_CxBxcxHxK, 0, 1).reshape(batch, -1, num_heads, head_dim)
    return out_BxTpxHxK[:, :q_len]


def decode_attention(
    q_BxHxK: jax.Array,
    k_cache_BxNxSxK: jax.Array,
    v_cache_BxNxSxK: jax.Array,
    mask: AttentionMask,
    block_size: int,
) -> jax.Array:
    """One query per row against the cache, reading only the blocks of slots written so far.

    A decode step's query sits at slot i = mask.query_slots_T[0] and may attend only to slots
    ≤ i, so slots after i need not be read: blocks b = 0 … ⌈(i + 1) / block⌉ − 1 are visited
    in a `fori_loop` with a traced trip count, combined by the online softmax

        m' = max(m, max_s z_s),  l' = l·e^(m − m') + Σ_s e^(z_s − m'),
        a' = a·e^(m − m') + Σ_s e^(z_s − m') v_s,      out = a / l,

    so the cost of a step grows with the tokens generated so far instead of the cache size
    (a full-length cache for 20k-token responses is otherwise streamed whole at every step).
    Equal to the dense softmax up to float rounding. Not differentiable (decode only). When
    S is not a multiple of the block, the last block is read from S − block and its slots that
    an earlier block already covered are masked out.
    """
    batch, num_heads, head_dim = q_BxHxK.shape
    num_kv_heads, max_len = k_cache_BxNxSxK.shape[1], k_cache_BxNxSxK.shape[2]
    block = min(block_size, max_len)
    groups = num_heads // num_kv_heads
    q_BxNxGxK = q_BxHxK.reshape(batch, num_kv_heads, groups, head_dim)
    query_slot = mask.query_slots_T[0]
    num_blocks = query_slot // block + 1

    def visit(b, carry):
        m_BxNxG, l_BxNxG, acc_BxNxGxK = carry
        start = jnp.minimum(b * block, max_len - block)
        slots_L = start + jnp.arange(block, dtype=jnp.int32)
        # As in `_attention`: inputs in the query's dtype, scores and accumulation in float32.
        k_BxNxLxK = lax.dynamic_slice_in_dim(k_cache_BxNxSxK, start, block, axis=2).astype(q_BxHxK.dtype)
        v_BxNxLxK = lax.dynamic_slice_in_dim(v_cache_BxNxSxK, start, block, axis=2).astype(q_BxHxK.dtype)
        valid_BxL = lax.dynamic_slice_in_dim(mask.key_valid_BxS, start, block, axis=1)
        allowed_BxL = valid_BxL & ((slots_L >= b * block) & (slots_L <= query_slot))[None]
        z_BxNxGxL = jnp.einsum(
            "bngk,bnlk->bngl", q_BxNxGxK, k_BxNxLxK, preferred_element_type=jnp.float32
        ) * (head_dim**-0.5)
        z_BxNxGxL = jnp.where(allowed_BxL[:, None, None], z_BxNxGxL, _MASKED_SCORE)
        m_new = jnp.maximum(m_BxNxG, jnp.max(z_BxNxGxL, axis=-1))
        p_BxNxGxL = jnp.exp(z_BxNxGxL - m_new[..., None])
        rescale = jnp.exp(m_BxNxG - m_new)
        l_new = l_BxNxG * rescale + jnp.sum(p_BxNxGxL, axis=-1)
        acc_new = acc_BxNxGxK * rescale[..., None] + jnp.einsum(
            "bngl,bnlk->bngk", p_BxNxGxL.astype(v_BxNxLxK.dtype), v_BxNxLxK, preferred_element_type=jnp.float32
        )
        return m_new, l_new, acc_new

    init = (
        jnp.full((batch, num_kv_heads, groups), _MASKED_SCORE, jnp.float32),
        jnp.zeros((batch, num_kv_heads, groups), jnp.float32),
        jnp.zeros((batch, num_kv_heads, groups, head_dim), jnp.float32),
    )
    _, l_BxNxG, acc_BxNxGxK = lax.fori_loop(0, num_blocks, visit, init)
    out_BxNxGxK = acc_BxNxGxK / l_BxNxG[..., None]
    return out_BxNxGxK.reshape(batch, num_heads, head_dim).astype(q_BxHxK.dtype)


def _attention(
    q_BxTxHxK: jax.Array,
    k_BxNxSxK: jax.Array,
    v_BxNxSxK: jax.Array,
    allowed_BxTxS: jax.Array,
) -> jax.Array:
    """softmax(q kᵀ / sqrt(K) masked by `allowed`) v with H query heads sharing N kv heads.

    Query head h uses kv head h // G (G = H / N), the same grouping as HF's `repeat_kv`.
    Keys and values are head-major ([B, N, S, K]) so both products are batched GEMMs over
    (B, N) without transposing the keys (a full copy of the KV cache per decode step).
    Scores and softmax are float32; the output has q's dtype.
    """
    batch, q_len, num_heads, head_dim = q_BxTxHxK.shape
    num_kv_heads = k_BxNxSxK.shape[1]
    groups = num_heads // num_kv_heads
    q_BxNxGTxK = (
        q_BxTxHxK.reshape(batch, q_len, num_kv_heads, groups, head_dim)
        .transpose(0, 2, 3, 1, 4)
        .reshape(batch, num_kv_heads, groups * q_len, head_dim)
    )
    scores_BxNxGTxS = jnp.einsum(
        "bnqk,bnsk->bnqs", q_BxNxGTxK, k_BxNxSxK, preferred_element_type=jnp.float32
    ) * (head_dim**-0.5)
    scores_BxNxGxTxS = scores_BxNxGTxS.reshape(batch, num_kv_heads, groups, q_len, -1)
    scores_BxNxGxTxS = jnp.where(allowed_BxTxS[:, None, None], scores_BxNxGxTxS, _MASKED_SCORE)
    probs_BxNxGTxS = (
        jax.nn.softmax(scores_BxNxGxTxS, axis=-1)
        .astype(v_BxNxSxK.dtype)
        .reshape(batch, num_kv_heads, groups * q_len, -1)
    )
    out_BxNxGTxK = jnp.einsum("bnqs,bnsk->bnqk", probs_BxNxGTxS, v_BxNxSxK)
    out_BxTxNxGxK = out_BxNxGTxK.reshape(batch, num_kv_heads, groups, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out_BxTxNxGxK.reshape(batch, q_len, num_heads, head_dim)


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------


class KVCache(NamedTuple):
    """Preallocated, static-shape key/value cache (a pytree; jit- and donation-friendly).

    Slots are shared by all rows: a call with T new tokens writes slots [index, index + T) of
    every row. Rows differ only through `valid_BxS` (pad / finished-row slots are False and never
    attended to) and `next_position_B` (RoPE position of the row's next real token).

    Attributes:
      keys: per layer, [B, N, S_max, K] rotated keys (head-major: see grouped_query_attention).
      values: per layer, [B, N, S_max, K] values.
      valid_BxS: bool [B, S_max], slot holds a real token of that row.
      next_position_B: int32 [B], RoPE position the row's next real token receives.
      index: int32 scalar, next slot to write (same for all rows).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid_BxS: jax.Array
    next_position_B: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        """S_max, the number of slots."""
        return self.valid_BxS.shape[1]


def init_kv_cache(
    config: Qwen2Config, batch_size: int, max_len: int, dtype: str | jnp.dtype | None = None
) -> KVCache:
    """An empty cache: zeros, no valid slot, index 0, next positions 0.

    Args:
      config: the model config (layers, kv heads, head_dim).
      batch_size: B.
      max_len: S_max ≥ prompt length + tokens to generate.
      dtype: cache dtype; defaults to the config's compute dtype.
    """
    if batch_size <= 0 or max_len <= 0:
        raise ValueError(f"batch_size and max_len must be positive, got {batch_size}, {max_len}")
    cache_dtype = jnp.dtype(dtype) if dtype is not None else config.activation_dtype
    shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
    layers = range(config.num_hidden_layers)
    return KVCache(
        keys=tuple(jnp.zeros(shape, cache_dtype) for _ in layers),
        values=tuple(jnp.zeros(shape, cache_dtype) for _ in layers),
        valid_BxS=jnp.zeros((batch_size, max_len), jnp.bool_),
        next_position_B=jnp.zeros((batch_size,), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def _normal_param(
    rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], config: Qwen2Config
) -> nnx.Param:
    value = config.initializer_range * jax.random.normal(rngs.params(), shape, config.param_dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _constant_param(
    shape: tuple[int, ...], axes: tuple[str, ...], fill: float, config: Qwen2Config
) -> nnx.Param:
    value = jnp.full(shape, fill, config.param_dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale `weight` [D] (logical axis `norm`)."""

    def __init__(self, config: Qwen2Config):
        self.eps = config.rms_norm_eps
        self.weight = _constant_param((config.hidden_size,), (AXIS_NORM,), 1.0, config)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return rms_norm(x_BxTxD, self.weight[...], self.eps)


class Embed(nnx.Module):
    """Token embedding table `embedding` [V, D] (logical axes vocab, embed)."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        self.embedding = _normal_param(
            rngs, (config.vocab_size, config.hidden_size), (AXIS_VOCAB, AXIS_EMBED), config
        )

    def __call__(self, ids_BxT: jax.Array, dtype: jnp.dtype) -> jax.Array:
        return jnp.take(self.embedding[...], ids_BxT, axis=0).astype(dtype)


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
        config: Qwen2Config,
        *,
        rngs: nnx.Rngs,
        bias_axes: tuple[str, ...] | None = None,
    ):
        inputs, output = equation.split("->")
        x_axes, k_axes = inputs.split(",")
        contracted = [a for a in x_axes if a in k_axes]
        n = len(contracted)
        if x_axes[len(x_axes) - n :] != k_axes[:n] or output != x_axes[: len(x_axes) - n] + k_axes[n:]:
            raise ValueError(f"DenseGeneral needs '<batch><contracted>,<contracted><features>->"
                             f"<batch><features>', got {equation!r}")
        self.equation = equation
        self.num_contracted = n
        self.kernel = _normal_param(rngs, kernel_shape, kernel_axes, config)
        if bias_axes is not None:
            bias_shape = kernel_shape[len(kernel_shape) - len(bias_axes) :]
            self.bias = _constant_param(bias_shape, bias_axes, 0.0, config)
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(x.dtype)
        n = self.num_contracted
        batch_shape, in_shape, out_shape = x.shape[: x.ndim - n], kernel.shape[:n], kernel.shape[n:]
        y = jnp.dot(x.reshape(-1, math.prod(in_shape)), kernel.reshape(math.prod(in_shape), -1))
        y = y.reshape(batch_shape + out_shape)
        if self.bias is not None:
            bias = self.bias[...]
            y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape).astype(x.dtype)
        return y


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; biases on q/k/v only.

    Kernels: q [embed, heads, head_dim], k/v [embed, kv_heads, head_dim],
    o [heads, head_dim, embed].
    """

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        d, h, n, k = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.rope_theta = config.rope_theta
        self.attention_chunk_size = config.attention_chunk_size
        self.decode_block_size = config.decode_block_size
        self.q_proj = DenseGeneral(
            "btd,dhk->bthk", (d, h, k), (AXIS_EMBED, AXIS_HEADS, AXIS_HEAD_DIM), config,
            rngs=rngs, bias_axes=(AXIS_HEADS, AXIS_HEAD_DIM),
        )  # fmt: skip
        self.k_proj = DenseGeneral(
            "btd,dnk->btnk", (d, n, k), (AXIS_EMBED, AXIS_KV_HEADS, AXIS_HEAD_DIM), config,
            rngs=rngs, bias_axes=(AXIS_KV_HEADS, AXIS_HEAD_DIM),
        )  # fmt: skip
        self.v_proj = DenseGeneral(
            "btd,dnk->btnk", (d, n, k), (AXIS_EMBED, AXIS_KV_HEADS, AXIS_HEAD_DIM), config,
            rngs=rngs, bias_axes=(AXIS_KV_HEADS, AXIS_HEAD_DIM),
        )  # fmt: skip
        self.o_proj = DenseGeneral(
            "bthk,hkd->btd", (h, k, d), (AXIS_HEADS, AXIS_HEAD_DIM, AXIS_EMBED), config, rngs=rngs
        )

    def __call__(
        self,
        x_BxTxD: jax.Array,
        cos_BxTxK: jax.Array,
        sin_BxTxK: jax.Array,
        mask: AttentionMask,
        layer_cache: tuple[jax.Array, jax.Array] | None = None,
        write_index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Without a cache S = T; with one, the T new keys/values are written at slots
        [write_index, write_index + T) and the queries attend over all S_max slots (a single
        decode query over the written blocks only: `decode_attention`)."""
        q_BxTxHxK = apply_rope(self.q_proj(x_BxTxD), cos_BxTxK, sin_BxTxK)
        k_BxTxNxK = apply_rope(self.k_proj(x_BxTxD), cos_BxTxK, sin_BxTxK)
        k_BxNxTxK = k_BxTxNxK.transpose(0, 2, 1, 3)
        v_BxNxTxK = self.v_proj(x_BxTxD).transpose(0, 2, 1, 3)
        new_cache = None
        if layer_cache is not None:
            k_cache, v_cache = layer_cache
            start = (0, 0, write_index, 0)
            k_BxNxSxK = jax.lax.dynamic_update_slice(k_cache, k_BxNxTxK.astype(k_cache.dtype), start)
            v_BxNxSxK = jax.lax.dynamic_update_slice(v_cache, v_BxNxTxK.astype(v_cache.dtype), start)
            new_cache = (k_BxNxSxK, v_BxNxSxK)
            block = self.decode_block_size
            if q_BxTxHxK.shape[1] == 1 and block is not None and k_BxNxSxK.shape[2] > block:
                out_BxHxK = decode_attention(q_BxTxHxK[:, 0], k_BxNxSxK, v_BxNxSxK, mask, block)
                return self.o_proj(out_BxHxK[:, None]), new_cache
            k_BxNxSxK = k_BxNxSxK.astype(x_BxTxD.dtype)
            v_BxNxSxK = v_BxNxSxK.astype(x_BxTxD.dtype)
        else:
            k_BxNxSxK, v_BxNxSxK = k_BxNxTxK, v_BxNxTxK
        out_BxTxHxK = grouped_query_attention(
            q_BxTxHxK, k_BxNxSxK, v_BxNxSxK, mask, self.attention_chunk_size
        )
        return self.o_proj(out_BxTxHxK), new_cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(x W_gate) ⊙ x W_up); no biases."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = DenseGeneral("btd,df->btf", (d, f), (AXIS_EMBED, AXIS_MLP), config, rngs=rngs)
        self.up_proj = DenseGeneral("btd,df->btf", (d, f), (AXIS_EMBED, AXIS_MLP), config, rngs=rngs)
        self.down_proj = DenseGeneral("btf,fd->btd", (f, d), (AXIS_MLP, AXIS_EMBED), config, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD))


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: h += Attn(RMSNorm(h)); h += MLP(RMSNorm(h))."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(
        self,
        x_BxTxD: jax.Array,
        cos_BxTxK: jax.Array,
        sin_BxTxK: jax.Array,
        mask: AttentionMask,
        layer_cache: tuple[jax.Array, jax.Array] | None = None,
        write_index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        attn_BxTxD, new_cache = self.self_attn(
            self.input_layernorm(x_BxTxD), cos_BxTxK, sin_BxTxK, mask,
            layer_cache, write_index,
        )  # fmt: skip
        x_BxTxD = x_BxTxD + attn_BxTxD
        x_BxTxD = x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))
        return x_BxTxD, new_cache


def _layer_forward(
    layer: DecoderLayer,
    x_BxTxD: jax.Array,
    cos_BxTxK: jax.Array,
    sin_BxTxK: jax.Array,
    mask: AttentionMask,
) -> jax.Array:
    return layer(x_BxTxD, cos_BxTxK, sin_BxTxK, mask)[0]


class Qwen2ForCausalLM(nnx.Module):
    """Qwen2 causal LM. Parameter paths mirror HF names (see `hf_io.weight_mapping`).

    Call forms (all shapes static; B batch, T new tokens, V vocab, D hidden):

      logits_BxTxV = model(input_ids_BxT, positions_BxT=None, attention_mask_BxT=None)
          Full forward. Default mask: all True. Default positions: cumsum(mask) − 1, i.e.
          0..T−1 without padding, per-row 0-based real-token positions with left padding.

      logits_BxTxV, cache = model(input_ids_BxT, positions, attention_mask, kv_cache=cache)
          Cached forward (prefill when T > 1, decode when T == 1): writes the T new keys/values
          at slots [cache.index, cache.index + T), marks those slots valid where
          attention_mask is True, attends causally over every valid slot ≤ its own, and returns
          the cache with index += T and next_position_B advanced past the row's real tokens.
          Default positions: cache.next_position_B + cumsum(mask) − 1. The caller must keep
          cache.index + T ≤ cache.max_len (dynamic_update_slice would clamp silently).

      `last_token_only=True` returns logits for the final position only ([B, 1, V]), which is
      what prefill needs; with left padding the final position is real for every row.

    Logits are float32. For log-probs without a [B, T, V] tensor use `hidden_states` +
    `unembedding` / `unembed` on chunks.
    """

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embed(config, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = DenseGeneral(
                "btd,dv->btv", (config.hidden_size, config.vocab_size), (AXIS_EMBED, AXIS_VOCAB), config,
                rngs=rngs,
            )  # fmt: skip

    # -- output head ------------------------------------------------------------------------

    def unembedding(self) -> jax.Array:
        """The LM-head matrix W [D, V] (Eᵀ when embeddings are tied), in the param dtype."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def unembed(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """logits = h W in float32 (accumulated in float32 whatever the compute dtype)."""
        weight_DxV = self.unembedding().astype(hidden_BxTxD.dtype)
        return jnp.einsum(
            "...d,dv->...v", hidden_BxTxD, weight_DxV, preferred_element_type=jnp.float32
        )

    # -- trunk ------------------------------------------------------------------------------

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [B, T, D] (compute dtype) of a full forward pass."""
        mask_BxT = self._check_inputs(input_ids, positions, attention_mask)
        if positions is None:
            positions = positions_from_mask(mask_BxT)
        cos_BxTxK, sin_BxTxK = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        mask = AttentionMask(jnp.arange(input_ids.shape[1], dtype=jnp.int32), mask_BxT)
        layer_fn = nnx.remat(_layer_forward) if self.config.remat else _layer_forward
        x_BxTxD = self.embed_tokens(input_ids, self.config.activation_dtype)
        for layer in self.layers:
            x_BxTxD = layer_fn(layer, x_BxTxD, cos_BxTxK, sin_BxTxK, mask)
        return self.norm(x_BxTxD)

    def hidden_states_with_cache(
        self,
        input_ids: jax.Array,
        kv_cache: KVCache,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Cached forward (see class docstring): final-normed hidden [B, T, D] and new cache."""
        mask_BxT = self._check_inputs(input_ids, positions, attention_mask)
        batch, seq_len = input_ids.shape
        if len(kv_cache.keys) != self.config.num_hidden_layers:
            raise ValueError(
                f"kv_cache has {len(kv_cache.keys)} layers, model has {self.config.num_hidden_layers}"
            )
        if kv_cache.valid_BxS.shape[0] != batch:
            raise ValueError(
                f"kv_cache batch {kv_cache.valid_BxS.shape[0]} != input batch {batch}"
            )
        if seq_len > kv_cache.max_len:
            raise ValueError(f"{seq_len} new tokens do not fit a cache of {kv_cache.max_len} slots")
        if not isinstance(kv_cache.index, jax.core.Tracer) and int(kv_cache.index) + seq_len > kv_cache.max_len:
            # Only checkable outside jit; under jit the caller must guarantee it.
            raise ValueError(
                f"{seq_len} new tokens at slot {int(kv_cache.index)} do not fit a cache of "
                f"{kv_cache.max_len} slots"
            )
        if positions is None:
            positions = positions_from_mask(mask_BxT, kv_cache.next_position_B)
        cos_BxTxK, sin_BxTxK = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        index = kv_cache.index
        valid_BxS = jax.lax.dynamic_update_slice(kv_cache.valid_BxS, mask_BxT, (0, index))
        mask = AttentionMask(index + jnp.arange(seq_len, dtype=jnp.int32), valid_BxS)
        x_BxTxD = self.embed_tokens(input_ids, self.config.activation_dtype)
        new_keys, new_values = [], []
        for layer, k_cache, v_cache in zip(self.layers, kv_cache.keys, kv_cache.values):
            x_BxTxD, (k_new, v_new) = layer(
                x_BxTxD, cos_BxTxK, sin_BxTxK, mask, (k_cache, v_cache), index
            )
            new_keys.append(k_new)
            new_values.append(v_new)
        # Next position = last real position + 1; rows with no real token keep their counter.
        last_real_B = jnp.max(jnp.where(mask_BxT, positions, -1), axis=1)
        next_position_B = jnp.where(
            jnp.any(mask_BxT, axis=1), last_real_B + 1, kv_cache.next_position_B
        ).astype(jnp.int32)
        new_cache = KVCache(
            keys=tuple(new_keys),
            values=tuple(new_values),
            valid_BxS=valid_BxS,
            next_position_B=next_position_B,
            index=(index + seq_len).astype(jnp.int32),
        )
        return self.norm(x_BxTxD), new_cache

    # -- logits -----------------------------------------------------------------------------

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        kv_cache: KVCache | None = None,
        *,
        last_token_only: bool = False,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits [B, T, V] float32, or (logits, new_cache) when `kv_cache` is given."""
        if kv_cache is None:
            hidden_BxTxD = self.hidden_states(input_ids, positions, attention_mask)
            new_cache = None
        else:
            hidden_BxTxD, new_cache = self.hidden_states_with_cache(
                input_ids, kv_cache, positions, attention_mask
            )
        if last_token_only:
            hidden_BxTxD = hidden_BxTxD[:, -1:]
        logits_BxTxV = self.unembed(hidden_BxTxD)
        return logits_BxTxV if kv_cache is None else (logits_BxTxV, new_cache)

    def init_kv_cache(
        self, batch_size: int, max_len: int, dtype: str | jnp.dtype | None = None
    ) -> KVCache:
        """`init_kv_cache(self.config, batch_size, max_len, dtype)`."""
        return init_kv_cache(self.config, batch_size, max_len, dtype)

    # -- validation -------------------------------------------------------------------------

    def _check_inputs(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None,
        attention_mask: jax.Array | None,
    ) -> jax.Array:
        """Validates shapes/dtypes at trace time; returns the bool mask (default all True)."""
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"input_ids must be an integer [B, T] array, got {input_ids.dtype}{list(input_ids.shape)}"
            )
        if positions is not None and (
            positions.shape != input_ids.shape or not jnp.issubdtype(positions.dtype, jnp.integer)
        ):
            raise ValueError(
                f"positions must be an integer array of shape {input_ids.shape}, "
                f"got {positions.dtype}{list(positions.shape)}"
            )
        if attention_mask is None:
            return jnp.ones(input_ids.shape, jnp.bool_)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have shape {input_ids.shape}, got {attention_mask.shape}"
            )
        return attention_mask.astype(jnp.bool_)
