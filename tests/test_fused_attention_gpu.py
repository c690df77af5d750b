"""The cuDNN fused kernel equals the XLA path in bfloat16 tolerance for every mask kind (skipped
without a GPU: run it on a lent GPU with `python -m pytest tests/test_fused_attention_gpu.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fipo_jax.models.attention import grouped_query_attention
from fipo_jax.models.attention_kernels import fused_attention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (cuDNN)")

from tests.test_fused_attention import CASES, K, full_mask, qkv  # noqa: E402


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)])
def test_cudnn_equals_xla_in_bfloat16(case, window, heads, kv_heads):
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(heads, kv_heads))
    mask = full_mask(CASES[case]["valid"], CASES[case].get("segments"))
    expected = grouped_query_attention(q, k, v, mask, K**-0.5, window).astype(jnp.float32)
    got = fused_attention(q, k, v, mask, K**-0.5, window, implementation="cudnn").astype(jnp.float32)
    real = np.asarray(mask.key_valid_BxS)[:, :, None, None]
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, expected, 0), atol=0.02, rtol=0.02)


def test_cudnn_gradients_equal_xla_in_bfloat16():
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(4, 2, seed=3))
    mask = full_mask(CASES["segments"]["valid"], CASES["segments"]["segments"])
    real = jnp.asarray(mask.key_valid_BxS)[:, :, None, None]
    grads = [jax.grad(lambda q, fn=fn: jnp.sum(jnp.where(real, fn(q), 0).astype(jnp.float32) ** 2))(q) for fn in (
        lambda q: grouped_query_attention(q, k, v, mask, K**-0.5, 4),
        lambda q: fused_attention(q, k, v, mask, K**-0.5, 4, implementation="cudnn"))]
    np.testing.assert_allclose(np.asarray(grads[1], np.float32), np.asarray(grads[0], np.float32), atol=0.05, rtol=0.05)


def test_a_cudnn_model_equals_the_xla_model_in_bfloat16():
    """Padded, packed rows through sliding and full layers (the traced window's `lax.cond`)."""
    from flax import nnx

    from fipo_jax.models import CausalLM, ModelConfig
    from tests.test_fused_attention import B, MIXED, T

    ids = jax.random.randint(jax.random.key(1), (B, T), 0, 64)
    valid = jnp.asarray(CASES["segments"]["valid"])
    segments = jnp.asarray(CASES["segments"]["segments"])
    logits = [CausalLM(ModelConfig(**MIXED, dtype="bfloat16", compute_dtype="bfloat16", attention_impl=impl),
                       rngs=nnx.Rngs(0))(ids, attention_mask=valid, segment_ids=segments) for impl in ("xla", "cudnn")]
    np.testing.assert_allclose(np.where(valid[..., None], logits[1], 0), np.where(valid[..., None], logits[0], 0),
                               atol=0.1, rtol=0.05)
