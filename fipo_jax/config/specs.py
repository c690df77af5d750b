"""The run configuration's sections: frozen dataclasses, each validated on construction.

Every check goes through the one vocabulary (`fipo_jax.core._checks`) with ``error=ConfigError`` and a
one-line message that names the field. A choice list is declared once: here as a ``Literal``
whose arguments are the choices (``MODEL_SOURCES = get_args(ModelSource)``), or where the choices
are implemented (`advantages.ADVANTAGE_ESTIMATORS`, `losses.MICRO_BATCH_WEIGHTINGS`,
`models.config.SUPPORTED_DTYPES` and ``REMAT_POLICIES``).

>>> TrainConfig().model.source in MODEL_SOURCES
True
>>> ModelSpec(rope_theta=0.0)
Traceback (most recent call last):
    ...
fipo_jax.config.specs.ConfigError: model.rope_theta must be a finite number > 0, got 0.0
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal, get_args

from fipo_jax.core import _checks
from fipo_jax.core.advantages import ADVANTAGE_ESTIMATORS
from fipo_jax.core.behaviour import OLD_LOG_PROBS, OldLogProbs
from fipo_jax.core.losses import MICRO_BATCH_WEIGHTINGS, MicroBatchWeighting, PolicyLossConfig
from fipo_jax.generation.sampling import MIN_TEMPERATURE
from fipo_jax.models.config import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES, SUPPORTED_DTYPES, ModelOptions
from fipo_jax.models.lora import DEFAULT_MODULE_PATH, LoraConfig
from fipo_jax.parallel.sharding import MESH_AXES, ways
from fipo_jax.rewards.shaping import check_overlong_factor


class ConfigError(ValueError):
    """A configuration that cannot be used, with the offending field in the message."""


# The choices of the config's own switches, each declared once (the Literal); the tuples are its arguments.
ModelSource = Literal["scratch", "hf", "gemma3-270m"]
DataTask = Literal["chain", "word_problems", "file"]
Sampler = Literal["engine", "static"]
OnExhausted = Literal["error", "pad"]
MODEL_SOURCES: tuple[str, ...] = get_args(ModelSource)
DATA_TASKS: tuple[str, ...] = get_args(DataTask)
SAMPLERS: tuple[str, ...] = get_args(Sampler)
ON_EXHAUSTED: tuple[str, ...] = get_args(OnExhausted)


def _check_run_name(name: Any) -> None:
    """``name`` names the run's directory (``runs/<name>-<algo>``): a non-empty string without '/' or NUL,
    not '.' or '..'."""
    _checks.require(isinstance(name, str) and bool(name) and "/" not in name and "\0" not in name
                    and name not in (".", ".."),
                    f"name must be a non-empty string usable as a directory name (no '/', not '.' or '..', no NUL), "
                    f"got {name!r}", error=ConfigError)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Adapters instead of full fine-tuning (`fipo_jax.models.lora`): ``rank`` 0 trains every weight; r ≥ 1
    trains only rank-r adapters on the projections ``module_path`` matches (a regex over paths inside a
    decoder layer, "self_attn/q_proj"; default all seven), scaled ``alpha`` / r, with the base frozen and,
    with ``base_dtype`` int8 / int4 / nf4, held quantized (QLoRA). ``seed`` draws the adapters' A."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    module_path: str = DEFAULT_MODULE_PATH
    base_dtype: str | None = None  # None: as loaded; one of lora.BASE_DTYPES
    block_size: int | None = None  # QLoRA: input rows per scale (None: int8 per channel, 4-bit blocks of 64)
    seed: int = 0

    def __post_init__(self):
        _checks.check_int("model.lora.rank", self.rank, minimum=0, error=ConfigError)
        if self.rank:
            try:
                self.config()
            except ValueError as err:
                raise ConfigError(f"model.{err}") from None

    def config(self) -> LoraConfig | None:
        """The `LoraConfig` these settings describe (None when rank is 0: no adapters)."""
        if not self.rank:
            return None
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, module_path=self.module_path,
                          base_dtype=self.base_dtype, block_size=self.block_size, seed=self.seed)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The policy. ``source="hf"`` loads a pretrained checkpoint at ``path``: a Hugging Face
    folder (Qwen2/2.5, Qwen3, Llama 3, Gemma 3 text) or a ``.gguf`` file; ``source="gemma3-270m"``
    loads Gemma 3 270M (base, Q4_K_M GGUF) assembled from its package (``path`` unused);
    ``source="scratch"`` builds a small random Qwen2 from the fields below (CPU experiment)."""

    source: ModelSource = "scratch"
    path: str = ""
    dtype: str = "float32"  # one of models.config.SUPPORTED_DTYPES
    compute_dtype: str = "float32"
    remat: bool | str = "none"  # ModelConfig.remat: one of REMAT_POLICIES; true / false read as "full" / "none"
    num_layers: int = 2
    hidden_size: int = 128
    intermediate_size: int = 384
    num_heads: int = 4
    num_kv_heads: int = 2
    rope_theta: float = 10000.0
    logprob_chunk_size: int = 1024
    attention_chunk_size: int | None = None  # query-chunked attention: O(chunk × T) score memory
    attention_impl: str = "auto"  # full-sequence attention kernel: auto / xla / cudnn / splash (ModelConfig)
    lora: LoraSpec = dataclasses.field(default_factory=LoraSpec)

    def __post_init__(self):
        _checks.check_choice("model.source", self.source, MODEL_SOURCES, error=ConfigError)
        for name in ("dtype", "compute_dtype"):
            _checks.check_choice(f"model.{name}", getattr(self, name), SUPPORTED_DTYPES, error=ConfigError)
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        _checks.check_choice("model.remat", self.remat, REMAT_POLICIES, error=ConfigError)
        _checks.check_choice("model.attention_impl", self.attention_impl, ATTENTION_IMPLEMENTATIONS, error=ConfigError)
        _checks.check_number("model.rope_theta", self.rope_theta, minimum=0, exclusive_minimum=True, error=ConfigError)
        _checks.require(self.source != "hf" or bool(self.path), "model.path is required when model.source='hf'",
                        error=ConfigError)
        _checks.require(self.source == "hf" or not self.path,
                        f"model.path is set ({self.path!r}) but model.source={self.source!r} does not read it: set "
                        f"model.source='hf' to load it, or leave model.path empty", error=ConfigError)
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                     "logprob_chunk_size"):
            _checks.check_int(f"model.{name}", getattr(self, name), minimum=1, error=ConfigError)
        _checks.check_int("model.attention_chunk_size", self.attention_chunk_size, minimum=1, allow_none=True,
                          error=ConfigError)
        _checks.require(self.num_heads % self.num_kv_heads == 0,
                        f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                        f"({self.num_kv_heads})", error=ConfigError)
        _checks.require(self.hidden_size % self.num_heads == 0,
                        f"model.hidden_size ({self.hidden_size}) must be a multiple of model.num_heads "
                        f"({self.num_heads})", error=ConfigError)

    @property
    def options(self) -> ModelOptions:
        """How the policy runs (`ModelOptions`): dtypes, remat, attention chunk and kernel."""
        return ModelOptions(dtype=self.dtype, compute_dtype=self.compute_dtype, remat=self.remat,
                            attention_chunk_size=self.attention_chunk_size, attention_impl=self.attention_impl)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Prompts. ``task="chain"`` is the synthetic CPU task (`fipo_jax.data.ChainTask`);
    ``task="word_problems"`` generates few-shot arithmetic word problems of 1 to ``max_steps``
    steps for pretrained base models (`fipo_jax.data.WordProblemTask`); ``task="file"`` reads a
    DAPO-schema parquet or JSONL (``train_path``, ``eval_path``)."""

    task: DataTask = "chain"
    train_path: str = ""
    eval_path: str = ""
    n_terms: int = 5
    ops: str = "+*"
    invertible: bool = False  # chain: × only by units mod 10, so answers are uniform (no shortcut)
    worked: str = "lines"  # chain: worked solutions as "3+5=8" lines or as the running values "8 6 3"
    train_prompts: int = 4096
    eval_prompts: int = 64
    max_prompt_tokens: int = 2048
    max_steps: int = 3  # word_problems: arithmetic steps per problem (1 … max_steps)
    few_shot: int = 2  # word_problems: worked examples in each prompt

    def __post_init__(self):
        _checks.check_choice("data.task", self.task, DATA_TASKS, error=ConfigError)
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
                ChainTask.of(self)
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
    on_exhausted: OnExhausted = "pad"
    max_response_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()  # stop strings (e.g. "Question:" for few-shot prompts); kept in the response
    # "engine": continuous batching (`fipo_jax.generation.engine`, slots refilled as responses end, each prompt
    # prefilled once); "static": `static_sampler.generate` (every row decodes until the longest ends).
    # Same tokens either way (randomness is per request); the engine is faster when lengths vary.
    sampler: Sampler = "engine"
    engine_slots: int = 128  # decode slots (at most the rows of a round are used)
    engine_steps_per_sync: int = 16  # decode steps between host syncs
    # Versions the sampling weights may lag the update (0: each step samples with its own weights, in sequence;
    # k ≥ 1: the rollouts of the next k steps are drawn while the update runs, `fipo_jax.train.pipeline`).
    max_staleness: int = 0

    def __post_init__(self):
        _checks.check_choice("rollout.sampler", self.sampler, SAMPLERS, error=ConfigError)
        _checks.check_bool("rollout.dynamic_sampling", self.dynamic_sampling, error=ConfigError)
        _checks.check_int("rollout.engine_slots", self.engine_slots, minimum=1, error=ConfigError)
        _checks.check_int("rollout.engine_steps_per_sync", self.engine_steps_per_sync, minimum=1, error=ConfigError)
        _checks.check_int("rollout.max_staleness", self.max_staleness, minimum=0, error=ConfigError)
        _checks.require(all(isinstance(x, str) and x for x in self.stop),
                        f"rollout.stop must be a list of non-empty strings (a plain value is one stop string, "
                        f"taken literally), got {self.stop!r}", error=ConfigError)
        for name in ("n", "prompts_per_step", "prompts_per_round", "max_rounds", "max_response_tokens"):
            value = getattr(self, name)  # keeps the wording train.py's users see: "rollout.n must be >= 1"
            _checks.require(_checks.is_int(value) and value >= 1,
                            f"rollout.{name} must be >= 1 (an int), got {value!r}", error=ConfigError)
        _checks.check_choice("rollout.on_exhausted", self.on_exhausted, ON_EXHAUSTED, error=ConfigError)
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
        _checks.check_bool("reward.overlong_shaping", self.overlong_shaping, error=ConfigError)
        _checks.check_int("reward.overlong_buffer", self.overlong_buffer, minimum=1, error=ConfigError)
        _checks.check_number("reward.score_budget_s", self.score_budget_s, minimum=0, exclusive_minimum=True,
                             error=ConfigError)
        check_overlong_factor(self.overlong_factor, "reward.overlong_factor", ConfigError)  # ≤ 2^20: no overflow
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
    advantage: str = "grpo"  # a key of advantages.ADVANTAGE_ESTIMATORS
    mini_batches: int = 8
    micro_batch_size: int = 32
    micro_batch_weighting: MicroBatchWeighting = "exact"
    packing: bool = True
    old_log_probs: OldLogProbs = "trainer"  # π_old of the loss: the trainer's recompute, or the sampler's

    def __post_init__(self):
        _checks.require(isinstance(self.loss, PolicyLossConfig),
                        f"algo.loss must be a PolicyLossConfig, got {type(self.loss).__name__}", error=ConfigError)
        _checks.check_choice("algo.advantage", self.advantage, ADVANTAGE_ESTIMATORS, error=ConfigError)
        _checks.check_int("algo.mini_batches", self.mini_batches, minimum=1, error=ConfigError)
        _checks.check_int("algo.micro_batch_size", self.micro_batch_size, minimum=1, error=ConfigError)
        _checks.check_choice("algo.micro_batch_weighting", self.micro_batch_weighting, MICRO_BATCH_WEIGHTINGS,
                             error=ConfigError)
        _checks.check_bool("algo.packing", self.packing, error=ConfigError)
        _checks.check_choice("algo.old_log_probs", self.old_log_probs, OLD_LOG_PROBS, error=ConfigError)


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
    seed: int | None = None  # the warm start's own seed (None: the run's); set, RL seeds share one warm start
    partial: bool = False  # worked demonstrations stop after 1 … all operations, then answer: every length
    packaged: bool = True  # load the warm start shipped with fipo_jax when one was made for exactly this recipe
    cache_dir: str | None = "runs/.sft_cache"  # None: train the warm start every time, cache nothing

    def __post_init__(self):
        _checks.check_bool("sft.enabled", self.enabled, error=ConfigError)
        _checks.check_bool("sft.packaged", self.packaged, error=ConfigError)
        _checks.require(self.cache_dir is None or (isinstance(self.cache_dir, str) and bool(self.cache_dir)),
                        f"sft.cache_dir must be a non-empty string or None, got {self.cache_dir!r}", error=ConfigError)
        _checks.check_int("sft.steps", self.steps, minimum=0, error=ConfigError)
        _checks.check_int("sft.batch_size", self.batch_size, minimum=1, error=ConfigError)
        _checks.check_number("sft.lr", self.lr, minimum=0, exclusive_minimum=True, error=ConfigError)
        _checks.check_number("sft.step_fraction", self.step_fraction, minimum=0, maximum=1, error=ConfigError)
        _checks.require(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
                        f"sft.seed must be an integer or None, got {self.seed!r}", error=ConfigError)
        _checks.check_bool("sft.partial", self.partial, error=ConfigError)


@dataclasses.dataclass(frozen=True)
class MetricsSpec:
    """What a run reports beyond its loss; no part of the run (left out of the resume fingerprint)."""

    ratio_quantiles: bool = True  # IS-ratio and influence-weight quantiles (sorts of every token each update)

    def __post_init__(self):
        _checks.check_bool("metrics.ratio_quantiles", self.ratio_quantiles, error=ConfigError)


_ABSENT = object()


def value_at(tree: dict[str, Any], path: str, default: Any = _ABSENT) -> Any:
    """The value at dotted ``path`` of nested dict ``tree``; ``default`` when a key is missing
    (`KeyError` without one)."""
    node: Any = tree
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            if default is _ABSENT:
                raise KeyError(path)
            return default
        node = node[key]
    return node


def without_paths(tree: dict[str, Any], paths) -> dict[str, Any]:
    """A JSON copy of nested dict ``tree`` (tuples as lists, as checkpoint metadata holds it) without
    those of the dotted ``paths`` it holds."""
    out = json.loads(json.dumps(tree))
    for path in paths:
        *parents, leaf = path.split(".")
        node: Any = out
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


# Fields that change where and how fast a run computes, not what it computes (to float32 rounding):
# a run resumes with other values (the mesh and device count, the rollout / train split, remat, the
# chunk sizes, the attention kernel, the sampler and its slots — the engine draws the static
# sampler's tokens —, packing) and the staleness bound (which weights sample, not what a step does
# with its samples). The rest of the fingerprint changes the math and is refused on resume, naming the field.
PLACEMENT_FIELDS = ("mesh_shape", "rollout_mesh_shape", "model.remat", "model.attention_chunk_size",
                    "model.logprob_chunk_size", "model.attention_impl", "rollout.sampler", "rollout.engine_slots",
                    "rollout.engine_steps_per_sync", "rollout.max_staleness", "algo.packing")


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
    metrics: MetricsSpec = dataclasses.field(default_factory=MetricsSpec)
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    mesh_shape: tuple[int, ...] = (1,)
    # The rollout engine's own devices and mesh (after the training mesh's devices); () shares the training mesh.
    rollout_mesh_shape: tuple[int, ...] = ()
    tensorboard: bool = False  # also write metrics as TensorBoard scalars (run_dir/tensorboard)

    def __post_init__(self):
        _check_run_name(self.name)
        _checks.check_bool("tensorboard", self.tensorboard, error=ConfigError)
        _checks.check_int("steps", self.steps, minimum=0, error=ConfigError)
        _checks.check_int("seed", self.seed, minimum=0, maximum=2**32 - 1, error=ConfigError)
        _checks.require(isinstance(self.mesh_shape, tuple) and 1 <= len(self.mesh_shape) <= len(MESH_AXES),
                        f"mesh_shape must be a list of 1 to {len(MESH_AXES)} sizes (axes {MESH_AXES}), got "
                        f"{self.mesh_shape!r}", error=ConfigError)
        for axis, size in zip(MESH_AXES, self.mesh_shape):
            _checks.check_int(f"mesh_shape ({axis} axis)", size, minimum=1, error=ConfigError)
        _checks.require(isinstance(self.rollout_mesh_shape, tuple) and len(self.rollout_mesh_shape) <= len(MESH_AXES),
                        f"rollout_mesh_shape must be a list of 0 to {len(MESH_AXES)} sizes (axes {MESH_AXES}; empty: "
                        f"the rollouts share the training mesh), got {self.rollout_mesh_shape!r}", error=ConfigError)
        for axis, size in zip(MESH_AXES, self.rollout_mesh_shape):
            _checks.check_int(f"rollout_mesh_shape ({axis} axis)", size, minimum=1, error=ConfigError)
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
        """The fields a resumed run must share with its checkpoint: what changes the math (all but
        the length of the run, its name, the checkpoint cadence, logging, metrics and `PLACEMENT_FIELDS`)."""
        d = self.to_dict()
        for key in ("steps", "name", "checkpoint_every", "keep_checkpoints", "tensorboard", "metrics"):
            d.pop(key)
        d["eval"].pop("every")
        return without_paths(d, PLACEMENT_FIELDS)

    def placement(self) -> dict[str, Any]:
        """The `PLACEMENT_FIELDS` and their values (a resume may change them; it says which)."""
        d = self.to_dict()
        return {path: value_at(d, path) for path in PLACEMENT_FIELDS}

def sampler_as_old_warning(config: TrainConfig) -> str | None:
    """A one-line warning when FIPO's Future-KL reads the sampler's log-probs as π_old, or None."""
    if config.algo.old_log_probs != "sampler" or config.algo.loss.loss_mode != "fipo":
        return None
    return ("algo.old_log_probs='sampler' with loss_mode='fipo': Future-KL sums log π_θ − log π_sampler, which holds "
            "the engine's numerical mismatch (and any staleness) besides the update's own drift; a systematic offset "
            "drives the influence weights to their clip bounds. 'trainer' (the default) keeps it on π_θ / π_prox")


def fipo_inert_reason(config: TrainConfig) -> str | None:
    """Why FIPO's Future-KL cannot act in this run (it is then DAPO exactly), or None.

    Future-KL sums log π_θ − log π_old; π_old is the policy that sampled the step's rollouts, and
    the trainer's updates are on-policy (no stale rollouts), so θ = θ_old in a step's first
    mini-batch and FutureKL ≡ 0 there. With ``algo.mini_batches = 1`` every update is a first one:
    the influence weights are exactly 1 on every token and the loss is DAPO's."""
    algo = config.algo
    if algo.loss.loss_mode != "fipo" or algo.mini_batches > 1 or algo.old_log_probs == "sampler":
        return None
    return ("algo.mini_batches=1 with loss_mode='fipo': each step makes one update on its own fresh rollouts, so "
            "π_θ = π_old in every update, Future-KL is identically 0 and FIPO is exactly DAPO; set "
            "algo.mini_batches >= 2 for FIPO to act (the official recipes use 8)")


def micro_batch_rows(config: TrainConfig) -> int:
    """Rows of one update micro-batch (``algo.micro_batch_size``, at most a mini-batch); they split
    over the mesh's data axis (the rules table's ``batch``), so they must divide by it."""
    rollout, algo = config.rollout, config.algo
    rows = min(algo.micro_batch_size, rollout.prompts_per_step * rollout.n // algo.mini_batches)
    data = ways("batch", dict(zip(MESH_AXES, config.mesh_shape)))
    _checks.require(rows % data == 0, f"algo.micro_batch_size ({rows} rows) must divide by the mesh's data axis "
                                      f"({data})", error=ConfigError)
    return rows
