"""Grouped-query attention: full, query-chunked, sliding-window and KV-cache decode forms.

All forms compute, for query t of row b and key slot s,

    allowed[b, t, s] = s ≤ slot(t)  ∧  valid[b, s]  ∧  (W is None  ∨  pos[b, s] > pos[b, t] − W)
                       ∧  (no segments  ∨  seg[b, s] = seg[b, t])
    out[b, t] = Σ_s softmax_s(scale · q_bt · k_bs  over allowed s) · v_bs

with query head h reading kv head h // G (G = H / N, HF's `repeat_kv` grouping). Causality is
over slots (a full forward has query t at slot t; a cached forward writes its T queries at slots
index … index + T − 1); the sliding window W is over RoPE *positions*, so a padded row computes
exactly what it computes alone (HF's window is over slots, the same thing without padding).
Scores and softmax are float32; masks are built per query chunk from [B, S] arrays, never as a
[B, T, S] tensor for the whole sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Finite "minus infinity": a query whose keys are all masked (a pad position) gets a uniform,
# finite distribution instead of NaN, so pad rows never poison gradients.
MASKED_SCORE = float(jnp.finfo(jnp.float32).min)


class AttentionMask(NamedTuple):
    """Which key slots each query may attend to, without a [B, T, S] tensor (see module doc).

    Attributes:
      query_slots_T: int32 [T], the cache slot of each query.
      key_valid_BxS: bool [B, S], the slot holds a real token of the row.
      query_positions_BxT: int32 [B, T], RoPE positions of the queries.
      key_positions_BxS: int32 [B, S], RoPE positions of the keys.
      query_segments_BxT / key_segments_BxS: optional int [B, T] / [B, S] ids of packed
        sequences: a query sees only keys of its own segment (None: one sequence per row).
    """

    query_slots_T: jax.Array
    key_valid_BxS: jax.Array
    query_positions_BxT: jax.Array
    key_positions_BxS: jax.Array
    query_segments_BxT: jax.Array | None = None
    key_segments_BxS: jax.Array | None = None

    def allowed(self, window: int | jax.Array | None = None) -> jax.Array:
        """bool [B, T, S]."""
        key_slots_S = jnp.arange(self.key_valid_BxS.shape[1], dtype=jnp.int32)
        causal_TxS = key_slots_S[None, :] <= self.query_slots_T[:, None]
        allowed_BxTxS = causal_TxS[None] & self.key_valid_BxS[:, None, :]
        if self.key_segments_BxS is not None:
            assert self.query_segments_BxT is not None, "query and key segments come together"
            allowed_BxTxS = allowed_BxTxS & (self.key_segments_BxS[:, None, :] == self.query_segments_BxT[:, :, None])
        if window is None:
            return allowed_BxTxS
        in_window_BxTxS = self.key_positions_BxS[:, None, :] > self.query_positions_BxT[:, :, None] - window
        return allowed_BxTxS & in_window_BxTxS

    def query_chunk(self, slots_c: jax.Array, positions_Bxc: jax.Array,
                    segments_Bxc: jax.Array | None = None) -> AttentionMask:
        """The same keys seen from another set of queries."""
        return self._replace(query_slots_T=slots_c, query_positions_BxT=positions_Bxc, query_segments_BxT=segments_Bxc)


def grouped_query_attention(
    q_BxTxHxK: jax.Array,
    k_BxNxSxK: jax.Array,
    v_BxNxSxK: jax.Array,
    mask: AttentionMask,
    scale: float,
    window: int | jax.Array | None = None,
    query_chunk_size: int | None = None,
) -> jax.Array:
    """softmax(scale · q kᵀ masked by `mask.allowed(window)`) v, optionally over query chunks.

    Each query row's softmax involves only its own scores, so splitting the T queries into
    chunks of `query_chunk_size` (a `lax.map`, each chunk rematerialised in the backward pass)
    gives the same result with O(chunk × S) score memory per layer instead of O(T × S) — what
    makes 20k-token training sequences fit. The last chunk is padded with queries that may
    attend to nothing; their outputs are dropped.
    """
    q_len = q_BxTxHxK.shape[1]
    if query_chunk_size is None or q_len <= query_chunk_size:
        return _attention(q_BxTxHxK, k_BxNxSxK, v_BxNxSxK, mask.allowed(window), scale)
    batch, _, num_heads, head_dim = q_BxTxHxK.shape
    num_chunks = -(-q_len // query_chunk_size)
    pad = num_chunks * query_chunk_size - q_len

    def chunked(x_BxT, fill):
        padded = jnp.pad(x_BxT, ((0, 0), (0, pad)) + ((0, 0),) * (x_BxT.ndim - 2), constant_values=fill)
        return jnp.moveaxis(padded.reshape(batch, num_chunks, query_chunk_size, *x_BxT.shape[2:]), 1, 0)

    q_CxBxcxHxK = chunked(q_BxTxHxK, 0)
    positions_CxBxc = chunked(mask.query_positions_BxT, 0)
    slots_Cxc = jnp.pad(mask.query_slots_T, (0, pad), constant_values=-1).reshape(num_chunks, query_chunk_size)
    segments_CxBxc = None if mask.query_segments_BxT is None else chunked(mask.query_segments_BxT, -1)

    def attend_chunk(chunk):
        q_BxcxHxK, slots_c, positions_Bxc, segments_Bxc = chunk
        allowed_BxcxS = mask.query_chunk(slots_c, positions_Bxc, segments_Bxc).allowed(window)
        return _attention(q_BxcxHxK, k_BxNxSxK, v_BxNxSxK, allowed_BxcxS, scale)

    out_CxBxcxHxK = lax.map(jax.checkpoint(attend_chunk, prevent_cse=False),
                            (q_CxBxcxHxK, slots_Cxc, positions_CxBxc, segments_CxBxc))
    out_BxTpxHxK = jnp.moveaxis(out_CxBxcxHxK, 0, 1).reshape(batch, -1, num_heads, head_dim)
    return out_BxTpxHxK[:, :q_len]


def decode_attention(
    q_BxHxK: jax.Array,
    k_cache_BxNxSxK: jax.Array,
    v_cache_BxNxSxK: jax.Array,
    mask: AttentionMask,
    scale: float,
    block_size: int,
    window: int | jax.Array | None = None,
    layer: jax.Array | None = None,
) -> jax.Array:
    """One query per row against the cache, reading only the blocks of slots that hold visible keys.

    The caches are one layer's [B, N, S, K], or every layer's [B, L, N, S, K] with ``layer`` naming
    the one to read (the layer scan's stacked cache: each block is sliced out of it, no copy of
    the layer).

    A decode step's query sits at slot i = mask.query_slots_T[0] and sees only slots ≤ i (and,
    in a sliding layer, only keys inside the window), so blocks b = b₀ … ⌈(i + 1) / block⌉ − 1
    are visited in a `fori_loop` with traced bounds — b₀ is the block of the first slot that
    some row can see (0 without a window) — and combined by the online softmax

        m' = max(m, max_s z_s),  l' = l·e^(m − m') + Σ_s e^(z_s − m'),
        a' = a·e^(m − m') + Σ_s e^(z_s − m') v_s,      out = a / l,

    so a step costs O(tokens visible) instead of O(cache size): with a window W a sliding layer
    reads about W slots at any length. Equal to the dense softmax up to float rounding. Not
    differentiable (decode only). When S is not a multiple of the block, the last block is read
    from S − block and its slots that an earlier block already covered are masked out.
    """
    batch, num_heads, head_dim = q_BxHxK.shape
    num_kv_heads, max_len = k_cache_BxNxSxK.shape[-3], k_cache_BxNxSxK.shape[-2]
    block = min(block_size, max_len)

    def read_block(cache, start):  # [B, N, block, K] at slots [start, start + block) of the layer
        if layer is None:
            return lax.dynamic_slice_in_dim(cache, start, block, axis=2)
        return lax.dynamic_slice(cache, (0, layer, 0, start, 0), (batch, 1, num_kv_heads, block, head_dim))[:, 0]

    groups = num_heads // num_kv_heads
    q_BxNxGxK = q_BxHxK.reshape(batch, num_kv_heads, groups, head_dim)
    query_slot = mask.query_slots_T[0]
    query_position_Bx1 = mask.query_positions_BxT[:, :1]

    def visit(b, carry):
        start = jnp.minimum(b * block, max_len - block)
        slots_L = start + jnp.arange(block, dtype=jnp.int32)
        # As in `_attention`: inputs in the query's dtype, scores and accumulation in float32.
        k_BxNxLxK = read_block(k_cache_BxNxSxK, start).astype(q_BxHxK.dtype)
        v_BxNxLxK = read_block(v_cache_BxNxSxK, start).astype(q_BxHxK.dtype)
        allowed_BxL = lax.dynamic_slice_in_dim(mask.key_valid_BxS, start, block, axis=1)
        allowed_BxL = allowed_BxL & ((slots_L >= b * block) & (slots_L <= query_slot))[None]
        if window is not None:
            positions_BxL = lax.dynamic_slice_in_dim(mask.key_positions_BxS, start, block, axis=1)
            allowed_BxL = allowed_BxL & (positions_BxL > query_position_Bx1 - window)
        z_BxNxGxL = jnp.einsum(
            "bngk,bnlk->bngl", q_BxNxGxK, k_BxNxLxK, preferred_element_type=jnp.float32
        ) * scale
        return _online_softmax_step(carry, jnp.where(allowed_BxL[:, None, None], z_BxNxGxL, MASKED_SCORE), v_BxNxLxK)

    init = (
        jnp.full((batch, num_kv_heads, groups), MASKED_SCORE, jnp.float32),
        jnp.zeros((batch, num_kv_heads, groups), jnp.float32),
        jnp.zeros((batch, num_kv_heads, groups, head_dim), jnp.float32),
    )
    first_block = _first_visible_block(mask, query_slot, query_position_Bx1, window, max_len) // block
    _, l_BxNxG, acc_BxNxGxK = lax.fori_loop(first_block, query_slot // block + 1, visit, init)
    out_BxNxGxK = acc_BxNxGxK / l_BxNxG[..., None]
    return out_BxNxGxK.reshape(batch, num_heads, head_dim).astype(q_BxHxK.dtype)


def _first_visible_block(mask: AttentionMask, query_slot, query_position_Bx1, window: int | jax.Array | None,
                         max_len: int):
    """The first slot some row's query can see: 0 without a window, else the first valid slot
    ≤ the query's whose key position lies inside the window."""
    if window is None:
        return jnp.zeros((), jnp.int32)
    slots_S = jnp.arange(max_len, dtype=jnp.int32)
    visible_BxS = (mask.key_valid_BxS & (slots_S <= query_slot)[None]
                   & (mask.key_positions_BxS > query_position_Bx1 - window))
    visible_S = jnp.any(visible_BxS, axis=0)
    return jnp.where(jnp.any(visible_S), jnp.argmax(visible_S), 0).astype(jnp.int32)


def _online_softmax_step(carry, z_BxNxGxL: jax.Array, v_BxNxLxK: jax.Array):
    """(m, l, a) after one block of scores z and values v:

        m' = max(m, max_s z_s),  l' = l·e^(m − m') + Σ_s e^(z_s − m'),  a' = a·e^(m − m') + Σ_s e^(z_s − m') v_s
    """
    m_BxNxG, l_BxNxG, acc_BxNxGxK = carry
    m_new = jnp.maximum(m_BxNxG, jnp.max(z_BxNxGxL, axis=-1))
    p_BxNxGxL = jnp.exp(z_BxNxGxL - m_new[..., None])
    rescale = jnp.exp(m_BxNxG - m_new)
    l_new = l_BxNxG * rescale + jnp.sum(p_BxNxGxL, axis=-1)
    acc_new = acc_BxNxGxK * rescale[..., None] + jnp.einsum(
        "bngl,bnlk->bngk", p_BxNxGxL.astype(v_BxNxLxK.dtype), v_BxNxLxK, preferred_element_type=jnp.float32
    )
    return m_new, l_new, acc_new


def _attention(
    q_BxTxHxK: jax.Array,
    k_BxNxSxK: jax.Array,
    v_BxNxSxK: jax.Array,
    allowed_BxTxS: jax.Array,
    scale: float,
) -> jax.Array:
    """softmax(scale · q kᵀ masked by `allowed`) v with H query heads sharing N kv heads.

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
    ) * scale
    scores_BxNxGxTxS = scores_BxNxGTxS.reshape(batch, num_kv_heads, groups, q_len, -1)
    scores_BxNxGxTxS = jnp.where(allowed_BxTxS[:, None, None], scores_BxNxGxTxS, MASKED_SCORE)
    probs_BxNxGTxS = (
        jax.nn.softmax(scores_BxNxGxTxS, axis=-1)
        .astype(v_BxNxSxK.dtype)
        .reshape(batch, num_kv_heads, groups * q_len, -1)
    )
    out_BxNxGTxK = jnp.einsum("bnqs,bnsk->bnqk", probs_BxNxGTxS, v_BxNxSxK)
    out_BxTxNxGxK = out_BxNxGTxK.reshape(batch, num_kv_heads, groups, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out_BxTxNxGxK.reshape(batch, q_len, num_heads, head_dim)
