"""Rollouts: prompts → sampled, scored responses → DAPO dynamic sampling → one step's batch.

`RolloutCollector` owns everything between the prompt records and the update's batch:
encoding prompts (chat template, BOS), the sampling configs of training and evaluation (stop
sequences, prompt-width buckets), sampling on the mesh from a given policy, scoring (verifier and
overlong shaping) and the dynamic-sampling loop. It holds no parameters: every call is given the
policy to sample from.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import numpy as np

from fipo_jax.config import TrainConfig
from fipo_jax.core import advantages as adv_lib
from fipo_jax.data import PromptIterator, PromptRecord, encode_prompt, encode_text
from fipo_jax.generation import engine as engine_lib
from fipo_jax.generation.sampling import SamplingConfig, left_align_prompts
from fipo_jax.generation.static_sampler import generate
from fipo_jax.parallel import distributed
from fipo_jax.parallel.sharding import batch_sharding, ways
from fipo_jax.rewards import score_batch
from fipo_jax.train import runtime_configs
from fipo_jax.train.shapes import engine_slots
from fipo_jax.train.summary import length_stats


class DynamicSamplingExhausted(RuntimeError):
    """Too few prompt groups with mixed outcomes after the allowed generation rounds."""


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """Sampled responses on the host; rows grouped contiguously, n per prompt."""

    prompt_ids: np.ndarray  # [B, P] left-aligned
    prompt_mask: np.ndarray  # [B, P]
    tokens: np.ndarray  # [B, N]
    response_mask: np.ndarray  # [B, N]
    sampler_log_probs: np.ndarray  # [B, N]
    lengths: np.ndarray  # [B]
    correct: np.ndarray  # [B] bool
    scores: np.ndarray  # [B] shaped score
    answers: list  # [B] extracted answers (None when none)
    versions: np.ndarray  # [B] int: the policy version (updates applied) each response was drawn with
    reward_errors: int = 0
    reward_over_budget: int = 0  # answers scored past reward.score_budget_s without math-verify
    score_seconds: float = 0.0

    @staticmethod
    def concat(parts: list["Rollouts"], pad_token_id: int) -> "Rollouts":
        width = max(p.prompt_ids.shape[1] for p in parts)
        ids, masks = zip(*(left_align_prompts(p.prompt_ids, p.prompt_mask, width, pad_token_id) for p in parts))
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return Rollouts(np.concatenate(ids), np.concatenate(masks), cat("tokens"), cat("response_mask"),
                        cat("sampler_log_probs"), cat("lengths"), cat("correct"), cat("scores"),
                        sum((p.answers for p in parts), []), cat("versions"), sum(p.reward_errors for p in parts),
                        sum(p.reward_over_budget for p in parts), sum(p.score_seconds for p in parts))

    def take(self, rows: np.ndarray) -> "Rollouts":
        pick = lambda x: x[rows]  # noqa: E731
        return Rollouts(pick(self.prompt_ids), pick(self.prompt_mask), pick(self.tokens), pick(self.response_mask),
                        pick(self.sampler_log_probs), pick(self.lengths), pick(self.correct), pick(self.scores),
                        [self.answers[i] for i in rows], pick(self.versions), self.reward_errors,
                        self.reward_over_budget,
                        self.score_seconds)


def majority_vote(answers: list) -> Any:
    """Most common non-empty answer (first seen wins ties); None if there is none."""
    counts = collections.Counter(a for a in answers if a)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a and counts[a] == best)


def rollout_stats(lengths: np.ndarray, scores: np.ndarray, max_response_tokens: int, prefix: str) -> dict[str, float]:
    """Length statistics and mean shaped reward, named ``{prefix}/length_*``, ``{prefix}/reward``."""
    out = {f"{prefix}/length_{k}": v for k, v in length_stats(lengths, max_response_tokens).items()}
    out[f"{prefix}/reward"] = float(scores.mean())
    return out


class RolloutCollector:
    """Samples and scores responses for one run's config, tokenizer and mesh."""

    def __init__(self, config: TrainConfig, tokenizer, mesh):
        self.config = config
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.reward_config = runtime_configs.reward_config(config)
        stops = self._stop_sequences()
        self.sampling = runtime_configs.sampling_config(config, tokenizer, stops)
        self.eval_sampling = runtime_configs.sampling_config(config, tokenizer, stops, evaluation=True)
        self.engine_stats: list[engine_lib.EngineStats] = []  # of the calls since the last `collect`

    def _stop_sequences(self) -> tuple[tuple[int, ...], ...]:
        """Token sequences of the rollout's stop strings: each as written and after a space (BPE
        and SentencePiece vocabularies spell a word differently after a space)."""
        sequences = []
        for text in self.config.rollout.stop:
            for variant in (text, " " + text):
                ids = tuple(encode_text(self.tokenizer, variant))
                if ids and ids not in sequences:
                    sequences.append(ids)
        return tuple(sequences)

    def generate(self, policy, ids: np.ndarray, mask: np.ndarray, key, sampling: SamplingConfig):
        """Responses to the rows of ``ids`` with the configured sampler (the same tokens either way)."""
        rows = batch_sharding(self.mesh)
        ro = self.config.rollout
        if ro.sampler == "static":
            return generate(policy, ids, mask, key, sampling, row_sharding=rows)
        slots = engine_slots(ro.engine_slots, len(ids), ways("batch", self.mesh))
        engine = engine_lib.EngineConfig(num_slots=slots, steps_per_sync=ro.engine_steps_per_sync)
        out, stats = engine_lib.generate_with_stats(policy, ids, mask, key, sampling, engine, row_sharding=rows)
        self.engine_stats.append(stats)
        return out

    def decode(self, tokens: np.ndarray, length: int) -> str:
        return self.tokenizer.decode(tokens[:length], skip_special_tokens=True)

    def sample(self, policy, records: list[PromptRecord], n: int, key, sampling: SamplingConfig,
               version: int = 0) -> Rollouts:
        """n responses per prompt from ``policy`` (rows grouped per prompt, ``version`` recorded), scored."""
        encoded = [encode_prompt(r, self.tokenizer) for r in records]
        width = max(map(len, encoded))
        ids = np.full((len(records) * n, width), sampling.pad_token_id, np.int32)
        mask = np.zeros(ids.shape, bool)
        for i, e in enumerate(encoded):
            ids[i * n : (i + 1) * n, width - len(e) :] = e
            mask[i * n : (i + 1) * n, width - len(e) :] = True
        out = distributed.to_host(self.generate(policy, ids, mask, key, sampling))
        lengths = np.asarray(out.lengths)
        text_lengths = lengths - np.asarray(out.stop_lengths)  # the stop string is not part of the answer
        texts = [self.decode(np.asarray(out.tokens[i]), int(text_lengths[i])) for i in range(len(ids))]
        golds = [r.ground_truth for r in records for _ in range(n)]
        rewards = score_batch(texts, golds, self.reward_config, response_lengths=lengths)
        return Rollouts(np.asarray(out.prompt_ids), np.asarray(out.prompt_mask), np.asarray(out.tokens),
                        np.asarray(out.mask), np.asarray(out.log_probs), lengths, rewards.correct, rewards.scores,
                        [r.extracted for r in rewards.results], np.full(len(ids), version, np.int64),
                        rewards.num_errors + rewards.num_timeouts,
                        rewards.num_over_budget, rewards.seconds)

    def collect(self, policy, iterator: PromptIterator, key, step: int,
                version: int | None = None) -> tuple[Rollouts, dict[str, float]]:
        """DAPO dynamic sampling: rounds of generation until the step's batch is full.

        Round r samples with ``fold_in(key, r)``; ``policy`` is version ``version`` (default
        ``step``: the step's own weights), recorded on each response. Returns exactly ``prompts_per_step × n`` rows:
        the kept groups, truncated, or (``on_exhausted="pad"``) repeated with their response masks
        cleared so that padding rows add nothing to the loss.
        """
        ro, n = self.config.rollout, self.config.rollout.n
        kept, all_rounds, n_kept = [], [], 0
        self.engine_stats = []
        for round_index in range(ro.max_rounds):
            rollouts = self.sample(policy, iterator.next_batch(ro.prompts_per_round), n,
                                   jax.random.fold_in(key, round_index), self.sampling,
                                   step if version is None else version)
            all_rounds.append(rollouts)
            if ro.dynamic_sampling:
                keep_groups = np.asarray(adv_lib.dynamic_sampling_mask(rollouts.correct, n))
            else:
                keep_groups = np.ones(len(rollouts.correct) // n, bool)
            kept.append(rollouts.take(np.flatnonzero(np.repeat(keep_groups, n))))
            n_kept += int(keep_groups.sum())
            if n_kept >= ro.prompts_per_step:
                break
        # Statistics over every sampled response (all rounds), not only the kept groups.
        lengths, scores = (np.concatenate([getattr(r, f) for r in all_rounds]) for f in ("lengths", "scores"))
        stats = {"rollout/rounds": round_index + 1, "rollout/kept_groups": n_kept,
                 "rollout/accuracy": float(np.concatenate([r.correct for r in all_rounds]).mean()),
                 "rollout/reward_errors": sum(r.reward_errors for r in all_rounds),
                 "rollout/reward_over_budget": sum(r.reward_over_budget for r in all_rounds),
                 "time/score_s": sum(r.score_seconds for r in all_rounds)}
        if self.engine_stats:  # busy slot-steps over all computed slot-steps of the step's rounds
            computed = sum(s.computed_slot_steps for s in self.engine_stats)
            stats["rollout/slot_utilisation"] = sum(s.busy_slot_steps for s in self.engine_stats) / max(1, computed)
            stats["time/rollout_prefill_s"] = sum(s.prefill_seconds for s in self.engine_stats)
        batch = Rollouts.concat(kept, self.sampling.pad_token_id)
        need = ro.prompts_per_step * n
        if n_kept < ro.prompts_per_step:
            if ro.on_exhausted == "error" or n_kept == 0:
                raise DynamicSamplingExhausted(_exhausted_message(step, n_kept, stats["rollout/accuracy"], ro))
            stats["rollout/padded_rows"] = need - len(batch.correct)
        batch = batch.take(np.arange(need) % len(batch.correct))  # truncate, or repeat rows to pad
        real = np.arange(need) < min(need, n_kept * n)
        batch = dataclasses.replace(batch, response_mask=batch.response_mask & real[:, None])  # pads: no loss
        stats["batch/accuracy"] = float(batch.correct.mean())
        return batch, {**stats, **rollout_stats(lengths, scores, ro.max_response_tokens, "rollout")}

    def evaluate(self, policy, records: list[PromptRecord], k: int, key) -> dict[str, float]:
        """avg@k (mean accuracy), cons@k (majority vote), pass@k of ``policy`` on ``records``."""
        if not records:
            return {}
        r = self.sample(policy, records, k, key, self.eval_sampling)
        correct = r.correct.reshape(len(records), k)
        answers = [r.answers[i * k : (i + 1) * k] for i in range(len(records))]
        votes = [majority_vote(a) for a in answers]
        cons = [v is not None and any(c and a == v for a, c in zip(ans, row))
                for v, ans, row in zip(votes, answers, correct)]
        out = {"eval/avg@k": float(correct.mean()), "eval/pass@k": float(correct.any(axis=1).mean()),
               "eval/cons@k": float(np.mean(cons)), "eval/k": k}
        out.update(rollout_stats(r.lengths, r.scores, self.config.rollout.max_response_tokens, "eval"))
        return out


def _exhausted_message(step: int, n_kept: int, accuracy: float, ro) -> str:
    """Why dynamic sampling could not fill a step, and what would help given ``on_exhausted``."""
    head = (f"step {step}: only {n_kept} of {ro.prompts_per_step} prompt groups had mixed outcomes after "
            f"{ro.max_rounds} rounds of {ro.prompts_per_round} prompts (rollout accuracy {accuracy:.3f})")
    if n_kept == 0:  # padding repeats kept groups: with none, there is nothing to train on
        return (head + ": every group was all correct or all wrong, so there is no learning signal; the task is "
                "already solved or not yet solvable by this policy. Change the data or the model, or raise "
                "rollout.prompts_per_round / rollout.max_rounds")
    return head + "; raise rollout.max_rounds or rollout.prompts_per_round, or set rollout.on_exhausted='pad'"
