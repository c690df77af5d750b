"""Decoder configuration: one frozen, validated description for every supported family.

Qwen2 / Qwen2.5, Qwen3, Llama 3.x and Gemma 3 (text) are the same pre-norm decoder with a few
switches, and `ModelConfig` names each switch as a field (the defaults describe Qwen2):

    field                  Qwen2   Qwen3   Llama 3   Gemma 3
    qkv_bias               yes     no      no        no
    qk_norm                no      yes     no        yes       (per-head RMSNorm on q and k)
    norm_unit_offset       no      no      no        yes       (RMSNorm scales by 1 + w)
    sandwich_norms         no      no      no        yes       (norms after attention and MLP too)
    hidden_activation      silu    silu    silu      gelu_pytorch_tanh
    scale_embeddings       no      no      no        yes       (× √D in the compute dtype)
    query_pre_attn_scalar  —       —       —         256       (scores × scalar^−½, not head_dim^−½)
    rope_scaling           —       —       llama3    linear on global layers of the larger sizes
    layer_types            full    full    full      5 sliding : 1 full, own RoPE θ per type

`fipo_jax.models.families` reads and writes the Hugging Face configs of each family; anything a
config asks for that this decoder does not compute raises `UnsupportedConfigError` there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from fipo_jax.core import _checks

SUPPORTED_DTYPES = ("float32", "bfloat16")
MODEL_TYPES = ("qwen2", "qwen3", "llama", "gemma3_text")
LAYER_TYPES = ("full_attention", "sliding_attention")
HIDDEN_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
ROPE_SCALING_TYPES = ("linear", "llama3")
# What each step of the layer scan keeps for the backward pass (`decoder.CHECKPOINT_POLICIES`):
# "none" every activation, "full" only the layer's input (all else recomputed), "dots" the outputs
# of the weight matmuls (attention scores and elementwise work recomputed).
REMAT_POLICIES = ("none", "full", "dots")
# Full-sequence attention (`attention.full_attention`): "auto" picks per backend
# (`attention.AUTO_ATTENTION`), "xla" is this library's own XLA code, "cudnn" the GPU's fused kernel
# through `jax.nn.dot_product_attention`, "splash" the TPU's Pallas splash-attention kernel.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


class UnsupportedConfigError(ValueError):
    """A model config asks for semantics this decoder does not compute (names the field)."""


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How a model runs, whatever its architecture: the runtime fields of `ModelConfig`, as one value.

    The loaders (`load_pretrained`, `load_gguf`, `config_from_hf`) and the run configuration
    (`TrainConfig.model.options`) pass these together; `ModelConfig.options` reads them back and
    `ModelConfig.with_options` sets them. ``compute_dtype=None`` computes in the parameters' dtype;
    each field is validated by `ModelConfig` (see its docstring for what each means).
    """

    dtype: str = "float32"
    compute_dtype: str | None = None
    remat: str | bool = "none"
    attention_chunk_size: int | None = None
    attention_impl: str = "auto"

    def config_fields(self) -> dict[str, Any]:
        """The `ModelConfig` fields these options set (``compute_dtype`` resolved)."""
        return dict(dtype=self.dtype, compute_dtype=self.compute_dtype or self.dtype, remat=self.remat,
                    attention_chunk_size=self.attention_chunk_size, attention_impl=self.attention_impl)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling of RoPE (Hugging Face `rope_type` "linear" or "llama3").

    linear:  ω_i ← ω_i / factor.
    llama3:  with wavelength λ_i = 2π / ω_i, L = original_max_position_embeddings,
             ω_i                                   if λ_i < L / high_freq_factor,
             ω_i / factor                          if λ_i > L / low_freq_factor,
             (1 − s) ω_i / factor + s ω_i          otherwise, s = (L / λ_i − low) / (high − low).
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        _checks.check_choice("RopeScaling.rope_type", self.rope_type, ROPE_SCALING_TYPES)
        _checks.check_number("RopeScaling.factor", self.factor, minimum=0, exclusive_minimum=True)
        if self.rope_type == "llama3":
            _checks.require(0 < self.low_freq_factor < self.high_freq_factor,
                            "RopeScaling needs 0 < low_freq_factor < high_freq_factor, got "
                            f"{self.low_freq_factor!r}, {self.high_freq_factor!r}")
            _checks.check_int("RopeScaling.original_max_position_embeddings", self.original_max_position_embeddings,
                              minimum=1)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes, family switches and numerics of a decoder-only transformer.

    Attributes:
      vocab_size: V, rows of the token embedding (and columns of the LM head).
      hidden_size: D, the residual stream width.
      intermediate_size: F, the gated MLP's inner width.
      num_hidden_layers: L, decoder layers.
      num_attention_heads: H, query heads.
      num_key_value_heads: N, key/value heads (grouped-query attention; H % N == 0).
      head_dim: K, per-head width; defaults to D // H (then D % H must be 0).
      model_type: the Hugging Face family ("qwen2", "qwen3", "llama", "gemma3_text"); decides
        only the names used on import and export — the computation follows the fields below.
      rms_norm_eps: ε inside RMSNorm, x / sqrt(mean(x²) + ε).
      rope_theta: RoPE base θ of full-attention layers; ω_i = θ^(−2i/K), i = 0 … K/2 − 1.
      rope_scaling: optional `RopeScaling` of full-attention layers (and of sliding layers when
        `sliding_rope_theta` is None).
      max_position_embeddings: recorded for export; RoPE itself has no table to bound.
      tie_word_embeddings: the LM head reuses the embedding matrix (no lm_head parameter).
      qkv_bias / o_proj_bias / mlp_bias: biases on the q/k/v, output and MLP projections.
      qk_norm: RMSNorm over head_dim on every query and key head, before RoPE (Qwen3, Gemma 3).
      norm_unit_offset: RMSNorm computes x̂ · (1 + w) in float32, then casts (Gemma); otherwise
        w · cast(x̂) (Llama / Qwen).
      sandwich_norms: RMSNorm the attention and MLP outputs before adding them to the residual
        stream (Gemma 2 / 3), in addition to the usual pre-norms.
      hidden_activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU, tanh-approximated GELU).
      scale_embeddings: multiply token embeddings by √D, the scale cast to the compute dtype.
      query_pre_attn_scalar: attention scores are q·k × s^(−½) with s = this (None: s = K).
      layer_types: per layer "full_attention" or "sliding_attention" (None: all full).
      sliding_window: W; a sliding layer's query at position p sees keys at positions > p − W.
      sliding_rope_theta: RoPE θ of sliding layers, unscaled (None: the full layers' RoPE).
      initializer_range: std of the normal init of a freshly initialised model.
      dtype: parameter storage dtype, "float32" or "bfloat16".
      compute_dtype: activation/matmul dtype; norm statistics, RoPE, attention softmax and the
        output logits are always float32.
      remat: what each step of the layer scan keeps for the backward pass, one of
        `REMAT_POLICIES`: "none" (every activation), "full" (the layer's input only; the layer is
        recomputed), "dots" (the weight matmuls' outputs; attention and elementwise work
        recomputed). True / False are read as "full" / "none".
      attention_chunk_size: full-sequence attention over query chunks of this many tokens, each
        rematerialised: O(chunk × T) score memory instead of O(T²), same result.
      decode_block_size: a decode step reads the KV cache in blocks of this many slots, only the
        blocks that hold visible keys (`decode_attention`); None reads the whole cache.
      attention_impl: the kernel of full-sequence attention (training, log-probs), one of
        `ATTENTION_IMPLEMENTATIONS`; "auto" takes `attention.AUTO_ATTENTION[backend]`. Cached
        forwards (prefill, decode) always use this library's XLA code.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    model_type: str = "qwen2"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_unit_offset: bool = False
    sandwich_norms: bool = False
    hidden_activation: str = "silu"
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None
    sliding_rope_theta: float | None = None
    initializer_range: float = 0.02
    dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    attention_chunk_size: int | None = None
    decode_block_size: int | None = 256
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            _checks.check_int(f"ModelConfig.{name}", getattr(self, name), minimum=1)
        _checks.require(self.num_attention_heads % self.num_key_value_heads == 0,
                        "ModelConfig.num_attention_heads must be divisible by num_key_value_heads "
                        f"(grouped-query attention), got {self.num_attention_heads} heads and "
                        f"{self.num_key_value_heads} kv heads")
        head_dim = self.head_dim
        if head_dim is None:
            _checks.require(self.hidden_size % self.num_attention_heads == 0,
                            "ModelConfig.hidden_size must be divisible by num_attention_heads when head_dim is not "
                            f"given, got hidden_size={self.hidden_size}, "
                            f"num_attention_heads={self.num_attention_heads}")
            head_dim = self.hidden_size // self.num_attention_heads
            object.__setattr__(self, "head_dim", head_dim)
        _checks.check_int("ModelConfig.head_dim", head_dim, minimum=1)
        _checks.require(head_dim % 2 == 0,
                        f"ModelConfig.head_dim must be even (RoPE rotates pairs of dims), got {head_dim}")
        _checks.check_choice("ModelConfig.model_type", self.model_type, MODEL_TYPES)
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            _checks.check_number(f"ModelConfig.{name}", getattr(self, name), minimum=0, exclusive_minimum=True)
        _checks.require(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling),
                        f"ModelConfig.rope_scaling must be None or a RopeScaling, got {self.rope_scaling!r}")
        for name in ("tie_word_embeddings", "qkv_bias", "o_proj_bias", "mlp_bias", "qk_norm", "norm_unit_offset",
                     "sandwich_norms", "scale_embeddings"):
            _checks.check_bool(f"ModelConfig.{name}", getattr(self, name))
        _checks.check_choice("ModelConfig.hidden_activation", self.hidden_activation, HIDDEN_ACTIVATIONS)
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        _checks.check_choice("ModelConfig.remat", self.remat, REMAT_POLICIES)
        _checks.check_choice("ModelConfig.attention_impl", self.attention_impl, ATTENTION_IMPLEMENTATIONS)
        _checks.check_number("ModelConfig.query_pre_attn_scalar", self.query_pre_attn_scalar, minimum=0,
                             exclusive_minimum=True, allow_none=True)
        self._validate_layer_types()
        for name in ("dtype", "compute_dtype"):
            _checks.check_choice(f"ModelConfig.{name}", getattr(self, name), SUPPORTED_DTYPES)
        for name in ("attention_chunk_size", "decode_block_size"):
            value = getattr(self, name)
            _checks.require(value is None or (_checks.is_int(value) and value > 0),
                            f"ModelConfig.{name} must be None or a positive int, got {value!r}")

    def _validate_layer_types(self) -> None:
        layer_types = self.layer_types
        if layer_types is not None:
            _checks.require(isinstance(layer_types, (tuple, list)) and len(layer_types) == self.num_hidden_layers,
                            f"ModelConfig.layer_types must list one type per layer ({self.num_hidden_layers}), "
                            f"got {layer_types!r}")
            unknown = sorted({t for t in layer_types if t not in LAYER_TYPES})
            _checks.require(not unknown, f"ModelConfig.layer_types must be among {LAYER_TYPES}, got {unknown}")
            object.__setattr__(self, "layer_types", tuple(layer_types))
        sliding = layer_types is not None and "sliding_attention" in layer_types
        window = self.sliding_window
        _checks.require(window is None or (_checks.is_int(window) and window > 0),
                        f"ModelConfig.sliding_window must be None or a positive int, got {window!r}")
        _checks.require(not sliding or window is not None,
                        "ModelConfig.layer_types has sliding_attention layers but sliding_window is None")
        _checks.check_number("ModelConfig.sliding_rope_theta", self.sliding_rope_theta, minimum=0,
                             exclusive_minimum=True, allow_none=True)

    # -- derived quantities -------------------------------------------------------------------

    @property
    def param_dtype(self) -> jnp.dtype:
        """Parameter storage dtype as a jnp dtype."""
        return jnp.dtype(self.dtype)

    @property
    def activation_dtype(self) -> jnp.dtype:
        """Activation / matmul dtype as a jnp dtype."""
        return jnp.dtype(self.compute_dtype)

    @property
    def attention_scale(self) -> float:
        """The factor on q·k: query_pre_attn_scalar^(−½), by default head_dim^(−½)."""
        assert self.head_dim is not None  # __post_init__ resolves it
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def every_layer_type(self) -> tuple[str, ...]:
        """"full_attention" or "sliding_attention" for each layer, in order."""
        return self.layer_types or ("full_attention",) * self.num_hidden_layers

    def window(self, layer_type: str) -> int | None:
        """The sliding window W of a layer type (None: full causal attention)."""
        return self.sliding_window if layer_type == "sliding_attention" else None

    def rope(self, layer_type: str) -> tuple[float, RopeScaling | None]:
        """(θ, scaling) of the RoPE that layers of `layer_type` use."""
        if layer_type == "sliding_attention" and self.sliding_rope_theta is not None:
            return float(self.sliding_rope_theta), None
        return float(self.rope_theta), self.rope_scaling

    @property
    def options(self) -> ModelOptions:
        """The runtime settings of this model (`ModelOptions`)."""
        return ModelOptions(dtype=self.dtype, compute_dtype=self.compute_dtype, remat=self.remat,
                            attention_chunk_size=self.attention_chunk_size, attention_impl=self.attention_impl)

    def with_options(self, options: ModelOptions) -> ModelConfig:
        """This architecture with other runtime settings."""
        return self.replace(**options.config_fields())

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# The name of the original Qwen2-only config, kept so existing code keeps working.
Qwen2Config = ModelConfig
