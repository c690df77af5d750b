"""The static sampler: one batch of prompts decoded together with a preallocated KV cache.

    prompts ─► left-align + pad to a length bucket P ─► prefill (one forward over [B, P])
            ─► step 0: sample from the last prompt position's logits
            ─► while step < N and some row unfinished: decode one token per row (KV cache),
               sample, record token / mask / log-prob, update per-row finished flags

All shapes are static (B, P, N and the cache length P + N − 1), so one compilation serves every
batch with the same (B, P, config). The loop is a `lax.while_loop` that stops as soon as every
row has emitted an EOS token.

Token choice, log-probs and stop sequences: `fipo_jax.generation.sampling`.

Output layout: `tokens[b, t]` is the t-th generated token of row b; `mask[b, t]` is True up to
and including the row's first EOS or the last token of its first stop sequence (False
afterwards, where tokens hold `pad_token_id` and log-probs 0). Stop sequences are token
sequences (like vLLM's `stop`, in tokens): a row stops once its generated tokens end with one.
Their tokens are KEPT, exactly like an EOS: they were sampled by the policy, their log-probs are
real, and training on them teaches the policy to stop; `stop_lengths[b]` says how many trailing
tokens of row b form the matched stop sequence, so a caller drops them from the decoded text.
The left-padded prompt actually fed to the model is returned as well, so
`concat([prompt_ids, tokens], 1)` with mask `concat([prompt_mask, mask], 1)` and
`response_start = P` reproduces the sampler's inputs exactly.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import fipo_jax._requires.models  # noqa: F401  one-line ImportError without fipo_jax[models]

# isort: split
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding

from fipo_jax.generation.sampling import (
    SampleOutput,
    SamplingConfig,
    check_first_tokens_finite,
    check_generate_inputs,
    draw_step,
    left_align_prompts,
    request_stop_tables,
    request_uniforms,
)
from fipo_jax.models.kv_cache import init_kv_cache
from fipo_jax.parallel.sharding import constrain_rows, row_split


class _LoopState(NamedTuple):
    step: jax.Array  # next response position to fill
    cache: object
    last_token_B: jax.Array
    last_emitted_B: jax.Array
    finished_B: jax.Array
    tokens_BxN: jax.Array
    mask_BxN: jax.Array
    log_probs_BxN: jax.Array
    recent_BxL: jax.Array  # the last L generated tokens (L = longest stop sequence, 1 without)
    stop_length_B: jax.Array


def _record(state: _LoopState, cache, logits_BxV: jax.Array, key: jax.Array, stops: tuple[jax.Array, jax.Array],
            config: SamplingConfig) -> _LoopState:
    """`state` after drawing response position ``state.step`` of every unfinished row."""
    batch = logits_BxV.shape[0]
    emitting_B = ~state.finished_B
    # Row r's t-th token uses request r's uniforms: the engine (fipo_jax.generation.engine) draws the same.
    uniforms_Bx2 = None if config.greedy else request_uniforms(key, jnp.full((batch,), state.step), jnp.arange(batch))
    drawn = draw_step(logits_BxV, key, uniforms_Bx2, emitting_B, state.recent_BxL, *stops, config)
    hit_B = drawn.matched_B > 0
    return _LoopState(
        step=state.step + 1,
        cache=cache,
        last_token_B=drawn.tokens_B,
        last_emitted_B=emitting_B,
        finished_B=state.finished_B | drawn.is_eos_B | hit_B,
        tokens_BxN=state.tokens_BxN.at[:, state.step].set(drawn.tokens_B),
        mask_BxN=state.mask_BxN.at[:, state.step].set(emitting_B),
        log_probs_BxN=state.log_probs_BxN.at[:, state.step].set(drawn.log_probs_B),
        recent_BxL=drawn.recent_BxL,
        stop_length_B=jnp.where(hit_B, drawn.matched_B, state.stop_length_B),
    )


def _initial_state(batch: int, recent_width: int, config: SamplingConfig) -> _LoopState:
    """Nothing generated yet: every response column padding, no row finished."""
    max_new = config.max_new_tokens
    return _LoopState(
        step=jnp.zeros((), jnp.int32),
        cache=None,
        last_token_B=jnp.zeros((batch,), jnp.int32),
        last_emitted_B=jnp.zeros((batch,), jnp.bool_),
        finished_B=jnp.zeros((batch,), jnp.bool_),
        tokens_BxN=jnp.full((batch, max_new), config.pad_token_id, jnp.int32),
        mask_BxN=jnp.zeros((batch, max_new), jnp.bool_),
        log_probs_BxN=jnp.zeros((batch, max_new), jnp.float32),
        recent_BxL=jnp.full((batch, recent_width), -1, jnp.int32),
        stop_length_B=jnp.zeros((batch,), jnp.int32),
    )


def generate_left_padded(
    model,
    prompt_ids_BxP: jax.Array,
    prompt_mask_BxP: jax.Array,
    key: jax.Array,
    config: SamplingConfig,
    row_sharding: NamedSharding | None = None,
) -> SampleOutput:
    """The sampler on prompts that are already left-padded (traceable; `generate` jits it).

    Every row's last column must be a real token (left padding), which `generate` guarantees.
    `row_sharding` (optional) splits rows over devices: see `constrain_rows`.
    """
    batch, prompt_len = prompt_ids_BxP.shape
    prompt_mask_BxP = prompt_mask_BxP.astype(jnp.bool_)
    stop_tokens_BxQxL, stop_valid_BxQxL = request_stop_tables([config.stop_sequences] * batch)
    stops = (jnp.asarray(stop_tokens_BxQxL), jnp.asarray(stop_valid_BxQxL))
    record = functools.partial(_record, key=key, stops=stops, config=config)
    # Decode feeds at most N − 1 tokens after the prompt.
    cache = constrain_rows(init_kv_cache(model.config, batch, prompt_len + config.max_new_tokens - 1,
                                         config.cache_dtype), row_sharding)
    prefill_logits_BxV, cache = model.prefill(prompt_ids_BxP, prompt_mask_BxP, cache)
    initial = constrain_rows(_initial_state(batch, stops[0].shape[-1], config), row_sharding)
    state = record(initial, cache, prefill_logits_BxV)

    def keep_going(state: _LoopState):
        return (state.step < config.max_new_tokens) & ~jnp.all(state.finished_B)

    def decode_one(state: _LoopState) -> _LoopState:
        # A row that emitted nothing last step (finished) feeds a masked pad: its cache slot stays
        # invalid and its position does not advance.
        logits_BxV, cache = model.decode_step(state.last_token_B, state.last_emitted_B, state.cache)
        return record(state, cache, logits_BxV)

    state = lax.while_loop(keep_going, decode_one, state)
    return SampleOutput(
        tokens=state.tokens_BxN,
        mask=state.mask_BxN,
        log_probs=state.log_probs_BxN,
        lengths=jnp.sum(state.mask_BxN, axis=1, dtype=jnp.int32),
        prompt_ids=prompt_ids_BxP.astype(jnp.int32),
        prompt_mask=prompt_mask_BxP,
        num_steps=state.step,
        stop_lengths=state.stop_length_B,
    )


def _generate_from_state(graphdef, state, prompt_ids_BxP, prompt_mask_BxP, key, config, row_sharding):
    return generate_left_padded(nnx.merge(graphdef, state), prompt_ids_BxP, prompt_mask_BxP, key, config,
                                row_sharding)


_generate_jit = jax.jit(_generate_from_state, static_argnums=(0, 5, 6))


def generate(
    model,
    prompt_ids,
    prompt_mask,
    key: jax.Array,
    config: SamplingConfig,
    *,
    row_sharding: NamedSharding | None = None,
) -> SampleOutput:
    """Samples `config.max_new_tokens` tokens per prompt with the live model's parameters.

    Args:
      model: a `CausalLM` (its current parameters are used without copying; the jitted
        sampler is a pure function of the model's state, cached per (graph, shapes, config)).
      prompt_ids: integer [B, L] token ids (host or device array).
      prompt_mask: bool/int [B, L], True at real tokens; None = all real. Left, right or mixed
        padding is accepted (prompts are re-aligned to the left); every row needs ≥ 1 real token.
      key: a JAX PRNG key (threefry); row r's t-th token is drawn with `request_uniforms(key, t, r)`
        (= row r of `uniform(fold_in(key, t), (B, 2))`). Unused when greedy.
      config: the `SamplingConfig`.
      row_sharding: optional `NamedSharding` whose first spec entry names the mesh axes to split
        rows over (e.g. ``NamedSharding(mesh, PartitionSpec("data"))``): prompts, KV cache and
        outputs are then split by rows, each device group decoding its own rows (rows are
        padded to a multiple of the split internally; the output has B rows). Works with
        multi-process meshes; without it XLA chooses the layout.

    Returns:
      `SampleOutput` (see its docstring); prompt_ids / prompt_mask there have P columns, the
      bucket chosen for the longest prompt.
    """
    ids_BxL, mask_BxL = check_generate_inputs(model, prompt_ids, prompt_mask, config)
    lengths_B = mask_BxL.sum(axis=1)
    prompt_len = config.prompt_length(int(lengths_B.max()))
    ids_BxP, mask_BxP = left_align_prompts(ids_BxL, mask_BxL, prompt_len, config.pad_token_id)
    graphdef, state = nnx.split(model)
    if row_sharding is None:
        out = _generate_jit(graphdef, state, jnp.asarray(ids_BxP), jnp.asarray(mask_BxP), key, config, None)
        check_first_tokens_finite(_first_finite(out.log_probs))
        return out
    rows, shards = row_split(row_sharding)
    batch = ids_BxP.shape[0]
    padded = -(-batch // shards) * shards
    extra = np.arange(padded - batch) % batch  # padding rows repeat real prompts; they are dropped below
    ids_BxP, mask_BxP = (np.concatenate([x, x[extra]]) for x in (ids_BxP, mask_BxP))
    out = _generate_jit(graphdef, state, jax.device_put(ids_BxP, rows), jax.device_put(mask_BxP, rows), key, config,
                        rows)
    check_first_tokens_finite(_first_finite(out.log_probs))
    if padded == batch:
        return out
    return SampleOutput(*(x if x.ndim == 0 else x[:batch] for x in out))


@jax.jit
def _first_finite(log_probs_BxN: jax.Array) -> jax.Array:
    """True iff every row's first sampled token has a finite log-prob (a replicated scalar)."""
    return jnp.all(jnp.isfinite(log_probs_BxN[:, 0]))

