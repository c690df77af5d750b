"""Write a transformers model as a GGUF file the way llama.cpp's converter does (test helper).

Metadata under `<arch>.*`, tensors under llama.cpp names, Llama q/k rows permuted for llama.cpp's
interleaved RoPE, Gemma norm weights stored as 1 + w, matrices quantised to `qtype` where their
rows allow it (F16 otherwise), vectors kept F32. `raw` overrides let a test store hand-made blocks
of any type (K-quants, unsupported types). `tokenizer` adds a tokenizer's `tokenizer.*` metadata, such
as the two small vocabularies below: SentencePiece-style (`tokenizer.ggml.model = "llama"`, scores and
no merges, as llama.cpp writes Llama 2 and Gemma) and byte-level BPE (`"gpt2"`, with merges, as it
writes Qwen2 and Llama 3).
"""

from __future__ import annotations

import gguf
import numpy as np

_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GEMMA_BLOCK = {**_BLOCK, "post_attention_layernorm.weight": "post_attention_norm.weight",
                "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}


def gguf_name(hf_name: str, arch: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{(_GEMMA_BLOCK if arch == 'gemma3' else _BLOCK)[rest]}"


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, path, arch: str, qtype=gguf.GGMLQuantizationType.F32, raw=None, metadata=None,
               truncate_to: int | None = None, tokenizer: dict | None = None) -> str:
    """Writes `model` (a transformers causal LM) to `path`; returns the path.

    raw: {gguf tensor name: (uint8 bytes [rows, row_bytes], GGMLQuantizationType)} written as is.
    metadata: extra (key, value) pairs, e.g. {"phi3.block_count": 2} with arch "phi3".
    tokenizer: {short key: value} written as `tokenizer.*` metadata (`add_tokenizer`).
    """
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    rope = config.rope_parameters
    writer.add_rope_freq_base((rope.get("full_attention") or rope)["rope_theta"])
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        writer.add_sliding_window(config.sliding_window)
    for key, value in (metadata or {}).items():
        writer.add_uint32(key, value)
    add_tokenizer(writer, tokenizer or {})
    raw = dict(raw or {})
    for name, tensor in model.state_dict().items():
        target = gguf_name(name, arch)
        if target in raw:
            data, dtype = raw.pop(target)
            writer.add_tensor(target, data, raw_dtype=dtype)  # uint8 blocks: the writer derives the shape
            continue
        array = tensor.float().numpy()
        if arch == "gemma3" and name.endswith("norm.weight"):
            array = array + 1.0
        if arch == "llama" and ".q_proj." in name:
            array = _permute(array, config.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            array = _permute(array, config.num_key_value_heads)
        dtype = qtype
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if array.ndim != 2 or array.shape[-1] % block:
            dtype = gguf.GGMLQuantizationType.F16 if array.ndim == 2 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(target, gguf.quants.quantize(array, dtype), raw_dtype=dtype)
    assert not raw, f"raw tensors not in the model: {list(raw)}"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate_to is not None:
        with open(path, "r+b") as f:
            f.truncate(truncate_to)
    return str(path)


def write_tokenizer_gguf(path, tokenizer: dict, arch: str = "llama") -> str:
    """A GGUF holding only `general.architecture` and `tokenizer` as metadata (no tensors); returns the path."""
    writer = gguf.GGUFWriter(str(path), arch)
    add_tokenizer(writer, tokenizer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


# Short key → the writer method that stores it under its `tokenizer.*` key (with the GGUF type llama.cpp uses).
_TOKENIZER_WRITERS = {
    "model": "add_tokenizer_model", "pre": "add_tokenizer_pre", "tokens": "add_token_list",
    "scores": "add_token_scores", "token_type": "add_token_types", "merges": "add_token_merges",
    "bos_token_id": "add_bos_token_id", "eos_token_id": "add_eos_token_id", "unknown_token_id": "add_unk_token_id",
    "padding_token_id": "add_pad_token_id", "add_bos_token": "add_add_bos_token", "add_eos_token": "add_add_eos_token",
    "add_space_prefix": "add_add_space_prefix", "chat_template": "add_chat_template",
}


def add_tokenizer(writer, tokenizer: dict) -> None:
    """Writes `tokenizer` ({short key: value}, keys of `_TOKENIZER_WRITERS`) as `tokenizer.*` metadata."""
    for key, value in tokenizer.items():
        getattr(writer, _TOKENIZER_WRITERS[key])(value)


NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = (int(t) for t in (
    gguf.TokenType.NORMAL, gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED,
    gguf.TokenType.BYTE))
# Words whose pieces the vocabularies hold (the rest of a text falls back to characters / bytes).
WORDS = ("the", "and", "Hello", "world", "answer", "is", "number", "café", "think", "step", "by", "12", "2024")
CHARACTERS = "abcdefghijklmnopqrstuvwxyzéABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()[]{}+-*/=<>_#$%^&|~@\n\t"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ START }}{{ m['role'] }}\n{{ m['content'] }}{{ END }}\n"
                 "{% endfor %}{% if add_generation_prompt %}{{ START }}assistant\n{% endif %}")


def _chat_template(start: str, end: str) -> str:
    return CHAT_TEMPLATE.replace("{{ START }}", start).replace("{{ END }}", end)


def _prefixes(words) -> list[str]:
    """Every prefix of ≥ 2 characters of each word, in order, once: each splits into two vocabulary pieces."""
    pieces = []
    for word in words:
        pieces += [word[:n] for n in range(2, len(word) + 1) if word[:n] not in pieces]
    return pieces


def sentencepiece_vocabulary(gemma: bool = False) -> dict:
    """A SentencePiece-style vocabulary (`tokenizer.ggml.model = "llama"`, no merges: they come from the
    scores): control and unknown tokens, 256 byte-fallback tokens, characters, and the prefixes of the
    words, bare and ▁-led. `gemma=True` follows Gemma's files: <pad> <eos> <bos> <unk> <mask> first, turn markers, and
    tokens made of spaces stored as real spaces (transformers respells them)."""
    if gemma:
        specials = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", UNKNOWN),
                    ("<mask>", CONTROL), ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL)]
    else:
        specials = [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL), ("<|im_start|>", CONTROL),
                    ("<|im_end|>", CONTROL), ("<think>", USER_DEFINED)]
    pieces = ["\u2581", *CHARACTERS, *_prefixes([*WORDS, *("\u2581" + w for w in WORDS)])]
    pieces += ["  ", "   "] if gemma else ["\u2581\u2581", "\u2581\u2581\u2581"]
    tokens = [t for t, _ in specials] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [k for _, k in specials] + [BYTE] * 256 + [NORMAL] * len(pieces)
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(pieces))]
    turn = ("<start_of_turn>", "<end_of_turn>") if gemma else ("<|im_start|>", "<|im_end|>")
    ids = {"bos_token_id": 2, "eos_token_id": 1, "unknown_token_id": 3, "padding_token_id": 0} if gemma else \
        {"bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0}  # no pad, no add_bos_token: llama.cpp's defaults
    return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "token_type": types, **ids,
            "chat_template": _chat_template(*turn), **({"add_bos_token": True} if gemma else {})}


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte → printable character map (what byte-level BPE vocabularies are written in)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def byte_level_vocabulary(pre: str = "qwen2") -> dict:
    """A byte-level BPE vocabulary (`tokenizer.ggml.model = "gpt2"`): the 256 byte symbols, merges that
    build each word, then the word after a space (and a newline pair), then control tokens and
    user-defined `<think>` / `</think>` at the end, as llama.cpp writes Qwen2; `pre` picks the split regex."""
    spell = _byte_spelling()
    tokens, merges = [spell[b] for b in range(256)], []
    for word in WORDS + ("\n\n",):
        symbols = [spell[b] for b in word.encode()]
        pairs = [("".join(symbols[:n - 1]), symbols[n - 1]) for n in range(2, len(symbols) + 1)]
        for left, right in pairs + [(spell[ord(" ")], "".join(symbols))]:  # the word, then space + word
            if left + right not in tokens:
                tokens.append(left + right)
                merges.append(f"{left} {right}")
    specials = [("<|endoftext|>", CONTROL), ("<|im_start|>", CONTROL), ("<|im_end|>", CONTROL),
                ("<think>", USER_DEFINED), ("</think>", USER_DEFINED)]
    types = [NORMAL] * len(tokens) + [k for _, k in specials]
    tokens += [t for t, _ in specials]
    endoftext = tokens.index("<|endoftext|>")
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "token_type": types, "merges": merges,
            "eos_token_id": endoftext, "padding_token_id": endoftext, "add_bos_token": False,
            "chat_template": _chat_template("<|im_start|>", "<|im_end|>").replace("{{ bos_token }}", "")}
