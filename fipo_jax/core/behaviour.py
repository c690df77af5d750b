"""The decoupled objective's behaviour weights: rollouts drawn by a policy other than π_old.

Three log-probs per response token: log π_behav (what the sampler drew the token with: stale
weights, another engine's numerics), log π_prox (the trainer's recompute with the weights at the
start of the update — the loss's π_old) and log π_θ. The loss's ratio, clips, dual clip and FIPO's
Future-KL use π_θ / π_prox only, so FIPO measures the update's own drift; the gap between π_prox
and π_behav enters as a truncated importance weight on each token's loss (AReaL's decoupled PPO,
with its cap; IMPALA's truncated ρ):

    token level:     w_t = min(exp(log π_prox_t − log π_behav_t), C)
    sequence level:  w_t = min(exp(Σ_{s ∈ seq(t)} (log π_prox_s − log π_behav_s)), C)

stop-gradient, 1 on padding. Both log-probs are the same tokens' under the same temperature.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import jax
import jax.numpy as jnp

from fipo_jax.core import _checks
from fipo_jax.core.segments import segment_sums

BehaviourWeightLevel = Literal["token", "sequence"]
BEHAVIOUR_WEIGHT_LEVELS: tuple[str, ...] = get_args(BehaviourWeightLevel)
# Which log-probs the loss takes as π_old: the trainer's recompute (π_prox; the sampler's are then
# π_behav) or the sampler's own (verl's bypass mode, slime: Future-KL then also sums staleness and
# engine mismatch — for comparison).
OldLogProbs = Literal["trainer", "sampler"]
OLD_LOG_PROBS: tuple[str, ...] = get_args(OldLogProbs)


def check_behaviour_weight_cap(name: str, cap: float | None) -> None:
    """A cap is None (no weighting) or a finite number ≥ 1 (a weight below 1 would cap on-policy tokens)."""
    number = isinstance(cap, (int, float)) and not isinstance(cap, bool)
    _checks.require(cap is None or (number and math.isfinite(cap) and cap >= 1),
                    f"{name} must be None (no behaviour weights) or a finite number >= 1, got {cap!r}")


def behaviour_weights(prox_log_probs: jax.Array, behaviour_log_probs: jax.Array, mask: jax.Array, cap: float,
                      level: BehaviourWeightLevel = "token", segment_ids: jax.Array | None = None) -> jax.Array:
    """w [B, T], stop-gradient (module docstring): the truncated π_prox / π_behav of each token
    (``level="token"``) or of its whole sequence (``"sequence"``: a row, or a segment of a packed row
    with ``segment_ids``); 1 where ``mask`` is False.

    >>> import jax.numpy as jnp
    >>> w = behaviour_weights(jnp.log(jnp.array([[0.5, 0.9]])), jnp.log(jnp.array([[0.25, 0.9]])),
    ...                       jnp.ones((1, 2), bool), cap=1.5)
    >>> [round(float(x), 3) for x in w[0]]
    [1.5, 1.0]
    """
    _checks.check_choice("level", level, BEHAVIOUR_WEIGHT_LEVELS)
    check_behaviour_weight_cap("cap", cap)
    mask = jnp.asarray(mask) != 0
    gap = jax.lax.stop_gradient(jnp.where(mask, prox_log_probs - behaviour_log_probs, 0.0).astype(jnp.float32))
    if level == "sequence":
        if segment_ids is None:
            gap = jnp.broadcast_to(jnp.sum(gap, axis=-1, keepdims=True), gap.shape)
        else:
            sums, index = segment_sums(gap, segment_ids)
            gap = sums[index]
    return jnp.where(mask, jnp.exp(jnp.minimum(gap, math.log(cap))), 1.0)
