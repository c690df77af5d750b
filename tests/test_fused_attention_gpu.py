"""The cuDNN fused kernel equals the XLA path in bfloat16 tolerance for every mask kind (skipped
without a GPU: run it on a lent GPU with `python -m pytest tests/test_fused_attention_gpu.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fipo_jax.models.attention import fused_attention, grouped_query_attention

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
