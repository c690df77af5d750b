"""The GGUF tokenizer built without torch (`fipo_jax.models.gguf_tokenizer`) equals transformers' own GGUF
tokenizer (`AutoTokenizer.from_pretrained(folder, gguf_file=…)`, whose metadata reader imports torch): on tiny
GGUFs of each tokenizer kind (SentencePiece-style for llama and gemma3, byte-level BPE with two split regexes
for qwen2 / qwen3) and on the real Gemma 3 270M (slow). It builds where torch cannot be imported, is cached
on disk by `load_tokenizer`, and damaged tokenizer metadata is refused in one line naming the file."""

import json
import os
import re
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import transformers  # noqa: E402

from fipo_jax.models import gguf_tokenizer as module  # noqa: E402
from fipo_jax.models.gguf_io import GGUFError  # noqa: E402
from fipo_jax.models.gguf_tokenizer import gguf_tokenizer  # noqa: E402
from fipo_jax.models.tokenizer import load_tokenizer  # noqa: E402
from tests.gguf_writer import (byte_level_vocabulary, sentencepiece_vocabulary, write_gguf,  # noqa: E402
                               write_tokenizer_gguf)
from tests.test_gguf import ARCHITECTURE_CASES, tiny  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [
    "Hello, world!",
    "the answer is 2024, step by step: 12 by 12",
    "Numbers: 3.14159, 1,000,000 and x_{i+1} = 0.5 x_i; $\\frac{1}{2}$ \\boxed{7}",
    "  leading spaces,\ttabs,\n\nnewlines\r\n and   runs of   spaces   ",
    "\n",
    " ",
    "Ünïcödé: café naïve, Ελληνικά, русский, 中文分词, 日本語, 한국어",
    "Emoji and symbols: 🚀🔥 ∑_{k=1}^{n} k, ∀ε>0, ≤ ≥ ≠ ∞ √",
    "Combining: e\u0301 a\u0308 vs é ä",
    "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhey<end_of_turn>\n<start_of_turn>model\n",
    "<s>x</s><unk> <bos>y<eos><pad><mask>",
    "<think>step by step</think> the answer",
    "<|endoftext|>Hello<|endoftext|>",
    "",
]
MESSAGES = [{"role": "system", "content": "Reason step by step."},
            {"role": "user", "content": "What is 12 by 12? Answer: \\boxed{}"},
            {"role": "assistant", "content": "  the answer is 144 🚀\n\nDone."}]
# case → (GGUF architecture, the tokenizer metadata the file carries)
CASES = {
    "llama-sentencepiece": ("llama", lambda: sentencepiece_vocabulary()),
    "gemma3-sentencepiece": ("gemma3", lambda: sentencepiece_vocabulary(gemma=True)),
    "qwen2-bpe-qwen2-split": ("qwen2", lambda: byte_level_vocabulary("qwen2")),
    "qwen3-bpe-default-split": ("qwen3", lambda: byte_level_vocabulary("default")),
}


def transformers_gguf_tokenizer(path):
    """transformers' own GGUF tokenizer (needs torch, which the test environment has)."""
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                      local_files_only=True)


def named_special_tokens(tokenizer) -> dict:
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {name: (getattr(tokenizer, name), getattr(tokenizer, f"{name}_id")) for name in names}


def assert_same_tokenizer(ours, theirs):
    """Same class, vocabulary, special tokens, add-BOS/EOS flags, chat template, padding side, pipeline,
    and the same ids / text from encode, decode and the chat template on `TEXTS` and `MESSAGES`."""
    assert type(ours) is type(theirs) and isinstance(ours, transformers.PreTrainedTokenizerFast)
    assert len(ours) == len(theirs)
    assert named_special_tokens(ours) == named_special_tokens(theirs)
    assert (ours.all_special_tokens, ours.all_special_ids) == (theirs.all_special_tokens, theirs.all_special_ids)
    assert (ours.add_bos_token, ours.add_eos_token) == (theirs.add_bos_token, theirs.add_eos_token)
    assert (ours.chat_template, ours.padding_side) == (theirs.chat_template, theirs.padding_side)
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    for text in TEXTS:
        ids = theirs.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), text
    if theirs.chat_template is not None:
        for prompt in (True, False):
            rendered = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=prompt)
            assert ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=prompt) == rendered
            assert ours.encode(rendered, add_special_tokens=False) == theirs.encode(rendered, add_special_tokens=False)


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory):
    """case → (path, ours, transformers') for a tiny model GGUF carrying the case's tokenizer (built once)."""
    built = {}

    def get(case: str):
        if case not in built:
            arch, vocabulary = CASES[case]
            folder = tmp_path_factory.mktemp(case)
            path = write_gguf(tiny(arch, **ARCHITECTURE_CASES[arch]), folder / "model.gguf", arch,
                              tokenizer=vocabulary())
            built[case] = path, gguf_tokenizer(path), transformers_gguf_tokenizer(path)
        return built[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_gguf_tokenizer_equals_transformers(tiny_case, case):
    _, ours, theirs = tiny_case(case)
    assert_same_tokenizer(ours, theirs)


# Metadata variants for the grouping step (the add-BOS rules among them); no tensors needed.
GROUPINGS = {
    "llama-no-add-bos-flag": lambda: sentencepiece_vocabulary(),
    "llama-add-bos-false": lambda: {**sentencepiece_vocabulary(), "add_bos_token": False, "add_eos_token": True},
    "gemma4-add-bos-true": lambda: {**sentencepiece_vocabulary(gemma=True), "model": "gemma4"},
    "gpt2-no-bos": lambda: byte_level_vocabulary(),
    "no-special-ids": lambda: {k: v for k, v in sentencepiece_vocabulary().items() if not k.endswith("_id")},
}


@pytest.mark.parametrize("grouping", list(GROUPINGS))
def test_metadata_is_grouped_as_transformers_groups_it(tmp_path, grouping):
    """Step 2 alone: `group_metadata` on the metadata the `gguf` package reads equals transformers'
    `get_gguf_tokenizer` on the same file (its own reader, with torch)."""
    from transformers.integrations.gguf import get_gguf_tokenizer

    path = write_tokenizer_gguf(tmp_path / "t.gguf", GROUPINGS[grouping]())
    assert module.group_metadata(module.read_tokenizer_metadata(path)) == get_gguf_tokenizer(path)


# What each tiny vocabulary does to a few texts: the equality above compares real tokenization
# (whole words, special tokens kept whole, byte fallback), not two tokenizers that split everything alike.
EXPECTED_PIECES = {
    "llama-sentencepiece": {"Hello the world": ["<s>", "\u2581Hello", "\u2581the", "\u2581world"],
                            "<|im_start|>x": ["<s>", "<|im_start|>", "x"],
                            "🚀": ["<s>", "\u2581", "<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]},
    "gemma3-sentencepiece": {"Hello the  world": ["<bos>", "Hello", "\u2581the", "\u2581", "\u2581world"],
                             "<start_of_turn>user": ["<bos>", "<start_of_turn>", "u", "s", "e", "r"]},
    "qwen2-bpe-qwen2-split": {"Hello the world": ["Hello", "\u0120the", "\u0120world"],
                              "<think>2024</think>": ["<think>", "2", "0", "2", "4", "</think>"]},
    "qwen3-bpe-default-split": {"Hello the world": ["Hello", "\u0120the", "\u0120world"],
                                "<|im_end|>2024": ["<|im_end|>", "2024"]},
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_vocabularies_tokenize_as_their_kind(tiny_case, case):
    _, ours, _ = tiny_case(case)
    for text, pieces in EXPECTED_PIECES[case].items():
        assert ours.convert_ids_to_tokens(ours.encode(text)) == pieces, text


def test_builds_where_torch_cannot_be_imported(tiny_case, tmp_path):
    """The runtime environment (requirements.txt) has no torch: there transformers' own GGUF path failed
    with `Could not import module 'read_gguf_metadata'`; `load_tokenizer` now imports no torch and gives
    transformers' ids (one case: every case runs the same code)."""
    path, _, theirs = tiny_case("qwen2-bpe-qwen2-split")
    code = ("import json, sys\nsys.modules['torch'] = None  # `import torch` raises ImportError from here on\n"
            "from fipo_jax.models.tokenizer import load_tokenizer\n"
            "tokenizer = load_tokenizer(sys.argv[1], cache_dir=sys.argv[2])\n"
            "print(json.dumps([tokenizer.encode(t) for t in json.loads(sys.argv[3])]))")
    proc = subprocess.run([sys.executable, "-c", code, path, str(tmp_path), json.dumps(TEXTS)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [theirs.encode(text) for text in TEXTS]


@pytest.mark.parametrize("case", list(CASES))
def test_load_tokenizer_builds_once_then_its_cache_gives_the_same_tokenizer(tiny_case, case, tmp_path, monkeypatch):
    """The cache reloads exactly what was built: transformers' save_pretrained + AutoTokenizer (the old
    cache) lost add_bos_token and rebuilt Qwen2Tokenizer's own pipeline (NFC) instead of the file's."""
    path, _, theirs = tiny_case(case)
    built = []
    read = module.read_gguf_tokenizer
    monkeypatch.setattr(module, "read_gguf_tokenizer", lambda p: built.append(p) or read(p))
    first = load_tokenizer(path, cache_dir=tmp_path)
    second = load_tokenizer(path, cache_dir=tmp_path)
    assert built == [path] and os.listdir(tmp_path) != []  # the second came from the cache
    assert_same_tokenizer(first, theirs)
    assert_same_tokenizer(second, theirs)


def test_a_damaged_cache_entry_is_rebuilt_with_a_warning(tiny_case, tmp_path):
    path, _, theirs = tiny_case("llama-sentencepiece")
    load_tokenizer(path, cache_dir=tmp_path)
    (entry,) = tmp_path.iterdir()
    (entry / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.warns(RuntimeWarning, match=re.escape(f"{entry}: damaged GGUF tokenizer cache (") +
                      ".*" + re.escape(f"); rebuilding it from {path}")):
        rebuilt = load_tokenizer(path, cache_dir=tmp_path)
    assert_same_tokenizer(rebuilt, theirs)
    assert_same_tokenizer(load_tokenizer(path, cache_dir=tmp_path), theirs)  # the entry was rewritten


# ------------------------------------------------------------------------------------------
# Damaged tokenizer metadata: one line naming the file and the key, nothing cached
# ------------------------------------------------------------------------------------------

def _without(vocabulary: dict, key: str) -> dict:
    return {k: v for k, v in vocabulary.items() if k != key}


DAMAGE = {
    "bos-id-outside": (lambda v: {**v, "bos_token_id": 10_000},
                       "GGUF metadata tokenizer.ggml.bos_token_id=10000 is outside the {n}-token vocabulary: "
                       "the file is damaged (re-download or re-convert it)"),
    "scores-short": (lambda v: {**v, "scores": v["scores"][:-1]},
                     "GGUF metadata tokenizer.ggml.scores holds {m} values for {n} tokens: the file is damaged"),
    "token-types-long": (lambda v: {**v, "token_type": v["token_type"] + [1]},
                         "GGUF metadata tokenizer.ggml.token_type holds {p} values for {n} tokens"),
    "no-tokens": (lambda v: _without(_without(_without(v, "tokens"), "scores"), "token_type"),
                  "GGUF metadata tokenizer.ggml.model='llama' comes without tokenizer.ggml.tokens: the file is "
                  "damaged"),
    "unknown-kind": (lambda v: {**v, "model": "bert"},
                     "transformers cannot build a tokenizer from this GGUF file: ValueError: Cannot build a tokenizer "
                     "from a GGUF file stating tokenizer 'bert'"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_tokenizer_metadata_is_refused_in_one_line(tmp_path, damage):
    vocabulary = sentencepiece_vocabulary()
    change, message = DAMAGE[damage]
    n = len(vocabulary["tokens"])
    path = write_tokenizer_gguf(tmp_path / "damaged.gguf", change(vocabulary))
    with pytest.raises(GGUFError) as refused:
        load_tokenizer(path, cache_dir=tmp_path / "cache")
    text = str(refused.value)
    assert text.startswith(f"{path}: " + message.format(n=n, m=n - 1, p=n + 1)) and "\n" not in text, text
    assert not (tmp_path / "cache").exists()


def test_a_truncated_gguf_is_named(tmp_path):
    path = write_tokenizer_gguf(tmp_path / "cut.gguf", sentencepiece_vocabulary())
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(GGUFError, match="^" + re.escape(path) + r" is not a readable GGUF file \(truncated or "):
        load_tokenizer(path, cache_dir=tmp_path / "cache")


# The real Gemma 3 270M against transformers: tests/test_gguf.py (it shares that module's parsed file).
