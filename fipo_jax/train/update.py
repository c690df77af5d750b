"""The RL update as one pure function: ``rl_update(state, batch) → (state, metrics)``.

Everything after the rollout runs on device in one jitted, donated call; the batch crosses to the
device once and only scalar metrics come back:

1. old log-probs log π_old and the entropy of the responses, without gradient, with the same
   numerics as the update, one micro-batch of rows at a time (bounded memory);
2. group advantages from the shaped scores (GRPO / Dr. GRPO / RLOO); rows whose response is
   empty (padding rows) get 0;
3. for each of the M mini-batches (a `lax.scan`): the policy-loss gradient accumulated over its
   K micro-batches as (Σ ∇total, Σ count), which is the exact mini-batch token-mean (paper Eq. 8),
   then global-norm clip and AdamW under an optax warm-up schedule; an update whose gradient or
   resulting parameters are not finite is skipped (parameters and optimizer state kept) and counted;
4. metrics, each reduced once over every micro-batch of the step with its declared reduction
   (`losses.METRIC_REDUCTIONS`, `UPDATE_METRIC_REDUCTIONS`), never inferred from its name; for
   FIPO also per mini-batch (`influence_activity`): how many loss tokens' influence weights moved
   off 1 and the weights' quantiles — the first mini-batch of a step updates from the rollout
   policy itself (Δlog p = 0, every weight 1), later ones from a policy that has moved.

The batch (`packing.RLBatch`, built by `packing.pack_batch`) has leading axes [M, K, R]: M
mini-batches of K micro-batches of R rows (R is the axis split over the mesh's data axis, so every
micro-batch is spread over all data-parallel devices). Each sequence (real prompt tokens, then its
response) is one segment of one row; rows hold one sequence ("padded") or several (first-fit
decreasing, "packed"), told apart by segment ids. Attention, positions, log-probs, Future-KL, the
drop rule and the sequence aggregations work per segment (`losses`), so the layout changes no
result beyond float32 rounding, and every metric is reduced by its declared denominator.

The first mini-batch updates from the rollout policy itself (π_old = π_θ: the state's parameters),
so its π_old is the gradient pass's own log-probs without gradient: Δlog p is exactly 0 there,
not the rounding difference of two compiled programs (which FIPO's weights at their ±1e-7 bounds
and the clip fractions would count), as verl does when an update is on-policy.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import fipo_jax._requires.train  # noqa: F401  one-line ImportError without fipo_jax[train]

# isort: split
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fipo_jax.core import _checks, loss_metrics
from fipo_jax.core.advantages import ADVANTAGE_ESTIMATORS
from fipo_jax.core.behaviour import OLD_LOG_PROBS, OldLogProbs
from fipo_jax.core.losses import (
    METRIC_REDUCTIONS,
    MICRO_BATCH_WEIGHTINGS,
    LossTerms,
    MicroBatchWeighting,
    PolicyLossConfig,
    Reduction,
    policy_loss_parts,
    weight_micro_batch,
)
from fipo_jax.core.packing import RLBatch
from fipo_jax.generation.logprobs import sequence_log_probs_with_entropy
from fipo_jax.parallel.sharding import logical_sharding, param_shardings, replicated

# How the update's own metrics combine over mini-batches ("mean" is weighted by response tokens).
UPDATE_METRIC_REDUCTIONS: dict[str, Reduction] = {
    "loss": "mean",
    "grad_norm": "mean",
    "lr": "mean",
    "skipped_updates": "sum",
}


@flax.struct.dataclass
class RLState:
    """Everything an RL run updates, as one pytree.

    Attributes:
      params: the policy's `nnx.Param` state (``nnx.merge(graphdef, params, rest)`` is the policy).
      opt_state: the optax state of `make_optimizer`.
      step: int32 scalar, RL steps done.
      key: the run's PRNG key; step s samples with keys folded from (key, s).

    The same struct also describes a state: its leaves are then shardings (`state_shardings`),
    `jax.ShapeDtypeStruct`s (`abstract_state`) or host arrays (`place_state`), hence ``Any``.
    """

    params: Any
    opt_state: Any
    step: Any
    key: Any


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """Static settings of `rl_update` (one compilation per distinct value).

    Attributes:
      loss: the policy loss.
      group_size: responses per prompt (contiguous rows).
      advantage: a key of `ADVANTAGE_ESTIMATORS` (declared in `fipo_jax.core.advantages`).
      micro_batch_weighting: one of `losses.MICRO_BATCH_WEIGHTINGS`: "exact" (token-mean over the
        mini-batch) or "official" (see `losses.weight_micro_batch`).
      logprob_chunk_size: vocabulary-projection chunk of the log-prob computation.
      ratio_quantiles: also report the IS-ratio and influence-weight quantiles (sorts of every
        token; metrics only, they change no update).
      old_log_probs: what the loss takes as π_old: "trainer" (π_prox, the trainer's recompute with
        the weights at the start of the update; the sampler's log-probs are then π_behav, for
        ``loss.behaviour_weight_cap``) or "sampler" (the sampler's own log-probs, as verl's bypass
        mode and slime do: Future-KL then also measures staleness and engine mismatch).
    """

    loss: PolicyLossConfig
    group_size: int
    advantage: str = "grpo"
    micro_batch_weighting: MicroBatchWeighting = "exact"
    logprob_chunk_size: int = 1024
    ratio_quantiles: bool = True
    old_log_probs: OldLogProbs = "trainer"

    def __post_init__(self):
        _checks.require(isinstance(self.loss, PolicyLossConfig),
                        f"UpdateConfig.loss must be a PolicyLossConfig, got {type(self.loss).__name__}")
        _checks.check_int("UpdateConfig.group_size", self.group_size, minimum=1)
        _checks.check_choice("UpdateConfig.advantage", self.advantage, ADVANTAGE_ESTIMATORS)
        _checks.check_choice("UpdateConfig.micro_batch_weighting", self.micro_batch_weighting,
                             MICRO_BATCH_WEIGHTINGS)
        _checks.check_int("UpdateConfig.logprob_chunk_size", self.logprob_chunk_size, minimum=1)
        _checks.check_bool("UpdateConfig.ratio_quantiles", self.ratio_quantiles)
        _checks.check_choice("UpdateConfig.old_log_probs", self.old_log_probs, OLD_LOG_PROBS)


# ----------------------------------------------------------------------------- optimizer


def warmup_schedule(peak_lr: float, warmup_steps: int, updates_per_step: int) -> optax.Schedule:
    """η(n) = peak_lr · min(1, ⌊n / U⌋ / W) for the n-th applied optimizer update.

    Warm-up is counted in RL steps of U = ``updates_per_step`` updates (official: every update of
    the first step has LR 0). A skipped (non-finite) update does not advance n, as with
    `optax.apply_if_finite`.
    """
    _checks.check_int("updates_per_step", updates_per_step, minimum=1)

    def schedule(count):
        if not warmup_steps:
            return jnp.asarray(peak_lr, jnp.float32)
        rl_step = (count // updates_per_step).astype(jnp.float32)
        return peak_lr * jnp.minimum(1.0, rl_step / warmup_steps)

    return schedule


class Optimizer(NamedTuple):
    """An optax transformation and the learning-rate schedule inside it (for the ``lr`` metric)."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule


def make_optimizer(schedule: optax.Schedule, b1: float, b2: float, eps: float, weight_decay: float,
                   grad_clip: float) -> Optimizer:
    """Global-norm clip, then AdamW with the learning-rate ``schedule``."""
    tx = optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )
    return Optimizer(tx, schedule)


def _applied_updates(opt_state) -> jax.Array:
    """n of `warmup_schedule`: the count of the optimizer's schedule state."""
    counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
              if isinstance(s, optax.ScaleByScheduleState)]
    return counts[0] if counts else jnp.zeros((), jnp.int32)


def init_state(params, optimizer: Optimizer, key: jax.Array) -> RLState:
    """Step 0 of a run: ``params`` as given, a fresh optimizer state."""
    return RLState(params=params, opt_state=optimizer.tx.init(params), step=jnp.zeros((), jnp.int32), key=key)


# ----------------------------------------------------------------------------- log-probs


def response_log_probs(graphdef, params, rest, input_ids, attention_mask, response_len: int, chunk_size: int):
    """(log π(token | prefix), entropy) of the last ``response_len`` columns of left-padded rows,
    each [R, N] (the sampler's layout; for views of a rollout)."""
    model = nnx.merge(graphdef, params, rest)
    return sequence_log_probs_with_entropy(model, input_ids, attention_mask,
                                           response_start=input_ids.shape[1] - response_len, chunk_size=chunk_size)


def packed_log_probs(graphdef, params, rest, input_ids, segment_ids, chunk_size: int):
    """(log π(token | its segment's prefix), entropy) of every token of a micro-batch's rows, each
    [R, L]; 0 at each segment's first token (nothing precedes it) and on padding (segment id < 0)."""
    model = nnx.merge(graphdef, params, rest)
    lp, ent = sequence_log_probs_with_entropy(model, input_ids, segment_ids >= 0, response_start=1,
                                              chunk_size=chunk_size, segment_ids_BxT=segment_ids)
    first = lambda x: jnp.pad(x, ((0, 0), (1, 0)))  # noqa: E731  column 0 starts a segment: never scored
    return first(lp), first(ent)


def _old_log_probs(graphdef, params, rest, input_ids, segment_ids, chunk_size: int):
    """π_old log-probs and entropy of [M, K, R, L] rows, one micro-batch at a time."""
    params = jax.lax.stop_gradient(params)
    lead = input_ids.shape[:2]
    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731  [M·K, R, L]
    lp, ent = jax.lax.map(lambda ids_seg: packed_log_probs(graphdef, params, rest, ids_seg[0], ids_seg[1], chunk_size),
                          (flat(input_ids), flat(segment_ids)))
    return lp.reshape(lead + lp.shape[1:]), ent.reshape(lead + ent.shape[1:])


# ----------------------------------------------------------------------------- metrics


def reduce_metrics(stacked: dict[str, jax.Array], weights: jax.Array,
                   reductions: Mapping[str, Reduction]) -> dict[str, jax.Array]:
    """One value per key from values stacked over micro- (or mini-) batches.

    "sum" adds; "mean" is the mean weighted by ``weights`` (response tokens), so batches without
    tokens do not pull it toward 0; "loss_mean" the mean weighted by the ``loss_count`` metric (an
    aggregated loss's own denominator: Σ total / Σ count, the same however the sequences were split
    into batches); "min" / "max" take the extreme over batches with weight > 0 (0 when there is
    none). A key without a declared reduction is an error.
    """
    unknown = sorted(set(stacked) - set(reductions))
    if unknown:
        raise KeyError(f"metrics without a declared reduction: {unknown} (declare them in METRIC_REDUCTIONS)")
    has = weights > 0
    out = {}
    for key, values in stacked.items():
        how = reductions[key]
        if how == "sum":
            out[key] = jnp.sum(values)
        elif how == "mean":
            out[key] = jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        elif how == "loss_mean":
            counts = stacked["loss_count"]
            total = jnp.sum(counts)
            out[key] = jnp.where(total > 0, jnp.sum(values * counts) / jnp.where(total > 0, total, 1.0), 0.0)
        elif how == "min":
            out[key] = jnp.where(jnp.any(has), jnp.min(jnp.where(has, values, jnp.inf)), 0.0)
        elif how == "max":
            out[key] = jnp.where(jnp.any(has), jnp.max(jnp.where(has, values, -jnp.inf)), 0.0)
        else:
            raise ValueError(f"metric {key!r}: unknown reduction {how!r}")
    return out


def all_finite(tree) -> jax.Array:
    """True iff every element of every floating-point leaf of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _token_mean(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def drift_metrics(ratio: jax.Array, prox_log_probs: jax.Array, behaviour_log_probs: jax.Array,
                  mask: jax.Array, stale: jax.Array) -> dict[str, jax.Array]:
    """What moves the log-probs a step compares, token means of |Δ log p| over response tokens:

        drift/update     |log π_θ − log π_prox|    (the update's own drift, what FIPO's Future-KL sums)
        drift/staleness  |log π_prox − log π_behav| on samples drawn with older weights (lag ≥ 1)
        drift/engine     |log π_prox − log π_behav| on samples drawn with the update's own weights
                         (lag 0: the sampling engine's numerics against the trainer's)

    ``stale`` marks the tokens of lag ≥ 1; a mean over no tokens is 0. ``rollout/sampler_logprob_gap``
    (over every token) is kept for older dashboards; ``rollout/stale_token_frac`` is the stale share."""
    gap = jnp.abs(behaviour_log_probs - prox_log_probs)
    fresh = mask & ~stale
    return {"drift/update": _token_mean(jnp.abs(jnp.log(jnp.maximum(ratio, 1e-30))), mask),
            "drift/engine": _token_mean(gap, fresh), "drift/staleness": _token_mean(gap, mask & stale),
            "rollout/sampler_logprob_gap": _token_mean(gap, mask),
            "rollout/stale_token_frac": jnp.sum(mask & stale) / jnp.maximum(jnp.sum(mask), 1)}


# ----------------------------------------------------------------------------- the update


def _mini_batch_update(graphdef, rest, optimizer: Optimizer, config: UpdateConfig, loss_config: PolicyLossConfig,
                       sequences_per_mini: int, carry, mini):
    """One optimizer update from one mini-batch [K, R, L]; returns per-micro and per-update metrics."""
    params, opt_state = carry
    # FIPO's per-token weights, for the per-mini-batch quantiles of `influence_activity` only.
    keep_weights = loss_config.loss_mode == "fipo" and config.ratio_quantiles

    def objective(p, mb):
        lp, _ = packed_log_probs(graphdef, p, rest, mb["input_ids"], mb["segment_ids"], config.logprob_chunk_size)
        old = jnp.where(mb["on_policy"], jax.lax.stop_gradient(lp), mb["old_log_probs"])  # see the module docstring
        parts = policy_loss_parts(lp, old, mb["advantages"], mb["response_mask"], loss_config,
                                  segment_ids=mb["segment_ids"], num_sequences=mb["sequences"],
                                  behaviour_log_probs=mb["behaviour_log_probs"],
                                  ratio_quantiles=False)  # taken once over the mini-batches, below
        terms = weight_micro_batch(parts.terms, config.micro_batch_weighting, mb["sequences"], sequences_per_mini)
        weights = parts.tokens.weights if keep_weights else None
        return terms.total, (terms, parts.metrics, parts.tokens.ratio, weights)

    grad_fn = jax.grad(objective, has_aux=True)

    def accumulate(acc, mb):
        grads_acc, count_acc, total_acc = acc
        grads, (terms, metrics, ratio, weights) = grad_fn(params, mb)
        grads_acc = jax.tree.map(lambda acc_g, g: acc_g + g.astype(acc_g.dtype), grads_acc, grads)
        return (grads_acc, count_acc + terms.count, total_acc + terms.total), (metrics, (ratio, weights))

    # Gradients add up in float32 whatever the parameters' dtype (bfloat16 sums of many micro-batches
    # lose digits), then return to that dtype, so the optimizer state keeps its dtypes across updates.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
    on_policy = jnp.broadcast_to(mini["on_policy"], mini["sequences"].shape)  # one flag per micro-batch
    (grads, count, total), (micro_metrics, tokens) = jax.lax.scan(
        accumulate, (zeros, jnp.float32(0), jnp.float32(0)), {**mini, "on_policy": on_policy})
    grads = jax.tree.map(lambda g, p: (g / jnp.maximum(count, 1e-12)).astype(p.dtype), grads, params)
    grad_norm = optax.tree.norm(grads)
    lr = jnp.asarray(optimizer.schedule(_applied_updates(opt_state)), jnp.float32)
    updates, new_opt_state = optimizer.tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    # Skip unless the gradient and the parameters it leads to are finite (a huge step can overflow).
    finite = jnp.isfinite(grad_norm) & all_finite(new_params)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    params = jax.tree.map(keep, new_params, params)
    opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    update_metrics = {"loss": LossTerms(total, count).value, "grad_norm": grad_norm, "lr": lr,
                      "skipped_updates": (~finite).astype(jnp.float32)}
    return (params, opt_state), (micro_metrics, update_metrics, tokens)


def sequence_advantages(scores_S: jax.Array | np.ndarray, config: UpdateConfig) -> jax.Array:
    """Advantages [S] of the step's sequences from their scores: ``config.advantage`` over groups of
    ``config.group_size`` consecutive sequences (the one place the update's advantages are chosen)."""
    return ADVANTAGE_ESTIMATORS[config.advantage](jnp.asarray(scores_S, jnp.float32), config.group_size)


def on_tokens(values_S: jax.Array, segment_ids: jax.Array, padding=0) -> jax.Array:
    """Per-sequence ``values_S`` [S] on each sequence's tokens (shape of ``segment_ids``); padding
    tokens (segment id < 0) get ``padding``."""
    values = jnp.append(values_S, jnp.asarray(padding, values_S.dtype))
    return values[jnp.where(segment_ids >= 0, segment_ids, values_S.shape[0])]


def token_advantages(batch: RLBatch, config: UpdateConfig) -> jax.Array:
    """`sequence_advantages` on each sequence's tokens, [M, K, R, L]; padding gets 0 (only
    response tokens are ever read)."""
    return on_tokens(sequence_advantages(batch.scores, config), batch.segment_ids)


def rl_update(state: RLState, batch: RLBatch, *, graphdef, rest, optimizer: Optimizer,
              config: UpdateConfig) -> tuple[RLState, dict[str, jax.Array]]:
    """One RL update (see the module docstring): pure, jit it with `jit_rl_update`.

    Returns the new state (``step`` + 1) and scalar metrics named as logged: ``actor/*`` (loss
    metrics with official names, ``loss``, ``grad_norm``, ``lr``, ``skipped_updates``,
    ``entropy``), ``influence/*`` (FIPO), ``rollout/sampler_logprob_gap`` and
    ``batch/length_weighted_advantage``; none depends on how the sequences were laid out in rows.
    """
    mask = batch.response_mask
    n_mini = mask.shape[0]
    old_lp, entropy = _old_log_probs(graphdef, state.params, rest, batch.input_ids, batch.segment_ids,
                                     config.logprob_chunk_size)
    advantages = token_advantages(batch, config)
    sampler_old = config.old_log_probs == "sampler"
    minis = {"input_ids": batch.input_ids, "segment_ids": batch.segment_ids, "response_mask": mask,
             "old_log_probs": batch.sampler_log_probs if sampler_old else old_lp,
             "behaviour_log_probs": batch.sampler_log_probs, "advantages": advantages, "sequences": batch.sequences,
             "on_policy": (jnp.arange(n_mini) == 0) & (not sampler_old)}
    # The "-norm" horizon is the sampler's response width, not the row width.
    loss_config = config.loss
    if loss_config.aggregation_horizon is None:
        loss_config = loss_config.replace(aggregation_horizon=batch.response_width)
    (params, opt_state), (micro_metrics, update_metrics, (ratio, weights)) = jax.lax.scan(
        functools.partial(_mini_batch_update, graphdef, rest, optimizer, config, loss_config,
                          batch.scores.shape[0] // n_mini),
        (state.params, state.opt_state), minis)

    micro_tokens = jnp.sum(mask, axis=(-2, -1)).astype(jnp.float32)  # [M, K]
    metrics = reduce_metrics(micro_metrics, micro_tokens, METRIC_REDUCTIONS)
    metrics |= reduce_metrics(update_metrics, micro_tokens.sum(axis=-1), UPDATE_METRIC_REDUCTIONS)
    if config.ratio_quantiles:  # two sorts of every token: once here, outside the gradient
        tokens = lambda x: x.reshape(-1, mask.shape[-1])  # noqa: E731
        metrics |= loss_metrics.ratio_quantiles(tokens(ratio), tokens(advantages), tokens(mask))
    metrics = {f"actor/{k}": v for k, v in metrics.items()}
    if config.loss.loss_mode == "fipo":
        metrics |= influence_activity(micro_metrics, weights if config.ratio_quantiles else None, mask)
    metrics["actor/entropy"] = _token_mean(entropy, mask)
    lags = jnp.zeros(batch.scores.shape, jnp.int32) if batch.lags is None else batch.lags
    metrics |= drift_metrics(ratio, old_lp, batch.sampler_log_probs, mask, on_tokens(lags, batch.segment_ids) > 0)
    metrics["batch/length_weighted_advantage"] = _token_mean(advantages, mask)
    return dataclasses.replace(state, params=params, opt_state=opt_state, step=state.step + 1), metrics


INFLUENCE_QUANTILES = (0.05, 0.5, 0.95)


def influence_activity(micro_metrics: dict[str, jax.Array], weights: jax.Array | None,
                       mask: jax.Array) -> dict[str, jax.Array]:
    """What FIPO's influence weights did this step, per mini-batch i = 1 … M and over the step.

        influence/mb{i}_active_frac = #{loss tokens of mini-batch i with |f − 1| > 0.01} / #loss tokens
        influence/mb{i}_weight_p{5,50,95}: quantiles of f over mini-batch i's response tokens

    and step totals: ``active_frac``, ``filtered_frac`` (tokens the ratio filter keeps out of the
    Future-KL), ``safety_clamp_frac``, and the counts over mini-batches 2 … M
    (``active_tokens_after_first`` / ``loss_tokens_after_first``) a run's summary adds up.
    ``weights`` and ``mask`` are [M, K, R, T]; without weights (None) the quantiles are left out."""
    per_mini = lambda name: micro_metrics[name].sum(axis=1)  # noqa: E731  [M]
    active, loss_tokens, response = (per_mini(k) for k in ("influence_active_tokens", "loss_tokens",
                                                           "response_tokens"))
    frac = lambda a, b: a / jnp.maximum(b, 1.0)  # noqa: E731
    out = {"influence/active_frac": frac(active.sum(), loss_tokens.sum()),
           "influence/filtered_frac": frac(per_mini("filtered_tokens").sum(), response.sum()),
           "influence/safety_clamp_frac": frac(per_mini("safety_clamped_tokens").sum(), response.sum()),
           "influence/active_tokens_after_first": active[1:].sum(),
           "influence/loss_tokens_after_first": loss_tokens[1:].sum()}
    for i in range(active.shape[0]):
        out[f"influence/mb{i + 1}_active_frac"] = frac(active[i], loss_tokens[i])
        if weights is not None:
            values = jnp.where(mask[i] != 0, weights[i], jnp.nan).reshape(-1)
            for q in INFLUENCE_QUANTILES:
                out[f"influence/mb{i + 1}_weight_p{round(q * 100)}"] = jnp.nan_to_num(jnp.nanquantile(values, q),
                                                                                   nan=1.0)
    return out


def jit_rl_update(graphdef, rest, optimizer: Optimizer, config: UpdateConfig, state_shardings: RLState | None = None,
                  metric_sharding=None):
    """`rl_update` jitted once, the state and the batch donated. ``state_shardings`` pins the new state's placement
    (so every step compiles once and never reshards); ``metric_sharding`` the metrics' (replicated,
    so every process reads them locally). ``rest`` (the model's untrained part: a LoRA run's frozen
    base) is an argument of every call, neither donated nor baked into the program as constants."""
    fn = functools.partial(rl_update, graphdef=graphdef, optimizer=optimizer, config=config)
    kwargs: dict[str, Any] = {}
    if state_shardings is not None:
        kwargs["out_shardings"] = (state_shardings, metric_sharding)
    jitted = jax.jit(lambda state, batch, rest: fn(state, batch, rest=rest), donate_argnums=(0, 1), **kwargs)

    def update(state, batch):
        # No output has the batch's shapes, so XLA cannot reuse its buffers (JAX says so each
        # compile); donated, they are released when the update ends, not when the caller lets go.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Some donated buffers were not usable", UserWarning)
            return jitted(state, batch, rest)

    # callers lower the update as they would the jitted function: lower(state, batch) (``rest`` bound); the
    # compiled program it gives takes (state, batch, rest)
    setattr(update, "lower", lambda state, batch: jitted.lower(state, batch, rest))
    return update


# ----------------------------------------------------------------------------- placement


def state_shardings(params, optimizer: Optimizer, mesh) -> RLState:
    """Where each leaf of the state lives: parameters by the rules table (`param_shardings`),
    optimizer moments like their parameters, counters and the key replicated."""
    params_sharding = param_shardings(params, mesh)
    opt_shapes = jax.eval_shape(optimizer.tx.init, params)
    opt_sharding = optax.tree_map_params(optimizer.tx, lambda _, sharding: sharding, opt_shapes, params_sharding,
                                         transform_non_params=lambda _: replicated(mesh))
    return RLState(params=params_sharding, opt_state=opt_sharding, step=replicated(mesh), key=replicated(mesh))


def place_state(state: RLState, shardings: RLState) -> RLState:
    """``jax.device_put(state, shardings)``, also across processes: a typed PRNG key cannot be put on
    devices other processes own, so it travels as its (host) key data and is wrapped on the mesh."""
    raw = dataclasses.replace(state, key=np.asarray(jax.random.key_data(state.key)))
    placed = jax.device_put(raw, shardings)
    return dataclasses.replace(placed, key=jax.random.wrap_key_data(placed.key, impl=jax.random.key_impl(state.key)))


def abstract_state(state: RLState, shardings: RLState) -> RLState:
    """Shape, dtype and placement of every leaf (what a checkpoint restore fills in)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def batch_shardings(batch: RLBatch, mesh) -> RLBatch:
    """Rows (axis 2 of [M, K, R, L]) split as the rules table places logical ``batch``; the
    per-sequence scores [S] and per-micro-batch counts [M, K] are replicated."""
    def place(x):
        axes = ("mini_batch", "micro_batch", "batch") + (None,) * (x.ndim - 3) if x.ndim >= 3 else (None,) * x.ndim
        return logical_sharding(axes, x.shape, mesh, name=f"batch field of shape {x.shape}")
    return jax.tree.map(place, batch)
