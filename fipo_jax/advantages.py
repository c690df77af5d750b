"""Outcome advantages over groups of responses to one prompt, and the dynamic-sampling mask.

Responses are laid out in contiguous groups: rows [g·G, (g+1)·G) answer prompt g.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from fipo_jax import _checks


def _grouped(name: str, scores: jax.Array, group_size: int) -> jax.Array:
    """``[B]`` → ``[B/G, G]`` with checks that name the problem."""
    _checks.check_int("group_size", group_size, minimum=1)
    _checks.check_rank(name, scores, rank=1, what=" ([B] one score per response)")
    batch = jnp.shape(scores)[0]
    if batch % group_size:
        raise ValueError(f"{name} has {batch} rows, not a multiple of group_size={group_size} (groups must be contiguous and complete)")
    return jnp.reshape(scores, (batch // group_size, group_size))


def grpo_advantages(
    scores: jax.Array, group_size: int, epsilon: float = 1e-6, normalize_by_std: bool = True
) -> jax.Array:
    """GRPO outcome advantage (verl `compute_grpo_outcome_advantage`).

        A_i = (s_i − mean_g s) / (std_g s + ε)    with the unbiased std (divides by G − 1)
        A_i =  s_i − mean_g s                     if not normalize_by_std (Dr. GRPO)

    A group of one response gets mean 0 and std 1, as in the official code.

    Args:
      scores: ``[B]`` scalar score of each response (e.g. +1 correct / −1 wrong, plus
        overlong shaping); B must be a multiple of ``group_size``.
      group_size: G, responses per prompt.
      epsilon: added to the std.
      normalize_by_std: False gives the Dr. GRPO advantage.

    Returns:
      ``[B]`` float32 advantages; broadcast them over each response's tokens.

    Examples:
      >>> grpo_advantages(jnp.array([1.0, 0.0, 0.0, 1.0]), group_size=2).round(3).tolist()
      [0.707, -0.707, -0.707, 0.707]
    """
    _checks.require(_checks.is_real(epsilon) and epsilon >= 0, f"epsilon must be a number >= 0, got {epsilon!r}")
    s_GxN = _grouped("scores", jnp.asarray(scores, jnp.float32), group_size)
    if group_size == 1:
        mean, std = jnp.zeros_like(s_GxN), jnp.ones_like(s_GxN)
    else:
        mean = jnp.mean(s_GxN, axis=-1, keepdims=True)
        std = jnp.std(s_GxN, axis=-1, keepdims=True, ddof=1)
    advantages = (s_GxN - mean) / (std + epsilon) if normalize_by_std else s_GxN - mean
    return advantages.reshape(-1)


def dr_grpo_advantages(scores: jax.Array, group_size: int) -> jax.Array:
    """Dr. GRPO (Liu et al. 2025): A_i = s_i − mean_g s, no std normalisation."""
    return grpo_advantages(scores, group_size, normalize_by_std=False)


def rloo_advantages(scores: jax.Array, group_size: int) -> jax.Array:
    """RLOO leave-one-out baseline: A_i = s_i − mean_{j≠i} s_j = G/(G−1) · (s_i − mean_g s).

    A group of one response keeps its score (baseline 0), as in verl.
    """
    s_GxN = _grouped("scores", jnp.asarray(scores, jnp.float32), group_size)
    if group_size == 1:
        return s_GxN.reshape(-1)
    total = jnp.sum(s_GxN, axis=-1, keepdims=True)
    return (s_GxN - (total - s_GxN) / (group_size - 1)).reshape(-1)


# The group-advantage estimators by name, declared once: a run config's ``algo.advantage`` and
# `rl_step.UpdateConfig.advantage` are keys of this table.
ADVANTAGE_ESTIMATORS: Mapping[str, Callable[[jax.Array, int], jax.Array]] = types.MappingProxyType({
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
})


def dynamic_sampling_mask(outcomes: jax.Array, group_size: int) -> jax.Array:
    """DAPO dynamic sampling: keep a group iff its binary outcomes are not all equal.

    Filter on the binary correctness (the official `acc` metric), never on the shaped
    score: overlong shaping would otherwise keep all-correct groups.

    Args:
      outcomes: ``[B]`` bool (or 0/1) correctness of each response.
      group_size: G.

    Returns:
      ``[B/G]`` bool, True for the groups to keep (0 < #correct < G).
    """
    o_GxN = _grouped("outcomes", jnp.asarray(outcomes) != 0, group_size)
    return jnp.any(o_GxN, axis=-1) & ~jnp.all(o_GxN, axis=-1)


def broadcast_to_tokens(advantages: jax.Array, mask: jax.Array) -> jax.Array:
    """``[B]`` advantages → ``[B, T]``, zero where ``mask`` is 0 (as the official code stores them)."""
    _checks.check_rank("advantages", advantages, rank=1, what=" ([B])")
    _checks.check_rank("mask", mask, rank=2, what=" ([B, T])")
    if jnp.shape(mask)[0] != jnp.shape(advantages)[0]:
        raise ValueError(f"mask has {jnp.shape(mask)[0]} rows but advantages has {jnp.shape(advantages)[0]}")
    return jnp.where(jnp.asarray(mask) != 0, jnp.asarray(advantages, jnp.float32)[:, None], 0.0)
