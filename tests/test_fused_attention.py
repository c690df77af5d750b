"""`fused_attention` (`jax.nn.dot_product_attention`) equals our attention for every mask kind —
causal, left padding, packed segments, sliding window, GQA and MQA, a KV-cache call — on CPU with
JAX's reference lowering; `tests/test_fused_attention_gpu.py` checks the cuDNN kernel on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fipo_jax.models.attention import AttentionMask, fused_attention, grouped_query_attention
from fipo_jax.models.decoder import positions_from_mask

B, T, K = 2, 12, 8


def qkv(heads, kv_heads, seed=0, length=T):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (B, length, heads, K))
    k, v = (jax.random.normal(x, (B, kv_heads, length, K)) for x in keys[1:])
    return q, k, v


def full_mask(valid_BxT, segments_BxT=None):
    """The mask of a full forward (query t at slot t), positions counting real tokens per segment."""
    valid = jnp.asarray(valid_BxT)
    if segments_BxT is None:
        positions = positions_from_mask(valid)
        segments = None
    else:
        segments = jnp.asarray(segments_BxT)
        starts = jnp.concatenate([jnp.ones((B, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
        index = jnp.broadcast_to(jnp.arange(valid.shape[1]), valid.shape)
        positions = index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return AttentionMask(jnp.arange(valid.shape[1], dtype=jnp.int32), valid, positions, positions, segments, segments)


CASES = {
    "causal": dict(valid=np.ones((B, T), bool)),
    "left padding": dict(valid=np.arange(T)[None] >= np.array([[0], [5]])),
    "segments": dict(valid=np.arange(T)[None] < np.array([[T], [9]]),
                     segments=np.array([[0] * 5 + [1] * 7, [0] * 3 + [1] * 6 + [-1] * 3])),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (2, 2)])
def test_fused_attention_equals_grouped_query_attention(case, window, heads, kv_heads):
    q, k, v = qkv(heads, kv_heads)
    mask = full_mask(CASES[case]["valid"], CASES[case].get("segments"))
    expected = grouped_query_attention(q, k, v, mask, K**-0.5, window)
    got = fused_attention(q, k, v, mask, K**-0.5, window, implementation="xla")
    real = np.asarray(mask.key_valid_BxS)[:, :, None, None]  # padding rows: any finite value
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, expected, 0), atol=2e-5, rtol=2e-5)
    assert np.all(np.isfinite(np.asarray(got)))


def test_a_cache_call_and_gradients_go_through_the_general_mask():
    q, k, v = qkv(4, 2, seed=3, length=T)
    valid = jnp.asarray(np.arange(T)[None] < np.array([[T], [7]]))
    positions = positions_from_mask(valid)
    mask = AttentionMask(jnp.arange(4, 8, dtype=jnp.int32), valid, positions[:, 4:8], positions)  # queries at 4 … 7
    expected = grouped_query_attention(q[:, 4:8], k, v, mask, K**-0.5, 3)
    got = fused_attention(q[:, 4:8], k, v, mask, K**-0.5, 3, implementation="xla")
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=2e-5)
    causal = full_mask(np.ones((B, T), bool))
    grads = [jax.grad(lambda q, fn=fn: jnp.sum(fn(q) ** 2))(q) for fn in (
        lambda q: grouped_query_attention(q, k, v, causal, K**-0.5, 4),
        lambda q: fused_attention(q, k, v, causal, K**-0.5, 4, implementation="xla"))]
    np.testing.assert_allclose(grads[1], grads[0], atol=1e-4, rtol=1e-4)


def test_only_a_known_plain_causal_mask_takes_the_kernels_own_masking():
    from fipo_jax.models.attention import _is_plain_causal

    assert _is_plain_causal(full_mask(np.ones((B, T), bool)))
    assert not any(_is_plain_causal(full_mask(c["valid"], c.get("segments"))) for c in list(CASES.values())[1:])
    assert not jax.jit(lambda m: _is_plain_causal(m))(full_mask(np.ones((B, T), bool)))  # traced: general path


def test_bad_implementation_and_traced_window_are_one_line_errors():
    q, k, v = qkv(2, 2)
    mask = full_mask(np.ones((B, T), bool))
    with pytest.raises(ValueError, match=r"implementation must be one of \('xla', 'cudnn'\), got 'flash'"):
        fused_attention(q, k, v, mask, 1.0, None, implementation="flash")
    with pytest.raises(TypeError, match="static int window"):
        jax.jit(lambda w: fused_attention(q, k, v, mask, 1.0, w))(4)
