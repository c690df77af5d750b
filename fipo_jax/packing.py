"""Packing variable-length sequences into rows of a fixed token budget (host side, NumPy).

    lengths ─► first-fit decreasing ─► `Packing` (row and column of every sequence)
            ─► `pack`: [N, L] right-padded sequences → [R, budget] rows + segment ids + mask
            ─► `unpack`: any [R, budget] per-token result → [N, L] per sequence

First-fit decreasing (FFD): sequences in order of decreasing length (ties: original order) each
go into the first row with room, else a new row. Deterministic, O(N·R), and within 11/9·OPT + 6/9
rows of the optimum. Padding inside a row gets its own segment id (−1), so nothing attends to it
and no per-segment sum reaches it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fipo_jax import _checks

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
