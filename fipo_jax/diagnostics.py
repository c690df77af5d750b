"""What the policy loss does to each token: the quantities inside `policy_loss`, token by token.

    diag = token_diagnostics(log_probs, old_log_probs, advantages, mask, config)
    diag.weights[b, t]      # the influence weight FIPO multiplies token t's advantage by

Every field comes from the loss's own pieces (`log_importance_ratio`, `influence`,
`dual_clip_mask`, `drop_dual_clipped_sequences`), not a re-implementation, so what a view shows is
what the update used. Pure and jittable; nothing here carries a gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fipo_jax import losses
from fipo_jax.losses import PolicyLossConfig


class TokenDiagnostics(NamedTuple):
    """Per-token quantities of one batch, [B, T] unless noted; padding holds 0 / False / 1 (weights).

    Attributes:
      log_ratio: Δlog p = clamp(log π_θ − log π_old) (spec E1).
      ratio: r = exp(Δlog p).
      advantages: A per token.
      filtered: real tokens FIPO's extreme-ratio filter leaves out of the Future-KL (r > c, E2).
      future_kl: FutureKL_t (E3), for every loss mode (only FIPO applies it).
      raw_weights: exp(FutureKL_t) before the influence clip.
      weights: the weight the loss multiplies A by: clipped (E4) and safety-clamped (E5) in FIPO,
        1 in DAPO / GRPO.
      safety_clamped: tokens whose weight the safety rule clamps into [0.8, 1] (A < 0, r > threshold).
      dual_clipped: tokens the dual clip bounds (A < 0, r > c; never in GRPO).
      dropped_rows: [B] responses the E8 rule removes from the loss (two or more dual-clipped tokens).
      loss_mask: tokens that enter the loss (response mask minus dropped rows).
    """

    log_ratio: jax.Array
    ratio: jax.Array
    advantages: jax.Array
    filtered: jax.Array
    future_kl: jax.Array
    raw_weights: jax.Array
    weights: jax.Array
    safety_clamped: jax.Array
    dual_clipped: jax.Array
    dropped_rows: jax.Array
    loss_mask: jax.Array


def token_diagnostics(
    log_probs: jax.Array,
    old_log_probs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    config: PolicyLossConfig,
    segment_ids: jax.Array | None = None,
) -> TokenDiagnostics:
    """The per-token quantities `policy_loss` computes for this batch (see `TokenDiagnostics`).

    Takes the arguments of `policy_loss` (advantages ``[B]`` or ``[B, T]``; ``segment_ids`` for packed
    rows, where ``dropped_rows`` marks rows every response of which was dropped and the per-token
    ``mask & ~loss_mask`` shows each dropped sequence) and checks them the same way."""
    losses.check_loss_inputs(log_probs, old_log_probs, advantages, mask, config, segment_ids=segment_ids)
    log_probs, old_log_probs, advantages, mask = losses.prepared_inputs(log_probs, old_log_probs, advantages, mask)
    log_ratio = jax.lax.stop_gradient(losses.log_importance_ratio(log_probs, old_log_probs, config.log_ratio_clamp))
    ratio = losses.importance_ratio(log_probs, old_log_probs, mask, config.log_ratio_clamp)
    pieces = losses.influence(log_ratio, advantages, mask, config, segment_ids)
    fipo = config.loss_mode == "fipo"
    weights = pieces.weights if fipo else jnp.ones_like(ratio)
    dual_clipped = (losses.dual_clip_mask(ratio, advantages, config.clip_ratio_c) & mask
                    if config.loss_mode != "grpo" else jnp.zeros_like(mask))
    loss_mask = (losses.drop_dual_clipped_sequences(ratio, advantages, mask, config.clip_ratio_c, segment_ids)
                 if config.drop_dual_clipped_sequences else mask)
    return TokenDiagnostics(
        log_ratio=log_ratio, ratio=ratio, advantages=advantages,
        filtered=mask & ~pieces.summed,
        future_kl=pieces.future_kl, raw_weights=jnp.where(mask, pieces.raw_weights, 1.0),
        weights=jnp.where(mask, weights, 1.0), safety_clamped=pieces.safety_clamped & fipo,
        dual_clipped=dual_clipped, dropped_rows=jnp.any(mask, -1) & ~jnp.any(loss_mask, -1), loss_mask=loss_mask)
