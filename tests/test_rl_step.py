"""The jitted update: micro-batch accumulation is exact, a non-finite gradient is skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fipo_jax as fj
from fipo_jax import rl_step
from fipo_jax.models import Qwen2Config, Qwen2ForCausalLM


@pytest.fixture(scope="module")
def setup():
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, initializer_range=0.3),
                             rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    rows, prompt, response = 8, 3, 6
    lengths = rng.integers(1, response + 1, size=rows)
    response_mask = np.arange(response)[None] < lengths[:, None]
    ids = rng.integers(0, 11, size=(rows, prompt + response)).astype(np.int32)
    batch = {"input_ids": ids,
             "attention_mask": np.concatenate([np.ones((rows, prompt), bool), response_mask], 1),
             "response_mask": response_mask,
             "advantages": rng.normal(size=rows).astype(np.float32)}
    lp = rl_step.response_log_probs(graphdef, params, rest, jnp.asarray(ids), jnp.asarray(batch["attention_mask"]),
                                    response, 64)
    batch["old_log_probs"] = np.asarray(lp) + rng.normal(size=lp.shape).astype(np.float32) * 0.05
    tx = rl_step.make_optimizer(1e-2, 0.9, 0.999, 1e-8, 0.0, 1.0)
    return graphdef, params, rest, tx, batch


def run(setup, micro, weighting="exact", batch=None):
    graphdef, params, rest, tx, base = setup
    params = jax.tree.map(jnp.array, params)  # fresh buffers: the update donates them
    update = rl_step.jit_update(tx, fj.PolicyLossConfig(), micro, weighting, 64)
    return update(graphdef, params, rest, tx.init(params), batch or base, 1e-2)


def test_micro_batches_reproduce_the_whole_mini_batch(setup):
    whole, split = run(setup, 8), run(setup, 2)
    np.testing.assert_allclose(whole.metrics["loss"], split.metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(whole.metrics["grad_norm"], split.metrics["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(split.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    official = run(setup, 2, "official")  # per-micro-batch means weighted by sequences: differs
    assert abs(float(official.metrics["loss"]) - float(whole.metrics["loss"])) > 1e-6


def test_non_finite_gradient_skips_the_update(setup):
    graphdef, params, rest, tx, batch = setup
    poisoned = dict(batch, advantages=batch["advantages"].copy())
    poisoned["advantages"][0] = np.nan
    result = run(setup, 4, batch=poisoned)
    assert float(result.metrics["skipped_update"]) == 1.0
    for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert float(run(setup, 4).metrics["skipped_update"]) == 0.0
