"""The run log: metric rows in a JSONL file that survives resume, and in TensorBoard."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


def to_python(value: Any) -> Any:
    """JSON-safe scalars (numpy / jax scalars → float/int; NaN/inf kept as strings)."""
    if isinstance(value, dict):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if hasattr(value, "item") and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Append-only ``metrics.jsonl``, one object per RL step with a ``step`` field.

    `truncate_after(step)` drops lines written after the checkpoint a run resumes from,
    so a resumed run's log reads exactly like an uninterrupted one. A line that is not a JSON
    object with an int ``step`` (cut by a kill, garbled on disk) loses only itself: reading skips
    it, and `truncate_after` moves it to ``metrics.jsonl.garbled`` and says so. With
    ``writable=False`` (every process but the first of a multi-host run) writes are no-ops.
    """

    def __init__(self, path: str, writable: bool = True):
        self.path = path
        self.writable = writable
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def read(self) -> list[dict]:
        """The rows that parse, in file order."""
        return self.load()[0]

    def load(self) -> tuple[list[dict], list[tuple[int, str]]]:
        """(rows that parse, (line number, text) of the lines that do not)."""
        if not os.path.exists(self.path):
            return [], []
        rows, garbled = [], []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    rows.append(row)
                else:
                    garbled.append((number, line))
        return rows, garbled

    def truncate_after(self, step: int) -> list[str]:
        """Keep the rows of steps <= ``step``; returns notes on anything that could not be kept."""
        if not self.writable:
            return []
        rows, garbled = self.load()
        notes = []
        if garbled:
            with open(self.path + ".garbled", "a", encoding="utf-8") as f:
                f.writelines(text + "\n" for _, text in garbled)
            numbers = ", ".join(str(n) for n, _ in garbled[:10]) + (" …" if len(garbled) > 10 else "")
            notes.append(f"{self.path}: {len(garbled)} unreadable line(s) (line {numbers}) moved to "
                         f"{self.path}.garbled; every other row is kept")
        rows = [r for r in rows if r["step"] <= step]
        missing = missing_steps(rows, step)
        if missing:
            notes.append(f"{self.path} has no row for {len(missing)} of the steps 0…{step} ({_spans(missing)}), "
                         f"lost before this resume; the summary reports only the rows that remain")
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)
        return notes

    def append(self, row: dict) -> None:
        if not self.writable:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(to_python(row)) + "\n")


def missing_steps(rows: list[dict], last_step: int) -> list[int]:
    """The steps 0…``last_step`` with no row (step 0 is the evaluation before training)."""
    return sorted(set(range(last_step + 1)) - {r["step"] for r in rows})


def _spans(steps: list[int]) -> str:
    """[0, 1, 2, 5] → "0–2, 5"."""
    spans, start = [], steps[0]
    for prev, cur in zip(steps, [*steps[1:], None]):
        if cur is None or cur != prev + 1:
            spans.append(f"{start}–{prev}" if prev > start else f"{start}")
            if cur is not None:  # None ends the last span
                start = cur
    return ", ".join(spans)


class TensorBoardLog:
    """Every numeric metric of a row as a TensorBoard scalar at the row's ``step``.

    Needs the ``tensorboardX`` package (in requirements.txt). A resumed run writes the steps
    after its checkpoint again; TensorBoard shows the latest value of each step. tensorboardX
    rewrites characters TensorBoard does not allow in tags: ``eval/avg@k`` becomes ``eval/avg_k``.
    """

    def __init__(self, directory: str):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("TrainConfig.tensorboard=True needs the tensorboardX package: "
                              "pip install 'fipo_jax[tensorboard]' (or tensorboardX)") from err
        self.directory = directory
        self._make_writer = SummaryWriter
        # A SummaryWriter, opened by the first row: a trainer refused before it logs writes no events file.
        self.writer: Any | None = None

    def append(self, row: dict) -> None:
        if self.writer is None:
            self.writer = self._make_writer(self.directory)
        step = int(row.get("step", 0))
        for key, value in row.items():
            number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            if key != "step" and number:
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class RunLog:
    """Where a run's metric rows go: ``metrics.jsonl`` and, optionally, TensorBoard.

    With ``writable=False`` (every process but the first of a multi-host run) nothing is written.
    """

    def __init__(self, run_dir: str, writable: bool = True, tensorboard: bool = False):
        self.jsonl = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), writable=writable)
        self.tensorboard = TensorBoardLog(os.path.join(run_dir, "tensorboard")) if tensorboard and writable else None

    def append(self, row: dict) -> None:
        self.jsonl.append(row)
        if self.tensorboard is not None:
            self.tensorboard.append(row)

    def truncate_after(self, step: int) -> list[str]:
        return self.jsonl.truncate_after(step)

    def read(self) -> list[dict]:
        return self.jsonl.read()

    def close(self) -> None:
        """Close the TensorBoard writer (its own exit hook fails when it runs at interpreter shutdown)."""
        if self.tensorboard is not None:
            self.tensorboard.close()


