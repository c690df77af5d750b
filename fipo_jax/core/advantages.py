"""Outcome advantages over groups of responses to one prompt, and the dynamic-sampling mask.

Responses are laid out in contiguous groups: rows [g·G, (g+1)·G) answer prompt g.

Values are checked where they can be seen: concrete arrays (numpy, or jax outside ``jit``) holding
a non-finite score, or outcomes that are not correctness, are refused in one line. Under ``jit``
the values are tracers and nothing is checked (the functions stay pure and cheap): a non-finite
score then gives NaN advantages for its whole group, and the update step skips a step whose
gradient is not finite (`train.update`, ``skipped_updates``).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fipo_jax.core import _checks


def _grouped(name: str, scores: jax.Array, group_size: int) -> jax.Array:
    """``[B]`` → ``[B/G, G]`` with checks that name the problem."""
    _checks.check_int("group_size", group_size, minimum=1)
    _checks.check_rank(name, scores, rank=1, what=" ([B] one score per response)")
    batch = jnp.shape(scores)[0]
    if batch % group_size:
        raise ValueError(f"{name} has {batch} rows, not a multiple of group_size={group_size} "
                         "(groups must be contiguous and complete)")
    return jnp.reshape(scores, (batch // group_size, group_size))


def _concrete(values) -> np.ndarray | None:
    """The values of a host or untraced jax array; None under ``jit`` (a tracer) or for an array
    spread over other hosts' devices (its values are not all here)."""
    if isinstance(values, jax.core.Tracer) or (isinstance(values, jax.Array) and not values.is_fully_addressable):
        return None
    return np.asarray(values)


def _check_finite_scores(scores) -> None:
    """Refuse concrete scores holding NaN or ±inf: one would turn its whole group's advantages into NaN."""
    values = _concrete(scores)
    if values is not None and jnp.issubdtype(values.dtype, jnp.inexact) and not np.all(np.isfinite(values)):
        bad = np.flatnonzero(~np.isfinite(values.reshape(-1)))
        raise ValueError(f"scores must be finite, got {values.reshape(-1)[bad[0]]} at row {bad[0]} ({bad.size} "
                         f"non-finite in all): it would make its group's advantages NaN; fix the reward")


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

    Raises ValueError for concrete scores holding NaN or ±inf (under ``jit``: see the module docstring).

    Returns:
      ``[B]`` float32 advantages; broadcast them over each response's tokens.

    Examples:
      >>> grpo_advantages(jnp.array([1.0, 0.0, 0.0, 1.0]), group_size=2).round(3).tolist()
      [0.707, -0.707, -0.707, 0.707]
    """
    _checks.require(_checks.is_real(epsilon) and epsilon >= 0, f"epsilon must be a number >= 0, got {epsilon!r}")
    _check_finite_scores(scores)
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

    A group of one response keeps its score (baseline 0), as in verl. Non-finite concrete scores are
    refused, as in `grpo_advantages`.
    """
    _check_finite_scores(scores)
    s_GxN = _grouped("scores", jnp.asarray(scores, jnp.float32), group_size)
    if group_size == 1:
        return s_GxN.reshape(-1)
    total = jnp.sum(s_GxN, axis=-1, keepdims=True)
    return (s_GxN - (total - s_GxN) / (group_size - 1)).reshape(-1)


# The group-advantage estimators by name, declared once: a run config's ``algo.advantage`` and
# `train.update.UpdateConfig.advantage` are keys of this table.
ADVANTAGE_ESTIMATORS: Mapping[str, Callable[[jax.Array, int], jax.Array]] = types.MappingProxyType({
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
})


def dynamic_sampling_mask(outcomes: jax.typing.ArrayLike, group_size: int) -> jax.Array:
    """DAPO dynamic sampling: keep a group iff its binary outcomes are not all equal.

    Filter on the binary correctness (the official `acc` metric), never on the shaped
    score: overlong shaping would otherwise keep all-correct groups.

    Args:
      outcomes: ``[B]`` correctness of each response: bool, 0/1, or the reward's ±1 score
        (correct iff > 0, as `rewards.score_batch` reads a custom score). Concrete outcomes
        holding anything else (a shaped score such as −1.5 or 0.5, NaN) are refused in one line;
        under ``jit`` they are read as correct iff > 0.
      group_size: G.

    Returns:
      ``[B/G]`` bool, True for the groups to keep (0 < #correct < G).

    >>> dynamic_sampling_mask(jnp.array([1., -1., -1., -1.]), group_size=2).tolist()
    [True, False]
    """
    _check_outcomes(outcomes)
    o_GxN = _grouped("outcomes", jnp.asarray(outcomes) > 0, group_size)
    return jnp.any(o_GxN, axis=-1) & ~jnp.all(o_GxN, axis=-1)


def _check_outcomes(outcomes) -> None:
    """Concrete outcomes are correctness: bool, or numbers in {−1, 0, 1} (0/1 or the ±1 reward)."""
    values = _concrete(outcomes)
    if values is None or values.dtype == np.bool_:
        return
    flat = values.reshape(-1)
    bad = np.flatnonzero(~np.isin(flat, (-1, 0, 1)))
    if bad.size:
        raise ValueError(f"outcomes must be correctness (bool, 0/1 or the reward's ±1), got {flat[bad[0]]} at row "
                         f"{bad[0]}: pass BatchRewards.correct, not shaped scores")


def broadcast_to_tokens(advantages: jax.Array, mask: jax.Array) -> jax.Array:
    """``[B]`` advantages → ``[B, T]``, zero where ``mask`` is 0 (as the official code stores them)."""
    _checks.check_rank("advantages", advantages, rank=1, what=" ([B])")
    _checks.check_rank("mask", mask, rank=2, what=" ([B, T])")
    if jnp.shape(mask)[0] != jnp.shape(advantages)[0]:
        raise ValueError(f"mask has {jnp.shape(mask)[0]} rows but advantages has {jnp.shape(advantages)[0]}")
    return jnp.where(jnp.asarray(mask) != 0, jnp.asarray(advantages, jnp.float32)[:, None], 0.0)
