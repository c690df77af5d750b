"""(a) The registered Tunix losses on arrays equal `fipo_jax.policy_loss` on the same inputs; the official
DAPO loss equals Tunix's own GRPO loss set to DAPO's knobs (clip-higher, dual clip) in every aggregation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tunix.rl import algo_core, common, function_registry
from tunix.rl.grpo.dapo_learner import DAPOConfig
from tunix.rl.grpo.grpo_learner import GRPOConfig

import fipo_jax
from fipo_jax.integrations import tunix as fipo_tunix
from tests_tunix.helpers import EOS_ID, PAD_ID, make_train_example


@pytest.fixture(scope="module", autouse=True)
def registered():
    fipo_tunix.register("fipo")
    fipo_tunix.register_dapo("dapo_official")


def tunix_log_probs(model, example, temperature=1.0):
    """log π_θ of the completion tokens, straight from Tunix's helper."""
    graphdef, state = nnx.split(model)
    return common.compute_per_token_logps(graphdef, state, prompt_tokens=example.prompt_ids,
                                          completion_tokens=example.completion_ids, pad_id=PAD_ID, eos_id=EOS_ID,
                                          stop_gradient=False, temperature=temperature)


def algo(**fields):
    config = fipo_tunix.grpo_config(num_generations=2, **fields)
    config.temperature = 1.0  # what GRPOLearner sets from the rollout config
    return config


def test_registered_fipo_equals_policy_loss(model, vocab):
    example = make_train_example(vocab.GetPieceSize())
    loss_fn = function_registry.get_policy_loss_fn("fipo")
    loss, aux = loss_fn(model, example, algo(), PAD_ID, EOS_ID)
    want, metrics = fipo_jax.policy_loss(tunix_log_probs(model, example), example.old_per_token_logps,
                                         example.advantages, example.completion_mask,
                                         fipo_jax.PolicyLossConfig.fipo_32b())
    np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-7)
    for name, value in metrics.items():
        np.testing.assert_allclose(aux[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    # FIPO acts on these inputs: weights off 1, extreme ratios (r > c) left out of the Future-KL
    assert aux["influence_active_tokens"] > 0 and aux["filtered_tokens"] > 0
    assert float(aux["kl"]) == 0.0 and np.isfinite(aux["entropy"])


def test_registered_fipo_gradient_equals_policy_loss_gradient(model, vocab):
    example = make_train_example(vocab.GetPieceSize(), seed=1, old_noise=0.5)
    loss_fn = function_registry.get_policy_loss_fn("fipo")
    config = fipo_jax.PolicyLossConfig.fipo_32b()
    got = nnx.grad(lambda m: loss_fn(m, example, algo(), PAD_ID, EOS_ID)[0])(model)
    want = nnx.grad(lambda m: fipo_jax.policy_loss(tunix_log_probs(m, example), example.old_per_token_logps,
                                                   example.advantages, example.completion_mask, config)[0])(model)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(got))


def test_first_iteration_uses_current_log_probs(model, vocab):
    """No old log-probs (Tunix's num_iterations == 1): π_old = sg(π_θ), ratio 1, weights 1."""
    example = dataclasses.replace(make_train_example(vocab.GetPieceSize()), old_per_token_logps=None)
    loss, aux = function_registry.get_policy_loss_fn("fipo")(model, example, algo(), PAD_ID, EOS_ID)
    lp = tunix_log_probs(model, example)
    want, _ = fipo_jax.policy_loss(lp, lp, example.advantages, example.completion_mask,
                                   fipo_jax.PolicyLossConfig.fipo_32b())
    np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-7)
    assert float(aux["influence_weights_mean_raw"]) == pytest.approx(1.0)
    assert float(aux["influence_active_tokens"]) == 0.0


@pytest.mark.parametrize("loss_agg_mode", sorted(fipo_tunix.TUNIX_AGGREGATIONS))
@pytest.mark.parametrize("kl_loss_mode", [None, "kl", "mse_kl", "low_var_kl"])
def test_dapo_equals_tunix_grpo_loss_with_dapo_settings(model, vocab, loss_agg_mode, kl_loss_mode):
    """Tunix's own `grpo` loss with ε_high 0.28 and dual clip c = 10 is DAPO's loss: ours gives the same
    number for each of Tunix's aggregations (an empty row included) and each KL estimator."""
    example = make_train_example(vocab.GetPieceSize(), seed=2, with_ref=kl_loss_mode is not None)
    beta = 0.0 if kl_loss_mode is None else 0.04
    config = algo(loss_agg_mode=loss_agg_mode, beta=beta, kl_loss_mode=kl_loss_mode or "kl",
                  policy_loss_fn="dapo_official")
    loss, aux = function_registry.get_policy_loss_fn("dapo_official")(model, example, config, PAD_ID, EOS_ID)
    theirs, their_aux = algo_core.grpo_loss_fn(model, example, config, PAD_ID, EOS_ID)
    np.testing.assert_allclose(loss, theirs, rtol=2e-6, atol=1e-7)
    for name in ("kl", "ppo_kl", "pg_clipfrac_lower" if loss_agg_mode == "token-mean" else "kl"):
        np.testing.assert_allclose(aux[name], their_aux[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_loss_config_from_tunix_configs():
    """Tunix's knobs override the recipe; what Tunix has no knob for keeps the recipe's value."""
    grpo = GRPOConfig(num_generations=2)  # Tunix's GRPO defaults: seq-mean-token-mean, β 0.04, no ε_high, no c
    config = fipo_tunix.loss_config_from_tunix(grpo)
    assert (config.aggregation, config.kl_coef, config.clip_ratio_high, config.clip_ratio_c) == \
        ("seq-mean-token-mean", 0.04, 0.28, 10.0)
    dapo = fipo_tunix.loss_config_from_tunix(DAPOConfig(num_generations=2))  # token-mean, ε_high 0.28, β None
    assert dapo == fipo_jax.PolicyLossConfig.fipo_32b(kl_estimator="k1")  # Tunix's kl_loss_mode "kl"
    recipe = fipo_tunix.grpo_config(num_generations=2, fipo_decay_rate=16.0, epsilon_c=3.0)
    assert recipe.policy_loss_fn == "fipo"
    assert fipo_tunix.loss_config_from_tunix(recipe) == fipo_jax.PolicyLossConfig.fipo_32b(
        decay_rate=16.0, clip_ratio_c=3.0, kl_estimator="k1")
    seven_b = fipo_tunix.loss_config_from_tunix(recipe, fipo_jax.PolicyLossConfig.fipo_7b())
    assert (seven_b.influence_clip_high_only, seven_b.safety_threshold) == (False, 3.0)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        fipo_tunix.loss_config_from_tunix(GRPOConfig(num_generations=2, loss_agg_mode="nope"))


def test_unsupported_train_example_fields_raise(model, vocab):
    example = dataclasses.replace(make_train_example(vocab.GetPieceSize()),
                                  sampler_is_weights=jnp.ones((4, 9), jnp.float32))
    with pytest.raises(NotImplementedError, match="sampler_is_weights"):
        function_registry.get_policy_loss_fn("fipo")(model, example, algo(), PAD_ID, EOS_ID)


def test_temperature_mismatch_warns(model, vocab):
    """Tunix's vanilla rollout computes π_old at temperature 1, the loss at the rollout temperature."""
    config = algo()
    config.temperature = 0.7
    with pytest.warns(UserWarning, match="temperature 0.7"):
        function_registry.get_policy_loss_fn("fipo")(model, make_train_example(vocab.GetPieceSize()), config,
                                                     PAD_ID, EOS_ID)
