"""Per-token diagnostics are the loss's own quantities: they reproduce policy_loss's metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fipo_jax as fj
from fipo_jax.core.losses import token_diagnostics


def _batch(seed=0, b=6, t=40):
    rng = np.random.default_rng(seed)
    old = np.log(rng.uniform(0.05, 1.0, (b, t))).astype(np.float32)
    shift = rng.normal(0, 0.6, (b, t)).astype(np.float32)
    shift[0, 5] = 4.0  # r ≈ 55 > c = 10: filtered, dual-clipped where A < 0
    shift[1, 3] = shift[1, 9] = 3.0  # two dual-clipped tokens: row 1 dropped (A < 0)
    new = old + shift
    advantages = np.array([-1.0, -0.5, 0.7, 1.2, -0.3, 0.0], np.float32)
    lengths = np.array([40, 30, 25, 40, 12, 1])
    mask = np.arange(t)[None] < lengths[:, None]
    return jnp.asarray(new), jnp.asarray(old), jnp.asarray(advantages), jnp.asarray(mask)


@pytest.mark.parametrize("config", [fj.PolicyLossConfig(), fj.PolicyLossConfig.fipo_7b(decay_rate=4.0),
                                    fj.PolicyLossConfig(future_kl_filter=False, safety_threshold=2.0)])
def test_fipo_diagnostics_reproduce_the_loss_metrics(config):
    lp, old, adv, mask = _batch()
    diag = jax.jit(token_diagnostics, static_argnums=4)(lp, old, adv, mask, config)
    _, metrics = fj.policy_loss(lp, old, adv, mask, config)
    m = np.asarray(mask)
    weights = np.asarray(diag.weights)
    np.testing.assert_allclose(weights[m].mean(), metrics["influence_weights_mean"], rtol=1e-6)
    np.testing.assert_allclose(weights[m].max(), metrics["influence_weights_max"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(diag.raw_weights)[m].mean(), metrics["influence_weights_mean_raw"],
                               rtol=1e-6)
    assert np.asarray(diag.dual_clipped).sum() / m.sum() == pytest.approx(float(metrics["pg_clipfrac_lower"]))
    assert int(np.asarray(diag.dropped_rows).sum()) == int(metrics["dropped_sequences"])
    assert int(np.asarray(diag.filtered).sum()) == int(metrics["filtered_tokens"])
    assert int(np.asarray(diag.safety_clamped).sum()) == int(metrics["safety_clamped_tokens"])
    active = (np.abs(weights - 1) > fj.core.losses.ACTIVE_WEIGHT_TOLERANCE) & np.asarray(diag.loss_mask)
    assert int(active.sum()) == int(metrics["influence_active_tokens"]) and active.sum() > 0
    assert int(np.asarray(diag.loss_mask).sum()) == int(metrics["loss_tokens"])
    # FutureKL is `future_kl` of Δlog p, with the filter as configured.
    expected = fj.future_kl(diag.log_ratio, mask, config.decay_rate,
                            filter_threshold=config.clip_ratio_c if config.future_kl_filter else None)
    np.testing.assert_allclose(diag.future_kl, expected, rtol=1e-6, atol=1e-6)
    assert bool(np.asarray(diag.filtered)[0, 5]) == config.future_kl_filter
    assert not np.asarray(diag.filtered)[~m].any() and (weights[~m] == 1).all()


def test_dapo_and_grpo_weights_are_one_and_grpo_has_no_dual_clip():
    lp, old, adv, mask = _batch(1)
    dapo = token_diagnostics(lp, old, adv, mask, fj.PolicyLossConfig.dapo())
    assert (np.asarray(dapo.weights) == 1).all() and np.asarray(dapo.dual_clipped).any()
    assert not np.asarray(dapo.dropped_rows).any()  # DAPO keeps E8 off
    grpo = token_diagnostics(lp, old, adv, mask, fj.PolicyLossConfig.grpo())
    assert not np.asarray(grpo.dual_clipped).any() and not np.asarray(grpo.safety_clamped).any()
    # FutureKL is still reported (what FIPO would do), identical across modes.
    np.testing.assert_allclose(dapo.future_kl, grpo.future_kl)


def test_bad_inputs_are_named_as_in_the_loss():
    lp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match=r"old_log_probs has shape \(6, 39\)"):
        token_diagnostics(lp, old[:, :-1], adv, mask, fj.PolicyLossConfig())


def test_views_colour_each_token_and_carry_the_diagnostics(tmp_path):
    from fipo_jax.train.views import TokenView, influence_html, influence_png, weight_colour

    lp, old, adv, mask = _batch()
    diag = token_diagnostics(lp, old, adv, mask, fj.PolicyLossConfig(decay_rate=4.0))
    tokens = [f"t{i}<" if i % 7 else "\n" for i in range(30)]
    views = [TokenView.from_diagnostics(diag, row, tokens, title=f"row {row}") for row in (0, 1)]
    page = influence_html(views)
    assert page.count("<span style=") == 60 + 5  # 2 × 30 tokens + the legend
    assert "t1&lt;" in page and "t1<" not in page  # token text is escaped
    first = views[0]
    assert f"Δlog p = {first.log_ratio[5]:+.4f}" in page and "filtered" in page and "dual-clipped" in page
    assert "dropped from the loss (E8)" in page  # row 1 has two dual-clipped tokens and A < 0
    assert weight_colour(1.0) == (1.0, 1.0, 1.0) and weight_colour(1.3)[0] == 1.0 and weight_colour(0.7)[2] == 1.0
    path = influence_png(views[0], str(tmp_path / "v.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"TokenView\.weights must have one value per token \(2\)"):
        TokenView(("a", "b"), *(np.zeros(2),) * 3, np.zeros(3), *(np.zeros(2, bool),) * 3, 0.0, False)
