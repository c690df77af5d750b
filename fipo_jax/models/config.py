"""Qwen2 / Qwen2.5 architecture configuration.

`Qwen2Config` is a frozen, validated description of the network; it is the only thing the
model, the checkpoint loader and the exporter need. `Qwen2Config.from_hf` reads a transformers
config (object or `config.json` dict, transformers 4 or 5 layout) and refuses anything whose
semantics this implementation does not compute, rather than silently computing something else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

SUPPORTED_DTYPES = ("float32", "bfloat16")

# HF config.json defaults for Qwen2 fields that may be omitted.
_HF_DEFAULT_ROPE_THETA = 10000.0
_HF_DEFAULT_RMS_NORM_EPS = 1e-6
_HF_DEFAULT_MAX_POSITIONS = 32768
_HF_DEFAULT_MAX_WINDOW_LAYERS = 28


class UnsupportedConfigError(ValueError):
    """A transformers config asks for semantics this Qwen2 implementation does not compute."""


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Shapes and numerics of a Qwen2 decoder-only transformer.

    Attributes:
      vocab_size: V, rows of the token embedding (and columns of the LM head).
      hidden_size: D, the residual stream width.
      intermediate_size: F, the SwiGLU inner width.
      num_hidden_layers: L, decoder layers.
      num_attention_heads: H, query heads.
      num_key_value_heads: N, key/value heads (grouped-query attention; H % N == 0).
      head_dim: K, per-head width; defaults to D // H (then D % H must be 0).
      rms_norm_eps: ε inside RMSNorm, x / sqrt(mean(x²) + ε).
      rope_theta: RoPE base θ; inverse frequencies θ^(-2i/K), i = 0..K/2-1.
      max_position_embeddings: recorded for export; RoPE itself has no table to bound.
      tie_word_embeddings: if True the LM head reuses the embedding matrix (no lm_head param).
      initializer_range: std of the normal init used by a freshly initialised model.
      dtype: parameter storage dtype, "float32" or "bfloat16".
      compute_dtype: activation/matmul dtype; RMSNorm statistics, RoPE, attention softmax and
        the output logits are always float32.
      remat: rematerialise each decoder layer in the backward pass (nnx.remat).
      attention_chunk_size: if set, full-sequence attention runs over query chunks of this many
        tokens, each rematerialised in the backward pass, so its scores take
        O(chunk × T) memory instead of O(T²) (same result; see `grouped_query_attention`).
      decode_block_size: a decode step attends over the KV cache in blocks of this many slots,
        reading only the blocks written so far (`decode_attention`); None reads the whole
        cache every step.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = _HF_DEFAULT_RMS_NORM_EPS
    rope_theta: float = _HF_DEFAULT_ROPE_THETA
    max_position_embeddings: int = _HF_DEFAULT_MAX_POSITIONS
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False
    attention_chunk_size: int | None = None
    decode_block_size: int | None = 256

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Qwen2Config.{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                "Qwen2Config.num_attention_heads must be divisible by num_key_value_heads "
                f"(grouped-query attention), got {self.num_attention_heads} heads and "
                f"{self.num_key_value_heads} kv heads"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    "Qwen2Config.hidden_size must be divisible by num_attention_heads when "
                    f"head_dim is not given, got hidden_size={self.hidden_size}, "
                    f"num_attention_heads={self.num_attention_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim <= 0:
            raise ValueError(f"Qwen2Config.head_dim must be a positive int, got {self.head_dim!r}")
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"Qwen2Config.head_dim must be even (RoPE rotates pairs of dims), got {self.head_dim}"
            )
        if not self.rms_norm_eps > 0:
            raise ValueError(f"Qwen2Config.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"Qwen2Config.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.initializer_range > 0:
            raise ValueError(
                f"Qwen2Config.initializer_range must be > 0, got {self.initializer_range!r}"
            )
        for name in ("dtype", "compute_dtype"):
            value = getattr(self, name)
            if value not in SUPPORTED_DTYPES:
                raise ValueError(
                    f"Qwen2Config.{name} must be one of {SUPPORTED_DTYPES}, got {value!r}"
                )
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(
                f"Qwen2Config.tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}"
            )
        if not isinstance(self.remat, bool):
            raise ValueError(f"Qwen2Config.remat must be a bool, got {self.remat!r}")
        for name in ("attention_chunk_size", "decode_block_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"Qwen2Config.{name} must be None or a positive int, got {value!r}")

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
    def num_query_groups(self) -> int:
        """G = H / N: query heads sharing one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes: Any) -> Qwen2Config:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- transformers interop -----------------------------------------------------------------

    @classmethod
    def from_hf(
        cls,
        hf_config: Any,
        *,
        dtype: str = "float32",
        compute_dtype: str | None = None,
        remat: bool = False,
        attention_chunk_size: int | None = None,
    ) -> Qwen2Config:
        """Builds a config from a transformers `Qwen2Config` object or a `config.json` dict.

        Reads RoPE θ from the transformers-5 `rope_parameters` dict or the legacy top-level
        `rope_theta` (both, if present, must agree). Raises `UnsupportedConfigError` for
        sliding-window attention, RoPE scaling other than "default", a model_type other than
        qwen2, an activation other than silu, or attention-bias settings that differ from Qwen2
        (q/k/v biased, o_proj unbiased).

        Args:
          hf_config: transformers config object (anything with `to_dict()`) or a mapping.
          dtype: parameter dtype of the model to build.
          compute_dtype: activation dtype; defaults to `dtype`.
          remat: rematerialise decoder layers.
          attention_chunk_size: query-chunked attention (see the class docstring).
        """
        if isinstance(hf_config, Mapping):
            d = dict(hf_config)
        elif hasattr(hf_config, "to_dict"):
            d = hf_config.to_dict()
        else:
            raise TypeError(
                "Qwen2Config.from_hf expects a transformers config or a dict, "
                f"got {type(hf_config).__name__}"
            )
        _check_supported(d)
        num_heads = d["num_attention_heads"]
        num_kv_heads = d.get("num_key_value_heads") or num_heads
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=d.get("head_dim") or None,
            rms_norm_eps=float(d.get("rms_norm_eps", _HF_DEFAULT_RMS_NORM_EPS)),
            rope_theta=_rope_theta(d),
            max_position_embeddings=d.get("max_position_embeddings", _HF_DEFAULT_MAX_POSITIONS),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            dtype=dtype,
            compute_dtype=compute_dtype or dtype,
            remat=remat,
            attention_chunk_size=attention_chunk_size,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 style `config.json` dict for `Qwen2ForCausalLM`.

        Writes RoPE θ both in `rope_parameters` (transformers 5) and top-level `rope_theta`
        (read by transformers 4) so either version loads it.
        """
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": _HF_DEFAULT_MAX_WINDOW_LAYERS,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "attention_dropout": 0.0,
            "use_cache": True,
            "dtype": self.dtype,
        }


def _check_supported(d: Mapping[str, Any]) -> None:
    """Raises UnsupportedConfigError for any config whose semantics we do not implement."""
    model_type = d.get("model_type")
    if model_type != "qwen2":
        raise UnsupportedConfigError(
            f"only model_type 'qwen2' is supported (Qwen2 / Qwen2.5), got {model_type!r}"
        )
    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        if d.get(k) is None
    ]
    if missing:
        raise UnsupportedConfigError(f"Qwen2 config is missing required fields {missing}")
    hidden_act = d.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise UnsupportedConfigError(
            f"only hidden_act 'silu' (SwiGLU) is supported, got {hidden_act!r}"
        )
    if d.get("use_sliding_window", False):
        raise UnsupportedConfigError(
            "use_sliding_window=True is not supported: this implementation computes full causal "
            "attention in every layer"
        )
    layer_types = d.get("layer_types")
    if layer_types is not None:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise UnsupportedConfigError(
                f"only 'full_attention' layers are supported, config has layer_types {other}"
            )
    # Qwen2 always has biased q/k/v and unbiased o_proj; a config claiming otherwise (keys used by
    # Llama-style models) describes different weights.
    if "attention_bias" in d and d["attention_bias"] is not True:
        raise UnsupportedConfigError(
            "Qwen2 projects q/k/v with bias and o_proj without; config has "
            f"attention_bias={d['attention_bias']!r}"
        )
    for key in ("qkv_bias", "o_proj_bias", "mlp_bias"):
        if key in d:
            expected = key == "qkv_bias"
            if bool(d[key]) != expected:
                raise UnsupportedConfigError(
                    f"Qwen2 has qkv_bias=True, o_proj_bias=False, mlp_bias=False; config has "
                    f"{key}={d[key]!r}"
                )
    _rope_theta(d)  # validates RoPE type / structure


def _rope_theta(d: Mapping[str, Any]) -> float:
    """θ from `rope_parameters` (transformers 5) and/or top-level `rope_theta` (transformers 4).

    Raises UnsupportedConfigError for RoPE scaling (`rope_type`/`type` other than "default",
    legacy `rope_scaling`), partial rotary embeddings, or disagreeing θ values.
    """
    thetas: list[float] = []
    params = d.get("rope_parameters")
    if params is not None:
        if not isinstance(params, Mapping):
            raise UnsupportedConfigError(f"rope_parameters must be a dict, got {params!r}")
        if any(isinstance(v, Mapping) for v in params.values()):
            raise UnsupportedConfigError(
                f"per-layer-type rope_parameters are not supported, got {dict(params)!r}"
            )
        _check_rope_type(params, "rope_parameters")
        if params.get("rope_theta") is not None:
            thetas.append(float(params["rope_theta"]))
    scaling = d.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, Mapping):
            raise UnsupportedConfigError(f"rope_scaling must be a dict or null, got {scaling!r}")
        _check_rope_type(scaling, "rope_scaling")
    if d.get("rope_theta") is not None:
        thetas.append(float(d["rope_theta"]))
    partial = d.get("partial_rotary_factor")
    if partial is None and params is not None:
        partial = params.get("partial_rotary_factor")
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedConfigError(
            f"partial rotary embeddings are not supported, got partial_rotary_factor={partial!r}"
        )
    if len(set(thetas)) > 1:
        raise UnsupportedConfigError(
            f"rope_parameters.rope_theta and rope_theta disagree: {thetas[0]} vs {thetas[1]}"
        )
    return thetas[0] if thetas else _HF_DEFAULT_ROPE_THETA


def _check_rope_type(params: Mapping[str, Any], where: str) -> None:
    rope_type = params.get("rope_type", params.get("type"))
    if rope_type not in (None, "default"):
        raise UnsupportedConfigError(
            f"RoPE scaling is not supported: {where} has rope_type {rope_type!r} "
            "(only 'default' RoPE is implemented)"
        )
