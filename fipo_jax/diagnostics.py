"""What the policy loss does to each token: the quantities inside `policy_loss`, token by token.

    diag = token_diagnostics(log_probs, old_log_probs, advantages, mask, config)
    diag.weights[b, t]      # the influence weight FIPO multiplies token t's advantage by

Every field is the loss's own piece (`losses.policy_loss_parts` returns them beside the loss), not
a re-implementation, so what a view shows is what the update used. Pure and jittable; nothing
here carries a gradient.
"""

from __future__ import annotations

import jax

from fipo_jax import losses
from fipo_jax.losses import PolicyLossConfig, TokenDiagnostics

__all__ = ["TokenDiagnostics", "token_diagnostics"]


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
    ``mask & ~loss_mask`` shows each dropped sequence) and checks them the same way; the
    regularisers (KL, entropy) change no token's pieces and are left out."""
    config = config.replace(kl_coef=0.0, entropy_coeff=0.0, ratio_quantiles=False)
    return losses.policy_loss_parts(log_probs, old_log_probs, advantages, mask, config, segment_ids=segment_ids).tokens
