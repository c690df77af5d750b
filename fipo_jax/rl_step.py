"""The jitted pieces of one RL step, as pure functions of (params, batch).

* `log_prob_pass`: teacher-forced log-probs (and entropy) of the responses, no gradient —
  the trainer's recomputation of π_old with the same numerics as the update.
* `update_mini_batch`: one optimizer update on a mini-batch, its gradient accumulated over
  micro-batches as (Σ ∇total, Σ count) so the loss is the exact mini-batch token-mean
  (or the official per-micro-batch weighting); global-norm clip; AdamW; an update whose
  gradient is not finite is skipped and counted.

Batch layout (rows = sequences): ``input_ids`` [B, P+N] = left-padded prompt ‖ response,
``attention_mask`` [B, P+N], ``response_mask`` [B, N], ``old_log_probs`` [B, N],
``advantages`` [B]. P is static per call (a sampler bucket), N = max response tokens.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fipo_jax.logprobs import sequence_log_probs
from fipo_jax.losses import LossTerms, PolicyLossConfig, policy_loss_terms, weight_micro_batch


class UpdateResult(NamedTuple):
    params: Any
    opt_state: Any
    metrics: dict[str, jax.Array]


def make_optimizer(lr: float, b1: float, b2: float, eps: float, weight_decay: float, grad_clip: float):
    """Global-norm clip then AdamW; the learning rate is a hyperparameter set every step."""

    def build(learning_rate):
        return optax.chain(
            optax.clip_by_global_norm(grad_clip),
            optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
        )

    return optax.inject_hyperparams(build)(learning_rate=lr)


def _merge(graphdef, params, rest):
    return nnx.merge(graphdef, params, rest)


def response_log_probs(graphdef, params, rest, input_ids, attention_mask, response_len: int, chunk_size: int,
                       return_entropy: bool = False):
    """log π(response token | prefix) for the last `response_len` columns, [B, N]."""
    model = _merge(graphdef, params, rest)
    start = input_ids.shape[1] - response_len
    return sequence_log_probs(model, input_ids, attention_mask, response_start=start, chunk_size=chunk_size,
                              return_entropy=return_entropy)


def log_prob_pass(graphdef, params, rest, input_ids, attention_mask, response_len: int, chunk_size: int,
                  rows_per_chunk: int):
    """Old log-probs and entropy for all rows, `rows_per_chunk` rows at a time (bounded memory)."""
    params = jax.lax.stop_gradient(params)
    n_rows = input_ids.shape[0]
    n_chunks = n_rows // rows_per_chunk
    ids = input_ids.reshape(n_chunks, rows_per_chunk, -1)
    mask = attention_mask.reshape(n_chunks, rows_per_chunk, -1)
    lp, ent = jax.lax.map(
        lambda xs: response_log_probs(graphdef, params, rest, xs[0], xs[1], response_len, chunk_size, True), (ids, mask))
    return lp.reshape(n_rows, response_len), ent.reshape(n_rows, response_len)


COUNT_METRICS = ("dropped_sequences", "loss_tokens", "response_tokens")


def reduce_metrics(stacked: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Combine per-micro-batch metrics [M] into one value per key.

    Counts are summed; "*_min" / "*_max" take the extreme over micro-batches that hold
    response tokens; everything else (masked means over response tokens) is averaged with
    the micro-batches' response-token counts as weights, so empty (padded) micro-batches
    do not pull the means toward 0.
    """
    tokens = stacked["response_tokens"]
    has_tokens = tokens > 0
    out = {}
    for key, values in stacked.items():
        if key in COUNT_METRICS:
            out[key] = jnp.sum(values)
        elif key.endswith("_min"):
            out[key] = jnp.where(jnp.any(has_tokens), jnp.min(jnp.where(has_tokens, values, jnp.inf)), 0.0)
        elif key.endswith("_max"):
            out[key] = jnp.where(jnp.any(has_tokens), jnp.max(jnp.where(has_tokens, values, -jnp.inf)), 0.0)
        else:
            out[key] = jnp.sum(values * tokens) / jnp.maximum(jnp.sum(tokens), 1.0)
    return out


def update_mini_batch(graphdef, params, rest, opt_state, batch: dict[str, jax.Array], learning_rate,
                      tx, loss_config: PolicyLossConfig, micro_batch_size: int, weighting: str, chunk_size: int):
    """One optimizer update from one mini-batch (see the module docstring)."""
    rows = batch["input_ids"].shape[0]
    n_micro = max(1, rows // micro_batch_size)
    per_micro = rows // n_micro
    response_len = batch["response_mask"].shape[1]
    micro = jax.tree.map(lambda x: x.reshape((n_micro, per_micro) + x.shape[1:]), batch)

    def objective(p, mb):
        lp = response_log_probs(graphdef, p, rest, mb["input_ids"], mb["attention_mask"], response_len, chunk_size)
        terms, metrics = policy_loss_terms(lp, mb["old_log_probs"], mb["advantages"], mb["response_mask"], loss_config)
        terms = weight_micro_batch(terms, weighting, per_micro, rows)
        return terms.total, (terms, metrics)

    grad_fn = jax.grad(objective, has_aux=True)

    def accumulate(carry, mb):
        grads_acc, count_acc, total_acc = carry
        grads, (terms, metrics) = grad_fn(params, mb)
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        return (grads_acc, count_acc + terms.count, total_acc + terms.total), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, count, total), stacked = jax.lax.scan(accumulate, (zeros, jnp.float32(0), jnp.float32(0)), micro)
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1e-12), grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm)

    opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    params = jax.tree.map(keep, new_params, params)
    opt_state = jax.tree.map(keep, new_opt_state, opt_state)

    metrics = reduce_metrics(stacked)
    metrics["loss"] = LossTerms(total, count).value
    metrics["grad_norm"] = grad_norm
    metrics["skipped_update"] = (~finite).astype(jnp.float32)
    metrics["lr"] = jnp.asarray(learning_rate, jnp.float32)
    return UpdateResult(params, opt_state, metrics)


def jit_update(tx, loss_config: PolicyLossConfig, micro_batch_size: int, weighting: str, chunk_size: int,
               out_shardings=None):
    """`update_mini_batch` jitted with params and optimizer state donated.

    `out_shardings`: optional (params, opt_state, metrics) shardings, so that updated
    parameters keep their mesh placement."""

    def fn(graphdef, params, rest, opt_state, batch, learning_rate):
        result = update_mini_batch(graphdef, params, rest, opt_state, batch, learning_rate, tx, loss_config,
                                   micro_batch_size, weighting, chunk_size)
        return tuple(result)

    kwargs = {} if out_shardings is None else {"out_shardings": out_shardings}
    jitted = jax.jit(fn, static_argnums=(0,), donate_argnums=(1, 3), **kwargs)
    return lambda *args: UpdateResult(*jitted(*args))


def jit_log_prob_pass(chunk_size: int, rows_per_chunk: int):
    def fn(graphdef, params, rest, input_ids, attention_mask, response_len):
        return log_prob_pass(graphdef, params, rest, input_ids, attention_mask, response_len, chunk_size,
                             rows_per_chunk)

    return jax.jit(fn, static_argnums=(0, 5))
