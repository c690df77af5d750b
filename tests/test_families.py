"""Every family against transformers on tiny random checkpoints built at test time: Qwen2 with a
sliding window, Qwen3, Llama 3 (llama3 / linear RoPE scaling, biases), Gemma 3 text (sliding
window shorter than the sequence, per-type RoPE, sandwich norms, GeGLU, query_pre_attn_scalar).

Per family and shape: logits to 1e-4 in float32, KV-cache prefill + decode = full forward, a
left-padded batch = each row alone, greedy tokens = `transformers.generate`, export →
transformers → same logits, and the trainer-side pieces (remat, chunked attention, sampler,
log-probs, logical axes). Norm weights and biases are perturbed so that none sits at its init.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from fipo_jax.generation.logprobs import sequence_log_probs  # noqa: E402
from fipo_jax.models import (  # noqa: E402
    LOGICAL_AXES,
    AttentionMask,
    CausalLM,
    ModelConfig,
    RopeScaling,
    UnsupportedConfigError,
    config_from_hf,
    decode_attention,
    hf_weight_table,
    load_pretrained,
    positions_from_mask,
    save_pretrained,
)
from fipo_jax.models.attention import _attention  # noqa: E402
from fipo_jax.generation.sampling import SamplingConfig  # noqa: E402
from fipo_jax.generation.static_sampler import generate

ATOL = 1e-4
VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              initializer_range=0.2, max_position_embeddings=256)

# name → (transformers config class, model class, config kwargs); several shapes per family.
VARIANTS = {
    "qwen2-sliding": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                      dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                           rope_theta=1e4)),
    "qwen3-head_dim16": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                         dict(num_hidden_layers=2, head_dim=16, rope_theta=1e4, tie_word_embeddings=False)),
    "qwen3-mqa-bias-tied": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                            dict(num_hidden_layers=2, head_dim=8, num_key_value_heads=1, attention_bias=True,
                                 tie_word_embeddings=True, rope_theta=1e6)),
    "llama3-scaled": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                      dict(num_hidden_layers=2, rope_parameters={
                          "rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-linear-biases-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                                 dict(num_hidden_layers=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                      head_dim=16, rope_parameters={"rope_type": "linear", "rope_theta": 1e4,
                                                                    "factor": 4.0})),
    "gemma3-window5": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                       dict(num_hidden_layers=4, head_dim=16, sliding_window=5, query_pre_attn_scalar=12,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                         "sliding_attention"],
                            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                "rope_theta": 1e6},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}})),
    "gemma3-mqa-window3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                           dict(num_hidden_layers=3, head_dim=8, num_key_value_heads=1, sliding_window=3,
                                sliding_window_pattern=3, tie_word_embeddings=False)),
}
FAMILY = {"qwen2-sliding": "qwen2", "qwen3-head_dim16": "qwen3", "qwen3-mqa-bias-tied": "qwen3",
          "llama3-scaled": "llama", "llama-linear-biases-tied": "llama", "gemma3-window5": "gemma3_text",
          "gemma3-mqa-window3": "gemma3_text"}


def perturbed(model):
    """`model` with every norm weight and bias moved off its init (else they would test nothing)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "norm" in key or key.endswith("bias"):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model.eval()


def make_hf(name: str):
    config_cls, model_cls, kwargs = VARIANTS[name]
    torch.manual_seed(0)
    return perturbed(model_cls(config_cls(**{**COMMON, **kwargs})))


def torch_logits(model, ids, mask=None):
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask, dtype=torch.long)}
        return model(torch.tensor(np.asarray(ids), dtype=torch.long), **kwargs).logits.float().numpy()


def random_ids(shape, seed=0):
    return np.random.RandomState(seed).randint(1, VOCAB, size=shape).astype(np.int32)


@nnx.jit
def forward(model, ids, mask=None):
    return model(jnp.asarray(ids), attention_mask=mask)


@nnx.jit
def cached_forward(model, ids, mask, cache):
    return model.extend(jnp.asarray(ids), cache, attention_mask=mask)


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(variant name, torch model, our model loaded from its checkpoint, checkpoint dir)."""
    hf_model = make_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(str(path))
    return request.param, hf_model, load_pretrained(path), str(path)


def test_config_reads_the_family(pair):
    name, hf_model, model, _ = pair
    config = model.config
    assert config.model_type == FAMILY[name]
    assert config.qk_norm == (FAMILY[name] in ("qwen3", "gemma3_text"))
    assert config.sandwich_norms == config.norm_unit_offset == config.scale_embeddings == (FAMILY[name] == "gemma3_text")
    if name.startswith("gemma3"):
        assert config.hidden_activation == "gelu_pytorch_tanh" and "sliding_attention" in config.layer_types
        assert config.sliding_rope_theta is not None
    if name == "qwen2-sliding":
        assert config.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
        assert config.sliding_window == 4
    if name == "llama3-scaled":
        assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 16)
    assert config.tie_word_embeddings == hf_model.config.tie_word_embeddings


@pytest.mark.parametrize("shape", [(2, 12), (1, 1), (3, 5)])
def test_logits_match_transformers(pair, shape):
    """T = 12 exceeds every sliding window here, so the window is exercised."""
    _, hf_model, model, _ = pair
    ids = random_ids(shape, seed=shape[1])
    ref = torch_logits(hf_model, ids)
    ours = np.asarray(forward(model, ids))
    assert np.abs(ref).max() > 1.0  # a comparison of near-zero logits would prove little
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_left_padded_batch_equals_each_row_alone(pair):
    _, hf_model, model, _ = pair
    rows = [random_ids((11,), seed=1), random_ids((6,), seed=2), random_ids((1,), seed=3)]
    width = 11
    ids = np.zeros((3, width), np.int32)
    mask = np.zeros((3, width), bool)
    for b, row in enumerate(rows):
        ids[b, width - len(row):], mask[b, width - len(row):] = row, True
    logits = np.asarray(forward(model, ids, jnp.asarray(mask)))
    assert np.isfinite(logits).all()
    for b, row in enumerate(rows):
        np.testing.assert_allclose(logits[b, width - len(row):], torch_logits(hf_model, row[None])[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("decode_block_size", [None, 4])
def test_kv_cache_prefill_and_decode_match_full_forward(pair, decode_block_size):
    """Prefill of left-padded prompts, then 9 decode steps: every step's logits equal the full
    forward's. With blocks of 4 slots the sliding layers skip the blocks behind the window."""
    _, _, model, _ = pair
    model = nnx.merge(*_with_config(model, decode_block_size=decode_block_size))
    rows = [random_ids((6,), seed=4), random_ids((3,), seed=5)]
    prompt_len, steps = 6, 9
    ids = np.zeros((2, prompt_len), np.int32)
    mask = np.zeros((2, prompt_len), bool)
    for b, row in enumerate(rows):
        ids[b, prompt_len - len(row):], mask[b, prompt_len - len(row):] = row, True
    continuation = random_ids((2, steps), seed=6)
    cache = model.init_kv_cache(2, prompt_len + steps + 1)
    prefill, cache = cached_forward(model, ids, jnp.asarray(mask), cache)
    decoded = []
    for t in range(steps):
        logits, cache = cached_forward(model, continuation[:, t:t + 1], jnp.ones((2, 1), bool), cache)
        decoded.append(np.asarray(logits[:, 0]))
    for b, row in enumerate(rows):
        full = np.asarray(forward(model, np.concatenate([row, continuation[b]])[None]))[0]
        np.testing.assert_allclose(np.asarray(prefill)[b, prompt_len - len(row):], full[:len(row)], atol=ATOL, rtol=0)
        for t in range(steps):
            np.testing.assert_allclose(decoded[t][b], full[len(row) + t], atol=ATOL, rtol=0)


def _with_config(model, **changes):
    """(graphdef, state) of the same weights under a changed (static) config."""
    config = model.config.replace(**changes)
    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    return nnx.graphdef(abstract), nnx.state(model)


def test_greedy_tokens_match_transformers_generate(pair):
    _, hf_model, model, _ = pair
    rows = [random_ids((5,), seed=7), random_ids((3,), seed=8)]
    ids = np.zeros((2, 5), np.int32)
    mask = np.zeros((2, 5), bool)
    for b, row in enumerate(rows):
        ids[b, 5 - len(row):], mask[b, 5 - len(row):] = row, True
    config = SamplingConfig(max_new_tokens=16, temperature=0.0, prompt_length_buckets=(8,))
    ours = np.asarray(generate(model, ids, mask, jax.random.key(0), config).tokens)
    hf_model.generation_config.eos_token_id = None
    for b, row in enumerate(rows):  # one row at a time: transformers' sliding window counts pad slots
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor(row[None], dtype=torch.long), do_sample=False, max_new_tokens=16,
                                    pad_token_id=0)[0, len(row):].numpy()
        np.testing.assert_array_equal(ours[b], ref)


def test_export_round_trip_through_transformers(pair, tmp_path):
    name, hf_model, model, _ = pair
    save_pretrained(model, tmp_path, extra_config={"eos_token_id": 1})
    with open(tmp_path / "config.json") as f:
        exported = json.load(f)
    assert exported["model_type"] == FAMILY[name]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(reloaded) is type(hf_model)
    ids = random_ids((2, 12), seed=9)
    ref = torch_logits(hf_model, ids)
    np.testing.assert_allclose(torch_logits(reloaded, ids), ref, atol=1e-6, rtol=0)
    assert config_from_hf(exported) == model.config


@pytest.mark.slow
def test_training_pieces(pair):
    """Remat and query-chunked attention give the same loss and gradients; chunked log-probs
    equal the full logits'; every parameter carries logical axes and a table row."""
    _, _, model, _ = pair
    ids = jnp.asarray(random_ids((2, 12), seed=10))
    mask = jnp.ones((2, 12), bool).at[1, :3].set(False)

    def loss(m):
        return jnp.mean(sequence_log_probs(m, ids, mask, response_start=4, chunk_size=3))

    reference_loss, reference_grads = nnx.jit(nnx.value_and_grad(loss))(model)
    for changes in (dict(remat=True), dict(attention_chunk_size=5)):
        variant = nnx.merge(*_with_config(model, **changes))
        value, grads = nnx.jit(nnx.value_and_grad(loss))(variant)
        np.testing.assert_allclose(value, reference_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    log_softmax = jax.nn.log_softmax(forward(model, ids, mask), axis=-1)
    direct = jnp.take_along_axis(log_softmax[:, 3:-1], ids[:, 4:, None], axis=-1)[..., 0]
    chunked = nnx.jit(lambda m: sequence_log_probs(m, ids, mask, response_start=4, chunk_size=3))(model)
    np.testing.assert_allclose(chunked, jnp.where(mask[:, 4:], direct, 0.0), atol=1e-5)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert set(flat) == {row.path for row in hf_weight_table(model.config)}
    for path, variable in flat.items():
        axes = variable.get_metadata()["out_sharding"]
        assert len(axes) == len(variable.shape) and set(axes) <= set(LOGICAL_AXES), path


# ------------------------------------------------------------------------------------------
# Sliding windows in isolation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 3, 7, 40])
@pytest.mark.parametrize("block", [2, 5, 64])
def test_decode_attention_with_window_equals_dense(window, block):
    """Block-wise decode with a window (only the blocks holding visible keys are read) = the
    dense masked softmax, with left padding, a finished row's hole, and garbage in skipped slots."""
    batch, heads, kv_heads, head_dim, slots = 3, 4, 2, 8, 23
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (batch, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, kv_heads, slots, head_dim)).at[:, :, 18:].set(1e4)
    v = jax.random.normal(keys[2], (batch, kv_heads, slots, head_dim))
    valid = np.ones((batch, slots), bool)
    valid[1, :4] = False  # left padding
    valid[2, 9:12] = False  # a hole: positions stop advancing
    valid[:, 18:] = False
    positions = positions_from_mask(jnp.asarray(valid))
    for query_slot in (0, 5, 11, 17):
        mask = AttentionMask(jnp.asarray([query_slot], jnp.int32), jnp.asarray(valid),
                             positions[:, query_slot:query_slot + 1], positions)
        dense = _attention(q[:, None], k, v, mask.allowed(window), 0.3)[:, 0]
        blocked = jax.jit(decode_attention, static_argnums=(4, 5, 6))(q, k, v, mask, 0.3, block, window)
        live = np.asarray(mask.allowed(window)[:, 0].any(axis=1))
        np.testing.assert_allclose(np.asarray(blocked)[live], np.asarray(dense)[live], atol=1e-5)


def test_window_mask_counts_positions_not_slots():
    slots = jnp.arange(6, dtype=jnp.int32)
    valid = jnp.asarray([[False, False, True, True, True, True]])
    positions = positions_from_mask(valid)
    allowed = np.asarray(AttentionMask(slots, valid, positions, positions).allowed(window=2))[0]
    # Query at slot 5 (position 3) sees positions 2 and 3 (slots 4, 5), not position 1 (slot 3).
    np.testing.assert_array_equal(allowed[5], [False, False, False, False, True, True])
    np.testing.assert_array_equal(allowed[2], [False, False, True, False, False, False])


# ------------------------------------------------------------------------------------------
# Configs: what each family accepts and refuses
# ------------------------------------------------------------------------------------------

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize("change, pattern", [
    (dict(model_type="gemma3_text", final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
    (dict(model_type="gemma3_text", attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(model_type="gemma3_text", use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(model_type="gemma3_text", rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                     "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     "sliding-window layers"),
    (dict(model_type="gemma3_text", rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 2.0}}), "yarn"),
    (dict(model_type="gemma3_text", hidden_activation="gelu"), "hidden_activation='gelu'"),
    (dict(model_type="llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "dynamic"),
    (dict(model_type="llama", pretraining_tp=2), "pretraining_tp"),
    (dict(model_type="llama", rope_scaling={"rope_type": "llama3"}), "no factor"),
    (dict(model_type="qwen3", mlp_bias=True), "mlp_bias"),
    (dict(model_type="qwen3", partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(model_type="mistral"), "unsupported model_type 'mistral'"),
    (dict(model_type=None), "unsupported model_type None"),
])
def test_unsupported_configs_name_the_field(change, pattern):
    with pytest.raises(UnsupportedConfigError, match=pattern):
        config_from_hf({**BASE, **change})


def test_family_defaults_follow_transformers():
    """Fields a config.json may omit take transformers' defaults for the family."""
    for model_type in ("qwen2", "qwen3", "llama", "gemma3_text"):
        ours = config_from_hf({**BASE, "num_key_value_heads": 2, "model_type": model_type})
        theirs = config_from_hf(transformers.AutoConfig.for_model(model_type, **BASE, num_key_value_heads=2))
        assert ours == theirs, model_type
    gemma = config_from_hf({**BASE, "num_hidden_layers": 12, "model_type": "gemma3_text"})
    assert gemma.layer_types.count("full_attention") == 2 and gemma.layer_types[5] == "full_attention"
    assert (gemma.rope_theta, gemma.sliding_rope_theta, gemma.head_dim) == (1e6, 1e4, 256)


def test_export_refuses_what_the_family_cannot_express(tmp_path):
    config = ModelConfig(**BASE, num_key_value_heads=2, qk_norm=True)  # model_type qwen2 has no q/k norms
    with pytest.raises(ValueError, match=r"qwen2 config.json cannot express this model: \['qk_norm'\]"):
        save_pretrained(CausalLM(config, rngs=nnx.Rngs(0)), tmp_path)
    assert not os.listdir(tmp_path)  # nothing written


@pytest.mark.parametrize("change, pattern", [
    (dict(layer_types=("full_attention",)), "one type per layer"),
    (dict(layer_types=("full_attention", "sliding_attention")), "sliding_window is None"),
    (dict(layer_types=("full_attention", "local")), "must be among"),
    (dict(model_type="mistral"), "model_type must be one of"),
    (dict(hidden_activation="relu"), "hidden_activation must be one of"),
    (dict(sliding_window=0), "sliding_window must be None or a positive int"),
    (dict(query_pre_attn_scalar=-1.0), "query_pre_attn_scalar"),
    (dict(rope_theta=float("inf")), "rope_theta must be a finite number"),
    (dict(qk_norm=1), "qk_norm must be a bool"),
])
def test_model_config_validation(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        ModelConfig(**BASE, num_key_value_heads=2, **change)


def test_rope_scaling_validation():
    with pytest.raises(ValueError, match="rope_type must be one of"):
        RopeScaling("yarn", 2.0)
    with pytest.raises(ValueError, match="low_freq_factor < high_freq_factor"):
        RopeScaling("llama3", 8.0, 4.0, 1.0)
