"""The fused attention paths equal our XLA attention for every mask kind — causal, left padding,
packed segments, sliding window, GQA and MQA — on CPU: `fused_attention` (the cuDNN call) with
JAX's reference lowering, `splash_attention` with Pallas's interpreter; and a model with
`attention_impl` "cudnn" / "splash" (so lowered on CPU) equals the "xla" model, gradients included.
`tests/test_fused_attention_gpu.py` checks the cuDNN kernel itself on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from fipo_jax.models import CausalLM, ModelConfig
from fipo_jax.models import attention_kernels
from fipo_jax.models.attention import AttentionMask, grouped_query_attention
from fipo_jax.models.attention_kernels import fused_attention, resolve_attention_impl, splash_attention
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


def test_splash_attention_equals_grouped_query_attention_in_the_interpreter():
    for case in CASES:
        for window in (None, 4):
            q, k, v = qkv(4, 2, seed=len(case))
            mask = full_mask(CASES[case]["valid"], CASES[case].get("segments"))
            expected = grouped_query_attention(q, k, v, mask, K**-0.5, window)
            got = splash_attention(q, k, v, mask, K**-0.5, window, interpret=True)
            real = np.asarray(mask.key_valid_BxS)[:, :, None, None]
            np.testing.assert_allclose(np.where(real, got, 0), np.where(real, expected, 0), atol=2e-5, rtol=2e-5,
                                       err_msg=f"{case}, window {window}")
            assert np.all(np.isfinite(np.asarray(got)))


@pytest.mark.parametrize("kernel", ["fused", "splash"])
def test_gradients_through_the_kernels_equal_ours(kernel):
    q, k, v = qkv(4, 1, seed=3)
    mask = full_mask(CASES["segments"]["valid"], CASES["segments"]["segments"])
    real = jnp.asarray(mask.key_valid_BxS)[:, :, None, None]
    attend = {"fused": lambda q, k, v: fused_attention(q, k, v, mask, K**-0.5, 4),
              "splash": lambda q, k, v: splash_attention(q, k, v, mask, K**-0.5, 4, interpret=True)}[kernel]
    grads = [jax.grad(lambda q, k, v, fn=fn: jnp.sum(jnp.where(real, fn(q, k, v), 0) ** 2), argnums=(0, 1, 2))(q, k, v)
             for fn in (lambda q, k, v: grouped_query_attention(q, k, v, mask, K**-0.5, 4), attend)]
    for ours, theirs in zip(*grads):
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


def test_resolve_attention_impl_by_backend():
    assert [resolve_attention_impl("auto", b) for b in ("cpu", "gpu", "tpu")] == ["xla"] * 3  # none verified yet
    assert resolve_attention_impl("cudnn", "gpu") == "cudnn" and resolve_attention_impl("splash", "tpu") == "splash"
    assert resolve_attention_impl("xla", "tpu") == "xla"
    with pytest.raises(ValueError, match=r"attention_impl='cudnn' runs on gpu, not on this 'cpu' backend"):
        resolve_attention_impl("cudnn", "cpu")
    with pytest.raises(ValueError, match=r"attention_impl='splash' runs on tpu, not on this 'gpu' backend"):
        resolve_attention_impl("splash", "gpu")
    with pytest.raises(ValueError, match="attention_impl must be 'auto' or one of"):
        resolve_attention_impl("flash", "cpu")
    with pytest.raises(ValueError, match="ModelConfig.attention_impl must be one of"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, attention_impl="flash")


def test_a_model_names_its_kernel_and_cpu_refuses_the_gpu_one():
    config = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, attention_impl="cudnn")
    with pytest.raises(ValueError, match="attention_impl='cudnn' runs on gpu"):
        CausalLM(config, rngs=nnx.Rngs(0))(jnp.zeros((1, 4), jnp.int32))


MIXED = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, model_type="gemma3_text", qk_norm=True, norm_unit_offset=True,
             sandwich_norms=True, hidden_activation="gelu_pytorch_tanh", qkv_bias=False, query_pre_attn_scalar=8.0,
             layer_types=("sliding_attention", "full_attention", "sliding_attention"), sliding_window=3,
             sliding_rope_theta=10000.0, initializer_range=0.3)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_a_model_with_a_kernel_equals_the_xla_model(impl, monkeypatch):
    """Padded and packed rows through a model mixing sliding and full layers (the traced window's
    `lax.cond`), remat "full": logits on real tokens and every parameter's gradient."""
    monkeypatch.setitem(attention_kernels.KERNEL_BACKENDS, impl, ("gpu", "tpu", "cpu"))
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, 64)
    valid = jnp.asarray(CASES["segments"]["valid"])
    segments = jnp.asarray(CASES["segments"]["segments"])
    models = {name: CausalLM(ModelConfig(**MIXED, remat="full", attention_impl=name), rngs=nnx.Rngs(0))
              for name in ("xla", impl)}

    def loss(model):
        logits = model(ids, attention_mask=valid, segment_ids=segments)
        return jnp.sum(jnp.where(valid[..., None], jax.nn.log_softmax(logits), 0) ** 2) / 1e3, logits

    (_, ours), ours_grad = nnx.value_and_grad(loss, has_aux=True)(models["xla"])
    (_, theirs), theirs_grad = nnx.value_and_grad(loss, has_aux=True)(models[impl])
    np.testing.assert_allclose(np.where(valid[..., None], theirs, 0), np.where(valid[..., None], ours, 0),
                               atol=1e-4, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(nnx.state(theirs_grad)), jax.tree.leaves(nnx.state(ours_grad))):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4)
