"""Qwen2 nnx model: parity with transformers, HF import/export, KV cache, padding, dtypes."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from fipo_jax.models import (  # noqa: E402
    ModelOptions,
    LOGICAL_AXES,
    CheckpointMismatchError,
    Qwen2Config,
    CausalLM,
    UnsupportedConfigError,
    init_kv_cache,
    load_pretrained,
    positions_from_mask,
    save_pretrained,
    config_from_hf,
    config_to_hf,
    hf_weight_table,
)
from fipo_jax.parallel.sharding import logical_to_mesh_spec  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-4
VOCAB = 64


# The tiny architecture both libraries' configs are built from.
TINY_DIMS = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)


def make_hf_model(**overrides) -> transformers.Qwen2ForCausalLM:
    """A tiny random float32 Qwen2 with large enough weights that logits differ meaningfully."""
    kwargs = dict(
        **TINY_DIMS,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        max_position_embeddings=128,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs))
    return model.eval()


def save_hf(model: transformers.Qwen2ForCausalLM, path, **kwargs) -> str:
    model.save_pretrained(str(path), **kwargs)
    return str(path)


def torch_logits(model: transformers.Qwen2ForCausalLM, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def random_ids(shape, seed=0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, VOCAB, size=shape).astype(np.int32)


@nnx.jit
def forward(model, ids, mask=None):
    """Jitted logits: one compile per shape instead of one per op (eager is ~5x slower here)."""
    return model(jnp.asarray(ids), attention_mask=mask)


@nnx.jit
def cached_forward(model, ids, mask, cache):
    return model.extend(jnp.asarray(ids), cache, attention_mask=mask)


@nnx.jit
def prefill(model, ids, mask, cache):
    return model.prefill(jnp.asarray(ids), mask, cache)


def tiny_config(**overrides) -> Qwen2Config:
    kwargs = dict(
        **TINY_DIMS,
    )
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(torch model, our loaded model, checkpoint dir) for the default tiny config."""
    hf_model = make_hf_model()
    path = save_hf(hf_model, tmp_path_factory.mktemp("hf_default"))
    return hf_model, load_pretrained(path), path


# ------------------------------------------------------------------------------------------
# Parity with transformers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500.0),
        dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=1e6),
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    ],
    ids=["gqa2-untied", "mqa-tied-theta500", "mha-theta1e6", "head_dim16-tied"],
)
def test_logits_match_transformers(tmp_path, overrides):
    hf_model = make_hf_model(**overrides)
    model = load_pretrained(save_hf(hf_model, tmp_path))
    assert model.config.tie_word_embeddings == overrides["tie_word_embeddings"]
    assert model.config.rope_theta == overrides.get("rope_theta", 10000.0)
    for shape in [(2, 9), (1, 1), (3, 4)]:
        ids = random_ids(shape, seed=shape[1])
        ref = torch_logits(hf_model, ids)
        ours = np.asarray(forward(model, ids))
        assert ours.dtype == np.float32 and ours.shape == ref.shape
        assert np.abs(ref).max() > 1.0  # a comparison of near-zero logits would prove little
        np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_sharded_checkpoint_loads(tmp_path):
    hf_model = make_hf_model()
    path = save_hf(hf_model, tmp_path, max_shard_size="20KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    assert not os.path.exists(os.path.join(path, "model.safetensors"))
    ids = random_ids((2, 6))
    np.testing.assert_allclose(
        np.asarray(forward(load_pretrained(path), ids)), torch_logits(hf_model, ids), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("max_shard_bytes", [None, 30_000], ids=["single-file", "sharded"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_round_trip_through_transformers(tmp_path, tied, max_shard_bytes):
    hf_model = make_hf_model(tie_word_embeddings=tied, rope_theta=20000.0)
    model = load_pretrained(save_hf(hf_model, tmp_path / "in"))
    out = str(tmp_path / "out")
    save_pretrained(model, out, max_shard_bytes=max_shard_bytes, extra_config={"eos_token_id": 3})
    sharded = os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert sharded == (max_shard_bytes is not None)
    with open(os.path.join(out, "config.json")) as f:
        exported = json.load(f)
    assert exported["model_type"] == "qwen2" and exported["architectures"] == ["Qwen2ForCausalLM"]
    assert exported["rope_parameters"] == {"rope_theta": 20000.0, "rope_type": "default"}
    assert exported["eos_token_id"] == 3
    reloaded_hf = transformers.Qwen2ForCausalLM.from_pretrained(out).eval()
    assert reloaded_hf.config.tie_word_embeddings == tied
    ids = random_ids((2, 7))
    ref = torch_logits(hf_model, ids)
    np.testing.assert_allclose(torch_logits(reloaded_hf, ids), ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(forward(load_pretrained(out), ids)), ref, atol=ATOL, rtol=0)


def test_export_of_freshly_initialised_model(tmp_path):
    """A model never seen by transformers (random nnx init) exports and matches in torch."""
    config = tiny_config(num_key_value_heads=1, head_dim=12, rope_theta=3000.0)
    model = CausalLM(config, rngs=nnx.Rngs(3))
    save_pretrained(model, tmp_path)
    hf_model = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = random_ids((2, 5))
    np.testing.assert_allclose(np.asarray(forward(model, ids)), torch_logits(hf_model, ids), atol=ATOL, rtol=0)


def test_bfloat16_checkpoint_and_compute(tmp_path):
    path = save_hf(make_hf_model().to(torch.bfloat16), tmp_path)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    # Reference: the same bf16-rounded weights evaluated in float32 by torch (fresh RoPE buffers).
    hf_model = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = load_pretrained(path, ModelOptions(dtype="bfloat16"))
    assert model.config.compute_dtype == "bfloat16"
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ids = random_ids((2, 6))
    logits = np.asarray(forward(model, ids))
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    ref = torch_logits(hf_model, ids)
    assert np.abs(logits - ref).max() < 0.05 * np.abs(ref).max()
    # bf16 params computed in float32 are exact up to float32 rounding.
    model32 = load_pretrained(path, ModelOptions(dtype="bfloat16", compute_dtype="float32"))
    np.testing.assert_allclose(np.asarray(forward(model32, ids)), ref, atol=ATOL, rtol=0)
    # bf16 export loads in transformers with bf16 tensors.
    save_pretrained(model, tmp_path / "out")
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.bfloat16)
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(reloaded.model.embed_tokens.weight, hf_model.to(torch.bfloat16).model.embed_tokens.weight)


# ------------------------------------------------------------------------------------------
# Loader errors
# ------------------------------------------------------------------------------------------


def rewrite_checkpoint(path, edit):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_loader_names_all_missing_unexpected_and_misshaped_tensors(tmp_path):
    path = save_hf(make_hf_model(), tmp_path)

    def edit(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"]
        del tensors["lm_head.weight"]
        tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
        tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros((31,), np.float32)

    rewrite_checkpoint(path, edit)
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(path)
    message = str(info.value)
    for name in (
        "model.layers.1.mlp.up_proj.weight",
        "lm_head.weight",
        "model.layers.0.self_attn.extra.weight",
        "model.layers.0.self_attn.q_proj.bias: checkpoint [31], expected [32]",
    ):
        assert name in message
    assert "missing tensors (2)" in message and "unexpected tensors (1)" in message
    assert "mis-shaped tensors (1)" in message


def test_tied_checkpoint_with_lm_head_copy(tmp_path):
    hf_model = make_hf_model(tie_word_embeddings=True)
    path = save_hf(hf_model, tmp_path)
    embed = load_file(os.path.join(path, "model.safetensors"))["model.embed_tokens.weight"]
    rewrite_checkpoint(path, lambda t: t.update({"lm_head.weight": embed.copy()}))
    ids = random_ids((1, 5))
    np.testing.assert_allclose(
        np.asarray(forward(load_pretrained(path), ids)), torch_logits(hf_model, ids), atol=ATOL, rtol=0
    )
    rewrite_checkpoint(path, lambda t: t.update({"lm_head.weight": embed + 1.0}))
    with pytest.raises(CheckpointMismatchError, match="differs from model.embed_tokens.weight"):
        load_pretrained(path)


def test_loader_rejects_unsupported_config_json(tmp_path):
    path = save_hf(make_hf_model(), tmp_path)
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        original = json.load(f)
    for change, pattern in [
        ({"model_type": "mistral"}, "unsupported model_type 'mistral'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "yarn"),
        ({"hidden_act": "relu"}, "hidden_act='relu'"),
    ]:
        with open(config_file, "w") as f:
            json.dump({**original, **change}, f)
        with pytest.raises(UnsupportedConfigError, match=pattern):
            load_pretrained(path)


BASE_HF_DICT = dict(
    model_type="qwen2",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_act="silu",
)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (dict(use_sliding_window=True, sliding_window=4, layer_types=["full_attention", "chunked_attention"]),
         "chunked_attention"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "yarn"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "dynamic"),
        (dict(rope_theta=1e4, rope_parameters={"rope_theta": 1e6, "rope_type": "default"}), "disagree"),
        (dict(partial_rotary_factor=0.5), "partial rotary"),
        (dict(model_type="mistral"), "model_type 'mistral'"),
        (dict(model_type="gemma3"), "multimodal"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(attention_bias=False), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
    ],
)
def test_from_hf_rejects_unsupported(change, pattern):
    with pytest.raises(UnsupportedConfigError, match=pattern):
        config_from_hf({**BASE_HF_DICT, **change})


def test_from_hf_reads_rope_theta_in_both_layouts():
    legacy = config_from_hf({**BASE_HF_DICT, "rope_theta": 1e6, "rope_scaling": None})
    v5 = config_from_hf({**BASE_HF_DICT, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})
    both = config_from_hf(
        {**BASE_HF_DICT, "rope_theta": 7e5, "rope_parameters": {"rope_theta": 7e5, "rope_type": "default"}}
    )
    assert (legacy.rope_theta, v5.rope_theta, both.rope_theta) == (1e6, 5e5, 7e5)
    assert config_from_hf(BASE_HF_DICT).rope_theta == 10000.0
    hf_object = transformers.Qwen2Config(**{k: v for k, v in BASE_HF_DICT.items() if k != "model_type"}, rope_theta=3e4)
    assert config_from_hf(hf_object).rope_theta == 3e4
    assert config_from_hf(hf_object).head_dim == 8


@pytest.mark.parametrize(
    "change, pattern",
    [
        (dict(num_key_value_heads=3), "divisible by num_key_value_heads"),
        (dict(hidden_size=30), "hidden_size must be divisible"),
        (dict(vocab_size=0), "vocab_size must be a positive int"),
        (dict(head_dim=7), "even"),
        (dict(dtype="float16"), "dtype must be one of"),
        (dict(compute_dtype="int8"), "compute_dtype must be one of"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(attention_chunk_size=0), "attention_chunk_size must be None or a positive int"),
        (dict(decode_block_size=True), "decode_block_size must be None or a positive int"),
    ],
)
def test_config_validation(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny_config(**change)


def test_config_hf_dict_round_trip():
    config = tiny_config(head_dim=16, rope_theta=1234.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    assert config_from_hf(config_to_hf(config), config.options) == config
    assert config_from_hf(transformers.Qwen2Config(**config_to_hf(config))) == config


# ------------------------------------------------------------------------------------------
# Padding, positions, KV cache
# ------------------------------------------------------------------------------------------


def left_pad(rows, length, pad_id=0):
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :] = row
        mask[b, length - len(row) :] = True
    return jnp.asarray(ids), jnp.asarray(mask)


def test_positions_from_mask():
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(
        positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]
    )
    np.testing.assert_array_equal(positions_from_mask(mask[:, :2], jnp.asarray([3, 0, 1])), [[2, 2], [0, 1], [1, 2]])


def test_left_padded_batch_equals_each_row_alone(hf_pair):
    hf_model, model, _ = hf_pair
    rows = [random_ids((7,), seed=1)[0:7], random_ids((4,), seed=2), random_ids((1,), seed=3)]
    ids, mask = left_pad(rows, 8)
    logits = np.asarray(forward(model, ids, mask))
    assert np.isfinite(logits).all()  # pad queries see no key: finite, never NaN
    for b, row in enumerate(rows):
        alone = torch_logits(hf_model, row[None])[0]
        np.testing.assert_allclose(logits[b, 8 - len(row) :], alone, atol=ATOL, rtol=0)


def test_kv_cache_prefill_and_decode_match_full_forward(hf_pair):
    _, model, _ = hf_pair
    rows = [random_ids((6,), seed=4), random_ids((3,), seed=5)]
    prompt_len, new_tokens = 6, 4
    ids, mask = left_pad(rows, prompt_len)
    continuation = random_ids((2, new_tokens), seed=6)

    cache = init_kv_cache(model.config, batch_size=2, max_len=prompt_len + new_tokens + 2)
    prefill_logits, cache = cached_forward(model, ids, mask, cache)
    assert prefill_logits.shape == (2, prompt_len, VOCAB)
    assert int(cache.index) == prompt_len
    np.testing.assert_array_equal(cache.next_position_B, [6, 3])
    decode_logits = []
    for t in range(new_tokens):
        logits, cache = cached_forward(model, jnp.asarray(continuation[:, t : t + 1]), jnp.ones((2, 1), bool), cache)
        decode_logits.append(np.asarray(logits[:, 0]))
    assert int(cache.index) == prompt_len + new_tokens
    np.testing.assert_array_equal(cache.next_position_B, [10, 7])
    for b, row in enumerate(rows):
        full = np.asarray(forward(model, np.concatenate([row, continuation[b]])[None]))[0]
        start = prompt_len - len(row)
        np.testing.assert_allclose(np.asarray(prefill_logits)[b, start:], full[: len(row)], atol=ATOL, rtol=0)
        for t in range(new_tokens):
            np.testing.assert_allclose(decode_logits[t][b], full[len(row) + t], atol=ATOL, rtol=0)


def test_prefill_and_decode_step_and_finished_rows(hf_pair):
    """Prefill returns the last position's logits; a decode step of a row that does not emit
    leaves its position and cache slot alone; both equal the general cached forward."""
    _, model, _ = hf_pair
    ids, mask = left_pad([random_ids((5,), seed=7), random_ids((2,), seed=8)], 5)
    last, cache = prefill(model, ids, mask, model.init_kv_cache(2, 8))
    full = forward(model, ids, mask)
    assert last.shape == (2, VOCAB)
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1]), atol=ATOL, rtol=0)
    tokens, emitting = jnp.asarray([1, 0], jnp.int32), jnp.asarray([True, False])
    logits, after = nnx.jit(lambda m, t, e, c: m.decode_step(t, e, c))(model, tokens, emitting, cache)
    general, same = cached_forward(model, tokens[:, None], emitting[:, None], cache)
    assert logits.shape == (2, VOCAB)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(general[:, 0]), atol=1e-6, rtol=0)
    jax.tree.map(np.testing.assert_array_equal, after, same)
    np.testing.assert_array_equal(after.next_position_B, [6, 2])
    np.testing.assert_array_equal(after.valid_BxS[:, 5], [True, False])
    with pytest.raises(TypeError):
        model(jnp.asarray(ids), kv_cache=cache)  # one output type: the full forward has no cache


def test_hidden_states_and_unembed_compose_to_logits(hf_pair):
    _, model, _ = hf_pair
    ids = jnp.asarray(random_ids((2, 5)))
    hidden = nnx.jit(lambda m, x: m.hidden_states(x))(model, ids)
    assert hidden.shape == (2, 5, 32)
    assert model.unembedding().shape == (32, VOCAB)
    logits = nnx.jit(lambda m, h: m.unembed(h))(model, hidden)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(forward(model, ids)), atol=1e-6, rtol=0)
    tied = CausalLM(tiny_config(tie_word_embeddings=True), rngs=nnx.Rngs(0))
    assert tied.lm_head is None
    np.testing.assert_array_equal(tied.unembedding(), tied.embed_tokens.embedding[...].T)


def test_input_validation(hf_pair):
    _, model, _ = hf_pair
    with pytest.raises(ValueError, match=r"integer \[B, T\]"):
        model(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(jnp.zeros((2, 3), jnp.int32), attention_mask=jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="do not fit"):
        model.extend(jnp.zeros((2, 5), jnp.int32), model.init_kv_cache(2, 4))
    with pytest.raises(ValueError, match="at slot 3 do not fit"):
        model.extend(jnp.zeros((2, 2), jnp.int32), model.init_kv_cache(2, 4)._replace(index=jnp.int32(3)))


# ------------------------------------------------------------------------------------------
# Training-side properties: remat, logical axes, sharded loading
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["full", "dots", True])
def test_remat_gives_same_loss_and_grads(policy):
    config = tiny_config()
    plain = CausalLM(config, rngs=nnx.Rngs(1))
    remat = CausalLM(config.replace(remat=policy), rngs=nnx.Rngs(1))
    assert remat.config.remat == ("full" if policy is True else policy)
    ids = jnp.asarray(random_ids((2, 6)))

    def loss(model):
        return jnp.mean(jax.nn.log_softmax(model(ids))[..., 0])

    grads_plain = nnx.jit(nnx.grad(loss))(plain)
    grads_remat = nnx.jit(nnx.grad(loss))(remat)
    for a, b in zip(jax.tree.leaves(grads_plain), jax.tree.leaves(grads_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_remat_policy_is_checked():
    with pytest.raises(ValueError, match=r"ModelConfig.remat must be one of \('none', 'full', 'dots'\), got 'some'"):
        tiny_config(remat="some")


def test_layers_are_one_scan_whatever_the_depth():
    """The forward's program does not grow with depth (one scan over stacked parameters), and the
    stacked layers hold exactly what L separately initialised layers would."""
    from fipo_jax.models.decoder import DecoderLayer
    from fipo_jax.models.layers import Embed

    def equations(layers, **kwargs):
        model = nnx.eval_shape(lambda: CausalLM(tiny_config(num_hidden_layers=layers, **kwargs),
                                                        rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        ids = jax.ShapeDtypeStruct((2, 6), jnp.int32)
        return len(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids).jaxpr.eqns)

    assert equations(2) == equations(12)
    assert equations(2, remat="full") == equations(12, remat="full")
    model = CausalLM(tiny_config(num_hidden_layers=3), rngs=nnx.Rngs(5))
    rngs = nnx.Rngs(5)
    Embed(model.config, rngs=rngs)
    for i in range(3):
        layer = DecoderLayer(model.config, rngs=rngs)
        np.testing.assert_array_equal(model.layers.self_attn.q_proj.kernel[...][i], layer.self_attn.q_proj.kernel[...])
        np.testing.assert_array_equal(model.layers.mlp.down_proj.kernel[...][i], layer.mlp.down_proj.kernel[...])


@pytest.mark.slow
def test_remat_saves_activation_memory():
    """With remat "full" the layer scan keeps one input per layer instead of every activation.
    Compile-only memory analysis of forward + backward."""
    config = tiny_config(num_hidden_layers=8, hidden_size=64, intermediate_size=256)

    def temp_bytes(remat):
        abstract = nnx.eval_shape(lambda: CausalLM(config.replace(remat=remat), rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        loss = lambda s, ids: jnp.mean(nnx.merge(graphdef, s)(ids))  # noqa: E731
        ids = jax.ShapeDtypeStruct((4, 256), jnp.int32)
        return jax.jit(jax.grad(loss)).lower(state, ids).compile().memory_analysis().temp_size_in_bytes

    plain, remat, dots = temp_bytes("none"), temp_bytes("full"), temp_bytes("dots")
    assert remat * 2 < plain, (remat, plain)
    assert remat < dots < plain, (remat, dots, plain)


def test_parameters_carry_logical_axes():
    model = nnx.eval_shape(lambda: CausalLM(tiny_config(), rngs=nnx.Rngs(0)))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert set(flat) == {row.path for row in hf_weight_table(model.config)}
    for path, variable in flat.items():
        axes = variable.get_metadata()["out_sharding"]
        assert len(axes) == len(variable.shape) and set(axes) <= set(LOGICAL_AXES), path
    q_kernel = flat[("layers", "self_attn", "q_proj", "kernel")]  # the layers stacked on a leading axis
    assert q_kernel.shape == (model.config.num_hidden_layers, 32, 4, 8)
    assert q_kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
    assert flat[("embed_tokens", "embedding")].get_metadata()["out_sharding"] == ("vocab", "embed")


def test_logical_to_mesh_spec_absent_axes_and_declared_fallbacks():
    from fipo_jax.parallel.sharding import rule

    devices = np.array(jax.devices()[:1]).reshape(1, 1)
    mesh = jax.sharding.Mesh(devices, ("fsdp", "tensor"))
    spec = logical_to_mesh_spec(("embed", "heads", "head_dim"), (32, 4, 8), mesh)
    assert tuple(spec) == ("fsdp", "tensor", None)
    # A mesh axis the mesh lacks counts as size 1: "data" is absent here, so embed stays whole.
    rules = {"embed": "data", "heads": "tensor", "kv_heads": "tensor"}
    assert tuple(logical_to_mesh_spec(("embed", "kv_heads"), (32, 2), mesh, rules)) == (None, "tensor")
    assert tuple(logical_to_mesh_spec(("embed", "mlp"), (31, 7), mesh)) == ("fsdp", "tensor")  # size 1 divides all
    assert tuple(logical_to_mesh_spec(None, (3, 5), mesh)) == ()  # no logical axes: replicated
    # Declared fallbacks: the default kv_heads rule, and a custom one, replicate what does not divide.
    abstract = jax.sharding.AbstractMesh((2, 4), ("fsdp", "tensor"))
    assert tuple(logical_to_mesh_spec(("embed", "kv_heads", "head_dim"), (32, 2, 8), abstract)) == ("fsdp", None, None)
    assert tuple(logical_to_mesh_spec(("embed", "kv_heads", "head_dim"), (32, 8, 8), abstract)) \
        == ("fsdp", "tensor", None)
    fallback = {"mlp": rule("tensor", if_indivisible="replicate")}
    assert tuple(logical_to_mesh_spec(("mlp",), (6,), abstract, fallback)) == (None,)
    assert tuple(logical_to_mesh_spec(("mlp",), (8,), abstract, fallback)) == ("tensor",)
    assert tuple(logical_to_mesh_spec(("mlp",), (8,), abstract, {"mlp": ("fsdp", "tensor")})) == (("fsdp", "tensor"),)


def test_a_rule_that_cannot_apply_raises_naming_tensor_shape_and_mesh():
    from fipo_jax.parallel.sharding import AxisRule, ShardingRuleError, param_shardings, rule

    devices = np.array(jax.devices()[:1]).reshape(1, 1)
    mesh = jax.sharding.Mesh(devices, ("fsdp", "tensor"))
    rules = {"heads": "tensor", "kv_heads": "tensor"}
    with pytest.raises(ShardingRuleError, match=r"cannot shard layers\.0\.k of shape \(4, 2\) with logical axes "
                                                r"\('heads', 'kv_heads'\) on mesh \{'fsdp': 1, 'tensor': 1\}: "
                                                r"mesh axis 'tensor' would split both 'heads' and 'kv_heads'"):
        logical_to_mesh_spec(("heads", "kv_heads"), (4, 2), mesh, rules, name="layers.0.k")
    # A collision is a table bug on any mesh, also one that lacks the axis.
    with pytest.raises(ShardingRuleError, match=r"on mesh \{'fsdp': 1, 'tensor': 1\}: mesh axis 'data' would split"):
        logical_to_mesh_spec(("embed", "mlp"), (4, 2), mesh, {"embed": "data", "mlp": ("data", "tensor")})
    with pytest.raises(ShardingRuleError, match="no rule for logical axis 'experts'"):
        logical_to_mesh_spec(("experts",), (8,), mesh)
    with pytest.raises(ShardingRuleError, match=r"2 logical axes for 3 dimensions"):
        logical_to_mesh_spec(("embed", "mlp"), (4, 2, 2), mesh)
    with pytest.raises(ShardingRuleError, match="rule for 'mlp' is malformed"):
        logical_to_mesh_spec(("mlp",), (8,), mesh, {"mlp": ("tensor", "tensor")})
    with pytest.raises(ShardingRuleError, match="if_indivisible"):
        AxisRule(("tensor",), "drop")
    abstract = jax.sharding.AbstractMesh((2, 4), ("fsdp", "tensor"))
    with pytest.raises(ShardingRuleError, match=r"cannot shard w of shape \(31, 8\) with logical axes \('embed', "
                                                r"'mlp'\) on mesh \{'fsdp': 2, 'tensor': 4\}: dimension 'embed' of "
                                                r"size 31 is not divisible by mesh axes \('fsdp',\) of total size 2"):
        logical_to_mesh_spec(("embed", "mlp"), (31, 8), abstract, name="w")
    with pytest.raises(ShardingRuleError, match=r"dimension 'mlp' of size 6 is not divisible"):
        logical_to_mesh_spec(("mlp",), (6,), abstract, {"mlp": rule("tensor")})  # no declared fallback
    # param_shardings names each parameter by its path; heads (no fallback) do not split 8 ways.
    model = nnx.eval_shape(lambda: CausalLM(tiny_config(), rngs=nnx.Rngs(0)))
    eight = jax.sharding.AbstractMesh((1, 8), ("fsdp", "tensor"))
    with pytest.raises(ShardingRuleError, match=r"cannot shard layers\.self_attn\.\w_proj\.(kernel|bias) of shape "
                                                r"\(.*\) with logical axes \(.*'heads'.*\) on mesh "
                                                r"\{'fsdp': 1, 'tensor': 8\}: dimension 'heads' of size 4"):
        param_shardings(nnx.state(model, nnx.Param), eight)


def test_load_weights_checks_every_rule_before_reading(tmp_path):
    from fipo_jax.models.hf_io import SafetensorsSource, load_weights
    from fipo_jax.parallel.sharding import DEFAULT_RULES, ShardingRuleError, rule

    save_pretrained(CausalLM(tiny_config(), rngs=nnx.Rngs(0)), tmp_path)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))
    reads = []

    class Source(SafetensorsSource):
        def read(self, names):
            reads.append(names)
            return super().read(names)

    bad = {**DEFAULT_RULES, "embed": rule("tensor")}  # embedding [vocab, embed]: both on "tensor"
    with pytest.raises(ShardingRuleError, match=r"cannot shard embed_tokens\.embedding of shape \(64, 32\)"):
        load_weights(Source(tmp_path), tiny_config(), mesh=mesh, rules=bad)
    assert reads == []


SHARDED_LOAD_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from fipo_jax.models import Qwen2Config, CausalLM, load_pretrained, save_pretrained
    from fipo_jax.parallel.sharding import param_shardings

    path = sys.argv[1]
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    reference = CausalLM(config, rngs=nnx.Rngs(0))
    save_pretrained(reference, path)
    devices = np.array(jax.devices()).reshape(2, 4)
    mesh = jax.sharding.Mesh(devices, ("fsdp", "tensor"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = load_pretrained(path, mesh=mesh)
    layer = model.layers  # stacked: a leading "layers" axis, never split
    specs = {
        "embed": model.embed_tokens.embedding[...].sharding.spec,
        "q": layer.self_attn.q_proj.kernel[...].sharding.spec,
        "k": layer.self_attn.k_proj.kernel[...].sharding.spec,
        "down": layer.mlp.down_proj.kernel[...].sharding.spec,
        "norm": layer.attn_norm.weight[...].sharding.spec,
    }
    assert tuple(specs["embed"]) == ("tensor", "fsdp"), specs
    assert tuple(specs["q"]) == (None, "fsdp", "tensor", None), specs
    assert tuple(specs["k"]) == (None, "fsdp", None, None), specs  # 2 kv heads do not split 4 ways
    assert tuple(specs["down"]) == (None, "tensor", "fsdp"), specs
    assert tuple(specs["norm"]) in ((), (None,), (None, None)), specs
    expected = param_shardings(model, mesh)
    actual = jax.tree.map(lambda v: v.sharding, nnx.state(model, nnx.Param))
    assert len(jax.tree.leaves(expected)) == 3 + 12
    assert jax.tree.leaves(expected) == jax.tree.leaves(actual)
    shard_shape = model.embed_tokens.embedding[...].addressable_shards[0].data.shape
    assert shard_shape == (16, 16), shard_shape
    ids = jnp.asarray(np.arange(12).reshape(2, 6) % 64, jnp.int32)
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(model, ids)),
                               np.asarray(reference(ids)), atol=1e-4, rtol=0)
    print("OK")
    """
)


@pytest.mark.slow
def test_load_onto_mesh_with_8_fake_devices(tmp_path):
    script = tmp_path / "sharded_load.py"
    script.write_text(SHARDED_LOAD_SCRIPT)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Query-chunked attention
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_query_chunked_attention_equals_full_attention():
    from fipo_jax.models.attention import AttentionMask, grouped_query_attention

    batch, q_len, heads, kv_heads, head_dim = 2, 37, 4, 2, 8
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, kv_heads, q_len, head_dim))
    v = jax.random.normal(keys[2], (batch, kv_heads, q_len, head_dim))
    real = np.ones((batch, q_len), bool)
    real[1, :5] = False  # left padding in row 1
    positions = positions_from_mask(jnp.asarray(real))
    mask = AttentionMask(jnp.arange(q_len, dtype=jnp.int32), jnp.asarray(real), positions, positions)
    expected = np.tril(np.ones((q_len, q_len), bool))[None] & real[:, None, :]
    np.testing.assert_array_equal(mask.allowed(), expected)

    def loss(q, k, v, chunk):
        out = grouped_query_attention(q, k, v, mask, 8**-0.5, None, chunk)
        return jnp.sum(jnp.sin(out) * jnp.asarray(real)[:, :, None, None]), out

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (full_grads, full_out) = grad(q, k, v, None)
    for chunk in (1, 8, 16, 37, 64):  # 37 = T (one chunk), 8 and 16 leave a padded last chunk
        chunk_grads, chunk_out = grad(q, k, v, chunk)
        np.testing.assert_allclose(chunk_out, full_out, atol=1e-6)
        for a, b in zip(chunk_grads, full_grads):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_attention_chunking_in_the_model_and_its_memory():
    ids = random_ids((2, 40), seed=3)
    full = CausalLM(tiny_config(), rngs=nnx.Rngs(0))
    chunked = CausalLM(tiny_config(attention_chunk_size=16), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(forward(chunked, ids), forward(full, ids), atol=1e-5)

    # XLA temporaries of attention forward + backward at T = 1024: unchunked they hold several
    # [4 heads, T, T] f32 tensors; with 128-query chunks about an eighth of that.
    from fipo_jax.models.attention import AttentionMask, grouped_query_attention

    t = 1024
    shapes = (jax.ShapeDtypeStruct((1, t, 4, 8), jnp.float32), jax.ShapeDtypeStruct((1, 2, t, 8), jnp.float32),
              jax.ShapeDtypeStruct((1, 2, t, 8), jnp.float32))
    slots = jnp.arange(t, dtype=jnp.int32)
    mask = AttentionMask(slots, jnp.ones((1, t), bool), slots[None], slots[None])

    def temp_bytes(chunk):
        fn = jax.grad(lambda q, k, v: jnp.sum(grouped_query_attention(q, k, v, mask, 8**-0.5, None, chunk)),
                      argnums=(0, 1, 2))
        return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    full, chunk_128 = temp_bytes(None), temp_bytes(128)
    assert full >= 4 * t * t * 4  # at least one [heads, T, T] f32 tensor
    assert chunk_128 * 6 < full  # measured: 48 MiB → 6.2 MiB (scales with the chunk)


# ---------------------------------------------------------------------------------------------
# Block-wise decode attention
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [1, 4, 5, 64])
def test_decode_attention_reads_written_blocks_and_equals_dense(block):
    """Decode attention over written blocks only = dense masked softmax over the whole cache,
    including a cache length (23) that the block does not divide and a padded row."""
    from fipo_jax.models.attention import AttentionMask, _attention, decode_attention

    batch, heads, kv_heads, head_dim, slots = 3, 4, 2, 8, 23
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (batch, heads, head_dim))
    # Slots after the query's are garbage a dense read would have to mask; make them huge.
    k = jax.random.normal(keys[1], (batch, kv_heads, slots, head_dim)).at[:, :, 15:].set(1e4)
    v = jax.random.normal(keys[2], (batch, kv_heads, slots, head_dim))
    valid = np.ones((batch, slots), bool)
    valid[1, :3] = False  # left padding
    valid[:, 15:] = False
    for query_slot in (0, 3, 7, 14):
        positions = positions_from_mask(jnp.asarray(valid))
        mask = AttentionMask(jnp.asarray([query_slot], jnp.int32), jnp.asarray(valid), positions[:, query_slot:][:, :1],
                             positions)
        dense = _attention(q[:, None], k, v, mask.allowed(), 8**-0.5)[:, 0]
        blocked = jax.jit(decode_attention, static_argnums=(4, 5))(q, k, v, mask, 8**-0.5, block)
        live = valid[:, : query_slot + 1].any(axis=1)  # rows with at least one visible key
        np.testing.assert_allclose(np.asarray(blocked)[live], np.asarray(dense)[live], atol=1e-5)
        # bfloat16 inputs: same dtype policy as the dense path (f32 scores and accumulation).
        half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
        dense16 = _attention(half[0][:, None], half[1], half[2], mask.allowed(), 8**-0.5)[:, 0]
        blocked16 = jax.jit(decode_attention, static_argnums=(4, 5))(*half, mask, 8**-0.5, block)
        assert blocked16.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(blocked16, np.float32)[live], np.asarray(dense16, np.float32)[live],
                                   atol=3e-2)


@pytest.mark.slow
def test_blocked_decode_matches_dense_decode_in_the_sampler():
    from fipo_jax.generation.sampling import SamplingConfig
    from fipo_jax.generation.static_sampler import generate

    dense = CausalLM(tiny_config(decode_block_size=None), rngs=nnx.Rngs(0))
    blocked = CausalLM(tiny_config(decode_block_size=8), rngs=nnx.Rngs(0))
    ids = random_ids((3, 6), seed=4)
    mask = np.ones_like(ids, bool)
    mask[0, :2] = False
    config = SamplingConfig(max_new_tokens=30, temperature=1.0, prompt_length_buckets=(8,))
    a = generate(dense, ids, mask, jax.random.key(2), config)
    b = generate(blocked, ids, mask, jax.random.key(2), config)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.log_probs, b.log_probs, atol=1e-5)
