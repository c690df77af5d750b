"""Continuous-batching engine: the static sampler's results request by request (greedy and sampled,
mixed prompt lengths and budgets, EOS and stop sequences), whatever the slots and sync interval;
shared prefill; no recompilation on insert; per-request stops; validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fipo_jax.generation import engine as engine_lib
from fipo_jax.generation.engine import EngineConfig
from fipo_jax.models import CausalLM, ModelConfig
from fipo_jax.generation.sampling import SamplingConfig, request_uniforms
from fipo_jax.generation.static_sampler import generate

VOCAB = 64
NEW = 16
EOS = 5
GROUP = 3


@pytest.fixture(scope="module")
def model():
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, decode_block_size=4)
    return CausalLM(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def requests():
    """5 prompts of mixed lengths (2 … 9 tokens), GROUP samples each, right-padded in 10 columns,
    and per-request budgets from 1 to NEW."""
    rng = np.random.RandomState(0)
    lengths = [2, 9, 4, 6, 3]
    ids = np.zeros((len(lengths) * GROUP, 10), np.int32)
    mask = np.zeros(ids.shape, bool)
    for p, n in enumerate(lengths):
        ids[p * GROUP:(p + 1) * GROUP, :n] = rng.randint(6, VOCAB, n)
        mask[p * GROUP:(p + 1) * GROUP, :n] = True
    budgets = rng.randint(1, NEW + 1, len(ids)).astype(np.int32)
    budgets[:2] = (1, NEW)
    return ids, mask, budgets


def config(temperature, **changes):
    fields = dict(max_new_tokens=NEW, temperature=temperature, eos_token_ids=(EOS,), prompt_length_buckets=(16,))
    return SamplingConfig(**{**fields, **changes})


def assert_matches_static(out, static, budgets):
    """Request r of the engine = row r of the static sampler cut at r's budget."""
    static = jax.device_get(static)
    assert np.array_equal(out.prompt_ids, static.prompt_ids) and np.array_equal(out.prompt_mask, static.prompt_mask)
    for r, budget in enumerate(budgets):
        n = min(int(static.lengths[r]), int(budget))
        assert out.lengths[r] == n, (r, out.lengths[r], static.lengths[r], budget)
        assert np.array_equal(out.tokens[r, :n], static.tokens[r, :n]), r
        assert np.all(out.tokens[r, n:] == 0) and not out.mask[r, n:].any() and out.mask[r, :n].all()
        np.testing.assert_allclose(out.log_probs[r, :n], static.log_probs[r, :n], rtol=2e-6, atol=2e-6)
        assert np.all(out.log_probs[r, n:] == 0)
        stopped_within = static.stop_lengths[r] > 0 and static.lengths[r] <= budget
        assert out.stop_lengths[r] == (static.stop_lengths[r] if stopped_within else 0), r


def test_request_uniforms_are_the_static_rows():
    for key in (jax.random.PRNGKey(3), jax.random.key(7)):
        for step in (0, 9, 123_456):
            rows = np.asarray(jax.random.uniform(jax.random.fold_in(key, step), (300, 2)))
            picked = np.array([0, 1, 2, 150, 299])
            got = request_uniforms(key, jnp.full(5, step), jnp.asarray(picked))
            assert np.array_equal(np.asarray(got), rows[picked])
    with pytest.raises(TypeError, match="from threefry keys, got rbg"):
        request_uniforms(jax.random.key(0, impl="rbg"), jnp.zeros(1), jnp.zeros(1))


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_equals_static_sampler_per_request(model, requests, temperature):
    ids, mask, budgets = requests
    sampling = config(temperature, top_p=0.9 if temperature else 1.0)
    key = jax.random.key(4)
    static = generate(model, ids, mask, key, sampling)
    out, stats = engine_lib.generate_with_stats(model, ids, mask, key, sampling, EngineConfig(num_slots=4, steps_per_sync=3),
                                                max_new_tokens=budgets)
    assert_matches_static(out, static, budgets)
    assert (out.lengths < budgets).any() and (out.lengths == budgets).any()  # EOS and budgets both end requests
    assert stats.generated_tokens == out.lengths.sum() and 0 < stats.slot_utilisation <= 1


@pytest.mark.slow
def test_stop_sequences_as_in_the_static_sampler(model, requests):
    ids, mask, budgets = requests
    greedy = jax.device_get(generate(model, ids, mask, jax.random.key(0), config(0.0)))
    # Stop on the pair of tokens request 1 generates at positions 3–4, and on a single token.
    stops = (tuple(int(t) for t in greedy.tokens[1, 3:5]), (int(greedy.tokens[4, 2]),))
    sampling = config(0.0, stop_sequences=stops)
    static = generate(model, ids, mask, jax.random.key(0), sampling)
    out = engine_lib.generate(model, ids, mask, jax.random.key(0), sampling, EngineConfig(num_slots=5),
                              max_new_tokens=np.full(len(ids), NEW))
    assert (np.asarray(static.stop_lengths) > 0).sum() >= 2
    assert_matches_static(out, static, np.full(len(ids), NEW))


@pytest.mark.slow
def test_results_do_not_depend_on_slots_sync_or_sharing(model, requests):
    ids, mask, budgets = requests
    runs = [engine_lib.generate(model, ids, mask, jax.random.key(2), config(1.0), engine, max_new_tokens=budgets)
            for engine in (EngineConfig(num_slots=1, steps_per_sync=1),
                           EngineConfig(num_slots=7, steps_per_sync=5, refill_threshold=2, prefill_batch=2),
                           EngineConfig(num_slots=32, steps_per_sync=64, share_prompt_prefill=False),
                           EngineConfig(num_slots=8, steps_per_sync=2, compact_tail=False))]
    for other in runs[1:]:
        assert np.array_equal(runs[0].tokens, other.tokens) and np.array_equal(runs[0].lengths, other.lengths)
        np.testing.assert_allclose(runs[0].log_probs, other.log_probs, atol=2e-6)


@pytest.mark.slow
def test_each_prompt_is_prefilled_once(model, requests):
    ids, mask, budgets = requests
    prompts = len(ids) // GROUP
    shared = engine_lib.generate_with_stats(model, ids, mask, jax.random.key(0), config(0.0), EngineConfig(num_slots=4),
                                            max_new_tokens=budgets)[1]
    repeated = engine_lib.generate_with_stats(model, ids, mask, jax.random.key(0), config(0.0),
                                              EngineConfig(num_slots=4, share_prompt_prefill=False),
                                              max_new_tokens=budgets)[1]
    assert shared.prefilled_prompts == prompts and repeated.prefilled_prompts == len(ids)
    # Interleaved prompts with a one-row store: rows are evicted and re-prefilled, results unchanged.
    order = np.argsort(np.arange(len(ids)) % GROUP, kind="stable")
    out, stats = engine_lib.generate_with_stats(model, ids[order], mask[order], jax.random.key(0), config(0.0),
                                                EngineConfig(num_slots=2, prefill_batch=1), max_new_tokens=budgets[order])
    static = generate(model, ids[order], mask[order], jax.random.key(0), config(0.0))
    assert_matches_static(out, static, budgets[order])
    assert stats.prefilled_prompts > prompts


@pytest.mark.slow
def test_inserting_requests_never_recompiles(model, requests):
    ids, mask, budgets = requests
    engine = EngineConfig(num_slots=4, steps_per_sync=2, prefill_batch=4, compact_tail=False)
    engine_lib.generate(model, ids, mask, jax.random.key(0), config(1.0), engine, max_new_tokens=budgets)
    advance, prefill = engine_lib._advance_jit._cache_size(), engine_lib._prefill_jit._cache_size()
    rng = np.random.RandomState(1)
    for count in (1, 7, 15):  # other requests, budgets, prompts and keys, same prompt bucket
        rows = rng.randint(0, len(ids), count)
        out, stats = engine_lib.generate_with_stats(model, ids[rows], mask[rows], jax.random.key(count), config(1.0), engine,
                                                    max_new_tokens=rng.randint(1, NEW + 1, count))
        assert stats.device_calls >= 1
    assert engine_lib._advance_jit._cache_size() == advance
    assert engine_lib._prefill_jit._cache_size() <= prefill + 2  # prefill widths 1, 2, 4: one compile each


@pytest.mark.slow
def test_tail_compaction_halves_the_slots_it_decodes(model, requests):
    ids, mask, budgets = requests
    before = engine_lib._advance_jit._cache_size()
    tail = np.full(len(ids), 2)
    tail[4] = NEW  # one long request: the other slots end early and the queue empties
    runs = {compact: engine_lib.generate_with_stats(model, ids, mask, jax.random.key(0), config(1.0, eos_token_ids=()),
                                                    EngineConfig(num_slots=8, steps_per_sync=2, compact_tail=compact),
                                                    max_new_tokens=tail) for compact in (True, False)}
    assert np.array_equal(runs[True][0].tokens, runs[False][0].tokens)
    assert runs[True][1].slot_utilisation > 2 * runs[False][1].slot_utilisation
    assert engine_lib._advance_jit._cache_size() - before <= 4  # 8, 4, 2, 1 slots at most


@pytest.mark.slow
def test_per_request_stop_sequences(model, requests):
    ids, mask, budgets = requests
    full = np.full(len(ids), NEW)
    plain = engine_lib.generate(model, ids, mask, jax.random.key(0), config(0.0), EngineConfig(num_slots=4),
                                max_new_tokens=full)
    target = 2
    stop = tuple(int(t) for t in plain.tokens[target, 2:4])
    stops = [() for _ in ids]
    stops[target] = (stop, (VOCAB - 1, VOCAB - 2, VOCAB - 3))
    out = engine_lib.generate(model, ids, mask, jax.random.key(0), config(0.0), EngineConfig(num_slots=4),
                              max_new_tokens=full, stop_sequences=stops)
    first = next(i for i in range(1, NEW) if tuple(plain.tokens[target, i - 1:i + 1]) == stop)
    assert out.lengths[target] == first + 1 and out.stop_lengths[target] == 2
    others = np.arange(len(ids)) != target
    assert np.array_equal(out.lengths[others], plain.lengths[others])


def test_progress_and_utilisation(model, requests):
    ids, mask, _ = requests
    ended = []
    # Every request runs to the same budget and slots = requests: every decode step is busy.
    out, stats = engine_lib.generate_with_stats(model, ids, mask, jax.random.key(0), config(1.0, eos_token_ids=()),
                                                EngineConfig(num_slots=len(ids), steps_per_sync=4), progress=ended.append)
    assert sum(ended) == len(ids) and np.all(out.lengths == NEW)
    assert stats.slot_utilisation == 1.0 and stats.decode_steps == NEW - 1


@pytest.mark.parametrize("change, pattern", [
    (dict(num_slots=0), "num_slots"),
    (dict(steps_per_sync=0), "steps_per_sync"),
    (dict(prefill_batch=1.5), "prefill_batch"),
    (dict(refill_threshold=0), "refill_threshold"),
    (dict(share_prompt_prefill="yes"), "share_prompt_prefill"),
])
def test_engine_config_validation(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        EngineConfig(**change)


def test_request_validation(model, requests):
    ids, mask, budgets = requests
    run = lambda **kw: engine_lib.generate(model, ids, mask, jax.random.key(0), config(0.0), **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"max_new_tokens must be in \[1, .*16\]; requests \[0\]"):
        run(max_new_tokens=np.r_[NEW + 1, budgets[1:]])
    with pytest.raises(ValueError, match="one budget per request"):
        run(max_new_tokens=budgets[:3])
    with pytest.raises(ValueError, match="one tuple of token sequences per request"):
        run(stop_sequences=[()])
    with pytest.raises(ValueError, match="vocab_size"):
        run(stop_sequences=[((VOCAB,),)] + [()] * (len(ids) - 1))
    with pytest.raises(TypeError, match="EngineConfig"):
        run(engine={"num_slots": 4})
    with pytest.raises(ValueError, match="at least one real token"):
        engine_lib.generate(model, ids, np.zeros_like(mask), jax.random.key(0), config(0.0))


@pytest.mark.slow
def test_sliding_window_and_bfloat16_cache_match_the_static_sampler(requests):
    """Gemma-style sliding layers (the decode attention's window path, vmapped over slots) and a
    bfloat16 cache: still the static sampler's results."""
    config_sw = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, decode_block_size=4,
                            layer_types=("sliding_attention", "full_attention"), sliding_window=5)
    sliding = CausalLM(config_sw, rngs=nnx.Rngs(1))
    ids, mask, budgets = requests
    for sampling in (config(1.0), config(0.0, cache_dtype="bfloat16")):
        static = generate(sliding, ids, mask, jax.random.key(3), sampling)
        out = engine_lib.generate(sliding, ids, mask, jax.random.key(3), sampling, EngineConfig(num_slots=4),
                                  max_new_tokens=budgets)
        assert_matches_static(out, static, budgets)


def test_kv_cache_bytes(model):
    one = engine_lib.kv_cache_bytes(model.config, 1, 100)
    # 2 layers × (keys + values) × 2 kv heads × 100 × 8 float32, plus valid (1 B) and positions (4 B) per slot.
    assert one == 2 * 2 * 2 * 100 * 8 * 4 + 100 * 5 + 4 + 4
    assert engine_lib.kv_cache_bytes(model.config, 8, 100) == 8 * one - 7 * 4


@pytest.mark.slow
def test_per_row_write_indices_decode_each_row_at_its_own_slot(model):
    """A cache with index [B] (the engine's slots): one batched decode step writes row b's token at
    slot index[b] and gives each row the logits of its own batch-1, scalar-index decode."""
    prompts = (np.array([[7, 8, 9, 10, 11, 12]]), np.array([[20, 21, 22]]))  # rows filled to slots 6 and 3
    rows, alone = [], []
    for ids in prompts:
        cache = model.init_kv_cache(1, 12)
        _, cache = model.extend(jnp.asarray(ids, jnp.int32), cache)
        rows.append(cache)
        logits, _ = model.decode_step(jnp.array([30], jnp.int32), jnp.array([True]), cache)
        alone.append(np.asarray(logits[0]))
    batched = jax.tree.map(lambda *x: jnp.concatenate(x) if x[0].ndim else jnp.stack(x), *rows)
    assert batched.index.shape == (2,) and batched.index.tolist() == [6, 3]
    logits, after = model.decode_step(jnp.array([30, 30], jnp.int32), jnp.array([True, True]), batched)
    np.testing.assert_allclose(np.asarray(logits), np.stack(alone), rtol=1e-5, atol=1e-5)
    assert after.index.tolist() == [7, 4]
    assert np.asarray(after.valid_BxS).sum(axis=1).tolist() == [7, 4] and bool(after.valid_BxS[1, 3])
    with pytest.raises(ValueError, match="one new token per row"):
        model.extend(jnp.ones((2, 2), jnp.int32), batched)
