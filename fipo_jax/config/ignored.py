"""The fields a config's model source, data task and sampler do not read, and the refusal of a
value given for one (an override or a config-file key that would silently change nothing).

The tables below say which fields each choice reads; `ignored_fields` derives the rest.

>>> sorted(ignored_fields(TrainConfig()))[:2]
['data.eval_path', 'data.few_shot']
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fipo_jax.config.specs import ConfigError, SFTSpec, TrainConfig
from fipo_jax.core import _checks

# The model fields only a scratch model reads (a checkpoint carries its own architecture).
_SCRATCH_MODEL_FIELDS = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "rope_theta")
# The data fields each task reads (one key per `specs.DATA_TASKS`).
_TASK_FIELDS = {"chain": ("n_terms", "ops", "invertible", "worked", "train_prompts"),
                "word_problems": ("max_steps", "few_shot", "train_prompts"),
                "file": ("train_path", "eval_path")}
# The rollout fields only the continuous-batching engine reads.
_ENGINE_FIELDS = ("engine_slots", "engine_steps_per_sync")


def ignored_fields(config: TrainConfig) -> dict[str, str]:
    """The fields that ``config``'s model source, data task and sampler do not read, each with why.

    Giving one of them a value (an override, a config file key) is an error: it would change
    nothing, silently (``--set data.train_path=X`` on the chain task)."""
    model, data = config.model, config.data
    out = {}
    if model.source != "hf":
        out["model.path"] = f"model.source={model.source!r} does not read it (set model.source='hf')"
    if model.source != "scratch":
        for name in _SCRATCH_MODEL_FIELDS:
            out[f"model.{name}"] = f"model.source={model.source!r} takes the architecture from the checkpoint"
    used = _TASK_FIELDS[data.task]
    for name in sorted({n for names in _TASK_FIELDS.values() for n in names} - set(used)):
        out[f"data.{name}"] = f"data.task={data.task!r} does not use it"
    if config.rollout.sampler == "static":
        for name in _ENGINE_FIELDS:
            out[f"rollout.{name}"] = "rollout.sampler='static' does not use the engine (set rollout.sampler='engine')"
    if not (model.source == "scratch" and data.task == "chain"):
        for field in dataclasses.fields(SFTSpec)[1:]:  # sft.enabled=False is what such presets say
            out[f"sft.{field.name}"] = "the SFT warm start runs only for model.source='scratch' on data.task='chain'"
    return out


def check_given_fields(config: TrainConfig, paths: list[str], what: str = "field") -> None:
    """Refuse non-default values given for fields that ``config`` ignores (see `ignored_fields`);
    a default value changes nothing either way (a saved ``config.json`` holds every field)."""
    ignored, default = ignored_fields(config), TrainConfig()
    for path in paths:
        _checks.require(path not in ignored or _get(config, path) == _get(default, path),
                        f"{what} {path} is given but has no effect: {ignored.get(path)}", error=ConfigError)


def _get(config: Any, path: str) -> Any:
    for key in path.split("."):
        config = getattr(config, key)
    return config
