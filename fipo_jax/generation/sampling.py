"""Sampling primitives both samplers share: the config, token choice, per-request randomness, stop
sequences and the host checks of their inputs.

The decode loops live beside: `static_sampler.generate` (one batch, a `lax.while_loop` over a
preallocated KV cache) and `engine.generate_continuous` (continuous batching over slots).

Token choice at each step, from float32 logits z over the vocabulary:

    τ = 0 (greedy):  y = argmax z
    τ > 0:           z' = z / τ ; keep the top_k largest z' (top_k > 0) ; of those keep the
                     smallest set of most likely tokens whose renormalised mass reaches top_p
                     (nucleus; the most likely token is always kept) ; y ~ softmax(kept z')

Returned log-probs are log softmax(z / τ)[y] over the FULL vocabulary, i.e. before top-k / top-p
truncation (with τ = 0: log softmax(z)[y]). This is the quantity the trainer recomputes by
teacher forcing (`fipo_jax.generation.logprobs.sequence_log_probs(..., temperature=τ)`), so the two can be
compared or used as the rollout policy's log-probs.

Row r's t-th token is drawn with `request_uniforms(key, t, r)`, so a request draws the same tokens in
either sampler. Stop sequences are token sequences (like vLLM's `stop`, in tokens): a row stops once its
generated tokens end with one; their tokens are kept, like an EOS.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import fipo_jax._requires.models  # noqa: F401  one-line ImportError without fipo_jax[models]

# isort: split
from jax import lax

from fipo_jax.core import _checks
from fipo_jax.models.config import SUPPORTED_DTYPES

# Prompt widths compiled for, 1.5–2× apart: prefill cost grows with the padded width, and each
# width is one compilation.
DEFAULT_PROMPT_BUCKETS = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


# Below this, logits / τ leave float32's useful range (τ = 1e-30 gave log-probs of −inf, 1e-38 NaN);
# τ = 0 is greedy decoding.
MIN_TEMPERATURE = 0.01


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample (static: each distinct config compiles its own sampler).

    Attributes:
      max_new_tokens: N ≥ 1, the length of every returned response buffer.
      temperature: τ = 0 (greedy decoding; top_p / top_k are then ignored) or τ ≥ `MIN_TEMPERATURE`.
      top_p: nucleus mass in (0, 1]; 1 disables nucleus filtering.
      top_k: keep the k most likely tokens; 0 disables (k ≥ V is the same as 0).
      eos_token_ids: tokens that end a response (the EOS itself is kept, mask 1); () never stops.
      stop_sequences: token sequences that end a response once the generated tokens end with one
        (kept, mask 1, like EOS; `SampleOutput.stop_lengths` marks them). Matched only against
        generated tokens, never the prompt.
      pad_token_id: written to prompt padding and to response slots after EOS.
      prompt_length_buckets: increasing lengths; prompts are left-padded to the smallest bucket
        that holds the longest prompt in the batch, bounding recompilation. None pads only to the
        longest prompt (one compilation per distinct longest length).
      cache_dtype: KV-cache dtype ("float32" / "bfloat16"); None uses the model's compute dtype.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    pad_token_id: int = 0
    prompt_length_buckets: tuple[int, ...] | None = DEFAULT_PROMPT_BUCKETS
    cache_dtype: str | None = None

    def __post_init__(self) -> None:
        _checks.require(_checks.is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
                        f"SamplingConfig.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        _checks.require(_checks.is_real(self.temperature) and math.isfinite(self.temperature)
                        and (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE),
                        f"SamplingConfig.temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE} "
                        f"(smaller ones overflow float32 logits / τ), got {self.temperature!r}")
        object.__setattr__(self, "temperature", float(self.temperature))
        _checks.require(_checks.is_real(self.top_p) and 0 < self.top_p <= 1,
                        f"SamplingConfig.top_p must be in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "top_p", float(self.top_p))
        _checks.require(_checks.is_int(self.top_k) and self.top_k >= 0,
                        f"SamplingConfig.top_k must be an int >= 0 (0 = disabled), got {self.top_k!r}")
        _checks.require(isinstance(self.eos_token_ids, (tuple, list)),
                        f"SamplingConfig.eos_token_ids must be a tuple of token ids, got {self.eos_token_ids!r}")
        _checks.require(all(_checks.is_int(t) and t >= 0 for t in self.eos_token_ids),
                        f"SamplingConfig.eos_token_ids must be non-negative ints, got {self.eos_token_ids!r}")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        stops = self.stop_sequences
        well_formed = isinstance(stops, (tuple, list)) and all(
            isinstance(q, (tuple, list)) and q and all(_checks.is_int(t) and t >= 0 for t in q) for q in stops)
        _checks.require(well_formed, "SamplingConfig.stop_sequences must be a tuple of non-empty token-id tuples "
                        f"(encode stop strings with the tokenizer first), got {stops!r}")
        object.__setattr__(self, "stop_sequences", tuple(tuple(int(t) for t in q) for q in stops))
        _checks.check_int("SamplingConfig.pad_token_id", self.pad_token_id, minimum=0)
        if self.prompt_length_buckets is not None:
            buckets = self.prompt_length_buckets
            _checks.require(isinstance(buckets, (tuple, list)) and bool(buckets)
                            and all(_checks.is_int(b) and b >= 1 for b in buckets)
                            and all(a < b for a, b in zip(buckets, buckets[1:])),
                            "SamplingConfig.prompt_length_buckets must be None or a non-empty, strictly "
                            f"increasing tuple of positive ints, got {buckets!r}")
            object.__setattr__(self, "prompt_length_buckets", tuple(int(b) for b in buckets))
        for name in ("max_new_tokens", "top_k", "pad_token_id"):  # NumPy ints → int (hashing)
            object.__setattr__(self, name, int(getattr(self, name)))
        _checks.check_choice("SamplingConfig.cache_dtype", self.cache_dtype, (None, *SUPPORTED_DTYPES))

    @property
    def greedy(self) -> bool:
        """True when τ = 0."""
        return self.temperature == 0

    def replace(self, **changes) -> SamplingConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def prompt_length(self, longest_prompt: int) -> int:
        """P: the bucket that holds a prompt of `longest_prompt` real tokens."""
        if self.prompt_length_buckets is None:
            return longest_prompt
        for bucket in self.prompt_length_buckets:
            if bucket >= longest_prompt:
                return bucket
        raise ValueError(
            f"the longest prompt has {longest_prompt} tokens, more than the largest prompt length "
            f"bucket {self.prompt_length_buckets[-1]}; add a bucket or truncate prompts"
        )


class SampleOutput(NamedTuple):
    """Sampler results (B rows, N = max_new_tokens, P = padded prompt length).

    Attributes:
      tokens: int32 [B, N], generated tokens; `pad_token_id` after a row's EOS.
      mask: bool [B, N], True for generated tokens up to and including the first EOS.
      log_probs: float32 [B, N], log softmax(z/τ)[token] over the full vocabulary (before
        top-k / top-p truncation; τ = 1 when greedy); 0 where mask is False.
      lengths: int32 [B], number of generated tokens per row (= mask.sum(1)).
      prompt_ids: int32 [B, P], the left-aligned, bucket-padded prompt the model saw.
      prompt_mask: bool [B, P], True at real prompt tokens.
      num_steps: int32 scalar, decode positions actually computed (< N when every row stopped).
      stop_lengths: int32 [B], length of the stop sequence that ended the row (its last tokens),
        0 when the row ended with EOS, at the budget, or has no stop sequences.

    The static sampler's fields are device arrays, the engine's host numpy arrays (``num_steps`` a
    numpy scalar).
    """

    tokens: jax.Array | np.ndarray
    mask: jax.Array | np.ndarray
    log_probs: jax.Array | np.ndarray
    lengths: jax.Array | np.ndarray
    prompt_ids: jax.Array | np.ndarray
    prompt_mask: jax.Array | np.ndarray
    num_steps: jax.Array | np.integer
    stop_lengths: jax.Array | np.ndarray


# ---------------------------------------------------------------------------------------------
# Token choice (pure)
# ---------------------------------------------------------------------------------------------


def top_k_top_p_filter(scaled_logits_BxV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Sets logits outside the top-k / nucleus sets to −inf (ties at a threshold are kept).

    top-k keeps z'_v ≥ (k-th largest z'). top-p then sorts the kept logits in decreasing order,
    p = softmax(sorted), and keeps position i iff Σ_{j<i} p_j < top_p: the smallest prefix with
    mass ≥ top_p (position 0 is always kept).
    """
    vocab = scaled_logits_BxV.shape[-1]
    filtered_BxV = scaled_logits_BxV
    sorted_desc_BxK = None
    if 0 < top_k < vocab:
        sorted_desc_BxK = lax.top_k(scaled_logits_BxV, top_k)[0]
        filtered_BxV = jnp.where(scaled_logits_BxV >= sorted_desc_BxK[:, -1:], scaled_logits_BxV, -jnp.inf)
    if top_p < 1.0:
        if sorted_desc_BxK is None:
            sorted_desc_BxK = -jnp.sort(-scaled_logits_BxV, axis=-1)
        probs_BxK = jax.nn.softmax(sorted_desc_BxK, axis=-1)
        mass_before_BxK = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK
        kept_BxK = mass_before_BxK < top_p
        threshold_Bx1 = jnp.min(jnp.where(kept_BxK, sorted_desc_BxK, jnp.inf), axis=-1, keepdims=True)
        filtered_BxV = jnp.where(scaled_logits_BxV >= threshold_Bx1, filtered_BxV, -jnp.inf)
    return filtered_BxV


# Threefry-2x32's rotation constants, alternating between rounds of four (as in `jax.random`).
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k1: jax.Array, k2: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """JAX's Threefry-2x32 hash (20 rounds) of the count pairs (x0, x1) under the key (k1, k2), element-wise
    on uint32 arrays that broadcast together: bit for bit `jax.extend.random.threefry_2x32`, whose output
    is (y0, y1) for counts split as (x0, x1) (tested).

    Written out as plain element-wise ops, which XLA fuses into one kernel: JAX lowers its own hash on
    CPU as a 5-trip `while` loop of ~27 ops per trip, run twice per decode step by `request_uniforms`.
    """
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for group in range(5):
        for rotation in _THREEFRY_ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = x0 ^ (lax.shift_left(x1, np.uint32(rotation)) | lax.shift_right_logical(x1, np.uint32(32 - rotation)))
        x0 = x0 + ks[(group + 1) % 3]
        x1 = x1 + ks[(group + 2) % 3] + np.uint32(group + 1)
    return x0, x1


def _threefry_key_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two uint32 words of a threefry key (typed `jax.random.key` or raw `PRNGKey`); TypeError otherwise."""
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    impl = str(jax.random.key_impl(key)) if typed else f"a raw key of shape {key.shape}"
    _checks.require(impl == "threefry2x32" if typed else key.shape == (2,),
                    f"sampling draws per-request uniforms from threefry keys, got {impl}: use jax.random.key(seed) "
                    "or jax.random.PRNGKey(seed) with the default (threefry) implementation", error=TypeError)
    words = jax.random.key_data(key) if typed else key
    return words[0].astype(jnp.uint32), words[1].astype(jnp.uint32)


def request_uniforms(key: jax.Array, steps_S: jax.Array, requests_S: jax.Array) -> jax.Array:
    """The two uniforms of request r's t-th token: u[s] = uniform(fold_in(key, t_s), (R, 2))[r_s].

    Under JAX's partitionable threefry (`jax_threefry_partitionable`, on in our pin) element
    (r, j) of a (R, 2) draw is threefry(key, counter 2r + j), so row r is the same for every
    R > r: this computes that one row directly, at the cost of one hash per request instead of
    R. Both samplers draw with it — the static one for row r of its batch, the continuous-batching
    engine for request r in whatever slot, whenever scheduled — so they draw the same tokens (and,
    with the flag on, the same as `uniform(fold_in(key, t), (B, 2))` drew before; tested).
    Threefry keys only. The hashes are `threefry2x32`, element-wise over the S requests (one fused
    kernel per step, no loop).
    Returns float32 [S, 2] in [0, 1).
    """
    k1, k2 = _threefry_key_words(key)
    zeros_S = jnp.zeros(steps_S.shape, jnp.uint32)
    # fold_in(key, t) = threefry(key, counts (0, t)): the step's key, one per request.
    s1_S, s2_S = threefry2x32(k1, k2, zeros_S, steps_S.astype(jnp.int32).astype(jnp.uint32))
    # Counts (high word 0, low word 2r + j) for j = 0, 1; the draw's 32 bits are the two output words xor-ed.
    low_Sx2 = 2 * requests_S.astype(jnp.int32).astype(jnp.uint32)[:, None] + jnp.arange(2, dtype=jnp.uint32)[None]
    y0_Sx2, y1_Sx2 = threefry2x32(s1_S[:, None], s2_S[:, None], jnp.zeros_like(low_Sx2), low_Sx2)
    bits_Sx2 = y0_Sx2 ^ y1_Sx2
    # jax.random.uniform's float construction: 23 random mantissa bits under exponent 0, minus 1.
    floats = lax.bitcast_convert_type((bits_Sx2 >> 9) | np.uint32(0x3F800000), jnp.float32) - 1.0
    return jnp.maximum(floats, 0.0)


def categorical(key: jax.Array, logits_BxV: jax.Array, block: int = 512) -> jax.Array:
    """y ~ softmax(logits) per row, from `uniform(key, (B, 2))`: see `categorical_from_uniforms`.

    [B, 2], not [2, B]: row r's uniforms are then the same for any batch size (`request_uniforms`),
    so rows padded for a device split leave the real rows' draws unchanged.
    """
    return categorical_from_uniforms(jax.random.uniform(key, (logits_BxV.shape[0], 2)), logits_BxV, block)


def categorical_from_uniforms(uniforms_Bx2: jax.Array, logits_BxV: jax.Array, block: int = 512) -> jax.Array:
    """y ~ softmax(logits) per row, from two uniforms per row instead of V Gumbel draws.

    Inverse-CDF sampling in two levels: with p ∝ exp(z − max z) cut into blocks of `block`
    tokens, pick block b with probability mass_b / Σ mass (first block whose running mass
    reaches u₁ · Σ mass), then token j in b with probability p_j / mass_b (same rule with u₂),
    where u = 1 − uniforms ∈ (0, 1]. The product is exactly p_y / Σ p; entries with p = 0
    (−inf logits) are never chosen because u > 0. `jax.random.categorical` draws V Gumbel
    variates per row, which at a 262,144-token vocabulary costs more than the model's LM head
    on a CPU.
    """
    batch, vocab = logits_BxV.shape
    blocks = -(-vocab // block)
    padded_BxV = jnp.pad(logits_BxV, ((0, 0), (0, blocks * block - vocab)), constant_values=-jnp.inf)
    probs_BxNxK = jnp.exp(padded_BxV - jnp.max(logits_BxV, axis=-1, keepdims=True)).reshape(batch, blocks, block)
    u_Bx2 = 1.0 - uniforms_Bx2  # in (0, 1]

    def first_reaching(mass_BxM, u_B):
        cumulative_BxM = jnp.cumsum(mass_BxM, axis=-1)
        target_Bx1 = (u_B * cumulative_BxM[:, -1])[:, None]
        return jnp.minimum(jnp.sum(cumulative_BxM < target_Bx1, axis=-1), mass_BxM.shape[-1] - 1)

    block_B = first_reaching(jnp.sum(probs_BxNxK, axis=-1), u_Bx2[:, 0])
    within_BxK = jnp.take_along_axis(probs_BxNxK, block_B[:, None, None], axis=1)[:, 0]
    return block_B * block + first_reaching(within_BxK, u_Bx2[:, 1])


def sample_tokens(
    logits_BxV: jax.Array, key: jax.Array, temperature: float, top_p: float = 1.0, top_k: int = 0,
    uniforms_Bx2: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One token per row and its log-prob under the full temperature-scaled distribution.

    Returns (tokens_B int32, log_probs_B float32) with log_probs = log softmax(z/τ)[token]
    (τ = 1 when `temperature == 0`, which is greedy argmax). The draw uses `uniforms_Bx2` when
    given (`request_uniforms`; `key` is then unused), else `uniform(key, (B, 2))`.
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    if temperature == 0:
        tokens_B = jnp.argmax(logits_BxV, axis=-1)
        scaled_BxV = logits_BxV
    else:
        scaled_BxV = logits_BxV / temperature
        filtered_BxV = top_k_top_p_filter(scaled_BxV, top_k, top_p)
        if uniforms_Bx2 is None:
            uniforms_Bx2 = jax.random.uniform(key, (logits_BxV.shape[0], 2))
        tokens_B = categorical_from_uniforms(uniforms_Bx2, filtered_BxV)
    tokens_B = tokens_B.astype(jnp.int32)
    log_probs_B = jnp.take_along_axis(jax.nn.log_softmax(scaled_BxV, axis=-1), tokens_B[:, None], axis=-1)[:, 0]
    return tokens_B, log_probs_B


def stop_table(stop_sequences: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, np.ndarray]:
    """Stop sequences right-aligned in an [S, L] table (L = the longest) with a validity mask."""
    width = max(map(len, stop_sequences))
    tokens_SxL = np.full((len(stop_sequences), width), -1, np.int32)
    valid_SxL = np.zeros((len(stop_sequences), width), bool)
    for i, sequence in enumerate(stop_sequences):
        tokens_SxL[i, width - len(sequence):] = sequence
        valid_SxL[i, width - len(sequence):] = True
    return tokens_SxL, valid_SxL


def matched_stop_length(recent_BxL: jax.Array, tokens_SxL: jax.Array, valid_SxL: jax.Array) -> jax.Array:
    """Length of the longest stop sequence that the last L tokens of each row end with (0: none).

    recent_BxL holds a row's last L generated tokens, oldest first, −1 before its first token,
    so a stop sequence can only match tokens the row generated.
    """
    matches_BxSxL = ~valid_SxL[None] | (recent_BxL[:, None, :] == tokens_SxL[None])
    lengths_S = jnp.sum(valid_SxL, axis=1, dtype=jnp.int32)
    return jnp.max(jnp.where(jnp.all(matches_BxSxL, axis=-1), lengths_S[None], 0), axis=-1)


# ---------------------------------------------------------------------------------------------
# One decode step (pure, traceable)
# ---------------------------------------------------------------------------------------------


class NonFiniteLogitsError(FloatingPointError):
    """The policy produced NaN / ±inf log-probs: it cannot be sampled from."""




class Drawn(NamedTuple):
    """One decode step's token for every row (`draw_step`)."""

    tokens_B: jax.Array  # the token; ``pad_token_id`` where the row does not emit
    log_probs_B: jax.Array  # its sampling log-prob; 0 where the row does not emit
    is_eos_B: jax.Array  # an emitted EOS token
    recent_BxL: jax.Array  # the row's last L generated tokens, this one included
    matched_B: jax.Array  # the length of the stop sequence this token completes (0: none)


def draw_step(logits_BxV: jax.Array, key: jax.Array, uniforms_Bx2: jax.Array | None, emitting_B: jax.Array,
              recent_BxL: jax.Array, stop_tokens_BxQxL: jax.Array, stop_valid_BxQxL: jax.Array,
              config: SamplingConfig) -> Drawn:
    """The token each emitting row draws from its logits (`sample_tokens` with the row's request
    uniforms), whether it is EOS, and the stop sequence it completes among the row's Q stop
    sequences (`matched_stop_length`): the per-token step both samplers share."""
    tokens_B, log_probs_B = sample_tokens(logits_BxV, key, config.temperature, config.top_p, config.top_k,
                                          uniforms_Bx2)
    tokens_B = jnp.where(emitting_B, tokens_B, config.pad_token_id)
    log_probs_B = jnp.where(emitting_B, log_probs_B, 0.0)
    eos_E = jnp.asarray(config.eos_token_ids, jnp.int32)
    is_eos_B = (jnp.any(tokens_B[:, None] == eos_E[None], axis=-1) & emitting_B if config.eos_token_ids
                else jnp.zeros_like(emitting_B))
    recent_BxL = jnp.where(emitting_B[:, None], jnp.concatenate([recent_BxL[:, 1:], tokens_B[:, None]], axis=1),
                           recent_BxL)
    matched_B = jax.vmap(matched_stop_length)(recent_BxL[:, None], stop_tokens_BxQxL, stop_valid_BxQxL)[:, 0]
    return Drawn(tokens_B, log_probs_B, is_eos_B, recent_BxL, jnp.where(emitting_B, matched_B, 0))


def request_stop_tables(stop_sequences: Sequence[tuple[tuple[int, ...], ...]]) -> tuple[np.ndarray, np.ndarray]:
    """Each request's `stop_table`, padded to a common [R, Q, L] (Q, L ≥ 1; a request without
    stop sequences gets one empty, never-matching row)."""
    width = max([len(q) for stops in stop_sequences for q in stops], default=1)
    count = max([len(stops) for stops in stop_sequences], default=1) or 1
    tokens = np.full((len(stop_sequences), count, width), -1, np.int32)
    valid = np.zeros((len(stop_sequences), count, width), bool)
    for r, stops in enumerate(stop_sequences):
        if stops:
            t, v = stop_table(stops)
            tokens[r, : len(stops), width - t.shape[1]:] = t
            valid[r, : len(stops), width - t.shape[1]:] = v
    return tokens, valid












# ---------------------------------------------------------------------------------------------
# Host checks of the samplers' inputs
# ---------------------------------------------------------------------------------------------


def left_align_prompts(
    prompt_ids_BxL, prompt_mask_BxL, length: int, pad_token_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Moves each row's real tokens (in order) to the right end of a [B, length] array.

    Accepts left-, right- or arbitrarily padded prompts; pad slots get `pad_token_id`.
    """
    ids_BxL = np.asarray(prompt_ids_BxL)
    mask_BxL = np.asarray(prompt_mask_BxL).astype(bool)
    # Stable sort on the mask puts pads first and keeps real tokens in their original order.
    order_BxL = np.argsort(mask_BxL, axis=1, kind="stable")
    ids_BxL = np.take_along_axis(ids_BxL, order_BxL, axis=1)
    mask_BxL = np.take_along_axis(mask_BxL, order_BxL, axis=1)
    width = ids_BxL.shape[1]
    if length <= width:
        ids_BxP, mask_BxP = ids_BxL[:, width - length :], mask_BxL[:, width - length :]
    else:
        extra = length - width
        ids_BxP = np.pad(ids_BxL, ((0, 0), (extra, 0)))
        mask_BxP = np.pad(mask_BxL, ((0, 0), (extra, 0)))
    return np.where(mask_BxP, ids_BxP, pad_token_id).astype(np.int32), mask_BxP


def check_generate_inputs(model, prompt_ids, prompt_mask, config: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Host copies of (prompt_ids int [B, L], prompt_mask bool [B, L]) after checking them and the
    config's token ids against the model's vocabulary (clear errors naming the problem)."""
    _checks.require(isinstance(config, SamplingConfig), f"config must be a SamplingConfig, got {type(config).__name__}",
                    error=TypeError)
    ids_BxL = np.asarray(prompt_ids)
    _checks.require(ids_BxL.ndim == 2 and np.issubdtype(ids_BxL.dtype, np.integer) and ids_BxL.shape[0] > 0,
                    f"prompt_ids must be an integer [B, L] array with B >= 1, got {ids_BxL.dtype}{list(ids_BxL.shape)}")
    mask_BxL = np.ones(ids_BxL.shape, bool) if prompt_mask is None else np.asarray(prompt_mask)
    _checks.require(mask_BxL.shape == ids_BxL.shape,
                    f"prompt_mask must have the shape of prompt_ids {ids_BxL.shape}, got {mask_BxL.shape}")
    mask_BxL = mask_BxL.astype(bool)
    lengths_B = mask_BxL.sum(axis=1)
    _checks.require(lengths_B.min() > 0, "every prompt needs at least one real token; empty rows: "
                                         f"{np.flatnonzero(lengths_B == 0).tolist()}")
    vocab = model.config.vocab_size
    real_ids = ids_BxL[mask_BxL]
    _checks.require(real_ids.min() >= 0 and real_ids.max() < vocab,
                    f"prompt_ids must be in [0, vocab_size={vocab}), got range [{real_ids.min()}, {real_ids.max()}]")
    stop_ids = [t for sequence in config.stop_sequences for t in sequence]
    out_of_vocab = [t for t in (*config.eos_token_ids, config.pad_token_id, *stop_ids) if t >= vocab]
    _checks.require(not out_of_vocab, f"eos_token_ids / pad_token_id / stop_sequences must be < vocab_size={vocab}, "
                                      f"got {out_of_vocab}")
    return ids_BxL, mask_BxL






def check_first_tokens_finite(finite) -> None:
    """Raise `NonFiniteLogitsError` unless ``finite`` (a bool: every row's first token has a finite
    log-prob). NaN / ±inf weights or inputs would otherwise sample token 0 forever, silently."""
    if not bool(finite):
        raise NonFiniteLogitsError("the policy's next-token log-probs are not finite (NaN / ±inf) at the first "
                                   "sampled token: its parameters or inputs hold non-finite values")
