"""Packed sequences in the model: segment ids keep attention inside each sequence and restart
positions, so a packed row computes what each of its sequences computes alone."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fipo_jax.models import CausalLM, ModelConfig, positions_from_mask

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.3)


def test_positions_restart_in_every_segment():
    mask = jnp.array([[1, 1, 1, 0, 1, 1, 1, 1, 0, 0]], bool)
    segments = jnp.array([[0, 0, 0, 0, 1, 1, 2, 2, 2, 2]])
    # A pad inside a segment keeps the previous real token's position (its key is masked anyway).
    assert positions_from_mask(mask, segment_ids_BxT=segments).tolist() == [[0, 1, 2, 2, 0, 1, 0, 1, 1, 1]]
    assert positions_from_mask(mask).tolist() == [[0, 1, 2, 2, 3, 4, 5, 6, 6, 6]]


@pytest.mark.parametrize("extra", [
    {},
    {"attention_chunk_size": 4},  # query-chunked attention
    {"layer_types": ("sliding_attention", "full_attention"), "sliding_window": 3},
    {"remat": True},  # the scanned layer stack
], ids=["full", "chunked", "sliding", "remat"])
def test_a_packed_row_equals_each_sequence_alone(extra):
    model = CausalLM(ModelConfig(**BASE, **extra), rngs=nnx.Rngs(0))
    rng = np.random.RandomState(0)
    first, second, third = (rng.randint(1, 64, n) for n in (7, 5, 3))
    # Two packed rows with trailing padding; the padding gets a segment of its own.
    ids = np.zeros((2, 14), np.int32)
    ids[0, :12] = np.r_[first, second]
    ids[1, :8] = np.r_[third, second]
    segments = np.array([[0] * 7 + [1] * 5 + [2] * 2, [5] * 3 + [6] * 5 + [7] * 6])
    mask = ids != 0
    forward = nnx.jit(lambda m, *args, **kwargs: m(*args, **kwargs))  # eager, the layer paths take ~10 s
    packed = forward(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), segment_ids=jnp.asarray(segments))
    for row, start, tokens in [(0, 0, first), (0, 7, second), (1, 0, third), (1, 3, second)]:
        alone = forward(model, jnp.asarray(tokens[None]))
        np.testing.assert_allclose(packed[row, start:start + len(tokens)], alone[0], atol=1e-5)


def test_segment_ids_are_checked():
    model = CausalLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
    ids = jnp.ones((1, 6), jnp.int32)
    with pytest.raises(ValueError, match=r"segment_ids must be an integer array of shape \(1, 6\)"):
        model(ids, segment_ids=jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(TypeError):  # packed rows are for the full forward: the cached call has no segment ids
        model.extend(ids, model.init_kv_cache(1, 8), segment_ids=jnp.zeros((1, 6), jnp.int32))


def test_segment_helpers():
    from fipo_jax.core.segments import segment_cumsum, segment_runs, segment_starts

    ids = jnp.array([[4, 4, 7, 7, 7, 4, 9]])
    assert segment_starts(ids).tolist() == [[True, False, True, False, False, True, True]]
    assert segment_runs(ids).tolist() == [[0, 0, 1, 1, 1, 2, 3]]  # the reused id 4 is a new segment
    assert segment_cumsum(jnp.array([[1, 1, 1, 0, 1, 1, 1]]), ids).tolist() == [[1, 2, 1, 1, 2, 1, 1]]


@pytest.mark.slow
def test_packed_log_probs_equal_each_sequence_alone():
    from fipo_jax.generation.logprobs import sequence_log_probs

    model = CausalLM(ModelConfig(**BASE, attention_chunk_size=4), rngs=nnx.Rngs(1))
    rng = np.random.RandomState(1)
    first, second = rng.randint(1, 64, 6), rng.randint(1, 64, 9)
    ids = np.zeros((1, 18), np.int32)
    ids[0, :15] = np.r_[first, second]
    segments = np.array([[0] * 6 + [1] * 9 + [2] * 3])
    packed = nnx.jit(lambda m, i, a, s: sequence_log_probs(m, i, a, segment_ids_BxT=s))(
        model, jnp.asarray(ids), jnp.asarray(ids != 0), jnp.asarray(segments))
    # Column j scores token j + 1; a segment's first token has nothing before it: unscored (0).
    for start, tokens in [(0, first), (6, second)]:
        alone = nnx.jit(lambda m, i: sequence_log_probs(m, i))(model, jnp.asarray(tokens[None]))
        np.testing.assert_allclose(packed[0, start:start + len(tokens) - 1], alone[0], atol=1e-5)
    assert float(packed[0, 5]) == 0.0 and np.all(np.asarray(packed[0, 14:]) == 0.0)


# ------------------------------------------------------------------ first-fit decreasing packing

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fipo_jax.core import packing as packing_lib  # noqa: E402


@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=60), budget=st.integers(40, 128))
def test_first_fit_decreasing_places_every_token_once_within_budget(lengths, budget):
    lengths = np.asarray(lengths)
    packed = packing_lib.first_fit_decreasing(lengths, budget)
    values = np.arange(1, len(lengths) * 40 + 1).reshape(len(lengths), 40)
    rows = packing_lib.pack(values, packed)
    assert rows.shape == (packed.num_rows, budget)
    # Every token once: the packed non-zero values are exactly the sequences' tokens.
    expected = np.concatenate([values[i, :n] for i, n in enumerate(lengths)] + [np.zeros(0, int)])
    assert sorted(rows[rows != 0].tolist()) == sorted(expected.tolist())
    unpacked = packing_lib.unpack(rows, packed, 40)
    assert all(np.array_equal(unpacked[i, :n], values[i, :n]) for i, n in enumerate(lengths))
    segments = packing_lib.segment_ids(packed)
    assert ((segments == packing_lib.PADDING_SEGMENT) == (rows == 0)).all()
    # First fit: the first sequence of a later row did not fit any earlier row, so at most one
    # row is at most half full (hence rows ≤ 2·Σ / budget + 1).
    fill = np.bincount(packed.rows[lengths > 0], lengths[lengths > 0], minlength=packed.num_rows)
    assert (fill <= budget / 2).sum() <= 1
    again = packing_lib.first_fit_decreasing(lengths, budget)
    assert np.array_equal(again.rows, packed.rows) and np.array_equal(again.starts, packed.starts)


def test_packing_hand_case_and_errors():
    packed = packing_lib.first_fit_decreasing([3, 8, 5, 2], 10)
    # Decreasing: 8 → row 0; 5 → row 1; 3 → row 1 (5 + 3); 2 → row 0 (8 + 2).
    assert packed.rows.tolist() == [1, 0, 1, 0] and packed.starts.tolist() == [5, 0, 0, 8]
    assert packed.num_rows == 2 and packed.padding_fraction == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"sequences \[1\] have \[12\] tokens, more than the row budget of 10"):
        packing_lib.first_fit_decreasing([3, 12], 10)
    with pytest.raises(ValueError, match="non-negative ints"):
        packing_lib.first_fit_decreasing([3.0, 1.0], 10)
