"""GGUF checkpoints: the real Gemma 3 270M from its package against transformers' own GGUF loading,
tiny files of every accepted architecture and tensor type written with `gguf.GGUFWriter`, and
clear errors for files we cannot read."""

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gguf  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from fipo_jax.models import (CheckpointFileError, CheckpointMismatchError, UnsupportedConfigError,  # noqa: E402
                             load_pretrained)
from fipo_jax.models.assets import gemma3_270m_gguf  # noqa: E402
from fipo_jax.models.gguf_io import GGUFError, gguf_hf_config, read_gguf  # noqa: E402
from fipo_jax.models.tokenizer import load_tokenizer  # noqa: E402
from fipo_jax.generation.sampling import SamplingConfig  # noqa: E402
from fipo_jax.generation.static_sampler import generate
from tests.gguf_writer import write_gguf  # noqa: E402
from tests.test_families import perturbed  # noqa: E402

Q = gguf.GGMLQuantizationType
VOCAB = 64


@nnx.jit
def forward(model, ids):
    return model(jnp.asarray(ids))


def hf_gguf(path):
    """transformers' own loading of the same GGUF file (its reference dequantisation and mapping)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def tiny(model_type: str, **overrides):
    """Tiny random transformers model with rows that quantise (multiples of 32), norms perturbed."""
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
               "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=256)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return perturbed(classes[model_type][1](classes[model_type][0](**kwargs)))


# transformers reads head_dim from GGUF metadata only for some architectures (Qwen3: fixed 128,
# Gemma 3's query_pre_attn_scalar: fixed 256), so those files use the values it assumes.
ARCHITECTURE_CASES = {
    "llama": dict(),
    "qwen2": dict(),
    "qwen3": dict(head_dim=128),
    "gemma3": dict(head_dim=256, num_hidden_layers=7, sliding_window=4, num_key_value_heads=1),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURE_CASES))
def test_tiny_gguf_of_each_architecture_matches_transformers(tmp_path, arch):
    """Same file, two loaders: ours equals transformers' GGUF loading (Q8_0 matrices), and both
    stay close to the unquantised original."""
    original = tiny(arch, **ARCHITECTURE_CASES[arch])
    path = write_gguf(original, tmp_path / f"{arch}.gguf", arch, Q.Q8_0)
    ours = load_pretrained(path)
    assert ours.config.model_type == {"gemma3": "gemma3_text"}.get(arch, arch)
    if arch == "gemma3":  # every 6th layer global, as llama.cpp and transformers assume for GGUF
        assert ours.config.layer_types[5] == "full_attention" and ours.config.layer_types.count("full_attention") == 1
    ids = np.random.RandomState(0).randint(0, VOCAB, size=(2, 12))
    ref = torch_logits(hf_gguf(path), ids)
    got = np.asarray(forward(ours, ids))
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert np.abs(got - torch_logits(original, ids)).max() < 0.1 * np.abs(ref).max()  # Q8_0 rounding only


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1],
                         ids=lambda q: q.name)
def test_tensor_types_dequantise_like_transformers(tmp_path, qtype):
    original = tiny("llama")
    path = write_gguf(original, tmp_path / "llama.gguf", "llama", qtype)
    assert {t.tensor_type for t in read_gguf(path).tensors if len(t.shape) == 2} == {qtype}
    ids = np.random.RandomState(1).randint(0, VOCAB, size=(2, 9))
    np.testing.assert_allclose(np.asarray(forward(load_pretrained(path), ids)), torch_logits(hf_gguf(path), ids),
                               atol=1e-4, rtol=0)


def _k_quant_blocks(qtype, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random but well-formed super-blocks: random quants and scales, small finite fp16 factors."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    data = np.random.RandomState(seed).randint(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    # Offsets of the fp16 factors (d, dmin) in each block, from ggml's block layouts.
    factors = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q5_K: (0, 2), Q.Q4_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    for offset in factors:
        data[:, :, offset:offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_super_blocks_load_like_transformers(tmp_path, qtype):
    """K-quants (256-element super-blocks) in the MLP matrices of a 256-wide model."""
    original = tiny("llama", hidden_size=256, intermediate_size=256, num_hidden_layers=1)
    raw = {f"blk.0.{name}.weight": (_k_quant_blocks(qtype, 256, 256, seed), qtype)
           for seed, name in enumerate(("ffn_gate", "ffn_up", "ffn_down"))}
    path = write_gguf(original, tmp_path / "llama.gguf", "llama", Q.F16, raw=raw)
    ids = np.random.RandomState(2).randint(0, VOCAB, size=(1, 7))
    ref = torch_logits(hf_gguf(path), ids)
    np.testing.assert_allclose(np.asarray(forward(load_pretrained(path), ids)), ref, atol=1e-4 * max(1, np.abs(ref).max()),
                               rtol=0)


# ------------------------------------------------------------------------------------------
# Files we cannot read
# ------------------------------------------------------------------------------------------


def test_unsupported_quantisation_type_is_named(tmp_path):
    original = tiny("llama")
    block_bytes = gguf.GGML_QUANT_SIZES[Q.IQ4_NL][1]
    blocks = np.zeros((128, 64 // 32 * block_bytes), np.uint8)
    path = write_gguf(original, tmp_path / "iq.gguf", "llama", Q.F16, raw={"blk.1.ffn_up.weight": (blocks, Q.IQ4_NL)})
    with pytest.raises(CheckpointMismatchError, match=r"model.layers.1.mlp.up_proj.weight: IQ4_NL.*readable: .*Q4_K"):
        load_pretrained(path)


def test_unsupported_architecture_is_named(tmp_path):
    path = write_gguf(tiny("llama"), tmp_path / "phi.gguf", "phi3")
    with pytest.raises(UnsupportedConfigError, match=r"GGUF architecture 'phi3' is not supported.*gemma3"):
        load_pretrained(path)


def test_truncated_and_foreign_files(tmp_path):
    path = write_gguf(tiny("llama"), tmp_path / "full.gguf", "llama")
    size = os.path.getsize(path)
    for cut in (size - 100, size // 2, 40, 6):
        cut_path = write_gguf(tiny("llama"), tmp_path / f"cut{cut}.gguf", "llama", truncate_to=cut)
        with pytest.raises(GGUFError, match="truncated|not a readable GGUF"):
            load_pretrained(cut_path)
    foreign = tmp_path / "model.gguf"
    foreign.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(GGUFError, match=r"not a GGUF file \(starts with b'PK"):
        load_pretrained(str(foreign))
    with pytest.raises(FileNotFoundError, match=r"model path '.*missing.gguf' does not exist"):
        load_pretrained(str(tmp_path / "missing.gguf"))


def test_gguf_tensor_mismatch_lists_every_problem(tmp_path):
    original = tiny("llama")
    del original.model.layers[1].mlp.up_proj  # the file then lacks blk.1.ffn_up.weight
    original.model.layers[1].mlp.up_proj = None
    state = {k: v for k, v in original.state_dict().items()}
    assert "model.layers.1.mlp.up_proj.weight" not in state
    path = write_gguf(original, tmp_path / "missing.gguf", "llama")
    with pytest.raises(CheckpointMismatchError, match=r"missing tensors \(1\): \['model.layers.1.mlp.up_proj.weight'\]"):
        load_pretrained(path)


def test_gguf_nonfinite_weights_are_named(tmp_path):
    """NaN / ±inf weights (here F32, stored as is) are refused naming the llama.cpp and HF tensor names."""
    original = tiny("llama")
    with torch.no_grad():
        original.model.layers[1].mlp.up_proj.weight[2, 3] = float("nan")
        original.model.norm.weight[0] = float("inf")
    path = write_gguf(original, tmp_path / "nan.gguf", "llama")
    with pytest.raises(CheckpointFileError, match=r"2 tensor\(s\) hold NaN or ±inf values .*: " + re.escape(
            f"{path}: ['output_norm.weight (model.norm.weight)', "
            "'blk.1.ffn_up.weight (model.layers.1.mlp.up_proj.weight)']") + "$"):
        load_pretrained(path)


def test_gguf_metadata_errors_and_tokenizer_failures_name_the_file(tmp_path):
    path = write_gguf(tiny("llama"), tmp_path / "notok.gguf", "llama")
    with pytest.raises(GGUFError, match=re.escape(path) + ": transformers cannot build a tokenizer from this GGUF "
                                                          "file: ValueError: Cannot build a tokenizer"):
        load_tokenizer(path, cache_dir=tmp_path / "cache")
    phi = write_gguf(tiny("llama"), tmp_path / "phi.gguf", "phi3")
    with pytest.raises(UnsupportedConfigError, match=re.escape(phi) + ": GGUF architecture 'phi3'"):
        load_pretrained(phi)


def test_gguf_llama3_rope_factors_are_refused(tmp_path):
    path = tmp_path / "rope.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("llama.embedding_length", 64), ("llama.attention.head_count", 4), ("llama.block_count", 1),
                       ("llama.feed_forward_length", 128), ("llama.context_length", 64)):
        writer.add_uint32(key, value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_tensor("token_embd.weight", np.zeros((VOCAB, 64), np.float32))
    writer.add_tensor("rope_freqs.weight", np.ones(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedConfigError, match="rope_freqs.weight"):
        gguf_hf_config(read_gguf(path))


# ------------------------------------------------------------------------------------------
# The real Gemma 3 270M (assembled once from its package into the fipo_jax cache)
# ------------------------------------------------------------------------------------------

REAL_PROMPTS = [
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Q: A shop sells 12 pens in a box. How many pens are in 5 boxes?\nA: Let's think step by step.",
]


@pytest.fixture(scope="module")
def gemma():
    """(path, our model, transformers' model, tokenizer) for the real Gemma 3 270M.

    `gguf.GGUFReader` parses the file's metadata (a 262k-token vocabulary) in Python: seconds per
    parse, and our loader, transformers' config, weight and tokenizer loading each construct one. While
    the real-model tests run, the readers of this one read-only file are one parsed reader (both
    loaders still read everything from the file; only the repeated parse is saved)."""
    path = gemma3_270m_gguf()
    parse, parsed = gguf.GGUFReader, {}

    def shared_reader(file, mode="r"):
        if mode != "r" or os.path.realpath(file) != os.path.realpath(path):
            return parse(file, mode)
        if "reader" not in parsed:
            parsed["reader"] = parse(file, mode)
        return parsed["reader"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", shared_reader)
        yield path, load_pretrained(path), hf_gguf(path), load_tokenizer(path)


@pytest.mark.slow
def test_real_gemma3_270m_logits_match_transformers(gemma):
    """float32, real prompts: |ours − transformers| ≤ 2e-4 on logits of magnitude ~30 (measured
    8e-5); the argmax agrees everywhere."""
    path, ours, theirs, tokenizer = gemma
    config = ours.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == \
        ("gemma3_text", 18, 640, 262144)
    assert config.layer_types.count("full_attention") == 3 and config.sliding_window == 512
    for prompt in REAL_PROMPTS:
        ids = tokenizer(prompt, return_tensors="np")["input_ids"]
        assert ids[0, 0] == tokenizer.bos_token_id == 2
        ref = torch_logits(theirs, ids)
        got = np.asarray(forward(ours, ids))
        assert np.abs(ref).max() > 10
        np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)
        np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_real_gemma3_270m_greedy_continuations_match_transformers(gemma):
    """32 greedy tokens, identical to transformers.generate, through our jitted KV-cache sampler."""
    path, ours, theirs, tokenizer = gemma
    theirs.generation_config.eos_token_id = None
    config = SamplingConfig(max_new_tokens=32, temperature=0.0, prompt_length_buckets=(32,))
    for prompt in REAL_PROMPTS[:2]:
        ids = tokenizer(prompt, return_tensors="np")["input_ids"]
        with torch.no_grad():
            ref = theirs.generate(torch.tensor(ids), do_sample=False, max_new_tokens=32)[0, ids.shape[1]:].numpy()
        got = np.asarray(generate(ours, ids, None, jax.random.key(0), config).tokens[0])
        np.testing.assert_array_equal(got, ref)
    assert "France" in tokenizer.decode(got)  # measured: " the capital of the country of France. It is the …"


@pytest.mark.slow
def test_real_gemma3_tokenizer_comes_from_the_file_equals_transformers_and_caches(gemma):
    """Ours (built from the file's metadata without torch, then read back from its cache) against
    transformers' own GGUF tokenizer: same pipeline, specials, flags, ids and chat template output."""
    from tests.test_gguf_tokenizer import (MESSAGES, assert_same_tokenizer, named_special_tokens,
                                           transformers_gguf_tokenizer)

    path, _, _, ours = gemma
    theirs, cached = transformers_gguf_tokenizer(path), load_tokenizer(path)  # the second load reads the cache
    for tokenizer in (ours, cached):
        assert_same_tokenizer(tokenizer, theirs)
    assert named_special_tokens(ours) == {"bos_token": ("<bos>", 2), "eos_token": ("<eos>", 1),
                                          "unk_token": ("<unk>", 3), "pad_token": ("<pad>", 0)}
    assert len(ours) == 262_144 and ours.add_bos_token and ours.chat_template is None  # a base model: no template
    for text in REAL_PROMPTS + ["naïve café 北京 🙂\n\n  spaces"]:
        assert cached(text)["input_ids"] == ours(text)["input_ids"] == theirs(text)["input_ids"]
    template = "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    rendered = theirs.apply_chat_template(MESSAGES, tokenize=False, chat_template=template)
    assert ours.apply_chat_template(MESSAGES, tokenize=False, chat_template=template) == rendered
    assert ours.encode(rendered) == theirs.encode(rendered)