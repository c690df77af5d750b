"""The RL loop: rollouts → rewards → dynamic sampling → old log-probs → advantages →
mini-batch FIPO/DAPO/GRPO updates → metrics → evaluation → checkpoints.

One `Trainer.step` (spec §5, "one training step"):
1. sample ``prompts_per_round`` prompts × n responses from the live parameters, score them
   (+1 / −1 and overlong shaping in tokens), keep the groups whose binary correctness
   varies; repeat until ``prompts_per_step`` groups are kept or ``max_rounds`` is hit;
2. recompute log π_old with the trainer's own jitted forward (no gradient);
3. group advantages from the shaped scores;
4. split into ``mini_batches`` contiguous mini-batches, one optimizer update each.

Randomness is a pure function of (seed, step, round), and the prompt iterator position is
checkpointed, so a resumed run repeats an uninterrupted one exactly (on CPU).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fipo_jax import advantages as adv_lib
from fipo_jax import distributed
from fipo_jax import metrics as metrics_lib
from fipo_jax import rl_step
from fipo_jax.config import ConfigError, TrainConfig
from fipo_jax.data import (ChainTask, CharTokenizer, PromptIterator, PromptRecord, WordProblemTask, load_prompt_records,
                           render_prompt, word_problem_splits)
from fipo_jax.rewards import RewardConfig, score_batch
from fipo_jax.models.hf_io import param_shardings
from fipo_jax.sampling import DEFAULT_PROMPT_BUCKETS, SamplingConfig, generate, left_align_prompts
from fipo_jax.sharding import batch_sharding, make_mesh, replicated, shard_batch


# The update trims all-padding prompt columns to a multiple of this (bounds recompilation).
PROMPT_WIDTH_MULTIPLE = 64


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
    reward_errors: int = 0

    @staticmethod
    def concat(parts: list["Rollouts"], pad_token_id: int) -> "Rollouts":
        width = max(p.prompt_ids.shape[1] for p in parts)
        ids, masks = zip(*(left_align_prompts(p.prompt_ids, p.prompt_mask, width, pad_token_id) for p in parts))
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return Rollouts(np.concatenate(ids), np.concatenate(masks), cat("tokens"), cat("response_mask"),
                        cat("sampler_log_probs"), cat("lengths"), cat("correct"), cat("scores"),
                        sum((p.answers for p in parts), []), sum(p.reward_errors for p in parts))

    def take(self, rows: np.ndarray) -> "Rollouts":
        pick = lambda x: x[rows]  # noqa: E731
        return Rollouts(pick(self.prompt_ids), pick(self.prompt_mask), pick(self.tokens), pick(self.response_mask),
                        pick(self.sampler_log_probs), pick(self.lengths), pick(self.correct), pick(self.scores),
                        [self.answers[i] for i in rows], self.reward_errors)


def majority_vote(answers: list) -> Any:
    """Most common non-empty answer (first seen wins ties); None if there is none."""
    counts = collections.Counter(a for a in answers if a)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a and counts[a] == best)


class Trainer:
    """Owns the policy, optimizer, data and run directory of one RL run.

    Args:
      config: the `TrainConfig`.
      run_dir: where config.json, metrics.jsonl, checkpoints/, plots/ and summary.json go.
        An existing run directory is resumed from its last complete checkpoint.
      progress: show a progress bar (tqdm) on stderr.
      log: where status lines go.

    Multi-host: run one Trainer per process after `fipo_jax.distributed.initialize` (see that
    module for the design); the mesh must then cover every device, the run directory must be on a
    filesystem all hosts share, and only process 0 logs, shows progress and writes files other
    than checkpoints.
    """

    def __init__(self, config: TrainConfig, run_dir: str, progress: bool = True, log: Callable[[str], None] = print):
        self.config = config
        self.run_dir = run_dir
        self.primary = distributed.is_primary()
        self.progress = progress and self.primary
        self.log = log if self.primary else (lambda _: None)
        distributed.check_same_on_all_processes(config.to_dict(), "the run config")
        os.makedirs(run_dir, exist_ok=True)
        self.mesh = make_mesh(config.mesh_shape)
        self.key = jax.random.key(config.seed)
        self.tokenizer, self.model, self.train_records, self.eval_records = self._build()
        distributed.check_same_on_all_processes(
            [[r.prompt, r.ground_truth] for r in self.train_records + self.eval_records], "the prompt data")
        self.graphdef, params, self.rest = nnx.split(self.model, nnx.Param, ...)
        # Parameters live on the mesh from the start, sharded by their logical axes (one rules
        # table, `DEFAULT_RULES`); optimizer moments follow their parameters. The update pins
        # these placements on its outputs, so every step compiles once and never reshards.
        o = config.optim
        self.tx = rl_step.make_optimizer(o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip)
        self.param_shardings = param_shardings(params, self.mesh)
        params = jax.device_put(params, self.param_shardings)
        nnx.update(self.model, params)
        opt_state = self.tx.init(params)
        self.opt_shardings = optax.tree_map_params(self.tx, lambda _, sharding: sharding, opt_state,
                                                   self.param_shardings,
                                                   transform_non_params=lambda _: replicated(self.mesh))
        self.opt_state = jax.device_put(opt_state, self.opt_shardings)
        self.iterator = PromptIterator(self.train_records, seed=config.seed)
        self.step_index = 0
        self.metrics_log = metrics_lib.MetricsLog(os.path.join(run_dir, "metrics.jsonl"), writable=self.primary)
        self.tensorboard = (metrics_lib.TensorBoardLog(os.path.join(run_dir, "tensorboard"))
                            if config.tensorboard and self.primary else None)
        reward = config.reward
        self.reward_config = RewardConfig(max_response_length=config.rollout.max_response_tokens,
                                          overlong_buffer=reward.overlong_buffer if reward.overlong_shaping else None,
                                          overlong_factor=reward.overlong_factor,
                                          verify_timeout_s=reward.verify_timeout_s)
        self.sampling = self._sampling_config(config.rollout.temperature, config.rollout.top_p, config.rollout.top_k)
        self.eval_sampling = self._sampling_config(config.eval.temperature, config.eval.top_p, 0)
        algo = config.algo
        rows_per_mini = config.rollout.prompts_per_step * config.rollout.n // algo.mini_batches
        self.micro_batch_size = min(algo.micro_batch_size, rows_per_mini)
        self._update = rl_step.jit_update(self.tx, algo.loss, self.micro_batch_size, algo.micro_batch_weighting,
                                          config.model.logprob_chunk_size,
                                          out_shardings=(self.param_shardings, self.opt_shardings,
                                                         replicated(self.mesh)))
        self._log_probs = rl_step.jit_log_prob_pass(config.model.logprob_chunk_size, self.micro_batch_size)
        from fipo_jax.checkpoint import RunCheckpointer

        self.checkpointer = RunCheckpointer(os.path.join(run_dir, "checkpoints"), config)

    # ----------------------------------------------------------------------------- set-up

    def _build(self):
        cfg = self.config
        if cfg.model.source == "scratch":
            tokenizer = CharTokenizer()
            model = self._scratch_model(tokenizer)
        else:
            from fipo_jax.models import load_pretrained
            from fipo_jax.models.tokenizer import load_tokenizer

            if cfg.model.source == "gemma3-270m":
                from fipo_jax.models.assets import gemma3_270m_gguf

                path = gemma3_270m_gguf()
            else:
                path = cfg.model.path
            self.log(f"[model] loading {path}")
            model = load_pretrained(path, dtype=cfg.model.dtype, compute_dtype=cfg.model.compute_dtype,
                                    remat=cfg.model.remat, attention_chunk_size=cfg.model.attention_chunk_size,
                                    mesh=self.mesh)
            tokenizer = load_tokenizer(path)
        if cfg.data.task == "chain":
            task = ChainTask(n_terms=cfg.data.n_terms, ops=cfg.data.ops)
            make = lambda seed, n: [PromptRecord(r["prompt"], r["ground_truth"], "chain", str(i))  # noqa: E731
                                    for i, r in enumerate(task.problems(np.random.default_rng(seed), n))]
            train = make([cfg.seed, 1], cfg.data.train_prompts)
            held_out = {r.prompt for r in train}
            evals = [r for r in make([cfg.seed, 2], cfg.data.eval_prompts * 4) if r.prompt not in held_out]
            evals = evals[: cfg.data.eval_prompts]
            if cfg.model.source == "scratch" and cfg.sft.enabled:
                self._warm_start(model, tokenizer, task)
        elif cfg.data.task == "word_problems":
            if isinstance(tokenizer, CharTokenizer):
                raise ConfigError("data.task='word_problems' is English text: it needs a pretrained model and its "
                                  "tokenizer (model.source 'hf' or 'gemma3-270m'), not model.source='scratch'")
            task = WordProblemTask(max_steps=cfg.data.max_steps, few_shot=cfg.data.few_shot)
            train, evals = word_problem_splits(task, cfg.seed, cfg.data.train_prompts, cfg.data.eval_prompts)
            train, evals = self._fit_prompts(train, tokenizer, "train"), self._fit_prompts(evals, tokenizer, "eval")
        else:
            train = self._fit_prompts(load_prompt_records(cfg.data.train_path), tokenizer, "train")
            evals = (self._fit_prompts(load_prompt_records(cfg.data.eval_path, limit=cfg.data.eval_prompts),
                                       tokenizer, "eval") if cfg.data.eval_path else [])
        return tokenizer, model, train, evals

    def _scratch_model(self, tokenizer: CharTokenizer):
        from fipo_jax.models import CausalLM, ModelConfig

        m = self.config.model
        model_config = ModelConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
            rope_theta=m.rope_theta, max_position_embeddings=4096, tie_word_embeddings=True,
            dtype=m.dtype, compute_dtype=m.compute_dtype, remat=m.remat, attention_chunk_size=m.attention_chunk_size)
        return CausalLM(model_config, rngs=nnx.Rngs(self.config.seed))

    def _fit_prompts(self, records, tokenizer, split):
        """Drop prompts longer than data.max_prompt_tokens (as the official data loader does)."""
        kept = [r for r in records if len(self._encode_prompt(r, tokenizer)) <= self.config.data.max_prompt_tokens]
        if len(kept) < len(records):
            self.log(f"[data] {split}: dropped {len(records) - len(kept)} of {len(records)} prompts longer than "
                     f"{self.config.data.max_prompt_tokens} tokens")
        if not kept:
            raise ConfigError(f"no {split} prompt fits data.max_prompt_tokens={self.config.data.max_prompt_tokens}")
        return kept

    def _warm_start(self, model, tokenizer, task: ChainTask):
        from fipo_jax import sft

        spec = self.config.sft
        key = distributed.fingerprint([dataclasses.asdict(self.config.model), self.config.data.n_terms,
                                       self.config.data.ops, dataclasses.asdict(spec), self.config.seed, "v2"])
        path = os.path.join(spec.cache_dir, f"sft-{key}.npz")
        if os.path.exists(path):
            sft.load_params(model, path)
            self.log(f"[sft] loaded cached warm start {path}")
            return
        length = task.prompt_tokens() + task.max_response_tokens()
        self.log(f"[sft] training the warm start: {spec.steps} steps × {spec.batch_size} demonstrations "
                 f"({spec.step_fraction:.0%} step-by-step)")
        bar = self._bar(spec.steps, "sft")
        losses = sft.train_sft(model, lambda rng, n: task.demonstrations(rng, n, spec.step_fraction), tokenizer,
                               steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr, length=length,
                               seed=self.config.seed,
                               progress=(lambda i, n, loss: (bar.update(i - bar.n), bar.set_postfix(loss=f"{loss:.3f}")))
                               if bar else None)
        if bar:
            bar.close()
        sft.save_params(model, path)
        self.log(f"[sft] final loss {losses[-1]:.4f}; cached at {path}")

    def _stop_sequences(self) -> tuple[tuple[int, ...], ...]:
        """Token sequences of the rollout's stop strings: each as written and after a space (BPE
        and SentencePiece vocabularies spell a word differently after a space)."""
        sequences = []
        for text in self.config.rollout.stop:
            for variant in (text, " " + text):
                ids = tuple(self.tokenizer(variant, add_special_tokens=False)["input_ids"])
                if ids and ids not in sequences:
                    sequences.append(ids)
        return tuple(sequences)

    def _sampling_config(self, temperature, top_p, top_k) -> SamplingConfig:
        tok = self.tokenizer
        widest = self.config.data.max_prompt_tokens + 16
        buckets = tuple(b for b in DEFAULT_PROMPT_BUCKETS if b < widest) + (widest,)
        return SamplingConfig(max_new_tokens=self.config.rollout.max_response_tokens, temperature=temperature,
                              top_p=top_p, top_k=top_k, eos_token_ids=(tok.eos_token_id,),
                              stop_sequences=self._stop_sequences() if self.config.rollout.stop else (),
                              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                              prompt_length_buckets=buckets)

    def _bar(self, total, desc):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)

    # ----------------------------------------------------------------------------- rollouts

    def _encode_prompt(self, record: PromptRecord, tokenizer=None) -> list[int]:
        tok = tokenizer or self.tokenizer
        if isinstance(tok, CharTokenizer):
            return [tok.bos_token_id] + tok.encode(record.prompt if isinstance(record.prompt, str)
                                                   else render_prompt(record))
        # A chat template writes its own special tokens (BOS included); plain text gets the
        # tokenizer's (Gemma and Llama start with BOS, Qwen adds nothing).
        templated = bool(getattr(tok, "chat_template", None))
        return tok(render_prompt(record, tok), add_special_tokens=not templated)["input_ids"]

    def _decode(self, tokens: np.ndarray, length: int) -> str:
        return self.tokenizer.decode(tokens[:length], skip_special_tokens=True)

    def sample(self, records: list[PromptRecord], n: int, key, sampling: SamplingConfig) -> Rollouts:
        """n responses per prompt (rows grouped per prompt), scored."""
        encoded = [self._encode_prompt(r) for r in records]
        width = max(map(len, encoded))
        ids = np.full((len(records) * n, width), sampling.pad_token_id, np.int32)
        mask = np.zeros(ids.shape, bool)
        for i, e in enumerate(encoded):
            ids[i * n : (i + 1) * n, width - len(e) :] = e
            mask[i * n : (i + 1) * n, width - len(e) :] = True
        out = distributed.to_host(generate(self.model, ids, mask, key, sampling,
                                           row_sharding=batch_sharding(self.mesh)))
        lengths = np.asarray(out.lengths)
        text_lengths = lengths - np.asarray(out.stop_lengths)  # the stop string is not part of the answer
        texts = [self._decode(np.asarray(out.tokens[i]), int(text_lengths[i])) for i in range(len(ids))]
        golds = [r.ground_truth for r in records for _ in range(n)]
        rewards = score_batch(texts, golds, self.reward_config, response_lengths=lengths)
        return Rollouts(np.asarray(out.prompt_ids), np.asarray(out.prompt_mask), np.asarray(out.tokens),
                        np.asarray(out.mask), np.asarray(out.log_probs), lengths, rewards.correct, rewards.scores,
                        [r.extracted for r in rewards.results], rewards.num_errors + rewards.num_timeouts)

    def collect(self, step: int) -> tuple[Rollouts, dict[str, float]]:
        """DAPO dynamic sampling: rounds of generation until the train batch is full."""
        ro, n = self.config.rollout, self.config.rollout.n
        kept, all_rounds, n_kept = [], [], 0
        for round_index in range(ro.max_rounds):
            key = jax.random.fold_in(jax.random.fold_in(self.key, step), round_index)
            rollouts = self.sample(self.iterator.next_batch(ro.prompts_per_round), n, key, self.sampling)
            all_rounds.append(rollouts)
            if ro.dynamic_sampling:
                keep_groups = np.asarray(adv_lib.dynamic_sampling_mask(rollouts.correct, n))
            else:
                keep_groups = np.ones(len(rollouts.correct) // n, bool)
            rows = np.flatnonzero(np.repeat(keep_groups, n))
            kept.append(rollouts.take(rows))
            n_kept += int(keep_groups.sum())
            if n_kept >= ro.prompts_per_step:
                break
        # Statistics over every sampled response (all rounds), not only the kept groups.
        lengths, scores = (np.concatenate([getattr(r, f) for r in all_rounds]) for f in ("lengths", "scores"))
        stats = {"rollout/rounds": round_index + 1, "rollout/kept_groups": n_kept,
                 "rollout/accuracy": float(np.concatenate([r.correct for r in all_rounds]).mean()),
                 "rollout/reward_errors": sum(r.reward_errors for r in all_rounds)}
        batch = Rollouts.concat(kept, self.sampling.pad_token_id)
        need = ro.prompts_per_step * n
        if n_kept < ro.prompts_per_step:
            if ro.on_exhausted == "error" or n_kept == 0:
                raise DynamicSamplingExhausted(
                    f"step {step}: only {n_kept} of {ro.prompts_per_step} prompt groups had mixed outcomes after "
                    f"{ro.max_rounds} rounds of {ro.prompts_per_round} prompts (raise rollout.max_rounds, or set "
                    f"rollout.on_exhausted='pad')")
            stats["rollout/padded_rows"] = need - len(batch.correct)
        batch = batch.take(np.arange(need) % len(batch.correct))  # truncate, or repeat rows to pad
        real = np.arange(need) < min(need, n_kept * n)
        batch = dataclasses.replace(batch, response_mask=batch.response_mask & real[:, None])  # pads: no loss
        return batch, {**stats, **self._rollout_stats(lengths, scores, "rollout")}

    def _rollout_stats(self, lengths: np.ndarray, scores: np.ndarray, prefix: str) -> dict[str, float]:
        length = metrics_lib.length_stats(lengths, self.config.rollout.max_response_tokens)
        out = {f"{prefix}/length_{k}": v for k, v in length.items()}
        out[f"{prefix}/reward"] = float(scores.mean())
        return out

    # ----------------------------------------------------------------------------- one RL step

    def _batch_arrays(self, batch: Rollouts) -> dict[str, np.ndarray]:
        # Prompts are left-padded to the sampler's bucket; columns that are padding in every row
        # change nothing (positions count real tokens) and are dropped, to a multiple of 64.
        used = int(batch.prompt_mask.sum(axis=1).max())
        width = min(batch.prompt_ids.shape[1], -(-used // PROMPT_WIDTH_MULTIPLE) * PROMPT_WIDTH_MULTIPLE)
        return {
            "input_ids": np.concatenate([batch.prompt_ids[:, -width:], batch.tokens], axis=1).astype(np.int32),
            "attention_mask": np.concatenate([batch.prompt_mask[:, -width:], batch.response_mask], axis=1),
            "response_mask": batch.response_mask,
        }

    def _advantages(self, scores: np.ndarray) -> np.ndarray:
        fn = {"grpo": adv_lib.grpo_advantages, "dr_grpo": adv_lib.dr_grpo_advantages,
              "rloo": adv_lib.rloo_advantages}[self.config.algo.advantage]
        return np.asarray(fn(jnp.asarray(scores), self.config.rollout.n))

    def step(self) -> dict[str, Any]:
        """One RL step; returns its metrics (also appended to metrics.jsonl)."""
        step = self.step_index
        t0 = time.perf_counter()
        batch, metrics = self.collect(step)
        t_rollout = time.perf_counter() - t0

        arrays = self._batch_arrays(batch)
        _, params, _ = nnx.split(self.model, nnx.Param, ...)
        device = shard_batch(arrays, self.mesh)
        response_len = batch.tokens.shape[1]
        old_lp, entropy = self._log_probs(self.graphdef, params, self.rest, device["input_ids"],
                                          device["attention_mask"], response_len)
        old_lp, entropy = distributed.to_host((old_lp, entropy))
        t_logprob = time.perf_counter() - t0 - t_rollout
        mask = batch.response_mask
        tokens = max(int(mask.sum()), 1)
        metrics["actor/entropy"] = float((entropy * mask).sum() / tokens)
        metrics["rollout/sampler_logprob_gap"] = float((np.abs(batch.sampler_log_probs - old_lp) * mask).sum() / tokens)
        arrays["old_log_probs"] = old_lp
        arrays["advantages"] = self._advantages(batch.scores) * mask.any(axis=1)
        metrics["batch/accuracy"] = float(batch.correct.mean())
        metrics["batch/length_weighted_advantage"] = float((arrays["advantages"] * mask.sum(1)).sum() / tokens)

        lr = self.config.optim.lr_at(step)
        per_update = []
        for rows in np.array_split(np.arange(len(batch.correct)), self.config.algo.mini_batches):
            mini = shard_batch({k: v[rows] for k, v in arrays.items()}, self.mesh)
            params, self.opt_state, update_metrics = self._update(self.graphdef, params, self.rest, self.opt_state,
                                                                  mini, lr)
            per_update.append(update_metrics)
        nnx.update(self.model, params)
        per_update = distributed.to_host(per_update)
        metrics.update({f"actor/{k}": float(v) for k, v in rl_step.reduce_metrics(
            {k: np.asarray([m[k] for m in per_update]) for k in per_update[0]}).items()})
        metrics["actor/skipped_updates"] = float(sum(float(m["skipped_update"]) for m in per_update))
        del metrics["actor/skipped_update"]
        t_total = time.perf_counter() - t0
        metrics.update({"time/rollout_s": t_rollout, "time/old_logprob_s": t_logprob,
                        "time/update_s": t_total - t_rollout - t_logprob, "time/step_s": t_total,
                        "time/tokens_per_s": float(mask.sum()) / t_total})
        self.step_index += 1
        metrics["step"] = self.step_index
        return metrics

    # ----------------------------------------------------------------------------- evaluation

    def evaluate(self, records: list[PromptRecord] | None = None, k: int | None = None) -> dict[str, float]:
        """avg@k (mean accuracy), cons@k (majority vote), pass@k on held-out prompts."""
        records = self.eval_records if records is None else records
        k = k or self.config.eval.k
        if not records:
            return {}
        key = jax.random.fold_in(jax.random.fold_in(self.key, 10**6), self.step_index)
        r = self.sample(records, k, key, self.eval_sampling)
        correct = r.correct.reshape(len(records), k)
        answers = [r.answers[i * k : (i + 1) * k] for i in range(len(records))]
        votes = [majority_vote(a) for a in answers]
        cons = [v is not None and any(c and a == v for a, c in zip(ans, row))
                for v, ans, row in zip(votes, answers, correct)]
        out = {"eval/avg@k": float(correct.mean()), "eval/pass@k": float(correct.any(axis=1).mean()),
               "eval/cons@k": float(np.mean(cons)), "eval/k": k}
        out.update(self._rollout_stats(r.lengths, r.scores, "eval"))
        return out

    # ----------------------------------------------------------------------------- the run

    def train(self, total_steps: int | None = None) -> dict[str, Any]:
        """Run (or resume) until `total_steps` RL steps are done; returns the summary."""
        cfg = self.config
        total_steps = cfg.steps if total_steps is None else total_steps
        restored = self.checkpointer.restore_latest(self)
        if restored is not None:
            self.log(f"[resume] restored step {restored} from {self.checkpointer.directory}")
            self.metrics_log.truncate_after(restored)
        else:
            self.metrics_log.truncate_after(-1)
            if self.primary:
                with open(os.path.join(self.run_dir, "config.json"), "w", encoding="utf-8") as f:
                    json.dump(cfg.to_dict(), f, indent=2)
            before = self.evaluate()
            self._log_metrics({"step": 0, **before})
        bar = self._bar(total_steps, f"{cfg.name} [{cfg.algo.loss.loss_mode}]")
        if bar:
            bar.update(self.step_index)
        while self.step_index < total_steps:
            metrics = self.step()
            if (cfg.eval.every and self.step_index % cfg.eval.every == 0) or self.step_index == total_steps:
                metrics.update(self.evaluate())
            self._log_metrics(metrics)
            if self.step_index % cfg.checkpoint_every == 0 or self.step_index == total_steps:
                self.checkpointer.save(self)
            if bar:
                bar.update(1)
                bar.set_postfix({"acc": f"{metrics['rollout/accuracy']:.2f}",
                                 "len": f"{metrics['rollout/length_mean']:.1f}",
                                 "iw": f"{metrics.get('actor/influence_weights_mean', 1.0):.3f}",
                                 **({"eval": f"{metrics['eval/avg@k']:.2f}"} if "eval/avg@k" in metrics else {})})
        if bar:
            bar.close()
        self.checkpointer.wait()
        return self.write_summary()

    def export(self, path: str) -> None:
        """The current policy as a Hugging Face checkpoint folder: safetensors + config.json of its
        family (`save_pretrained`) and the tokenizer, loadable by `transformers.AutoModelForCausalLM`."""
        from fipo_jax.models import save_pretrained

        if isinstance(self.tokenizer, CharTokenizer):
            raise ConfigError("export needs a pretrained model's tokenizer; the scratch model's task vocabulary "
                              "is not a Hugging Face tokenizer")
        tok = self.tokenizer
        save_pretrained(self.model, path, extra_config={k: v for k, v in (
            ("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id),
            ("pad_token_id", tok.pad_token_id)) if v is not None})
        if self.primary:
            tok.save_pretrained(path)
        self.log(f"[export] wrote the policy to {path}")

    def _log_metrics(self, row: dict[str, Any]) -> None:
        self.metrics_log.append(row)
        if self.tensorboard is not None:
            self.tensorboard.append(row)

    def write_summary(self) -> dict[str, Any]:
        """summary.json and plots from metrics.jsonl (process 0; other processes return a stub)."""
        if not self.primary:
            return {"name": self.config.name, "algo": self.config.algo.loss.loss_mode, "steps": self.step_index,
                    "process_index": jax.process_index()}
        rows = self.metrics_log.read()
        evals = [r for r in rows if "eval/avg@k" in r]
        summary = {"name": self.config.name, "algo": self.config.algo.loss.loss_mode, "steps": self.step_index}
        if evals:
            first, last = evals[0], evals[-1]
            summary.update({
                "accuracy_before": first["eval/avg@k"], "accuracy_after": last["eval/avg@k"],
                "mean_length_before": first.get("eval/length_mean"), "mean_length_after": last.get("eval/length_mean"),
                "pass_at_k_before": first["eval/pass@k"], "pass_at_k_after": last["eval/pass@k"],
                "cons_at_k_before": first["eval/cons@k"], "cons_at_k_after": last["eval/cons@k"],
                "eval_k": last["eval/k"], "eval_prompts": len(self.eval_records),
            })
        times = [r["time/step_s"] for r in rows if "time/step_s" in r]
        if times:
            summary["seconds_per_step"] = float(np.mean(times))
        summary["plots"] = metrics_lib.plot_run(rows, os.path.join(self.run_dir, "plots"),
                                                f"{self.config.name} ({self.config.algo.loss.loss_mode})")
        with open(os.path.join(self.run_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(metrics_lib.to_python(summary), f, indent=2)
        return summary
