"""Tunix-environment test helpers: a tiny Qwen2 of Tunix's own and a hand-made `TrainExample`."""

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.models.qwen2 import model as qwen2
from tunix.rl import common

PAD_ID, EOS_ID = 0, 2  # test_common.MockVocab's


def tiny_qwen2(vocab_size: int, seed: int = 0) -> nnx.Module:
    """Tunix's own Qwen2 implementation, random weights, 2 layers of width 32."""
    config = qwen2.ModelConfig(num_layers=2, vocab_size=vocab_size, embed_dim=32, hidden_dim=64, num_heads=2,
                               head_dim=16, num_kv_heads=1, rope_theta=10_000, norm_eps=1e-6)
    return qwen2.Qwen2(config, rngs=nnx.Rngs(seed))


def make_train_example(vocab_size: int, seed: int = 0, batch: int = 4, prompt_len: int = 5, length: int = 9,
                       old_noise: float = 2.0, with_ref: bool = False):
    """A Tunix `TrainExample`: left-padded prompts, right-padded completions (one row empty, one ending
    in EOS), advantages [B], and π_old / π_ref as random log-probs (not from a model; π_old mostly below
    the tiny model's, so that ratios > 1 make FIPO's weights, filter and drop rule act)."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, vocab_size, (batch, prompt_len))
    prompts[0, :2] = PAD_ID
    completions = rng.integers(3, vocab_size, (batch, length))
    lengths = [length, 4, 0, 7][:batch] + [length] * max(0, batch - 4)
    for row, n in enumerate(lengths):
        completions[row, n:] = PAD_ID
    completions[1, 3] = EOS_ID
    completion_mask = completions != PAD_ID
    noise = lambda: jnp.asarray(rng.normal(-4.5, old_noise, (batch, length)), jnp.float32)  # noqa: E731
    return common.TrainExample(
        prompt_ids=jnp.asarray(prompts), prompt_mask=jnp.asarray(prompts != PAD_ID),
        completion_ids=jnp.asarray(completions), completion_mask=jnp.asarray(completion_mask),
        advantages=jnp.asarray(rng.normal(size=batch), jnp.float32),
        ref_per_token_logps=noise() if with_ref else None, old_per_token_logps=noise())
