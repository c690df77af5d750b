"""A run's plots: accuracy, response length and FIPO's influence weights over steps, as PNG files."""

from __future__ import annotations

import os


def plot_run(rows: list[dict], out_dir: str, title: str = "") -> list[str]:
    """PNG plots of accuracy, response length and influence weights over steps."""
    from fipo_jax._requires import import_module

    Figure = import_module("matplotlib.figure", "train").Figure  # no pyplot: leaves the caller's backend alone

    os.makedirs(out_dir, exist_ok=True)
    panels = [
        ("accuracy.png", "accuracy", [("rollout/accuracy", "train rollouts"), ("eval/avg@k", "held-out avg@k"),
                                      ("eval/pass@k", "held-out pass@k")]),
        ("length.png", "response length (tokens)", [("rollout/length_mean", "mean"),
                                                    ("rollout/length_median", "median")]),
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
