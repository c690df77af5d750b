"""Supervised warm start on generated demonstrations, cached on disk.

The CPU experiment starts RL from a small policy that can already solve the synthetic
task both ways (direct answers and step-by-step chains), as the paper starts from a base
model that can reason. Loss: mean next-token cross-entropy over response tokens (and EOS).

The cache is a flat ``.npz`` written atomically (`save_params`). `load_params` checks it fully
before touching the model (a readable archive, every parameter present with the model's shape,
every value finite) and raises `SFTCacheError` naming the file otherwise; `load_cached_params`
turns that into a warning, moves the bad file aside (``<path>.corrupt``, so nothing is lost) and
returns False so the caller retrains and rewrites the cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
import zipfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import fipo_jax._requires.train  # noqa: F401  one-line ImportError without fipo_jax[train]

# isort: split
import optax
from flax import nnx

from fipo_jax.generation.logprobs import sequence_log_probs
from fipo_jax.models.weights import _path_name, flat_params, params_digest  # noqa: F401  (sft.params_digest is public)


def demonstration_batch(pairs: list[tuple[str, str]], tokenizer, length: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def save_params(model, path: str) -> None:
    """Parameters as a flat .npz (names are '/'-joined nnx paths), written atomically."""
    flat = flat_params(model)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"  # unique: several processes may write the same cache
    np.savez(tmp, **flat)  # type: ignore[arg-type]  # numpy's stub fears a key named allow_pickle
    os.replace(tmp, path)


class SFTCacheError(ValueError):
    """The SFT cache file cannot be used (unreadable, truncated, or not this model's parameters).

    ``str(err)`` is one line: "SFT cache <path> <problem>; delete it to retrain the warm start".
    """

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"SFT cache {path} {problem}; delete it to retrain the warm start")

    def __reduce__(self):
        return type(self), (self.path, self.problem)


def _read_cache(path: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path`` (each read in full, so a damaged member fails here)."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
        if not head:
            raise SFTCacheError(path, "is empty")
        if head == b"\x93NUMPY":
            raise SFTCacheError(path, "is a bare .npy array, not an .npz archive")
        if not zipfile.is_zipfile(path):
            raise SFTCacheError(path, "is not a complete .npz archive (truncated or overwritten)")
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except SFTCacheError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise SFTCacheError(path, f"is unreadable ({type(err).__name__}: {err})") from None


def load_params(model, path: str) -> None:
    """Inverse of `save_params`: fill `model`'s parameters in place, after checking the whole file.

    Raises `SFTCacheError` naming ``path`` when the file is unreadable, lacks a parameter, has a
    parameter of another shape, or holds a non-finite value; the model is then left unchanged.
    """
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    data = _read_cache(path)
    values = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
        name = _path_name(key_path)
        if name not in data:
            raise SFTCacheError(path, f"lacks parameter {name!r} (the model changed)")
        if data[name].shape != leaf.shape:
            raise SFTCacheError(path, f"has parameter {name!r} of shape {data[name].shape}, the model expects "
                                      f"{leaf.shape}")
        if not np.all(np.isfinite(data[name])):
            raise SFTCacheError(path, f"has non-finite values in parameter {name!r}")
        values.append(jnp.asarray(data[name], leaf.dtype))
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(pure), values))
    nnx.update(model, state)


def load_cached_params(model, path: str, warn: Callable[[str], None] | None = None) -> bool:
    """`load_params` when ``path`` holds a usable cache: True if loaded, False if the caller must retrain.

    A missing file gives False. An unusable one (see `load_params`) is reported through ``warn``
    (default `warnings.warn`), naming the file and why, and moved to ``<path>.corrupt`` (replacing
    an older one) so the retrained cache can take its place; the model is left unchanged.
    """
    if not os.path.exists(path):
        return False
    try:
        load_params(model, path)
        return True
    except SFTCacheError as err:
        aside = f"{path}.corrupt"
        try:
            os.replace(path, aside)
            where = f"moved it to {aside}"
        except FileNotFoundError:  # another process moved it first
            where = "another process moved it aside"
        message = f"SFT cache {path} {err.problem}: {where}; retraining the warm start"
        (warn or (lambda text: warnings.warn(text, RuntimeWarning, stacklevel=3)))(message)
        return False


# ------------------------------------------------------------------ warm starts shipped with the package

WARM_STARTS = os.path.join(os.path.dirname(__file__), "warm_starts")  # the files and manifest.json


@dataclasses.dataclass(frozen=True)
class PackagedWarmStart:
    """A warm start shipped in `WARM_STARTS`, listed in its manifest under its recipe's key."""

    path: str
    sha256: str  # `params_digest` of its parameters
    made_by: str  # the command that trained it

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


class PackagedWarmStartError(ValueError):
    """The packaged warm start is not what its manifest says (a damaged or altered install)."""


def packaged_warm_start(key: str, directory: str = WARM_STARTS) -> PackagedWarmStart | None:
    """The packaged warm start made for the recipe ``key`` (`build.warm_start_key`), or None."""
    manifest = os.path.join(directory, "manifest.json")
    if not os.path.exists(manifest):
        return None
    with open(manifest, encoding="utf-8") as f:
        entry = json.load(f).get(key)
    if entry is None:
        return None
    return PackagedWarmStart(os.path.join(directory, entry["file"]), entry["sha256"], entry["made_by"])


def load_packaged(model, packaged: PackagedWarmStart) -> None:
    """`load_params` from a packaged warm start, then its digest checked against the manifest's.

    Raises `PackagedWarmStartError` (one line) when the file is unreadable or its weights differ."""
    fix = "reinstall fipo_jax, or set sft.packaged=false to train the warm start here"
    try:
        load_params(model, packaged.path)
    except SFTCacheError as err:
        raise PackagedWarmStartError(f"the packaged warm start {packaged.path} {err.problem}; {fix}") from None
    digest = params_digest(model)
    if digest != packaged.sha256:
        raise PackagedWarmStartError(f"the packaged warm start {packaged.path} has parameters sha256 {digest}, its "
                                     f"manifest says {packaged.sha256}; {fix}")


def sft_step(graphdef, rest, tx):
    """The jitted warm-start step `(params, opt_state, ids, attention, loss_mask) → (params, opt_state, loss)`.

    loss = −Σ_t m_t log π(y_t | y_<t) / max(Σ_t m_t, 1): mean next-token cross-entropy over the masked tokens.
    """
    def loss_fn(p, ids, attention, loss_mask):
        lp = sequence_log_probs(nnx.merge(graphdef, p, rest), ids, attention, response_start=1)
        return -jnp.sum(jnp.where(loss_mask, lp, 0.0)) / jnp.maximum(jnp.sum(loss_mask), 1)

    @jax.jit
    def step(p, o, ids, attention, loss_mask):
        loss, grads = jax.value_and_grad(loss_fn)(p, ids, attention, loss_mask)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    return step


def train_sft(model, make_pairs, tokenizer, *, steps: int, batch_size: int, lr: float, length: int, seed: int,
              progress=None) -> list[float]:
    """AdamW on next-token cross-entropy of demonstrations; updates `model` in place.

    `make_pairs(rng, n)` returns n (prompt, response) text pairs. Returns the loss curve.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]  # flax annotates a variadic tuple
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(steps, 2), lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = tx.init(params)
    step = sft_step(graphdef, rest, tx)
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
