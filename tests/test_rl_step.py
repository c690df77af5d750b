"""The pure RL update: micro-batch accumulation is exact, a non-finite gradient is skipped, the
function is pure, metrics have declared reductions, the warm-up schedule counts RL steps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fipo_jax as fj
from fipo_jax.core import packing
from fipo_jax.train import update as update_lib
from fipo_jax.models import Qwen2Config, CausalLM

ROWS, PROMPT, RESPONSE, GROUP = 8, 3, 6, 2


@pytest.fixture(scope="module")
def setup():
    model = CausalLM(Qwen2Config(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, initializer_range=0.3),
                             rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, RESPONSE + 1, size=ROWS)
    response_mask = np.arange(RESPONSE)[None] < lengths[:, None]
    ids = rng.integers(0, 11, size=(ROWS, PROMPT + RESPONSE)).astype(np.int32)
    attention_mask = np.concatenate([np.ones((ROWS, PROMPT), bool), response_mask], 1)
    lp, _ = update_lib.response_log_probs(graphdef, params, rest, jnp.asarray(ids), jnp.asarray(attention_mask),
                                       RESPONSE, 64)
    fields = {"prompt_ids": ids[:, :PROMPT], "prompt_mask": attention_mask[:, :PROMPT], "tokens": ids[:, PROMPT:],
              "response_mask": response_mask, "scores": rng.normal(size=ROWS).astype(np.float32),
              "sampler_log_probs": np.asarray(lp)}
    return graphdef, params, rest, fields


def one_per_row(fields, mini, micro):
    return packing.pack_batch(fields, mini, micro, layout="padded")[0]


def optimizer(warmup_steps=0, updates_per_step=1):
    schedule = update_lib.warmup_schedule(1e-2, warmup_steps, updates_per_step)
    return update_lib.make_optimizer(schedule, 0.9, 0.999, 1e-8, 0.0, 1.0)


def run(setup, mini=1, micro=ROWS, weighting="exact", fields=None, opt=None, loss=None, steps=1):
    graphdef, params, rest, base = setup
    opt = opt or optimizer()
    state = update_lib.init_state(jax.tree.map(jnp.array, params), opt, jax.random.key(0))  # fresh: donated
    config = update_lib.UpdateConfig(loss=loss or fj.PolicyLossConfig(), group_size=GROUP,
                                  micro_batch_weighting=weighting, logprob_chunk_size=64)
    update = update_lib.jit_rl_update(graphdef, rest, opt, config)
    batch = one_per_row(fields or base, mini, micro)
    for _ in range(steps):
        state, metrics = update(state, batch)
    return state, metrics


@pytest.mark.slow
def test_micro_batches_reproduce_the_whole_mini_batch(setup):
    whole, split = run(setup, micro=8), run(setup, micro=2)
    np.testing.assert_allclose(whole[1]["actor/loss"], split[1]["actor/loss"], rtol=1e-5)
    np.testing.assert_allclose(whole[1]["actor/grad_norm"], split[1]["actor/grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(whole[0].params), jax.tree.leaves(split[0].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    official = run(setup, micro=2, weighting="official")  # per-micro-batch means weighted by sequences: differs
    assert abs(float(official[1]["actor/loss"]) - float(whole[1]["actor/loss"])) > 1e-6


@pytest.mark.slow
def test_non_finite_gradient_skips_the_update(setup):
    graphdef, params, rest, fields = setup
    poisoned = dict(fields, scores=fields["scores"].copy())
    poisoned["scores"][0] = np.nan  # → NaN advantages for group 0 → NaN gradient
    state, metrics = run(setup, fields=poisoned)
    assert float(metrics["actor/skipped_updates"]) == 1.0
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 1  # the RL step still counts
    assert float(run(setup)[1]["actor/skipped_updates"]) == 0.0


def host(tree):
    """Numpy copies of every leaf (PRNG keys as their key data)."""
    as_numpy = lambda x: np.array(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)  # noqa: E731
                                  else x)
    return jax.tree.map(as_numpy, tree)


@pytest.mark.slow
def test_an_update_that_would_make_parameters_non_finite_is_skipped(setup):
    """A step so large that the parameters overflow is skipped like a non-finite gradient."""
    graphdef, params, rest, fields = setup
    overflowing = update_lib.make_optimizer(lambda count: jnp.float32(np.inf), 0.9, 0.999, 1e-8, 0.0, 1.0)
    state, metrics = run(setup, opt=overflowing)
    assert np.isfinite(float(metrics["actor/grad_norm"])) and float(metrics["actor/skipped_updates"]) == 1.0
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_update_is_pure(setup):
    """Same inputs → same outputs, and the inputs are left as they were (no donation here)."""
    graphdef, params, rest, fields = setup
    opt = optimizer()
    config = update_lib.UpdateConfig(loss=fj.PolicyLossConfig(), group_size=GROUP, logprob_chunk_size=64)
    update = jax.jit(functools.partial(update_lib.rl_update, graphdef=graphdef, rest=rest, optimizer=opt, config=config))
    state = update_lib.init_state(params, opt, jax.random.key(0))
    batch = jax.tree.map(jnp.asarray, one_per_row(fields, 2, 2))
    before = host((state, batch))
    first, second = update(state, batch), update(state, batch)
    jax.tree.map(np.testing.assert_array_equal, host(first), host(second))
    jax.tree.map(np.testing.assert_array_equal, before, host((state, batch)))
    assert int(first[0].step) == 1 and int(state.step) == 0


@pytest.mark.slow
def test_old_log_probs_are_recomputed_on_device(setup):
    """The sampler log-probs here are the teacher-forced ones: the update's recomputation agrees."""
    _, metrics = run(setup, mini=2, micro=2)
    assert float(metrics["rollout/sampler_logprob_gap"]) < 1e-5
    assert 0 < float(metrics["actor/entropy"]) < np.log(11) + 1e-5
    for key in ("actor/pg_clipfrac", "actor/influence_weights_mean", "actor/neg_is_p75", "actor/pos_is_median",
                "actor/response_tokens", "actor/lr", "batch/length_weighted_advantage"):
        assert key in metrics, key
    assert float(metrics["actor/response_tokens"]) == setup[3]["response_mask"].sum()


def test_warmup_schedule_counts_rl_steps():
    schedule = update_lib.warmup_schedule(1.0, warmup_steps=2, updates_per_step=3)
    assert [float(schedule(jnp.int32(n))) for n in range(8)] == [0, 0, 0, 0.5, 0.5, 0.5, 1, 1]
    assert float(update_lib.warmup_schedule(0.5, 0, 3)(jnp.int32(0))) == 0.5


@pytest.mark.slow
def test_learning_rate_follows_the_schedule_through_the_state(setup):
    _, first = run(setup, mini=2, micro=4, opt=optimizer(warmup_steps=2, updates_per_step=2))
    assert float(first["actor/lr"]) == 0.0  # every update of the first step has LR 0
    _, third = run(setup, mini=2, micro=4, opt=optimizer(warmup_steps=2, updates_per_step=2), steps=3)
    assert float(third["actor/lr"]) == pytest.approx(1e-2)


def test_metrics_without_a_declared_reduction_are_refused():
    with pytest.raises(KeyError, match="without a declared reduction: \\['mystery'\\]"):
        update_lib.reduce_metrics({"mystery": jnp.ones(2)}, jnp.ones(2), {"loss": "mean"})
    reduced = update_lib.reduce_metrics({"a": jnp.array([1.0, 3.0, 9.0]), "b": jnp.array([2.0, 5.0, 0.0])},
                                     jnp.array([1.0, 3.0, 0.0]), {"a": "mean", "b": "min"})
    assert float(reduced["a"]) == 2.5 and float(reduced["b"]) == 2.0  # the empty batch is ignored


def test_layout_refuses_rows_that_do_not_split(setup):
    with pytest.raises(ValueError, match="8 sequences do not split into 3 mini-batches"):
        one_per_row(setup[3], 3, 1)


@pytest.mark.slow
def test_influence_activity_per_mini_batch(setup):
    """Mini-batch 1 updates from the rollout policy itself (every weight exactly 1, nothing active);
    later mini-batches see a moved policy. The counts add up to the step's fractions."""
    _, metrics = run(setup, mini=4, micro=2, loss=fj.PolicyLossConfig(decay_rate=4.0, influence_clip=0.5))
    m = {k: float(v) for k, v in metrics.items()}
    assert m["influence/mb1_active_frac"] == 0.0
    assert m["influence/mb1_weight_p5"] == m["influence/mb1_weight_p95"] == 1.0
    later = [m[f"influence/mb{i}_active_frac"] for i in (2, 3, 4)]
    assert max(later) > 0 and all(0 <= x <= 1 for x in later)
    assert m["influence/loss_tokens_after_first"] > 0
    assert 0 < m["influence/active_tokens_after_first"] <= m["influence/loss_tokens_after_first"]
    total = m["influence/active_tokens_after_first"] / (m["actor/loss_tokens"] or 1)
    assert m["influence/active_frac"] == pytest.approx(total, rel=1e-6)
    assert m["influence/mb2_weight_p5"] <= m["influence/mb2_weight_p50"] <= m["influence/mb2_weight_p95"] <= 1.5
    dapo = run(setup, mini=4, micro=2, loss=fj.PolicyLossConfig.dapo())[1]
    assert not any(k.startswith("influence/") for k in dapo)


@pytest.mark.slow
def test_bfloat16_parameters_update_and_keep_their_dtypes(setup):
    """The recipes store parameters in bfloat16: gradients accumulate in float32 and return to the
    parameters' dtype, so the optimizer state keeps its dtypes across micro-batches and updates."""
    graphdef, params, rest, fields = setup
    bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    opt = optimizer()
    state = update_lib.init_state(bf16, opt, jax.random.key(0))
    dtypes = jax.tree.map(lambda x: x.dtype, (state.params, state.opt_state))
    update = update_lib.jit_rl_update(graphdef, rest, opt, update_lib.UpdateConfig(
        loss=fj.PolicyLossConfig(), group_size=GROUP, logprob_chunk_size=64))
    batch = one_per_row(fields, 2, ROWS // 4)  # 2 updates of 2 micro-batches each
    before = jax.tree.map(lambda p: np.asarray(p, np.float32), state.params)
    for _ in range(2):
        state, metrics = update(state, batch)
    assert jax.tree.map(lambda x: x.dtype, (state.params, state.opt_state)) == dtypes
    assert np.isfinite(float(metrics["actor/loss"])) and float(metrics["actor/skipped_updates"]) == 0
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a, np.float32) - b))), state.params, before)
    assert max(jax.tree.leaves(moved)) > 0
