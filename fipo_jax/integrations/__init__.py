"""FIPO's losses inside other JAX RL libraries.

* `fipo_jax.integrations.tunix`: FIPO and the official DAPO loss as Tunix policy losses
  (``GRPOConfig(policy_loss_fn="fipo")``). Importing it needs only fipo_jax's core; Tunix
  (``pip install google-tunix``) is imported when a loss is registered.
"""
