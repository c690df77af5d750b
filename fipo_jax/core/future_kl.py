"""Discounted Future-KL, FIPO Eq. 6: a reverse discounted sum over the time axis.

    FutureKL_t = Σ_{k=t}^{T-1} γ^{k−t} · x_k,        γ = 2^(−1/τ)
    x_k        = Δlog p_k · mask_k · 1[Δlog p_k ≤ log c]

Equivalently `F_{T-1} = x_{T-1}`, `F_t = x_t + γ F_{t+1}` (inclusive of token t).

Three exact algorithms share one signature (time axis last, any leading axes):

* ``"scan"``        the reverse recurrence with ``lax.scan``: O(T) work, T sequential steps.
* ``"associative"`` the same recurrence as a parallel prefix scan over ``(γ, x)`` pairs
                    with ``lax.associative_scan``: O(T log T) work, O(log T) depth.
* ``"blocked"``     two-level blocked form for matrix units: inside each block of K tokens
                    an upper-triangular γ-Toeplitz matmul, across blocks a second
                    triangular matmul over the block-start values carries the tail in.
                    O(T·(K + T/K)) flops, no sequential loop.

Context parallelism (the time axis split over devices): inside `jax.shard_map`, pass the mesh
axis as ``axis_name``; each shard runs the chosen method on its own slice and the discounted tail
of the later shards is carried in — shard s starts from C_{s+1}, the true F at the first token of
shard s+1, found from one all-gather of two numbers per row and shard (C_s = F^local_s,0 +
γ^len · C_{s+1} while the first token's sequence runs through shard s). `context_parallel_future_kl`
does the `shard_map` for a jitted program whose arrays are split over a mesh axis.

None of them uses the "cumsum of γ^(−t)·x" shortcut: γ^(−t) overflows float32 for
t ≳ 4,096 at τ = 32 and loses precision long before. ``"quadratic"`` is the official
release's O(T²) chunked distance-matrix formulation, kept as a slow reference.
"""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from fipo_jax.core import _checks
from fipo_jax.core.segments import check_segment_ids, segment_continues, segment_runs

# The methods, declared once: "auto" (the measured fastest for the backend) or one of `METHODS`.
FutureKLMethod = Literal["auto", "scan", "associative", "blocked", "quadratic"]
METHOD_CHOICES: tuple[str, ...] = get_args(FutureKLMethod)
METHODS: tuple[str, ...] = tuple(m for m in METHOD_CHOICES if m != "auto")

# Fastest method per backend, from `experiments/bench_loss.py` / `bench_accelerator.py` (FIPO loss +
# gradient). CPU (the project's 2-core machine): XLA compiles the sequential scan into a tight loop
# (~5 ns/step). GPU (one H200, jax 0.11.2): "associative" 0.071 ms at 2 × 20,480 vs "blocked"/128
# 2.97 ms (42×) and "scan" 401 ms; the loss with it is 1.06–1.18× DAPO's. TPU: not measured; the
# same choice by the same evidence — an elementwise log-depth form, where "blocked" needs float32
# matmuls at HIGHEST precision (6 bf16 MXU passes on a TPU) and "scan" a T-step device loop.
DEFAULT_METHOD_BY_BACKEND: dict[str, FutureKLMethod] = {"cpu": "scan", "gpu": "associative", "tpu": "associative"}
# Block length K of "blocked" (the official chunk, 128, for "quadratic"). Small blocks win
# on CPU (fewer wasted flops in the triangular matmul); 128 fills a TPU/GPU matrix unit.
DEFAULT_BLOCK_SIZE_BY_BACKEND = {"cpu": 32, "gpu": 128, "tpu": 128}
DEFAULT_BLOCK_SIZE = 128
_HIGHEST = lax.Precision.HIGHEST  # TPUs default f32 matmuls to bf16 passes.


def discount_factor(decay_rate) -> jax.Array | float:
    """γ = 2^(−1/τ): the weight of a token τ positions ahead is one half."""
    if isinstance(decay_rate, (int, float)):
        return 2.0 ** (-1.0 / decay_rate)
    return jnp.exp2(-1.0 / jnp.asarray(decay_rate, jnp.float32))


def default_method(backend: str | None = None) -> FutureKLMethod:
    """The Future-KL method used when ``method="auto"`` on ``backend`` (default: JAX's)."""
    return DEFAULT_METHOD_BY_BACKEND.get(backend or jax.default_backend(), "associative")


def default_block_size(method: str, backend: str | None = None) -> int:
    """The block length used when ``block_size=None``."""
    if method == "blocked":
        return DEFAULT_BLOCK_SIZE_BY_BACKEND.get(backend or jax.default_backend(), DEFAULT_BLOCK_SIZE)
    return DEFAULT_BLOCK_SIZE


def discounted_reverse_cumsum(
    x: jax.Array,
    gamma,
    method: FutureKLMethod = "auto",
    block_size: int | None = None,
    segment_ids: jax.Array | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """F_t = Σ_{k≥t} γ^{k−t} x_k along the last axis, i.e. F_t = x_t + γ F_{t+1}.

    With ``segment_ids`` the sum stops at each segment boundary (packed sequences):

        F_t = x_t + γ · [seg_{t+1} = seg_t] · F_{t+1}

    i.e. F_t sums only the tokens k ≥ t of t's own run of equal ids.

    Args:
      x: ``[..., T]`` floating array.
      gamma: discount in (0, 1]; a Python float or a traced scalar (so it can be vmapped).
      method: ``"auto"``, ``"scan"``, ``"associative"``, ``"blocked"`` or ``"quadratic"``.
      block_size: block length K of the ``"blocked"`` and ``"quadratic"`` methods;
        ``None`` takes the measured default for the backend.
      segment_ids: optional integer ``[..., T]``; a new segment starts wherever the id changes.
      axis_name: inside `jax.shard_map`, the mesh axis the time axis is split over (``x`` is this
        shard's contiguous slice, shards in axis-index order); the result is the unsplit one's slice.

    Returns:
      ``[..., T]`` array of the same dtype as ``x``.
    """
    if method == "auto":
        method = default_method()
    _checks.check_choice("method", method, METHOD_CHOICES)
    if block_size is None:
        block_size = default_block_size(method)
    _checks.check_int("block_size", block_size, minimum=1)
    if x.shape[-1] == 0:
        return x
    if isinstance(gamma, (int, np.floating)):
        gamma = float(gamma)
    if not isinstance(gamma, float):
        gamma = jnp.asarray(gamma, x.dtype)
    if segment_ids is not None:
        check_segment_ids(segment_ids, x.shape)
    if method in ("scan", "associative"):
        continues = None if segment_ids is None else segment_continues(segment_ids)
        local = (_reverse_scan if method == "scan" else _associative)(x, gamma, continues)
    else:
        runs = None if segment_ids is None else segment_runs(segment_ids)
        local = (_blocked if method == "blocked" else _quadratic)(x, gamma, block_size, runs)
    if axis_name is None:
        return local
    return _carry_in_later_shards(local, gamma, segment_ids, axis_name)


def _carry_in_later_shards(local: jax.Array, gamma, segment_ids: jax.Array | None, axis_name: str) -> jax.Array:
    """Add the discounted tail of the later shards of ``axis_name`` to this shard's local sums.

    With L tokens per shard, b_s = local F at shard s's first token, a_s = γ^L if that token's run
    reaches the shard's end (else 0) and c_s = [shard s's last token continues into shard s+1]:

        C_s = b_s + a_s · c_s · C_{s+1}              (true F at shard s's first token)
        F_t = local_t + γ^{L−t} · c_s · C_{s+1}      (t in the shard's last run; others unchanged)

    One all-gather of (b, a, first id, last id) per row and shard; the shard-level recurrence is tiny.
    """
    length = local.shape[-1]
    if segment_ids is None:
        in_last_run = jnp.ones(local.shape, bool)
        first_id = last_id = jnp.zeros(local.shape[:-1], jnp.int32)
    else:
        runs = segment_runs(segment_ids)
        in_last_run = runs == runs[..., -1:]
        first_id, last_id = segment_ids[..., 0], segment_ids[..., -1]
    spans = jnp.where(in_last_run[..., 0], _decay_powers(gamma, np.asarray(length), local.dtype), 0.0)
    gathered = lax.all_gather((local[..., 0], spans, first_id, last_id), axis_name, axis=local.ndim - 1)
    heads, spans, first_ids, last_ids = gathered  # [..., shards]
    # c_s: shard s's last token and shard s+1's first token are one sequence (never after the last shard).
    continues = jnp.concatenate([last_ids[..., :-1] == first_ids[..., 1:],
                                 jnp.zeros_like(first_ids[..., :1], bool)], axis=-1)
    starts = _associative(heads, jnp.where(continues, spans, 0.0))  # C_s for every shard
    incoming = jnp.concatenate([starts[..., 1:], jnp.zeros_like(starts[..., :1])], axis=-1)
    incoming = jnp.where(continues, incoming, 0.0)
    incoming = jnp.take(incoming, lax.axis_index(axis_name), axis=-1)[..., None]
    decay_to_next = _decay_powers(gamma, length - np.arange(length), local.dtype)
    return local + jnp.where(in_last_run, decay_to_next * incoming, 0.0)


def future_kl(
    delta_log_probs: jax.Array,
    mask: jax.Array,
    decay_rate: float | jax.Array,
    filter_threshold: float | None = None,
    method: FutureKLMethod = "auto",
    block_size: int | None = None,
    segment_ids: jax.Array | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """Discounted Future-KL of FIPO (paper Eq. 5–6; official `compute_policy_loss_future_kl`).

        FutureKL_t = Σ_{k≥t} γ^{k−t} · Δlog p_k · mask_k · 1[Δlog p_k ≤ log(threshold)]

    with γ = 2^(−1/decay_rate). The filter is one-sided (only Δlog p > log c is dropped,
    whatever the advantage sign) and a filtered or padded token contributes 0 without
    shifting the positions of the others.

    Args:
      delta_log_probs: ``[..., T]`` log π_θ − log π_old per token (float).
      mask: ``[..., T]`` response mask, bool or 0/1 numbers; non-zero marks a real token.
      decay_rate: τ > 0, the half-life in tokens (official recipe: 32).
      filter_threshold: ratio threshold c > 0 of the extreme-ratio filter (official:
        ``clip_ratio_c`` = 10); ``None`` disables the filter.
      method: algorithm (see module docstring); ``"auto"`` picks the measured fastest
        for the current backend. All are exact to float32 rounding.
      block_size: K for ``"blocked"`` / ``"quadratic"`` (``None``: backend default).
      segment_ids: optional integer ``[..., T]`` for packed rows: the sum never crosses a change
        of id, so each packed sequence gets exactly its own Future-KL.

    Returns:
      ``[..., T]`` float32 (or float64 under x64) Future-KL, zero where masked.

    Examples:
      >>> import jax.numpy as jnp
      >>> f = future_kl(jnp.array([[0.1, 0.2, 0.3]]), jnp.ones((1, 3)), decay_rate=1.0)
      >>> [round(float(v), 4) for v in f[0]]  # γ = 1/2
      [0.275, 0.35, 0.3]
    """
    _checks.check_floating("delta_log_probs", delta_log_probs, min_rank=1)
    _checks.check_mask("mask", mask, "delta_log_probs", delta_log_probs)
    _checks.check_positive("decay_rate", decay_rate)
    if filter_threshold is not None:
        _checks.check_positive("filter_threshold", filter_threshold)
    delta = jnp.asarray(delta_log_probs)
    delta = delta.astype(jnp.promote_types(delta.dtype, jnp.float32))
    x = jnp.where(summed_tokens(delta, mask, filter_threshold), delta, 0.0)
    return discounted_reverse_cumsum(x, discount_factor(decay_rate), method, block_size, segment_ids, axis_name)


def context_parallel_future_kl(
    delta_log_probs: jax.Array,
    mask: jax.Array,
    decay_rate: float,
    mesh_axis: str,
    filter_threshold: float | None = None,
    method: FutureKLMethod = "auto",
    block_size: int | None = None,
    segment_ids: jax.Array | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> jax.Array:
    """`future_kl` with the time axis (last) split over ``mesh_axis``: each device runs ``method``
    on its slice and the tail of later slices is carried in, so nothing of length T is gathered.

    For jitted code whose arrays are split over a context / sequence mesh axis: only
    ``mesh_axis`` is manual (`jax.shard_map` with ``axis_names={mesh_axis}``); leading axes keep
    whatever sharding the compiler gives them. ``mesh`` defaults to the one set by `jax.set_mesh`.
    Equal to `future_kl` of the whole row to float32 rounding. T must divide by the axis size.
    """
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh_axis not in mesh.axis_names:
        raise ValueError(f"context_parallel_future_kl: mesh axis {mesh_axis!r} is not in the mesh's axes "
                         f"{tuple(mesh.axis_names)} (pass mesh= or call under jax.set_mesh(mesh))")
    shards, length = mesh.shape[mesh_axis], jnp.shape(delta_log_probs)[-1]
    if length % shards:
        raise ValueError(f"context_parallel_future_kl: the time axis ({length}) must divide by the size of mesh "
                         f"axis {mesh_axis!r} ({shards})")
    spec = PartitionSpec(*([None] * (jnp.ndim(delta_log_probs) - 1)), mesh_axis)
    _checks.check_mask("mask", mask, "delta_log_probs", delta_log_probs)
    operands = (delta_log_probs, jnp.asarray(mask)) + (() if segment_ids is None else (segment_ids,))

    def per_shard(delta, shard_mask, *ids):
        return future_kl(delta, shard_mask, decay_rate, filter_threshold, method, block_size,
                         ids[0] if ids else None, axis_name=mesh_axis)

    return jax.shard_map(per_shard, mesh=mesh, in_specs=spec, out_specs=spec,
                         axis_names=frozenset({mesh_axis}))(*operands)


def summed_tokens(delta_log_probs: jax.Array, mask: jax.Array, filter_threshold: float | None = None) -> jax.Array:
    """The tokens `future_kl` sums: real (mask ≠ 0) and, with a filter, Δlog p ≤ log(threshold).

        keep_t = mask_t ∧ (Δlog p_t ≤ log c)

    Real tokens outside it are the ones FIPO's extreme-ratio filter drops (paper E2)."""
    delta = jnp.asarray(delta_log_probs)
    keep = jnp.asarray(mask) != 0
    if filter_threshold is not None:
        keep = keep & (delta <= jnp.log(jnp.asarray(filter_threshold, delta.dtype)))
    return keep


def _reverse_scan(x: jax.Array, gamma: jax.Array, continues: jax.Array | None = None) -> jax.Array:
    """F_t = x_t + γ·c_t·F_{t+1} as a reverse `lax.scan` over time (carry: leading dims);
    c_t = `continues` (1 when None)."""
    x_TxN = jnp.moveaxis(x, -1, 0)
    gamma = jnp.asarray(gamma, x.dtype)
    if continues is None:
        def step(carry_N, x_N):
            f_N = x_N + gamma * carry_N
            return f_N, f_N

        _, f_TxN = lax.scan(step, jnp.zeros_like(x_TxN[0]), x_TxN, reverse=True)
    else:
        def step(carry_N, inputs):
            x_N, continues_N = inputs
            f_N = x_N + jnp.where(continues_N, gamma * carry_N, 0.0)
            return f_N, f_N

        _, f_TxN = lax.scan(step, jnp.zeros_like(x_TxN[0]), (x_TxN, jnp.moveaxis(continues, -1, 0)), reverse=True)
    return jnp.moveaxis(f_TxN, 0, -1)


def _associative(x: jax.Array, gamma: jax.Array, continues: jax.Array | None = None) -> jax.Array:
    """Parallel form of the recurrence: compose affine maps h ↦ a·h + b from the end
    (``gamma``: a scalar or one factor per position).

    combine((a₁, b₁), (a₂, b₂)) = (a₁a₂, b₁a₂ + b₂), where element 1 comes first in
    scan order (i.e. later in time, since the scan runs in reverse). With segments a_t = γ·c_t.
    """

    def combine(first, second):
        a1, b1 = first
        a2, b2 = second
        return a1 * a2, b1 * a2 + b2

    gammas = jnp.broadcast_to(jnp.asarray(gamma, x.dtype), x.shape)
    if continues is not None:  # a_t = γ·c_t: the map at a boundary forgets h
        gammas = jnp.where(continues, gammas, 0.0)
    _, f = lax.associative_scan(combine, (gammas, x), reverse=True, axis=x.ndim - 1)
    return f


def _decay_powers(gamma, exponents: np.ndarray, dtype) -> jax.Array:
    """γ^e elementwise. A concrete γ is raised on the host in float64, so the result is an
    exactly rounded constant of the compiled program; a traced γ is raised on device."""
    if isinstance(gamma, float):
        return jnp.asarray(np.power(gamma, exponents, dtype=np.float64), dtype)
    return jnp.power(jnp.asarray(gamma, dtype), jnp.asarray(exponents, dtype))


def _toeplitz_upper(gamma, size: int, dtype) -> jax.Array:
    """M[i, j] = γ^{j−i} for j ≥ i, else 0: the [size, size] in-block decay matrix."""
    distance = np.arange(size)[None, :] - np.arange(size)[:, None]
    decay = _decay_powers(gamma, np.maximum(distance, 0), dtype)
    return jnp.where(jnp.asarray(distance >= 0), decay, 0.0).astype(dtype)


def _blocked(x: jax.Array, gamma, block_size: int, runs: jax.Array | None = None) -> jax.Array:
    """Blocked Future-KL: a Toeplitz matmul inside blocks plus a carried term.

    With blocks of K tokens, local_{b,i} = Σ_{j≥i} γ^{j−i} x_{b,j} is one [K, K] matmul
    for all blocks at once. The value at each block start obeys the short recurrence
    S_b = local_{b,0} + γ^K S_{b+1} (T/K sequential steps), and
    F_{b,i} = local_{b,i} + γ^{K−i} S_{b+1}.

    With segment runs r, the in-block matrix is masked by [r_i = r_j] per row (a batched
    product instead of one shared matrix) and every carried term by [r_{b,i} = r_{b+1,0}].
    """
    t = x.shape[-1]
    k = min(block_size, t)
    n_blocks = -(-t // k)
    pad = n_blocks * k - t
    widths = [(0, 0)] * (x.ndim - 1) + [(0, pad)]
    # Zeros appended after the end do not change any earlier F_t (in their own run with segments).
    x_NxK = jnp.pad(x, widths).reshape(*x.shape[:-1], n_blocks, k)
    toeplitz_KxK = _toeplitz_upper(gamma, k, x.dtype)
    starts_decay = _decay_powers(gamma, np.asarray(k), x.dtype)
    tail_decay = _decay_powers(gamma, k - np.arange(k), x.dtype).reshape((1,) * x.ndim + (k,))
    if runs is None:
        local = jnp.einsum("...bj,ij->...bi", x_NxK, toeplitz_KxK, precision=_HIGHEST)
        starts = _reverse_scan(local[..., 0], starts_decay)
        carried_in: jax.Array | float = 1.0
    else:
        runs_NxK = jnp.pad(runs, widths, constant_values=-1).reshape(*x.shape[:-1], n_blocks, k)
        same_NxKxK = runs_NxK[..., :, None] == runs_NxK[..., None, :]
        local = jnp.einsum("...bj,...bij->...bi", x_NxK, jnp.where(same_NxKxK, toeplitz_KxK, 0.0),
                           precision=_HIGHEST)
        next_first = jnp.concatenate([runs_NxK[..., 1:, 0], jnp.full_like(runs_NxK[..., :1, 0], -2)], axis=-1)
        carried_in = runs_NxK == next_first[..., None]  # token (b, i) continues into block b + 1
        starts = _reverse_scan(local[..., 0], starts_decay, carried_in[..., 0])
    next_start = jnp.concatenate([starts[..., 1:], jnp.zeros_like(starts[..., :1])], axis=-1)
    f = local + jnp.where(carried_in, next_start[..., None] * tail_decay, 0.0)
    return f.reshape(*x.shape[:-1], n_blocks * k)[..., :t]


def _quadratic(x: jax.Array, gamma, chunk: int, runs: jax.Array | None = None) -> jax.Array:
    """The official release's algorithm: Σ over column chunks of x[:, J] @ D[:, J]ᵀ,
    D[i, j] = γ^{j−i}·1[j ≥ i]. O(T²) flops and O(T·chunk) memory per chunk. Reference only.
    The [T, chunk] decay blocks are built on device (as constants they would be O(T²) bytes).
    With segment runs the decay is masked by [r_t = r_k] per row.
    """
    t = x.shape[-1]
    gamma = jnp.asarray(gamma, x.dtype)
    pos_i = jnp.arange(t)[:, None]
    out = jnp.zeros_like(x)
    for start in range(0, t, chunk):
        distance = jnp.arange(start, min(t, start + chunk))[None, :] - pos_i
        decay_TxK = jnp.where(distance >= 0, jnp.power(gamma, jnp.maximum(distance, 0).astype(x.dtype)), 0.0)
        if runs is None:
            out = out + jnp.einsum("...k,tk->...t", x[..., start : start + chunk], decay_TxK, precision=_HIGHEST)
        else:
            same = runs[..., :, None] == runs[..., None, start : start + chunk]
            out = out + jnp.einsum("...k,...tk->...t", x[..., start : start + chunk],
                                   jnp.where(same, decay_TxK, 0.0), precision=_HIGHEST)
    return out


__all__ = [
    "DEFAULT_METHOD_BY_BACKEND",
    "METHODS",
    "METHOD_CHOICES",
    "context_parallel_future_kl",
    "default_method",
    "discount_factor",
    "discounted_reverse_cumsum",
    "future_kl",
    "summed_tokens",
]
