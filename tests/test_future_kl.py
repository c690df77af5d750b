"""Future-KL: hand-computed cases, every method against an obvious O(T²) float64 reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import fipo_jax as fj
from fipo_jax.core.future_kl import METHODS

FAST_METHODS = ("scan", "associative", "blocked")


def naive_future_kl(delta, mask, decay_rate, threshold=None, rows_per_chunk=1024):
    """Σ_{k≥t} γ^{k−t} x_k written out as a dense triangular matrix, in float64."""
    delta = np.asarray(delta, np.float64)
    x = np.where(np.asarray(mask) != 0, delta, 0.0)
    if threshold is not None:
        x = np.where(delta <= math.log(threshold), x, 0.0)
    t = x.shape[-1]
    powers = (2.0 ** (-1.0 / decay_rate)) ** np.arange(t)  # γ^d, d = k − t
    out = np.zeros_like(x)
    for start in range(0, t, rows_per_chunk):
        rows = np.arange(start, min(t, start + rows_per_chunk))[:, None]
        dist = np.arange(start, t)[None, :] - rows  # only k ≥ start can contribute
        decay = np.where(dist >= 0, powers[np.maximum(dist, 0)], 0.0)
        out[..., start : start + rows_per_chunk] = x[..., start:] @ decay.T
    return out


def recurrence_future_kl(delta, mask, decay_rate, threshold=None):
    """F_t = x_t + γ F_{t+1} in float64: the O(T) reference for the longest rows."""
    delta = np.asarray(delta, np.float64)
    x = np.where(np.asarray(mask) != 0, delta, 0.0)
    if threshold is not None:
        x = np.where(delta <= math.log(threshold), x, 0.0)
    return _reverse_recurrence(x, 2.0 ** (-1.0 / decay_rate))


def _reverse_recurrence(x, gamma):
    out = np.zeros_like(x)
    acc = np.zeros(x.shape[:-1])
    for t in range(x.shape[-1] - 1, -1, -1):
        acc = x[..., t] + gamma * acc
        out[..., t] = acc
    return out


_jitted = jax.jit(fj.future_kl, static_argnames=("method", "block_size"))


def discounted_abs(delta, mask, decay_rate):
    """Σ_{k≥t} γ^{k−t} |x_k|: the scale against which float32 rounding is judged."""
    x = np.abs(np.where(np.asarray(mask) != 0, np.asarray(delta, np.float64), 0.0))
    return _reverse_recurrence(x, 2.0 ** (-1.0 / decay_rate))


def assert_exact(actual, expected, scale):
    """Error within a few float32 ulps of the summed magnitudes."""
    np.testing.assert_array_less(np.abs(np.asarray(actual, np.float64) - expected), 1e-5 * scale + 1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("jit", [False, True])
def test_hand_computed(method, jit):
    # γ = 1/2: F = [0.1 + 0.2/2 + 0.3/4, 0.2 + 0.3/2, 0.3]
    fn = jax.jit(fj.future_kl, static_argnames=("method",)) if jit else fj.future_kl
    f = fn(jnp.array([[0.1, 0.2, 0.3]]), jnp.ones((1, 3)), 1.0, method=method)
    np.testing.assert_allclose(f, [[0.275, 0.35, 0.3]], rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_mask_and_one_sided_filter(method):
    delta = jnp.array([[math.log(20.0), 0.5, -20.0, 0.4, 0.7]])
    mask = jnp.array([[1, 1, 1, 1, 0]])
    f = fj.future_kl(delta, mask, decay_rate=1.0, filter_threshold=10.0, method=method)
    # log 20 > log 10 is filtered; −20 (tiny ratio) is not; the padded 0.7 never counts.
    x = [0.0, 0.5, -20.0, 0.4, 0.0]
    expected = [x[0] + x[1] / 2 + x[2] / 4 + x[3] / 8, x[1] + x[2] / 2 + x[3] / 4, x[2] + x[3] / 2, x[3], 0.0]
    np.testing.assert_allclose(f[0], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@given(
    length=st.sampled_from([1, 2, 7, 128, 129, 300]),  # few static shapes: compile once each
    decay_rate=st.floats(0.3, 600.0),
    threshold=st.one_of(st.none(), st.floats(1.05, 50.0)),
    scale=st.sampled_from([0.01, 0.3, 5.0]),
    seed=st.integers(0, 2**31 - 1),
    block_size=st.sampled_from([7, 128]),
)
def test_methods_match_quadratic_reference(length, decay_rate, threshold, scale, seed, block_size):
    rng = np.random.default_rng(seed)
    delta = (rng.normal(size=(3, length)) * scale).astype(np.float32)
    # Random right-padded lengths plus random holes inside the responses.
    lengths = rng.integers(0, length + 1, size=(3, 1))
    mask = (np.arange(length)[None, :] < lengths) & (rng.random((3, length)) < rng.uniform(0.3, 1.0))
    expected = naive_future_kl(delta, mask, decay_rate, threshold)
    scale_ = discounted_abs(delta, mask, decay_rate)
    for method in FAST_METHODS:
        got = _jitted(delta, mask, decay_rate, threshold, method=method, block_size=block_size)
        assert got.dtype == jnp.float32
        assert_exact(got, expected, scale_)


@pytest.mark.parametrize("length, reference", [(20_000, naive_future_kl), (32_768, recurrence_future_kl)])
def test_long_sequences_are_exact(length, reference):
    rng = np.random.default_rng(length)
    delta = (rng.normal(size=(2, length)) * 0.2).astype(np.float32)
    delta[0, ::97] = 5.0  # some filtered extremes
    mask = np.ones((2, length), bool)
    mask[1, length // 3 :] = False
    expected = reference(delta, mask, 32.0, 10.0)
    scale = discounted_abs(delta, mask, 32.0)
    for method in FAST_METHODS:
        assert_exact(_jitted(delta, mask, 32.0, 10.0, method=method), expected, scale)


@pytest.mark.parametrize("method", FAST_METHODS)
def test_traced_decay_rate_vmaps(method):
    """An ablation over τ can be one vmapped call."""
    delta = jnp.asarray(np.random.default_rng(0).normal(size=(2, 50)), jnp.float32)
    taus = jnp.array([4.0, 32.0, 256.0])
    batched = jax.jit(jax.vmap(lambda tau: fj.future_kl(delta, jnp.ones_like(delta), tau, method=method)))(taus)
    for i, tau in enumerate([4.0, 32.0, 256.0]):
        np.testing.assert_allclose(batched[i], naive_future_kl(delta, np.ones((2, 50)), tau), atol=2e-5)


@pytest.mark.parametrize("method", FAST_METHODS)
def test_leading_axes_and_vmap_over_batch(method):
    delta = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2, 40)), jnp.float32)
    mask = jnp.ones_like(delta)
    full = _jitted(delta, mask, 8.0, method=method)
    mapped = jax.jit(jax.vmap(lambda d, m: fj.future_kl(d, m, 8.0, method=method)))(delta, mask)
    np.testing.assert_allclose(full, mapped, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_gradients(method):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 37)), jnp.float32)
    check_grads(jax.jit(lambda v: fj.discounted_reverse_cumsum(v, 0.9, method, 8)), (x,), order=1, modes=("rev",),
                atol=1e-2, rtol=1e-2)


def test_bfloat16_input_is_computed_in_float32():
    delta = jnp.full((1, 64), 0.01, jnp.bfloat16)
    f = fj.future_kl(delta, jnp.ones((1, 64), bool), 32.0)
    assert f.dtype == jnp.float32


def test_zero_length():
    assert fj.future_kl(jnp.zeros((2, 0)), jnp.zeros((2, 0)), 32.0).shape == (2, 0)


def test_auto_method_is_a_known_method():
    assert fj.future_kl.__module__ == "fipo_jax.core.future_kl"
    from fipo_jax.core.future_kl import default_method

    assert default_method() in FAST_METHODS


def test_default_methods_are_the_measured_ones():
    """CPU: the sequential scan (2-core CPU); GPU: associative (H200: 42x faster than blocked/128);
    TPU unmeasured, same choice as the GPU; an unknown backend gets the accelerator choice."""
    from fipo_jax.core.future_kl import default_method

    assert [default_method(b) for b in ("cpu", "gpu", "tpu", "rocm")] == ["scan", "associative", "associative",
                                                                        "associative"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mask=jnp.ones((2, 4))), ValueError, r"mask has shape \(2, 4\) but delta_log_probs has shape \(2, 5\)"),
        (dict(delta_log_probs=jnp.ones((2, 5), jnp.int32)), TypeError, "delta_log_probs must be a floating-point"),
        (dict(delta_log_probs=jnp.float32(1.0), mask=jnp.float32(1.0)), ValueError, "delta_log_probs must have rank >= 1"),
        (dict(decay_rate=0.0), ValueError, "decay_rate must be a finite number > 0"),
        (dict(decay_rate=-3.0), ValueError, "decay_rate must be a finite number > 0"),
        (dict(filter_threshold=0.0), ValueError, "filter_threshold must be a finite number > 0"),
        (dict(method="fast"), ValueError, "method must be one of"),
        (dict(mask=jnp.ones((2, 5), jnp.complex64)), TypeError, "mask must be a bool or numeric"),
    ],
)
def test_errors_name_the_problem(kwargs, error, match):
    args = dict(delta_log_probs=jnp.zeros((2, 5)), mask=jnp.ones((2, 5)), decay_rate=32.0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fj.future_kl(**args)


# ------------------------------------------------------------------ packed rows: segment ids


def per_segment_reference(delta, mask, decay_rate, threshold, segment_ids):
    """Each run of equal ids on its own through the float64 reference, put back in place."""
    out = np.zeros(delta.shape, np.float64)
    for row in range(delta.shape[0]):
        starts = np.flatnonzero(np.r_[True, segment_ids[row, 1:] != segment_ids[row, :-1]])
        for start, end in zip(starts, np.r_[starts[1:], delta.shape[1]]):
            out[row, start:end] = naive_future_kl(delta[row:row + 1, start:end], mask[row:row + 1, start:end],
                                                  decay_rate, threshold)[0]
    return out


# τ and the threshold traced: one compilation per (length, block, method, filter on/off), shared by examples.
_future_kl_jit = jax.jit(fj.future_kl, static_argnames=("method", "block_size"))


@settings(max_examples=15)  # four methods per example: the CI profile's 40 cost 30 s
@pytest.mark.slow
@given(
    length=st.sampled_from([1, 7, 128, 300]),
    decay_rate=st.floats(0.3, 600.0),
    threshold=st.one_of(st.none(), st.floats(1.05, 50.0)),
    seed=st.integers(0, 2**31 - 1),
    block_size=st.sampled_from([7, 128]),
)
def test_segments_restart_the_sum_in_every_method(length, decay_rate, threshold, seed, block_size):
    rng = np.random.default_rng(seed)
    delta = (rng.normal(size=(3, length)) * 0.5).astype(np.float32)
    mask = rng.random((3, length)) < 0.8
    # Runs of random lengths; ids may repeat later in a row (a new run all the same).
    segment_ids = np.cumsum(rng.random((3, length)) < rng.uniform(0.01, 0.3), axis=1) % 3
    expected = per_segment_reference(delta, mask, decay_rate, threshold, segment_ids)
    scale = discounted_abs(delta, mask, decay_rate)
    for method in METHODS:
        got = _future_kl_jit(delta, mask, decay_rate, threshold, method=method, block_size=block_size,
                             segment_ids=jnp.asarray(segment_ids))
        assert_exact(got, expected, scale)


@pytest.mark.parametrize("method", METHODS)
def test_a_huge_drift_does_not_reach_the_previous_sequence(method):
    delta = np.full((1, 40), 0.01, np.float32)
    delta[0, 20] = 1e4  # first token of the second packed sequence
    segment_ids = np.repeat(np.array([[0, 1]]), 20, axis=1)
    alone = fj.future_kl(delta[:, :20], np.ones((1, 20)), 32.0, method=method, block_size=8)
    packed = fj.future_kl(delta, np.ones((1, 40)), 32.0, method=method, block_size=8, segment_ids=segment_ids)
    # A leak would add 1e4·γ^k ≥ 6e3 to every earlier token; equal up to float32 rounding.
    np.testing.assert_allclose(np.asarray(packed[:, :20]), np.asarray(alone), rtol=1e-6)
    assert float(packed[0, 20]) > 1e3


def test_segment_ids_are_checked():
    with pytest.raises(ValueError, match=r"segment_ids must be an integer array of shape \(2, 5\)"):
        fj.future_kl(jnp.zeros((2, 5)), jnp.ones((2, 5)), 32.0, segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must be an integer array"):
        fj.future_kl(jnp.zeros((2, 5)), jnp.ones((2, 5)), 32.0, segment_ids=jnp.zeros((2, 5)))
