"""FIPO (and the official DAPO loss) as Tunix policy losses.

Tunix (``pip install google-tunix``, tested with 0.1.7) picks its GRPO learner's loss by name from
``tunix.rl.function_registry`` (``GRPOConfig.policy_loss_fn``) and calls it as
``fn(model, train_example, algo_config, pad_id, eos_id) -> (loss, aux)``. `register` puts
`fipo_jax.policy_loss` there::

    from fipo_jax.integrations import tunix as fipo_tunix
    fipo_tunix.register("fipo")                              # policy_loss_fn="fipo"
    algo = fipo_tunix.grpo_config(num_generations=8, num_iterations=2)
    learner = GRPOLearner(rl_cluster=cluster, reward_fns=reward, algo_config=algo)
    fipo_tunix.log_metrics(learner)                          # FIPO's metrics in Tunix's logger

The registered function computes the per-token log-probs with Tunix's own helper (as Tunix's
``grpo`` loss: ``common.compute_per_token_logps``, logits divided by the rollout temperature),
takes π_old from ``train_example.old_per_token_logps`` (Tunix fills it when
``num_iterations > 1``, from the rollout model before the step's first update; absent, the current
log-probs stop-gradiented, as Tunix does), uses the completion mask as the loss mask and reads the
`PolicyLossConfig` from the algorithm config (`loss_config_from_tunix`).

Importing this module needs only fipo_jax's core; Tunix is imported by `register`.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fipo_jax.core import _checks
from fipo_jax.core.losses import METRIC_REDUCTIONS, PolicyLossConfig, kl_penalty, policy_loss

INSTALL_HINT = "fipo_jax.integrations.tunix needs Tunix: pip install google-tunix"

# Tunix's `loss_agg_mode` -> (our aggregation, whether S is Tunix's count of non-empty rows). Tunix's
# "sequence-mean-token-sum-norm" without a norm divides by the non-empty rows (not by S·L as Dr.
# GRPO's does); its "sequence-mean-token-scale" divides each row by T, then by the non-empty rows.
TUNIX_AGGREGATIONS: Mapping[str, tuple[str, bool]] = types.MappingProxyType({
    "token-mean": ("token-mean", False),
    "sequence-mean-token-mean": ("seq-mean-token-mean", False),
    "seq-mean-token-sum": ("seq-mean-token-sum", True),
    "sequence-mean-token-sum-norm": ("seq-mean-token-sum", True),
    "sequence-mean-token-scale": ("seq-mean-token-sum-norm", True),
})
# Tunix's `kl_loss_mode` -> our `kl_estimator`.
TUNIX_KL_ESTIMATORS: Mapping[str, str] = types.MappingProxyType({"kl": "k1", "mse_kl": "k2", "low_var_kl": "k3"})
# Algorithm-config attribute -> `PolicyLossConfig` field, read when the attribute is present and not None.
TUNIX_CONFIG_FIELDS: Mapping[str, str] = types.MappingProxyType({
    "epsilon": "clip_ratio_low",
    "epsilon_high": "clip_ratio_high",
    "epsilon_c": "clip_ratio_c",
    "fipo_decay_rate": "decay_rate",
    "fipo_influence_clip": "influence_clip",
    "fipo_influence_clip_high_only": "influence_clip_high_only",
    "fipo_safety_threshold": "safety_threshold",
    "fipo_future_kl_filter": "future_kl_filter",
})
# Metrics `log_metrics` adds to Tunix's logger by default (besides Tunix's own "kl", "pg_clipfrac").
FIPO_LOGGED_METRICS = (
    "influence_weights_mean", "influence_weights_min", "influence_weights_max", "influence_weights_mean_raw",
    "influence_active_tokens", "filtered_tokens", "safety_clamped_tokens", "dropped_sequences",
    "clip_frac_upper", "clip_frac_lower", "ppo_kl", "pg_clipfrac_lower", "pg_loss", "entropy",
)
DAPO_LOGGED_METRICS = ("dropped_sequences", "ppo_kl", "pg_clipfrac_lower", "pg_loss", "entropy")
_REDUCTION_OPS: dict[str, Callable[..., Any]] = {"sum": np.sum, "min": np.min, "max": np.max, "mean": np.mean,
                                                  "loss_mean": np.mean}
# name -> loss mode of the losses `register` put into Tunix's registry (for `log_metrics`).
_REGISTERED: dict[str, str] = {}


def _import_tunix() -> types.SimpleNamespace:
    """Tunix's registry and loss helpers, or a one-line ImportError naming the package."""
    try:
        from tunix.rl import algo_core, common, function_registry
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from None
    return types.SimpleNamespace(algo_core=algo_core, common=common, function_registry=function_registry)


def aggregation_from_tunix(loss_agg_mode: str) -> tuple[str, bool]:
    """(our aggregation, count non-empty rows) for Tunix's ``loss_agg_mode`` (`TUNIX_AGGREGATIONS`).

    >>> aggregation_from_tunix("sequence-mean-token-mean")
    ('seq-mean-token-mean', False)
    """
    if loss_agg_mode not in TUNIX_AGGREGATIONS:
        raise ValueError(f"Tunix loss_agg_mode {loss_agg_mode!r} has no fipo_jax aggregation; "
                         f"supported: {sorted(TUNIX_AGGREGATIONS)}")
    return TUNIX_AGGREGATIONS[loss_agg_mode]


def kl_estimator_from_tunix(kl_loss_mode: str) -> str:
    """Our ``kl_estimator`` for Tunix's ``kl_loss_mode``: kl → k1, mse_kl → k2, low_var_kl → k3.

    >>> kl_estimator_from_tunix("low_var_kl")
    'k3'
    """
    if kl_loss_mode not in TUNIX_KL_ESTIMATORS:
        raise ValueError(f"Tunix kl_loss_mode {kl_loss_mode!r} has no fipo_jax KL estimator; "
                         f"supported: {sorted(TUNIX_KL_ESTIMATORS)}")
    return TUNIX_KL_ESTIMATORS[kl_loss_mode]


def kl_coef_from_tunix(beta: Any) -> float:
    """Our ``kl_coef`` for Tunix's ``beta`` (None → 0); anything but a finite number ≥ 0 is refused
    in one line naming the field (``float('x')`` would say only "could not convert string").

    >>> kl_coef_from_tunix(None), kl_coef_from_tunix(0.04)
    (0.0, 0.04)
    """
    _checks.check_number("Tunix algo_config.beta (the KL coefficient)", beta, minimum=0, allow_none=True)
    return float(beta or 0.0)


def loss_config_from_tunix(algo_config: Any, base: PolicyLossConfig | None = None) -> PolicyLossConfig:
    """The `PolicyLossConfig` a Tunix algorithm config asks for.

    Starts from ``base`` (default: `PolicyLossConfig.fipo_32b`) and overrides each field whose
    attribute (`TUNIX_CONFIG_FIELDS`: ``epsilon``, ``epsilon_high``, ``epsilon_c``,
    ``fipo_decay_rate``, …) the config has and is not None; ``loss_agg_mode`` sets the aggregation,
    ``beta`` the KL coefficient (None → 0) and ``kl_loss_mode`` its estimator.

    >>> import types
    >>> algo = types.SimpleNamespace(epsilon=0.2, loss_agg_mode="token-mean", beta=0.0, fipo_decay_rate=16.0)
    >>> config = loss_config_from_tunix(algo)
    >>> config.loss_mode, config.decay_rate, config.clip_ratio_high, config.aggregation
    ('fipo', 16.0, 0.28, 'token-mean')
    """
    base = PolicyLossConfig.fipo_32b() if base is None else base
    changes = {ours: getattr(algo_config, theirs) for theirs, ours in TUNIX_CONFIG_FIELDS.items()
               if getattr(algo_config, theirs, None) is not None}
    if getattr(algo_config, "loss_agg_mode", None) is not None:
        changes["aggregation"] = aggregation_from_tunix(algo_config.loss_agg_mode)[0]
    if hasattr(algo_config, "beta"):
        changes["kl_coef"] = kl_coef_from_tunix(algo_config.beta)
    if getattr(algo_config, "kl_loss_mode", None) is not None:
        changes["kl_estimator"] = kl_estimator_from_tunix(algo_config.kl_loss_mode)
    return base.replace(**changes)


def token_log_probs(model, train_example, algo_config, pad_id: int, eos_id: int) -> tuple[jax.Array, jax.Array]:
    """(log π_θ of the completion tokens [B, T] float32, logits [B, T, V]), as Tunix's ``grpo`` loss.

    Tunix's own helper (``common.compute_per_token_logps``, gradient kept), logits divided by
    ``algo_config.temperature`` (the rollout temperature the learner sets; 1 if absent).
    """
    from flax import nnx  # Tunix's models are nnx modules (Tunix depends on flax)

    tunix = _import_tunix()
    graphdef, state = nnx.split(model)
    log_probs, logits = tunix.common.compute_per_token_logps(
        graphdef, state, prompt_tokens=train_example.prompt_ids, completion_tokens=train_example.completion_ids,
        pad_id=pad_id, eos_id=eos_id, stop_gradient=False, return_logits=True,
        temperature=getattr(algo_config, "temperature", 1.0))
    return log_probs.astype(jnp.float32), logits


def old_token_log_probs(train_example, log_probs: jax.Array) -> jax.Array:
    """log π_old [B, T]: ``train_example.old_per_token_logps``, or ``sg(log_probs)`` when absent
    (Tunix leaves it None when ``num_iterations == 1``: every update is then on-policy)."""
    old = getattr(train_example, "old_per_token_logps", None)
    if old is None:
        return jax.lax.stop_gradient(log_probs)
    return jnp.asarray(old, jnp.float32)


def tunix_loss(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array, completion_mask: jax.Array,
               config: PolicyLossConfig, loss_agg_mode: str = "token-mean", *, ref_log_probs: jax.Array | None = None,
               entropy: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, aux) of `policy_loss` on arrays, in Tunix's terms; the registered losses' core.

    ``completion_mask`` is the loss mask (bool or numeric, non-zero = a token; a concrete float mask
    holding NaN / ±inf is refused, as `policy_loss` refuses it: NaN is non-zero, so it would count
    as a token); ``loss_agg_mode`` (Tunix's name) counts sequences as
    Tunix does (`TUNIX_AGGREGATIONS`). aux holds every metric of `policy_loss` under its own name
    (Tunix's ``grpo`` loss uses the same names for the shared ones: ``pg_clipfrac``, ``ppo_kl``,
    ``pg_clipfrac_lower``, ``pg_loss``, ``entropy``) plus Tunix's ``kl``: the token-mean KL to the
    reference (0 without one).
    """
    aggregation, count_rows = aggregation_from_tunix(loss_agg_mode)
    config = config.replace(aggregation=aggregation)
    _checks.check_mask("train_example.completion_mask", completion_mask, "log_probs [B, T]", log_probs)
    mask = jnp.asarray(completion_mask) != 0
    rows = jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.float32) if count_rows else None
    loss, metrics = policy_loss(log_probs, old_log_probs, advantages, mask, config, ref_log_probs=ref_log_probs,
                                entropy=entropy, num_sequences=rows)
    aux = dict(metrics)
    aux["kl"] = jnp.float32(0.0)
    if ref_log_probs is not None:
        kl = kl_penalty(log_probs, ref_log_probs.astype(jnp.float32), config.kl_estimator)
        aux["kl"] = jax.lax.stop_gradient(jnp.sum(jnp.where(mask, kl, 0.0)) / jnp.maximum(jnp.sum(mask), 1))
    return loss, aux


def _warn_temperature_mismatch(train_example, algo_config) -> None:
    """Warns (once per trace) when π_old and π_θ come at different temperatures: Tunix's vanilla rollout
    computes ``old_per_token_logps`` from unscaled logits, while the loss (as Tunix's ``grpo``) divides
    by the rollout temperature; the ratio then differs from 1 before any update, and FIPO's Future-KL
    sums that difference along the response."""
    temperature = getattr(algo_config, "temperature", 1.0)
    if getattr(train_example, "old_per_token_logps", None) is not None and temperature not in (0.0, 1.0):
        warnings.warn(f"Tunix's old log-probs (vanilla rollout) are at temperature 1 but the loss uses the rollout "
                      f"temperature {temperature}: importance ratios and FIPO's Future-KL are off 1 before any "
                      f"update; sample at temperature 1.0 with num_iterations > 1", stacklevel=3)


def _check_supported(train_example) -> None:
    """Refuses train-example fields this integration does not handle yet (rather than ignoring them)."""
    for field in ("segment_ids", "sampler_is_weights"):
        if getattr(train_example, field, None) is not None:
            raise NotImplementedError(f"fipo_jax's Tunix loss does not support train_example.{field} yet "
                                      f"(sequence packing / sampler importance weights)")


def make_policy_loss_fn(base: PolicyLossConfig) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """A Tunix policy-loss function ``fn(model, train_example, algo_config, pad_id, eos_id)`` computing
    `policy_loss` with `loss_config_from_tunix(algo_config, base)`."""

    def fipo_jax_policy_loss_fn(model, train_example, algo_config, pad_id, eos_id, **kwargs):
        """fipo_jax's policy loss on a Tunix ``TrainExample`` (see `fipo_jax.integrations.tunix`)."""
        del kwargs
        _check_supported(train_example)
        _warn_temperature_mismatch(train_example, algo_config)
        config = loss_config_from_tunix(algo_config, base)
        log_probs, logits = token_log_probs(model, train_example, algo_config, pad_id, eos_id)
        entropy = jax.lax.stop_gradient(_import_tunix().algo_core.compute_entropy_from_logits(logits))
        ref = getattr(train_example, "ref_per_token_logps", None)
        return tunix_loss(log_probs, old_token_log_probs(train_example, log_probs),
                          jnp.asarray(train_example.advantages, jnp.float32), train_example.completion_mask, config,
                          getattr(algo_config, "loss_agg_mode", None) or "token-mean", ref_log_probs=ref,
                          entropy=entropy)

    return fipo_jax_policy_loss_fn


def register(name: str = "fipo", config: PolicyLossConfig | None = None, loss: str = "fipo") -> Callable:
    """Registers fipo_jax's ``loss`` ("fipo" or "dapo") as Tunix policy loss ``name``; returns the function.

    Select it with ``GRPOConfig(policy_loss_fn=name)``. ``config`` is the starting point the
    algorithm config's attributes override (`loss_config_from_tunix`); default: the 32B recipe
    (`PolicyLossConfig.fipo_32b`) for "fipo", `PolicyLossConfig.dapo` for "dapo". Raises a
    one-line ImportError naming ``pip install google-tunix`` when Tunix is missing.
    """
    tunix = _import_tunix()
    if config is None:
        if loss not in ("fipo", "dapo"):
            raise ValueError(f"loss must be 'fipo' or 'dapo', got {loss!r}")
        config = PolicyLossConfig.fipo_32b() if loss == "fipo" else PolicyLossConfig.dapo()
    fn = make_policy_loss_fn(config)
    tunix.function_registry.register_policy_loss_fn(name)(fn)
    _REGISTERED[name] = config.loss_mode
    return fn


def register_dapo(name: str = "dapo_official", config: PolicyLossConfig | None = None) -> Callable:
    """Registers the official DAPO loss (clip-higher, dual clip, token-mean) as Tunix policy loss ``name``."""
    return register(name, config if config is not None else PolicyLossConfig.dapo(), loss="dapo")


def logged_metrics(loss_mode: str = "fipo", names: tuple[str, ...] | None = None) -> dict[str, Callable]:
    """{aux metric: how Tunix combines its values within a step} for `log_metrics`: counts summed,
    extremes min / max, the rest averaged (`fipo_jax.METRIC_REDUCTIONS`).

    >>> sorted(logged_metrics("dapo"))
    ['dropped_sequences', 'entropy', 'pg_clipfrac_lower', 'pg_loss', 'ppo_kl']
    """
    if names is None:
        names = FIPO_LOGGED_METRICS if loss_mode == "fipo" else DAPO_LOGGED_METRICS
    return {name: _REDUCTION_OPS[METRIC_REDUCTIONS.get(name, "mean")] for name in names}


def log_metrics(learner, names: tuple[str, ...] | None = None) -> dict[str, Callable]:
    """Adds fipo_jax's metrics to what a Tunix learner logs (``actor`` prefix, with ``loss``, ``kl``, …).

    Tunix logs only the aux keys its learner lists (``kl``, ``pg_clipfrac`` for GRPO); call this
    after building the learner. ``names`` defaults to `FIPO_LOGGED_METRICS` (DAPO's subset when
    the learner's ``policy_loss_fn`` is a registered DAPO loss). Returns the new table.
    """
    trainer = learner.rl_cluster.actor_trainer
    policy_loss_fn = getattr(learner.algo_config, "policy_loss_fn", None)
    loss_mode = "fipo" if policy_loss_fn is None else _REGISTERED.get(policy_loss_fn, "fipo")
    table = {**trainer.rl_metrics_to_log, **logged_metrics(loss_mode, names)}
    trainer.with_rl_metrics_to_log(table)
    return table


def grpo_config(**overrides):
    """A Tunix ``GRPOConfig`` set to the FIPO 32B recipe: ``policy_loss_fn="fipo"``, token-mean,
    no KL (β = 0), ε 0.2 / ε_high 0.28, dual-clip c = 10; ``overrides`` are GRPOConfig fields, or
    the extra attributes `loss_config_from_tunix` reads (``epsilon_high``, ``epsilon_c``, ``fipo_*``)."""
    _import_tunix()
    from tunix.rl.grpo.grpo_learner import GRPOConfig

    extra_names = {"epsilon_high", "epsilon_c", *(n for n in TUNIX_CONFIG_FIELDS if n.startswith("fipo_"))}
    extra = {"epsilon_high": 0.28, "epsilon_c": 10.0,
             **{k: v for k, v in overrides.items() if k in extra_names}}
    fields = {"policy_loss_fn": "fipo", "loss_agg_mode": "token-mean", "beta": 0.0, "epsilon": 0.2,
              **{k: v for k, v in overrides.items() if k not in extra_names}}
    algo = GRPOConfig(**fields)
    for key, value in extra.items():
        setattr(algo, key, value)  # GRPOConfig has no such fields; Tunix's own grpo loss reads them with getattr
    return algo
