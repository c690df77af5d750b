"""A run's summary (`summary.json`) from its metric rows, and the length statistics it and the
rollout metrics report."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from fipo_jax.train.plots import plot_run
from fipo_jax.train.run_log import missing_steps


def length_stats(lengths: Iterable[int], max_length: int) -> dict[str, float]:
    """Mean, median, quartiles, max and the share of responses cut at `max_length`."""
    x = np.asarray(list(lengths), np.float64)
    if x.size == 0:
        return {}
    q25, q50, q75 = np.percentile(x, [25, 50, 75])
    return {"mean": float(x.mean()), "median": float(q50), "q25": float(q25), "q75": float(q75),
            "max": float(x.max()), "clip_rate": float(np.mean(x >= max_length))}


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
