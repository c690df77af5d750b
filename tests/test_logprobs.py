"""Chunked token log-probs: equal to full-logits log_softmax (values, entropy, gradients),
temperature, ragged chunking, jit, memory bound, and the model-level teacher-forced wrapper."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from fipo_jax.generation.logprobs import (  # noqa: E402
    chunked_token_log_probs,
    chunked_token_log_probs_with_entropy,
    full_logits_token_log_probs,
    full_logits_token_log_probs_with_entropy,
    sequence_log_probs,
    sequence_log_probs_with_entropy,
)
from fipo_jax.models import Qwen2Config, CausalLM  # noqa: E402

B, T, D, V = 2, 13, 8, 37


def make_inputs(seed=0, batch=B, seq=T, dim=D, vocab=V, scale=1.0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    hidden = scale * jax.random.normal(k1, (batch, seq, dim), jnp.float32)
    weight = scale * jax.random.normal(k2, (dim, vocab), jnp.float32)
    targets = jax.random.randint(k3, (batch, seq), 0, vocab, jnp.int32)
    return hidden, weight, targets


def naive(hidden, weight, targets, temperature=1.0):
    """Independent float64 NumPy reference: log-probs and entropy through full logits."""
    logits = np.einsum("btd,dv->btv", np.float64(hidden), np.float64(weight)) / temperature
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    chosen = np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1)[..., 0]
    entropy = -(np.exp(log_probs) * log_probs).sum(-1)
    return chosen, entropy


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 64], ids=lambda c: f"chunk{c}")
def test_values_and_entropy_match_naive(chunk_size):
    hidden, weight, targets = make_inputs()
    fn = jax.jit(lambda h, w, y: chunked_token_log_probs_with_entropy(h, w, y, chunk_size=chunk_size))
    log_probs, entropy = fn(hidden, weight, targets)
    ref_lp, ref_ent = naive(hidden, weight, targets)
    assert log_probs.shape == entropy.shape == (B, T) and log_probs.dtype == jnp.float32
    assert np.abs(ref_lp).max() > 1.0  # not a trivially uniform distribution
    np.testing.assert_allclose(log_probs, ref_lp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(entropy, ref_ent, atol=1e-5, rtol=0)
    assert np.all(np.asarray(entropy) >= 0) and np.all(np.asarray(entropy) <= np.log(V) + 1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature(temperature):
    hidden, weight, targets = make_inputs(seed=1)
    log_probs, entropy = chunked_token_log_probs_with_entropy(
        hidden, weight, targets, chunk_size=4, temperature=temperature
    )
    ref_lp, ref_ent = naive(hidden, weight, targets, temperature)
    np.testing.assert_allclose(log_probs, ref_lp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(entropy, ref_ent, atol=1e-5, rtol=0)
    # A traced temperature (e.g. a schedule inside jit) gives the same numbers.
    traced = jax.jit(lambda tau: chunked_token_log_probs(hidden, weight, targets, chunk_size=4, temperature=tau))
    np.testing.assert_allclose(traced(jnp.float32(temperature)), ref_lp, atol=1e-5, rtol=0)


def test_higher_temperature_raises_entropy():
    hidden, weight, targets = make_inputs(seed=2)
    entropies = [
        float(jnp.mean(chunked_token_log_probs_with_entropy(hidden, weight, targets, temperature=t)[1]))
        for t in (0.25, 1.0, 4.0)
    ]
    assert entropies[0] < entropies[1] < entropies[2] < np.log(V)


def test_default_chunk_size_is_about_512_tokens():
    hidden, weight, targets = make_inputs(seed=8, batch=3, seq=400)
    ref = naive(hidden, weight, targets)[0]  # C = 512 // 3 = 170: three chunks, the last ragged
    np.testing.assert_allclose(chunked_token_log_probs(hidden, weight, targets), ref, atol=1e-5, rtol=1e-6)


def test_full_logits_reference_agrees():
    hidden, weight, targets = make_inputs(seed=3)
    full = full_logits_token_log_probs_with_entropy(hidden, weight, targets, temperature=0.7)
    chunked = chunked_token_log_probs_with_entropy(hidden, weight, targets, chunk_size=3, temperature=0.7)
    for a, b in zip(full, chunked):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp+entropy"])
def test_gradients_match_full_logits(with_entropy):
    hidden, weight, targets = make_inputs(seed=4)
    cotangent = jax.random.normal(jax.random.key(5), (B, T))

    def loss(fn, h, w):
        out = fn(h, w, targets)
        if with_entropy:
            return jnp.sum(cotangent * out[0]) + 0.3 * jnp.sum(out[1])
        return jnp.sum(cotangent * out)

    chunked = jax.jit(jax.grad(
        lambda h, w: loss(lambda *a: (chunked_token_log_probs_with_entropy if with_entropy else chunked_token_log_probs)(*a, chunk_size=5), h, w),
        argnums=(0, 1),
    ))  # fmt: skip
    full = jax.jit(jax.grad(
        lambda h, w: loss(lambda *a: (full_logits_token_log_probs_with_entropy if with_entropy else full_logits_token_log_probs)(*a), h, w),
        argnums=(0, 1),
    ))  # fmt: skip
    for got, want in zip(chunked(hidden, weight), full(hidden, weight)):
        assert np.abs(np.asarray(want)).max() > 1e-2
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_gradient_against_finite_differences():
    """d logp / d h from autodiff equals a float64 finite difference of the NumPy reference."""
    hidden, weight, targets = make_inputs(seed=6, batch=1, seq=3)
    grad = jax.grad(lambda h: jnp.sum(chunked_token_log_probs(h, weight, targets, chunk_size=2)))(hidden)
    h64 = np.float64(hidden)
    eps = 1e-6
    for index in [(0, 0, 0), (0, 1, 3), (0, 2, 7)]:
        plus, minus = h64.copy(), h64.copy()
        plus[index] += eps
        minus[index] -= eps
        fd = (naive(plus, weight, targets)[0].sum() - naive(minus, weight, targets)[0].sum()) / (2 * eps)
        np.testing.assert_allclose(float(grad[index]), fd, atol=1e-4, rtol=1e-4)


def test_bfloat16_inputs_are_upcast():
    """bf16 hidden/weights: logits are computed in float32 from the bf16 values (exactly the
    float32 result on the rounded inputs), and gradients come back in the input dtypes."""
    hidden, weight, targets = make_inputs(seed=7)
    h16, w16 = hidden.astype(jnp.bfloat16), weight.astype(jnp.bfloat16)
    log_probs = chunked_token_log_probs(h16, w16, targets, chunk_size=4)
    assert log_probs.dtype == jnp.float32
    ref = naive(np.float32(h16.astype(jnp.float32)), np.float32(w16.astype(jnp.float32)), targets)[0]
    np.testing.assert_allclose(log_probs, ref, atol=1e-5, rtol=0)
    grads = jax.grad(lambda h, w: jnp.sum(chunked_token_log_probs(h, w, targets, chunk_size=4)), argnums=(0, 1))(h16, w16)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16


def test_empty_sequence():
    hidden, weight, targets = make_inputs(seq=0)
    log_probs, entropy = chunked_token_log_probs_with_entropy(hidden, weight, targets)
    assert log_probs.shape == entropy.shape == (B, 0)


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (dict(hidden=jnp.zeros((B, T), jnp.float32)), ValueError, "hidden_BxTxD must have rank 3"),
        (dict(weight=jnp.zeros((D + 1, V), jnp.float32)), ValueError, r"expected \[D, V\]"),
        (dict(weight=jnp.zeros((D, V), jnp.int32)), TypeError, "unembedding_DxV must be a floating"),
        (dict(targets=jnp.zeros((B, T + 1), jnp.int32)), ValueError, r"targets_BxT must have shape \[B, T\]"),
        (dict(targets=jnp.zeros((B, T), jnp.float32)), TypeError, "targets_BxT must be an integer"),
        (dict(chunk_size=0), ValueError, "chunk_size must be None or a positive int"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    ],
)
def test_input_validation(change, error, pattern):
    hidden, weight, targets = make_inputs()
    args = dict(hidden=hidden, weight=weight, targets=targets, chunk_size=4, temperature=1.0)
    args.update(change)
    with pytest.raises(error, match=pattern):
        chunked_token_log_probs(
            args["hidden"], args["weight"], args["targets"], chunk_size=args["chunk_size"], temperature=args["temperature"]
        )


def test_memory_far_below_full_logits():
    """Compiled temporary memory at B=1, T=2048, D=64, V=32000 (full logits: 262 MB f32),
    forward and forward+backward: the chunked version must stay within a few chunks."""
    shapes = (
        jax.ShapeDtypeStruct((1, 2048, 64), jnp.float32),
        jax.ShapeDtypeStruct((64, 32000), jnp.float32),
        jax.ShapeDtypeStruct((1, 2048), jnp.int32),
    )
    full_logits_bytes = 2048 * 32000 * 4

    def temp_bytes(fn):
        return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    def chunked(h, w, y):
        return jnp.sum(chunked_token_log_probs(h, w, y, chunk_size=128))

    def full(h, w, y):
        return jnp.sum(full_logits_token_log_probs(h, w, y))

    chunk_bytes = 128 * 32000 * 4
    for transform in (lambda f: f, lambda f: jax.grad(f, argnums=(0, 1))):
        ours, reference = temp_bytes(transform(chunked)), temp_bytes(transform(full))
        assert reference >= full_logits_bytes
        assert ours < 4 * chunk_bytes + 64 * 32000 * 4  # a few chunks + one f32 [D, V] gradient
        assert ours * 8 < reference, (ours, reference)


# ------------------------------------------------------------------------------------------
# Model-level wrapper
# ------------------------------------------------------------------------------------------

MODEL_VOCAB = 50


@pytest.fixture(scope="module")
def model():
    config = Qwen2Config(
        vocab_size=MODEL_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
    )  # fmt: skip
    return CausalLM(config, rngs=nnx.Rngs(0))


def naive_sequence_log_probs(model, ids, mask):
    """log softmax(logits[:, t-1])[ids[:, t]] from the model's full logits, per token."""
    logits = np.asarray(nnx.jit(lambda m, x, k: m(x, attention_mask=k))(model, ids, mask), np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return np.take_along_axis(log_probs[:, :-1], np.asarray(ids)[:, 1:, None], -1)[..., 0]


@nnx.jit(static_argnames=("response_start", "chunk_size", "return_entropy"))
def jitted_sequence_log_probs(model, ids, mask, response_start, chunk_size=4, return_entropy=False):
    fn = sequence_log_probs_with_entropy if return_entropy else sequence_log_probs
    return fn(model, ids, mask, response_start=response_start, chunk_size=chunk_size)


@pytest.mark.slow
def test_sequence_log_probs_alignment_and_masking(model):
    ids = jax.random.randint(jax.random.key(0), (3, 10), 0, MODEL_VOCAB, jnp.int32)
    # Row 0 full; row 1 left-padded prompt (2 pads); row 2 right-padded response (3 pads).
    mask = np.ones((3, 10), bool)
    mask[1, :2] = False
    mask[2, -3:] = False
    mask = jnp.asarray(mask)
    ref = naive_sequence_log_probs(model, ids, mask)  # [B, T-1], column j scores token j+1

    all_next = jitted_sequence_log_probs(model, ids, mask, 1)
    assert all_next.shape == (3, 9)
    # Scored: real tokens with at least one real token before them.
    scored = np.asarray(mask)[:, 1:] & (np.cumsum(np.asarray(mask), axis=1)[:, :-1] > 0)
    assert scored.sum() == 9 + 7 + 6
    np.testing.assert_allclose(np.asarray(all_next), np.where(scored, ref, 0.0), atol=1e-5, rtol=0)
    assert np.all(np.asarray(all_next)[2, -3:] == 0) and np.all(np.asarray(all_next)[1, :2] == 0)

    response, entropy = jitted_sequence_log_probs(model, ids, mask, 6, return_entropy=True)
    assert response.shape == entropy.shape == (3, 4)
    np.testing.assert_allclose(np.asarray(response), np.asarray(all_next)[:, 5:], atol=1e-6, rtol=0)
    assert np.all(np.asarray(entropy)[2, -3:] == 0) and np.all(np.asarray(entropy)[:, :1] > 0)

    # Padding is invisible: row 1's real tokens alone give the same log-probs.
    alone = jitted_sequence_log_probs(model, ids[1:2, 2:], jnp.ones((1, 8), bool), 1)
    np.testing.assert_allclose(np.asarray(alone)[0], np.asarray(all_next)[1, 2:], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sequence_log_probs_gradient_reaches_parameters(model):
    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, MODEL_VOCAB, jnp.int32)
    mask = jnp.ones((2, 7), bool)

    def loss(m):
        return jnp.sum(sequence_log_probs(m, ids, mask, response_start=3, chunk_size=2))

    def naive_loss(m):
        logits = m(ids, attention_mask=mask)
        log_probs = jax.nn.log_softmax(logits[:, 2:-1], axis=-1)
        return jnp.sum(jnp.take_along_axis(log_probs, ids[:, 3:, None], axis=-1))

    grads = nnx.jit(nnx.grad(loss))(model)
    naive_grads = nnx.jit(nnx.grad(naive_loss))(model)
    leaves, naive_leaves = jax.tree.leaves(grads), jax.tree.leaves(naive_grads)
    assert len(leaves) == len(naive_leaves) > 0
    for got, want in zip(leaves, naive_leaves):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-4)
    assert any(np.abs(np.asarray(g)).max() > 1e-3 for g in leaves)


def test_sequence_log_probs_validation(model):
    ids = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"response_start must be a static int in \[1, T=5\]"):
        sequence_log_probs(model, ids, None, response_start=0)
    with pytest.raises(ValueError, match="response_start"):
        sequence_log_probs(model, ids, None, response_start=6)
    with pytest.raises(ValueError, match=r"integer \[B, T\]"):
        sequence_log_probs(model, jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask_BxT has shape"):
        sequence_log_probs(model, ids, jnp.ones((2, 4), bool))
