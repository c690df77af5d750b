from fipo_jax.future_kl import future_kl, discounted_reverse_cumsum
from fipo_jax.losses import PolicyLossConfig, LossTerms, policy_loss, policy_loss_terms, aggregate
