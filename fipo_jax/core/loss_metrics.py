"""Masked statistics for loss monitoring, jit-safe and NaN-free on empty masks.

The official code gathers `x[mask]` (a data-dependent shape) and calls `torch.quantile`;
here masked-out values are pushed to the end of a sort instead, so every shape is static.
An empty selection yields 0, as the official code's fallback does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Σ x·m / Σ m, and 0 when the mask is empty (verl: `masked_mean`)."""
    return masked_sum(x, mask) / jnp.maximum(jnp.sum(mask), 1)


def masked_fraction(condition: jax.Array, mask: jax.Array) -> jax.Array:
    """Share of masked tokens where `condition` holds."""
    return masked_mean(condition.astype(jnp.float32), mask)


def masked_min(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(jnp.any(mask), jnp.min(jnp.where(mask, x, jnp.inf)), 0.0)


def masked_max(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(jnp.any(mask), jnp.max(jnp.where(mask, x, -jnp.inf)), 0.0)


def _sortable_int32(x: jax.Array) -> jax.Array:
    """Order-preserving float32 → int32 map (negative floats get their magnitude bits
    flipped). XLA:CPU sorts int32 several times faster than float32 (no NaN-aware
    comparator), and the map is exactly invertible."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _from_sortable_int32(key: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(key ^ ((key >> 31) & 0x7FFFFFFF), jnp.float32)


def grouped_quantiles(
    values: jax.Array, group: jax.Array, n_groups: int, quantiles: tuple[float, ...]
) -> jax.Array:
    """Quantiles of `values` within each group (static shapes, one int sort per group).

    `group` holds ints; members of group g are those equal to g (other values belong to
    no group). Linear interpolation between order statistics (`torch.quantile` default):
    v[⌊p⌋] + (p − ⌊p⌋)(v[⌈p⌉] − v[⌊p⌋]) with p = q·(n − 1).

    Returns:
      ``[n_groups, len(quantiles)]`` float32; 0 for an empty group.
    """
    keys_N = _sortable_int32(values.reshape(-1))
    group_N = group.reshape(-1)
    q_Q = jnp.asarray(quantiles, jnp.float32)
    rows = []
    for g in range(n_groups):
        member = group_N == g
        count = jnp.sum(member)
        # Non-members sort last (int32 max), so members occupy [0, count).
        sorted_N = _from_sortable_int32(jnp.sort(jnp.where(member, keys_N, jnp.iinfo(jnp.int32).max)))
        last = jnp.maximum(count - 1, 0)
        pos_Q = q_Q * last.astype(jnp.float32)
        lo_Q = jnp.floor(pos_Q)
        hi_Q = jnp.minimum(lo_Q + 1, last)
        v_lo, v_hi = sorted_N[lo_Q.astype(jnp.int32)], sorted_N[hi_Q.astype(jnp.int32)]
        rows.append(jnp.where(count > 0, v_lo + (pos_Q - lo_Q) * (v_hi - v_lo), 0.0))
    return jnp.stack(rows)


# (name, quantile) of the importance ratio on negative / positive-advantage tokens,
# as logged by the official release (`pos_is_min`/`neg_is_min` are min, `*_max` max).
_NEG_QUANTILES = (("neg_is_min", 0.0), ("neg_is_p75", 0.75), ("neg_is_p995", 0.995),
                  ("neg_is_p999", 0.999), ("neg_is_max", 1.0))
_POS_QUANTILES = (("pos_is_min", 0.0), ("pos_is_p25", 0.25), ("pos_is_median", 0.5),
                  ("pos_is_p75", 0.75), ("pos_is_p995", 0.995), ("pos_is_p999", 0.999),
                  ("pos_is_max", 1.0))


def ratio_fractions(ratio: jax.Array, advantages: jax.Array, mask: jax.Array, clip_ratio_c: float
                    ) -> dict[str, jax.Array]:
    """Importance-ratio bins of the official release (shares of response tokens).

    * ``neg_ratio_2_3``, ``neg_ratio_3_4``, ``neg_ratio_4_10``: A < 0 and r in [2, 3), [3, 4), [4, c).
    * ``pos_mini_frac``: A > 0 and r < 1e-3.
    """
    negative = (advantages < 0) & mask
    return {
        "neg_ratio_2_3": masked_fraction((ratio >= 2.0) & (ratio < 3.0) & negative, mask),
        "neg_ratio_3_4": masked_fraction((ratio >= 3.0) & (ratio < 4.0) & negative, mask),
        "neg_ratio_4_10": masked_fraction((ratio >= 4.0) & (ratio < clip_ratio_c) & negative, mask),
        "pos_mini_frac": masked_fraction((ratio < 1e-3) & (advantages > 0) & mask, mask),
    }


def ratio_quantiles(ratio: jax.Array, advantages: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """min / p75 / p99.5 / p99.9 / max of r over A < 0 tokens and min / p25 / median / p75 /
    p99.5 / p99.9 / max over A > 0 tokens (official names; two integer sorts of every token).

    The trainer calls this once per step on the stop-gradient ratios of all its micro-batches,
    outside the differentiated function."""
    qs = tuple(q for _, q in _NEG_QUANTILES) + tuple(q for _, q in _POS_QUANTILES)
    group = jnp.where((advantages < 0) & mask, 0, jnp.where((advantages > 0) & mask, 1, 2))
    table = grouped_quantiles(ratio, group, 2, qs)
    stats = {name: table[0, i] for i, (name, _) in enumerate(_NEG_QUANTILES)}
    stats.update({name: table[1, len(_NEG_QUANTILES) + i] for i, (name, _) in enumerate(_POS_QUANTILES)})
    return stats


def ratio_statistics(
    ratio: jax.Array, advantages: jax.Array, mask: jax.Array, clip_ratio_c: float, quantiles: bool = True
) -> dict[str, jax.Array]:
    """`ratio_fractions`, and with ``quantiles`` also `ratio_quantiles` (masked over response tokens)."""
    stats = ratio_fractions(ratio, advantages, mask, clip_ratio_c)
    if quantiles:
        stats.update(ratio_quantiles(ratio, advantages, mask))
    return stats
