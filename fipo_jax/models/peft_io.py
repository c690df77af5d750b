"""Adapters in PEFT's format, out and back: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT's LoRA on a torch Linear [out, in] adds (α / r) · B A with ``lora_A.weight`` [r, in] and
``lora_B.weight`` [out, r]; ours (`fipo_jax.models.lora`) adds (α / r) · x A B with A [D_in, r] and
B [r, D_out] per layer, in the GEMM form whose transpose is the HF weight (`families.hf_weight_table`).
So PEFT's tensors are our A and B of each layer, transposed, under the HF module's name:
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``.

The adapter file's safetensors metadata records the base parameters' SHA-256 (``fipo_jax.base_sha256``,
`lora.base_digest`); loading adapters onto a base with another digest is refused. A PEFT folder
written elsewhere has no digest: its tensor names and shapes must fit the base.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from fipo_jax.models.decoder import CausalLM
from fipo_jax.models.export_folder import check_export_folder, replacing
from fipo_jax.models.families import hf_weight_table
from fipo_jax.models.lora import (
    DEFAULT_MODULE_PATH,
    LoraConfig,
    adapted_paths,
    adapter_variables,
    apply_lora,
    base_digest,
    layer_projections,
    lora_of,
)
from fipo_jax.models.weights import params_digest

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DIGEST_KEY = "fipo_jax.base_sha256"


class PeftAdapterError(ValueError):
    """A PEFT adapter folder that cannot go on this base (names the folder and what differs)."""


def _module_names(model: CausalLM) -> dict[tuple[int, str], str]:
    """(layer, our projection path "self_attn/q_proj") → PEFT's module name for it."""
    names = {}
    for row in hf_weight_table(model.config):
        if row.layer is not None and row.path[-1] == "kernel":
            names[(row.layer, "/".join(row.path[1:-1]))] = "base_model.model." + row.hf_key.removesuffix(".weight")
    return names


def peft_tensors(model: CausalLM) -> dict[str, np.ndarray]:
    """PEFT's tensors of the model's adapters: lora_A.weight = A_ℓᵀ [r, D_in], lora_B.weight = B_ℓᵀ [D_out, r]."""
    names, out = _module_names(model), {}
    for path in adapted_paths(model.layers, lora_of(model)):
        a, b = (np.asarray(v.get_value(), np.float32)
                for v in adapter_variables(layer_projections(model.layers)[path]))
        for layer in range(model.config.num_hidden_layers):
            out[f"{names[(layer, path)]}.lora_A.weight"] = np.ascontiguousarray(a[layer].T)
            out[f"{names[(layer, path)]}.lora_B.weight"] = np.ascontiguousarray(b[layer].T)
    return out


def peft_config(model: CausalLM, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """``adapter_config.json`` of the model's adapters (PEFT's LoraConfig fields)."""
    lora = lora_of(model)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
            "target_modules": sorted({p.split("/")[1] for p in adapted_paths(model.layers, lora)}),
            "base_model_name_or_path": base_model_name_or_path}


def save_peft_adapters(model: CausalLM, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write the adapted model's adapters as a PEFT folder (new, empty or a previous export), which
    ``peft.PeftModel.from_pretrained(hf_base, path)`` loads onto the HF export of the same base."""
    lora_of(model)
    path = os.fspath(path)
    check_export_folder(path)
    tensors, config = peft_tensors(model), peft_config(model, base_model_name_or_path)
    with replacing(path, write=True, log=print) as folder:
        save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt",
                                                                              DIGEST_KEY: base_digest(model)})
        with open(os.path.join(folder, ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)


def _read_peft_config(path: str) -> dict[str, Any]:
    """adapter_config.json, checked to be a plain LoRA this library computes exactly."""
    config_file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_file) or not os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)):
        raise PeftAdapterError(f"{path} is not a PEFT adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    with open(config_file) as f:
        config = json.load(f)
    unsupported = {"peft_type": config.get("peft_type") != "LORA", "use_dora": bool(config.get("use_dora")),
                   "use_rslora": bool(config.get("use_rslora")), "rank_pattern": bool(config.get("rank_pattern")),
                   "alpha_pattern": bool(config.get("alpha_pattern")),
                   "layers_to_transform": config.get("layers_to_transform") is not None,
                   "modules_to_save": bool(config.get("modules_to_save")),
                   "bias": config.get("bias", "none") != "none"}
    bad = [key for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise PeftAdapterError(f"{config_file}: {', '.join(f'{k}={config.get(k)!r}' for k in bad)} is not supported "
                               "(plain LoRA only: one r and α, no DoRA / rsLoRA / extra trained modules)")
    return config


def _module_path(targets: Any) -> str:
    """PEFT's target_modules (names, "all-linear" or a regex) → our `LoraConfig.module_path`."""
    if targets == "all-linear":
        return DEFAULT_MODULE_PATH
    if isinstance(targets, str):
        return rf".*(?:{targets}).*" if not re.fullmatch(r"\w+", targets) else rf"(self_attn|mlp)/{targets}"
    return "(self_attn|mlp)/(" + "|".join(re.escape(t) for t in targets) + ")"


def load_peft_adapters(model: CausalLM, path: str | os.PathLike, base_dtype: str | None = None) -> CausalLM:
    """Adapt `model` (`apply_lora`, in place) with a PEFT folder's r, α and target modules, then set A
    and B from its tensors. `PeftAdapterError` naming the folder when its base digest differs from
    the model's, or a tensor is missing, extra or of another shape; the model is then unchanged."""
    path = os.fspath(path)
    config = _read_peft_config(path)
    with safe_open(os.path.join(path, ADAPTER_WEIGHTS), "np") as f:
        recorded = (f.metadata() or {}).get(DIGEST_KEY)
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    digest = params_digest(model)
    if recorded is not None and recorded != digest:
        raise PeftAdapterError(f"{path} holds adapters of another base (sha256 {recorded[:16]}…, this model's "
                               f"{digest[:16]}…): nothing was loaded")
    lora = LoraConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                      module_path=_module_path(config["target_modules"]), base_dtype=base_dtype)
    expected = _expected_shapes(model, lora)
    problems = [f"{name} is {list(tensors[name].shape) if name in tensors else 'missing'}, expected {list(shape)}"
                for name, shape in expected.items() if name not in tensors or tensors[name].shape != shape]
    problems += [f"{name} fits no projection of this model" for name in tensors if name not in expected]
    if problems:
        raise PeftAdapterError(f"{path} does not fit this base ({len(problems)} problems): " + "; ".join(problems[:3]))
    apply_lora(model, lora)
    _set_adapters(model, tensors)
    return model


def _expected_shapes(model: CausalLM, lora: LoraConfig) -> dict[str, tuple[int, ...]]:
    """PEFT tensor name → shape, for the projections `lora` would adapt on this model."""
    names = _module_names(model)
    out: dict[str, tuple[int, ...]] = {}
    for path in adapted_paths(model.layers, lora):
        projection = layer_projections(model.layers)[path]
        d_in, d_out = math.prod(projection.in_shape), math.prod(projection.out_shape)
        for layer in range(model.config.num_hidden_layers):
            out[f"{names[(layer, path)]}.lora_A.weight"] = (lora.rank, d_in)
            out[f"{names[(layer, path)]}.lora_B.weight"] = (d_out, lora.rank)
    return out


def _set_adapters(model: CausalLM, tensors: dict[str, np.ndarray]) -> None:
    """A_ℓ = lora_A.weightᵀ, B_ℓ = lora_B.weightᵀ for every adapted projection and layer."""
    names = _module_names(model)
    for path in adapted_paths(model.layers, lora_of(model)):
        for variable, suffix in zip(adapter_variables(layer_projections(model.layers)[path]), ("lora_A", "lora_B")):
            stacked = np.stack([tensors[f"{names[(layer, path)]}.{suffix}.weight"].T
                                for layer in range(model.config.num_hidden_layers)])
            variable.set_value(jnp.asarray(stacked, variable.get_value().dtype))
