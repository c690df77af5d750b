"""The preallocated, static-shape key/value cache of the sampler (a pytree; jit- and donation-friendly)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fipo_jax.models.config import ModelConfig

# Logical axes of the cache's keys / values [B, L, N, S_max, K]: `fipo_jax.parallel.sharding.DEFAULT_RULES` places
# rows over "data", kv heads over "tensor" (replicated when the tensor axis does not divide them)
# and layers / slots / head_dim replicated, e.g. `logical_sharding(KV_CACHE_AXES, keys.shape, mesh)`.
KV_CACHE_AXES = ("batch", "layers", "kv_heads", "length", "head_dim")


class KVCache(NamedTuple):
    """Keys and values of every layer for S_max slots.

    Slots are shared by all rows: a call with T new tokens writes slots [index, index + T) of
    every row. Rows differ only through `valid_BxS` (pad / finished-row slots are False and never
    attended to), `positions_BxS` and `next_position_B`. Sliding-window layers keep every slot
    too and mask by position (`attention.decode_attention` reads only the window's blocks).

    Attributes:
      keys: [B, L, N, S_max, K] rotated keys of every layer (head-major: attention is a batched
        GEMM); the layer scan writes and reads layer ℓ in place.
      values: [B, L, N, S_max, K] values.
      valid_BxS: bool [B, S_max], slot holds a real token of that row.
      positions_BxS: int32 [B, S_max], RoPE position of the token in each slot.
      next_position_B: int32 [B], RoPE position the row's next real token receives.
      index: int32 scalar, next slot to write (same for all rows); or int32 [B], each row's own next
        slot (the engine's decode slots: a call then feeds one token per row, and every slot after a
        row's index must be invalid in that row, which writing in order and `engine.insert` keep).
    """

    keys: jax.Array
    values: jax.Array
    valid_BxS: jax.Array
    positions_BxS: jax.Array
    next_position_B: jax.Array
    index: jax.Array  # type: ignore[assignment]  # a field may shadow tuple.index; the checker refuses it

    @property
    def max_len(self) -> int:
        """S_max, the number of slots."""
        return self.valid_BxS.shape[1]


# Fields whose kv-head axis (third from last) `fipo_jax.parallel.sharding.row_shardings` splits like
# logical "kv_heads"; every other field is split by rows only. Set after the class: the type checker
# takes any name in a NamedTuple body for a field.
KVCache.KV_HEAD_FIELDS = ("keys", "values")  # type: ignore[attr-defined]  # a class constant, not a field


class LayerCache(NamedTuple):
    """Layer ℓ's view of the cache inside the layer scan: the stacked arrays and ℓ (read and
    written in place, so no step copies another layer's keys)."""

    keys: jax.Array  # [B, L, N, S_max, K]
    values: jax.Array
    layer: jax.Array  # int32 scalar

    def write(self, k_BxNxTxK: jax.Array, v_BxNxTxK: jax.Array, index: jax.Array) -> LayerCache:
        """The cache with layer ℓ's T new keys / values at slots [index, index + T) (`write_slots`)."""
        return self._replace(keys=write_slots(self.keys, k_BxNxTxK, index, self.layer),
                             values=write_slots(self.values, v_BxNxTxK, index, self.layer))


def write_slots(cache_BxLxNxSxK: jax.Array, new_BxNxTxK: jax.Array, index: jax.Array, layer: jax.Array) -> jax.Array:
    """Layer `layer` of a stacked key or value cache with `new` written at slots [index, index + T).

    A scalar index is one `dynamic_update_slice` for every row; an index [B] (T = 1) writes row b's
    token at its own slot index[b], all rows as one scatter (the engine's slots)."""
    new_BxNxTxK = new_BxNxTxK.astype(cache_BxLxNxSxK.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache_BxLxNxSxK, new_BxNxTxK[:, None], (0, layer, 0, index, 0))
    rows_B = jnp.arange(index.shape[0], dtype=jnp.int32)
    return cache_BxLxNxSxK.at[rows_B, layer, :, index, :].set(
        new_BxNxTxK[:, :, 0], indices_are_sorted=True, unique_indices=True, mode="promise_in_bounds")


def write_row_slots(array_BxS: jax.Array, new_BxT: jax.Array, index: jax.Array) -> jax.Array:
    """`array_BxS` (valid flags, positions) with `new` at slots [index, index + T): one slot range
    for every row (scalar index), or row b's single value at slot index[b] (index [B], T = 1)."""
    new_BxT = new_BxT.astype(array_BxS.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(array_BxS, new_BxT, (0, index))
    rows_B = jnp.arange(index.shape[0], dtype=jnp.int32)
    return array_BxS.at[rows_B, index].set(new_BxT[:, 0], indices_are_sorted=True, unique_indices=True,
                                           mode="promise_in_bounds")


def query_slots(index: jax.Array, seq_len: int) -> jax.Array:
    """int32 [T]: the slots of a call's T queries, as attention sees them. With per-row indices [B]
    (T = 1) the last row's slot: every row's own query slot is ≤ it, and the slots in between are
    invalid in that row, so each row sees exactly the keys it would see at its own slot."""
    start = index if jnp.ndim(index) == 0 else jnp.max(index)
    return (start + jnp.arange(seq_len, dtype=jnp.int32)).astype(jnp.int32)


def init_kv_cache(
    config: ModelConfig, batch_size: int, max_len: int, dtype: str | jnp.dtype | None = None
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
    shape = (batch_size, config.num_hidden_layers, config.num_key_value_heads, max_len, config.head_dim)
    return KVCache(
        keys=jnp.zeros(shape, cache_dtype),
        values=jnp.zeros(shape, cache_dtype),
        valid_BxS=jnp.zeros((batch_size, max_len), jnp.bool_),
        positions_BxS=jnp.zeros((batch_size, max_len), jnp.int32),
        next_position_B=jnp.zeros((batch_size,), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )
