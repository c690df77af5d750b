"""Pretrained decoder LMs in flax.nnx: Qwen2/2.5, Qwen3, Llama 3 and Gemma 3 (text) as one decoder whose
family differences are config fields; HF safetensors and GGUF import, HF export, KV cache.

Modules: `config` (ModelConfig), `families` (HF configs and tensor names per family), `rope`,
`attention` (full / chunked / sliding / decode), `kv_cache`, `layers`, `decoder` (the layer stack),
`hf_io` (safetensors import/export), `export_folder` (where an export may go), `file_checks` (is a
checkpoint file / folder usable: paths, JSON, safetensors damage, non-finite weights), `gguf_io`
(GGUF import), `tokenizer`, `gguf_tokenizer`, `assets` (checkpoints that ship in packages). The
sharding rules table (`DEFAULT_RULES`, `logical_to_mesh_spec`, `param_shardings`) lives in
`fipo_jax.parallel.sharding`.
"""

import fipo_jax._requires.models  # noqa: F401  one-line ImportError without fipo_jax[models]

# isort: split
from fipo_jax.models.attention import AttentionMask, decode_attention, grouped_query_attention
from fipo_jax.models.config import (
    MODEL_TYPES,
    SUPPORTED_DTYPES,
    ModelConfig,
    ModelOptions,
    Qwen2Config,
    RopeScaling,
    UnsupportedConfigError,
)
from fipo_jax.models.decoder import CausalLM, positions_from_mask
from fipo_jax.models.export_folder import EXPORT_MARKER, ExportDiskFullError, ExportFolderError, check_export_folder
from fipo_jax.models.families import WeightMapping, config_from_hf, config_to_hf, hf_weight_table
from fipo_jax.models.file_checks import CheckpointFileError, checkpoint_files, nonfinite_tensors
from fipo_jax.models.hf_io import (
    CheckpointMismatchError,
    SafetensorsSource,
    TensorSource,
    load_pretrained,
    load_weights,
    save_pretrained,
)
from fipo_jax.models.kv_cache import KV_CACHE_AXES, KVCache, init_kv_cache
from fipo_jax.models.layers import LOGICAL_AXES, rms_norm
from fipo_jax.models.rope import apply_rope, rope_cos_sin, rope_inverse_frequencies

__all__ = [
    "EXPORT_MARKER",
    "KV_CACHE_AXES",
    "LOGICAL_AXES",
    "MODEL_TYPES",
    "SUPPORTED_DTYPES",
    "AttentionMask",
    "CheckpointFileError",
    "CheckpointMismatchError",
    "ExportDiskFullError",
    "ExportFolderError",
    "KVCache",
    "ModelConfig",
    "ModelOptions",
    "Qwen2Config",
    "CausalLM",
    "RopeScaling",
    "SafetensorsSource",
    "TensorSource",
    "UnsupportedConfigError",
    "WeightMapping",
    "apply_rope",
    "check_export_folder",
    "checkpoint_files",
    "config_from_hf",
    "config_to_hf",
    "decode_attention",
    "grouped_query_attention",
    "hf_weight_table",
    "init_kv_cache",
    "load_pretrained",
    "load_weights",
    "nonfinite_tensors",
    "positions_from_mask",
    "rms_norm",
    "rope_cos_sin",
    "rope_inverse_frequencies",
    "save_pretrained",
]
