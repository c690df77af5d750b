"""The Hugging Face side of each supported family: config.json ↔ `ModelConfig`, and tensor names.

`config_from_hf` reads a transformers config (object or `config.json` dict, transformers 4 or 5
layout) of model_type qwen2, qwen3, llama or gemma3_text, and raises `UnsupportedConfigError`
naming the field for anything this decoder does not compute, instead of computing something
else. `config_to_hf` writes the family's transformers-5 `config.json`, and refuses a config its
family cannot express (checked by reading the written dict back). `hf_weight_table` is the
explicit table HF tensor name → our parameter path + layout transform, used by the safetensors
loader, the exporter and (through llama.cpp's names) the GGUF loader.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypedDict

import numpy as np

from fipo_jax.models.config import (
    HIDDEN_ACTIVATIONS,
    LAYER_TYPES,
    MODEL_TYPES,
    ModelConfig,
    ModelOptions,
    RopeScaling,
    UnsupportedConfigError,
)

_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM"}


class _Defaults(TypedDict):
    """One family's entry in `_DEFAULTS`."""

    max_position_embeddings: int
    tie_word_embeddings: bool
    head_dim: int | None


# transformers' defaults for fields a config.json may omit, per family.
_DEFAULTS: dict[str, _Defaults] = {
    "qwen2": _Defaults(max_position_embeddings=32768, tie_word_embeddings=False, head_dim=None),
    "qwen3": _Defaults(max_position_embeddings=32768, tie_word_embeddings=False, head_dim=128),
    "llama": _Defaults(max_position_embeddings=2048, tie_word_embeddings=False, head_dim=None),
    "gemma3_text": _Defaults(max_position_embeddings=131072, tie_word_embeddings=True, head_dim=256),
}
_GEMMA3_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


# ---------------------------------------------------------------------------------------------
# config.json → ModelConfig
# ---------------------------------------------------------------------------------------------


def _model_type(d: Mapping[str, Any]) -> str:
    """The supported family a config.json dict names (`UnsupportedConfigError` otherwise)."""
    model_type = d.get("model_type")
    if model_type == "gemma3":
        raise UnsupportedConfigError(
            "model_type 'gemma3' is the multimodal Gemma 3 (vision + text); only the text-only models "
            "(model_type 'gemma3_text', e.g. Gemma 3 270M / 1B) are supported")
    if model_type not in MODEL_TYPES:
        raise UnsupportedConfigError(f"unsupported model_type {model_type!r}; supported families: {list(MODEL_TYPES)}")
    _warn_if_architecture_disagrees(d.get("architectures"), model_type)
    return model_type


def _warn_if_architecture_disagrees(architectures, model_type: str) -> None:
    """``model_type`` decides the family, as it does for transformers' ``AutoModelForCausalLM``; a
    config.json whose ``architectures`` names another supported family's class (a hand-edited or
    mislabelled config) loads as ``model_type`` and says so once."""
    others = {cls: t for t, cls in _ARCHITECTURES.items() if t != model_type}
    named = [a for a in (architectures or []) if a in others]
    if named:
        warnings.warn(f"config.json: architectures {named} is the {others[named[0]]!r} family but model_type is "
                      f"{model_type!r}; loading it as {model_type!r} (model_type decides, as in transformers)",
                      stacklevel=4)


def config_from_hf(hf_config: Any, options: ModelOptions = ModelOptions()) -> ModelConfig:
    """A `ModelConfig` from a transformers config object or a `config.json` dict.

    Args:
      hf_config: transformers config object (anything with `to_dict()`) or a mapping.
      options: how the model runs (`ModelOptions`: dtypes, remat, attention chunk and kernel).

    Raises:
      UnsupportedConfigError: an unknown model_type, or a field asking for semantics this
        decoder does not implement (the message names the field).
    """
    if isinstance(hf_config, Mapping):
        d = dict(hf_config)
    elif hasattr(hf_config, "to_dict"):
        d = hf_config.to_dict()
    else:
        raise TypeError(f"config_from_hf expects a transformers config or a dict, got {type(hf_config).__name__}")
    model_type = _model_type(d)
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if d.get(k) is None]
    if missing:
        raise UnsupportedConfigError(f"{model_type} config is missing required fields {missing}")
    defaults = _DEFAULTS[model_type]
    _check_no(d, "partial_rotary_factor", lambda v: v is None or float(v) == 1.0, "partial rotary embeddings")
    num_heads = d["num_attention_heads"]
    fields = dict(
        model_type=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=d.get("num_key_value_heads") or num_heads,
        head_dim=d.get("head_dim") or defaults["head_dim"],
        rms_norm_eps=float(d.get("rms_norm_eps") or 1e-6),
        max_position_embeddings=d.get("max_position_embeddings") or defaults["max_position_embeddings"],
        tie_word_embeddings=bool(d.get("tie_word_embeddings", defaults["tie_word_embeddings"])),
        initializer_range=float(d.get("initializer_range", 0.02)),
        **options.config_fields(),
    )
    fields.update(_FAMILY_READERS[model_type](d))
    return ModelConfig(**fields)


def _check_no(d: Mapping[str, Any], key: str, ok: Callable[[Any], bool], what: str) -> None:
    if key in d and not ok(d[key]):
        raise UnsupportedConfigError(f"{what} not supported: config has {key}={d[key]!r}")


def _activation(d: Mapping[str, Any], key: str, default: str) -> str:
    value = d.get(key) or default
    if value not in HIDDEN_ACTIVATIONS:
        raise UnsupportedConfigError(f"{key}={value!r} is not supported; supported activations: "
                                     f"{list(HIDDEN_ACTIVATIONS)}")
    return value


def _rope_scaling(params: Mapping[str, Any], where: str, max_positions: int | None) -> RopeScaling | None:
    """None for default RoPE; a RopeScaling for linear / llama3; UnsupportedConfigError otherwise."""
    rope_type = params.get("rope_type", params.get("type"))
    if rope_type in (None, "default"):
        return None
    if rope_type not in ("linear", "llama3"):
        raise UnsupportedConfigError(f"RoPE scaling {rope_type!r} is not supported ({where}.rope_type); "
                                     "supported: 'default', 'linear', 'llama3'")
    if params.get("factor") is None:
        raise UnsupportedConfigError(f"{where} has rope_type {rope_type!r} but no factor")
    if rope_type == "linear":
        return RopeScaling("linear", float(params["factor"]))
    return RopeScaling("llama3", float(params["factor"]), float(params.get("low_freq_factor", 1.0)),
                       float(params.get("high_freq_factor", 4.0)),
                       int(params.get("original_max_position_embeddings") or max_positions or 8192))


def _flat_rope(d: Mapping[str, Any]) -> dict[str, Any]:
    """θ and scaling of a one-RoPE family from `rope_parameters` and/or legacy `rope_theta` /
    `rope_scaling` (both θ, when present, must agree)."""
    params = d.get("rope_parameters")
    if params is not None and not isinstance(params, Mapping):
        raise UnsupportedConfigError(f"rope_parameters must be a dict, got {params!r}")
    if params is not None and any(isinstance(v, Mapping) for v in params.values()):
        raise UnsupportedConfigError(f"per-layer-type rope_parameters are not supported for model_type "
                                     f"{d.get('model_type')!r}, got {dict(params)!r}")
    legacy = d.get("rope_scaling")
    if legacy is not None and not isinstance(legacy, Mapping):
        raise UnsupportedConfigError(f"rope_scaling must be a dict or null, got {legacy!r}")
    merged = {**(legacy or {}), **(params or {})}
    _check_no(merged, "partial_rotary_factor", lambda v: v is None or float(v) == 1.0, "partial rotary embeddings")
    thetas = [float(x) for x in ((params or {}).get("rope_theta"), d.get("rope_theta")) if x is not None]
    if len(set(thetas)) > 1:
        raise UnsupportedConfigError(f"rope_parameters.rope_theta and rope_theta disagree: {thetas[0]} vs {thetas[1]}")
    where = "rope_parameters" if params else "rope_scaling"
    return dict(rope_theta=thetas[0] if thetas else 10000.0,
                rope_scaling=_rope_scaling(merged, where, d.get("max_position_embeddings")))


def _qwen_sliding(d: Mapping[str, Any]) -> dict[str, Any]:
    """Qwen2/Qwen3: `use_sliding_window` turns on a window in the layers `layer_types` (or, in older
    configs, the layers from `max_window_layers` on) marks as sliding."""
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    layer_types = d.get("layer_types")
    if layer_types is None:
        first = d.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                       for i in range(d["num_hidden_layers"])]
    return _layers(layer_types, window)


def _layers(layer_types: Any, window: int | None) -> dict[str, Any]:
    unknown = sorted({t for t in layer_types if t not in LAYER_TYPES})
    if unknown:
        raise UnsupportedConfigError(f"layer_types {unknown} are not supported; supported: {list(LAYER_TYPES)}")
    if window is None:  # a "sliding" layer without a window attends to everything
        layer_types = ["full_attention"] * len(layer_types)
    sliding = "sliding_attention" in layer_types
    return dict(layer_types=tuple(layer_types) if sliding else None, sliding_window=window if sliding else None)


def _attention_bias(d: Mapping[str, Any]) -> dict[str, bool]:
    """Qwen3 / Llama / Gemma 3: `attention_bias` puts biases on q, k, v and o alike."""
    bias = bool(d.get("attention_bias", False))
    return dict(qkv_bias=bias, o_proj_bias=bias)


def _read_qwen2(d: Mapping[str, Any]) -> dict[str, Any]:
    # Qwen2 always has biased q/k/v and unbiased o_proj and MLP; a config claiming otherwise
    # (keys used by Llama-style models) describes different weights.
    if "attention_bias" in d and d["attention_bias"] is not True:
        raise UnsupportedConfigError("Qwen2 projects q/k/v with bias and o_proj without; config has "
                                     f"attention_bias={d['attention_bias']!r}")
    for key in ("qkv_bias", "o_proj_bias", "mlp_bias"):
        if key in d and bool(d[key]) != (key == "qkv_bias"):
            raise UnsupportedConfigError(f"Qwen2 has qkv_bias=True, o_proj_bias=False, mlp_bias=False; config has "
                                         f"{key}={d[key]!r}")
    return dict(qkv_bias=True, o_proj_bias=False, mlp_bias=False,
                hidden_activation=_activation(d, "hidden_act", "silu"),
                **_flat_rope(d), **_qwen_sliding(d))


def _read_qwen3(d: Mapping[str, Any]) -> dict[str, Any]:
    _check_no(d, "mlp_bias", lambda v: not v, "MLP biases in Qwen3")
    return dict(**_attention_bias(d), qk_norm=True, hidden_activation=_activation(d, "hidden_act", "silu"),
                **_flat_rope(d), **_qwen_sliding(d))


def _read_llama(d: Mapping[str, Any]) -> dict[str, Any]:
    _check_no(d, "pretraining_tp", lambda v: v in (None, 1), "tensor-parallel split projections (pretraining_tp)")
    _check_no(d, "sliding_window", lambda v: v is None, "sliding-window attention in Llama")
    return dict(**_attention_bias(d), mlp_bias=bool(d.get("mlp_bias", False)),
                hidden_activation=_activation(d, "hidden_act", "silu"), **_flat_rope(d))


def _read_gemma3(d: Mapping[str, Any]) -> dict[str, Any]:
    _check_no(d, "final_logit_softcapping", lambda v: v is None, "final logit soft-capping")
    _check_no(d, "attn_logit_softcapping", lambda v: v is None, "attention logit soft-capping")
    _check_no(d, "use_bidirectional_attention", lambda v: not v, "bidirectional attention")
    window = d.get("sliding_window", 4096)
    layer_types = d.get("layer_types")
    if layer_types is None:
        pattern = d.get("sliding_window_pattern", 6)
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                       for i in range(d["num_hidden_layers"])]
    rope = _gemma3_rope(d)
    return dict(**_attention_bias(d), qk_norm=True, norm_unit_offset=True, sandwich_norms=True, scale_embeddings=True,
                hidden_activation=_activation(d, "hidden_activation", "gelu_pytorch_tanh"),
                query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)), **rope,
                **_layers(layer_types, window))


def _gemma3_rope(d: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 3: one RoPE per layer type — transformers-5 `rope_parameters[layer_type]`, or the
    legacy `rope_theta` (+ `rope_scaling`) for global layers and `rope_local_base_freq` for local."""
    params = d.get("rope_parameters")
    if params is not None and not all(isinstance(v, Mapping) or v is None for v in params.values()):
        params = {"full_attention": params}  # a flat dict describes the global layers
    params = dict(params or {})
    full = {**(d.get("rope_scaling") or {}), **(params.get("full_attention") or {})}
    full.setdefault("rope_theta", d.get("rope_theta") or _GEMMA3_THETA["full_attention"])
    sliding = dict(params.get("sliding_attention") or {})
    sliding.setdefault("rope_theta", d.get("rope_local_base_freq") or _GEMMA3_THETA["sliding_attention"])
    if _rope_scaling(sliding, "rope_parameters.sliding_attention", None) is not None:
        raise UnsupportedConfigError("RoPE scaling on sliding-window layers is not supported "
                                     f"(rope_parameters.sliding_attention={sliding!r})")
    for where, p in (("full_attention", full), ("sliding_attention", sliding)):
        _check_no(p, "partial_rotary_factor", lambda v: v is None or float(v) == 1.0,
                  f"partial rotary embeddings ({where})")
    return dict(rope_theta=float(full["rope_theta"]),
                rope_scaling=_rope_scaling(full, "rope_parameters.full_attention", d.get("max_position_embeddings")),
                sliding_rope_theta=float(sliding["rope_theta"]))


_FAMILY_READERS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "qwen2": _read_qwen2, "qwen3": _read_qwen3, "llama": _read_llama, "gemma3_text": _read_gemma3}


# ---------------------------------------------------------------------------------------------
# ModelConfig → config.json
# ---------------------------------------------------------------------------------------------


def _rope_dict(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    out = {"rope_type": scaling.rope_type, "rope_theta": theta, "factor": scaling.factor}
    if scaling.rope_type == "llama3":
        out.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                   original_max_position_embeddings=scaling.original_max_position_embeddings)
    return out


def _int_if_integral(value: float | None) -> float | int | None:
    """transformers types some float-valued fields as int (query_pre_attn_scalar)."""
    return int(value) if value is not None and float(value).is_integer() else value


def _gemma3_hf_fields(config: ModelConfig, layer_types: list[str]) -> dict[str, Any]:
    sliding_theta = config.sliding_rope_theta if config.sliding_rope_theta is not None else config.rope_theta
    return dict(hidden_activation=config.hidden_activation, attention_bias=config.qkv_bias,
                query_pre_attn_scalar=_int_if_integral(config.query_pre_attn_scalar),
                sliding_window=config.sliding_window or 4096, layer_types=layer_types, final_logit_softcapping=None,
                attn_logit_softcapping=None, use_bidirectional_attention=False,
                rope_parameters={"full_attention": _rope_dict(config.rope_theta, config.rope_scaling),
                                 "sliding_attention": _rope_dict(sliding_theta, None)})


def _rope_hf_fields(config: ModelConfig) -> dict[str, Any]:
    """RoPE of the Llama / Qwen families: transformers-5 rope_parameters, and rope_theta (read by
    transformers 4) when unscaled."""
    d = dict(hidden_act=config.hidden_activation, rope_parameters=_rope_dict(config.rope_theta, config.rope_scaling))
    return d if config.rope_scaling is not None else {**d, "rope_theta": config.rope_theta}


def _llama_hf_fields(config: ModelConfig, layer_types: list[str]) -> dict[str, Any]:
    return {**_rope_hf_fields(config), "attention_bias": config.qkv_bias, "mlp_bias": config.mlp_bias,
            "pretraining_tp": 1}


def _qwen_hf_fields(config: ModelConfig, layer_types: list[str]) -> dict[str, Any]:
    first_sliding = next((i for i, x in enumerate(layer_types) if x == "sliding_attention"), config.num_hidden_layers)
    d = {**_rope_hf_fields(config), "use_sliding_window": config.sliding_window is not None,
         "sliding_window": config.sliding_window, "layer_types": layer_types, "max_window_layers": first_sliding}
    return d if config.model_type == "qwen2" else {**d, "attention_bias": config.qkv_bias}


# The fields of each family's config.json beyond the shared ones (`config_to_hf`).
_FAMILY_FIELDS = {"gemma3_text": _gemma3_hf_fields, "llama": _llama_hf_fields, "qwen2": _qwen_hf_fields,
                  "qwen3": _qwen_hf_fields}


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The transformers-5 `config.json` dict of `config.model_type` for this model.

    Raises ValueError when the family cannot express the config (e.g. qk_norm under qwen2):
    the written dict is read back and must give the same model.
    """
    t = config.model_type
    layer_types = list(config.layer_types or ["full_attention"] * config.num_hidden_layers)
    d: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[t]],
        "model_type": t,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": config.dtype,
    }
    d.update(_FAMILY_FIELDS[t](config, layer_types))
    read_back = config_from_hf(d, config.options).replace(decode_block_size=config.decode_block_size)
    if read_back != config:
        differ = [f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(read_back, f.name)]
        raise ValueError(f"a {t} config.json cannot express this model: {differ} would read back as "
                         f"{[getattr(read_back, n) for n in differ]} instead of {[getattr(config, n) for n in differ]}")
    return d


# ---------------------------------------------------------------------------------------------
# Tensor names and layouts
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one HF tensor maps onto one of our parameters.

    Attributes:
      name: short description, used in messages.
      hf_shape: our parameter shape → the HF tensor shape.
      to_ours: (HF array, our shape) → our array.
      to_hf: our array → HF array.
    """

    name: str
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


# Same shape (embedding [V, D], norm weights, o_proj / MLP biases).
COPY = Layout("copy", hf_shape=lambda s: s, to_ours=lambda x, s: x, to_hf=lambda x: x)
# torch Linear [out, in] ↔ our kernel [in, out].
LINEAR = Layout("transpose", hf_shape=lambda s: (s[1], s[0]), to_ours=lambda x, s: x.T, to_hf=lambda x: x.T)
# q/k/v Linear [N·K, D] ↔ our kernel [D, N, K] (output features split into heads).
HEADS_OUT = Layout(
    "transpose + split heads",
    hf_shape=lambda s: (s[1] * s[2], s[0]),
    to_ours=lambda x, s: x.T.reshape(s),
    to_hf=lambda x: x.reshape(x.shape[0], x.shape[1] * x.shape[2]).T,
)
# q/k/v bias [N·K] ↔ our bias [N, K].
HEADS_BIAS = Layout("split heads", hf_shape=lambda s: (s[0] * s[1],), to_ours=lambda x, s: x.reshape(s),
                    to_hf=lambda x: x.reshape(-1))
# o_proj Linear [D, H·K] ↔ our kernel [H, K, D] (input features split into heads).
HEADS_IN = Layout(
    "transpose + split heads",
    hf_shape=lambda s: (s[2], s[0] * s[1]),
    to_ours=lambda x, s: x.T.reshape(s),
    to_hf=lambda x: x.reshape(x.shape[0] * x.shape[1], x.shape[2]).T,
)


@dataclasses.dataclass(frozen=True)
class WeightMapping:
    """One row of the mapping table: HF key ↔ nnx path, with the layout transform.

    A decoder layer's tensor is slice ``layer`` of the stacked parameter at ``path`` (leading
    ``layers`` axis, `decoder.stack_layers`); ``layer`` is None for the other parameters."""

    hf_key: str
    path: tuple[str, ...]
    layout: Layout
    layer: int | None = None


def _layer_rows(config: ModelConfig) -> list[tuple[str, tuple[str, ...], Layout]]:
    """(HF suffix, path inside the layer, layout) of one decoder layer."""
    rows: list[tuple[str, tuple[str, ...], Layout]] = [("input_layernorm.weight", ("attn_norm", "weight"), COPY)]
    if config.sandwich_norms:  # Gemma names: post_attention_layernorm is the attention *output* norm
        rows += [("post_attention_layernorm.weight", ("attn_output_norm", "weight"), COPY),
                 ("pre_feedforward_layernorm.weight", ("mlp_norm", "weight"), COPY),
                 ("post_feedforward_layernorm.weight", ("mlp_output_norm", "weight"), COPY)]
    else:
        rows.append(("post_attention_layernorm.weight", ("mlp_norm", "weight"), COPY))
    for name in ("q_proj", "k_proj", "v_proj"):
        rows.append((f"self_attn.{name}.weight", ("self_attn", name, "kernel"), HEADS_OUT))
        if config.qkv_bias:
            rows.append((f"self_attn.{name}.bias", ("self_attn", name, "bias"), HEADS_BIAS))
    rows.append(("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), HEADS_IN))
    if config.o_proj_bias:
        rows.append(("self_attn.o_proj.bias", ("self_attn", "o_proj", "bias"), COPY))
    if config.qk_norm:
        rows += [("self_attn.q_norm.weight", ("self_attn", "q_norm", "weight"), COPY),
                 ("self_attn.k_norm.weight", ("self_attn", "k_norm", "weight"), COPY)]
    for name in ("gate_proj", "up_proj", "down_proj"):
        rows.append((f"mlp.{name}.weight", ("mlp", name, "kernel"), LINEAR))
        if config.mlp_bias:
            rows.append((f"mlp.{name}.bias", ("mlp", name, "bias"), COPY))
    return rows


def hf_weight_table(config: ModelConfig) -> tuple[WeightMapping, ...]:
    """The full HF ↔ nnx table for `config` (no lm_head row when embeddings are tied)."""
    rows = [WeightMapping("model.embed_tokens.weight", ("embed_tokens", "embedding"), COPY),
            WeightMapping("model.norm.weight", ("norm", "weight"), COPY)]
    if not config.tie_word_embeddings:
        rows.append(WeightMapping("lm_head.weight", ("lm_head", "kernel"), LINEAR))
    layer_rows = _layer_rows(config)
    for i in range(config.num_hidden_layers):
        rows += [WeightMapping(f"model.layers.{i}.{suffix}", ("layers", *path), layout, layer=i)
                 for suffix, path, layout in layer_rows]
    return tuple(rows)
