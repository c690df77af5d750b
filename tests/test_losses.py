"""Policy losses: golden parity with the official release, hand-computed cases, a PyTorch
transcription of the official algorithm, micro-batch accumulation, masks, errors."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

import fipo_jax as fj
from tests import torch_reference

GOLDEN_CASES = ("fipo_32b_s0", "fipo_7b_s0", "dapo_s0")


def load_golden(golden_dir, name):
    data = np.load(os.path.join(golden_dir, name + ".npz"))
    official = json.loads(str(data["config"]))
    common = dict(
        clip_ratio_low=official["clip_ratio_low"],
        clip_ratio_high=official["clip_ratio_high"],
        clip_ratio_c=official["clip_ratio_c"],
    )
    if official["loss"] == "future_kl":
        config = fj.PolicyLossConfig(
            loss_mode="fipo",
            decay_rate=official["decay_rate"],
            influence_clip=official["future_kl_clip_ratio"],
            influence_clip_high_only=official["future_kl_clip_high_only"],
            safety_threshold=official["safety_thresh"],
            **common,
        )
    else:
        config = fj.PolicyLossConfig(loss_mode="dapo", **common)
    return data, config, json.loads(str(data["outputs"]))


_loss_and_grad_jit = jax.jit(
    jax.value_and_grad(lambda lp, old, adv, mask, config: fj.policy_loss(lp, old, adv, mask, config), has_aux=True),
    static_argnames="config",
)


def loss_and_grad(config, old, adv, mask, jit=True):
    """d loss / d log_probs, compiled once per (config, shapes)."""
    if jit:
        return lambda lp: _loss_and_grad_jit(lp, old, adv, mask, config=config)
    return jax.value_and_grad(lambda lp: fj.policy_loss(lp, old, adv, mask, config), has_aux=True)


@pytest.mark.parametrize("name", GOLDEN_CASES)
@pytest.mark.parametrize("jit", [True, False])
def test_golden_parity(golden_dir, name, jit):
    data, config, expected = load_golden(golden_dir, name)
    (loss, metrics), grad = loss_and_grad(config, data["old_log_probs"], data["advantages"], data["mask"], jit)(
        jnp.asarray(data["log_probs"])
    )
    np.testing.assert_allclose(loss, expected["loss"], rtol=1e-5)
    for key, value in expected.items():
        if key != "loss":
            np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
    scale = np.abs(data["grad_log_probs"]).max()
    np.testing.assert_allclose(grad, data["grad_log_probs"], rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_micro_batch_accumulation_is_exact_token_mean(golden_dir, name):
    """Σ ∇total over micro-batches / Σ count = ∇ of the whole-batch token-mean (Eq. 8)."""
    data, config, expected = load_golden(golden_dir, name)
    total_grad = lambda lp, old, adv, m: jax.grad(  # noqa: E731
        lambda x: fj.policy_loss_terms(x, old, adv, m, config)[0].total)(lp)
    grads, count = [], 0.0
    for rows in np.array_split(np.arange(16), 4):
        terms, _ = fj.policy_loss_terms(data["log_probs"][rows], data["old_log_probs"][rows],
                                        data["advantages"][rows], data["mask"][rows], config)
        grads.append(total_grad(data["log_probs"][rows], data["old_log_probs"][rows],
                                data["advantages"][rows], data["mask"][rows]))
        count += float(terms.count)
    accumulated = np.concatenate(grads) / count
    scale = np.abs(data["grad_log_probs"]).max()
    np.testing.assert_allclose(accumulated, data["grad_log_probs"], rtol=1e-5, atol=1e-5 * scale)


def test_golden_official_micro_batch_weighting(golden_dir):
    """verl weights micro-batch token-means by sequence count; that is not Eq. 8 in general."""
    data, config, expected = load_golden(golden_dir, "fipo_32b_s0")
    splits = np.array_split(np.arange(16), 4)

    def objective(lp, weighting):
        parts = [fj.weight_micro_batch(
            fj.policy_loss_terms(lp[r], data["old_log_probs"][r], data["advantages"][r], data["mask"][r], config)[0],
            weighting, len(r), 16) for r in splits]
        return sum(p.total for p in parts) / sum(p.count for p in parts)

    lp = jnp.asarray(data["log_probs"])
    official = sum(float(fj.policy_loss(lp[r], data["old_log_probs"][r], data["advantages"][r], data["mask"][r],
                                        config)[0]) * len(r) / 16 for r in splits)
    np.testing.assert_allclose(objective(lp, "official"), official, rtol=1e-6)
    np.testing.assert_allclose(objective(lp, "exact"), expected["loss"], rtol=1e-5)
    assert abs(official - expected["loss"]) > 1e-4  # unequal token counts: the two differ
    with pytest.raises(ValueError, match="weighting must be 'exact' or 'official'"):
        fj.weight_micro_batch(fj.LossTerms(1.0, 1.0), "mean", 1, 2)


# ---------------------------------------------------------------- hand-computed cases

def test_clipped_surrogate_hand_cases():
    ratio = jnp.array([2.0, 0.5, 0.5, 20.0, 1.1])
    adv = jnp.array([1.0, 1.0, -1.0, -1.0, -2.0])
    loss, clipped, dual = fj.clipped_surrogate(ratio, adv, 0.2, 0.28, 10.0)
    # A>0, r=2: max(−2, −1.28) = −1.28 (clipped). A>0, r=.5: max(−.5, −.8) = −.5.
    # A<0, r=.5: max(.5, .8) = .8 (clipped). A<0, r=20: min(max(20, 1.28), 10) = 10 (dual).
    # A=−2, r=1.1: 2.2, inside the trust region.
    np.testing.assert_allclose(loss, [-1.28, -0.5, 0.8, 10.0, 2.2], rtol=1e-6)
    assert clipped.tolist() == [True, False, True, False, False]
    assert dual.tolist() == [False, False, False, True, False]
    grpo_loss, _, grpo_dual = fj.clipped_surrogate(ratio, adv, 0.2, 0.2, None)
    np.testing.assert_allclose(grpo_loss, [-1.2, -0.5, 0.8, 20.0, 2.2], rtol=1e-6)
    assert not grpo_dual.any()


@pytest.mark.parametrize(
    "future, adv, ratio, config, expected",
    [
        (0.0, 1.0, 1.0, fj.PolicyLossConfig(), 1.0),
        (np.log(1.5), 1.0, 1.0, fj.PolicyLossConfig(), 1.2),
        (np.log(1.1), 1.0, 1.0, fj.PolicyLossConfig(), 1.1),
        (np.log(0.5), 1.0, 1.0, fj.PolicyLossConfig(), 1.0),  # high-only: floor 1
        (np.log(0.5), 1.0, 1.0, fj.PolicyLossConfig.fipo_7b(), 0.8),  # balanced
        (np.log(20.0), 1.0, 1.0, fj.PolicyLossConfig(influence_clip=0.0), 10.0),  # ε_f = 0: cap 10
        (np.log(0.3), 1.0, 1.0, fj.PolicyLossConfig(influence_clip=0.0), 0.3),
        (np.log(1.5), -1.0, 11.0, fj.PolicyLossConfig(), 1.0),  # safety: A<0, r>10
        (np.log(1.5), -1.0, 9.0, fj.PolicyLossConfig(), 1.2),
        (np.log(1.5), -1.0, 4.0, fj.PolicyLossConfig.fipo_7b(), 1.0),  # 7B: safety 3
        (np.log(0.3), -1.0, 4.0, fj.PolicyLossConfig(influence_clip=0.0, safety_threshold=3.0), 0.8),
    ],
)
def test_influence_weight_hand_cases(future, adv, ratio, config, expected):
    weights, raw = fj.influence_weights(jnp.array([future], jnp.float32), jnp.array([adv]), jnp.array([ratio]), config)
    np.testing.assert_allclose(weights, [expected], rtol=1e-6)
    np.testing.assert_allclose(raw, [np.exp(future)], rtol=1e-6)


def test_fipo_is_dapo_when_policy_has_not_moved():
    """E12: on the first mini-batch θ = θ_old, FutureKL = 0 and (lo = 1) FIPO is DAPO."""
    rng = np.random.default_rng(0)
    lp = jnp.asarray(rng.normal(size=(4, 30)) - 2, jnp.float32)
    adv = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
    mask = jnp.ones((4, 30))
    fipo = loss_and_grad(fj.PolicyLossConfig(), lp, adv, mask)(lp)
    dapo = loss_and_grad(fj.PolicyLossConfig.dapo(), lp, adv, mask)(lp)
    np.testing.assert_allclose(fipo[0][0], dapo[0][0], rtol=1e-6)
    np.testing.assert_allclose(fipo[1], dapo[1], rtol=1e-6)
    assert float(fipo[0][1]["influence_weights_mean"]) == 1.0


def test_future_kl_reweights_tokens_before_a_drift():
    """A token whose future drifted up gets weight > 1; tokens after the drift do not."""
    old = jnp.zeros((1, 6)) - 1.0
    lp = old.at[0, 3].add(0.1)
    _, metrics = fj.policy_loss(lp, old, jnp.array([1.0]), jnp.ones((1, 6)), fj.PolicyLossConfig(decay_rate=1.0))
    # F = [0.1/8, 0.1/4, 0.1/2, 0.1, 0, 0] → weights exp(F), all < 1.2
    expected = np.exp([0.0125, 0.025, 0.05, 0.1, 0.0, 0.0])
    np.testing.assert_allclose(metrics["influence_weights_mean"], expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["influence_weights_max"], np.exp(0.1), rtol=1e-5)


@pytest.mark.slow
def test_sequence_drop_rule():
    """E8: two dual-clipped A<0 tokens drop the row from numerator and denominator."""
    old = jnp.zeros((3, 4)) - 2.0
    big = jnp.log(20.0)
    lp = old.at[0, 1].add(big).at[0, 2].add(big).at[1, 1].add(big)  # row 0: two hits, row 1: one
    adv = jnp.array([-1.0, -1.0, 1.0])
    mask = jnp.ones((3, 4))
    cfg = fj.PolicyLossConfig(loss_mode="dapo", drop_dual_clipped_sequences=True)
    loss, metrics = fj.policy_loss(lp, old, adv, mask, cfg)
    kept, _ = fj.policy_loss(lp[1:], old[1:], adv[1:], mask[1:], cfg)
    np.testing.assert_allclose(loss, kept, rtol=1e-6)
    assert float(metrics["dropped_sequences"]) == 1.0 and float(metrics["loss_tokens"]) == 8.0
    # Without the rule the row stays; DAPO's default keeps it (official "vanilla" loss).
    assert fj.PolicyLossConfig.dapo().drop_dual_clipped_sequences is False
    assert fj.PolicyLossConfig().drop_dual_clipped_sequences is True
    full, m2 = fj.policy_loss(lp, old, adv, mask, fj.PolicyLossConfig.dapo())
    assert float(m2["dropped_sequences"]) == 0.0 and abs(float(full) - float(loss)) > 1e-3


def test_aggregation_modes_hand_computed():
    per_token = jnp.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]], bool)
    np.testing.assert_allclose(fj.aggregate(per_token, mask, "token-mean").value, 10 / 4)
    np.testing.assert_allclose(fj.aggregate(per_token, mask, "seq-mean-token-mean").value, (2 + 4) / 2)
    np.testing.assert_allclose(fj.aggregate(per_token, mask, "seq-mean-token-sum").value, 10 / 3)
    np.testing.assert_allclose(fj.aggregate(per_token, mask, "seq-mean-token-sum-norm").value, 10 / 9)
    np.testing.assert_allclose(fj.aggregate(per_token, mask, "seq-mean-token-sum-norm", horizon=5).value, 10 / 15)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_loss_terms_add_up_across_micro_batches(mode):
    rng = np.random.default_rng(3)
    per_token = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    mask = jnp.asarray(rng.random((6, 5)) < 0.6)
    whole = fj.aggregate(per_token, mask, mode, horizon=5)
    parts = [fj.aggregate(per_token[r], mask[r], mode, horizon=5) for r in (slice(0, 2), slice(2, 6))]
    np.testing.assert_allclose(sum(p.total for p in parts) / sum(p.count for p in parts), whole.value, rtol=1e-6)


def test_grpo_mode_defaults_and_math():
    cfg = fj.PolicyLossConfig.grpo()
    assert (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.aggregation) == (0.2, 0.2, "seq-mean-token-mean")
    old = jnp.zeros((2, 3)) - 1.0
    lp = old.at[0, 0].add(jnp.log(20.0))
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    loss, metrics = fj.policy_loss(lp, old, jnp.array([-1.0, 1.0]), mask, cfg)
    # row 0: tokens [20 (no dual clip in GRPO), 1] → mean 10.5; row 1: −1 each → −1.
    np.testing.assert_allclose(loss, (10.5 - 1.0) / 2, rtol=1e-6)
    assert float(metrics["pg_clipfrac_lower"]) == 0.0


def test_kl_estimators_and_entropy_bonus():
    lp = jnp.log(jnp.array([[0.5, 0.25]]))
    ref = jnp.log(jnp.array([[0.25, 0.25]]))
    k1 = fj.kl_penalty(lp, ref, "k1")
    np.testing.assert_allclose(k1, [[np.log(2), 0.0]], rtol=1e-6)
    np.testing.assert_allclose(fj.kl_penalty(lp, ref, "k2"), [[0.5 * np.log(2) ** 2, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(fj.kl_penalty(lp, ref, "k3"), [[0.5 - np.log(0.5) - 1, 0.0]], rtol=1e-6)
    mask = jnp.ones((1, 2))
    base, _ = fj.policy_loss(lp, lp, jnp.array([1.0]), mask, fj.PolicyLossConfig.grpo())
    with_kl, m = fj.policy_loss(lp, lp, jnp.array([1.0]), mask, fj.PolicyLossConfig.grpo(kl_coef=0.1, kl_estimator="k1"),
                                ref_log_probs=ref)
    np.testing.assert_allclose(with_kl - base, 0.1 * np.log(2) / 2, rtol=1e-5)
    np.testing.assert_allclose(m["kl_loss"], np.log(2) / 2, rtol=1e-5)
    entropy = jnp.array([[1.0, 3.0]])
    with_h, m = fj.policy_loss(lp, lp, jnp.array([1.0]), mask, fj.PolicyLossConfig.grpo(entropy_coeff=0.01), entropy=entropy)
    np.testing.assert_allclose(with_h - base, -0.01 * 2.0, rtol=1e-5)
    np.testing.assert_allclose(m["entropy"], 2.0, rtol=1e-6)


def test_ratio_statistics_match_numpy_quantiles():
    rng = np.random.default_rng(5)
    ratio = np.exp(rng.normal(size=(4, 200)) * 0.8).astype(np.float32)
    adv = np.repeat(rng.choice([-1.0, 0.0, 1.0], size=(4, 1)), 200, axis=1).astype(np.float32)
    adv[0] = -1.0
    adv[1] = 1.0
    mask = rng.random((4, 200)) < 0.7
    stats = jax.jit(lambda r, a, m: fj.core.loss_metrics.ratio_statistics(r, a, m, 10.0))(ratio, adv, mask)
    neg, pos = ratio[(adv < 0) & mask], ratio[(adv > 0) & mask]
    for name, values, q in [("neg_is_p75", neg, 0.75), ("neg_is_p995", neg, 0.995), ("neg_is_max", neg, 1.0),
                            ("neg_is_min", neg, 0.0), ("pos_is_p25", pos, 0.25), ("pos_is_median", pos, 0.5),
                            ("pos_is_p999", pos, 0.999), ("pos_is_min", pos, 0.0), ("pos_is_max", pos, 1.0)]:
        np.testing.assert_allclose(stats[name], np.quantile(values.astype(np.float64), q), rtol=1e-5, err_msg=name)
    in_bin = ((ratio >= 2) & (ratio < 3) & (adv < 0) & mask).sum() / mask.sum()
    np.testing.assert_allclose(stats["neg_ratio_2_3"], in_bin, rtol=1e-6)


# ------------------------------------------------- PyTorch transcription of the official code

@given(
    seed=st.integers(0, 2**31 - 1),
    variant=st.sampled_from(["32b", "7b", "eps0", "no_filter", "no_drop", "dapo"]),
    spread=st.sampled_from([0.05, 0.5, 3.0]),
)
@pytest.mark.slow
def test_matches_pytorch_transcription(seed, variant, spread):
    rng = np.random.default_rng(seed)
    b, t = 6, 160
    old = (-np.abs(rng.normal(size=(b, t))) * 2).astype(np.float32)
    lp = (old + rng.normal(size=(b, t)) * spread).astype(np.float32)
    lp[rng.random((b, t)) < 0.03] += 3.0  # extreme ratios: filter, dual clip and drops
    lengths = rng.integers(0, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    adv = (rng.normal(size=(b, 1)) * mask).astype(np.float32)
    torch_kwargs, cfg = {
        "32b": ({}, fj.PolicyLossConfig()),
        "7b": (dict(high_only=False, safety=3.0), fj.PolicyLossConfig.fipo_7b()),
        "eps0": (dict(influence_clip=0.0, safety=3.0), fj.PolicyLossConfig(influence_clip=0.0, safety_threshold=3.0)),
        "no_filter": (dict(future_kl_filter=False), fj.PolicyLossConfig(future_kl_filter=False)),
        "no_drop": (dict(drop_sequences=False), fj.PolicyLossConfig(drop_dual_clipped_sequences=False)),
        "dapo": (dict(loss="dapo"), fj.PolicyLossConfig.dapo()),
    }[variant]
    lp_t = torch.tensor(lp, requires_grad=True)
    ref_loss, ref_metrics = torch_reference.policy_loss(lp_t, torch.tensor(old), torch.tensor(adv),
                                                        torch.tensor(mask), **torch_kwargs)
    ref_loss.backward()
    (loss, metrics), grad = loss_and_grad(cfg, old, adv, mask)(jnp.asarray(lp))
    np.testing.assert_allclose(loss, ref_loss.item(), rtol=1e-5, atol=1e-6)
    for key, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[key], value.item(), rtol=1e-5, atol=1e-6, err_msg=key)
    scale = max(np.abs(lp_t.grad.numpy()).max(), 1e-6)
    np.testing.assert_allclose(grad, lp_t.grad.numpy(), rtol=1e-4, atol=1e-5 * scale)


# ------------------------------------------------------------ masks, transforms, gradients

@pytest.mark.parametrize("cfg", [fj.PolicyLossConfig(), fj.PolicyLossConfig.dapo(), fj.PolicyLossConfig.grpo()])
def test_all_masked_batch_gives_zero_loss_and_gradient(cfg):
    lp = jnp.full((3, 8), -1.0)
    (loss, metrics), grad = loss_and_grad(cfg, lp - 0.5, jnp.ones(3), jnp.zeros((3, 8)))(lp)
    assert float(loss) == 0.0 and not np.any(grad)
    assert all(np.isfinite(v) for v in jax.tree.leaves(metrics))


@pytest.mark.parametrize("cfg", [fj.PolicyLossConfig(), fj.PolicyLossConfig.grpo(kl_coef=0.1)])
def test_garbage_in_padding_never_reaches_the_gradient(cfg):
    rng = np.random.default_rng(7)
    old = jnp.asarray(rng.normal(size=(3, 10)) - 2, jnp.float32)
    lp = old + 0.1
    mask = jnp.asarray(np.arange(10)[None] < np.array([[10], [4], [0]]))
    lp = jnp.where(mask, lp, jnp.nan)
    old = jnp.where(mask, old, -jnp.inf)
    ref = jnp.where(mask, old, jnp.inf)
    fn = jax.jit(jax.value_and_grad(lambda x: fj.policy_loss(x, old, jnp.ones(3), mask, cfg, ref_log_probs=ref),
                                    has_aux=True))
    (loss, metrics), grad = fn(lp)
    assert np.isfinite(loss) and np.all(np.isfinite(grad)) and not np.any(np.asarray(grad)[~np.asarray(mask)])
    assert all(np.isfinite(v) for v in jax.tree.leaves(metrics))


def test_vmap_over_stacked_batches():
    rng = np.random.default_rng(8)
    lp = jnp.asarray(rng.normal(size=(3, 2, 12)) - 2, jnp.float32)
    old = lp + jnp.asarray(rng.normal(size=lp.shape) * 0.1, jnp.float32)
    adv = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    mask = jnp.ones(lp.shape)
    cfg = fj.PolicyLossConfig()
    single = jax.jit(lambda a, b, c, d: fj.policy_loss(a, b, c, d, cfg))
    batched, _ = jax.jit(jax.vmap(single))(lp, old, adv, mask)
    for i in range(3):
        np.testing.assert_allclose(batched[i], single(lp[i], old[i], adv[i], mask[i])[0], rtol=1e-6)


@pytest.mark.parametrize("cfg", [fj.PolicyLossConfig.dapo(), fj.PolicyLossConfig.grpo(kl_coef=0.05),
                                 fj.PolicyLossConfig(aggregation="seq-mean-token-mean")])
def test_check_grads_where_smooth(cfg):
    """Within the trust region (and, for FIPO, with weights saturated at 1) the loss is smooth."""
    rng = np.random.default_rng(9)
    old = jnp.asarray(rng.normal(size=(2, 9)) - 2, jnp.float32)
    delta = -jnp.abs(jnp.asarray(rng.normal(size=(2, 9)) * 0.03, jnp.float32)) - 0.01  # F < 0 ⇒ w = 1
    adv = jnp.array([0.7, -1.3])
    mask = jnp.ones((2, 9))
    ref = old - 0.2
    loss = jax.jit(lambda x: fj.policy_loss(x, old, adv, mask, cfg, ref_log_probs=ref)[0])
    check_grads(loss, (old + delta,), order=1, modes=("rev",), eps=1e-3, atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_mode="ppo"), "loss_mode must be one of"),
        (dict(clip_ratio_c=1.0), "clip_ratio_c must be > 1"),
        (dict(clip_ratio_c=1.2), r"clip_ratio_c \(1.2\) must exceed 1 \+ clip_ratio_high"),
        (dict(decay_rate=0.0), "decay_rate must be a finite number > 0"),
        (dict(clip_ratio_low=-0.1), "clip_ratio_low must be a finite number >= 0"),
        (dict(clip_ratio_low=1.0), "clip_ratio_low must be < 1"),
        (dict(clip_ratio_high=-0.2), "clip_ratio_high must be a finite number >= 0"),
        (dict(influence_clip=-0.1), "influence_clip must be a finite number >= 0"),
        (dict(influence_clip=1.0, influence_clip_high_only=False), "influence_clip must be < 1"),
        (dict(safety_threshold=0.0), "safety_threshold must be a finite number > 0"),
        (dict(aggregation="sum"), "aggregation must be one of"),
        (dict(kl_estimator="k4"), "kl_estimator must be one of"),
        (dict(future_kl_method="fft"), "future_kl_method must be one of"),
        (dict(aggregation_horizon=0), "aggregation_horizon must be a positive int"),
        (dict(future_kl_filter="yes"), "future_kl_filter must be a bool"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fj.PolicyLossConfig(**kwargs)


def test_config_is_frozen_and_hashable():
    cfg = fj.PolicyLossConfig()
    with pytest.raises(Exception):
        cfg.decay_rate = 1.0  # type: ignore[misc]
    assert hash(cfg) == hash(fj.PolicyLossConfig()) and cfg.replace(decay_rate=8.0).decay_rate == 8.0


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(log_probs=jnp.zeros((8,))), ValueError, r"log_probs must have rank 2, got shape \(8,\)"),
        (dict(old_log_probs=jnp.zeros((2, 5))), ValueError, r"old_log_probs has shape \(2, 5\) but log_probs \[B, T\] has shape \(2, 4\)"),
        (dict(advantages=jnp.zeros((3,))), ValueError, r"advantages of shape \(3,\) must be \[B\] or \[B, T\]"),
        (dict(advantages=jnp.zeros((2, 3))), ValueError, "advantages has shape"),
        (dict(mask=jnp.ones((4, 2))), ValueError, r"mask has shape \(4, 2\)"),
        (dict(log_probs=jnp.zeros((2, 4), jnp.int32)), TypeError, "log_probs must be a floating-point array"),
        (dict(config={"loss_mode": "fipo"}), TypeError, "config must be a PolicyLossConfig"),
        (dict(config=fj.PolicyLossConfig(kl_coef=0.1)), ValueError, "kl_coef > 0 needs ref_log_probs"),
        (dict(config=fj.PolicyLossConfig(entropy_coeff=0.1)), ValueError, "entropy_coeff > 0 needs entropy"),
    ],
)
def test_bad_inputs_raise_at_trace_time(change, error, match):
    args = dict(log_probs=jnp.zeros((2, 4)), old_log_probs=jnp.zeros((2, 4)), advantages=jnp.zeros((2,)),
                mask=jnp.ones((2, 4)), config=fj.PolicyLossConfig())
    args.update(change)
    config = args.pop("config")
    with pytest.raises(error, match=match):
        jax.jit(lambda **arrays: fj.policy_loss(**arrays, config=config))(**args)


# ----------------------------------------------------------------------------- declared reductions

@pytest.mark.parametrize("mode", fj.core.losses.LOSS_MODES)
@pytest.mark.parametrize("extras", [False, True])
@pytest.mark.parametrize("quantiles", [False, True])
def test_every_metric_has_a_declared_reduction(mode, extras, quantiles):
    """METRIC_REDUCTIONS is the declaration the trainer reduces by: it covers every key, exactly."""
    shape = (2, 4)
    kwargs = dict(ref_log_probs=jnp.zeros(shape), entropy=jnp.ones(shape)) if extras else {}
    _, metrics = fj.policy_loss_terms(jnp.zeros(shape), jnp.zeros(shape), jnp.ones(2), jnp.ones(shape, bool),
                                      fj.PolicyLossConfig(loss_mode=mode), ratio_quantiles=quantiles, **kwargs)
    assert set(metrics) <= set(fj.METRIC_REDUCTIONS), set(metrics) - set(fj.METRIC_REDUCTIONS)
    assert set(fj.METRIC_REDUCTIONS.values()) <= {"sum", "mean", "loss_mean", "min", "max"}


def test_declared_reductions_are_all_used():
    seen = set()
    for mode in fj.core.losses.LOSS_MODES:
        _, metrics = fj.policy_loss_terms(jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.ones(2), jnp.ones((2, 4), bool),
                                          fj.PolicyLossConfig(loss_mode=mode, behaviour_weight_cap=2.0),
                                          ref_log_probs=jnp.zeros((2, 4)), entropy=jnp.ones((2, 4)),
                                          behaviour_log_probs=jnp.zeros((2, 4)))
        seen |= set(metrics)
    assert seen == set(fj.METRIC_REDUCTIONS)


def test_one_dual_clip_predicate_for_the_surrogate_and_the_drop_rule():
    ratio = jnp.array([[0.5, 10.5, 11.0, 1.0], [12.0, 1.0, 1.0, 1.0]])
    advantages = jnp.array([[-1.0] * 4, [-1.0] * 4])
    mask = jnp.ones((2, 4), bool)
    dual = fj.dual_clip_mask(ratio, advantages, 10.0)
    assert dual.tolist() == [[False, True, True, False], [True, False, False, False]]
    loss, _, indicator = fj.clipped_surrogate(ratio, advantages, 0.2, 0.28, 10.0)
    assert (indicator == dual).all() and float(loss[0, 1]) == 10.0 and float(loss[0, 0]) == pytest.approx(0.8)
    kept = fj.drop_dual_clipped_sequences(ratio, advantages, mask, 10.0)
    assert kept.tolist() == [[False] * 4, [True] * 4]  # two hits drop row 0, one hit keeps row 1
    assert not fj.dual_clip_mask(ratio, -advantages, 10.0).any()  # positive advantages are never dual-clipped


def test_importance_ratio_matches_the_loss_and_is_one_on_padding():
    lp, old = jnp.array([[0.0, -1.0, 5.0]]), jnp.array([[-0.5, -1.0, -30.0]])
    mask = jnp.array([[True, True, False]])
    np.testing.assert_allclose(fj.importance_ratio(lp, old, mask, 20.0), [[np.exp(0.5), 1.0, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(fj.log_importance_ratio(lp, old, 20.0), [[0.5, 0.0, 20.0]])


def test_metric_reductions_table_is_read_only():
    with pytest.raises(TypeError):
        fj.METRIC_REDUCTIONS["pg_loss"] = "sum"


@pytest.mark.parametrize("mode", fj.core.losses.LOSS_MODES)
def test_ratio_metrics_outside_the_loss_equal_the_loss_metrics(mode):
    """The trainer's path — `importance_ratio` on the loss inputs, then `ratio_quantiles` /
    `ratio_fractions` outside the differentiated function — gives the loss's own metrics exactly."""
    rng = np.random.default_rng(7)
    shape = (4, 9)
    old = jnp.asarray(rng.normal(-2.0, 0.5, shape), jnp.float32)
    lp = old + jnp.asarray(rng.normal(0.0, 1.5, shape), jnp.float32)
    adv = jnp.asarray([1.0, -1.0, 0.5, -2.0], jnp.float32)
    mask = jnp.asarray(np.arange(9)[None, :] < np.array([9, 7, 0, 5])[:, None])
    config = fj.PolicyLossConfig(loss_mode=mode)
    _, metrics = jax.jit(lambda *a: fj.policy_loss_terms(*a, config))(lp, old, adv, mask)
    _, without = jax.jit(lambda *a: fj.policy_loss_terms(*a, config, ratio_quantiles=False))(lp, old, adv, mask)
    ratio = jax.jit(fj.importance_ratio, static_argnums=3)(lp, old, mask, config.log_ratio_clamp)
    adv_BxT = jnp.broadcast_to(adv[:, None], shape)
    outside = jax.jit(fj.core.loss_metrics.ratio_quantiles)(ratio, adv_BxT, mask)
    assert set(outside) | set(without) == set(metrics) and not set(outside) & set(without)
    for key, value in outside.items():  # order statistics exactly; interpolation up to XLA's fusion
        np.testing.assert_allclose(value, metrics[key], rtol=0 if key.endswith(("_min", "_max")) else 1e-6,
                                   err_msg=key)
    for key, value in fj.core.loss_metrics.ratio_fractions(ratio, adv_BxT, mask, config.clip_ratio_c).items():
        assert float(value) == float(metrics[key]), key
    grad = jax.grad(lambda x: jnp.sum(fj.importance_ratio(x, old, mask, 20.0)))(lp)
    assert not np.any(np.asarray(grad))  # stop-gradient


@pytest.mark.parametrize("shape", [(0, 4), (2, 0)])
def test_empty_batches_are_named(shape):
    z = jnp.zeros(shape)
    message = f"log_probs [B, T] must hold at least one row and one token, got shape {shape}"
    with pytest.raises(ValueError, match=re.escape(message)):
        fj.policy_loss(z, z, z, jnp.ones(shape), fj.PolicyLossConfig())
