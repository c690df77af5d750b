"""Packed updates equal padded ones: the policy loss on packed rows (segment ids) gives the loss,
every metric and the gradient of the same sequences padded one per row; `rl_update` on the packed
layout of `RLBatch` gives the metrics and parameters of the one-per-row layout; `pack_batch` keeps budgets."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fipo_jax as fj
from fipo_jax.core import packing
from fipo_jax.train import update as update_lib
from fipo_jax.core.losses import token_diagnostics
from fipo_jax.core.losses import AGGREGATIONS, LOSS_MODES
from fipo_jax.models import CausalLM, ModelConfig

N = 24  # padded response width


def long_tail_lengths(rng, count, width, empty=1):
    """Log-normal response lengths (max / mean ≈ 3–6) in [1, width], ``empty`` of them 0 (padding rows)."""
    lengths = np.clip(np.round(np.exp(rng.normal(1.2, 0.9, count))), 1, width).astype(int)
    lengths[rng.choice(count, empty, replace=False)] = 0
    return lengths


def loss_batch(seed, rows=12):
    """Padded loss inputs with big log-ratio moves (dual clips, drops, filtered tokens happen)."""
    rng = np.random.default_rng(seed)
    lengths = long_tail_lengths(rng, rows, N)
    mask = np.arange(N)[None] < lengths[:, None]
    old = rng.normal(-2.0, 0.5, (rows, N)).astype(np.float32)
    move = rng.normal(0.0, 0.4, (rows, N)) + (rng.random((rows, N)) < 0.06) * rng.choice([-4.0, 4.0], (rows, N))
    advantages = rng.choice([-1.5, -0.5, 0.7, 1.2], rows).astype(np.float32)
    advantages[:2] = -1.0
    lengths[:2] = np.maximum(lengths[:2], 2)
    lengths[-1] = 0  # a padding row: counted by the "seq-mean-token-sum*" modes, packed nowhere
    move[:2, :2] = 5.0  # two dual-clipped tokens (A < 0, r > c): the drop rule removes these two
    lp = (old + move).astype(np.float32)
    mask = np.arange(N)[None] < lengths[:, None]
    return lp, old, advantages, mask, lengths


def packed_loss_inputs(lp, old, advantages, mask, lengths, budget=2 * N):
    """The same sequences packed into rows of ``budget`` tokens: (lp, old, A per token, mask, ids, layout)."""
    layout = packing.first_fit_decreasing(lengths, budget)
    per_token = np.broadcast_to(advantages[:, None], lp.shape)
    pack = lambda x, fill=0: packing.pack(x, layout, fill)  # noqa: E731
    return (pack(lp), pack(old), pack(per_token), pack(mask, False), packing.segment_ids(layout), layout)


CONFIGS = list(itertools.product(LOSS_MODES, AGGREGATIONS))


@pytest.mark.parametrize("mode,aggregation", CONFIGS)
def test_packed_loss_equals_padded_loss_metrics_and_gradient(mode, aggregation):
    lp, old, advantages, mask, lengths = loss_batch(seed=len(mode) * 7 + AGGREGATIONS.index(aggregation))
    config = fj.PolicyLossConfig(loss_mode=mode, aggregation=aggregation, aggregation_horizon=N, decay_rate=4.0,
                                 drop_dual_clipped_sequences=True)
    p_lp, p_old, p_adv, p_mask, seg, layout = packed_loss_inputs(lp, old, advantages, mask, lengths)
    assert layout.num_rows < len(lengths)  # several sequences share rows

    def padded(lp_):
        terms, metrics = fj.policy_loss_terms(lp_, old, advantages, mask, config)
        return terms.total, (terms, metrics)

    def packed(lp_):
        terms, metrics = fj.policy_loss_terms(lp_, p_old, p_adv, p_mask, config, segment_ids=seg,
                                              num_sequences=len(lengths))  # the empty response counts too
        return terms.total, (terms, metrics)

    grad_a, (terms_a, metrics_a) = jax.jit(jax.grad(padded, has_aux=True))(jnp.asarray(lp))
    grad_b, (terms_b, metrics_b) = jax.jit(jax.grad(packed, has_aux=True))(jnp.asarray(p_lp))
    np.testing.assert_allclose(terms_b.count, terms_a.count)
    np.testing.assert_allclose(terms_b.total, terms_a.total, rtol=1e-5, atol=1e-6)
    assert set(metrics_a) == set(metrics_b)
    for name in metrics_a:
        np.testing.assert_allclose(metrics_b[name], metrics_a[name], rtol=2e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(packing.unpack(np.asarray(grad_b), layout, N), np.asarray(grad_a) * mask,
                               rtol=1e-5, atol=1e-7)
    if mode != "grpo":
        assert float(metrics_a["dropped_sequences"]) >= 1  # the drop rule acted, per segment
    if mode == "fipo":
        assert float(metrics_a["filtered_tokens"]) >= 1 and float(metrics_a["influence_active_tokens"]) >= 1


def test_regularisers_aggregate_per_segment():
    lp, old, advantages, mask, lengths = loss_batch(seed=3)
    rng = np.random.default_rng(1)
    ref, entropy = (rng.normal(-2, 0.3, lp.shape).astype(np.float32), rng.random(lp.shape).astype(np.float32))
    config = fj.PolicyLossConfig(aggregation="seq-mean-token-mean", kl_coef=0.1, entropy_coeff=0.01)
    p_lp, p_old, p_adv, p_mask, seg, layout = packed_loss_inputs(lp, old, advantages, mask, lengths)
    loss = jax.jit(fj.policy_loss, static_argnums=4)  # eager, the ~200 small ops take 7 s
    a, ma = loss(lp, old, advantages, mask, config, ref_log_probs=ref, entropy=entropy)
    b, mb = loss(p_lp, p_old, p_adv, p_mask, config, ref_log_probs=packing.pack(ref, layout),
                 entropy=packing.pack(entropy, layout), segment_ids=seg)
    np.testing.assert_allclose(b, a, rtol=1e-5)
    for name in ("kl_loss", "entropy", "pg_loss"):
        np.testing.assert_allclose(mb[name], ma[name], rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_a_huge_log_ratio_in_one_sequence_leaves_its_neighbours_weights_alone():
    lp, old, advantages, mask, lengths = loss_batch(seed=5)
    config = fj.PolicyLossConfig(decay_rate=64.0, future_kl_filter=False)
    p_lp, p_old, p_adv, p_mask, seg, layout = packed_loss_inputs(lp, old, advantages, mask, lengths)
    row = np.bincount(layout.rows[lengths > 0]).argmax()  # a row holding several sequences
    victim = np.flatnonzero((layout.rows == row) & (lengths > 0))
    victim = victim[np.argmax(layout.starts[victim])]  # the last segment of the row
    blown = p_lp.copy()
    blown[row, layout.starts[victim]:layout.starts[victim] + lengths[victim]] += 15.0
    before = token_diagnostics(p_lp, p_old, p_adv, p_mask, config, seg)
    after = token_diagnostics(blown, p_old, p_adv, p_mask, config, seg)
    others = (seg != victim) & p_mask
    np.testing.assert_array_equal(np.asarray(after.weights)[others], np.asarray(before.weights)[others])
    np.testing.assert_array_equal(np.asarray(after.future_kl)[others], np.asarray(before.future_kl)[others])
    assert (np.asarray(after.future_kl)[seg == victim] > 1.0).all()  # it did move its own sequence
    without_segments = token_diagnostics(blown, p_old, p_adv, p_mask, config)  # what packing without ids would do
    assert not np.array_equal(np.asarray(without_segments.future_kl)[others], np.asarray(before.future_kl)[others])


def test_packed_loss_refuses_per_row_advantages_and_a_missing_horizon():
    lp, old, advantages, mask, lengths = loss_batch(seed=2)
    p_lp, p_old, p_adv, p_mask, seg, _ = packed_loss_inputs(lp, old, advantages, mask, lengths)
    with pytest.raises(ValueError, match="per token"):
        fj.policy_loss(p_lp, p_old, p_adv[:, 0], p_mask, fj.PolicyLossConfig(), segment_ids=seg)
    with pytest.raises(ValueError, match="aggregation_horizon"):
        fj.policy_loss(p_lp, p_old, p_adv, p_mask, fj.PolicyLossConfig(aggregation="seq-mean-token-sum-norm"),
                       segment_ids=seg)
    with pytest.raises(ValueError, match="segment_ids must be an integer array"):
        fj.policy_loss(p_lp, p_old, p_adv, p_mask, fj.PolicyLossConfig(), segment_ids=seg[:, :-1])


# ----------------------------------------------------------------------------- the update

SEQUENCES, GROUP, PROMPT = 16, 4, 5


@pytest.fixture(scope="module")
def setup():
    # A qk-norm model of a few layers: its float32 rounding differs between layouts enough that a
    # metric counting weights at a ±1e-7 bound would tell them apart (it did, before π_old of the
    # first mini-batch became the gradient pass's own log-probs).
    model = CausalLM(ModelConfig(vocab_size=13, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, model_type="qwen3",
                                 qk_norm=True, qkv_bias=False, initializer_range=0.3), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    prompt_lengths = rng.integers(2, PROMPT + 1, SEQUENCES)
    prompt_mask = np.arange(PROMPT)[None] >= (PROMPT - prompt_lengths)[:, None]  # left padding
    lengths = long_tail_lengths(rng, SEQUENCES, N, empty=2)
    response_mask = np.arange(N)[None] < lengths[:, None]
    fields = {"prompt_ids": rng.integers(0, 13, (SEQUENCES, PROMPT)).astype(np.int32) * prompt_mask,
              "prompt_mask": prompt_mask,
              "tokens": rng.integers(0, 13, (SEQUENCES, N)).astype(np.int32) * response_mask,
              "response_mask": response_mask,
              "scores": rng.choice([-1.0, 1.0, 0.5], SEQUENCES).astype(np.float32),
              "sampler_log_probs": np.where(response_mask, rng.normal(-2.5, 0.3, (SEQUENCES, N)), 0).astype(np.float32)}
    return graphdef, params, rest, fields


def padded_batch(fields, mini, micro):
    return packing.pack_batch(fields, mini, micro, layout="padded")[0]


def update(setup, batch, loss, weighting="exact"):
    graphdef, params, rest, _ = setup
    # Plain SGD: the parameter change is −lr × the gradient, so equal parameters mean equal gradients
    # (Adam's g / √v would turn float32 rounding of near-zero gradients into sign flips).
    schedule = update_lib.warmup_schedule(0.5, 0, 2)
    opt = update_lib.Optimizer(optax.sgd(schedule), schedule)
    state = update_lib.init_state(jax.tree.map(jnp.array, params), opt, jax.random.key(0))
    config = update_lib.UpdateConfig(loss=loss, group_size=GROUP, micro_batch_weighting=weighting, logprob_chunk_size=8)
    return update_lib.jit_rl_update(graphdef, rest, opt, config)(state, batch)


@pytest.mark.slow
@pytest.mark.parametrize("mode,aggregation", CONFIGS)
def test_every_metric_and_the_update_are_the_same_in_every_layout(setup, mode, aggregation):
    """Packed (first-fit decreasing) and padded (one per row) rows of the same sequences: every metric
    equal in every loss mode × aggregation with the drop rule on, and the same parameters after."""
    fields = setup[3]
    loss = fj.PolicyLossConfig(loss_mode=mode, aggregation=aggregation, decay_rate=4.0, drop_dual_clipped_sequences=True)
    packed, stats = packing.pack_batch(fields, mini_batches=2, micro_batch_size=2)
    assert packed.input_ids.shape[1] > 1 and stats["rows"] < stats["unpacked_rows"]  # regrouped micro-batches
    state_a, metrics_a = update(setup, padded_batch(fields, 2, 2), loss)
    state_b, metrics_b = update(setup, packed, loss)
    assert set(metrics_a) == set(metrics_b)
    for name in metrics_a:
        np.testing.assert_allclose(metrics_b[name], metrics_a[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert float(metrics_a["actor/ppo_kl"]) != 0.0  # the second mini-batch updates from a moved policy
    if mode == "fipo":  # the first mini-batch is exactly on-policy: every weight 1, at the lower bound
        assert float(metrics_a["influence/mb1_weight_p5"]) == float(metrics_a["influence/mb1_weight_p95"]) == 1.0
    start = jax.tree.leaves(setup[1])
    for a, b, p in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), start):
        step_a, step_b = np.asarray(a) - p, np.asarray(b) - p  # −lr · Σ mini-batch gradients
        np.testing.assert_allclose(step_b, step_a, rtol=1e-4, atol=1e-5 * np.abs(step_a).max())
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_official_weighting_counts_the_sequences_of_each_packed_micro_batch(setup):
    fields = setup[3]
    loss = fj.PolicyLossConfig()
    # One micro-batch per mini-batch either way: the official weighting is then the exact one.
    packed, _ = packing.pack_batch(fields, mini_batches=2, micro_batch_size=8)
    assert packed.input_ids.shape[1] == 1
    _, official = update(setup, packed, loss, "official")
    _, exact = update(setup, padded_batch(fields, 2, 8), loss)
    np.testing.assert_allclose(official["actor/loss"], exact["actor/loss"], rtol=1e-5)


def test_old_log_probs_of_packed_rows_equal_the_padded_ones(setup):
    graphdef, params, rest, fields = setup
    packed, _ = packing.pack_batch(fields, mini_batches=1, micro_batch_size=16)
    lp, _ = jax.jit(update_lib.packed_log_probs, static_argnums=(0, 5))(graphdef, params, rest, packed.input_ids[0, 0],
                                                                      packed.segment_ids[0, 0], 8)
    ids = np.concatenate([fields["prompt_ids"], fields["tokens"]], 1)
    attention = np.concatenate([fields["prompt_mask"], fields["response_mask"]], 1)
    reference, _ = jax.jit(update_lib.response_log_probs, static_argnums=(0, 5, 6))(graphdef, params, rest, ids,
                                                                                 attention, N, 8)
    seg, mask = packed.segment_ids[0, 0], packed.response_mask[0, 0]
    for s in np.flatnonzero(fields["response_mask"].any(1)):
        mine = np.asarray(lp)[(seg == s) & mask]
        np.testing.assert_allclose(mine, np.asarray(reference)[s][fields["response_mask"][s]], rtol=1e-5, atol=1e-6)


def test_pack_batch_respects_budgets_and_places_every_sequence_once(setup):
    fields = setup[3]
    width = PROMPT + N
    lengths = fields["prompt_mask"].sum(1) + fields["response_mask"].sum(1)
    for mini, micro, multiple in [(1, 16, 1), (2, 2, 1), (2, 4, 2), (4, 1, 1)]:
        batch, stats = packing.pack_batch(fields, mini, micro, row_multiple=multiple)
        m, k, r, length = batch.input_ids.shape
        assert (m, length) == (mini, width) and r <= micro and r % multiple == 0
        seg = batch.segment_ids.reshape(m, k * r, width)
        for s in range(SEQUENCES):
            where = np.argwhere(seg == s)
            if fields["response_mask"][s].any():
                assert len(where) == lengths[s] and len(set(where[:, 1])) == 1  # whole, in one row
                assert where[0, 0] == s // (SEQUENCES // mini)  # in its own mini-batch
                np.testing.assert_array_equal(batch.input_ids.reshape(m, k * r, width)[tuple(where.T)][-fields[
                    "response_mask"][s].sum():], fields["tokens"][s][fields["response_mask"][s]])
            else:
                assert len(where) == 0
        np.testing.assert_array_equal(batch.sequences.sum(1), SEQUENCES // mini)
        assert batch.response_mask.sum() == fields["response_mask"].sum()
        assert stats["padding_frac"] < stats["padding_frac_unpacked"]
    with pytest.raises(ValueError, match="multiple of row_multiple"):
        packing.pack_batch(fields, 2, 3, row_multiple=2)
    with pytest.raises(ValueError, match=r"fields\['tokens'\] has shape \(16, 23\)"):
        packing.pack_batch(dict(fields, tokens=fields["tokens"][:, :-1]), 2, 2)
    with pytest.raises(ValueError, match="do not split into 3 mini-batches"):
        packing.pack_batch(fields, 3, 2)


def test_bucket_sizes():
    assert [packing.bucket_size(n) for n in range(1, 22)] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 10, 12, 12, 14, 14, 16, 16,
                                                              20, 20, 20, 20, 24]
    for n in range(1, 3000):
        size = packing.bucket_size(n)
        assert n <= size < 1.25 * n + 1
    with pytest.raises(ValueError):
        packing.bucket_size(0)
