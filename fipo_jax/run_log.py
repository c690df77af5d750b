"""The run log: metrics as a JSONL file that survives resume, summaries, and PNG plots."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

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
    for prev, cur in zip(steps, steps[1:] + [None]):
        if cur is None or cur != prev + 1:
            spans.append(f"{start}–{prev}" if prev > start else f"{start}")
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
        self.writer = None  # opened by the first row: a trainer refused before it logs writes no events file

    def append(self, row: dict) -> None:
        if self.writer is None:
            self.writer = self._make_writer(self.directory)
        step = int(row.get("step", 0))
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def length_stats(lengths: Iterable[int], max_length: int) -> dict[str, float]:
    """Mean, median, quartiles, max and the share of responses cut at `max_length`."""
    x = np.asarray(list(lengths), np.float64)
    if x.size == 0:
        return {}
    q25, q50, q75 = np.percentile(x, [25, 50, 75])
    return {"mean": float(x.mean()), "median": float(q50), "q25": float(q25), "q75": float(q75),
            "max": float(x.max()), "clip_rate": float(np.mean(x >= max_length))}


def plot_run(rows: list[dict], out_dir: str, title: str = "") -> list[str]:
    """PNG plots of accuracy, response length and influence weights over steps."""
    from fipo_jax._requires import import_module

    Figure = import_module("matplotlib.figure", "train").Figure  # no pyplot: leaves the caller's backend alone

    os.makedirs(out_dir, exist_ok=True)
    panels = [
        ("accuracy.png", "accuracy", [("rollout/accuracy", "train rollouts"), ("eval/avg@k", "held-out avg@k"),
                                      ("eval/pass@k", "held-out pass@k")]),
        ("length.png", "response length (tokens)", [("rollout/length_mean", "mean"), ("rollout/length_median", "median")]),
        ("influence_weights.png", "influence weight", [("actor/influence_weights_mean", "mean"),
                                                       ("actor/influence_weights_max", "max"),
                                                       ("actor/influence_weights_min", "min")]),
        ("influence_activity.png", "fraction of tokens", [("influence/active_frac", "|f − 1| > 0.01 (loss tokens)"),
                                                         ("influence/filtered_frac", "ratio-filtered"),
                                                         ("influence/safety_clamp_frac", "safety-clamped")]),
    ]
    written = []
    for filename, ylabel, series in panels:
        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
        drew = False
        for key, label in series:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, ms=3, label=label)
                drew = True
        if drew:
            ax.set_xlabel("RL step")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            path = os.path.join(out_dir, filename)
            fig.savefig(path, dpi=110)
            written.append(path)
    return written


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


def summarize(rows: list[dict], name: str, algo: str, steps: int, eval_prompts: int, plot_dir: str) -> dict:
    """A run's summary from its metric rows: held-out accuracy / length / pass@k / cons@k before and
    after, seconds per step, and the PNG plots (written to ``plot_dir``)."""
    evals = [r for r in rows if "eval/avg@k" in r]
    summary = {"name": name, "algo": algo, "steps": steps}
    if evals:
        # "before" is the step-0 evaluation only: a log that lost it has no before figures.
        first = evals[0] if evals[0].get("step") == 0 else {}
        last = evals[-1]
        summary.update({
            "accuracy_before": first.get("eval/avg@k"), "accuracy_after": last["eval/avg@k"],
            "mean_length_before": first.get("eval/length_mean"), "mean_length_after": last.get("eval/length_mean"),
            "pass_at_k_before": first.get("eval/pass@k"), "pass_at_k_after": last["eval/pass@k"],
            "cons_at_k_before": first.get("eval/cons@k"), "cons_at_k_after": last["eval/cons@k"],
            "eval_k": last["eval/k"], "eval_prompts": eval_prompts,
        })
    missing = missing_steps([r for r in rows if isinstance(r.get("step"), int)], steps)
    if missing:
        summary["metric_rows_missing"] = len(missing)
    times = [r["time/step_s"] for r in rows if "time/step_s" in r]
    if times:
        summary["seconds_per_step"] = float(np.mean(times))
    later = [(r["influence/active_tokens_after_first"], r["influence/loss_tokens_after_first"]) for r in rows
             if "influence/loss_tokens_after_first" in r]
    if later:  # FIPO: over the whole run, loss tokens of mini-batches 2…M whose weight moved off 1 by > 0.01
        active, total = (sum(x) for x in zip(*later))
        summary["influence_active_fraction"] = active / total if total else 0.0
    summary["plots"] = plot_run(rows, plot_dir, f"{name} ({algo})")
    return summary
