"""The RL update as one pure function: ``rl_update(state, batch) → (state, metrics)``.

Everything after the rollout runs on device in one jitted, donated call (design.md, "One RL
step"); the batch crosses to the device once and only scalar metrics come back:

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

Batch layouts — both with leading axes [M, K, R], M mini-batches of K micro-batches of R rows
(R is the axis split over the mesh's data axis, so every micro-batch is spread over all
data-parallel devices); a mini-batch holds the same sequences in either:

* padded (`RLBatch`, `layout_batch`): one sequence per row, ``input_ids`` the left-padded prompt
  followed by the response, [M, K, R, P + N]. Row order is the rollout's: groups of
  ``group_size`` responses to one prompt are contiguous.
* packed (`PackedRLBatch`, `pack_batch`): each mini-batch's sequences (real prompt tokens, then
  the response) packed into rows of P + N tokens by first-fit decreasing, told apart by segment
  ids (the sequence's index in the step); K and R shrink to what the packed rows need, so the
  forward and backward skip the padding of short responses. Attention, positions, log-probs,
  Future-KL, the drop rule and sequence aggregations work per segment (`losses`), so the update
  equals the padded one to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fipo_jax import _checks
from fipo_jax import advantages as adv_lib
from fipo_jax import loss_metrics
from fipo_jax.diagnostics import token_diagnostics
from fipo_jax import packing as packing_lib
from fipo_jax.logprobs import sequence_log_probs_with_entropy
from fipo_jax.losses import (METRIC_REDUCTIONS, LossTerms, PolicyLossConfig, importance_ratio, policy_loss_terms,
                             weight_micro_batch)
from fipo_jax.sharding import logical_sharding, param_shardings, replicated

Reduction = Literal["sum", "mean", "loss_mean", "min", "max"]

ADVANTAGE_ESTIMATORS: dict[str, Callable[[jax.Array, int], jax.Array]] = {
    "grpo": adv_lib.grpo_advantages,
    "dr_grpo": adv_lib.dr_grpo_advantages,
    "rloo": adv_lib.rloo_advantages,
}

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
    """

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


@flax.struct.dataclass
class RLBatch:
    """One step's kept rollouts, [M, K, R, ...] (see the module docstring)."""

    input_ids: Any  # [M, K, R, P+N] int32
    attention_mask: Any  # [M, K, R, P+N] bool
    response_mask: Any  # [M, K, R, N] bool, False on padding rows
    scores: Any  # [M, K, R] float32 shaped scores
    sampler_log_probs: Any  # [M, K, R, N] float32, log-probs the sampler drew the tokens with


@flax.struct.dataclass
class PackedRLBatch:
    """One step's kept rollouts packed into rows, [M, K, R, L] per token (see the module docstring).

    Sequence s (rollout order) holds its real prompt tokens then its response tokens in one
    segment of one row; responses without tokens are not packed but still counted."""

    input_ids: Any  # [M, K, R, L] int32
    segment_ids: Any  # [M, K, R, L] int32: s on sequence s's tokens, -1 on padding
    response_mask: Any  # [M, K, R, L] bool: response tokens
    sampler_log_probs: Any  # [M, K, R, L] float32 on response tokens, 0 elsewhere
    scores: Any  # [S] float32 shaped scores, rollout order (groups of group_size contiguous)
    sequences: Any  # [M, K] float32: sequences each micro-batch holds, responses without tokens included
    response_width: int = flax.struct.field(pytree_node=False)  # N of the padded layout (the "-norm" horizon)


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """Static settings of `rl_update` (one compilation per distinct value).

    Attributes:
      loss: the policy loss.
      group_size: responses per prompt (contiguous rows).
      advantage: a key of `ADVANTAGE_ESTIMATORS`.
      micro_batch_weighting: "exact" (token-mean over the mini-batch) or "official" (see
        `losses.weight_micro_batch`).
      logprob_chunk_size: vocabulary-projection chunk of the log-prob computation.
    """

    loss: PolicyLossConfig
    group_size: int
    advantage: str = "grpo"
    micro_batch_weighting: Literal["exact", "official"] = "exact"
    logprob_chunk_size: int = 1024

    def __post_init__(self):
        _checks.require(isinstance(self.loss, PolicyLossConfig),
                        f"UpdateConfig.loss must be a PolicyLossConfig, got {type(self.loss).__name__}")
        _checks.check_int("UpdateConfig.group_size", self.group_size, minimum=1)
        _checks.check_choice("UpdateConfig.advantage", self.advantage, ADVANTAGE_ESTIMATORS)
        _checks.check_choice("UpdateConfig.micro_batch_weighting", self.micro_batch_weighting, ("exact", "official"))
        _checks.check_int("UpdateConfig.logprob_chunk_size", self.logprob_chunk_size, minimum=1)


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
    """(log π(token | prefix), entropy) of the last ``response_len`` columns, each [R, N]."""
    model = nnx.merge(graphdef, params, rest)
    return sequence_log_probs_with_entropy(model, input_ids, attention_mask,
                                           response_start=input_ids.shape[1] - response_len, chunk_size=chunk_size)


def packed_log_probs(graphdef, params, rest, input_ids, segment_ids, chunk_size: int):
    """(log π(token | its segment's prefix), entropy) of every token of packed rows, each [R, L];
    0 at each segment's first token (nothing precedes it) and on padding (segment id < 0)."""
    model = nnx.merge(graphdef, params, rest)
    lp, ent = sequence_log_probs_with_entropy(model, input_ids, segment_ids >= 0, response_start=1,
                                              chunk_size=chunk_size, segment_ids_BxT=segment_ids)
    first = lambda x: jnp.pad(x, ((0, 0), (1, 0)))  # noqa: E731  column 0 starts a segment: never scored
    return first(lp), first(ent)


def _micro_log_probs(graphdef, params, rest, micro: dict, response_len: int, chunk_size: int):
    """(log-probs, entropy) of one micro-batch on its loss layout: [R, N] padded, [R, L] packed."""
    if "segment_ids" in micro:
        return packed_log_probs(graphdef, params, rest, micro["input_ids"], micro["segment_ids"], chunk_size)
    return response_log_probs(graphdef, params, rest, micro["input_ids"], micro["attention_mask"], response_len,
                              chunk_size)


def _old_log_probs(graphdef, params, rest, model_inputs: dict, response_len: int, chunk_size: int):
    """π_old log-probs and entropy on the loss layout, [M, K, R, ·], one micro-batch at a time."""
    params = jax.lax.stop_gradient(params)
    lead = model_inputs["input_ids"].shape[:2]
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in model_inputs.items()}  # [M·K, R, ...]
    lp, ent = jax.lax.map(lambda mb: _micro_log_probs(graphdef, params, rest, mb, response_len, chunk_size), flat)
    return lp.reshape(lead + lp.shape[1:]), ent.reshape(lead + ent.shape[1:])


# ----------------------------------------------------------------------------- metrics


def reduce_metrics(stacked: dict[str, jax.Array], weights: jax.Array,
                   reductions: dict[str, Reduction]) -> dict[str, jax.Array]:
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


# ----------------------------------------------------------------------------- the update


def _mini_batch_update(graphdef, rest, optimizer: Optimizer, config: UpdateConfig, loss_config: PolicyLossConfig,
                       response_len: int, sequences_per_mini: int, carry, mini):
    """One optimizer update from one mini-batch [K, R, ...]; returns per-micro and per-update metrics."""
    params, opt_state = carry
    packed = "segment_ids" in mini
    rows = mini["response_mask"].shape[1]

    # FIPO's per-token weights, only for the per-mini-batch quantiles of `influence_activity`: the
    # loss's own ops on the same inputs, which XLA merges with the loss's (one Future-KL scan).
    keep_weights = loss_config.loss_mode == "fipo" and config.loss.ratio_quantiles

    def objective(p, mb):
        lp, _ = _micro_log_probs(graphdef, p, rest, mb, response_len, config.logprob_chunk_size)
        segments = mb.get("segment_ids")
        loss_inputs = (lp, mb["old_log_probs"], mb["advantages"], mb["response_mask"])
        terms, metrics = policy_loss_terms(*loss_inputs, loss_config, segment_ids=segments,
                                           num_sequences=mb["sequences"] if packed else None)
        terms = weight_micro_batch(terms, config.micro_batch_weighting, mb["sequences"] if packed else rows,
                                   sequences_per_mini)
        ratio = importance_ratio(lp, mb["old_log_probs"], mb["response_mask"], loss_config.log_ratio_clamp)
        weights = token_diagnostics(*loss_inputs, loss_config, segments).weights if keep_weights else None
        return terms.total, (terms, metrics, jax.lax.stop_gradient(ratio), weights)

    grad_fn = jax.grad(objective, has_aux=True)

    def accumulate(acc, mb):
        grads_acc, count_acc, total_acc = acc
        grads, (terms, metrics, ratio, weights) = grad_fn(params, mb)
        grads_acc = jax.tree.map(lambda acc_g, g: acc_g + g.astype(acc_g.dtype), grads_acc, grads)
        return (grads_acc, count_acc + terms.count, total_acc + terms.total), (metrics, (ratio, weights))

    # Gradients add up in float32 whatever the parameters' dtype (bfloat16 sums of many micro-batches
    # lose digits), then return to that dtype, so the optimizer state keeps its dtypes across updates.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
    (grads, count, total), (micro_metrics, tokens) = jax.lax.scan(
        accumulate, (zeros, jnp.float32(0), jnp.float32(0)), mini)
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


def _model_inputs(batch: RLBatch | PackedRLBatch) -> dict[str, jax.Array]:
    """What the model reads of each micro-batch: ids and attention mask, or ids and segment ids."""
    if isinstance(batch, PackedRLBatch):
        return {"input_ids": batch.input_ids, "segment_ids": batch.segment_ids}
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


def _token_advantages(batch: RLBatch | PackedRLBatch, config: UpdateConfig) -> jax.Array:
    """Group advantages (``config.advantage``) of the step's sequences, on the loss layout's tokens;
    a padding row gets 0. Only response tokens are ever read (a packed batch holds no sequence
    without them); packing padding gets 0."""
    estimator = ADVANTAGE_ESTIMATORS[config.advantage]
    mask = batch.response_mask
    if isinstance(batch, RLBatch):
        advantages = estimator(batch.scores.reshape(-1), config.group_size).reshape(batch.scores.shape)
        return jnp.broadcast_to((advantages * jnp.any(mask, axis=-1))[..., None], mask.shape)
    advantages_S = jnp.append(estimator(batch.scores, config.group_size), 0.0)  # index S: padding
    return advantages_S[jnp.where(batch.segment_ids >= 0, batch.segment_ids, batch.scores.shape[0])]


def rl_update(state: RLState, batch: RLBatch | PackedRLBatch, *, graphdef, rest, optimizer: Optimizer,
              config: UpdateConfig) -> tuple[RLState, dict[str, jax.Array]]:
    """One RL update (see the module docstring): pure, jit it with `jit_rl_update`.

    Takes a padded `RLBatch` or a `PackedRLBatch` of the same sequences (same result to float32
    rounding). Returns the new state (``step`` + 1) and scalar metrics named as logged: ``actor/*``
    (loss metrics with official names, ``loss``, ``grad_norm``, ``lr``, ``skipped_updates``,
    ``entropy``), ``rollout/sampler_logprob_gap`` and ``batch/length_weighted_advantage``.
    """
    packed = isinstance(batch, PackedRLBatch)
    mask = batch.response_mask
    n_mini = mask.shape[0]
    response_len = batch.response_width if packed else mask.shape[-1]
    model_inputs = _model_inputs(batch)
    old_lp, entropy = _old_log_probs(graphdef, state.params, rest, model_inputs, response_len,
                                     config.logprob_chunk_size)
    advantages = _token_advantages(batch, config)

    minis = {**model_inputs, "response_mask": mask, "old_log_probs": old_lp, "advantages": advantages}
    if packed:
        minis["sequences"] = batch.sequences
        sequences_per_mini = batch.scores.shape[0] // n_mini
    else:
        sequences_per_mini = mask.shape[1] * mask.shape[2]
    # The IS-ratio quantiles (two sorts of every token) are taken once below, outside the gradient.
    loss_config = config.loss.replace(ratio_quantiles=False)
    if packed and loss_config.aggregation_horizon is None:
        loss_config = loss_config.replace(aggregation_horizon=response_len)  # "-norm": the padded T
    (params, opt_state), (micro_metrics, update_metrics, (ratio, weights)) = jax.lax.scan(
        functools.partial(_mini_batch_update, graphdef, rest, optimizer, config, loss_config, response_len,
                          sequences_per_mini),
        (state.params, state.opt_state), minis)

    micro_tokens = jnp.sum(mask, axis=(-2, -1)).astype(jnp.float32)  # [M, K]
    metrics = reduce_metrics(micro_metrics, micro_tokens, METRIC_REDUCTIONS)
    metrics |= reduce_metrics(update_metrics, micro_tokens.sum(axis=-1), UPDATE_METRIC_REDUCTIONS)
    if config.loss.ratio_quantiles:
        tokens = lambda x: x.reshape(-1, mask.shape[-1])  # noqa: E731
        metrics |= loss_metrics.ratio_quantiles(tokens(ratio), tokens(advantages), tokens(mask))
    metrics = {f"actor/{k}": v for k, v in metrics.items()}
    if config.loss.loss_mode == "fipo":
        metrics |= influence_activity(micro_metrics, weights, mask)
    metrics["actor/entropy"] = _token_mean(entropy, mask)
    metrics["rollout/sampler_logprob_gap"] = _token_mean(jnp.abs(batch.sampler_log_probs - old_lp), mask)
    metrics["batch/length_weighted_advantage"] = _token_mean(advantages, mask)
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


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
                out[f"influence/mb{i + 1}_weight_p{round(q * 100)}"] = jnp.nan_to_num(jnp.nanquantile(values, q), nan=1.0)
    return out


def jit_rl_update(graphdef, rest, optimizer: Optimizer, config: UpdateConfig, state_shardings: RLState | None = None,
                  metric_sharding=None):
    """`rl_update` jitted once, the state donated. ``state_shardings`` pins the new state's placement
    (so every step compiles once and never reshards); ``metric_sharding`` the metrics' (replicated,
    so every process reads them locally)."""
    fn = functools.partial(rl_update, graphdef=graphdef, rest=rest, optimizer=optimizer, config=config)
    kwargs = {}
    if state_shardings is not None:
        kwargs["out_shardings"] = (state_shardings, metric_sharding)
    return jax.jit(fn, donate_argnums=0, **kwargs)


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
    raw = state.replace(key=np.asarray(jax.random.key_data(state.key)))
    placed = jax.device_put(raw, shardings)
    return placed.replace(key=jax.random.wrap_key_data(placed.key, impl=jax.random.key_impl(state.key)))


def abstract_state(state: RLState, shardings: RLState) -> RLState:
    """Shape, dtype and placement of every leaf (what a checkpoint restore fills in)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def batch_shardings(batch: RLBatch | PackedRLBatch, mesh) -> RLBatch | PackedRLBatch:
    """Rows (axis 2 of [M, K, R, ...]) split as the rules table places logical ``batch``; a packed
    batch's per-sequence scores [S] and per-micro-batch counts [M, K] are replicated."""
    def place(x):
        axes = ("mini_batch", "micro_batch", "batch") + (None,) * (x.ndim - 3) if x.ndim >= 3 else (None,) * x.ndim
        return logical_sharding(axes, x.shape, mesh, name=f"batch field of shape {x.shape}")
    return jax.tree.map(place, batch)


# ----------------------------------------------------------------------------- host side


def layout_batch(fields: dict[str, np.ndarray], mini_batches: int, micro_batch_size: int) -> RLBatch:
    """Host arrays with B rows → an `RLBatch` of [M, K, R, ...] (M = mini_batches, R = micro_batch_size)."""
    rows = len(fields["scores"])
    _checks.require(rows % (mini_batches * micro_batch_size) == 0,
                    f"{rows} rows do not split into {mini_batches} mini-batches of micro-batches of "
                    f"{micro_batch_size} rows")
    k = rows // (mini_batches * micro_batch_size)
    shaped = {name: np.asarray(value).reshape((mini_batches, k, micro_batch_size) + np.shape(value)[1:])
              for name, value in fields.items()}
    return RLBatch(**shaped)


# Packed micro-batches take row counts 1 … 4, then 2^k · {1, 1.25, 1.5, 1.75} (5, 6, 7, 8, 10, 12,
# 14, 16, 20, …): four shapes per doubling (one compile each), less than a quarter of the rows wasted.
def bucket_size(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, … that is ≥ n (n ≥ 1)."""
    _checks.check_int("n", n, minimum=1)
    if n <= 4:
        return n
    step = (1 << ((n - 1).bit_length() - 1)) // 4  # a quarter of the largest power of two below n
    return -(-n // step) * step


def _sequence_tokens(fields: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Per sequence: its ids (real prompt tokens, then response tokens), its sampler log-probs on
    the same columns (0 on the prompt), and its response length."""
    ids, sampler = [], []
    prompt_ids, prompt_mask = fields["prompt_ids"], np.asarray(fields["prompt_mask"], bool)
    tokens, response_mask = fields["tokens"], np.asarray(fields["response_mask"], bool)
    for i in range(len(tokens)):
        prompt = prompt_ids[i][prompt_mask[i]]
        ids.append(np.concatenate([prompt, tokens[i][response_mask[i]]]))
        sampler.append(np.concatenate([np.zeros(len(prompt), np.float32),
                                       fields["sampler_log_probs"][i][response_mask[i]]]))
    return ids, sampler, response_mask.sum(axis=1)


def pack_batch(fields: dict[str, np.ndarray], mini_batches: int, micro_batch_size: int, row_multiple: int = 1
               ) -> tuple[PackedRLBatch, dict[str, float]]:
    """Host arrays of B sequences → a `PackedRLBatch` (the same mini-batches as `layout_batch`).

    ``fields``: ``prompt_ids`` / ``prompt_mask`` [B, P] (any padding), ``tokens`` /
    ``response_mask`` / ``sampler_log_probs`` [B, N], ``scores`` [B]. Mini-batch m holds sequences
    [m·B/M, (m+1)·B/M) as in the padded layout; each packs its sequences with responses (real prompt
    tokens + response) into rows of L = P + N tokens by first-fit decreasing. Every micro-batch is
    [R, L] with R ≤ ``micro_batch_size`` (its token budget R·L never exceeds a padded micro-batch's):
    K = the fewest micro-batches that hold the rows the fullest mini-batch needs, R = `bucket_size`
    of their share (few distinct shapes, so few compiles), a multiple of ``row_multiple`` (the
    data-parallel split).

    Returns the batch and ``{"padding_frac_padded", "padding_frac_packed", "packed_rows",
    "padded_rows"}``: the share of padding tokens of the two layouts and their row counts.
    """
    rows = len(fields["scores"])
    expected = ("prompt_ids", "prompt_mask", "tokens", "response_mask", "scores", "sampler_log_probs")
    _checks.require(set(fields) == set(expected), f"fields must be {expected}, got {tuple(fields)}")
    for name in expected:
        shape = np.shape(fields[name])
        paired = "prompt_mask" if name.startswith("prompt") else "response_mask"
        _checks.require(shape[0] == rows and (name == "scores" or shape == np.shape(fields[paired])),
                        f"fields[{name!r}] has shape {shape}: every field needs {rows} rows (one per score), "
                        f"prompt fields [B, P] and response fields [B, N] alike")
    _checks.require(rows % mini_batches == 0, f"{rows} sequences do not split into {mini_batches} mini-batches")
    _checks.check_int("micro_batch_size", micro_batch_size, minimum=1)
    _checks.check_int("row_multiple", row_multiple, minimum=1)
    _checks.require(micro_batch_size % row_multiple == 0, f"micro_batch_size ({micro_batch_size}) must be a multiple "
                                                          f"of row_multiple ({row_multiple})")
    width = fields["prompt_ids"].shape[1] + fields["tokens"].shape[1]
    ids, sampler, response_len = _sequence_tokens(fields)
    lengths = np.array([len(x) for x in ids]) * (response_len > 0)  # responses without tokens take no room
    per_mini = rows // mini_batches
    packings = [packing_lib.first_fit_decreasing(lengths[m * per_mini:(m + 1) * per_mini], width)
                for m in range(mini_batches)]
    needed = max(p.num_rows for p in packings)
    units = -(-needed // row_multiple)  # rows in units of the data split
    max_units = micro_batch_size // row_multiple
    n_micro = -(-units // max_units)  # as few micro-batches as the budget allows …
    micro_rows = min(bucket_size(-(-units // n_micro)), max_units) * row_multiple  # … each as full as can be
    shape = (mini_batches, n_micro * micro_rows, width)
    out = {"input_ids": np.zeros(shape, np.int32), "segment_ids": np.full(shape, packing_lib.PADDING_SEGMENT, np.int32),
           "response_mask": np.zeros(shape, bool), "sampler_log_probs": np.zeros(shape, np.float32)}
    sequences = np.zeros((mini_batches, n_micro), np.float32)
    for m, packing in enumerate(packings):
        for j, (row, start, length) in enumerate(zip(packing.rows, packing.starts, packing.lengths)):
            s = m * per_mini + j
            sequences[m, row // micro_rows] += 1
            if length == 0:
                continue
            cols = slice(start, start + length)
            out["input_ids"][m, row, cols] = ids[s]
            out["segment_ids"][m, row, cols] = s
            out["response_mask"][m, row, start + length - response_len[s]:start + length] = True
            out["sampler_log_probs"][m, row, cols] = sampler[s]
    split = lambda x: x.reshape((mini_batches, n_micro, micro_rows) + x.shape[2:])  # noqa: E731
    batch = PackedRLBatch(**{k: split(v) for k, v in out.items()}, scores=np.asarray(fields["scores"], np.float32),
                          sequences=sequences, response_width=int(fields["tokens"].shape[1]))
    every_token = float(sum(len(x) for x in ids))  # the padded layout also holds empty responses' prompts
    stats = {"padding_frac_padded": 1.0 - every_token / (rows * width),
             "padding_frac_packed": 1.0 - float(lengths.sum()) / out["input_ids"].size,
             "packed_rows": float(mini_batches * n_micro * micro_rows), "padded_rows": float(rows)}
    return batch, stats
