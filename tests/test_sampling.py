"""Sampler: greedy parity with transformers, log-probs equal teacher forcing, padding
invariance, keys, top-k / top-p, EOS handling, early stop, validation."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.extend.random  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from fipo_jax.generation.logprobs import sequence_log_probs  # noqa: E402
from fipo_jax.models import load_pretrained  # noqa: E402
from fipo_jax.generation.sampling import (  # noqa: E402
    SamplingConfig,
    categorical,
    left_align_prompts,
    sample_tokens,
    threefry2x32,
    top_k_top_p_filter,
)
from fipo_jax.generation.static_sampler import generate  # noqa: E402

VOCAB = 96
NEW = 12
BUCKET = 8
PROMPT_LENGTHS = (5, 3, 7)
GREEDY = SamplingConfig(max_new_tokens=NEW, temperature=0.0, prompt_length_buckets=(BUCKET,))
SAMPLED = SamplingConfig(max_new_tokens=NEW, temperature=1.0, top_p=1.0, prompt_length_buckets=(BUCKET,))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(torch model, our model loaded from its checkpoint)."""
    torch.manual_seed(0)
    hf_config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
        tie_word_embeddings=False, max_position_embeddings=128,
    )  # fmt: skip
    hf_model = transformers.Qwen2ForCausalLM(hf_config).eval()
    path = tmp_path_factory.mktemp("tiny_qwen2")
    hf_model.save_pretrained(str(path))
    return hf_model, load_pretrained(path)


@pytest.fixture(scope="module")
def prompts():
    """Three prompts of lengths 5, 3, 7, left-padded to 7 columns with pad id 0."""
    rng = np.random.RandomState(0)
    rows = [rng.randint(1, VOCAB, n) for n in PROMPT_LENGTHS]
    width = max(PROMPT_LENGTHS)
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = row
        mask[b, width - len(row) :] = True
    return rows, ids, mask


@pytest.fixture(scope="module")
def greedy_output(models, prompts):
    _, ids, mask = prompts
    return generate(models[1], ids, mask, jax.random.key(0), GREEDY)


def hf_greedy(hf_model, ids, mask, new_tokens):
    hf_model.generation_config.eos_token_id = None  # never stop early, like eos_token_ids=()
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            do_sample=False, max_new_tokens=new_tokens, pad_token_id=0,
        )  # fmt: skip
    return out[:, ids.shape[1] :].numpy()


def teacher_forced(model, out, temperature):
    """Log-probs of the sampled tokens recomputed on [prompt, response] by logprobs.py."""
    ids = jnp.concatenate([out.prompt_ids, out.tokens], axis=1)
    mask = jnp.concatenate([out.prompt_mask, out.mask], axis=1)
    fn = nnx.jit(lambda m, i, k: sequence_log_probs(m, i, k, response_start=BUCKET, chunk_size=5, temperature=temperature))
    return np.asarray(fn(model, ids, mask))


# ------------------------------------------------------------------------------------------
# Greedy
# ------------------------------------------------------------------------------------------


def test_greedy_matches_transformers_generate(models, prompts, greedy_output):
    hf_model, _ = models
    _, ids, mask = prompts
    out = greedy_output
    assert out.tokens.shape == out.mask.shape == out.log_probs.shape == (3, NEW)
    assert out.prompt_ids.shape == (3, BUCKET) and int(out.num_steps) == NEW
    np.testing.assert_array_equal(np.asarray(out.tokens), hf_greedy(hf_model, ids, mask, NEW))
    assert np.asarray(out.mask).all() and list(np.asarray(out.lengths)) == [NEW] * 3
    assert len(np.unique(np.asarray(out.tokens))) > 5  # the comparison is not vacuous


def test_greedy_log_probs_are_untempered_teacher_forced(models, greedy_output):
    expected = teacher_forced(models[1], greedy_output, 1.0)
    np.testing.assert_allclose(np.asarray(greedy_output.log_probs), expected, atol=1e-4, rtol=0)


def test_batch_rows_equal_each_prompt_alone(models, prompts, greedy_output):
    _, model = models
    rows, _, _ = prompts
    for b, row in enumerate(rows):
        alone = generate(model, row[None], None, jax.random.key(0), GREEDY)
        np.testing.assert_array_equal(np.asarray(alone.tokens)[0], np.asarray(greedy_output.tokens)[b])
        np.testing.assert_allclose(
            np.asarray(alone.log_probs)[0], np.asarray(greedy_output.log_probs)[b], atol=1e-5, rtol=0
        )


def test_right_padded_prompts_are_realigned(models, prompts, greedy_output):
    _, model = models
    rows, ids, mask = prompts
    right_ids = np.full_like(ids, 0)
    right_mask = np.zeros_like(mask)
    for b, row in enumerate(rows):
        right_ids[b, : len(row)] = row
        right_mask[b, : len(row)] = True
    out = generate(model, right_ids, right_mask, jax.random.key(0), GREEDY)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy_output.tokens))
    np.testing.assert_array_equal(np.asarray(out.prompt_ids), np.asarray(greedy_output.prompt_ids))


def test_left_align_prompts():
    ids = np.array([[5, 6, 0, 0], [0, 7, 0, 8], [1, 2, 3, 4]])
    mask = np.array([[1, 1, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1]], bool)
    aligned, aligned_mask = left_align_prompts(ids, mask, 6, pad_token_id=9)
    np.testing.assert_array_equal(aligned, [[9, 9, 9, 9, 5, 6], [9, 9, 9, 9, 7, 8], [9, 9, 1, 2, 3, 4]])
    np.testing.assert_array_equal(aligned_mask, aligned != 9)
    narrowed, _ = left_align_prompts(ids[:2], mask[:2], 2, pad_token_id=0)
    np.testing.assert_array_equal(narrowed, [[5, 6], [7, 8]])


def test_top_k_1_equals_greedy(models, prompts, greedy_output):
    _, ids, mask = prompts
    config = SAMPLED.replace(temperature=1.3, top_k=1)
    out = generate(models[1], ids, mask, jax.random.key(3), config)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy_output.tokens))
    # Log-probs are under softmax(z / 1.3) before truncation, not the truncated (one-hot) 0.
    assert np.all(np.asarray(out.log_probs) < 0)
    np.testing.assert_allclose(
        np.asarray(out.log_probs), teacher_forced(models[1], out, 1.3), atol=1e-4, rtol=0
    )


# ------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampled_output(models, prompts):
    _, ids, mask = prompts
    return generate(models[1], ids, mask, jax.random.key(11), SAMPLED)


def test_sampled_log_probs_equal_teacher_forced(models, sampled_output):
    expected = teacher_forced(models[1], sampled_output, 1.0)
    got = np.asarray(sampled_output.log_probs)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert got.min() < -3.0  # sampling (not argmax) visits unlikely tokens


def test_same_key_same_tokens_different_key_different(models, prompts, sampled_output, greedy_output):
    _, ids, mask = prompts
    again = generate(models[1], ids, mask, jax.random.key(11), SAMPLED)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(sampled_output.tokens))
    other = generate(models[1], ids, mask, jax.random.key(12), SAMPLED)
    assert np.mean(np.asarray(other.tokens) != np.asarray(sampled_output.tokens)) > 0.3
    assert np.mean(np.asarray(sampled_output.tokens) != np.asarray(greedy_output.tokens)) > 0.3


def test_truncated_sampling_reports_full_distribution_log_probs(models, prompts):
    """With τ = 0.7, top-k 20 and top-p 0.8, log-probs are still log softmax(z/τ)[y] over the
    whole vocabulary (what teacher forcing at τ = 0.7 recomputes)."""
    _, ids, mask = prompts
    config = SAMPLED.replace(temperature=0.7, top_k=20, top_p=0.8)
    out = generate(models[1], ids, mask, jax.random.key(5), config)
    np.testing.assert_allclose(np.asarray(out.log_probs), teacher_forced(models[1], out, 0.7), atol=1e-4, rtol=0)


def test_top_k_top_p_filter_hand_computed():
    logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15], [0.2, 0.2, 0.2, 0.2, 0.2]]))
    kept = lambda x: np.isfinite(np.asarray(x))  # noqa: E731
    np.testing.assert_array_equal(kept(top_k_top_p_filter(logits, top_k=2))[0], [0, 1, 0, 1, 0])
    # Mass before each sorted token: 0, .4, .7, .85, .95 → top_p 0.7 keeps {0.4, 0.3}; 0.71 adds 0.15.
    np.testing.assert_array_equal(kept(top_k_top_p_filter(logits, top_p=0.7))[0], [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(kept(top_k_top_p_filter(logits, top_p=0.71))[0], [0, 1, 0, 1, 1])
    np.testing.assert_array_equal(kept(top_k_top_p_filter(logits, top_p=0.01))[0], [0, 1, 0, 0, 0])
    # top-p after top-k renormalises over the top-k set: {0.4, 0.3, 0.15} → 0.47, 0.35, 0.18.
    np.testing.assert_array_equal(kept(top_k_top_p_filter(logits, top_k=3, top_p=0.8))[0], [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(kept(top_k_top_p_filter(logits, top_k=3, top_p=0.83))[0], [0, 1, 0, 1, 1])
    # Ties at the threshold are kept; k >= V and p = 1 are no-ops.
    assert kept(top_k_top_p_filter(logits, top_k=2))[1].all()
    np.testing.assert_array_equal(top_k_top_p_filter(logits, top_k=5, top_p=1.0), logits)


def test_sample_tokens_frequencies_follow_filtered_distribution():
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = jnp.log(jnp.asarray(probs))[None]
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.jit(jax.vmap(lambda k: sample_tokens(logits, k, temperature=1.0, top_p=0.8)))
    tokens, log_probs = draw(keys)
    counts = np.bincount(np.asarray(tokens)[:, 0], minlength=5) / len(keys)
    kept = np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85  # mass before 0.15 is 0.7 < 0.8
    np.testing.assert_allclose(counts, kept, atol=0.03)
    np.testing.assert_allclose(np.asarray(log_probs)[:, 0], np.log(probs)[np.asarray(tokens)[:, 0]], atol=1e-6)
    # Temperature 2 flattens: frequencies follow softmax(log p / 2) ∝ sqrt(p).
    tokens_hot, _ = jax.jit(jax.vmap(lambda k: sample_tokens(logits, k, temperature=2.0)))(keys)
    flat = np.sqrt(probs) / np.sqrt(probs).sum()
    np.testing.assert_allclose(np.bincount(np.asarray(tokens_hot)[:, 0], minlength=5) / len(keys), flat, atol=0.03)


@pytest.mark.slow
def test_categorical_across_blocks_and_independent_of_batch_size():
    # 1300 tokens = 3 blocks of 512 (the last partial); mass in every block, some tokens banned.
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1300).astype(np.float32) * 2
    logits[rng.choice(1300, 400, replace=False)] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    keys = jax.random.split(jax.random.key(3), 20000)
    tokens = np.asarray(jax.jit(jax.vmap(lambda k: categorical(k, jnp.asarray(logits)[None])[0]))(keys))
    assert np.all(np.isfinite(logits[tokens]))  # banned tokens never drawn
    top = np.argsort(probs)[-20:]  # frequent enough to test: each has p > 0.3 %
    counts = np.bincount(tokens, minlength=1300) / len(keys)
    np.testing.assert_allclose(counts[top], probs[top], atol=4 * np.sqrt(probs[top] / len(keys)).max())
    block_mass = np.add.reduceat(probs, [0, 512, 1024])
    np.testing.assert_allclose(np.add.reduceat(counts, [0, 512, 1024]), block_mass, atol=0.012)
    # Rows padded for a device split must not change the real rows' draws.
    batch = jnp.asarray(rng.normal(size=(8, 1300)), jnp.float32)
    np.testing.assert_array_equal(categorical(jax.random.key(1), batch)[:6], categorical(jax.random.key(1), batch[:6]))


# ------------------------------------------------------------------------------------------
# EOS, early stop, validation
# ------------------------------------------------------------------------------------------


def test_eos_masks_the_rest_of_the_row_and_stops_early(models, prompts, greedy_output):
    _, ids, mask = prompts
    tokens = np.asarray(greedy_output.tokens)
    eos = int(tokens[0, 3])  # row 0 emits it (first, or earlier) by step 3
    config = GREEDY.replace(eos_token_ids=(VOCAB - 1, eos), pad_token_id=1)
    out = generate(models[1], ids, mask, jax.random.key(0), config)
    out_tokens, out_mask, out_lp = (np.asarray(x) for x in (out.tokens, out.mask, out.log_probs))
    for b in range(3):
        hits = np.flatnonzero(np.isin(tokens[b], config.eos_token_ids))
        length = hits[0] + 1 if len(hits) else NEW
        assert out.lengths[b] == length
        np.testing.assert_array_equal(out_mask[b], np.arange(NEW) < length)
        np.testing.assert_array_equal(out_tokens[b, :length], tokens[b, :length])
        assert np.all(out_tokens[b, length:] == 1) and np.all(out_lp[b, length:] == 0)
        np.testing.assert_allclose(out_lp[b, :length], np.asarray(greedy_output.log_probs)[b, :length], atol=1e-5)
    assert out.lengths[0] <= 4
    assert int(out.num_steps) == max(int(x) for x in out.lengths)
    # Teacher forcing with the returned masks reproduces the log-probs of the kept tokens.
    np.testing.assert_allclose(out_lp, teacher_forced(models[1], out, 1.0), atol=1e-4, rtol=0)


def test_stop_sequences_end_rows_keep_their_tokens_and_exact_log_probs(models, prompts):
    """Sampled rows (τ = 1): each row stops right after the first place its generated tokens end
    with a stop sequence; the stop tokens are kept (mask 1), `stop_lengths` marks them, the rest
    of the row is padding, and teacher forcing reproduces every kept log-prob."""
    _, ids, mask = prompts
    free = generate(models[1], ids, mask, jax.random.key(3), SAMPLED)
    tokens = np.asarray(free.tokens)
    two = tuple(int(t) for t in tokens[0, 4:6])  # a 2-token sequence row 0 generates at steps 4-5
    one = (int(tokens[1, 2]),)  # a 1-token sequence row 1 generates at step 2
    never = (VOCAB - 1, VOCAB - 2, VOCAB - 3)
    config = SAMPLED.replace(stop_sequences=(two, one, never), pad_token_id=1)
    out = generate(models[1], ids, mask, jax.random.key(3), config)
    out_tokens, out_mask, out_lp = (np.asarray(x) for x in (out.tokens, out.mask, out.log_probs))
    for b in range(3):
        row = [int(t) for t in tokens[b]]
        ends = [t + 1 for t in range(NEW) if row[t] in one or tuple(row[max(0, t - 1):t + 1]) == two]
        length = ends[0] if ends else NEW
        expected_stop = 0 if not ends else (1 if row[length - 1] in one and tuple(row[length - 2:length]) != two
                                            else 2)
        assert int(out.lengths[b]) == length and int(out.stop_lengths[b]) == expected_stop, (b, row)
        np.testing.assert_array_equal(out_tokens[b, :length], row[:length])  # same key → same draws
        np.testing.assert_array_equal(out_mask[b], np.arange(NEW) < length)
        assert np.all(out_tokens[b, length:] == 1) and np.all(out_lp[b, length:] == 0)
    assert int(out.lengths[0]) <= 6 and int(out.lengths[1]) <= 3
    np.testing.assert_allclose(out_lp, teacher_forced(models[1], out, 1.0), atol=1e-4, rtol=0)


def test_stop_sequences_match_generated_tokens_only(models, prompts, greedy_output):
    """A stop sequence that straddles the prompt and the response does not fire."""
    _, ids, mask = prompts
    first = int(np.asarray(greedy_output.tokens)[2, 0])
    last_prompt_token = int(ids[2, -1])
    out = generate(models[1], ids, mask, jax.random.key(0), GREEDY.replace(stop_sequences=((last_prompt_token, first),)))
    assert int(out.lengths[2]) >= 2 and int(out.stop_lengths[2]) in (0, 2)


def test_all_rows_stop_at_first_step(models, prompts, greedy_output):
    _, ids, mask = prompts
    first = tuple(int(t) for t in np.unique(np.asarray(greedy_output.tokens)[:, 0]))
    out = generate(models[1], ids, mask, jax.random.key(0), GREEDY.replace(eos_token_ids=first))
    assert int(out.num_steps) == 1 and list(np.asarray(out.lengths)) == [1, 1, 1]
    np.testing.assert_array_equal(np.asarray(out.mask)[:, 1:], False)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
        (dict(temperature=-0.1), r"temperature must be 0 \(greedy\) or a finite number >= 0\.01"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k must be an int >= 0"),
        (dict(top_k=2.5), "top_k"),
        (dict(eos_token_ids=5), "eos_token_ids must be a tuple"),
        (dict(eos_token_ids=(1, -2)), "non-negative ints"),
        (dict(pad_token_id=-1), "pad_token_id"),
        (dict(prompt_length_buckets=(64, 32)), "strictly increasing"),
        (dict(prompt_length_buckets=()), "prompt_length_buckets"),
        (dict(cache_dtype="float16"), "cache_dtype"),
        (dict(stop_sequences="Question:"), "encode stop strings with the tokenizer first"),
        (dict(stop_sequences=((),)), "non-empty token-id tuples"),
        (dict(stop_sequences=((3, -1),)), "stop_sequences"),
    ],
)
def test_config_validation(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        SamplingConfig(**change)


def test_config_normalises_and_hashes():
    config = SamplingConfig(eos_token_ids=[3, np.int64(4)], prompt_length_buckets=[8, 16])
    assert config.eos_token_ids == (3, 4) and config.prompt_length_buckets == (8, 16)
    assert hash(config) == hash(SamplingConfig(eos_token_ids=(3, 4), prompt_length_buckets=(8, 16)))
    assert config.prompt_length(8) == 8 and config.prompt_length(9) == 16
    assert SamplingConfig(prompt_length_buckets=None).prompt_length(13) == 13
    assert SamplingConfig(temperature=0).greedy and not config.greedy
    from_numpy = SamplingConfig(max_new_tokens=np.int64(8), temperature=np.float32(0.5), top_k=np.int32(3))
    assert from_numpy == SamplingConfig(max_new_tokens=8, temperature=0.5, top_k=3)
    assert type(from_numpy.temperature) is float and type(from_numpy.max_new_tokens) is int


def test_generate_input_validation(models, prompts):
    _, model = models
    _, ids, mask = prompts
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="largest prompt length bucket 4"):
        generate(model, ids, mask, key, GREEDY.replace(prompt_length_buckets=(2, 4)))
    empty = mask.copy()
    empty[1] = False
    with pytest.raises(ValueError, match=r"at least one real token; empty rows: \[1\]"):
        generate(model, ids, empty, key, GREEDY)
    with pytest.raises(ValueError, match="must be < vocab_size=96"):
        generate(model, ids, mask, key, GREEDY.replace(eos_token_ids=(VOCAB,)))
    with pytest.raises(ValueError, match=r"stop_sequences must be < vocab_size=96, got \[97\]"):
        generate(model, ids, mask, key, GREEDY.replace(stop_sequences=((3, VOCAB + 1),)))
    with pytest.raises(ValueError, match=r"prompt_ids must be in \[0, vocab_size=96\)"):
        generate(model, np.where(mask, VOCAB + 3, 0), mask, key, GREEDY)
    with pytest.raises(ValueError, match=r"integer \[B, L\]"):
        generate(model, ids[0], None, key, GREEDY)
    with pytest.raises(ValueError, match="prompt_mask must have the shape"):
        generate(model, ids, mask[:, 1:], key, GREEDY)
    with pytest.raises(TypeError, match="SamplingConfig"):
        generate(model, ids, mask, key, {"temperature": 0})


def test_uses_live_parameters_without_recompiling(models, prompts, greedy_output):
    """The sampler reads the model's current parameters: an in-place update changes the output
    and hits the same compiled function (weights are arguments, not baked-in constants)."""
    from fipo_jax.generation import static_sampler

    _, ids, mask = prompts
    model = nnx.clone(models[1])
    compiled_before = static_sampler._generate_jit._cache_size()
    same = generate(model, ids, mask, jax.random.key(0), GREEDY)
    np.testing.assert_array_equal(np.asarray(same.tokens), np.asarray(greedy_output.tokens))
    last_logits = np.asarray(model(greedy_output.prompt_ids, attention_mask=greedy_output.prompt_mask))[:, -1]
    model.lm_head.kernel[...] = -model.lm_head.kernel[...]  # greedy now picks the argmin
    changed = generate(model, ids, mask, jax.random.key(0), GREEDY)
    np.testing.assert_array_equal(np.asarray(changed.tokens)[:, 0], np.argmin(last_logits, axis=-1))
    assert np.mean(np.asarray(changed.tokens) != np.asarray(greedy_output.tokens)) > 0.5
    assert static_sampler._generate_jit._cache_size() == compiled_before


def test_temperatures_that_overflow_float32_are_refused():
    from fipo_jax.generation.sampling import MIN_TEMPERATURE, SamplingConfig

    with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or a finite number >= 0\.01 .* got 1e-30"):
        SamplingConfig(temperature=1e-30)
    assert SamplingConfig(temperature=0).temperature == 0 and SamplingConfig(temperature=MIN_TEMPERATURE)


def test_threefry_is_jax_threefry_bit_for_bit():
    rng = np.random.default_rng(0)
    k1, k2 = rng.integers(0, 2**32, 2, dtype=np.uint32)
    counts = rng.integers(0, 2**32, (2, 64), dtype=np.uint32)
    y0, y1 = threefry2x32(jnp.uint32(k1), jnp.uint32(k2), jnp.asarray(counts[0]), jnp.asarray(counts[1]))
    expected = jax.extend.random.threefry_2x32((jnp.uint32(k1), jnp.uint32(k2)), jnp.asarray(counts.reshape(-1)))
    assert np.array_equal(np.concatenate([y0, y1]), np.asarray(expected))


def test_sampling_without_truncation_sorts_nothing():
    """top_p = 1 and top_k = 0: no sort and no full-vocabulary cumsum (only the two-level block draws)."""
    logits, uniforms = jnp.zeros((2, 1024)), jnp.zeros((2, 2))

    def equations(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)

    def primitives(**truncation):
        jaxpr = jax.make_jaxpr(lambda z, u: sample_tokens(z, jax.random.key(0), 1.0, uniforms_Bx2=u,
                                                          **truncation))(logits, uniforms)
        return [(e.primitive.name, e.outvars[0].aval.shape) for e in equations(jaxpr.jaxpr)]

    plain = primitives()
    assert not any(name == "sort" for name, _ in plain)
    assert all(shape[-1] <= 512 for name, shape in plain if name == "cumsum")  # blocks of 512, not V = 1024
    assert any(name == "sort" for name, _ in primitives(top_p=0.9))
