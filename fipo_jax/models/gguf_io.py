"""GGUF (llama.cpp) checkpoints: the model config from the file's metadata, tensors dequantised on load.

A `.gguf` file holds metadata (`<arch>.block_count`, `<arch>.attention.head_count`, …, the
tokenizer) and tensors under llama.cpp's names (`blk.3.attn_q.weight`), each float (F32, F16,
BF16) or block-quantised (Q8_0, Q4_K, …). `load_gguf` builds the `ModelConfig` from the
metadata, maps every tensor to its Hugging Face name, dequantises it with the `gguf` package to
float32 and casts it straight to the requested dtype, one tensor at a time, through the same
checks and placement as safetensors (`hf_io.load_weights`). llama.cpp's conventions are undone
on the way: Gemma norm weights are stored as 1 + w, and Llama q/k projection rows are permuted
for llama.cpp's interleaved RoPE.

Supported architectures: gemma3 (text), llama, qwen2, qwen3. Quantisation types: `READABLE_TYPES`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fipo_jax.models.config import ModelOptions, UnsupportedConfigError
from fipo_jax.models.families import config_from_hf
from fipo_jax.models.file_checks import CheckpointFileError
from fipo_jax.models.weights import TensorInfo, TensorSource, load_from_source

# GGUF general.architecture → our model_type.
ARCHITECTURES = {"gemma3": "gemma3_text", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# Tensor types dequantised on load (with the `gguf` package's reference numpy dequantisers).
READABLE_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                  "Q6_K")

# llama.cpp tensor name (inside a block) → HF name (inside a layer); the Gemma column differs
# because Gemma's HF post_attention_layernorm is the attention *output* norm.
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_GEMMA_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


class GGUFError(CheckpointFileError):
    """A file that is not a readable GGUF checkpoint (truncated, corrupt, or missing metadata)."""


def read_gguf(path: str | os.PathLike):
    """`gguf.GGUFReader` over `path` (memory-mapped), with a clear error for a damaged file."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path!r}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # the reader raises ValueError / IndexError / struct errors on damage
        raise GGUFError(f"{path} is not a readable GGUF file (truncated or corrupt?): "
                        f"{type(error).__name__}: {error}") from error
    size = os.path.getsize(path)
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise GGUFError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}")
    return reader


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def _metadata(reader, arch: str):
    """``meta(key, default=KeyError)``: the file's ``{arch}.{key}`` value; a missing required key
    raises `GGUFError`, a per-layer (list) value `UnsupportedConfigError`."""

    def meta(key: str, default: Any = KeyError) -> Any:
        value = _field(reader, f"{arch}.{key}", None)
        if value is None:
            if default is KeyError:
                raise GGUFError(f"GGUF metadata {arch}.{key} is missing")
            return default
        if isinstance(value, list):
            raise UnsupportedConfigError(f"per-layer GGUF metadata {arch}.{key}={value!r} is not supported")
        return value

    return meta


def _llama_fields(meta, tensors, d) -> dict[str, Any]:
    return {"attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": "blk.0.ffn_up.bias" in tensors}


def _qwen3_fields(meta, tensors, d) -> dict[str, Any]:
    return {"attention_bias": "blk.0.attn_q.bias" in tensors}


def _gemma3_fields(meta, tensors, d) -> dict[str, Any]:
    """llama.cpp's Gemma 3 graph: local layers everywhere but every 6th, local RoPE θ 10⁴ unscaled,
    attention scale 1/√head_dim (1/√(hidden/heads) for the 27B model); RoPE in transformers-5 form."""
    if meta("final_logit_softcapping", None) is not None or meta("attn_logit_softcapping", None) is not None:
        raise UnsupportedConfigError("Gemma logit soft-capping is not supported")
    full = {"rope_type": "default", "rope_theta": d.pop("rope_theta"), **d.pop("rope_scaling", {})}
    plain_scale = d["hidden_size"] // d["num_attention_heads"]
    return {"sliding_window": int(meta("attention.sliding_window")), "sliding_window_pattern": 6,
            "rope_local_base_freq": 10000.0,
            "query_pre_attn_scalar": plain_scale if d["num_hidden_layers"] == 62 else d["head_dim"],
            "rope_parameters": {"full_attention": full}}


# What each architecture adds to the common fields (may pop some of them).
_ARCHITECTURE_FIELDS = {"llama": _llama_fields, "qwen2": lambda meta, tensors, d: {}, "qwen3": _qwen3_fields,
                        "gemma3": _gemma3_fields}


def _check_supported(meta, tensors, arch: str, head_dim: int) -> None:
    """Refuses what the decoder does not compute: v ≠ k head width, partial or per-frequency RoPE,
    RoPE scaling other than linear."""
    if int(meta("attention.value_length", head_dim)) != head_dim:
        raise UnsupportedConfigError(f"{arch}.attention.value_length != key_length is not supported")
    if int(meta("rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedConfigError(f"partial rotary embeddings not supported: {arch}.rope.dimension_count="
                                     f"{meta('rope.dimension_count')} < head_dim {head_dim}")
    if "rope_freqs.weight" in tensors:
        raise UnsupportedConfigError("per-frequency RoPE factors (tensor rope_freqs.weight, llama.cpp's form of "
                                     "Llama 3.1 rope scaling) are not supported from GGUF; load the Hugging Face "
                                     "checkpoint instead")
    if meta("rope.scaling.type", "none") not in ("none", "linear"):
        raise UnsupportedConfigError(f"GGUF RoPE scaling {arch}.rope.scaling.type="
                                     f"{meta('rope.scaling.type')!r} is not supported")


def gguf_hf_config(reader) -> dict[str, Any]:
    """The Hugging Face `config.json` dict that the file's metadata describes: the fields every
    architecture shares, then the architecture's own (`_ARCHITECTURE_FIELDS`).

    Raises:
      UnsupportedConfigError: an architecture or setting this decoder does not compute.
      GGUFError: required metadata is missing.
    """
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedConfigError(f"GGUF architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}
    meta = _metadata(reader, arch)
    if "token_embd.weight" not in tensors:
        raise GGUFError("the GGUF file has no token_embd.weight tensor")
    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // heads))
    _check_supported(meta, tensors, arch, head_dim)
    d: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "vocab_size": int(list(tensors["token_embd.weight"].shape)[-1]),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(meta("context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
    }
    if meta("rope.scaling.type", "none") == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": float(meta("rope.scaling.factor"))}
    for key in ("bos_token_id", "eos_token_id"):
        token = _field(reader, f"tokenizer.ggml.{key}")
        if token is not None:
            d[key] = int(token)
    d.update(_ARCHITECTURE_FIELDS[arch](meta, tensors, d))
    return d


class GGUFSource(TensorSource):
    """A GGUF file's tensors under their Hugging Face names, dequantised and in HF layout."""

    readable_types = READABLE_TYPES

    def __init__(self, reader, hf_config: Mapping[str, Any], path: str):
        self.reader = reader
        self.description = path
        self.arch = _field(reader, "general.architecture")
        self.config = hf_config
        block_names = _GEMMA_BLOCK_NAMES if self.arch == "gemma3" else _BLOCK_NAMES
        self.tensors = {}
        for tensor in reader.tensors:
            self.tensors[_hf_name(tensor.name, block_names)] = tensor

    def infos(self) -> dict[str, TensorInfo]:
        return {name: TensorInfo(tuple(int(n) for n in reversed(list(t.shape))), t.tensor_type.name,
                                 t.tensor_type.name in READABLE_TYPES)
                for name, t in self.tensors.items()}

    def read(self, names: Sequence[str]):
        import gguf

        for name in names:
            tensor = self.tensors[name]
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            array = array.reshape(tuple(int(n) for n in reversed(list(tensor.shape))))
            yield name, self._undo_conventions(name, array)

    def locate(self, name: str) -> tuple[str, str]:
        tensor = self.tensors.get(name)
        return self.description, name if tensor is None else tensor.name

    def _undo_conventions(self, name: str, array: np.ndarray) -> np.ndarray:
        if self.arch == "gemma3" and name.endswith("norm.weight"):
            return array - np.float32(1.0)  # llama.cpp stores Gemma's (1 + w)
        if self.arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = self.config["num_attention_heads"] if ".q_proj." in name else self.config["num_key_value_heads"]
            return _unpermute_rotary_rows(array, heads)
        return array


def _hf_name(gguf_name: str, block_names: Mapping[str, str]) -> str:
    """HF name of a llama.cpp tensor name; unknown names are kept (and reported as unexpected)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in block_names:
        return f"model.layers.{parts[1]}.{block_names[parts[2]]}"
    return gguf_name


def _unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Llama q/k row permutation (HF rotate-half → interleaved RoPE pairs).

    llama.cpp writes w.reshape(h, 2, r/2, …).swapaxes(1, 2) for r rows per head; this reads it back.
    """
    rows_per_head = weight.shape[0] // num_heads
    return (weight.reshape(num_heads, rows_per_head // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def load_gguf(path: str | os.PathLike, options: ModelOptions = ModelOptions(), *, mesh=None, rules=None):
    """A `CausalLM` from a `.gguf` file (see the module docstring); options as `load_pretrained`."""
    path = os.fspath(path)
    reader = read_gguf(path)
    try:
        hf_config = gguf_hf_config(reader)
    except (GGUFError, UnsupportedConfigError) as error:
        raise type(error)(f"{path}: {error}") from error
    config = config_from_hf(hf_config, options)
    return load_from_source(GGUFSource(reader, hf_config, path), config, mesh=mesh, rules=rules)
