"""Run configuration: frozen dataclasses, validated on construction, loadable from JSON
and overridable field by field (``--set rollout.n=8``).

Unknown field names and impossible values are errors that name the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from typing import Any, Literal

from fipo_jax import _checks
from fipo_jax.losses import MODE_DEPENDENT_FIELDS, PolicyLossConfig
from fipo_jax.models.config import REMAT_POLICIES
from fipo_jax.sampling import MIN_TEMPERATURE
from fipo_jax.sharding import MESH_AXES, ways

class ConfigError(ValueError):
    """A configuration that cannot be used, with the offending field in the message."""


# Every config check goes through the one vocabulary (`fipo_jax._checks`), with error=ConfigError.


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The policy. ``source="hf"`` loads a pretrained checkpoint at ``path``: a Hugging Face
    folder (Qwen2/2.5, Qwen3, Llama 3, Gemma 3 text) or a ``.gguf`` file; ``source="gemma3-270m"``
    loads Gemma 3 270M (base, Q4_K_M GGUF) assembled from its package (``path`` unused);
    ``source="scratch"`` builds a small random Qwen2 from the fields below (CPU experiment)."""

    source: Literal["scratch", "hf", "gemma3-270m"] = "scratch"
    path: str = ""
    dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: bool | str = "none"  # ModelConfig.remat: one of REMAT_POLICIES; true / false read as "full" / "none"
    num_layers: int = 2
    hidden_size: int = 128
    intermediate_size: int = 384
    num_heads: int = 4
    num_kv_heads: int = 2
    rope_theta: float = 10000.0
    logprob_chunk_size: int = 1024
    attention_chunk_size: int | None = None  # query-chunked attention: O(chunk × T) score memory

    def __post_init__(self):
        _checks.check_choice("model.source", self.source, ("scratch", "hf", "gemma3-270m"), error=ConfigError)
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        _checks.check_choice("model.remat", self.remat, REMAT_POLICIES, error=ConfigError)
        _checks.require(self.source != "hf" or bool(self.path), "model.path is required when model.source='hf'",
                        error=ConfigError)
        _checks.require(self.source == "hf" or not self.path,
                        f"model.path is set ({self.path!r}) but model.source={self.source!r} does not read it: set "
                        f"model.source='hf' to load it, or leave model.path empty", error=ConfigError)
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "logprob_chunk_size"):
            _checks.check_int(f"model.{name}", getattr(self, name), minimum=1, error=ConfigError)
        _checks.check_int("model.attention_chunk_size", self.attention_chunk_size, minimum=1, allow_none=True,
                          error=ConfigError)
        _checks.require(self.num_heads % self.num_kv_heads == 0,
                        f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                        f"({self.num_kv_heads})", error=ConfigError)
        _checks.require(self.hidden_size % self.num_heads == 0,
                        f"model.hidden_size ({self.hidden_size}) must be a multiple of model.num_heads "
                        f"({self.num_heads})", error=ConfigError)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Prompts. ``task="chain"`` is the synthetic CPU task (`fipo_jax.data.ChainTask`);
    ``task="word_problems"`` generates few-shot arithmetic word problems of 1 to ``max_steps``
    steps for pretrained base models (`fipo_jax.data.WordProblemTask`); ``task="file"`` reads a
    DAPO-schema parquet or JSONL (``train_path``, ``eval_path``)."""

    task: Literal["chain", "word_problems", "file"] = "chain"
    train_path: str = ""
    eval_path: str = ""
    n_terms: int = 5
    ops: str = "+*"
    train_prompts: int = 4096
    eval_prompts: int = 64
    max_prompt_tokens: int = 2048
    max_steps: int = 3  # word_problems: arithmetic steps per problem (1 … max_steps)
    few_shot: int = 2  # word_problems: worked examples in each prompt

    def __post_init__(self):
        _checks.check_choice("data.task", self.task, ("chain", "word_problems", "file"), error=ConfigError)
        _checks.check_int("data.max_steps", self.max_steps, minimum=1, maximum=3, error=ConfigError)
        _checks.check_int("data.few_shot", self.few_shot, minimum=0, error=ConfigError)
        _checks.require(self.task != "file" or bool(self.train_path),
                        "data.train_path is required when data.task='file'", error=ConfigError)
        for name in ("train_path", "eval_path"):
            _checks.require(self.task == "file" or not getattr(self, name),
                            f"data.{name} is set ({getattr(self, name)!r}) but data.task={self.task!r} does not read "
                            f"files: set data.task='file' to train on it, or leave data.{name} empty",
                            error=ConfigError)
        if self.task == "chain":
            from fipo_jax.data.synthetic import ChainTask

            try:  # the task validates its own parameters; here, before any model is built
                ChainTask(n_terms=self.n_terms, ops=self.ops)
            except ValueError as err:
                raise ConfigError(f"data.{err}") from None
        for name in ("train_prompts", "eval_prompts", "max_prompt_tokens"):
            _checks.check_int(f"data.{name}", getattr(self, name), minimum=1, error=ConfigError)


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """Sampling and DAPO dynamic sampling (official: 512 prompts × 16, 2048 prompts per round)."""

    n: int = 8
    prompts_per_step: int = 32
    prompts_per_round: int = 64
    max_rounds: int = 4
    dynamic_sampling: bool = True
    on_exhausted: Literal["error", "pad"] = "pad"
    max_response_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()  # stop strings (e.g. "Question:" for few-shot prompts); kept in the response
    # "engine": continuous batching (`fipo_jax.engine`, slots refilled as responses end, each prompt
    # prefilled once); "static": `sampling.generate` (every row decodes until the longest ends).
    # Same tokens either way (randomness is per request); the engine is faster when lengths vary.
    sampler: Literal["engine", "static"] = "engine"
    engine_slots: int = 128  # decode slots (at most the rows of a round are used)
    engine_steps_per_sync: int = 16  # decode steps between host syncs

    def __post_init__(self):
        _checks.check_choice("rollout.sampler", self.sampler, ("engine", "static"), error=ConfigError)
        _checks.check_int("rollout.engine_slots", self.engine_slots, minimum=1, error=ConfigError)
        _checks.check_int("rollout.engine_steps_per_sync", self.engine_steps_per_sync, minimum=1, error=ConfigError)
        _checks.require(all(isinstance(x, str) and x for x in self.stop),
                        f"rollout.stop must be a list of non-empty strings (a plain value is one stop string, "
                        f"taken literally), got {self.stop!r}", error=ConfigError)
        for name in ("n", "prompts_per_step", "prompts_per_round", "max_rounds", "max_response_tokens"):
            value = getattr(self, name)  # keeps the wording train.py's users see: "rollout.n must be >= 1"
            _checks.require(_checks.is_int(value) and value >= 1,
                            f"rollout.{name} must be >= 1 (an int), got {value!r}", error=ConfigError)
        _checks.check_choice("rollout.on_exhausted", self.on_exhausted, ("error", "pad"), error=ConfigError)
        _checks.check_number("rollout.temperature (RL sampling)", self.temperature, minimum=MIN_TEMPERATURE,
                             error=ConfigError)
        _checks.check_number("rollout.top_p", self.top_p, minimum=0, maximum=1, exclusive_minimum=True,
                             error=ConfigError)
        _checks.check_int("rollout.top_k (0 = disabled)", self.top_k, minimum=0, error=ConfigError)


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """DAPO reward: +1 correct / −1 wrong, plus overlong shaping counted in tokens:
    min(−(len − (L_max − L_buf)) / L_buf · factor, 0) with L_max = rollout.max_response_tokens."""

    overlong_shaping: bool = True
    overlong_buffer: int = 8
    overlong_factor: float = 1.0
    verify_timeout_s: float = 2.0
    score_budget_s: float = 600.0  # per batch of responses; past it math-verify is not asked (counted)

    def __post_init__(self):
        _checks.check_int("reward.overlong_buffer", self.overlong_buffer, minimum=1, error=ConfigError)
        _checks.check_number("reward.score_budget_s", self.score_budget_s, minimum=0, exclusive_minimum=True,
                             error=ConfigError)
        _checks.check_number("reward.overlong_factor", self.overlong_factor, minimum=0, error=ConfigError)
        _checks.check_number("reward.verify_timeout_s", self.verify_timeout_s, minimum=0, exclusive_minimum=True,
                             error=ConfigError)


@dataclasses.dataclass(frozen=True)
class AlgoSpec:
    """Advantages, loss and update schedule (official: 8 mini-batches per step, 1 epoch).

    ``packing`` (default on): each mini-batch's sequences are packed into rows (`packing.pack_batch`)
    and micro-batches hold up to ``micro_batch_size`` such rows, so the update skips the padding of
    short responses; the result equals the padded update to float32 rounding. Off: one sequence
    per row, ``micro_batch_size`` rows per micro-batch."""

    loss: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    mini_batches: int = 8
    micro_batch_size: int = 32
    micro_batch_weighting: Literal["exact", "official"] = "exact"
    packing: bool = True

    def __post_init__(self):
        _checks.require(isinstance(self.loss, PolicyLossConfig),
                        f"algo.loss must be a PolicyLossConfig, got {type(self.loss).__name__}", error=ConfigError)
        _checks.check_choice("algo.advantage", self.advantage, ("grpo", "dr_grpo", "rloo"), error=ConfigError)
        _checks.check_int("algo.mini_batches", self.mini_batches, minimum=1, error=ConfigError)
        _checks.check_int("algo.micro_batch_size", self.micro_batch_size, minimum=1, error=ConfigError)
        _checks.check_choice("algo.micro_batch_weighting", self.micro_batch_weighting, ("exact", "official"),
                             error=ConfigError)
        _checks.check_bool("algo.packing", self.packing, error=ConfigError)


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """AdamW with global-norm clipping; LR warm-up counted in rollout steps (official: the
    first step has LR 0)."""

    lr: float = 1e-6
    warmup_steps: int = 10
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self):
        # AdamW moves each weight by about lr per update: an lr near 1 or above destroys any model.
        _checks.check_number("optim.lr", self.lr, minimum=0, maximum=1, exclusive_minimum=True,
                             exclusive_maximum=True, error=ConfigError)
        _checks.check_int("optim.warmup_steps", self.warmup_steps, minimum=0, error=ConfigError)
        _checks.check_number("optim.weight_decay", self.weight_decay, minimum=0, error=ConfigError)
        for name in ("b1", "b2"):
            _checks.check_number(f"optim.{name}", getattr(self, name), minimum=0, maximum=1, exclusive_maximum=True,
                                 error=ConfigError)
        _checks.check_number("optim.eps", self.eps, minimum=0, exclusive_minimum=True, error=ConfigError)
        _checks.check_number("optim.grad_clip", self.grad_clip, minimum=0, exclusive_minimum=True, error=ConfigError)


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Held-out evaluation: k samples per prompt → avg@k, cons@k (majority vote), pass@k."""

    every: int = 10
    k: int = 4
    temperature: float = 1.0
    top_p: float = 0.7

    def __post_init__(self):
        _checks.check_int("eval.every (0 = only before/after)", self.every, minimum=0, error=ConfigError)
        _checks.check_int("eval.k", self.k, minimum=1, error=ConfigError)
        _checks.check_number("eval.temperature (0 = greedy)", self.temperature, minimum=0, error=ConfigError)
        _checks.require(self.temperature == 0 or self.temperature >= MIN_TEMPERATURE,
                        f"eval.temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature!r}",
                        error=ConfigError)
        _checks.check_number("eval.top_p", self.top_p, minimum=0, maximum=1, exclusive_minimum=True, error=ConfigError)


@dataclasses.dataclass(frozen=True)
class SFTSpec:
    """Supervised warm start on generated demonstrations (``model.source="scratch"`` only);
    the result is cached under ``cache_dir`` keyed by this spec, the model and the task."""

    enabled: bool = True
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    step_fraction: float = 0.5
    cache_dir: str = "runs/.sft_cache"

    def __post_init__(self):
        _checks.check_int("sft.steps", self.steps, minimum=0, error=ConfigError)
        _checks.check_int("sft.batch_size", self.batch_size, minimum=1, error=ConfigError)
        _checks.check_number("sft.lr", self.lr, minimum=0, exclusive_minimum=True, error=ConfigError)
        _checks.check_number("sft.step_fraction", self.step_fraction, minimum=0, maximum=1, error=ConfigError)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; `fingerprint()` is what resume compares."""

    name: str = "cpu_default"
    seed: int = 0
    steps: int = 40
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    data: DataSpec = dataclasses.field(default_factory=DataSpec)
    rollout: RolloutSpec = dataclasses.field(default_factory=RolloutSpec)
    reward: RewardSpec = dataclasses.field(default_factory=RewardSpec)
    algo: AlgoSpec = dataclasses.field(default_factory=AlgoSpec)
    optim: OptimSpec = dataclasses.field(default_factory=OptimSpec)
    eval: EvalSpec = dataclasses.field(default_factory=EvalSpec)
    sft: SFTSpec = dataclasses.field(default_factory=SFTSpec)
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    mesh_shape: tuple[int, ...] = (1,)
    tensorboard: bool = False  # also write metrics as TensorBoard scalars (run_dir/tensorboard)

    def __post_init__(self):
        _checks.check_int("steps", self.steps, minimum=0, error=ConfigError)
        _checks.check_int("seed", self.seed, minimum=0, maximum=2**32 - 1, error=ConfigError)
        _checks.require(isinstance(self.mesh_shape, tuple) and 1 <= len(self.mesh_shape) <= len(MESH_AXES),
                        f"mesh_shape must be a list of 1 to {len(MESH_AXES)} sizes (axes {MESH_AXES}), got "
                        f"{self.mesh_shape!r}", error=ConfigError)
        for axis, size in zip(MESH_AXES, self.mesh_shape):
            _checks.check_int(f"mesh_shape ({axis} axis)", size, minimum=1, error=ConfigError)
        _checks.check_int("checkpoint_every", self.checkpoint_every, minimum=1, error=ConfigError)
        _checks.check_int("keep_checkpoints", self.keep_checkpoints, minimum=1, error=ConfigError)
        rows = self.rollout.prompts_per_step * self.rollout.n
        _checks.require(rows % self.algo.mini_batches == 0,
                        f"rollout.prompts_per_step × rollout.n = {rows} sequences must split into algo.mini_batches="
                        f"{self.algo.mini_batches} equal mini-batches", error=ConfigError)
        mini = rows // self.algo.mini_batches
        _checks.require(mini % self.algo.micro_batch_size == 0 or self.algo.micro_batch_size >= mini,
                        f"a mini-batch of {mini} sequences must split into micro-batches of algo.micro_batch_size="
                        f"{self.algo.micro_batch_size}", error=ConfigError)
        # Same bound as rewards.shaping (and verl's DAPO reward manager): L_buf ≤ L_max.
        _checks.require(
            self.rollout.max_response_tokens >= self.reward.overlong_buffer or not self.reward.overlong_shaping,
            f"reward.overlong_buffer ({self.reward.overlong_buffer}) must be <= rollout.max_response_tokens "
            f"({self.rollout.max_response_tokens}): the penalty starts at max_response_tokens - overlong_buffer",
            error=ConfigError)

    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain dict; the loss's mode-dependent defaults as None (`PolicyLossConfig.to_dict`)."""
        d = dataclasses.asdict(self)
        d["algo"]["loss"] = self.algo.loss.to_dict()
        return d

    def fingerprint(self) -> dict[str, Any]:
        """The fields a resumed run must share with its checkpoint (all but the length of
        the run, its name, the checkpoint cadence and logging)."""
        d = self.to_dict()
        for key in ("steps", "name", "checkpoint_every", "keep_checkpoints", "tensorboard"):
            d.pop(key)
        d["eval"].pop("every")
        return d


# ---------------------------------------------------------------- building from dicts / strings

def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert JSON / command-line values to a field's annotated type."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        _checks.require(isinstance(value, dict), f"{where} must be a mapping, got {value!r}", error=ConfigError)
        return from_dict(annotation, value, where)
    if origin is Literal:
        _checks.check_choice(where, value, typing.get_args(annotation), error=ConfigError)
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, annotation, where)
    if origin is tuple:
        return _coerce_tuple(value, typing.get_args(annotation)[0], where)
    scalar = _SCALARS.get(annotation)
    return value if scalar is None else scalar(value, where)


def _coerce_union(value: Any, annotation: Any, where: str) -> Any:
    """The first member type that accepts ``value``; None only where the union allows it."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    # "none" / "null" mean None only where None is allowed (remat's "none" is a policy name).
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        _checks.require(optional, f"{where} cannot be None", error=ConfigError)
        return None
    errors = []
    for arg in args:
        try:
            return _coerce(value, arg, where)
        except (ConfigError, ValueError, TypeError) as err:
            errors.append(str(err))
    raise ConfigError(errors[0])


def _coerce_tuple(value: Any, inner: Any, where: str) -> tuple:
    if isinstance(value, str):  # not valid JSON (apply_overrides parsed it): one literal item, never split
        _checks.require(inner is str, f"{where} must be a JSON list like [2, 2, 2], got {value!r}",
                        error=ConfigError)
        value = [value]
    _checks.require(isinstance(value, (list, tuple)), f"{where} must be a list, got {value!r}", error=ConfigError)
    return tuple(_coerce(v, inner, where) for v in value)


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, str):
        _checks.require(value.lower() in ("true", "false", "1", "0", "yes", "no"),
                        f"{where} must be a bool, got {value!r}", error=ConfigError)
        return value.lower() in ("true", "1", "yes")
    _checks.check_bool(where, value, error=ConfigError)
    return value


def _to_int(value: Any, where: str) -> int:
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be an int, got {value!r}") from None
    _checks.require(not isinstance(value, bool) and math.isfinite(as_float) and as_float == int(as_float),
                    f"{where} must be an int, got {value!r}", error=ConfigError)
    return int(as_float)


def _to_float(value: Any, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number, got {value!r}") from None


def _to_str(value: Any, where: str) -> str:
    _checks.require(isinstance(value, str), f"{where} must be a string, got {value!r}", error=ConfigError)
    return value


# A config field's scalar type → how a JSON or command-line value becomes it.
_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def from_dict(cls, data: dict[str, Any], where: str = ""):
    """Build dataclass `cls` from a (nested) dict; unknown keys are errors with suggestions."""
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(f"unknown config field {path!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; fields of {cls.__name__}: {names}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``a.b.c=value`` strings (values parsed as JSON when possible)."""
    data = config.to_dict()
    paths = [item.split("=", 1)[0].strip() for item in overrides]
    if "algo.loss.loss_mode" in paths:
        # Fields whose default depends on the mode are re-resolved for the new mode.
        for name in MODE_DEPENDENT_FIELDS:
            if f"algo.loss.{name}" not in paths:
                data["algo"]["loss"][name] = None
    for item in overrides:
        _checks.require("=" in item, f"override {item!r} must look like field.path=value", error=ConfigError)
        path, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        keys = path.strip().split(".")
        for key in keys[:-1]:
            _checks.require(isinstance(node.get(key), dict), f"unknown config section {key!r} in override {item!r}",
                            error=ConfigError)
            node = node[key]
        _checks.require(keys[-1] in node, f"unknown config field {path!r} in override {item!r}"
                        + (f" (did you mean {difflib.get_close_matches(keys[-1], list(node), n=1)[0]!r}?)"
                           if difflib.get_close_matches(keys[-1], list(node), n=1) else ""), error=ConfigError)
        node[keys[-1]] = value
    config = from_dict(TrainConfig, data)
    check_given_fields(config, [path.strip() for path in paths], "override")
    return config


def load_config(name_or_path: str) -> TrainConfig:
    """A named preset (see `PRESETS`) or a JSON file holding a (partial) `TrainConfig`."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    if not os.path.isfile(name_or_path):
        raise ConfigError(f"no config named {name_or_path!r}: not a preset {sorted(PRESETS)} nor an existing file")
    try:
        with open(name_or_path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {name_or_path}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {name_or_path}: not valid JSON: {err.msg} at line {err.lineno} column "
                          f"{err.colno}") from None
    _checks.require(isinstance(data, dict), f"config file {name_or_path}: must hold a JSON object of TrainConfig "
                    f"fields, got {type(data).__name__}", error=ConfigError)
    try:
        config = from_dict(TrainConfig, data)
    except ConfigError as err:
        raise ConfigError(f"config file {name_or_path}: {err}") from None
    check_given_fields(config, _dotted_keys(data), f"config file {name_or_path}: field")
    return config


def _dotted_keys(data: dict, prefix: str = "") -> list[str]:
    """Every leaf key of a nested dict as a dotted path."""
    out = []
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        out += _dotted_keys(value, path) if isinstance(value, dict) else [path]
    return out


_SCRATCH_MODEL_FIELDS = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "rope_theta")
_TASK_FIELDS = {"chain": ("n_terms", "ops", "train_prompts"), "word_problems": ("max_steps", "few_shot", "train_prompts"),
                "file": ("train_path", "eval_path")}


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
        for name in ("engine_slots", "engine_steps_per_sync"):
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


def micro_batch_rows(config: TrainConfig) -> int:
    """Rows of one update micro-batch (``algo.micro_batch_size``, at most a mini-batch); they split
    over the mesh's data axis (the rules table's ``batch``), so they must divide by it."""
    rollout, algo = config.rollout, config.algo
    rows = min(algo.micro_batch_size, rollout.prompts_per_step * rollout.n // algo.mini_batches)
    data = ways("batch", dict(zip(MESH_AXES, config.mesh_shape)))
    _checks.require(rows % data == 0, f"algo.micro_batch_size ({rows} rows) must divide by the mesh's data axis "
                                      f"({data})", error=ConfigError)
    return rows


def with_algo(config: TrainConfig, algo: str) -> TrainConfig:
    """Swap the loss to the official preset of ``algo`` ("fipo" keeps the config's FIPO settings)."""
    if algo == "fipo":
        loss = config.algo.loss if config.algo.loss.loss_mode == "fipo" else PolicyLossConfig()
    elif algo == "dapo":
        loss = PolicyLossConfig.dapo()
    elif algo == "grpo":
        loss = PolicyLossConfig.grpo()
    else:
        raise ConfigError(f"--algo must be fipo, dapo or grpo, got {algo!r}")
    return dataclasses.replace(config, algo=dataclasses.replace(config.algo, loss=loss))


# ------------------------------------------------------------------------------- presets

def cpu_default() -> TrainConfig:
    """The CPU experiment (≤ 10 min, 2 cores): a tiny Qwen2, SFT-warm-started on 18-term chains
    (step-by-step solutions of 106 tokens), then FIPO with the paper's 8 mini-batch updates per
    step and τ = 16 scaled to the response length, so that later mini-batches see a moved policy
    and the influence weights act (`influence_active_fraction` in summary.json)."""
    return TrainConfig(
        name="cpu_default",
        steps=30,
        data=DataSpec(n_terms=18, eval_prompts=128),
        rollout=RolloutSpec(n=8, prompts_per_step=32, prompts_per_round=48, max_rounds=3, max_response_tokens=128),
        reward=RewardSpec(overlong_buffer=16),
        # Unpacked: with responses ≤ 128 tokens packing saves ~0.4 s of a ~2 s update, less than the
        # ~6 s compile each new packed shape costs in a 30-step run (README, "Packed updates").
        algo=AlgoSpec(loss=PolicyLossConfig(decay_rate=16.0), mini_batches=8, micro_batch_size=32, packing=False),
        optim=OptimSpec(lr=1e-4, warmup_steps=2, weight_decay=0.0),
        eval=EvalSpec(every=10, k=4, top_p=1.0),
        sft=SFTSpec(steps=800),
    )


def qwen25_32b_fipo() -> TrainConfig:
    """Official FIPO recipe for Qwen2.5-32B-Base on DAPO-Math-17k (spec §3.1)."""
    return TrainConfig(
        name="qwen2.5-32b-fipo",
        steps=575,
        model=ModelSpec(source="hf", path="/path/to/Qwen2.5-32B", dtype="bfloat16", compute_dtype="bfloat16",
                        remat="full", logprob_chunk_size=1024, attention_chunk_size=512),
        data=DataSpec(task="file", train_path="/path/to/dapo-math-17k.parquet", eval_path="/path/to/aime-2024.parquet",
                      max_prompt_tokens=2048),
        rollout=RolloutSpec(n=16, prompts_per_step=512, prompts_per_round=2048, max_rounds=10, on_exhausted="error",
                            max_response_tokens=20480, temperature=1.0, top_p=1.0),
        reward=RewardSpec(overlong_buffer=4096, overlong_factor=1.0),
        algo=AlgoSpec(loss=PolicyLossConfig.fipo_32b(), mini_batches=8, micro_batch_size=8),
        optim=OptimSpec(lr=1e-6, warmup_steps=10, weight_decay=0.1, grad_clip=1.0),
        eval=EvalSpec(every=5, k=32, temperature=1.0, top_p=0.7),
        sft=SFTSpec(enabled=False),
        checkpoint_every=5,
    )


def qwen25_7b_fipo() -> TrainConfig:
    """The 7B pilot (spec §3.3): G = 32, balanced influence clip, safety 3, 10,240 tokens."""
    base = qwen25_32b_fipo()
    return dataclasses.replace(
        base,
        name="qwen2.5-7b-math-fipo",
        model=dataclasses.replace(base.model, path="/path/to/Qwen2.5-Math-7B"),
        rollout=dataclasses.replace(base.rollout, n=32, max_response_tokens=10240),
        reward=RewardSpec(overlong_buffer=2048),
        algo=AlgoSpec(loss=PolicyLossConfig.fipo_7b(), mini_batches=8, micro_batch_size=8),
    )


def gemma3_270m_fipo() -> TrainConfig:
    """FIPO on a real pretrained base model that fits this CPU: Gemma 3 270M (the packaged
    Q4_K_M GGUF, dequantised to float32) on two-shot arithmetic word problems of one step, which
    it solves partly before RL (~8–16 % avg@2); generation stops at the next "Question:".
    About 2.5 minutes per RL step on 2 CPU cores (12 steps + load, 4 evaluations and export
    ≈ 35 minutes). Remat (a rematerialised scan over the layers) is on: on XLA:CPU it is as fast
    as without and cuts the update's temporaries from 11 to 2.5 GiB (`bench_gemma.py`)."""
    return TrainConfig(
        name="gemma3-270m-fipo",
        steps=12,
        model=ModelSpec(source="gemma3-270m", dtype="float32", compute_dtype="float32", remat="full",
                        logprob_chunk_size=32),
        data=DataSpec(task="word_problems", train_prompts=4096, eval_prompts=32, max_prompt_tokens=384,
                      max_steps=1, few_shot=2),
        rollout=RolloutSpec(n=4, prompts_per_step=6, prompts_per_round=8, max_rounds=2, on_exhausted="pad",
                            max_response_tokens=64, temperature=1.0, stop=("Question:",)),
        reward=RewardSpec(overlong_buffer=16),
        algo=AlgoSpec(loss=PolicyLossConfig.fipo_32b(), mini_batches=2, micro_batch_size=6),
        optim=OptimSpec(lr=1e-6, warmup_steps=0, weight_decay=0.0),
        eval=EvalSpec(every=4, k=2, temperature=1.0, top_p=1.0),
        sft=SFTSpec(enabled=False),
        checkpoint_every=4,
    )


def gemma3_270m_fipo_accelerator() -> TrainConfig:
    """The Gemma 3 270M recipe sized for one GPU / TPU host: 64 prompts × 8 responses per step,
    one to three reasoning steps, 256-token responses, 8 mini-batches (the paper's count),
    bfloat16 compute, 200 steps. Untested on an accelerator so far (none was lent)."""
    base = gemma3_270m_fipo()
    return dataclasses.replace(
        base,
        name="gemma3-270m-fipo-accelerator",
        steps=200,
        model=dataclasses.replace(base.model, compute_dtype="bfloat16", logprob_chunk_size=128),
        data=dataclasses.replace(base.data, max_steps=3, eval_prompts=256),
        rollout=dataclasses.replace(base.rollout, n=8, prompts_per_step=64, prompts_per_round=128, max_rounds=4,
                                    max_response_tokens=256),
        reward=RewardSpec(overlong_buffer=64),
        algo=dataclasses.replace(base.algo, mini_batches=8, micro_batch_size=16),
        optim=OptimSpec(lr=2e-6, warmup_steps=5, weight_decay=0.0),
        eval=EvalSpec(every=10, k=8, temperature=1.0, top_p=1.0),
        checkpoint_every=10,
    )


PRESETS = {"cpu_default": cpu_default, "qwen2.5-32b-fipo": qwen25_32b_fipo, "qwen2.5-7b-fipo": qwen25_7b_fipo,
           "gemma3-270m-fipo": gemma3_270m_fipo, "gemma3-270m-fipo-accelerator": gemma3_270m_fipo_accelerator}
