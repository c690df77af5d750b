"""A `TrainConfig` → the runtime configs of the parts it drives, one named constructor each.

The run configuration (`fipo_jax.config`) is what users write; the update (`update.UpdateConfig`),
the scorer (`rewards.RewardConfig`) and the sampler (`sampling.SamplingConfig`) each take their own
config, usable without a `TrainConfig`. Every field copied from the one to the others is copied
here, once, so a new field is wired in one place. (Not in `fipo_jax.config`: the run
configuration stays below the modules that run it; nor as classmethods of the runtime configs,
which would tie `update` and `rewards` to the application's config.)

>>> from fipo_jax.config import cpu_default
>>> from fipo_jax.data import CharTokenizer
>>> update_config(cpu_default()).group_size
8
>>> reward_config(cpu_default()).overlong_buffer
16
>>> sampling_config(cpu_default(), CharTokenizer()).prompt_length_buckets[-1]  # max_prompt_tokens + slack
2064
"""

from __future__ import annotations

from collections.abc import Sequence

from fipo_jax.config import TrainConfig
from fipo_jax.generation.sampling import SamplingConfig
from fipo_jax.rewards import RewardConfig
from fipo_jax.train import shapes
from fipo_jax.train.update import UpdateConfig


def update_config(config: TrainConfig) -> UpdateConfig:
    """The static settings of `update.rl_update`: the loss, advantages over groups of ``rollout.n``
    responses, the micro-batch weighting, the log-prob chunk and the metrics' quantiles."""
    algo = config.algo
    return UpdateConfig(loss=algo.loss, group_size=config.rollout.n, advantage=algo.advantage,
                        micro_batch_weighting=algo.micro_batch_weighting,
                        logprob_chunk_size=config.model.logprob_chunk_size,
                        ratio_quantiles=config.metrics.ratio_quantiles, old_log_probs=algo.old_log_probs)


def reward_config(config: TrainConfig) -> RewardConfig:
    """Scoring of the responses: the verifier's time bounds and DAPO overlong shaping up to
    ``rollout.max_response_tokens`` (none when ``reward.overlong_shaping`` is off)."""
    reward = config.reward
    return RewardConfig(max_response_length=config.rollout.max_response_tokens,
                        overlong_buffer=reward.overlong_buffer if reward.overlong_shaping else None,
                        overlong_factor=reward.overlong_factor, verify_timeout_s=reward.verify_timeout_s,
                        batch_budget_s=reward.score_budget_s)


def sampling_config(config: TrainConfig, tokenizer, stop_sequences: Sequence[tuple[int, ...]] = (), *,
                    evaluation: bool = False) -> SamplingConfig:
    """How rollouts sample (``rollout.temperature``, ``top_p``, ``top_k``) or, with ``evaluation``,
    how evaluation samples (``eval.temperature``, ``eval.top_p``, no top-k): up to
    ``rollout.max_response_tokens`` tokens, ending at the tokenizer's EOS or at one of
    ``stop_sequences`` (the token ids of ``rollout.stop``); padding with its pad token (else EOS)."""
    rollout, ev = config.rollout, config.eval
    temperature, top_p, top_k = ((ev.temperature, ev.top_p, 0) if evaluation
                                 else (rollout.temperature, rollout.top_p, rollout.top_k))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return SamplingConfig(max_new_tokens=rollout.max_response_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, eos_token_ids=(tokenizer.eos_token_id,), stop_sequences=tuple(stop_sequences),
                          pad_token_id=pad, prompt_length_buckets=shapes.prompt_buckets(config))
