"""Supervised warm start on generated demonstrations, cached on disk.

The CPU experiment starts RL from a small policy that can already solve the synthetic
task both ways (direct answers and step-by-step chains), as the paper starts from a base
model that can reason. Loss: mean next-token cross-entropy over response tokens (and EOS).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fipo_jax.logprobs import sequence_log_probs


def demonstration_batch(pairs: list[tuple[str, str]], tokenizer, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[BOS] prompt response [EOS], right-padded to `length`.

    Returns:
      ``(input_ids, attention_mask, loss_mask)`` [B, length]; ``loss_mask`` marks the tokens
      to predict (response and EOS), aligned with `sequence_log_probs(..., response_start=1)`
      outputs (column j scores token j + 1).
    """
    ids = np.full((len(pairs), length), tokenizer.pad_token_id, np.int32)
    attention = np.zeros((len(pairs), length), bool)
    loss_mask = np.zeros((len(pairs), length - 1), bool)
    for row, (prompt, response) in enumerate(pairs):
        p = [tokenizer.bos_token_id] + tokenizer.encode(prompt)
        r = tokenizer.encode(response) + [tokenizer.eos_token_id]
        seq = (p + r)[:length]
        ids[row, : len(seq)] = seq
        attention[row, : len(seq)] = True
        loss_mask[row, len(p) - 1 : len(seq) - 1] = True
    return ids, attention, loss_mask


def _path_name(key_path) -> str:
    return "/".join(str(getattr(e, "key", getattr(e, "idx", e))) for e in key_path)


def save_params(model, path: str) -> None:
    """Parameters as a flat .npz (names are '/'-joined nnx paths), written atomically."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = {_path_name(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(pure)[0]}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"  # unique: several processes may write the same cache
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def load_params(model, path: str) -> None:
    """Inverse of `save_params`: fill `model`'s parameters in place."""
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    values = []
    with np.load(path) as data:
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
            name = _path_name(key_path)
            if name not in data:
                raise ValueError(f"cached parameters at {path} lack {name!r}: the model changed; delete the cache")
            if data[name].shape != leaf.shape:
                raise ValueError(f"cached parameter {name!r} has shape {data[name].shape}, model expects {leaf.shape}")
            values.append(jnp.asarray(data[name], leaf.dtype))
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(pure), values))
    nnx.update(model, state)


def train_sft(model, make_pairs, tokenizer, *, steps: int, batch_size: int, lr: float, length: int, seed: int,
              progress=None) -> list[float]:
    """AdamW on next-token cross-entropy of demonstrations; updates `model` in place.

    `make_pairs(rng, n)` returns n (prompt, response) text pairs. Returns the loss curve.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(steps, 2), lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = tx.init(params)

    def loss_fn(p, ids, attention, loss_mask):
        lp = sequence_log_probs(nnx.merge(graphdef, p, rest), ids, attention, response_start=1)
        return -jnp.sum(jnp.where(loss_mask, lp, 0.0)) / jnp.maximum(jnp.sum(loss_mask), 1)

    @jax.jit
    def step(p, o, ids, attention, loss_mask):
        loss, grads = jax.value_and_grad(loss_fn)(p, ids, attention, loss_mask)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    rng = np.random.default_rng(seed)
    losses = []
    for i in range(steps):
        batch = demonstration_batch(make_pairs(rng, batch_size), tokenizer, length)
        params, opt_state, loss = step(params, opt_state, *batch)
        if i % 25 == 0 or i == steps - 1:
            losses.append(float(loss))
            if progress is not None:
                progress(i + 1, steps, losses[-1])
    nnx.update(model, params)
    return losses
