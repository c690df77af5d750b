"""Group advantages and the dynamic-sampling mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fipo_jax as fj
from tests.test_losses import GOLDEN_CASES


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_grpo_advantages(golden_dir, name):
    data = np.load(f"{golden_dir}/{name}.npz")
    # The official reward sits on the last response token; an empty response has none,
    # so its summed score is 0 (the golden row 1 has length 0).
    scores = data["scores"] * (data["lengths"] > 0)
    adv = fj.broadcast_to_tokens(fj.grpo_advantages(scores, group_size=4), data["mask"])
    np.testing.assert_allclose(adv, data["advantages"], rtol=1e-5, atol=1e-7)


def test_hand_computed():
    # group [1, -1, -1, -1]: mean −0.5, unbiased std 1
    np.testing.assert_allclose(fj.grpo_advantages(jnp.array([1.0, -1, -1, -1]), 4), [1.5, -0.5, -0.5, -0.5], rtol=1e-5)
    np.testing.assert_allclose(fj.dr_grpo_advantages(jnp.array([1.0, -1, -1, -1]), 4), [1.5, -0.5, -0.5, -0.5])
    np.testing.assert_allclose(fj.dr_grpo_advantages(jnp.array([2.0, 0.0]), 2), [1.0, -1.0])
    # RLOO: s_i − mean of the others
    np.testing.assert_allclose(fj.rloo_advantages(jnp.array([1.0, 0.0, 0.0]), 3), [1.0, -0.5, -0.5])
    # all-equal group: zero advantage, finite
    np.testing.assert_allclose(fj.grpo_advantages(jnp.array([1.0, 1.0, 1.0]), 3), [0.0, 0.0, 0.0])
    # group of one: mean 0, std 1 (official)
    np.testing.assert_allclose(fj.grpo_advantages(jnp.array([1.0, -1.0]), 1), [1 / (1 + 1e-6), -1 / (1 + 1e-6)])
    np.testing.assert_allclose(fj.rloo_advantages(jnp.array([1.0, -1.0]), 1), [1.0, -1.0])


@given(groups=st.integers(1, 5), group_size=st.integers(2, 8), seed=st.integers(0, 2**31 - 1))
@pytest.mark.slow
def test_against_numpy(groups, group_size, seed):
    scores = np.random.default_rng(seed).choice([-1.0, 0.0, 0.5, 1.0], size=groups * group_size).astype(np.float32)
    s = scores.reshape(groups, group_size)
    expected = (s - s.mean(1, keepdims=True)) / (s.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(fj.grpo_advantages(scores, group_size), expected.reshape(-1), rtol=1e-5, atol=1e-5)
    loo = s - (s.sum(1, keepdims=True) - s) / (group_size - 1)
    np.testing.assert_allclose(fj.rloo_advantages(scores, group_size), loo.reshape(-1), rtol=1e-5, atol=1e-5)


def test_dynamic_sampling_mask():
    outcomes = jnp.array([1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0], bool)
    assert fj.dynamic_sampling_mask(outcomes, 3).tolist() == [False, False, True, True]
    # Shaped scores with equal correctness (overlong penalty) must not keep a group:
    assert fj.dynamic_sampling_mask(jnp.array([1.0, 1.0]), 2).tolist() == [False]
    assert fj.dynamic_sampling_mask(jnp.array([1, 0]), 1).tolist() == [False, False]


def test_jit_and_vmap():
    scores = jnp.arange(12.0)
    jitted = jax.jit(fj.grpo_advantages, static_argnames="group_size")(scores, group_size=4)
    np.testing.assert_allclose(jitted, fj.grpo_advantages(scores, 4), rtol=1e-6)
    batched = jax.vmap(lambda s: fj.grpo_advantages(s, 4))(jnp.stack([scores, -scores]))
    np.testing.assert_allclose(batched[1], -batched[0], rtol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fj.grpo_advantages(jnp.zeros(10), 4), "10 rows, not a multiple of group_size=4"),
        (lambda: fj.grpo_advantages(jnp.zeros((4, 2)), 2), r"scores must have rank 1 \(\[B\] one score per response\)"),
        (lambda: fj.grpo_advantages(jnp.zeros(4), 0), "group_size must be a positive int"),
        (lambda: fj.grpo_advantages(jnp.zeros(4), 2, epsilon=-1.0), "epsilon must be a number >= 0"),
        (lambda: fj.dynamic_sampling_mask(jnp.zeros(5), 2), "outcomes has 5 rows"),
        (lambda: fj.broadcast_to_tokens(jnp.zeros(3), jnp.ones((2, 4))), "mask has 2 rows but advantages has 3"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
