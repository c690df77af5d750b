"""Packed sequences: several sequences share a row, told apart by integer segment ids.

A new segment starts wherever the id changes along the time axis (last axis), so an id may be
reused later in a row; padding is usually a segment of its own. Everything that must not cross
a sequence boundary (attention, RoPE positions, the scored-token rule of log-probs, Future-KL)
reads the ids through these helpers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """bool [..., T]: token t starts a segment (t = 0, or its id differs from token t − 1's)."""
    ids = jnp.asarray(segment_ids)
    return jnp.concatenate([jnp.ones_like(ids[..., :1], jnp.bool_), ids[..., 1:] != ids[..., :-1]], axis=-1)


def check_segment_ids(segment_ids, shape: tuple[int, ...]) -> None:
    """Segment ids are an integer array of `shape` (ValueError naming both otherwise)."""
    ids_shape, dtype = tuple(jnp.shape(segment_ids)), jnp.asarray(segment_ids).dtype
    if ids_shape != tuple(shape) or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"segment_ids must be an integer array of shape {tuple(shape)}, got {dtype}{list(ids_shape)}")


def segment_continues(segment_ids: jax.Array) -> jax.Array:
    """bool [..., T]: token t + 1 is in t's segment (False at the last token)."""
    starts = segment_starts(segment_ids)
    return jnp.concatenate([~starts[..., 1:], jnp.zeros(starts.shape[:-1] + (1,), bool)], axis=-1)


def segment_runs(segment_ids: jax.Array) -> jax.Array:
    """r_t = the number of segment starts after position 0 up to t (int32, r_0 = 0): equal r ⇔
    same segment, even when an id is reused later in the row."""
    return jnp.cumsum(segment_starts(segment_ids), axis=-1, dtype=jnp.int32) - 1


def segment_cumsum(values: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Inclusive int32 cumsum along the last axis that restarts at every segment start (None:
    one segment per row). Values must be non-negative (counts, masks)."""
    sums = jnp.cumsum(values.astype(jnp.int32), axis=-1)
    if segment_ids is None:
        return sums
    # The sum before each segment's first token, carried forward (sums never decrease).
    before = jnp.where(segment_starts(segment_ids), sums - values.astype(jnp.int32), 0)
    return sums - lax.cummax(before, axis=values.ndim - 1)


def segment_sums(values: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sums of ``values`` [B, T] over each segment, and where each token's sum lives.

    Returns ``(sums, index)``: ``sums`` is [B·T] with one entry per (row, segment run) and 0
    for unused entries, ``index`` [B, T] the entry of each token, so ``sums[index]`` broadcasts a
    segment's sum back to its tokens. Works for any dtype and sign (one scatter-add)."""
    batch, length = values.shape
    index = jnp.arange(batch, dtype=jnp.int32)[:, None] * length + segment_runs(segment_ids)
    sums = jax.ops.segment_sum(values.reshape(-1), index.reshape(-1), num_segments=batch * length)
    return sums, index
