"""fipo_jax: FIPO (Future-KL Influenced Policy Optimization) in JAX.

The functional core (`fipo_jax.core`) is re-exported here; see README.md for an example.
"""

from fipo_jax.core.advantages import (
    broadcast_to_tokens,
    dr_grpo_advantages,
    dynamic_sampling_mask,
    grpo_advantages,
    rloo_advantages,
)
from fipo_jax.core.behaviour import behaviour_weights
from fipo_jax.core.future_kl import context_parallel_future_kl, discount_factor, discounted_reverse_cumsum, future_kl
from fipo_jax.core.losses import (
    METRIC_REDUCTIONS,
    Influence,
    LossTerms,
    PolicyLossConfig,
    TokenDiagnostics,
    aggregate,
    clipped_surrogate,
    drop_dual_clipped_sequences,
    dual_clip_mask,
    fipo_advantages,
    importance_ratio,
    influence,
    influence_weights,
    kl_penalty,
    log_importance_ratio,
    policy_loss,
    policy_loss_terms,
    token_diagnostics,
    weight_micro_batch,
)

__version__ = "0.1.0"

__all__ = [
    "METRIC_REDUCTIONS",
    "Influence",
    "LossTerms",
    "PolicyLossConfig",
    "TokenDiagnostics",
    "aggregate",
    "behaviour_weights",
    "broadcast_to_tokens",
    "clipped_surrogate",
    "context_parallel_future_kl",
    "discount_factor",
    "discounted_reverse_cumsum",
    "dr_grpo_advantages",
    "drop_dual_clipped_sequences",
    "dual_clip_mask",
    "dynamic_sampling_mask",
    "fipo_advantages",
    "future_kl",
    "grpo_advantages",
    "importance_ratio",
    "influence",
    "influence_weights",
    "kl_penalty",
    "log_importance_ratio",
    "policy_loss",
    "policy_loss_terms",
    "rloo_advantages",
    "token_diagnostics",
    "weight_micro_batch",
]
