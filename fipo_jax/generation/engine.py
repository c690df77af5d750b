"""Continuous batching: a fixed set of decode slots refilled from a queue, each prompt prefilled once.

    requests (prompt, budget, stop sequences) ─► queue, in request order
    until every request has ended:
      host    free slots ← the next requests; prompts not in the prefix store are prefilled
              (≤ C distinct prompts per call, each once however many samples it has)
      device  one jitted call: insert (copy the prompt's KV into each refilled slot, sample token 0
              from the prompt's last logits) ─► ≤ K decode steps of every busy slot
      host    append the tokens each slot emitted to its request; a slot whose request ended
              (EOS, stop sequence, its own budget) is free for the next call

A slot is one row of the static sampler with its own cache write index: the slots' KV cache is one
batch-S `KVCache` whose `index` is a vector [S], and a decode step is one batched cached forward
(`model.decode_step`) in which each slot writes its new key / value at its own index, all slots in
one batched update per layer (every projection is one GEMM over the slots). The host syncs once per
call, never per token, and every call has the same shapes, so inserting requests never recompiles.

Per-request randomness: token t of request r is drawn with `request_uniforms(key, t, r)`, exactly
the uniforms of row r at step t in `static_sampler.generate`. A request's tokens depend only on
(key, r, t), never on its slot or on when it was scheduled, and the engine returns what the static
sampler returns for the same prompts, up to float rounding of the logits (the two compute the same
rows in batches of different sizes): equal tokens and lengths, log-probs within float32 rounding (~1e-6 relative).
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import fipo_jax._requires.models  # noqa: F401  one-line ImportError without fipo_jax[models]

# isort: split
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from fipo_jax.core import _checks
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
from fipo_jax.models.kv_cache import KVCache, init_kv_cache
from fipo_jax.parallel import distributed
from fipo_jax.parallel.sharding import constrain_rows, row_shardings, row_split


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine schedules (static: each distinct config compiles its own functions).

    Attributes:
      num_slots: S, requests decoded at once; each slot holds a cache of P + N − 1 positions.
        On a mesh, a multiple of the devices that split rows.
      steps_per_sync: K ≥ 1, decode steps per device call; the host looks at the slots (and
        refills the free ones) once per call. A slot that ends mid-call idles until the call ends.
      refill_threshold: a call ends early once this many slots are free while requests wait
        (≥ 1; default max(1, S // 8)), so long calls do not leave freed slots idle.
      prefill_batch: C, rows of the prefix store: prompts prefilled and held until all their
        samples are inserted; a prefill call computes 1, 2, 4, … or C rows (one compilation each).
      share_prompt_prefill: prefill each distinct prompt once and copy its KV into every slot that
        samples from it; False prefills every request's prompt separately (for comparison).
      compact_tail: once the queue is empty, move the busy slots into S/2, S/4, … slots as they
        fit, so the last long responses do not pay for S slots per step (one compilation per
        size, log₂ S at most).
    """

    num_slots: int = 64
    steps_per_sync: int = 16
    refill_threshold: int | None = None
    prefill_batch: int = 8
    share_prompt_prefill: bool = True
    compact_tail: bool = True

    def __post_init__(self) -> None:
        _checks.check_int("EngineConfig.num_slots", self.num_slots, minimum=1)
        _checks.check_int("EngineConfig.steps_per_sync", self.steps_per_sync, minimum=1)
        _checks.check_int("EngineConfig.prefill_batch", self.prefill_batch, minimum=1)
        if self.refill_threshold is None:
            object.__setattr__(self, "refill_threshold", max(1, self.num_slots // 8))
        _checks.check_int("EngineConfig.refill_threshold", self.refill_threshold, minimum=1)
        for name in ("share_prompt_prefill", "compact_tail"):
            _checks.require(isinstance(getattr(self, name), bool),
                            f"EngineConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("num_slots", "steps_per_sync", "refill_threshold", "prefill_batch"):  # NumPy ints → int
            object.__setattr__(self, name, int(getattr(self, name)))


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """What one `generate` call did.

    Attributes:
      busy_slot_steps / computed_slot_steps: decode slot-steps that produced a token of some
        request, and all decode slot-steps computed (Σ decode steps × slots at the time);
        `slot_utilisation` is their ratio (sum both over calls to pool several).
      decode_steps: batched decode steps run (each decodes all S slots).
      device_calls: jitted insert + decode calls, i.e. host syncs.
      prefill_calls / prefilled_prompts: prefill calls, and the prompts they prefilled (without
        the padding rows of a partly filled call).
      prefill_seconds: wall time of the prefill calls (each waited for).
      generated_tokens: tokens returned (Σ lengths).
      seconds: wall time of the call.
    """

    busy_slot_steps: int
    computed_slot_steps: int
    decode_steps: int
    device_calls: int
    prefill_calls: int
    prefilled_prompts: int
    prefill_seconds: float
    generated_tokens: int
    seconds: float

    @property
    def slot_utilisation(self) -> float:
        """The share of decode compute that produced a token of some request."""
        return self.busy_slot_steps / max(1, self.computed_slot_steps)


class Slots(NamedTuple):
    """The decode slots on the device (leading axis S everywhere).

    `cache` is a batch-S cache with one write index per slot: keys [S, layers, N, L, K], index [S].
    A free slot has active False; its request id is that of the last request it held.
    """

    cache: KVCache
    request_S: jax.Array  # int32
    position_S: jax.Array  # int32, tokens the request has generated (the next token's position)
    budget_S: jax.Array  # int32, the request's max_new_tokens
    last_token_S: jax.Array  # int32, fed to the next decode step
    active_S: jax.Array  # bool, holds a request that has not ended
    recent_SxL: jax.Array  # int32, last L generated tokens (stop matching), −1 before the first
    stop_tokens_SxQxL: jax.Array  # the request's stop sequences, right-aligned (`request_stop_tables`)
    stop_valid_SxQxL: jax.Array
    stop_length_S: jax.Array  # int32, length of the matched stop sequence (0: none)


class Prefixes(NamedTuple):
    """Prefilled prompts: C rows of a batch-C cache of P positions and the logits after each prompt."""

    cache: KVCache
    last_logits_CxV: jax.Array


class Emitted(NamedTuple):
    """Tokens each slot emitted during one device call, in order: columns [0, count_S)."""

    tokens_SxW: jax.Array
    log_probs_SxW: jax.Array
    count_S: jax.Array


class Refill(NamedTuple):
    """Which slots a call refills and with what (−1 in `source_S`: keep the slot as it is)."""

    source_S: jax.Array  # int32, prefix-store row of the request's prompt
    request_S: jax.Array  # int32
    budget_S: jax.Array  # int32
    stop_tokens_SxQxL: jax.Array
    stop_valid_SxQxL: jax.Array


# ---------------------------------------------------------------------------------------------
# Device functions (pure, traceable)
# ---------------------------------------------------------------------------------------------


def init_slots(model_config, num_slots: int, max_len: int, stop_shape: tuple[int, int], dtype=None) -> Slots:
    """S free slots with an empty cache of `max_len` positions each (write indices [S], all 0)."""
    zeros = jnp.zeros((num_slots,), jnp.int32)
    cache = init_kv_cache(model_config, num_slots, max_len, dtype)._replace(index=zeros)
    return Slots(cache=cache, request_S=zeros - 1, position_S=zeros, budget_S=zeros, last_token_S=zeros,
                 active_S=jnp.zeros((num_slots,), jnp.bool_),
                 recent_SxL=jnp.full((num_slots, stop_shape[1]), -1, jnp.int32),
                 stop_tokens_SxQxL=jnp.full((num_slots, *stop_shape), -1, jnp.int32),
                 stop_valid_SxQxL=jnp.zeros((num_slots, *stop_shape), jnp.bool_), stop_length_S=zeros)


def init_prefixes(model_config, capacity: int, width: int, dtype=None) -> Prefixes:
    """An empty prefix store of `capacity` rows of `width` positions."""
    return Prefixes(init_kv_cache(model_config, capacity, width, dtype),
                    jnp.zeros((capacity, model_config.vocab_size), jnp.float32))


def prefill(model, prefixes: Prefixes, prompt_ids_kxP: jax.Array, prompt_mask_kxP: jax.Array, rows_k: jax.Array,
            cache_dtype=None) -> Prefixes:
    """One forward over k left-padded prompts; writes each into prefix-store row `rows_k` (an
    out-of-range row drops it: the padding of a partly filled call)."""
    count, width = prompt_ids_kxP.shape
    cache = init_kv_cache(model.config, count, width, cache_dtype)
    logits_kxV, cache = model.prefill(prompt_ids_kxP, prompt_mask_kxP, cache)
    store = jax.tree.map(lambda old, new: old.at[rows_k].set(new, mode="drop") if old.ndim else old,
                         prefixes.cache, cache)
    return Prefixes(store, prefixes.last_logits_CxV.at[rows_k].set(logits_kxV.astype(jnp.float32),
                                                                    mode="drop"))


def insert(slots: Slots, prefixes: Prefixes, refill: Refill) -> Slots:
    """Slots with `refill.source_S ≥ 0` take a prefilled prompt: its KV in positions [0, P), the rest
    of the slot invalid, write index P, and a fresh request state (no token generated yet)."""
    refilled_S = refill.source_S >= 0
    source_S = jnp.maximum(refill.source_S, 0)
    width = prefixes.cache.valid_BxS.shape[1]

    def keep(new, old):  # new where the slot is refilled
        return jnp.where(refilled_S.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)

    def prompt_into(slot_x, prefix_x, axis: int):
        """Positions [0, P) along `axis` of the slot cache ([S, …]) take the prefix rows."""
        taken = jnp.take(prefix_x, source_S, axis=0)
        old = lax.slice_in_dim(slot_x, 0, width, axis=axis)
        return lax.dynamic_update_slice_in_dim(slot_x, keep(taken, old), 0, axis=axis)

    cache, prompt = slots.cache, prefixes.cache
    after_prompt_L = jnp.arange(cache.valid_BxS.shape[-1]) >= width  # invalid in a refilled slot: stale tokens
    cache = KVCache(
        keys=prompt_into(cache.keys, prompt.keys, axis=3),  # [S, layers, N, L, K]
        values=prompt_into(cache.values, prompt.values, axis=3),
        valid_BxS=prompt_into(cache.valid_BxS, prompt.valid_BxS, axis=1) & ~(
            refilled_S[:, None] & after_prompt_L[None]),  # [S, L]
        positions_BxS=prompt_into(cache.positions_BxS, prompt.positions_BxS, axis=1),
        next_position_B=keep(jnp.take(prompt.next_position_B, source_S), cache.next_position_B),
        index=keep(jnp.full_like(cache.index, width), cache.index),
    )
    return Slots(
        cache=cache,
        request_S=keep(refill.request_S, slots.request_S),
        position_S=keep(0, slots.position_S),
        budget_S=keep(refill.budget_S, slots.budget_S),
        last_token_S=slots.last_token_S,
        active_S=slots.active_S | refilled_S,
        recent_SxL=keep(-1, slots.recent_SxL),
        stop_tokens_SxQxL=keep(refill.stop_tokens_SxQxL, slots.stop_tokens_SxQxL),
        stop_valid_SxQxL=keep(refill.stop_valid_SxQxL, slots.stop_valid_SxQxL),
        stop_length_S=keep(0, slots.stop_length_S),
    )


def record(slots: Slots, emitted: Emitted, logits_SxV: jax.Array, emitting_S: jax.Array, key: jax.Array,
           config: SamplingConfig) -> tuple[Slots, Emitted]:
    """Samples the next token of every emitting slot from its logits, appends it to `emitted` and
    ends requests on EOS, on a stop sequence or at their budget."""
    uniforms_Sx2 = None if config.greedy else request_uniforms(key, slots.position_S, slots.request_S)
    drawn = draw_step(logits_SxV, key, uniforms_Sx2, emitting_S, slots.recent_SxL, slots.stop_tokens_SxQxL,
                      slots.stop_valid_SxQxL, config)
    rows_S = jnp.arange(drawn.tokens_B.shape[0])
    column_S = jnp.where(emitting_S, emitted.count_S, emitted.tokens_SxW.shape[1])  # out of range: dropped
    emitted = Emitted(emitted.tokens_SxW.at[rows_S, column_S].set(drawn.tokens_B, mode="drop"),
                      emitted.log_probs_SxW.at[rows_S, column_S].set(drawn.log_probs_B, mode="drop"),
                      emitted.count_S + emitting_S)
    position_S = slots.position_S + emitting_S
    hit_S = drawn.matched_B > 0
    ended_S = emitting_S & (drawn.is_eos_B | hit_S | (position_S >= slots.budget_S))
    return slots._replace(
        position_S=position_S,
        last_token_S=jnp.where(emitting_S, drawn.tokens_B, slots.last_token_S),
        active_S=slots.active_S & ~ended_S,
        recent_SxL=drawn.recent_BxL,
        stop_length_S=jnp.where(hit_S, drawn.matched_B, slots.stop_length_S),
    ), emitted


def decode_logits(model, slots: Slots) -> tuple[jax.Array, KVCache]:
    """Next-token logits [S, V] of every slot: one batched cached forward, each slot writing at its
    own index (`KVCache` with index [S]).

    An inactive slot feeds a masked token and keeps its write index, so nothing it holds changes.
    """
    logits_SxV, cache = model.decode_step(slots.last_token_S, slots.active_S, slots.cache)
    return logits_SxV, cache._replace(index=jnp.where(slots.active_S, cache.index, slots.cache.index))


def advance(model, slots: Slots, prefixes: Prefixes, refill: Refill, key: jax.Array, free_to_stop: jax.Array,
            config: SamplingConfig, steps: int, row_sharding: NamedSharding | None = None
            ) -> tuple[Slots, Emitted, jax.Array]:
    """Insert, then ≤ `steps` decode steps; stops early when no slot is busy or once
    `free_to_stop` > 0 slots are free (requests are waiting for them). Returns the slots, what
    they emitted (≤ steps + 1 tokens each) and the number of decode steps run."""
    num_slots = refill.source_S.shape[0]
    slots = constrain_rows(insert(constrain_rows(slots, row_sharding), prefixes, refill), row_sharding)
    emitted = constrain_rows(Emitted(jnp.full((num_slots, steps + 1), config.pad_token_id, jnp.int32),
                                     jnp.zeros((num_slots, steps + 1), jnp.float32),
                                     jnp.zeros((num_slots,), jnp.int32)), row_sharding)
    refilled_S = refill.source_S >= 0
    first_logits_SxV = jnp.take(prefixes.last_logits_CxV, jnp.maximum(refill.source_S, 0), axis=0)
    slots, emitted = record(slots, emitted, first_logits_SxV, refilled_S, key, config)

    def keep_going(carry):
        step, slots, _ = carry
        free = jnp.sum(~slots.active_S)
        waiting_and_free = (free_to_stop > 0) & (free >= free_to_stop)
        return (step < steps) & jnp.any(slots.active_S) & ~waiting_and_free

    def decode_one(carry):
        step, slots, emitted = carry
        logits_SxV, cache = decode_logits(model, slots)
        slots, emitted = record(slots._replace(cache=cache), emitted, logits_SxV, slots.active_S, key, config)
        return step + 1, constrain_rows(slots, row_sharding), emitted

    steps_run, slots, emitted = lax.while_loop(keep_going, decode_one, (jnp.zeros((), jnp.int32), slots, emitted))
    return slots, emitted, steps_run


def _advance_from_state(graphdef, state, slots, prefixes, refill, key, free_to_stop, config, steps, row_sharding):
    return advance(nnx.merge(graphdef, state), slots, prefixes, refill, key, free_to_stop, config, steps,
                   row_sharding)


def _prefill_from_state(graphdef, state, prefixes, prompt_ids_kxP, prompt_mask_kxP, rows_k, cache_dtype,
                        placement):
    # `placement` (rows replicated): the store stays on every row group, kv heads split like the slots'.
    return constrain_rows(prefill(nnx.merge(graphdef, state), prefixes, prompt_ids_kxP, prompt_mask_kxP, rows_k,
                                  cache_dtype), placement)


_advance_jit = jax.jit(_advance_from_state, static_argnums=(0, 7, 8, 9), donate_argnums=(2,))
_prefill_jit = jax.jit(_prefill_from_state, static_argnums=(0, 6, 7), donate_argnums=(2,))
_init_prefixes_jit = jax.jit(init_prefixes, static_argnums=(0, 1, 2, 3))
_init_slots_jit = jax.jit(init_slots, static_argnums=(0, 1, 2, 3, 4))
_take_slots_jit = jax.jit(lambda slots, keep, rows: constrain_rows(jax.tree.map(lambda x: x[keep], slots), rows),
                          static_argnums=(2,))


# ---------------------------------------------------------------------------------------------
# Host scheduler
# ---------------------------------------------------------------------------------------------


class _PrefixStore:
    """Which prompt each prefix-store row holds and how many of its requests still wait (host side)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.rows: OrderedDict[bytes, int] = OrderedDict()  # prompt → row, least recently used first
        self.waiting: dict[bytes, int] = {}

    def writable_rows(self, busy: set[int]) -> list[int]:
        """Rows a prefill may overwrite now: those holding no prompt, else the least recently used
        row that is not `busy` (read by slots refilled in the coming device call). May be empty."""
        used = set(self.rows.values())
        free = [r for r in range(self.capacity) if r not in used and r not in busy]
        if free:
            return free
        for prompt, row in self.rows.items():  # least recently used first
            if row not in busy:
                del self.rows[prompt]  # its waiting requests will prefill it again
                return [row]
        return []

    def take(self, prompt: bytes) -> int:
        """The row of `prompt` for one more request; the row is released after its last request."""
        row = self.rows[prompt]
        self.rows.move_to_end(prompt)
        self.waiting[prompt] -= 1
        if self.waiting[prompt] == 0:
            del self.rows[prompt]
        return row


def _check_requests(count: int, max_new_tokens, stop_sequences, config: SamplingConfig, vocab: int):
    """Per-request budgets [R] and stop sequences (tuple of tuples per request), validated."""
    if max_new_tokens is None:
        budgets = np.full(count, config.max_new_tokens, np.int64)
    else:
        budgets = np.asarray(max_new_tokens)
        _checks.require(budgets.shape == (count,) and np.issubdtype(budgets.dtype, np.integer),
                        f"max_new_tokens must be an integer array of one budget per request ({count}), "
                        f"got {budgets.dtype}{list(budgets.shape)}")
        bad = np.flatnonzero((budgets < 1) | (budgets > config.max_new_tokens))
        _checks.require(bad.size == 0, f"max_new_tokens must be in [1, SamplingConfig.max_new_tokens="
                                       f"{config.max_new_tokens}]; requests {bad[:8].tolist()} have "
                                       f"{budgets[bad[:8]].tolist()}")
    if stop_sequences is None:
        stops = [config.stop_sequences] * count
    else:
        _checks.require(isinstance(stop_sequences, (list, tuple)) and len(stop_sequences) == count,
                        f"stop_sequences must hold one tuple of token sequences per request ({count})")
        stops = [SamplingConfig(stop_sequences=s).stop_sequences for s in stop_sequences]
    out_of_vocab = sorted({t for request in stops for q in request for t in q if t >= vocab})
    _checks.require(not out_of_vocab, f"stop_sequences must be < vocab_size={vocab}, got {out_of_vocab[:8]}")
    return budgets.astype(np.int32), stops


def generate(
    model,
    prompt_ids,
    prompt_mask,
    key: jax.Array,
    config: SamplingConfig,
    engine: EngineConfig = EngineConfig(),
    *,
    max_new_tokens=None,
    stop_sequences: Sequence[tuple[tuple[int, ...], ...]] | None = None,
    row_sharding: NamedSharding | None = None,
    progress: Callable[[int], None] | None = None,
) -> SampleOutput:
    """Samples a response to every prompt with continuous batching: the same contract and the same
    output type as `static_sampler.generate` (host numpy arrays in request order; `num_steps` = the
    longest response). `generate_with_stats` (arguments documented there) also returns what the
    engine did."""
    return generate_with_stats(model, prompt_ids, prompt_mask, key, config, engine, max_new_tokens=max_new_tokens,
                               stop_sequences=stop_sequences, row_sharding=row_sharding, progress=progress)[0]


def generate_with_stats(
    model,
    prompt_ids,
    prompt_mask,
    key: jax.Array,
    config: SamplingConfig,
    engine: EngineConfig = EngineConfig(),
    *,
    max_new_tokens=None,
    stop_sequences: Sequence[tuple[tuple[int, ...], ...]] | None = None,
    row_sharding: NamedSharding | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[SampleOutput, EngineStats]:
    """(`generate`'s `SampleOutput`, `EngineStats`).

    Args:
      model: a `CausalLM` (its live parameters; nothing is copied).
      prompt_ids, prompt_mask: integer [R, L] requests and their mask (None = all real); any padding.
        Identical prompts (e.g. the G samples of a group) are prefilled once.
      key: PRNG key (threefry); token t of request r depends only on (key, r, t), as in
        `static_sampler.generate`.
      config: the `SamplingConfig` (temperature, top-p / top-k, EOS, stop sequences, pad, prompt
        buckets, cache dtype); `config.max_new_tokens` is the largest budget (the output width).
      engine: the `EngineConfig`.
      max_new_tokens: optional int [R], each request's own budget (≤ config.max_new_tokens).
      stop_sequences: optional, per request, a tuple of token sequences replacing
        `config.stop_sequences` for that request.
      row_sharding: optional `NamedSharding` whose first spec entry names the mesh axes to split
        slots over (each device group decodes its own slots); `engine.num_slots` must divide.
      progress: optional callback given the number of requests that ended since the last call.

    Returns:
      (`SampleOutput` in request order, host numpy arrays; `num_steps` = the longest response),
      `EngineStats`.
    """
    started = time.perf_counter()
    _checks.require(isinstance(engine, EngineConfig), f"engine must be an EngineConfig, got {type(engine).__name__}",
                    error=TypeError)
    ids_RxL, mask_RxL = check_generate_inputs(model, prompt_ids, prompt_mask, config)
    budgets_R, stops_R = _check_requests(len(ids_RxL), max_new_tokens, stop_sequences, config,
                                         model.config.vocab_size)
    width = config.prompt_length(int(mask_RxL.sum(axis=1).max()))
    ids_RxP, mask_RxP = left_align_prompts(ids_RxL, mask_RxL, width, config.pad_token_id)
    run = _Run(model, _Requests(ids_RxP, mask_RxP, budgets_R, *request_stop_tables(stops_R)), key, config, engine,
               row_sharding)
    while run.done < run.count:
        ended = run.advance(run.fill_free_slots())
        if progress is not None and ended:
            progress(ended)
        if engine.compact_tail and run.next_request == run.count and run.done < run.count:
            run.compact()
    responses, tally = run.responses, run.tally
    mask = np.arange(config.max_new_tokens)[None] < responses.lengths[:, None]
    started_R = responses.lengths > 0
    check_first_tokens_finite(np.all(np.isfinite(responses.log_probs[started_R, 0])))
    output = SampleOutput(tokens=responses.tokens, mask=mask, log_probs=responses.log_probs,
                          lengths=responses.lengths, prompt_ids=ids_RxP, prompt_mask=mask_RxP,
                          num_steps=np.int32(responses.lengths.max()), stop_lengths=responses.stop_lengths)
    stats = EngineStats(busy_slot_steps=tally["busy_slot_steps"], computed_slot_steps=tally["computed_slot_steps"],
                        decode_steps=tally["decode_steps"], device_calls=tally["calls"],
                        prefill_calls=tally["prefill_calls"], prefilled_prompts=tally["prefilled"],
                        prefill_seconds=run.prefill_seconds, generated_tokens=int(responses.lengths.sum()),
                        seconds=time.perf_counter() - started)
    return output, stats


class _Requests(NamedTuple):
    """The requests on the host: left-aligned prompts [R, P], budgets [R], stop tables [R, Q, L]."""

    ids_RxP: np.ndarray
    mask_RxP: np.ndarray
    budgets_R: np.ndarray
    stop_tokens_RxQxL: np.ndarray
    stop_valid_RxQxL: np.ndarray


@dataclasses.dataclass
class _Responses:
    """Every request's response on the host, appended to after each device call."""

    tokens: np.ndarray  # [R, N]
    log_probs: np.ndarray  # [R, N]
    lengths: np.ndarray  # [R]
    stop_lengths: np.ndarray  # [R]

    @classmethod
    def empty(cls, count: int, width: int, pad_token_id: int) -> _Responses:
        return cls(np.full((count, width), pad_token_id, np.int32), np.zeros((count, width), np.float32),
                   np.zeros(count, np.int32), np.zeros(count, np.int32))

    def append(self, request: int, tokens: np.ndarray, log_probs: np.ndarray) -> None:
        start, end = self.lengths[request], self.lengths[request] + len(tokens)
        self.tokens[request, start:end], self.log_probs[request, start:end] = tokens, log_probs
        self.lengths[request] = end


class _Run:
    """The host side of one `generate` call: the queue, which request each slot holds, the prefix
    store, the device state (slots, prefixes) and the responses so far."""

    def __init__(self, model, requests: _Requests, key, config: SamplingConfig, engine: EngineConfig,
                 row_sharding: NamedSharding | None):
        self.requests, self.key, self.config, self.engine = requests, key, config, engine
        self.count = len(requests.budgets_R)
        self.num_slots = engine.num_slots
        self.row_sharding, self.shards = row_split(row_sharding)
        _checks.require(self.num_slots % self.shards == 0, f"EngineConfig.num_slots={self.num_slots} must be a "
                                                           f"multiple of the {self.shards} devices that split rows")
        replicated = None if row_sharding is None else NamedSharding(row_sharding.mesh, PartitionSpec())
        self.store_placement = replicated  # the prefix store: on every row group, kv heads split
        self.place = jnp.asarray if replicated is None else (lambda x: jax.device_put(x, replicated))
        self.graphdef, self.state = nnx.split(model)
        width = requests.ids_RxP.shape[1]
        self.slots = _init_slots_jit(model.config, self.num_slots, width + config.max_new_tokens - 1,
                                     requests.stop_tokens_RxQxL.shape[1:], config.cache_dtype)
        self.prefixes = _init_prefixes_jit(model.config, engine.prefill_batch, width, config.cache_dtype)
        if row_sharding is not None:
            assert self.row_sharding is not None and replicated is not None  # both made from row_sharding
            self.slots = jax.device_put(self.slots, row_shardings(self.slots, self.row_sharding))
            self.prefixes = jax.device_put(self.prefixes, row_shardings(self.prefixes, replicated))
        self.store = _PrefixStore(engine.prefill_batch)
        self.prompt_of = [requests.ids_RxP[r].tobytes()
                          + (b"" if engine.share_prompt_prefill else r.to_bytes(8, "little"))
                          for r in range(self.count)]
        for prompt in self.prompt_of:
            self.store.waiting[prompt] = self.store.waiting.get(prompt, 0) + 1
        self.responses = _Responses.empty(self.count, config.max_new_tokens, config.pad_token_id)
        self.slot_request = np.full(self.num_slots, -1)  # request held by each slot, −1 when free
        self.next_request = self.done = 0
        self.tally = dict.fromkeys(("decode_steps", "busy_slot_steps", "computed_slot_steps", "calls",
                                    "prefill_calls", "prefilled"), 0)
        self.prefill_seconds = 0.0

    def fill_free_slots(self) -> np.ndarray:
        """Assigns the next requests to free slots (prefilling prompts as needed); returns each
        slot's prefix-store row for the coming call (−1: the slot keeps what it has)."""
        source_S = np.full(self.num_slots, -1, np.int32)
        for slot in np.flatnonzero(self.slot_request < 0):
            if self.next_request == self.count:
                break
            prompt = self.prompt_of[self.next_request]
            if prompt not in self.store.rows and not self.prefill_upcoming(set(source_S[source_S >= 0].tolist())):
                break  # every store row feeds this call; the rest waits for the next one
            source_S[slot] = self.store.take(prompt)
            self.slot_request[slot] = self.next_request
            self.next_request += 1
        return source_S

    def prefill_upcoming(self, busy: set[int]) -> bool:
        """Prefills the next prompts of the queue that are not stored, into rows that no refilled
        slot of the coming call reads (k rows per call, k a power of two ≤ C: one compilation per
        k). False when every row is busy."""
        free = self.store.writable_rows(busy)
        if not free:
            return False
        new_rows: list[int] = []
        new_requests: list[int] = []
        seen = set(self.store.rows)
        for r in range(self.next_request, self.count):
            if len(new_rows) == len(free):
                break
            if self.prompt_of[r] not in seen:
                seen.add(self.prompt_of[r])
                self.store.rows[self.prompt_of[r]] = free[len(new_rows)]
                new_rows.append(free[len(new_rows)])
                new_requests.append(r)
        capacity = self.store.capacity
        k = min(capacity, 1 << (len(new_rows) - 1).bit_length())
        rows_k = np.full(k, capacity, np.int32)  # row C is out of range: dropped
        rows_k[: len(new_rows)] = new_rows
        picked = np.resize(np.asarray(new_requests), k)  # padding rows repeat real prompts
        started = time.perf_counter()
        self.prefixes = jax.block_until_ready(_prefill_jit(
            self.graphdef, self.state, self.prefixes, self.place(self.requests.ids_RxP[picked]),
            self.place(self.requests.mask_RxP[picked]), self.place(rows_k), self.config.cache_dtype,
            self.store_placement))
        self.prefill_seconds += time.perf_counter() - started
        self.tally["prefill_calls"] += 1
        self.tally["prefilled"] += len(new_rows)
        return True

    def advance(self, source_S: np.ndarray) -> int:
        """One device call (insert + ≤ K decode steps); appends what every slot emitted to its
        request and frees the slots whose request ended. Returns the number that ended."""
        request_S = np.maximum(self.slot_request, 0).astype(np.int32)
        req = self.requests
        refill = Refill(*(self.place(x) for x in (source_S, request_S, req.budgets_R[request_S],
                                                    req.stop_tokens_RxQxL[request_S],
                                                    req.stop_valid_RxQxL[request_S])))
        assert self.engine.refill_threshold is not None  # EngineConfig.__post_init__ resolves it
        free_to_stop = min(self.count - self.next_request, self.engine.refill_threshold)
        self.slots, emitted, steps_run = _advance_jit(
            self.graphdef, self.state, self.slots, self.prefixes, refill, self.key,
            self.place(np.int32(free_to_stop)), self.config, self.engine.steps_per_sync, self.row_sharding)
        emitted, steps_run, active_S, stop_length_S = distributed.to_host(
            (emitted, steps_run, self.slots.active_S, self.slots.stop_length_S))
        self.tally["calls"] += 1
        self.tally["decode_steps"] += int(steps_run)
        self.tally["computed_slot_steps"] += int(steps_run) * self.num_slots
        # Token 0 of a refilled request comes from the prefill's logits, not a decode step.
        self.tally["busy_slot_steps"] += int(emitted.count_S.sum()) - int((source_S >= 0).sum())
        ended = 0
        for slot in np.flatnonzero(self.slot_request >= 0):
            request, n = self.slot_request[slot], int(emitted.count_S[slot])
            self.responses.append(request, emitted.tokens_SxW[slot, :n], emitted.log_probs_SxW[slot, :n])
            if not active_S[slot]:
                self.responses.stop_lengths[request] = stop_length_S[slot]
                self.slot_request[slot] = -1
                ended += 1
        self.done += ended
        return ended

    def compact(self) -> None:
        """With the queue empty, moves the busy slots into the fewest of S/2, S/4, … slots that
        hold them (a multiple of the devices); idle slots fill the rest."""
        busy = np.flatnonzero(self.slot_request >= 0)
        size = self.num_slots
        while size % 2 == 0 and size // 2 >= len(busy) and (size // 2) % self.shards == 0:
            size //= 2
        if size < self.num_slots:  # idle slots' active flags are False on the device
            keep = np.concatenate([busy, np.flatnonzero(self.slot_request < 0)[: size - len(busy)]])
            self.slots = _take_slots_jit(self.slots, self.place(keep), self.row_sharding)
            self.slot_request, self.num_slots = self.slot_request[keep], size


def kv_cache_bytes(model_config, rows: int, max_len: int, dtype=None) -> int:
    """Bytes of a `KVCache` with `rows` rows of `max_len` positions (keys, values, masks, positions)."""
    cache = jax.eval_shape(lambda: init_kv_cache(model_config, rows, max_len, dtype))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
