"""Qwen2 / Qwen2.5 policy model in flax.nnx with logical axis names, HF import/export and a KV cache."""

from fipo_jax.models.config import SUPPORTED_DTYPES, Qwen2Config, UnsupportedConfigError
from fipo_jax.models.hf_io import (
    DEFAULT_RULES,
    CheckpointMismatchError,
    WeightMapping,
    checkpoint_files,
    load_pretrained,
    load_weights,
    logical_to_mesh_spec,
    param_shardings,
    save_pretrained,
    weight_mapping,
)
from fipo_jax.models.qwen2 import (
    KV_CACHE_AXES,
    LOGICAL_AXES,
    KVCache,
    Qwen2ForCausalLM,
    apply_rope,
    grouped_query_attention,
    init_kv_cache,
    positions_from_mask,
    rms_norm,
    rope_cos_sin,
)

__all__ = [
    "DEFAULT_RULES",
    "KV_CACHE_AXES",
    "LOGICAL_AXES",
    "SUPPORTED_DTYPES",
    "CheckpointMismatchError",
    "KVCache",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "UnsupportedConfigError",
    "WeightMapping",
    "apply_rope",
    "checkpoint_files",
    "grouped_query_attention",
    "init_kv_cache",
    "load_pretrained",
    "load_weights",
    "logical_to_mesh_spec",
    "param_shardings",
    "positions_from_mask",
    "rms_norm",
    "rope_cos_sin",
    "save_pretrained",
    "weight_mapping",
]
