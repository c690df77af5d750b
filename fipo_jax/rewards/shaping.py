"""DAPO overlong reward shaping, measured in tokens (verl ``reward_manager/dapo.py``).

    expected = L_max − L_buf
    R_len(|y|) = min( −(|y| − expected) / L_buf · factor , 0 )

So R_len = 0 up to ``L_max − L_buf`` tokens, falls linearly to ``−factor`` at ``L_max`` tokens, and
keeps falling beyond (the official code does not clip; responses are truncated at L_max, so with
factor 1 the penalty lies in [−1, 0] and the shaped score in [−2, 1]). Lengths are counts of valid
response TOKENS (the response mask sum), never characters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fipo_jax.core import _checks

__all__ = ["MAX_OVERLONG_FACTOR", "check_overlong_factor", "overlong_penalty", "shaped_scores",
           "validate_overlong_args"]

MAX_OVERLONG_FACTOR = 2.0**20
"""The largest overlong penalty factor f accepted (about 10^6; the official factor is 1.0).

Responses stop at L_max tokens, so shaped scores lie in [−1 − f, 1] and two scores of one group
differ by at most 2 + f. Two things must hold in float32 for the reward to mean anything:

  1. no overflow: GRPO's unbiased variance sums G squared deviations, at most G·(2 + f)²; for
     groups of up to G = 2^16 responses that stays below float32's largest value 3.4·10^38 iff
     2 + f < sqrt(3.4·10^38 / 2^16) ≈ 7.2·10^16 (f = 10^308 gives −inf rewards, NaN advantages
     and every update skipped);
  2. correctness still visible: near −f float32 values are f·2^−23 apart, so the gap of 2 between
     a correct (1 − f) and a wrong (−1 − f) overlong response survives rounding only for f ≪ 2^24.

f = 2^20 meets both with margin: the gap is 16 float32 steps, overflow is 10^21 times away.
"""


def check_overlong_factor(factor: float, name: str = "penalty_factor", error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming ``name`` unless 0 <= factor <= `MAX_OVERLONG_FACTOR` (see its derivation)."""
    _checks.check_number(name, factor, minimum=0, error=error)
    _checks.require(factor <= MAX_OVERLONG_FACTOR,
                    f"{name}={factor!r} is over {MAX_OVERLONG_FACTOR:.0f} (2^20): shaped rewards in [-1 - factor, 1] "
                    f"then lose the +-1 of correctness to float32 rounding or overflow; use a factor near 1 "
                    f"(official: 1.0)", error=error)


def validate_overlong_args(max_response_length: int, buffer_length: int, penalty_factor: float) -> None:
    """Raise ValueError naming the bad argument unless 0 < buffer_length ≤ max_response_length and
    0 ≤ factor ≤ `MAX_OVERLONG_FACTOR`."""
    _checks.check_int("max_response_length (tokens)", max_response_length, minimum=1)
    _checks.check_int("buffer_length (tokens)", buffer_length, minimum=1)
    _checks.require(
        buffer_length <= max_response_length,
        f"buffer_length ({buffer_length}) must be <= max_response_length ({max_response_length}): "
        "the penalty starts at max_response_length - buffer_length tokens",
    )
    check_overlong_factor(penalty_factor)


def _as_numeric(name: str, values):
    """jax arrays stay jax (jit-safe); anything else becomes a numpy array. Checks the dtype."""
    array = values if isinstance(values, jax.Array) else np.asarray(values)
    dtype = array.dtype
    _checks.require(jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating),
                    f"{name} must be an int or float array of token counts, got dtype {dtype}", error=TypeError)
    if isinstance(array, np.ndarray) and array.size:
        _checks.require(np.min(array) >= 0, f"{name} must be >= 0 (token counts), got min {np.min(array)}")
    return array


def overlong_penalty(response_lengths, max_response_length: int, buffer_length: int, penalty_factor: float = 1.0):
    """Soft overlong punishment per response: ``min(−(len − (L_max − L_buf)) / L_buf · factor, 0)``.

    Args:
      response_lengths: ``[...]`` token counts of the responses (ints or floats; numpy or jax).
      max_response_length: L_max, the generation limit in tokens (official 32B: 20480).
      buffer_length: L_buf, the width of the linear ramp in tokens (official: 4096).
      penalty_factor: the penalty at exactly L_max tokens is ``−penalty_factor`` (official: 1.0).

    Returns:
      float32 penalties with the shape of ``response_lengths``: a jax array for jax input (usable
      under ``jit``), else a numpy array.

    >>> overlong_penalty([100, 16384, 18432, 20480], 20480, 4096).tolist()
    [0.0, 0.0, -0.5, -1.0]
    """
    validate_overlong_args(max_response_length, buffer_length, penalty_factor)
    lengths = _as_numeric("response_lengths", response_lengths)
    xp = jnp if isinstance(lengths, jax.Array) else np
    expected = max_response_length - buffer_length
    exceed = lengths.astype(xp.float32) - xp.float32(expected)
    penalty = -exceed / xp.float32(buffer_length) * xp.float32(penalty_factor)
    return xp.minimum(penalty, xp.float32(0.0)).astype(xp.float32)


def shaped_scores(
    correct,
    response_lengths,
    *,
    max_response_length: int,
    buffer_length: int | None,
    penalty_factor: float = 1.0,
):
    """DAPO shaped reward: ``(+1 if correct else −1) + min(−(len − (L_max − L_buf)) / L_buf · factor, 0)``.

    Args:
      correct: ``[...]`` bool (or 0/1) correctness of each response.
      response_lengths: token counts, same shape as ``correct``.
      max_response_length, buffer_length, penalty_factor: see `overlong_penalty`;
        ``buffer_length=None`` turns the length penalty off (score = ±1).

    Returns:
      float32 scores (jax if either input is a jax array, else numpy).

    >>> shaped_scores([True, False, True], [10, 10, 20480], max_response_length=20480, buffer_length=4096).tolist()
    [1.0, -1.0, 0.0]
    """
    use_jax = isinstance(correct, jax.Array) or isinstance(response_lengths, jax.Array)
    xp = jnp if use_jax else np
    correct_arr = xp.asarray(correct)
    _checks.require(correct_arr.dtype == xp.bool_ or jnp.issubdtype(correct_arr.dtype, jnp.integer),
                    f"correct must be a bool (or 0/1 int) array, got dtype {correct_arr.dtype}", error=TypeError)
    lengths = _as_numeric("response_lengths", xp.asarray(response_lengths))
    _checks.check_same_shape("correct", correct_arr, "response_lengths", lengths)
    base = xp.where(correct_arr.astype(bool), xp.float32(1.0), xp.float32(-1.0))
    if buffer_length is None:
        _checks.check_int("max_response_length (tokens)", max_response_length, minimum=1)
        return base.astype(xp.float32)
    return (base + overlong_penalty(lengths, max_response_length, buffer_length, penalty_factor)).astype(xp.float32)
