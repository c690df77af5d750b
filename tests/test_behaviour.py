"""The decoupled objective's behaviour weights (`fipo_jax.core.behaviour`, issue 33 item 3): a
hand-written reference, today's loss when the sampler is π_old, and FIPO's Future-KL kept on
π_θ / π_prox whatever the sampler's log-probs say."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fipo_jax as fj
from fipo_jax.core.behaviour import behaviour_weights

B, T = 4, 12


def batch(seed=0):
    rng = np.random.default_rng(seed)
    old = -np.abs(rng.normal(size=(B, T))).astype(np.float32)  # π_prox: the trainer's recompute
    new = old + 0.3 * rng.normal(size=(B, T)).astype(np.float32)  # π_θ after some updates
    behav = old + 0.2 * rng.normal(size=(B, T)).astype(np.float32)  # the sampler's, stale / another engine
    mask = np.arange(T)[None] < rng.integers(3, T + 1, size=(B, 1))
    advantages = np.array([1.0, -1.0, 0.5, -0.5], np.float32)
    return jnp.asarray(new), jnp.asarray(old), jnp.asarray(behav), jnp.asarray(advantages), jnp.asarray(mask)


def reference_weights(old, behav, mask, cap, level):
    gap = np.where(mask, np.asarray(old, np.float64) - np.asarray(behav, np.float64), 0.0)
    if level == "sequence":
        gap = np.broadcast_to(gap.sum(-1, keepdims=True), gap.shape)
    return np.where(mask, np.minimum(np.exp(gap), cap), 1.0)


def dapo_reference(new, old, advantages, mask, weights, config):
    """Clip-higher PPO with dual clip, token-mean, each token's loss × its behaviour weight (numpy)."""
    new, old, mask = (np.asarray(x, np.float64) for x in (new, old, mask))
    ratio = np.exp(np.clip(new - old, -config.log_ratio_clamp, config.log_ratio_clamp))
    a = np.broadcast_to(np.asarray(advantages, np.float64)[:, None], ratio.shape)
    loss = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - config.clip_ratio_low, 1 + config.clip_ratio_high))
    loss = np.where(a < 0, np.minimum(loss, -a * config.clip_ratio_c), loss)
    return float(np.sum(loss * weights * mask) / mask.sum())


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("cap", [1.0, 1.2, 5.0])
def test_the_weighted_loss_equals_a_hand_written_reference(level, cap):
    new, old, behav, advantages, mask = batch()
    config = fj.PolicyLossConfig(loss_mode="dapo", behaviour_weight_cap=cap, behaviour_weight_level=level)
    loss, metrics = fj.policy_loss(new, old, advantages, mask, config, behaviour_log_probs=behav)
    weights = reference_weights(old, behav, mask, cap, level)
    np.testing.assert_allclose(float(loss), dapo_reference(new, old, advantages, mask, weights, config), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["behaviour_weights_mean"]), weights[np.asarray(mask)].mean(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(behaviour_weights(old, behav, mask, cap, level)), weights, rtol=1e-5)


@pytest.mark.parametrize("mode", ["fipo", "dapo", "grpo"])
def test_token_weights_scale_each_tokens_loss_as_its_advantage_would(mode):
    """A positive per-token weight w scales ℓ(A) to ℓ(A·w) exactly (every clip is linear in A > 0
    scalings and FIPO's weights read only the ratio and A's sign): an independent check for FIPO."""
    new, old, behav, advantages, mask = batch(1)
    config = fj.PolicyLossConfig(loss_mode=mode, behaviour_weight_cap=2.0)
    loss, _ = fj.policy_loss(new, old, advantages, mask, config, behaviour_log_probs=behav)
    weights = jnp.asarray(reference_weights(old, behav, mask, 2.0, "token"), jnp.float32)
    scaled, _ = fj.policy_loss(new, old, advantages[:, None] * weights, mask, config.replace(behaviour_weight_cap=None))
    np.testing.assert_allclose(float(loss), float(scaled), rtol=1e-5)


def test_the_sampler_as_old_policy_gives_todays_loss_and_a_zero_gap_weight_of_one():
    new, old, _, advantages, mask = batch(2)
    for mode in ("fipo", "dapo"):
        plain = fj.PolicyLossConfig(loss_mode=mode)
        today = fj.policy_loss(new, old, advantages, mask, plain)
        weighted = fj.policy_loss(new, old, advantages, mask, plain.replace(behaviour_weight_cap=2.0),
                                  behaviour_log_probs=old)
        assert float(today[0]) == float(weighted[0])
        assert float(weighted[1]["behaviour_weights_mean"]) == 1.0
        assert float(weighted[1]["behaviour_weights_capped_frac"]) == 0.0
        assert {k: float(v) for k, v in today[1].items()} == \
            {k: float(v) for k, v in weighted[1].items() if not k.startswith("behaviour_")}


def test_an_engine_offset_moves_the_behaviour_weights_not_fipos_influence():
    """A constant offset in the sampler's log-probs (engine numerics) changes the behaviour weights
    but not FIPO's Future-KL (its influence weights are exp of it, clipped), which reads π_θ / π_prox;
    fed as π_old (the sampler-as-π_old variant) the same offset moves every token's Future-KL."""
    new, old, behav, advantages, mask = batch(3)
    config = fj.PolicyLossConfig(behaviour_weight_cap=3.0)
    offset = behav - 0.05
    future_kl = lambda o, b: fj.core.losses.policy_loss_parts(  # noqa: E731
        new, o, advantages, mask, config, behaviour_log_probs=b).tokens.future_kl
    _, with_behav = fj.policy_loss(new, old, advantages, mask, config, behaviour_log_probs=behav)
    _, with_offset = fj.policy_loss(new, old, advantages, mask, config, behaviour_log_probs=offset)
    assert float(with_offset["behaviour_weights_mean"]) > float(with_behav["behaviour_weights_mean"])
    np.testing.assert_array_equal(np.asarray(future_kl(old, behav)), np.asarray(future_kl(old, offset)))
    plain = config.replace(behaviour_weight_cap=None)
    as_old = [np.asarray(fj.token_diagnostics(new, o, advantages, mask, plain).future_kl) for o in (behav, offset)]
    assert np.mean((as_old[0] != as_old[1])[np.asarray(mask)]) > 0.9  # FutureKL_t (what f exponentiates) moves


def test_sequence_weights_on_packed_rows_equal_one_row_per_sequence():
    new, old, behav, advantages, mask = batch(4)
    lengths = np.asarray(mask).sum(1)
    width = int(lengths.sum())
    ids = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])[None]
    pack = lambda x: jnp.asarray(np.concatenate([np.asarray(x)[i, :n] for i, n in enumerate(lengths)])[None])  # noqa
    packed = behaviour_weights(pack(old), pack(behav), jnp.ones((1, width), bool), 4.0, "sequence", jnp.asarray(ids))
    padded = behaviour_weights(old, behav, mask, 4.0, "sequence")
    np.testing.assert_allclose(np.asarray(packed), np.asarray(pack(padded)), rtol=1e-6)


def test_the_weights_carry_no_gradient():
    new, old, behav, advantages, mask = batch(5)
    config = fj.PolicyLossConfig(loss_mode="dapo", behaviour_weight_cap=2.0)
    grad_b = jax.grad(lambda b: fj.policy_loss(new, old, advantages, mask, config, behaviour_log_probs=b)[0])(behav)
    grad_o = jax.grad(lambda o: fj.policy_loss(new, o, advantages, mask, config, behaviour_log_probs=behav)[0])
    assert float(jnp.abs(grad_b).max()) == 0.0
    plain = jax.grad(lambda o: fj.policy_loss(new, o, advantages, mask, config.replace(behaviour_weight_cap=None))[0])
    weights = jnp.asarray(reference_weights(old, behav, mask, 2.0, "token"), jnp.float32)
    np.testing.assert_allclose(np.asarray(grad_o(old)), np.asarray(plain(old) * weights), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cap", [0.5, float("inf"), float("nan"), "2", True])
def test_a_cap_that_is_not_a_weight_bound_is_refused(cap):
    with pytest.raises(ValueError, match="behaviour_weight_cap must be None .* or a finite number >= 1"):
        fj.PolicyLossConfig(behaviour_weight_cap=cap)


def test_missing_or_misshapen_behaviour_log_probs_are_named():
    new, old, behav, advantages, mask = batch()
    config = fj.PolicyLossConfig(behaviour_weight_cap=2.0)
    with pytest.raises(ValueError, match="behaviour_weight_cap needs behaviour_log_probs"):
        fj.policy_loss(new, old, advantages, mask, config)
    with pytest.raises(ValueError, match="behaviour_log_probs"):
        fj.policy_loss(new, old, advantages, mask, config, behaviour_log_probs=behav[:, :-1])
    with pytest.raises(ValueError, match="behaviour_weight_level"):
        fj.PolicyLossConfig(behaviour_weight_level="row")


# ----------------------------------------------------------------------------- through the update


def update_run(setup, offset=0.0, cap=None, old_log_probs="trainer", mini=2, steps=1):
    from tests.test_rl_step import GROUP, ROWS, one_per_row, optimizer
    from fipo_jax.train import update as update_lib

    graphdef, params, rest, fields = setup
    fields = {**fields, "sampler_log_probs": fields["sampler_log_probs"] + np.float32(offset)}
    opt = optimizer(updates_per_step=mini)
    state = update_lib.init_state(jax.tree.map(jnp.array, params), opt, jax.random.key(0))
    config = update_lib.UpdateConfig(loss=fj.PolicyLossConfig(behaviour_weight_cap=cap), group_size=GROUP,
                                     logprob_chunk_size=64, old_log_probs=old_log_probs)
    update = update_lib.jit_rl_update(graphdef, rest, opt, config)
    batch = one_per_row(fields, mini, ROWS // mini)
    for _ in range(steps):
        state, metrics = update(state, batch)
    return state, {k: float(v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def setup():
    from tests.test_rl_step import setup as rl_setup

    return rl_setup.__wrapped__()


INFLUENCE = ("actor/influence_weights_mean", "actor/influence_weights_max", "actor/influence_weights_mean_raw",
             "influence/active_tokens_after_first", "actor/ppo_kl", "drift/update")


@pytest.mark.slow
def test_through_the_update_an_engine_offset_moves_behaviour_weights_and_drift_not_fipo(setup):
    """Sampler log-probs with a constant offset (another engine's numerics): the behaviour weights and
    drift/engine move, FIPO's influence metrics and the update's own drift do not (π_old is the
    trainer's recompute); with ``old_log_probs="sampler"`` they do."""
    _, base = update_run(setup, cap=2.0)
    _, shifted = update_run(setup, offset=-0.05, cap=2.0)
    assert base["drift/engine"] < 1e-5 and abs(shifted["drift/engine"] - 0.05) < 1e-4
    assert shifted["actor/behaviour_weights_mean"] > base["actor/behaviour_weights_mean"] + 0.04
    for key in INFLUENCE:
        np.testing.assert_allclose(shifted[key], base[key], rtol=1e-3, atol=1e-6, err_msg=key)
    _, sampler_old = update_run(setup, offset=-0.05, old_log_probs="sampler")
    _, sampler_base = update_run(setup, old_log_probs="sampler")
    assert abs(sampler_old["drift/update"] - sampler_base["drift/update"]) > 0.02
    assert sampler_old["actor/influence_weights_mean_raw"] != sampler_base["actor/influence_weights_mean_raw"]


@pytest.mark.slow
def test_through_the_update_matching_sampler_log_probs_give_todays_update(setup):
    """The sampler's log-probs here are the teacher-forced ones (gap < 1e-5): weights of 1 to float32
    rounding, so the update with a cap equals the update without one; so does ``"sampler"`` as π_old."""
    plain, plain_metrics = update_run(setup)
    for kwargs in (dict(cap=2.0), dict(old_log_probs="sampler")):
        state, metrics = update_run(setup, **kwargs)
        for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(state.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(metrics["actor/pg_loss"], plain_metrics["actor/pg_loss"], rtol=1e-4, atol=1e-6)


def test_the_sampler_as_old_policy_warns_for_fipo_and_keeps_fipo_acting():
    from fipo_jax.config import apply_overrides, cpu_default, fipo_inert_reason, sampler_as_old_warning

    config = apply_overrides(cpu_default(), ["algo.old_log_probs=sampler"])
    assert "Future-KL sums log π_θ − log π_sampler" in sampler_as_old_warning(config)
    assert sampler_as_old_warning(apply_overrides(config, ["algo.loss.loss_mode=dapo"])) is None
    assert sampler_as_old_warning(cpu_default()) is None
    one = apply_overrides(config, ["algo.mini_batches=1"])  # π_old ≠ π_θ even in a step's only update
    assert fipo_inert_reason(one) is None
    assert fipo_inert_reason(apply_overrides(cpu_default(), ["algo.mini_batches=1"])) is not None
