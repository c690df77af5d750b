"""Write a transformers model as a GGUF file the way llama.cpp's converter does (test helper).

Metadata under `<arch>.*`, tensors under llama.cpp names, Llama q/k rows permuted for llama.cpp's
interleaved RoPE, Gemma norm weights stored as 1 + w, matrices quantised to `qtype` where their
rows allow it (F16 otherwise), vectors kept F32. `raw` overrides let a test store hand-made blocks
of any type (K-quants, unsupported types).
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
               truncate_to: int | None = None) -> str:
    """Writes `model` (a transformers causal LM) to `path`; returns the path.

    raw: {gguf tensor name: (uint8 bytes [rows, row_bytes], GGMLQuantizationType)} written as is.
    metadata: extra (key, value) pairs, e.g. {"phi3.block_count": 2} with arch "phi3".
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
