"""Every size a run's arrays take, derived once from its `TrainConfig`.

The trainer, the rollouts, the preflight and the memory planner all read these functions, so the
planner plans exactly what a run allocates:

    shapes = run_shapes(config)                  # on config.mesh_shape, or mesh_shape=(2, 4, 1)
    shapes.model                                 # the ModelConfig, its runtime settings included
    shapes.sampler_rows, shapes.sampler_prompt_width, shapes.row_tokens, shapes.micro_batch_rows

Prompt widths. Prompts are left-padded to a sampler bucket P (`prompt_buckets`: the default buckets
below ``data.max_prompt_tokens`` + `PROMPT_BUCKET_SLACK`, then that); the update keeps the prompt
columns some row uses, rounded up to a multiple of `PROMPT_WIDTH_MULTIPLE` and at most P
(`update_prompt_width`), so its row holds that many prompt tokens + ``rollout.max_response_tokens``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from fipo_jax.config import ConfigError, TrainConfig, micro_batch_rows
from fipo_jax.data import ChainTask, CharTokenizer
from fipo_jax.generation.sampling import DEFAULT_PROMPT_BUCKETS
from fipo_jax.models.config import ModelConfig
from fipo_jax.parallel.sharding import MESH_AXES, ways

# The widest prompt bucket is data.max_prompt_tokens plus this (room for a chat template's tokens).
PROMPT_BUCKET_SLACK = 16
# The update trims all-padding prompt columns to a multiple of this (bounds recompilation).
PROMPT_WIDTH_MULTIPLE = 64
# Positions the scratch model's RoPE is configured for.
SCRATCH_MAX_POSITIONS = 4096

# Architectures of public checkpoints (their config.json), for planning without the files.
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4),
    "qwen2.5-math-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4),
    "qwen2.5-32b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                        num_attention_heads=40, num_key_value_heads=8),
    "gemma3-270m": dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, tie_word_embeddings=True,
                        model_type="gemma3_text", qkv_bias=False, qk_norm=True, norm_unit_offset=True,
                        sandwich_norms=True, hidden_activation="gelu_pytorch_tanh", scale_embeddings=True),
}


def scratch_model_config(config: TrainConfig) -> ModelConfig:
    """The small random Qwen2 of ``model.source="scratch"``, on the chain task's character vocabulary."""
    spec = config.model
    return ModelConfig(vocab_size=CharTokenizer().vocab_size, hidden_size=spec.hidden_size,
                       intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                       num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                       rope_theta=spec.rope_theta, max_position_embeddings=SCRATCH_MAX_POSITIONS,
                       tie_word_embeddings=True, **spec.options.config_fields())


def model_config(config: TrainConfig) -> ModelConfig:
    """The architecture ``config.model`` names with its runtime settings, without loading weights:
    the scratch model's fields, a checkpoint folder's ``config.json``, or a known public architecture
    matched by name (a ``.gguf`` file's name included)."""
    spec = config.model
    if spec.source == "scratch":
        return scratch_model_config(config)
    name = "gemma3-270m" if spec.source == "gemma3-270m" else spec.path
    config_json = os.path.join(name, "config.json")
    if os.path.isfile(config_json):
        from fipo_jax.models.families import config_from_hf

        with open(config_json) as f:
            return config_from_hf(json.load(f), spec.options)
    key = os.path.basename(os.path.normpath(name)).lower().replace("_", "-")
    for known in sorted(KNOWN_MODELS, key=len, reverse=True):
        if known in key:
            return ModelConfig(**KNOWN_MODELS[known], **spec.options.config_fields())
    raise ConfigError(f"model.path {spec.path!r}: no config.json there and no known architecture in its name "
                      f"(known: {sorted(KNOWN_MODELS)}); point model.path at the checkpoint folder")


def prompt_buckets(config: TrainConfig) -> tuple[int, ...]:
    """Prompt widths the sampler pads to: the default buckets below the widest, then the widest
    (``data.max_prompt_tokens`` + `PROMPT_BUCKET_SLACK`)."""
    widest = config.data.max_prompt_tokens + PROMPT_BUCKET_SLACK
    return tuple(b for b in DEFAULT_PROMPT_BUCKETS if b < widest) + (widest,)


def longest_prompt(config: TrainConfig) -> int:
    """Tokens of the longest prompt the run can sample from: the chain task's prompts all have one
    known length; other data are bounded by ``data.max_prompt_tokens``."""
    data = config.data
    if data.task == "chain":
        return ChainTask.of(data).prompt_tokens()
    return data.max_prompt_tokens


def bucket(buckets: Sequence[int], tokens: int) -> int:
    """The narrowest of ``buckets`` (ascending) that holds ``tokens``; the widest if none does."""
    return next((b for b in buckets if b >= tokens), buckets[-1])


def update_prompt_width(used: int, sampler_width: int) -> int:
    """Prompt columns the update keeps: the ``used`` ones (those some row's prompt fills) rounded up
    to a multiple of `PROMPT_WIDTH_MULTIPLE`, at most the sampler's width P."""
    return min(sampler_width, -(-used // PROMPT_WIDTH_MULTIPLE) * PROMPT_WIDTH_MULTIPLE)


def engine_slots(requested: int, rows: int, split: int) -> int:
    """Slots the engine decodes at once for ``rows`` requests: ``rollout.engine_slots`` but no more
    than the rows, rounded up to a multiple of the ``split`` ways the rows divide over devices."""
    return -(-min(requested, rows) // split) * split


@dataclasses.dataclass(frozen=True)
class RunShapes:
    """The sizes of one run's arrays (`run_shapes`); per device where named ``local``.

    Attributes:
      model: the policy's `ModelConfig`, runtime settings (`ModelOptions`) included.
      mesh_shape: the mesh (data, fsdp, tensor) these sizes are for.
      data_split: ways the batch's rows split over devices (the rules table's ``batch`` axes).
      step_rows: responses one RL step trains on (``prompts_per_step × n``).
      round_rows: responses one generation round samples (``prompts_per_round × n``).
      sampler_rows: rows the training sampler decodes at once: the engine's slots, or every row
        of the round for the static sampler.
      micro_batch_rows: rows of one update micro-batch (`fipo_jax.config.micro_batch_rows`).
      sampler_prompt_width: P, the widest prompt bucket the sampler pads to.
      update_prompt_width: prompt columns the update's rows keep at most.
      response_tokens: N, ``rollout.max_response_tokens``.
    """

    model: ModelConfig
    mesh_shape: tuple[int, ...]
    data_split: int
    step_rows: int
    round_rows: int
    sampler_rows: int
    micro_batch_rows: int
    sampler_prompt_width: int
    update_prompt_width: int
    response_tokens: int

    @property
    def row_tokens(self) -> int:
        """Tokens of one update row: its prompt columns and N response columns."""
        return self.update_prompt_width + self.response_tokens

    @property
    def sampler_local_rows(self) -> int:
        """Rows (or slots) of the sampler on one device."""
        return -(-self.sampler_rows // self.data_split)


def run_shapes(config: TrainConfig, mesh_shape: Sequence[int] | None = None,
               model: ModelConfig | None = None, updates: bool = True) -> RunShapes:
    """The sizes of ``config``'s arrays on a mesh of ``mesh_shape`` (default ``config.mesh_shape``);
    ``model`` overrides the architecture `model_config` finds (e.g. the loaded model's). A mesh that
    only samples (``updates=False``: a rollout group) has no update micro-batch (0 rows)."""
    shape = tuple(config.mesh_shape if mesh_shape is None else mesh_shape)
    config = dataclasses.replace(config, mesh_shape=shape)
    rollout = config.rollout
    split = ways("batch", dict(zip(MESH_AXES, shape)))
    round_rows = rollout.prompts_per_round * rollout.n
    sampler_rows = (engine_slots(rollout.engine_slots, round_rows, split) if rollout.sampler == "engine"
                    else round_rows)
    width = bucket(prompt_buckets(config), longest_prompt(config))
    return RunShapes(model=model or model_config(config), mesh_shape=shape, data_split=split,
                     step_rows=rollout.prompts_per_step * rollout.n, round_rows=round_rows,
                     sampler_rows=sampler_rows, micro_batch_rows=micro_batch_rows(config) if updates else 0,
                     sampler_prompt_width=width, update_prompt_width=update_prompt_width(longest_prompt(config), width),
                     response_tokens=rollout.max_response_tokens)
