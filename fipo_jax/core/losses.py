"""Policy losses: FIPO (Future-KL influenced), DAPO (clip-higher + dual-clip), GRPO.

Per token, with d = clamp(log π_θ − log π_old, −20, 20) and r = exp(d) (spec E1):

    FIPO  f = sg(clip(exp(FutureKL(d)), lo, hi)), safety-clamped (E2–E5); Ã = A·f    (E6)
    DAPO  Ã = A
    ℓ     = max(−Ã r, −Ã clip(r, 1−ε_low, 1+ε_high))          (clip-higher PPO, E7)
    ℓ     = min(ℓ, −Ã c)  where Ã < 0                          (dual clip; not in GRPO)

FIPO also drops a whole response holding two or more dual-clipped A<0 tokens (E8).
Optional extras for any mode: + β·KL(π_θ‖π_ref) per token (k1/k2/k3) − α·entropy.
Aggregation (E9) returns `LossTerms(total, count)` so that micro-batch gradients can be
summed and divided once, reproducing the exact mini-batch mean.

Packed rows (several sequences per row, `segment_ids`): every per-sequence piece — the
Future-KL sum, the E8 drop rule, the sequence means of the aggregations, the dropped count —
works per segment, so a packed batch gives the loss of the same sequences padded one per row.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Literal, Mapping, NamedTuple, get_args

import jax
import jax.numpy as jnp

from fipo_jax.core import _checks
from fipo_jax.core import loss_metrics as lm
from fipo_jax.core.behaviour import (
    BEHAVIOUR_WEIGHT_LEVELS,
    BehaviourWeightLevel,
    behaviour_weights,
    check_behaviour_weight_cap,
)
from fipo_jax.core.future_kl import METHOD_CHOICES as FUTURE_KL_METHOD_CHOICES
from fipo_jax.core.future_kl import FutureKLMethod, context_parallel_future_kl, future_kl, summed_tokens
from fipo_jax.core.segments import check_segment_ids, segment_sums

# Each choice list is declared once, as a Literal (the annotation); the tuple is its arguments.
LossMode = Literal["fipo", "dapo", "grpo"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KLEstimator = Literal["k1", "k2", "k3"]
MicroBatchWeighting = Literal["exact", "official"]
LOSS_MODES: tuple[str, ...] = get_args(LossMode)
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
MICRO_BATCH_WEIGHTINGS: tuple[str, ...] = get_args(MicroBatchWeighting)
# How a metric combines over micro-batches (`METRIC_REDUCTIONS`, `train.update.reduce_metrics`).
Reduction = Literal["sum", "mean", "loss_mean", "min", "max"]

# Bounds of the safety clamp (E5) and the weight cap when influence_clip == 0 (E4).
_SAFETY_CLAMP = (0.8, 1.0)
_UNCLIPPED_WEIGHT_CAP = 10.0
_BOUND_TOLERANCE = 1e-7  # official clip-fraction metrics compare with ±1e-7
# A token's influence weight "acts" when |f − 1| exceeds this (the activity metrics).
ACTIVE_WEIGHT_TOLERANCE = 0.01


# How each metric of `policy_loss_terms` combines over micro-batches (and mini-batches): "sum" for
# counts, "min" / "max" for extremes, "loss_mean" for the aggregated losses — weighted by their
# aggregation's count ``loss_count``, so Σ total / Σ count however sequences are grouped into
# micro-batches — and "mean" for everything else: a mean weighted by response tokens, so that
# batches without tokens do not pull it toward 0. The trainer reduces by this table and refuses a
# metric missing from it. Read-only: the declaration, not inferred from names.
METRIC_REDUCTIONS: Mapping[str, Reduction] = types.MappingProxyType({
    "ppo_kl": "mean", "pg_clipfrac": "mean", "pg_clipfrac_lower": "mean", "pg_loss": "loss_mean",
    "kl_loss": "loss_mean", "entropy": "loss_mean", "loss_count": "sum",
    "dropped_sequences": "sum", "response_tokens": "sum", "loss_tokens": "sum",
    "influence_active_tokens": "sum", "filtered_tokens": "sum", "safety_clamped_tokens": "sum",
    "influence_weights_mean": "mean", "influence_weights_min": "min", "influence_weights_max": "max",
    "clip_frac_upper": "mean", "clip_frac_lower": "mean", "total_clip_frac": "mean",
    "influence_weights_mean_raw": "mean", "raw_influence_weights_min": "min", "raw_influence_weights_max": "max",
    "neg_ratio_2_3": "mean", "neg_ratio_3_4": "mean", "neg_ratio_4_10": "mean", "pos_mini_frac": "mean",
    "neg_is_min": "min", "neg_is_p75": "mean", "neg_is_p995": "mean", "neg_is_p999": "mean", "neg_is_max": "max",
    "pos_is_min": "min", "pos_is_p25": "mean", "pos_is_median": "mean", "pos_is_p75": "mean",
    "pos_is_p995": "mean", "pos_is_p999": "mean", "pos_is_max": "max",
    "behaviour_weights_mean": "mean", "behaviour_weights_capped_frac": "mean",
})


# Fields whose default depends on the loss mode (and clip_ratio_high on clip_ratio_low): see PolicyLossConfig.
MODE_DEPENDENT_FIELDS = ("clip_ratio_high", "aggregation", "drop_dual_clipped_sequences")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Settings of `policy_loss`; defaults are the official FIPO 32B recipe.

    Fields left as ``None`` take the loss mode's official default, resolved on
    construction: ``clip_ratio_high`` (0.28 for fipo/dapo, = ``clip_ratio_low`` for grpo),
    ``aggregation`` ("token-mean"; grpo: "seq-mean-token-mean") and
    ``drop_dual_clipped_sequences`` (True for fipo only). A resolved default keeps following what
    it derives from: ``PolicyLossConfig.grpo().replace(clip_ratio_low=0.1)`` has
    ``clip_ratio_high`` 0.1, as ``--algo grpo --set algo.loss.clip_ratio_low=0.1``, ``--set
    algo.loss.loss_mode=grpo …`` and a JSON config have (`given` records the fields set explicitly;
    `to_dict` writes the others as None).

    Attributes:
      loss_mode: "fipo", "dapo" (the official "vanilla" loss) or "grpo" (PPO clip, no dual clip).
      clip_ratio_low, clip_ratio_high: ε_low, ε_high of the ratio clip [1−ε_low, 1+ε_high].
      clip_ratio_c: dual-clip constant c (> 1); also the Future-KL filter threshold.
      decay_rate: τ > 0, Future-KL half-life in tokens (γ = 2^(−1/τ)).
      influence_clip: ε_f ≥ 0; weights clipped to [1, 1+ε_f] (high-only) or [1−ε_f, 1+ε_f];
        0 selects the official fallback min(exp(FutureKL), 10).
      influence_clip_high_only: see ``influence_clip``.
      safety_threshold: A < 0 and r > this ⇒ weight clamped into [0.8, 1] (E5).
      future_kl_filter: drop tokens with r > c from the Future-KL sum (E2; paper ablation
        "without filter" sets False).
      drop_dual_clipped_sequences: E8 sequence-drop rule.
      aggregation: how per-token losses become one number (see `aggregate`).
      aggregation_horizon: constant length L of "seq-mean-token-sum-norm" (default: T).
      log_ratio_clamp: |log π_θ − log π_old| is clamped to this (official 20).
      kl_coef, kl_estimator: β and the estimator of a KL(π_θ‖π_ref) penalty (needs ref_log_probs).
      entropy_coeff: α of an entropy bonus (needs ``entropy``).
      future_kl_method, future_kl_block_size: algorithm of `future_kl` ("auto"/None =
        the measured fastest for the backend).
      future_kl_context_axis: mesh axis the time axis is split over (context parallelism): the
        Future-KL runs per slice with the later slices' tail carried in
        (`context_parallel_future_kl`; needs `jax.set_mesh`); None: the whole row on each device.
      behaviour_weight_cap, behaviour_weight_level: C and the level ("token" / "sequence") of the
        decoupled objective's behaviour weights min(π_prox / π_behav, C) on each token's loss
        (`fipo_jax.core.behaviour`; needs ``behaviour_log_probs``); None: no weights, the loss as
        without them.
    """

    loss_mode: LossMode = "fipo"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float | None = None
    clip_ratio_c: float = 10.0
    decay_rate: float = 32.0
    influence_clip: float = 0.2
    influence_clip_high_only: bool = True
    safety_threshold: float = 10.0
    future_kl_filter: bool = True
    drop_dual_clipped_sequences: bool | None = None
    aggregation: Aggregation | None = None
    aggregation_horizon: int | None = None
    log_ratio_clamp: float = 20.0
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    entropy_coeff: float = 0.0
    future_kl_method: FutureKLMethod = "auto"
    future_kl_block_size: int | None = None
    future_kl_context_axis: str | None = None
    behaviour_weight_cap: float | None = None
    behaviour_weight_level: BehaviourWeightLevel = "token"
    # The mode-dependent fields given explicitly (the others are the mode's defaults).
    given: frozenset = dataclasses.field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self):
        field = lambda name: f"PolicyLossConfig: {name}"  # noqa: E731
        _checks.check_choice(field("loss_mode"), self.loss_mode, LOSS_MODES)
        object.__setattr__(self, "given", frozenset(n for n in MODE_DEPENDENT_FIELDS if getattr(self, n) is not None))
        is_grpo = self.loss_mode == "grpo"
        resolved = {
            "clip_ratio_high": self.clip_ratio_low if is_grpo else 0.28,
            "aggregation": "seq-mean-token-mean" if is_grpo else "token-mean",
            "drop_dual_clipped_sequences": self.loss_mode == "fipo",
        }
        for name, value in resolved.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in ("clip_ratio_low", "clip_ratio_high", "influence_clip", "kl_coef", "entropy_coeff"):
            _checks.check_number(field(name), getattr(self, name), minimum=0)
        _checks.require(self.clip_ratio_low < 1, f"PolicyLossConfig: clip_ratio_low must be < 1 so the lower ratio "
                                                 f"bound 1 - clip_ratio_low is > 0, got {self.clip_ratio_low}")
        _checks.require(_checks.is_real(self.clip_ratio_c) and self.clip_ratio_c > 1,
                        f"PolicyLossConfig: clip_ratio_c must be > 1 (dual-clip constant c), got {self.clip_ratio_c!r}")
        _checks.require(is_grpo or self.clip_ratio_c > 1 + self.clip_ratio_high,
                        f"PolicyLossConfig: clip_ratio_c ({self.clip_ratio_c}) must exceed 1 + clip_ratio_high "
                        f"({1 + self.clip_ratio_high})")
        for name in ("decay_rate", "safety_threshold", "log_ratio_clamp"):
            _checks.check_number(field(name), getattr(self, name), minimum=0, exclusive_minimum=True)
        _checks.require(self.influence_clip_high_only or self.influence_clip < 1,
                        f"PolicyLossConfig: influence_clip must be < 1 with influence_clip_high_only=False (lower "
                        f"bound 1 - ε_f), got {self.influence_clip}")
        _checks.check_choice(field("aggregation"), self.aggregation, AGGREGATIONS)
        _checks.check_int(field("aggregation_horizon"), self.aggregation_horizon, minimum=1, allow_none=True)
        _checks.check_choice(field("kl_estimator"), self.kl_estimator, KL_ESTIMATORS)
        _checks.check_choice(field("future_kl_method"), self.future_kl_method, FUTURE_KL_METHOD_CHOICES)
        _checks.check_int(field("future_kl_block_size"), self.future_kl_block_size, minimum=1, allow_none=True)
        _checks.require(self.future_kl_context_axis is None or (isinstance(self.future_kl_context_axis, str)
                                                                and self.future_kl_context_axis),
                        f"PolicyLossConfig: future_kl_context_axis must be a mesh axis name or None, "
                        f"got {self.future_kl_context_axis!r}")
        check_behaviour_weight_cap(field("behaviour_weight_cap"), self.behaviour_weight_cap)
        _checks.check_choice(field("behaviour_weight_level"), self.behaviour_weight_level, BEHAVIOUR_WEIGHT_LEVELS)
        for name in ("influence_clip_high_only", "future_kl_filter", "drop_dual_clipped_sequences"):
            _checks.check_bool(field(name), getattr(self, name))

    @property
    def influence_bounds(self) -> tuple[float, float]:
        """(lo, hi) of the influence weight (E4): [1, 1+ε_f], [1−ε_f, 1+ε_f] or [0, 10]."""
        if self.influence_clip == 0:
            return 0.0, _UNCLIPPED_WEIGHT_CAP
        lo = 1.0 if self.influence_clip_high_only else 1.0 - self.influence_clip
        return lo, 1.0 + self.influence_clip

    def replace(self, **changes) -> "PolicyLossConfig":
        """A copy with ``changes``; the mode-dependent fields not given explicitly are resolved again."""
        return PolicyLossConfig(**{**self.to_dict(), **changes})

    def to_dict(self) -> dict:
        """The fields as given: a mode-dependent field that was not set explicitly is None."""
        return {f.name: None if f.name in MODE_DEPENDENT_FIELDS and f.name not in self.given else getattr(self, f.name)
                for f in dataclasses.fields(self) if f.init}

    @classmethod
    def fipo_32b(cls, **overrides) -> "PolicyLossConfig":
        """Official Qwen2.5-32B recipe: τ=32, weights in [1, 1.2], safety 10, c=10."""
        return cls(**overrides)

    @classmethod
    def fipo_7b(cls, **overrides) -> "PolicyLossConfig":
        """Official 7B pilot: balanced influence clip [0.8, 1.2], safety threshold 3."""
        return cls(**{"influence_clip_high_only": False, "safety_threshold": 3.0, **overrides})

    @classmethod
    def dapo(cls, **overrides) -> "PolicyLossConfig":
        """DAPO: clip-higher (0.2 / 0.28) + dual clip c=10, token-mean, no influence weights."""
        return cls(**{"loss_mode": "dapo", **overrides})

    @classmethod
    def grpo(cls, **overrides) -> "PolicyLossConfig":
        """GRPO: symmetric clip 0.2, per-sequence token-mean then mean over sequences."""
        return cls(**{"loss_mode": "grpo", **overrides})


class LossTerms(NamedTuple):
    """An aggregated loss as ``total / count``; both are additive over micro-batches.

    For "token-mean" `count` is the number of loss tokens, for the "seq-mean-*" modes
    the number of sequences (times the horizon for "-norm"). Summing the terms (and the
    gradients of `total`) over micro-batches and dividing once gives exactly the loss of
    the concatenated batch.
    """

    total: jax.Array
    count: jax.Array  # type: ignore[assignment]  # the field shadows tuple.count on purpose (the public name)

    @property
    def value(self) -> jax.Array:
        """total / count, and 0 for an empty batch (never NaN)."""
        return self.total / jnp.maximum(self.count, 1.0)


def weight_micro_batch(
    terms: LossTerms, weighting: MicroBatchWeighting, n_sequences, total_sequences: int
) -> LossTerms:
    """Terms of one micro-batch, ready to be summed over a mini-batch and divided once.

    * "exact" (default, paper Eq. 8): unchanged; Σ_m total_m / Σ_m count_m is the
      token-mean over the whole mini-batch.
    * "official" (verl `dp_actor`): each micro-batch's own mean, weighted by its share of
      the mini-batch's sequences, L = Σ_m value_m · n_m / N, written as
      (value_m · n_m / N, n_m / N) so that the same "sum, then divide" rule applies.
      ``n_sequences`` may be traced (packed micro-batches hold a varying number of sequences).
    """
    if weighting == "exact":
        return terms
    if weighting == "official":
        if _checks.is_real(n_sequences) and not 0 < n_sequences <= total_sequences:
            raise ValueError(f"need 0 < n_sequences ({n_sequences}) <= total_sequences ({total_sequences})")
        share = n_sequences / total_sequences
        return LossTerms(terms.value * share, jnp.asarray(share, jnp.float32))
    raise ValueError(f"weighting must be {' or '.join(map(repr, MICRO_BATCH_WEIGHTINGS))}, got {weighting!r}")


def log_importance_ratio(log_probs: jax.Array, old_log_probs: jax.Array, log_ratio_clamp: float) -> jax.Array:
    """d = clamp(log π_θ − log π_old, −κ, κ) per token (spec E1; official κ = 20); r = exp(d)."""
    return jnp.clip(log_probs - old_log_probs, -log_ratio_clamp, log_ratio_clamp)


def importance_ratio(log_probs: jax.Array, old_log_probs: jax.Array, mask: jax.Array,
                     log_ratio_clamp: float) -> jax.Array:
    """sg(r), r = exp(d) of `log_importance_ratio`, per token [B, T]: the ratio `policy_loss_terms`
    bins, dual-clips and drops by, bit for bit (float32 at least, exactly 1 on padding).

    For callers that compute the IS-ratio metrics outside the loss, e.g.
    ``loss_metrics.ratio_quantiles(importance_ratio(lp, old, mask, config.log_ratio_clamp), A, mask)``."""
    _, log_probs, old_log_probs = _zero_padding(mask, log_probs, old_log_probs)
    return jax.lax.stop_gradient(jnp.exp(log_importance_ratio(log_probs, old_log_probs, log_ratio_clamp)))


def influence_weights(
    future_kl_values: jax.Array, advantages: jax.Array, ratio: jax.Array, config: PolicyLossConfig
) -> tuple[jax.Array, jax.Array]:
    """FIPO influence weights (spec E4–E5), stop-gradient.

        f = clip(exp(FutureKL), lo, hi)
        f ← clip(f, 0.8, 1)   where A < 0 and r > safety_threshold

    Returns:
      ``(weights, raw)`` with raw = exp(FutureKL) before clipping.
    """
    raw = jnp.exp(jax.lax.stop_gradient(future_kl_values))
    lo, hi = config.influence_bounds
    weights = jnp.clip(raw, lo, hi)
    risky_negative = safety_clamp_mask(advantages, ratio, config.safety_threshold)
    weights = jnp.where(risky_negative, jnp.clip(weights, *_SAFETY_CLAMP), weights)
    return jax.lax.stop_gradient(weights), raw


def safety_clamp_mask(advantages: jax.Array, ratio: jax.Array, safety_threshold: float) -> jax.Array:
    """A < 0 ∧ r > safety threshold: the tokens whose influence weight E5 clamps into [0.8, 1]."""
    return (advantages < 0) & (jax.lax.stop_gradient(ratio) > safety_threshold)


class Influence(NamedTuple):
    """FIPO's per-token pieces (spec E2–E5), each [B, T], stop-gradient."""

    summed: jax.Array  # bool: tokens the Future-KL sums (real, and r ≤ c when the filter is on)
    future_kl: jax.Array  # FutureKL_t (E3)
    raw_weights: jax.Array  # exp(FutureKL_t), before any clip
    weights: jax.Array  # f_t: clipped to the influence bounds (E4), safety-clamped (E5)
    safety_clamped: jax.Array  # bool: `safety_clamp_mask`


def influence(log_ratio: jax.Array, advantages: jax.Array, mask: jax.Array, config: PolicyLossConfig,
              segment_ids: jax.Array | None = None) -> Influence:
    """The Future-KL of the (stop-gradient) log-ratio and the influence weights it gives (E2–E5).

        FutureKL_t = Σ_{k≥t} γ^{k−t} Δlog p_k · keep_k,   f_t = clip(exp(FutureKL_t), lo, hi), safety-clamped
    """
    log_ratio = jax.lax.stop_gradient(log_ratio)
    threshold = config.clip_ratio_c if config.future_kl_filter else None
    if config.future_kl_context_axis is None:
        future = future_kl(log_ratio, mask, config.decay_rate, filter_threshold=threshold,
                           method=config.future_kl_method, block_size=config.future_kl_block_size,
                           segment_ids=segment_ids)
    else:
        future = context_parallel_future_kl(log_ratio, mask, config.decay_rate, config.future_kl_context_axis,
                                            threshold, config.future_kl_method, config.future_kl_block_size,
                                            segment_ids)
    ratio = jnp.exp(log_ratio)
    weights, raw = influence_weights(future, advantages, ratio, config)
    return Influence(summed_tokens(log_ratio, mask, threshold), future, raw, weights,
                     safety_clamp_mask(advantages, ratio, config.safety_threshold) & (jnp.asarray(mask) != 0))


def fipo_advantages(
    log_ratio: jax.Array, advantages: jax.Array, mask: jax.Array, config: PolicyLossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Ã = A · f with f the influence weights of the Future-KL of the (stop-gradient) log-ratio
    (spec E2–E6); returns ``(Ã, influence-weight metrics)``."""
    pieces = influence(log_ratio, advantages, mask, config)
    return advantages * pieces.weights, _influence_metrics(pieces.weights, pieces.raw_weights, mask, config)


def dual_clip_mask(ratio: jax.Array, advantages: jax.Array, clip_ratio_c: float) -> jax.Array:
    """A < 0 ∧ r > c: the tokens the dual clip bounds (E7) and the sequence-drop rule counts (E8).

    For A < 0 and c > 1, min(max(−A r, −A clip(r)), −A c) = −A c exactly when r > c."""
    return (advantages < 0) & (ratio > clip_ratio_c)


def clipped_surrogate(
    ratio: jax.Array,
    advantages: jax.Array,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token PPO loss with clip-higher and optional dual clip (spec E7).

        ℓ = max(−A r, −A clip(r, 1−ε_low, 1+ε_high));  ℓ ← −A c where A < 0 ∧ r > c

    Returns:
      ``(loss, clipped, dual_clipped)``: the per-token loss and the official indicators
      −A clip(r) > −A r (``pg_clipfrac``) and `dual_clip_mask` (``pg_clipfrac_lower``).
    """
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    ppo_loss = jnp.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    if clip_ratio_c is None:
        return ppo_loss, is_clipped, jnp.zeros_like(is_clipped)
    is_dual_clipped = dual_clip_mask(jax.lax.stop_gradient(ratio), advantages, clip_ratio_c)
    return jnp.where(is_dual_clipped, -advantages * clip_ratio_c, ppo_loss), is_clipped, is_dual_clipped


def drop_dual_clipped_sequences(ratio: jax.Array, advantages: jax.Array, mask: jax.Array,
                                clip_ratio_c: float, segment_ids: jax.Array | None = None) -> jax.Array:
    """E8: a response with two or more `dual_clip_mask` tokens leaves the loss; the new [B, T] mask.

    A response is a row, or with ``segment_ids`` a segment of a packed row."""
    hits = (dual_clip_mask(ratio, advantages, clip_ratio_c) & mask).astype(jnp.int32)
    if segment_ids is None:
        return mask & (jnp.sum(hits, axis=-1) <= 1)[:, None]
    sums, index = segment_sums(hits, segment_ids)
    return mask & (sums[index] <= 1)


def kl_penalty(log_probs: jax.Array, ref_log_probs: jax.Array, estimator: str) -> jax.Array:
    """Per-token estimate of KL(π_θ ‖ π_ref) from sampled tokens (Schulman's k1/k2/k3).

        k1 = log π_θ − log π_ref,   k2 = ½ (log π_θ − log π_ref)²,
        k3 = exp(ρ) − ρ − 1 with ρ = clamp(log π_ref − log π_θ, ±20), clamped to [−10, 10]
             (verl's "low_var_kl").
    """
    if estimator == "k1":
        return log_probs - ref_log_probs
    if estimator == "k2":
        return 0.5 * jnp.square(log_probs - ref_log_probs)
    if estimator == "k3":
        rho = jnp.clip(ref_log_probs - log_probs, -20.0, 20.0)
        return jnp.clip(jnp.exp(rho) - rho - 1.0, -10.0, 10.0)
    raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str, horizon: int | None = None,
              segment_ids: jax.Array | None = None, num_sequences=None) -> LossTerms:
    """Aggregate a ``[B, T]`` per-token loss over a bool mask (spec E9; verl `agg_loss`).

    With S sequences (rows, or the segments of packed rows):

    * "token-mean":               Σ_bt ℓ·m / Σ_bt m
    * "seq-mean-token-mean":      mean over sequences with tokens of (Σ_t∈s ℓ·m / Σ_t∈s m)
    * "seq-mean-token-sum":       Σ_bt ℓ·m / S
    * "seq-mean-token-sum-norm":  Σ_bt ℓ·m / (S · L), L = horizon or T (Dr. GRPO)

    verl's "seq-mean-token-mean" averages over all rows (NaN for an empty row) and its
    "-norm" divides by L only; here empty rows are skipped and S is divided out, so that
    every mode is a (total, count) pair that adds up across micro-batches.

    Without ``segment_ids`` S = B (empty rows count, as padding rows of a padded batch do).
    With them, a sequence is a segment holding a masked token, and S is their number unless
    ``num_sequences`` (may be traced) says otherwise — e.g. to count responses with no tokens,
    which a packed row does not hold; "-norm" then needs ``horizon`` (T is a packed width).
    """
    batch, length = per_token.shape
    masked = jnp.where(mask, per_token, 0.0)
    if mode == "token-mean":
        return LossTerms(jnp.sum(masked), jnp.sum(mask).astype(jnp.float32))
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    sequences: int | jax.Array
    if segment_ids is None:
        sums_S, tokens_S = jnp.sum(masked, axis=-1), jnp.sum(mask, axis=-1).astype(jnp.float32)
        sequences = batch
    else:
        sums_S, _ = segment_sums(masked, segment_ids)
        tokens_S, _ = segment_sums(mask.astype(jnp.float32), segment_ids)
        sequences = jnp.sum(tokens_S > 0)
    if num_sequences is not None:
        sequences = num_sequences
    sequences = jnp.asarray(sequences, jnp.float32)
    if mode == "seq-mean-token-mean":
        return LossTerms(jnp.sum(sums_S / jnp.maximum(tokens_S, 1.0)), jnp.sum(tokens_S > 0).astype(jnp.float32))
    if mode == "seq-mean-token-sum":
        return LossTerms(jnp.sum(masked), sequences)
    if segment_ids is not None and horizon is None:
        raise ValueError("aggregation 'seq-mean-token-sum-norm' on packed rows (segment_ids) needs the horizon L "
                         "(aggregation_horizon): the packed width T is not a response length")
    return LossTerms(jnp.sum(masked), sequences * (horizon or length))


def check_loss_inputs(log_probs, old_log_probs, advantages, mask, config, ref_log_probs=None, entropy=None,
                      segment_ids=None, num_sequences=None, behaviour_log_probs=None):
    """Shapes, dtypes and settings of `policy_loss`'s arguments (static: free under jit); raises naming them."""
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    _checks.check_floating("log_probs", log_probs, rank=2)
    _checks.require(min(log_probs.shape) > 0, f"log_probs [B, T] must hold at least one row and one token, got shape "
                    f"{tuple(log_probs.shape)}")
    _checks.check_floating("old_log_probs", old_log_probs)
    _checks.check_same_shape("old_log_probs", old_log_probs, "log_probs [B, T]", log_probs)
    _checks.check_floating("advantages", advantages)
    if jnp.ndim(advantages) == 1:
        if segment_ids is not None:
            raise ValueError(f"advantages of shape {jnp.shape(advantages)} are one per row; packed rows (segment_ids) "
                             f"need them per token, [B, T] = {jnp.shape(log_probs)} (each sequence's A on its tokens)")
        if jnp.shape(advantages)[0] != jnp.shape(log_probs)[0]:
            raise ValueError(f"advantages of shape {jnp.shape(advantages)} must be [B] or [B, T] for log_probs of "
                             f"shape {jnp.shape(log_probs)}")
    else:
        _checks.check_same_shape("advantages", advantages, "log_probs [B, T]", log_probs)
    _checks.check_mask("mask", mask, "log_probs [B, T]", log_probs)
    if config.kl_coef > 0:
        if ref_log_probs is None:
            raise ValueError("config.kl_coef > 0 needs ref_log_probs ([B, T] log π_ref of the sampled tokens)")
    if ref_log_probs is not None:
        _checks.check_floating("ref_log_probs", ref_log_probs)
        _checks.check_same_shape("ref_log_probs", ref_log_probs, "log_probs [B, T]", log_probs)
    if segment_ids is not None:
        check_segment_ids(segment_ids, jnp.shape(log_probs))
        if config.aggregation == "seq-mean-token-sum-norm" and config.aggregation_horizon is None:
            raise ValueError("aggregation 'seq-mean-token-sum-norm' on packed rows (segment_ids) needs "
                             "config.aggregation_horizon: the packed width T is not a response length")
    if num_sequences is not None and jnp.ndim(num_sequences) != 0:
        raise ValueError(f"num_sequences must be a scalar, got shape {jnp.shape(num_sequences)}")
    if config.behaviour_weight_cap is not None and behaviour_log_probs is None:
        raise ValueError("config.behaviour_weight_cap needs behaviour_log_probs ([B, T] log π_behav: what the "
                         "sampler drew each token with)")
    if behaviour_log_probs is not None:
        _checks.check_floating("behaviour_log_probs", behaviour_log_probs)
        _checks.check_same_shape("behaviour_log_probs", behaviour_log_probs, "log_probs [B, T]", log_probs)
    if config.entropy_coeff > 0 and entropy is None:
        raise ValueError("config.entropy_coeff > 0 needs entropy ([B, T] per-token policy entropy)")
    if entropy is not None:
        _checks.check_floating("entropy", entropy)
        _checks.check_same_shape("entropy", entropy, "log_probs [B, T]", log_probs)


def _zero_padding(mask, log_probs, *arrays):
    """(bool mask, arrays in float32 or wider with padding zeroed), so ±inf / NaN there never
    reaches a gradient; the dtype follows ``log_probs``."""
    f32 = jnp.promote_types(jnp.result_type(log_probs), jnp.float32)
    mask = jnp.asarray(mask) != 0
    return (mask, *(jnp.where(mask, x, 0.0).astype(f32) for x in (log_probs, *arrays)))


def prepared_inputs(log_probs, old_log_probs, advantages, mask):
    """The loss inputs as `policy_loss_terms` uses them: A broadcast to [B, T], a bool mask, padding
    zeroed in float32 or wider (`_zero_padding`); returns (log_probs, old_log_probs, A, mask)."""
    advantages = jnp.broadcast_to(advantages[:, None] if jnp.ndim(advantages) == 1 else advantages,
                                  jnp.shape(log_probs))
    mask, log_probs, old_log_probs, advantages = _zero_padding(mask, log_probs, old_log_probs, advantages)
    return log_probs, old_log_probs, advantages, mask


def _regularised(per_token, terms, log_probs, mask, agg, config, ref_log_probs, entropy):
    """Adds β·KL(π_θ‖π_ref) and −α·entropy per token when given; their metrics (same aggregation ``agg``)."""
    metrics = {}
    if ref_log_probs is not None:
        kl = kl_penalty(log_probs, jnp.where(mask, ref_log_probs, 0.0).astype(log_probs.dtype), config.kl_estimator)
        metrics["kl_loss"] = jax.lax.stop_gradient(agg(kl).value)
        if config.kl_coef > 0:
            per_token = per_token + config.kl_coef * kl
    if entropy is not None:
        entropy = jnp.where(mask, entropy, 0.0).astype(log_probs.dtype)
        metrics["entropy"] = jax.lax.stop_gradient(agg(entropy).value)
        if config.entropy_coeff > 0:
            per_token = per_token - config.entropy_coeff * entropy
    if ref_log_probs is not None or entropy is not None:
        terms = agg(per_token)
    return terms, metrics


def _behaviour_weighted(per_token, prox_log_probs, behaviour_log_probs, mask, config, segment_ids):
    """(per-token loss × the behaviour weights, their metrics) when ``config.behaviour_weight_cap``
    is set; else (per_token, {}) unchanged."""
    cap = config.behaviour_weight_cap
    if cap is None:
        return per_token, {}
    behaviour = jnp.where(mask, behaviour_log_probs, 0.0).astype(prox_log_probs.dtype)
    weights = behaviour_weights(prox_log_probs, behaviour, mask, cap, config.behaviour_weight_level, segment_ids)
    metrics = {"behaviour_weights_mean": lm.masked_mean(weights, mask),
               "behaviour_weights_capped_frac": lm.masked_fraction(weights >= cap * (1 - _BOUND_TOLERANCE), mask)}
    return per_token * weights.astype(per_token.dtype), metrics


def _count_metrics(mask, loss_mask, segment_ids=None) -> dict[str, jax.Array]:
    if segment_ids is None:
        has_tokens, has_loss = jnp.any(mask, -1), jnp.any(loss_mask, -1)
    else:
        has_tokens, has_loss = (segment_sums(m.astype(jnp.int32), segment_ids)[0] > 0 for m in (mask, loss_mask))
    return {"dropped_sequences": jnp.sum(has_tokens & ~has_loss).astype(jnp.float32),
            "response_tokens": jnp.sum(mask).astype(jnp.float32),
            "loss_tokens": jnp.sum(loss_mask).astype(jnp.float32)}


class TokenDiagnostics(NamedTuple):
    """Per-token quantities of one batch, [B, T] unless noted; padding holds 0 / False / 1 (weights).
    No field carries a gradient.

    Attributes:
      log_ratio: Δlog p = clamp(log π_θ − log π_old) (spec E1).
      ratio: r = exp(Δlog p).
      advantages: A per token.
      filtered: real tokens FIPO's extreme-ratio filter leaves out of the Future-KL (r > c, E2).
      future_kl: FutureKL_t (E3), for every loss mode (only FIPO applies it).
      raw_weights: exp(FutureKL_t) before the influence clip.
      weights: the weight the loss multiplies A by: clipped (E4) and safety-clamped (E5) in FIPO,
        1 in DAPO / GRPO.
      safety_clamped: tokens whose weight the safety rule clamps into [0.8, 1] (A < 0, r > threshold).
      dual_clipped: tokens the dual clip bounds (A < 0, r > c; never in GRPO).
      dropped_rows: [B] rows every response of which the E8 rule removes (two or more dual-clipped
        tokens); with segment ids, ``mask & ~loss_mask`` shows each dropped sequence.
      loss_mask: tokens that enter the loss (response mask minus dropped sequences).
    """

    log_ratio: jax.Array
    ratio: jax.Array
    advantages: jax.Array
    filtered: jax.Array
    future_kl: jax.Array
    raw_weights: jax.Array
    weights: jax.Array
    safety_clamped: jax.Array
    dual_clipped: jax.Array
    dropped_rows: jax.Array
    loss_mask: jax.Array


class LossParts(NamedTuple):
    """Everything `policy_loss_parts` computes: the additive loss, its metrics, its per-token pieces."""

    terms: LossTerms
    metrics: dict[str, jax.Array]
    tokens: TokenDiagnostics


def _surrogate(log_probs, old_log_probs, advantages, mask, config, segment_ids):
    """(per-token surrogate [B, T] with gradient, `TokenDiagnostics`, `Influence`) of prepared inputs:

        ℓ_t = max(−A f_t r_t, −A f_t clip(r_t, 1 − ε_low, 1 + ε_high)), −A f_t c where dual-clipped

    with f ≡ 1 outside FIPO (spec E1–E8)."""
    log_ratio = log_importance_ratio(log_probs, old_log_probs, config.log_ratio_clamp)
    ratio = jnp.exp(log_ratio)
    ratio_sg = jax.lax.stop_gradient(ratio)  # = importance_ratio(...): the inputs' padding is zeroed already
    pieces = influence(log_ratio, advantages, mask, config, segment_ids)
    fipo = config.loss_mode == "fipo"
    weights = pieces.weights if fipo else jnp.ones_like(ratio_sg)
    dual_clip = None if config.loss_mode == "grpo" else config.clip_ratio_c
    per_token, is_clipped, is_dual_clipped = clipped_surrogate(
        ratio, advantages * weights if fipo else advantages, config.clip_ratio_low, config.clip_ratio_high, dual_clip)
    loss_mask = (drop_dual_clipped_sequences(ratio_sg, advantages, mask, config.clip_ratio_c, segment_ids)
                 if config.drop_dual_clipped_sequences else mask)
    tokens = TokenDiagnostics(
        log_ratio=jax.lax.stop_gradient(log_ratio), ratio=ratio_sg, advantages=advantages,
        filtered=mask & ~pieces.summed, future_kl=pieces.future_kl,
        raw_weights=jnp.where(mask, pieces.raw_weights, 1.0),
        weights=jnp.where(mask, weights, 1.0), safety_clamped=pieces.safety_clamped & fipo,
        dual_clipped=is_dual_clipped & mask, dropped_rows=jnp.any(mask, -1) & ~jnp.any(loss_mask, -1),
        loss_mask=loss_mask)
    return per_token, is_clipped, tokens, pieces


def policy_loss_parts(
    log_probs: jax.Array,
    old_log_probs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    config: PolicyLossConfig,
    *,
    ref_log_probs: jax.Array | None = None,
    entropy: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    num_sequences=None,
    behaviour_log_probs: jax.Array | None = None,
    ratio_quantiles: bool = True,
) -> LossParts:
    """`policy_loss` as additive `LossTerms`, its metrics and its per-token `TokenDiagnostics`.

    Use the terms to accumulate gradients over micro-batches: sum ∇total and count over the
    micro-batches of a mini-batch, then divide once (exact mini-batch token-mean, paper
    Eq. 8). `LossTerms.value` is the micro-batch's own loss (the official per-micro-batch
    quantity). How each metric combines over micro-batches is declared in `METRIC_REDUCTIONS`.
    The tokens are the loss's own pieces (no second computation), without gradient.
    """
    check_loss_inputs(log_probs, old_log_probs, advantages, mask, config, ref_log_probs, entropy, segment_ids,
                      num_sequences, behaviour_log_probs)
    log_probs, old_log_probs, advantages, mask = prepared_inputs(log_probs, old_log_probs, advantages, mask)
    per_token, is_clipped, tokens, pieces = _surrogate(log_probs, old_log_probs, advantages, mask, config,
                                                       segment_ids)
    per_token, metrics = _behaviour_weighted(per_token, old_log_probs, behaviour_log_probs, mask, config, segment_ids)
    metrics["ppo_kl"] = lm.masked_mean(-tokens.log_ratio, mask)
    if config.loss_mode == "fipo":
        metrics.update(_influence_metrics(pieces.weights, pieces.raw_weights, mask, config))
    metrics["pg_clipfrac"] = lm.masked_fraction(is_clipped, mask)
    metrics["pg_clipfrac_lower"] = lm.masked_fraction(tokens.dual_clipped, mask)
    metrics.update(_count_metrics(mask, tokens.loss_mask, segment_ids))
    if config.loss_mode == "fipo":
        metrics.update(_activity_metrics(pieces, mask, tokens.loss_mask))
    aggregation = config.aggregation
    assert aggregation is not None  # PolicyLossConfig.__post_init__ resolves it
    agg = lambda x: aggregate(x, tokens.loss_mask, aggregation, config.aggregation_horizon,  # noqa: E731
                              segment_ids, num_sequences)
    terms = agg(per_token)
    metrics["pg_loss"] = jax.lax.stop_gradient(terms.value)
    metrics["loss_count"] = jax.lax.stop_gradient(terms.count)
    terms, extra = _regularised(per_token, terms, log_probs, mask, agg, config, ref_log_probs, entropy)
    metrics.update(extra)
    metrics.update(lm.ratio_statistics(tokens.ratio, advantages, mask, config.clip_ratio_c, ratio_quantiles))
    return LossParts(terms, metrics, tokens)


def token_diagnostics(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array, mask: jax.Array,
                      config: PolicyLossConfig, segment_ids: jax.Array | None = None) -> TokenDiagnostics:
    """What `policy_loss` does to each token: its own per-token pieces (see `TokenDiagnostics`).

        diag = token_diagnostics(log_probs, old_log_probs, advantages, mask, config)
        diag.weights[b, t]      # the influence weight FIPO multiplies token t's advantage by

    Takes `policy_loss`'s arguments and checks them the same way; every field is the loss's own piece,
    not a re-implementation, so a view shows what the update used. ``dropped_rows`` marks packed rows
    every response of which was dropped (``mask & ~loss_mask`` shows each dropped sequence). The
    regularisers (KL, entropy) change no token's pieces and are left out; nothing carries a gradient.
    """
    config = config.replace(kl_coef=0.0, entropy_coeff=0.0)
    return policy_loss_parts(log_probs, old_log_probs, advantages, mask, config, segment_ids=segment_ids,
                             ratio_quantiles=False).tokens


def policy_loss_terms(
    log_probs: jax.Array,
    old_log_probs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    config: PolicyLossConfig,
    *,
    ref_log_probs: jax.Array | None = None,
    entropy: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    num_sequences=None,
    behaviour_log_probs: jax.Array | None = None,
    ratio_quantiles: bool = True,
) -> tuple[LossTerms, dict[str, jax.Array]]:
    """(`LossTerms`, metrics) of `policy_loss_parts`: the loss as additive terms (see there)."""
    parts = policy_loss_parts(log_probs, old_log_probs, advantages, mask, config, ref_log_probs=ref_log_probs,
                              entropy=entropy, segment_ids=segment_ids, num_sequences=num_sequences,
                              behaviour_log_probs=behaviour_log_probs, ratio_quantiles=ratio_quantiles)
    return parts.terms, parts.metrics


def policy_loss(
    log_probs: jax.Array,
    old_log_probs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    config: PolicyLossConfig,
    *,
    ref_log_probs: jax.Array | None = None,
    entropy: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    num_sequences=None,
    behaviour_log_probs: jax.Array | None = None,
    ratio_quantiles: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """FIPO / DAPO / GRPO policy loss of one batch (see the module docstring).

    Args:
      log_probs: ``[B, T]`` log π_θ of the sampled tokens (gradient flows through these).
      old_log_probs: ``[B, T]`` log π_old (rollout policy, recomputed by the trainer).
      advantages: ``[B, T]`` or ``[B]`` advantages (e.g. `grpo_advantages`).
      mask: ``[B, T]`` response mask, bool or 0/1 (right padding; empty rows allowed).
      config: `PolicyLossConfig`.
      ref_log_probs: ``[B, T]`` log π_ref, for a KL penalty (``config.kl_coef``).
      entropy: ``[B, T]`` per-token entropy, for an entropy bonus (``config.entropy_coeff``).
      segment_ids: ``[B, T]`` ints for packed rows (several sequences per row; a new sequence
        starts wherever the id changes; see `fipo_jax.core.packing`): Future-KL, the drop rule and the
        sequence aggregations work per segment. Advantages must then be ``[B, T]``.
      num_sequences: scalar, the sequences the "seq-mean-token-sum*" aggregations divide by
        (default: rows, or with ``segment_ids`` the segments holding response tokens).
      behaviour_log_probs: ``[B, T]`` log π_behav, what the sampler drew each token with, when that
        is not ``old_log_probs`` (stale weights, another engine): with
        ``config.behaviour_weight_cap`` each token's loss is weighted by min(π_old / π_behav, C)
        (`fipo_jax.core.behaviour`); ratios, clips and Future-KL stay on π_θ / π_old.
      ratio_quantiles: also report the IS-ratio quantiles (two sorts of B·T values): a metrics
        switch, no part of the loss.

    Returns:
      ``(loss, metrics)``: a float32 scalar and a dict of scalar metrics with the official
      names (``pg_clipfrac``, ``ppo_kl``, ``pg_clipfrac_lower``, influence-weight and
      IS-ratio statistics, ``dropped_sequences``, ...). An empty mask gives loss 0 and a
      zero gradient.

    Examples:
      >>> import jax.numpy as jnp
      >>> lp = jnp.log(jnp.array([[0.5, 0.5]]))
      >>> loss, m = policy_loss(lp, lp, jnp.array([1.0]), jnp.ones((1, 2)), PolicyLossConfig())
      >>> float(loss)
      -1.0
    """
    terms, metrics = policy_loss_terms(log_probs, old_log_probs, advantages, mask, config, ref_log_probs=ref_log_probs,
                                       entropy=entropy, segment_ids=segment_ids, num_sequences=num_sequences,
                                       behaviour_log_probs=behaviour_log_probs, ratio_quantiles=ratio_quantiles)
    return terms.value, metrics


def _activity_metrics(pieces: Influence, mask, loss_mask) -> dict[str, jax.Array]:
    """How much FIPO acts: loss tokens whose weight moved off 1, filtered and safety-clamped tokens."""
    active = jnp.abs(pieces.weights - 1.0) > ACTIVE_WEIGHT_TOLERANCE
    return {"influence_active_tokens": jnp.sum(active & loss_mask).astype(jnp.float32),
            "filtered_tokens": jnp.sum(mask & ~pieces.summed).astype(jnp.float32),
            "safety_clamped_tokens": jnp.sum(pieces.safety_clamped).astype(jnp.float32)}


def _influence_metrics(weights, raw, mask, config) -> dict[str, jax.Array]:
    """Official influence-weight monitoring (masked over response tokens)."""
    lo, hi = config.influence_bounds
    upper = lm.masked_fraction(weights >= hi - _BOUND_TOLERANCE, mask)
    lower = lm.masked_fraction(weights <= lo + _BOUND_TOLERANCE, mask)
    return {
        "influence_weights_mean": lm.masked_mean(weights, mask),
        "influence_weights_min": lm.masked_min(weights, mask),
        "influence_weights_max": lm.masked_max(weights, mask),
        "clip_frac_upper": upper,
        "clip_frac_lower": lower,
        "total_clip_frac": upper + lower,
        "influence_weights_mean_raw": lm.masked_mean(raw, mask),
        "raw_influence_weights_min": lm.masked_min(raw, mask),
        "raw_influence_weights_max": lm.masked_max(raw, mask),
    }
