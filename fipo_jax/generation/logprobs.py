"""Token log-probabilities without materialising full-vocabulary logits.

For hidden states h_bt ∈ R^D, an unembedding W ∈ R^{D×V}, a temperature τ and targets y_bt:

    z_bt      = (h_bt · W) / τ                            logits, float32
    logp_bt   = z_bt[y_bt] − logsumexp_v z_btv            log softmax at the target
    H_bt      = −Σ_v p_btv · log p_btv,   p_bt = softmax(z_bt)       entropy (nats)

A [B, T, V] float32 logits tensor is 2.5 GB at B=16, T=256, V=151,936 (Qwen2.5), and
autodiff would keep it (and its softmax) alive for the backward pass. `chunked_token_log_probs`
instead walks over the time axis in chunks of C tokens with `lax.map` whose body is wrapped in
`jax.checkpoint`: the forward pass keeps only per-token outputs, and the backward pass recomputes
one chunk's logits at a time. Peak temporary memory is O(B·C·V) rather than O(B·T·V), and
gradients flow to both the hidden states and W (W's gradient is accumulated across chunks).

Conventions: per-token arrays are [B, T] (time last), hidden states [B, T, D]; results float32.
`sequence_log_probs` applies this to a model: entry t of its output scores token t + s given
all tokens before it (s = `response_start`), so the output lines up with `input_ids[:, s:]`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fipo_jax.core import _checks
from fipo_jax.core.segments import segment_cumsum

# Tokens (batch rows × time steps) per chunk when chunk_size is None: at V = 151,936 one float32
# chunk of logits is 512 · V · 4 B ≈ 0.31 GB, and forward+backward keeps ~4 such arrays live.
DEFAULT_TOKENS_PER_CHUNK = 512
# f32 matmuls at full precision (TPUs/GPUs otherwise use bf16/tf32 passes); a no-op on CPU.
DEFAULT_PRECISION = lax.Precision.HIGHEST


def _check_head_inputs(hidden_BxTxD, unembedding_DxV, targets_BxT, chunk_size, temperature) -> None:
    _checks.check_floating("hidden_BxTxD", hidden_BxTxD, rank=3)
    _checks.check_floating("unembedding_DxV", unembedding_DxV, rank=2)
    if hidden_BxTxD.shape[-1] != unembedding_DxV.shape[0]:
        raise ValueError(
            f"hidden_BxTxD has feature size D={hidden_BxTxD.shape[-1]} but unembedding_DxV has "
            f"shape {tuple(unembedding_DxV.shape)}; expected [D, V] = [{hidden_BxTxD.shape[-1]}, V]"
        )
    if not jnp.issubdtype(targets_BxT.dtype, jnp.integer):
        raise TypeError(f"targets_BxT must be an integer array of token ids, got dtype {targets_BxT.dtype}")
    if tuple(targets_BxT.shape) != tuple(hidden_BxTxD.shape[:2]):
        raise ValueError(
            f"targets_BxT must have shape [B, T] = {tuple(hidden_BxTxD.shape[:2])} (the leading axes "
            f"of hidden_BxTxD), got {tuple(targets_BxT.shape)}"
        )
    _checks.check_token_ids("targets_BxT", targets_BxT, unembedding_DxV.shape[1])
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int (time steps per chunk), got {chunk_size!r}")
    _checks.check_positive("temperature", temperature)


# What a head computes from one chunk's log-softmax [B, C, V] and targets [B, C]: a tuple of
# per-token [B, C] float32 arrays (every variant below returns a tuple of this arity).
HeadStats = Callable[[jax.Array, jax.Array], tuple[jax.Array, ...]]


def _target_log_prob(all_log_probs_BxCxV: jax.Array, targets_BxC: jax.Array) -> tuple[jax.Array]:
    """(log p[y],)."""
    return (jnp.take_along_axis(all_log_probs_BxCxV, targets_BxC[..., None], axis=-1)[..., 0],)


def _target_log_prob_and_entropy(all_log_probs_BxCxV: jax.Array, targets_BxC: jax.Array
                                 ) -> tuple[jax.Array, jax.Array]:
    """(log p[y], H = −Σ_v p·log p); −Σ p·log p has no cancellation (lse − Σ p·z loses ~1e-5
    when |z| ≫ H)."""
    entropy_BxC = -jnp.sum(jnp.exp(all_log_probs_BxCxV) * all_log_probs_BxCxV, axis=-1)
    return _target_log_prob(all_log_probs_BxCxV, targets_BxC) + (entropy_BxC,)


def _chunk_stats(
    hidden_BxCxD: jax.Array,
    unembedding_DxV: jax.Array,
    targets_BxC: jax.Array,
    temperature,
    precision,
    stats: HeadStats,
) -> tuple[jax.Array, ...]:
    """``stats(log softmax(z), y)`` for one chunk, z = h·W/τ computed in float32."""
    batch, chunk, dim = hidden_BxCxD.shape
    # One 2-D GEMM: the gradient of W then contracts a single axis (XLA:CPU is slow otherwise).
    logits_BxCxV = jnp.dot(
        hidden_BxCxD.astype(jnp.float32).reshape(batch * chunk, dim),
        unembedding_DxV.astype(jnp.float32),
        precision=precision,
    ).reshape(batch, chunk, -1) / jnp.asarray(temperature, jnp.float32)
    # log_softmax shifts by the max before exponentiating.
    return stats(jax.nn.log_softmax(logits_BxCxV, axis=-1), targets_BxC)


def chunked_token_log_probs(
    hidden_BxTxD: jax.Array,
    unembedding_DxV: jax.Array,
    targets_BxT: jax.Array,
    *,
    chunk_size: int | None = None,
    temperature: Any = 1.0,
    precision: lax.Precision | None = DEFAULT_PRECISION,
) -> jax.Array:
    """log softmax((h·W)/τ)[y] per token, computed C tokens of the time axis at a time.

    Args:
      hidden_BxTxD: hidden states h (any float dtype; upcast to float32 per chunk).
      unembedding_DxV: the LM head W (any float dtype; upcast to float32 per chunk).
      targets_BxT: token ids y in [0, V). Positions the caller will mask out still need a valid
        id (e.g. the pad id); their outputs are meaningless.
      chunk_size: C, time steps per chunk (every chunk holds all B rows, so a batch-sharded
        input stays sharded). Peak temporary memory ≈ 4 × B·C·V·4 bytes in forward+backward.
        None: C = max(1, 512 // B), i.e. about 512 tokens per chunk. T need not be a multiple
        of C (the last chunk is zero-padded and the padding dropped).
      temperature: τ > 0 (Python number or traced scalar).
      precision: matmul precision of the float32 h·W product.

    Returns:
      log_probs_BxT float32, differentiable in `hidden_BxTxD` and `unembedding_DxV` (logits
      rematerialised per chunk). `chunked_token_log_probs_with_entropy` also returns the entropy.
    """
    return _chunked(hidden_BxTxD, unembedding_DxV, targets_BxT, chunk_size, temperature, precision,
                    _target_log_prob)[0]


def chunked_token_log_probs_with_entropy(
    hidden_BxTxD: jax.Array,
    unembedding_DxV: jax.Array,
    targets_BxT: jax.Array,
    *,
    chunk_size: int | None = None,
    temperature: Any = 1.0,
    precision: lax.Precision | None = DEFAULT_PRECISION,
) -> tuple[jax.Array, jax.Array]:
    """(`chunked_token_log_probs`, the entropy H_bt of softmax(z_bt) in nats), each [B, T] float32."""
    log_probs_BxT, entropy_BxT = _chunked(hidden_BxTxD, unembedding_DxV, targets_BxT, chunk_size, temperature,
                                          precision, _target_log_prob_and_entropy)
    return log_probs_BxT, entropy_BxT


def _chunked(hidden_BxTxD, unembedding_DxV, targets_BxT, chunk_size, temperature, precision,
             stats: HeadStats) -> tuple[jax.Array, ...]:
    """``stats`` over [B, T], computed C time steps at a time (the chunked body of the public
    variants)."""
    _check_head_inputs(hidden_BxTxD, unembedding_DxV, targets_BxT, chunk_size, temperature)
    batch, seq_len, dim = hidden_BxTxD.shape
    if seq_len == 0:
        empty_BxCxV = jnp.zeros((batch, 0, unembedding_DxV.shape[1]), jnp.float32)
        return stats(empty_BxCxV, targets_BxT)
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_TOKENS_PER_CHUNK // max(batch, 1))
    chunk = min(chunk_size, seq_len)
    num_chunks = -(-seq_len // chunk)
    padding = num_chunks * chunk - seq_len
    hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, padding), (0, 0)))
    targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, padding)))
    # Chunk axis first: [n, B, C, ...], so each chunk keeps the (possibly sharded) batch axis.
    hidden_NxBxCxD = hidden_BxTxD.reshape(batch, num_chunks, chunk, dim).transpose(1, 0, 2, 3)
    targets_NxBxC = targets_BxT.reshape(batch, num_chunks, chunk).transpose(1, 0, 2)

    # W enters the loop as a float32 constant so its gradient is accumulated in float32 across
    # chunks (one [D, V] copy when W is bfloat16; O(D·V), independent of T).
    unembedding_f32_DxV = unembedding_DxV.astype(jnp.float32)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one_chunk(args):
        hidden_BxCxD, targets_BxC = args
        return _chunk_stats(hidden_BxCxD, unembedding_f32_DxV, targets_BxC, temperature, precision, stats)

    def unchunk(x_NxBxC):
        return x_NxBxC.transpose(1, 0, 2).reshape(batch, num_chunks * chunk)[:, :seq_len]

    return tuple(map(unchunk, lax.map(one_chunk, (hidden_NxBxCxD, targets_NxBxC))))


def full_logits_token_log_probs(
    hidden_BxTxD: jax.Array,
    unembedding_DxV: jax.Array,
    targets_BxT: jax.Array,
    *,
    temperature: Any = 1.0,
    precision: lax.Precision | None = DEFAULT_PRECISION,
) -> jax.Array:
    """The same quantity through one [B, T, V] float32 logits tensor (reference / benchmarks).

    Numerically identical to `chunked_token_log_probs`; memory O(B·T·V). Do not use it at
    Qwen vocabulary size on long sequences.
    """
    _check_head_inputs(hidden_BxTxD, unembedding_DxV, targets_BxT, None, temperature)
    return _chunk_stats(hidden_BxTxD, unembedding_DxV, targets_BxT, temperature, precision, _target_log_prob)[0]


def full_logits_token_log_probs_with_entropy(
    hidden_BxTxD: jax.Array,
    unembedding_DxV: jax.Array,
    targets_BxT: jax.Array,
    *,
    temperature: Any = 1.0,
    precision: lax.Precision | None = DEFAULT_PRECISION,
) -> tuple[jax.Array, jax.Array]:
    """(`full_logits_token_log_probs`, entropy), each [B, T] float32."""
    _check_head_inputs(hidden_BxTxD, unembedding_DxV, targets_BxT, None, temperature)
    log_probs_BxT, entropy_BxT = _chunk_stats(hidden_BxTxD, unembedding_DxV, targets_BxT, temperature, precision,
                                              _target_log_prob_and_entropy)
    return log_probs_BxT, entropy_BxT


def sequence_log_probs(
    model,
    input_ids_BxT: jax.Array,
    attention_mask_BxT: jax.Array | None = None,
    *,
    response_start: int = 1,
    positions_BxT: jax.Array | None = None,
    segment_ids_BxT: jax.Array | None = None,
    chunk_size: int | None = None,
    temperature: Any = 1.0,
    precision: lax.Precision | None = DEFAULT_PRECISION,
) -> jax.Array:
    """Teacher-forced next-token log-probs of `input_ids[:, s:]` under `model`, s = response_start.

        out[b, j] = log softmax(h_{b, s+j−1} · W / τ)[x_{b, s+j}]  =  log p(x_{s+j} | x_{<s+j})

    for j = 0 … T−s−1, and 0 where token s+j is padding or has no real token before it (the
    first real token of a left-padded row has nothing to condition on). Output column j scores
    input column s + j, so for the sampler's layout (prompt left-padded to P columns followed by
    the response) `response_start=P` gives log-probs aligned with the response tokens, and the
    default `response_start=1` gives all T − 1 next-token log-probs. Only the hidden states at
    columns s−1 … T−2 go through the LM head.

    Args:
      model: a `CausalLM` (anything with `hidden_states(ids, positions, mask)` and
        `unembedding()` → [D, V]).
      input_ids_BxT: integer token ids.
      attention_mask_BxT: bool/int, True/non-zero at real tokens (default all real). Padding may
        be anywhere (left-padded prompt, right-padded response): pad tokens are not attended to
        and default RoPE positions count real tokens only (`positions_from_mask`).
      response_start: s, a static int in [1, T].
      positions_BxT: optional explicit RoPE positions, passed to the model.
      segment_ids_BxT: optional int ids of packed sequences (passed to the model's
        `hidden_states`): a token is scored only when a real token of its own segment precedes it.
      chunk_size, temperature, precision: as in `chunked_token_log_probs`.

    Returns:
      log_probs [B, T − s] float32, zero at unscored positions.
      `sequence_log_probs_with_entropy` also returns the entropy.
    """
    return _sequence(model, input_ids_BxT, attention_mask_BxT, response_start, positions_BxT, segment_ids_BxT,
                     chunk_size, temperature, precision, _target_log_prob)[0]


def sequence_log_probs_with_entropy(
    model,
    input_ids_BxT: jax.Array,
    attention_mask_BxT: jax.Array | None = None,
    *,
    response_start: int = 1,
    positions_BxT: jax.Array | None = None,
    segment_ids_BxT: jax.Array | None = None,
    chunk_size: int | None = None,
    temperature: Any = 1.0,
    precision: lax.Precision | None = DEFAULT_PRECISION,
) -> tuple[jax.Array, jax.Array]:
    """(`sequence_log_probs`, the entropy of each scored position's distribution), each [B, T − s]
    float32 and zero at unscored positions."""
    log_probs_BxR, entropy_BxR = _sequence(model, input_ids_BxT, attention_mask_BxT, response_start, positions_BxT,
                                           segment_ids_BxT, chunk_size, temperature, precision,
                                           _target_log_prob_and_entropy)
    return log_probs_BxR, entropy_BxR


def _sequence(model, input_ids_BxT, attention_mask_BxT, response_start, positions_BxT, segment_ids_BxT, chunk_size,
              temperature, precision, stats: HeadStats) -> tuple[jax.Array, ...]:
    """``stats`` of the scored tokens (zero elsewhere), the body of both public variants."""
    if input_ids_BxT.ndim != 2 or not jnp.issubdtype(input_ids_BxT.dtype, jnp.integer):
        raise ValueError(
            "input_ids_BxT must be an integer [B, T] array, "
            f"got {input_ids_BxT.dtype}{list(input_ids_BxT.shape)}"
        )
    seq_len = input_ids_BxT.shape[1]
    if not isinstance(response_start, int) or isinstance(response_start, bool) or not 1 <= response_start <= seq_len:
        raise ValueError(
            f"response_start must be a static int in [1, T={seq_len}] (column of the first scored "
            f"token), got {response_start!r}"
        )
    if attention_mask_BxT is not None:
        _checks.check_mask("attention_mask_BxT", attention_mask_BxT, "input_ids_BxT", input_ids_BxT)
        mask_BxT = attention_mask_BxT.astype(jnp.bool_)
    else:
        mask_BxT = jnp.ones(input_ids_BxT.shape, jnp.bool_)
    if segment_ids_BxT is None:
        hidden_BxTxD = model.hidden_states(input_ids_BxT, positions_BxT, mask_BxT)
    else:
        hidden_BxTxD = model.hidden_states(input_ids_BxT, positions_BxT, mask_BxT, segment_ids_BxT)
    predictor_hidden_BxRxD = hidden_BxTxD[:, response_start - 1 : seq_len - 1]
    targets_BxR = input_ids_BxT[:, response_start:]
    # A token is scored iff it is real and some real token of its segment precedes it.
    real_before_BxT = (segment_cumsum(mask_BxT, segment_ids_BxT) - mask_BxT.astype(jnp.int32)) > 0
    scored_BxR = (mask_BxT & real_before_BxT)[:, response_start:]
    per_token = _chunked(predictor_hidden_BxRxD, model.unembedding(), targets_BxR, chunk_size, temperature, precision,
                         stats)
    return tuple(jnp.where(scored_BxR, x, 0.0) for x in per_token)
