"""Packing variable-length sequences into rows of a fixed token budget (host side, NumPy).

    lengths ─► first-fit decreasing (or one per row) ─► `Packing` (row and column of every sequence)
            ─► `pack`: [N, L] right-padded sequences → [R, budget] rows + segment ids + mask
            ─► `unpack`: any [R, budget] per-token result → [N, L] per sequence
            ─► `pack_batch`: a step's rollouts → the update's one batch type, `RLBatch`

The update has one batch layout: sequences in segments of rows. The "padded" layout is the packed
one with one sequence per row (`one_per_row`), so packed = padded holds by construction.

First-fit decreasing (FFD): sequences in order of decreasing length (ties: original order) each
go into the first row with room, else a new row. Deterministic, O(N·R), and within 11/9·OPT + 6/9
rows of the optimum. Padding inside a row gets its own segment id (−1), so nothing attends to it
and no per-segment sum reaches it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import numpy as np

from fipo_jax.core import _checks

PADDING_SEGMENT = -1


@dataclasses.dataclass(frozen=True)
class Packing:
    """Where each of N sequences lives: row `rows[i]`, columns [starts[i], starts[i] + lengths[i]).

    Segment ids are the sequence indices, so a row's segments are its sequences in column order.
    """

    rows: np.ndarray  # int [N]
    starts: np.ndarray  # int [N]
    lengths: np.ndarray  # int [N]
    num_rows: int
    budget: int

    @property
    def padding_fraction(self) -> float:
        """Share of the packed rows' tokens that are padding."""
        return 1.0 - float(self.lengths.sum()) / max(1, self.num_rows * self.budget)


def first_fit_decreasing(lengths, budget: int) -> Packing:
    """Packs sequences of `lengths` tokens into rows of `budget` tokens (FFD, deterministic).

    A sequence longer than the budget is an error (it would have to be cut, silently changing
    what is trained on); zero-length sequences take no room (row 0, start 0).
    """
    _checks.check_int("budget", budget, minimum=1)
    lengths = np.asarray(lengths)
    _checks.require(lengths.ndim == 1 and np.issubdtype(lengths.dtype, np.integer) and (lengths >= 0).all(),
                    f"lengths must be a 1-D array of non-negative ints, got {lengths.dtype}{list(lengths.shape)}")
    too_long = np.flatnonzero(lengths > budget)
    _checks.require(too_long.size == 0, f"sequences {too_long[:8].tolist()} have {lengths[too_long[:8]].tolist()} "
                                        f"tokens, more than the row budget of {budget}; raise the budget to at least "
                                        f"{int(lengths.max())}")
    rows = np.zeros(len(lengths), np.int64)
    starts = np.zeros(len(lengths), np.int64)
    used: list[int] = []  # tokens used per row
    for i in np.argsort(-lengths, kind="stable"):
        if lengths[i] == 0:
            continue
        row = next((r for r, n in enumerate(used) if n + lengths[i] <= budget), len(used))
        if row == len(used):
            used.append(0)
        rows[i], starts[i] = row, used[row]
        used[row] += int(lengths[i])
    return Packing(rows, starts, lengths.astype(np.int64), max(1, len(used)), int(budget))


def pack(values_NxL: np.ndarray, packing: Packing, fill=0) -> np.ndarray:
    """[N, L] right-aligned-at-column-0 per-sequence values → [R, budget] packed rows (`fill` elsewhere)."""
    values_NxL = np.asarray(values_NxL)
    out = np.full((packing.num_rows, packing.budget) + values_NxL.shape[2:], fill, values_NxL.dtype)
    for i, (row, start, length) in enumerate(zip(packing.rows, packing.starts, packing.lengths)):
        out[row, start:start + length] = values_NxL[i, :length]
    return out


def segment_ids(packing: Packing) -> np.ndarray:
    """int32 [R, budget]: the sequence index at each packed token, `PADDING_SEGMENT` at padding."""
    return pack(np.repeat(np.arange(len(packing.lengths), dtype=np.int32)[:, None], max(1, packing.lengths.max(
        initial=0)), axis=1), packing, fill=PADDING_SEGMENT)


def unpack(values_RxB: np.ndarray, packing: Packing, width: int, fill=0) -> np.ndarray:
    """[R, budget] packed per-token values → [N, width] per sequence (columns ≥ length: `fill`)."""
    values_RxB = np.asarray(values_RxB)
    out = np.full((len(packing.lengths), width) + values_RxB.shape[2:], fill, values_RxB.dtype)
    for i, (row, start, length) in enumerate(zip(packing.rows, packing.starts, packing.lengths)):
        out[i, :length] = values_RxB[row, start:start + length]
    return out


def one_per_row(lengths, budget: int) -> Packing:
    """Sequence i in row i from column 0: the padded layout as a `Packing` (each length ≤ budget)."""
    placed = first_fit_decreasing(lengths, budget)  # the same checks; its placement is replaced
    count = len(placed.lengths)
    return Packing(np.arange(count, dtype=np.int64), np.zeros(count, np.int64), placed.lengths, max(1, count),
                   placed.budget)


LAYOUTS = {"packed": first_fit_decreasing, "padded": one_per_row}


# ----------------------------------------------------------------------------- the update's batch


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["input_ids", "segment_ids", "response_mask", "sampler_log_probs", "scores",
                                "sequences", "lags"],
                   meta_fields=["response_width"])
@dataclasses.dataclass(frozen=True)
class RLBatch:
    """One step's kept rollouts in rows of L tokens, [M, K, R, L] per token: M mini-batches of K
    micro-batches of R rows (R is split over the mesh's data axis).

    Sequence s (rollout order) holds its real prompt tokens then its response tokens in one
    segment of one row (segment id s); responses without tokens are placed nowhere but counted."""

    input_ids: Any  # [M, K, R, L] int32
    segment_ids: Any  # [M, K, R, L] int32: s on sequence s's tokens, PADDING_SEGMENT elsewhere
    response_mask: Any  # [M, K, R, L] bool: response tokens
    sampler_log_probs: Any  # [M, K, R, L] float32 on response tokens, 0 elsewhere
    scores: Any  # [S] float32 shaped scores, rollout order (groups of group_size contiguous)
    sequences: Any  # [M, K] float32: sequences each micro-batch holds, responses without tokens included
    response_width: int  # N, the sampler's response width (the "-norm" aggregations' horizon)
    lags: Any = None  # [S] int32: versions each sequence's sampling weights lag the update's (0: its own)


SEQUENCE_FIELDS = ("prompt_ids", "prompt_mask", "tokens", "response_mask", "scores", "sampler_log_probs")


# Micro-batches take row counts 1 … 4, then 2^k · {1, 1.25, 1.5, 1.75} (5, 6, 7, 8, 10, 12, 14,
# 16, 20, …): four shapes per doubling (one compile each), less than a quarter of the rows wasted.
def bucket_size(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, … that is ≥ n (n ≥ 1)."""
    _checks.check_int("n", n, minimum=1)
    if n <= 4:
        return n
    step = (1 << ((n - 1).bit_length() - 1)) // 4  # a quarter of the largest power of two below n
    return -(-n // step) * step


def check_sequence_fields(fields: dict[str, np.ndarray], mini_batches: int, micro_batch_size: int,
                          row_multiple: int) -> None:
    """`pack_batch`'s contract: the six `SEQUENCE_FIELDS`, one row per score, prompt fields [B, P]
    and response fields [B, N] alike, B a multiple of M, R a multiple of the data split."""
    rows = len(fields["scores"]) if "scores" in fields else 0
    _checks.require(set(fields) == set(SEQUENCE_FIELDS), f"fields must be {SEQUENCE_FIELDS}, got {tuple(fields)}")
    for name in SEQUENCE_FIELDS:
        shape = np.shape(fields[name])
        paired = "prompt_mask" if name.startswith("prompt") else "response_mask"
        _checks.require(shape[0] == rows and (name == "scores" or shape == np.shape(fields[paired])),
                        f"fields[{name!r}] has shape {shape}: every field needs {rows} rows (one per score), "
                        f"prompt fields [B, P] and response fields [B, N] alike")
    _checks.require(rows % mini_batches == 0, f"{rows} sequences do not split into {mini_batches} mini-batches")
    _checks.check_int("micro_batch_size", micro_batch_size, minimum=1)
    _checks.check_int("row_multiple", row_multiple, minimum=1)
    _checks.require(micro_batch_size % row_multiple == 0, f"micro_batch_size ({micro_batch_size}) must be a multiple "
                                                          f"of row_multiple ({row_multiple})")


def micro_batch_shape(rows_needed: int, micro_batch_size: int, row_multiple: int) -> tuple[int, int]:
    """(K, R) for a mini-batch of ``rows_needed`` rows: K = the fewest micro-batches of at most
    ``micro_batch_size`` rows that hold them, R = `bucket_size` of their share (few distinct
    shapes, so few compiles) in units of ``row_multiple``, never above ``micro_batch_size``."""
    units = -(-rows_needed // row_multiple)
    max_units = micro_batch_size // row_multiple
    count = -(-units // max_units)
    return count, min(bucket_size(-(-units // count)), max_units) * row_multiple


def sequence_rows(fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each sequence as one right-padded row of P + N columns: ``input_ids`` (its real prompt tokens,
    then its response tokens), ``sampler_log_probs`` (0 on the prompt) and ``response_mask``;
    plus ``lengths`` [B], its token count (0 when the response is empty: it is placed nowhere)."""
    prompt_mask, response_mask = np.asarray(fields["prompt_mask"], bool), np.asarray(fields["response_mask"], bool)
    count, width = len(prompt_mask), prompt_mask.shape[1] + response_mask.shape[1]
    prompt_len, response_len = prompt_mask.sum(axis=1), response_mask.sum(axis=1)
    lengths = (prompt_len + response_len) * (response_len > 0)
    out = {"input_ids": np.zeros((count, width), np.int32), "sampler_log_probs": np.zeros((count, width), np.float32),
           "response_mask": np.zeros((count, width), bool), "lengths": lengths.astype(np.int64)}
    for i in np.flatnonzero(lengths):
        p, n = prompt_len[i], response_len[i]
        out["input_ids"][i, :p + n] = np.concatenate([fields["prompt_ids"][i][prompt_mask[i]],
                                                      fields["tokens"][i][response_mask[i]]])
        out["sampler_log_probs"][i, p:p + n] = fields["sampler_log_probs"][i][response_mask[i]]
        out["response_mask"][i, p:p + n] = True
    return out


def _place(rows: dict[str, np.ndarray], placement: Packing, first: int, num_rows: int) -> dict[str, np.ndarray]:
    """One mini-batch's sequences (global indices ``first`` …) `pack`ed by ``placement`` into
    ``num_rows`` rows, segment ids made global."""
    grow = lambda x, fill: np.concatenate(  # noqa: E731  to num_rows rows
        [x, np.full((num_rows - len(x),) + x.shape[1:], fill, x.dtype)])
    local = segment_ids(placement)
    placed = {name: grow(pack(rows[name], placement), 0)
              for name in ("input_ids", "sampler_log_probs", "response_mask")}
    placed["segment_ids"] = grow(np.where(local == PADDING_SEGMENT, PADDING_SEGMENT, local + first), PADDING_SEGMENT)
    return placed


def pack_batch(fields: dict[str, np.ndarray], mini_batches: int, micro_batch_size: int, row_multiple: int = 1,
               layout: Literal["packed", "padded"] = "packed",
               lags: np.ndarray | None = None) -> tuple[RLBatch, dict[str, float]]:
    """Host arrays of B sequences → the update's `RLBatch`.

    ``fields``: ``prompt_ids`` / ``prompt_mask`` [B, P] (any padding), ``tokens`` /
    ``response_mask`` / ``sampler_log_probs`` [B, N], ``scores`` [B]. Mini-batch m holds sequences
    [m·B/M, (m+1)·B/M); each places its sequences with responses (real prompt tokens + response)
    in rows of L = P + N tokens by ``layout`` (`LAYOUTS`: first-fit decreasing, or one per row).
    ``lags`` [B] (default 0): how many versions each sequence's sampling weights lag the update's.
    Every micro-batch is [R, L] with R ≤ ``micro_batch_size`` (`micro_batch_shape`, for the
    fullest mini-batch; R a multiple of ``row_multiple``, the data-parallel split).

    Returns the batch and ``{"padding_frac", "padding_frac_unpacked", "rows", "unpacked_rows"}``:
    the share of the batch's tokens that are padding (tokens of no sequence with a response), the
    same for one sequence per row, and both row counts.
    """
    _checks.check_choice("layout", layout, LAYOUTS)
    check_sequence_fields(fields, mini_batches, micro_batch_size, row_multiple)
    count, width = len(fields["scores"]), fields["prompt_ids"].shape[1] + fields["tokens"].shape[1]
    rows = sequence_rows(fields)
    per_mini = count // mini_batches
    minis = [slice(m * per_mini, (m + 1) * per_mini) for m in range(mini_batches)]
    placements = [LAYOUTS[layout](rows["lengths"][mini], width) for mini in minis]
    n_micro, micro_rows = micro_batch_shape(max(p.num_rows for p in placements), micro_batch_size, row_multiple)
    sliced = [_place({k: v[mini] for k, v in rows.items()}, placed, mini.start, n_micro * micro_rows)
              for mini, placed in zip(minis, placements)]
    split = lambda x: x.reshape((mini_batches, n_micro, micro_rows) + x.shape[1:])  # noqa: E731
    stacked = {name: split(np.concatenate([s[name] for s in sliced])) for name in sliced[0]}
    sequences = np.stack([np.bincount(p.rows // micro_rows, minlength=n_micro) for p in placements]).astype(np.float32)
    lags = np.zeros(count, np.int32) if lags is None else np.asarray(lags, np.int32)
    _checks.require(lags.shape == (count,), f"lags has shape {lags.shape}: one per sequence ({count},) needed")
    batch = RLBatch(**stacked, scores=np.asarray(fields["scores"], np.float32), sequences=sequences,
                    response_width=int(fields["tokens"].shape[1]), lags=lags)
    tokens = float(rows["lengths"].sum())
    stats = {"padding_frac": 1.0 - tokens / batch.input_ids.size,
             "padding_frac_unpacked": 1.0 - tokens / (count * width),
             "rows": float(mini_batches * n_micro * micro_rows), "unpacked_rows": float(count)}
    return batch, stats


def abstract_batch(mini_batches: int, micro_batches: int, rows: int, width: int, response_width: int,
                   sequences: int | None = None) -> RLBatch:
    """Shapes and dtypes of an `RLBatch` [M, K, R, L] (for ahead-of-time compiles and planning);
    ``sequences`` defaults to one per row (M·K·R)."""
    spec = jax.ShapeDtypeStruct
    tokens = (mini_batches, micro_batches, rows, width)
    count = mini_batches * micro_batches * rows if sequences is None else sequences
    return RLBatch(input_ids=spec(tokens, np.int32), segment_ids=spec(tokens, np.int32),
                   response_mask=spec(tokens, np.bool_), sampler_log_probs=spec(tokens, np.float32),
                   scores=spec((count,), np.float32), sequences=spec((mini_batches, micro_batches), np.float32),
                   response_width=response_width, lags=spec((count,), np.int32))
