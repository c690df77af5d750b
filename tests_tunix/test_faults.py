"""The Tunix loss refuses what the rest of fipo_jax refuses (issue 31, item 4): a NaN entry of a float
completion mask (NaN ≠ 0, so it would count as a token) and a KL coefficient that is not a number."""

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest
from tunix.rl import function_registry
from tunix.rl.grpo.grpo_learner import GRPOConfig

from fipo_jax.integrations import tunix as fipo_tunix
from tests_tunix.helpers import EOS_ID, PAD_ID, make_train_example


@pytest.fixture(scope="module", autouse=True)
def registered():
    fipo_tunix.register("fipo")


def algo(**fields):
    config = fipo_tunix.grpo_config(num_generations=2, **fields)
    config.temperature = 1.0
    return config


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_float_completion_mask_is_refused(model, vocab, bad):
    example = make_train_example(vocab.GetPieceSize())
    mask = np.asarray(example.completion_mask, np.float32)
    mask[2, 0] = bad  # row 2 is the empty completion: the entry would make it a one-token row
    example = dataclasses.replace(example, completion_mask=jnp.asarray(mask))
    with pytest.raises(ValueError, match=r"^train_example.completion_mask holds NaN or ±inf: a float mask must be "
                                         r"finite \(non-zero marks a real token\); pass a bool mask$"):
        function_registry.get_policy_loss_fn("fipo")(model, example, algo(), PAD_ID, EOS_ID)
    finite = dataclasses.replace(example, completion_mask=jnp.asarray(np.nan_to_num(mask, nan=0.0, posinf=0.0)))
    loss, _ = function_registry.get_policy_loss_fn("fipo")(model, finite, algo(), PAD_ID, EOS_ID)
    assert np.isfinite(loss)  # a finite float mask still works


@pytest.mark.parametrize("beta", ["x", "0.1", float("nan"), -0.5, True])
def test_a_kl_coefficient_that_is_not_a_number_is_named(beta):
    message = f"Tunix algo_config.beta (the KL coefficient) must be a finite number >= 0 or None, got {beta!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        fipo_tunix.loss_config_from_tunix(GRPOConfig(num_generations=2, beta=beta))
    assert fipo_tunix.loss_config_from_tunix(GRPOConfig(num_generations=2, beta=None)).kl_coef == 0.0
    assert fipo_tunix.loss_config_from_tunix(GRPOConfig(num_generations=2, beta=np.float32(0.5))).kl_coef == 0.5
