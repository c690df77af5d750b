"""The RL loop: collect → update → log → save, over an explicit state.

One `Trainer.step`:
1. collect: sample ``prompts_per_round`` prompts × n responses from the policy of the current
   state, score them (+1 / −1 and overlong shaping in tokens), keep the groups whose binary
   correctness varies; repeat until ``prompts_per_step`` groups are kept or ``max_rounds`` is hit
   (`fipo_jax.train.rollouts`);
2. update: the kept batch crosses to the device once and `fipo_jax.train.update.rl_update` does the
   rest — old log-probs, advantages, ``mini_batches`` optimizer updates, metrics — in one jitted,
   donated call ``(state, batch) → (state, metrics)``;
3. log the metrics; 4. save the state (`fipo_jax.train.checkpoint`) every ``checkpoint_every`` steps.

Collection runs where the rollouts are (the training mesh, or the devices of ``rollout_mesh_shape``,
the weights moved there first) and, with ``rollout.max_staleness`` k ≥ 1, ahead of the update in a
producer thread, each step sampling with the weights of k steps before (`fipo_jax.train.pipeline`).

The state (`RLState`: parameters, optimizer state, step, PRNG key) is the only thing an update
changes; the trainer swaps it in only when the update returns, so an exception anywhere in a step
leaves the previous state intact. Randomness is a pure function of (seed, step, round), and the
prompt iterator position is checkpointed, so a resumed run repeats an uninterrupted one exactly
(on CPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

import fipo_jax._requires.train  # noqa: F401  one-line ImportError without fipo_jax[train]

# isort: split
from flax import nnx

from fipo_jax.config import PLACEMENT_FIELDS, ConfigError, TrainConfig, fipo_inert_reason, sampler_as_old_warning
from fipo_jax.config.parsing import MOVED_FIELDS
from fipo_jax.config.specs import value_at, without_paths
from fipo_jax.core.losses import token_diagnostics
from fipo_jax.core.packing import RLBatch, pack_batch
from fipo_jax.data import ChainTask, CharTokenizer, PromptIterator, PromptRecord
from fipo_jax.models.file_checks import disk_full
from fipo_jax.parallel import distributed
from fipo_jax.parallel.sharding import make_meshes, param_shardings, replicated
from fipo_jax.train import pipeline as pipeline_lib
from fipo_jax.train import run_dir as run_dir_lib
from fipo_jax.train import run_log as run_log_lib
from fipo_jax.train import runtime_configs
from fipo_jax.train import update as update_lib
from fipo_jax.train import views as views_lib
from fipo_jax.train.build import (
    adapt,
    build_model,
    build_prompts,
    build_tokenizer,
    check_attention,
    needs_warm_start,
    warm_start,
)
from fipo_jax.train.checkpoint import Checkpointer, CheckpointMetadataError, MetadataSchema, config_differences
from fipo_jax.train.preflight import preflight
from fipo_jax.train.rollouts import DynamicSamplingExhausted, RolloutCollector, Rollouts, majority_vote
from fipo_jax.train.run_dir import check_export_destination
from fipo_jax.train.shapes import run_shapes, update_prompt_width
from fipo_jax.train.summary import summarize
from fipo_jax.train.views import TokenView

__all__ = ["Trainer", "NonFiniteStateError", "DynamicSamplingExhausted", "Rollouts", "majority_vote"]

# Steps whose batch is more than this share of padding rows are reported.
PADDING_WARN_SHARE = 0.25
# Responses drawn as influence views (HTML + PNG under <run-dir>/views/) at each evaluation.
VIEWS_PER_EVAL = 3
# Eval keys are folded from this offset so they never coincide with a training step's keys.
_EVAL_KEY_OFFSET = 10**6
# What `save` writes and `resume` reads beside the state: a checkpoint without it is damage.
REQUIRED_METADATA: MetadataSchema = {"fingerprint": dict,
                                     "iterator": {"epoch": int, "offset": int, "seed": int, "size": int}}


def placement_changes(metadata: dict, config: TrainConfig) -> list[str]:
    """"field saved → now" for each `PLACEMENT_FIELDS` value a checkpoint was made with that differs
    from ``config``'s (read from its fingerprint when written before placements were saved apart)."""
    saved = metadata.get("placement")
    if saved is None:
        fingerprint = metadata.get("fingerprint", {})
        saved = {path: value for path in PLACEMENT_FIELDS
                 if (value := value_at(fingerprint, path, _MISSING)) is not _MISSING}
    now = json.loads(json.dumps(config.placement()))
    return [f"{path} {saved[path]} → {now[path]}" for path in PLACEMENT_FIELDS
            if path in saved and saved[path] != now[path]]


_MISSING = object()


def split_trained(model, adapted: bool):
    """(graphdef, trained parameters, rest): the adapters alone when the model has them, else every
    parameter. ``rest`` (a LoRA run's frozen base) is an argument of the update: never donated, never
    checkpointed."""
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam if adapted else nnx.Param, ...)  # type: ignore[misc]
    return graphdef, params, rest


class NonFiniteStateError(RuntimeError):
    """The run's parameters hold NaN or ±inf."""


_params_finite = jax.jit(update_lib.all_finite)
_response_log_probs = jax.jit(update_lib.response_log_probs, static_argnums=(0, 5, 6))


class Trainer:
    """Owns the state, data and run directory of one RL run.

    Args:
      config: the `TrainConfig`.
      run_dir: where config.json, metrics.jsonl, checkpoints/, plots/ and summary.json go.
        An existing run directory is resumed from its last complete checkpoint by `train`.
      progress: show a progress bar (tqdm) on stderr.
      log: where status lines go.

    Attributes:
      state: the `RLState`; ``policy`` is the model it describes.
      last_rollouts: the batch the last step trained on (host arrays), or None.

    Multi-host: run one Trainer per process after `fipo_jax.parallel.distributed.initialize` (see that
    module for the design); the mesh must then cover every device, the run directory must be on a
    filesystem all hosts share, and only process 0 logs, shows progress and writes files other
    than checkpoints.
    """

    pipeline: pipeline_lib.RolloutPipeline | None = None  # the producer thread of a k ≥ 1 run, while it trains

    def __init__(self, config: TrainConfig, run_dir: str, progress: bool = True, log: Callable[[str], None] = print):
        self.config = config
        self.run_dir = run_dir
        self.primary = distributed.is_primary()
        self.progress = progress and self.primary
        self.log = log if self.primary else (lambda _: None)
        distributed.check_same_on_all_processes(config.to_dict(), "the run config")
        preflight(config)  # paths, devices, memory: named before any model is built
        for warning in (fipo_inert_reason(config), sampler_as_old_warning(config)):
            if warning:
                self.log(f"[warning] {warning}")
        run_dir_lib.ensure_writable(run_dir)
        if self.primary:
            run_dir_lib.check_free(run_dir)  # a live run's directory is refused before anything is built
        # The training mesh, and the rollout engine's (the same mesh unless rollout_mesh_shape splits the devices).
        self.mesh, self.rollout_mesh = make_meshes(config.mesh_shape, config.rollout_mesh_shape)
        self.tokenizer = build_tokenizer(config)
        self.train_records, self.eval_records = build_prompts(config, self.tokenizer, self.log)  # before the model
        model = build_model(config, self.tokenizer, self.mesh, self.log)
        self.log(f"[model] attention: {check_attention(config)}")
        # The RL start's weights, by digest: two machines compare it (None: no warm start).
        self.warm_start_sha256 = (warm_start(config, model, self.tokenizer, ChainTask.of(config.data), self.log,
                                             self._bar) if needs_warm_start(config) else None)
        prompt_data = [[r.prompt, r.ground_truth] for r in self.train_records + self.eval_records]
        distributed.check_same_on_all_processes(prompt_data, "the prompt data")
        self.data_digest = distributed.fingerprint(prompt_data)  # a resumed run must see the same prompts
        self.rollouts = RolloutCollector(config, self.tokenizer, self.rollout_mesh)
        self._sampler = threading.Lock()  # one sampler on the rollout devices at a time (the producer's, an eval's)
        self.iterator = PromptIterator(self.train_records, seed=config.seed)
        self.prompt_position = self.iterator.state()  # after the last trained step's prompts

        algo, optim = config.algo, config.optim
        # The sizes the planner planned: micro-batch rows, the data split (a packed micro-batch's rows
        # are a multiple of it), prompt widths, the loaded model's config.
        self.shapes = run_shapes(config, model=model.config)
        schedule = update_lib.warmup_schedule(optim.lr, optim.warmup_steps, algo.mini_batches)
        optimizer = update_lib.make_optimizer(schedule, optim.b1, optim.b2, optim.eps, optim.weight_decay,
                                              optim.grad_clip)
        self.lora_base_sha256 = adapt(config, model, self.log)  # None: full fine-tuning
        graphdef, params, rest = split_trained(model, adapted=self.lora_base_sha256 is not None)
        self.graphdef, self.rest = graphdef, jax.device_put(rest, param_shardings(rest, self.mesh))
        # The state lives on the mesh from the start, placed by the one rules table; the update pins
        # these placements on its output, so every step compiles once and never reshards.
        self.state_shardings = update_lib.state_shardings(params, optimizer, self.mesh)
        self.state = update_lib.place_state(update_lib.init_state(params, optimizer, jax.random.key(config.seed)),
                                         self.state_shardings)
        self.update_config = runtime_configs.update_config(config)
        self.update = update_lib.jit_rl_update(self.graphdef, self.rest, optimizer, self.update_config,
                                            self.state_shardings, replicated(self.mesh))
        # Rollout keys fold from the run's key, kept on the host: the update donates the state's copy.
        self._host_key = (np.asarray(jax.random.key_data(self.state.key)), jax.random.key_impl(self.state.key))
        self.weight_sync = pipeline_lib.WeightSync(self.graphdef, self.rest, self.mesh, self.rollout_mesh,
                                                   copy=config.rollout.max_staleness > 0)
        self.run_log = run_log_lib.RunLog(run_dir, writable=self.primary, tensorboard=config.tensorboard)
        self.checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"), config.keep_checkpoints,
                                         required_metadata=REQUIRED_METADATA)
        self._warned_padding = False
        self.last_rollouts: Rollouts | None = None  # the last step's kept batch (for `influence_views`)

    # ----------------------------------------------------------------------------- views

    @property
    def policy(self):
        """The policy of the current state (a fresh `nnx.merge`; the update never writes into it)."""
        return nnx.merge(self.graphdef, self.state.params, self.rest)

    @property
    def step_index(self) -> int:
        """RL steps done."""
        return int(distributed.to_host(self.state.step))

    @property
    def sampling(self):
        return self.rollouts.sampling

    def run_key(self, *folds: int) -> jax.Array:
        """The run's PRNG key with ``folds`` folded in, in turn (step s samples with ``run_key(s)``);
        uncommitted, so it follows the arrays it meets (the rollout mesh's or the training mesh's)."""
        data, impl = self._host_key
        key = jax.random.wrap_key_data(jax.numpy.asarray(data), impl=impl)
        for fold in folds:
            key = jax.random.fold_in(key, fold)
        return key

    def _bar(self, total, desc):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)

    # ----------------------------------------------------------------------------- one RL step

    def step(self) -> dict[str, Any]:
        """One RL step; returns its metrics (`train` also logs them)."""
        t0 = time.perf_counter()
        step = self.step_index
        sync = pipeline_lib.NOTHING_MOVED
        if self.pipeline is not None:
            produced = self.pipeline.get(step)
        else:  # in sequence: the step's own weights, where the rollout engine samples
            policy, sync = self.weight_sync(self.state.params)
            produced = self.produce(step, policy, step)
        t_rollout = time.perf_counter() - t0
        self.last_rollouts = produced.rollouts
        self.state, update_metrics = self.update(self.state, self.place_batch(produced.batch))
        self.prompt_position = produced.prompt_position
        metrics = {**produced.metrics, **sync}
        metrics.update({k: float(v) for k, v in distributed.to_host(update_metrics).items()})
        t_update = time.perf_counter() - t0 - t_rollout
        if self.pipeline is not None and self.pipeline.needs(step + 1):  # the next weights, for a later step
            policy, sync = self.weight_sync(self.state.params)
            self.pipeline.publish(step + 1, policy)
            metrics.update(sync)
        t_total = time.perf_counter() - t0
        tokens = float(produced.rollouts.response_mask.sum())
        metrics.update({"time/rollout_wait_s": t_rollout, "time/update_s": t_update, "time/step_s": t_total,
                        "time/tokens_per_s": tokens / t_total, "step": step + 1})
        return metrics

    def produce(self, step: int, policy, version: int) -> pipeline_lib.Produced:
        """Step ``step``'s rollouts drawn with ``policy`` (weights of ``version``): collected, scored and
        packed into the update's host batch, with their metrics (`pipeline.Produced`)."""
        t0 = time.perf_counter()
        before = self.iterator.state()
        key = self.run_key(step)
        with self._sampler:
            rollouts, metrics = self.rollouts.collect(policy, self.iterator, key, step, version)
        lags = step - rollouts.versions
        if lags.max() > self.config.rollout.max_staleness or lags.min() < 0:  # the schedule's promise
            raise RuntimeError(f"step {step}: samples of lag {lags.min()} … {lags.max()} outside [0, "
                               f"rollout.max_staleness={self.config.rollout.max_staleness}]")
        metrics["time/rollout_s"] = (t1 := time.perf_counter()) - t0
        batch, layout = self.host_batch(rollouts, step)
        metrics["time/pack_s"] = time.perf_counter() - t1
        after = self.iterator.state()
        position = lambda state: state["epoch"] * state["size"] + state["offset"]  # noqa: E731
        metrics.update(layout)
        metrics.update({"rollout/staleness_mean": float(lags.mean()), "rollout/staleness_max": float(lags.max()),
                        "data/prompts_from": float(position(before)), "data/prompts_to": float(position(after))})
        return pipeline_lib.Produced(step, version, rollouts, batch, metrics, after)

    def host_batch(self, rollouts: Rollouts, step: int | None = None) -> tuple[RLBatch, dict[str, float]]:
        """The update's batch on the host, [M, K, R, L] (`packing.pack_batch`): packed unless
        ``algo.packing`` is off (one sequence per row), with ``batch/padding_frac`` (the share of
        its tokens that are padding; ``batch/padding_frac_unpacked``: the same for one per row);
        each sequence's lag is ``step`` (default: the current step) minus its sampling version.

        Prompts are left-padded to the sampler's bucket; columns that are padding in every row
        change nothing (positions count real tokens) and are dropped (`shapes.update_prompt_width`)."""
        width = update_prompt_width(int(rollouts.prompt_mask.sum(axis=1).max()), rollouts.prompt_ids.shape[1])
        sequences = {"prompt_ids": rollouts.prompt_ids[:, -width:], "prompt_mask": rollouts.prompt_mask[:, -width:],
                     "tokens": rollouts.tokens, "response_mask": rollouts.response_mask,
                     "scores": rollouts.scores.astype(np.float32),
                     "sampler_log_probs": rollouts.sampler_log_probs.astype(np.float32)}
        algo = self.config.algo
        step = self.step_index if step is None else step
        batch, stats = pack_batch(sequences, algo.mini_batches, self.shapes.micro_batch_rows,
                                  row_multiple=self.shapes.data_split, layout="packed" if algo.packing else "padded",
                                  lags=step - rollouts.versions)
        return batch, {"batch/padding_frac": stats["padding_frac"],
                       "batch/padding_frac_unpacked": stats["padding_frac_unpacked"]}

    def place_batch(self, batch: RLBatch) -> RLBatch:
        """A host batch placed on the training mesh in one transfer, rows split over the data axis."""
        return jax.device_put(batch, update_lib.batch_shardings(batch, self.mesh))

    def device_batch(self, rollouts: Rollouts) -> tuple[RLBatch, dict[str, float]]:
        """`host_batch` placed on the mesh (`place_batch`)."""
        batch, layout = self.host_batch(rollouts)
        return self.place_batch(batch), layout

    # ----------------------------------------------------------------------------- evaluation

    def evaluate(self, records: list[PromptRecord] | None = None, k: int | None = None) -> dict[str, float]:
        """avg@k (mean accuracy), cons@k (majority vote), pass@k of the current weights on held-out
        prompts, sampled where the rollouts are (the weights moved there; a producer drawing ahead waits)."""
        records = self.eval_records if records is None else records
        key = self.run_key(_EVAL_KEY_OFFSET, self.step_index)
        policy, _ = self.weight_sync(self.state.params)
        with self._sampler:
            return self.rollouts.evaluate(policy, records, k or self.config.eval.k, key)

    # ----------------------------------------------------------------------------- checkpoints

    def save(self) -> None:
        """Checkpoint the state with the data position and the config fingerprint; a state whose
        parameters are not finite is refused (`NonFiniteStateError`), never written."""
        if not bool(distributed.to_host(_params_finite(self.state.params))):
            raise NonFiniteStateError(
                f"step {self.step_index}: the policy's parameters are not finite; not checkpointing them (the last "
                f"good checkpoint stays in {self.checkpointer.directory})")
        metadata = {"step": self.step_index, "iterator": self.prompt_position, "seed": self.config.seed,
                    "fingerprint": json.loads(json.dumps(self.config.fingerprint())), "data_digest": self.data_digest,
                    "placement": json.loads(json.dumps(self.config.placement())),
                    "lora_base_sha256": self.lora_base_sha256}
        try:
            self.checkpointer.save(self.step_index, self.state, metadata)
        except Exception as err:
            if not disk_full(err):
                raise
            newest = self.checkpointer.latest_step()
            raise run_dir_lib.RunDirectoryError(
                f"checkpoint {self.step_index} could not be written to {self.checkpointer.directory}: the disk is "
                f"full; the newest complete checkpoint is still step {newest}: free space, then re-run the same "
                f"command to resume from it") from None

    def resume(self) -> int | None:
        """Load the newest checkpoint that restores; its step, or None if there is none.

        A checkpoint made with settings that matter differently, or with different prompt data,
        is refused, listing every difference. A damaged one (unreadable, non-finite) is moved
        aside with a note, and the next older one is tried."""
        abstract = update_lib.abstract_state(self.state, self.state_shardings)
        restored = self.checkpointer.restore_newest(abstract, self._check_resumable)
        for step, reason, moved in restored.skipped:
            self.log(f"[resume] checkpoint {step} cannot be restored ({reason}); moved it to {moved} and fell back "
                     f"to an older one")
        if restored.step is None:
            return None
        self.state = restored.state
        self.iterator.restore(restored.metadata["iterator"])
        self.prompt_position = self.iterator.state()
        if changes := placement_changes(restored.metadata, self.config):
            self.log(f"[resume] step {restored.step} continues with another placement (same math): "
                     + "; ".join(changes))
        return restored.step

    def _check_resumable(self, step: int, saved: dict) -> None:
        """Refuse a checkpoint whose config fingerprint or prompt data differ from this run's."""
        # A field that moved out of the fingerprint (`MOVED_FIELDS`; `PLACEMENT_FIELDS`, which earlier
        # versions kept there) is no difference.
        fingerprint = without_paths(saved["fingerprint"], (*MOVED_FIELDS, *PLACEMENT_FIELDS))
        as_saved = lambda config: json.loads(json.dumps(config.fingerprint()))  # noqa: E731
        differences = config_differences(fingerprint, as_saved(self.config), defaults=as_saved(TrainConfig()))
        if differences:
            raise ConfigError(f"the run directory's checkpoint (step {step}) was made with different settings; use "
                              f"a new --run-dir or the original config. Differences:\n  " + "\n  ".join(differences))
        if saved.get("data_digest", self.data_digest) != self.data_digest:
            data = self.config.data
            source = (f"the files data.train_path={data.train_path!r}, data.eval_path={data.eval_path!r}"
                      if data.task == "file" else f"the data.task={data.task!r} generator")
            raise ConfigError(f"the run directory's checkpoint (step {step}) was made with different prompt data "
                              f"(digest {saved['data_digest']} vs now {self.data_digest}): {source} changed since. "
                              f"Restore the original prompts, or use a new --run-dir")
        if (saved_base := saved.get("lora_base_sha256")) != self.lora_base_sha256:
            raise ConfigError(f"the run directory's checkpoint (step {step}) holds adapters of another base (sha256 "
                              f"{str(saved_base)[:16]}…, this run's {str(self.lora_base_sha256)[:16]}…): load the "
                              "model it was trained on, or use a new --run-dir")
        try:  # same config and data: a data position outside the data can only be damage
            PromptIterator(self.train_records, seed=self.config.seed).restore(saved["iterator"])
        except ValueError as err:
            raise CheckpointMetadataError(str(err)) from None

    # ----------------------------------------------------------------------------- the run

    def train(self, total_steps: int | None = None) -> dict[str, Any]:
        """Run (or resume) until `total_steps` RL steps are done; returns the summary.

        Holds the run directory's lock throughout (a second trainer on it is refused)."""
        with run_dir_lib.lock(self.run_dir) if self.primary else contextlib.nullcontext():
            try:
                return self._train(self.config.steps if total_steps is None else total_steps)
            finally:
                self.stop_pipeline()
                self.run_log.close()

    def _train(self, total_steps: int) -> dict[str, Any]:
        cfg = self.config
        restored = self.resume()
        if restored is not None:
            self.log(f"[resume] restored step {restored} from {self.checkpointer.directory}")
            for note in self.run_log.truncate_after(restored):
                self.log(f"[resume] {note}")
        else:
            if self.primary and (moved := run_dir_lib.set_aside(self.run_dir)):
                self.log(f"[run] {self.run_dir} holds an earlier run's files but no checkpoint to resume: moved "
                         f"them to {moved}; starting from step 0")
            if self.primary:
                with open(os.path.join(self.run_dir, "config.json"), "w", encoding="utf-8") as f:
                    json.dump(cfg.to_dict(), f, indent=2)
            self.run_log.append({"step": 0, **self.evaluate()})
        if self.step_index >= total_steps:
            self.log(f"[resume] the run already has {self.step_index} steps, at least the {total_steps} asked for: "
                     f"nothing to train; the summary is of those {self.step_index} steps (a larger --steps continues)")
        self.start_pipeline(total_steps)
        bar = self._bar(total_steps, f"{cfg.name} [{cfg.algo.loss.loss_mode}]")
        if bar:
            bar.update(self.step_index)
        while (step := self.step_index) < total_steps:
            metrics = self.step()
            self._warn_if_mostly_padding(metrics)
            self._warn_if_scoring_is_slow(metrics)
            self._warn_if_updates_skipped(metrics)
            step += 1
            if (cfg.eval.every and step % cfg.eval.every == 0) or step == total_steps:
                metrics.update(self.evaluate())
                if self.primary and cfg.algo.loss.loss_mode == "fipo":
                    self.write_views(os.path.join(self.run_dir, "views", f"step{step:04d}"))
            self.run_log.append(metrics)
            if step % cfg.checkpoint_every == 0 or step == total_steps:
                self.save()
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

    def start_pipeline(self, total_steps: int) -> None:
        """With ``rollout.max_staleness`` ≥ 1, start drawing rollouts ahead of the updates (from the
        current step to ``total_steps``; `pipeline.RolloutPipeline`)."""
        k, step = self.config.rollout.max_staleness, self.step_index
        if k and self.pipeline is None and step < total_steps:
            policy, _ = self.weight_sync(self.state.params)
            self.pipeline = pipeline_lib.RolloutPipeline(self.produce, step, total_steps, k, policy)

    def stop_pipeline(self) -> None:
        """Stop the producer thread; rollouts drawn for steps not yet trained are dropped (a resumed or
        continued run draws them again from the same prompts)."""
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None
            self.iterator.restore(self.prompt_position)

    def _warn_if_scoring_is_slow(self, metrics: dict[str, Any]) -> None:
        """A step whose scoring took more than half its budget, or ran past it, says so."""
        budget, seconds = self.config.reward.score_budget_s, metrics.get("time/score_s", 0.0)
        unasked = metrics.get("rollout/reward_over_budget", 0)
        if unasked or seconds > budget / 2:
            self.log(f"[warning] step {self.step_index}: scoring the responses took {seconds:.0f} s (reward."
                     f"score_budget_s={budget:.0f} per batch)" + (f"; {unasked} answers past the budget were "
                                                                f"compared without math-verify" if unasked else ""))

    def _warn_if_updates_skipped(self, metrics: dict[str, Any]) -> None:
        """Every step whose updates were skipped (a non-finite gradient or parameters) says so: such a
        step trains nothing, and a run of them would otherwise end with exit 0 and unchanged weights."""
        skipped = int(metrics.get("actor/skipped_updates", 0))
        if skipped:
            self.log(f"[warning] step {metrics['step']}: {skipped} of {self.config.algo.mini_batches} updates skipped "
                     f"(non-finite gradients or parameters; the weights keep their last finite values); check the "
                     f"rewards (rollout/reward = {metrics.get('rollout/reward', float('nan')):.4g}), the "
                     f"learning rate and the loss settings (summary.json counts them: updates_skipped)")

    def _mostly_padding(self, metrics: dict[str, Any]) -> bool:
        """Whether a step's batch (its metrics row) is more than `PADDING_WARN_SHARE` padding rows."""
        return metrics.get("rollout/padded_rows", 0) / self.shapes.step_rows > PADDING_WARN_SHARE

    def _warn_if_mostly_padding(self, metrics: dict[str, Any]) -> None:
        """Once per run: a step whose batch is more than `PADDING_WARN_SHARE` padding rows trains on
        far fewer responses than configured (dynamic sampling found too few mixed groups)."""
        rows = self.shapes.step_rows
        if self._mostly_padding(metrics) and not self._warned_padding:
            self._warned_padding = True
            self.log(f"[warning] step {metrics['step']}: {metrics['rollout/padded_rows']} of {rows} rows are padding "
                     f"(only {metrics['rollout/kept_groups']} of {self.config.rollout.prompts_per_step} prompt groups "
                     f"had mixed outcomes); the update trains on {rows - metrics['rollout/padded_rows']} responses. "
                     f"Raise rollout.prompts_per_round or rollout.max_rounds (summary.json counts such steps)")

    def token_diagnostics(self, rollouts: Rollouts, rows, loss_config=None):
        """`fipo_jax.core.losses.token_diagnostics` of ``rows`` of ``rollouts``: the current policy's
        log-probs against the rollout policy's (the sampler's), advantages as the update computes them
        from the batch's groups; ``loss_config`` defaults to the run's (pass another τ to compare)."""
        cfg = self.config
        advantages = self._advantages(rollouts)
        rows = np.asarray(rows)
        ids = np.concatenate([rollouts.prompt_ids[rows], rollouts.tokens[rows]], axis=1).astype(np.int32)
        attention = np.concatenate([rollouts.prompt_mask[rows], rollouts.response_mask[rows]], axis=1)
        log_probs, _ = _response_log_probs(self.graphdef, self.state.params, self.rest, ids, attention,
                                           rollouts.tokens.shape[1], cfg.model.logprob_chunk_size)
        return token_diagnostics(log_probs, rollouts.sampler_log_probs[rows].astype(np.float32), advantages[rows],
                                 rollouts.response_mask[rows], loss_config or cfg.algo.loss)

    def influence_views(self, rollouts: Rollouts | None = None, count: int = VIEWS_PER_EVAL) -> list[TokenView]:
        """Token views (`fipo_jax.train.views`) of ``count`` responses of ``rollouts`` (default: the last
        step's), the highest- and lowest-advantage ones, with `token_diagnostics` — the weights a
        next mini-batch would apply."""
        rollouts = self.last_rollouts if rollouts is None else rollouts
        assert rollouts is not None, "no step has run yet: pass the rollouts"
        advantages = self._advantages(rollouts)
        real = np.flatnonzero(rollouts.response_mask.any(axis=1))
        by_advantage = real[np.argsort(-advantages[real], kind="stable")]
        rows = list(dict.fromkeys([*by_advantage[: (count + 1) // 2], *by_advantage[::-1][: count // 2]]))[:count]
        diag = self.token_diagnostics(rollouts, rows)
        return [TokenView.from_diagnostics(
            diag, i, [self.tokenizer.decode([int(t)]) for t in rollouts.tokens[row][: rollouts.lengths[row]]],
            title=f"step {self.step_index}, response {row} (correct: {bool(rollouts.correct[row])})")
            for i, row in enumerate(rows)]

    def _advantages(self, rollouts: Rollouts) -> np.ndarray:
        """The batch's advantages as the update computes them (`update_lib.sequence_advantages`)."""
        return np.asarray(update_lib.sequence_advantages(rollouts.scores, self.update_config))

    def write_views(self, prefix: str) -> list[str]:
        """`influence_views` of the last step as ``<prefix>.html`` and one PNG per response."""
        views = self.influence_views()
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        with open(prefix + ".html", "w", encoding="utf-8") as f:
            title = f"{self.config.name}: influence weights after step {self.step_index}"
            f.write(views_lib.influence_html(views, title))
        return [prefix + ".html"] + [views_lib.influence_png(v, f"{prefix}_{i}.png") for i, v in enumerate(views)]

    def export(self, path: str) -> None:
        """The current policy as a Hugging Face checkpoint folder: safetensors + config.json of its
        family (`save_pretrained`) and the tokenizer, loadable by `transformers.AutoModelForCausalLM`."""
        from fipo_jax.models import save_pretrained
        from fipo_jax.models.lora import merge_lora

        if isinstance(self.tokenizer, CharTokenizer):
            raise ConfigError("export needs a pretrained model's tokenizer; the scratch model's task vocabulary "
                              "is not a Hugging Face tokenizer")
        tok = self.tokenizer
        check_export_destination(path, self.run_dir)
        policy = merge_lora(self.policy) if self.lora_base_sha256 else self.policy  # adapters merged into W
        save_pretrained(policy, path, tokenizer=tok, log=self.log, extra_config={k: v for k, v in (
            ("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id),
            ("pad_token_id", tok.pad_token_id)) if v is not None})
        self.log(f"[export] wrote the policy to {path}" + (" (adapters merged)" if self.lora_base_sha256 else ""))

    def export_adapters(self, path: str) -> None:
        """The trained adapters alone, in PEFT's format (`save_peft_adapters`): ``peft.PeftModel.from_pretrained``
        loads them onto the HF base, `load_peft_adapters` onto ours."""
        from fipo_jax.models.peft_io import save_peft_adapters

        if not self.lora_base_sha256:
            raise ConfigError("export_adapters needs a run with adapters (model.lora.rank ≥ 1)")
        check_export_destination(path, self.run_dir)
        save_peft_adapters(self.policy, path, base_model_name_or_path=self.config.model.path or None)
        self.log(f"[export] wrote the adapters (PEFT) to {path}")

    def write_summary(self) -> dict[str, Any]:
        """summary.json and plots from metrics.jsonl (process 0; other processes return a stub)."""
        name, algo, steps = self.config.name, self.config.algo.loss.loss_mode, self.step_index
        if not self.primary:
            return {"name": name, "algo": algo, "steps": steps, "process_index": jax.process_index()}
        rows = self.run_log.read()
        summary = summarize(rows, name, algo, steps, len(self.eval_records),
                                        os.path.join(self.run_dir, "plots"))
        summary["steps_mostly_padding"] = sum(map(self._mostly_padding, rows))
        summary["updates_skipped"] = int(sum(r.get("actor/skipped_updates", 0) for r in rows))
        summary["steps_with_skipped_updates"] = sum(r.get("actor/skipped_updates", 0) > 0 for r in rows)
        summary["warm_start_sha256"] = self.warm_start_sha256
        with open(os.path.join(self.run_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(run_log_lib.to_python(summary), f, indent=2)
        return summary
