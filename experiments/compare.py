"""FIPO vs DAPO (and optionally GRPO) over several seeds with the same budget: paired tests.

    python experiments/compare.py --seeds 0 1 2 3 4              # CPU default experiment, DAPO vs FIPO
    python experiments/compare.py --algos dapo fipo grpo --seeds 0 1 2 3 4 5 6 7 --out runs/compare \
        --set steps=20 --set eval.every=5 --at-steps 10 20       # the README's pre-registered comparison

Every run of a seed shares the supervised warm start (cached), the prompts and the step budget;
only the loss differs. Runs are resumable: re-running the command skips finished runs and
resumes interrupted ones. Writes <out>/comparison.json (each run's summary; per algorithm,
mean / std / min / max over seeds of the final figures; and each algorithm's per-seed difference
from the first one, paired by seed), <out>/comparison.png (mean ± one std
over seeds per step, and each seed's curve: held-out avg@k, response length, entropy, FIPO's
influence activity; and each algorithm minus the first, paired by seed, with its 95 % interval) and
prints Markdown tables (aggregate, seed by seed, and the paired tests).

The paired tests (`paired_test`) are taken at each of ``--at-steps`` (held-out avg@k and mean response
length of the evaluation at that step) and on the final figures: the mean difference, its 95 %
t-interval, and a two-sided sign test (exact binomial, ties dropped).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from fipo_jax.config import apply_overrides, load_config, with_algo
from fipo_jax.core.losses import LOSS_MODES
from fipo_jax.train.run_log import MetricsLog

# Final figures compared across seeds (summary.json keys).
SUMMARY_KEYS = ("accuracy_before", "accuracy_after", "cons_at_k_after", "pass_at_k_after", "mean_length_after",
                "influence_active_fraction", "seconds_per_step")
# Final figures also compared seed by seed: every algorithm of a seed starts from the same warm start
# and prompts, so the per-seed difference removes the seed's own luck.
PAIRED_KEYS = ("accuracy_after", "mean_length_after")
# Per-step curves: (metrics.jsonl key, panel title).
PANELS = (("eval/avg@k", "held-out avg@k"), ("rollout/length_mean", "mean response length (tokens)"),
          ("actor/entropy", "entropy (nats / token)"), ("influence/active_frac", "FIPO: loss tokens with |f − 1| > 0.01"))


# Per-step endpoints of the paired tests: (metrics.jsonl key, name).
STEP_ENDPOINTS = (("eval/avg@k", "avg@k"), ("eval/length_mean", "length"))
# Two-sided 95 % quantiles of Student's t by degrees of freedom (1 … 30; beyond, the normal's 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: P(a split at least this uneven | each sign equally likely)."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired_test(diffs: list[float]) -> dict[str, float]:
    """Mean paired difference, its 95 % t-interval (mean ± t₀.₉₇₅(n−1) · sd / √n), wins / losses /
    ties and the sign test's p-value."""
    x = np.asarray([d for d in diffs if np.isfinite(d)], np.float64)
    if x.size == 0:
        return {"n": 0}
    half = t975(x.size - 1) * x.std(ddof=1) / math.sqrt(x.size) if x.size > 1 else float("inf")
    wins, losses = int((x > 0).sum()), int((x < 0).sum())
    return {"n": int(x.size), "mean": float(x.mean()), "ci95": [float(x.mean() - half), float(x.mean() + half)],
            "wins": wins, "losses": losses, "ties": int(x.size - wins - losses), "sign_p": sign_test(wins, losses)}


def run_dir(out: str, algo: str, seed: int) -> str:
    return os.path.join(out, f"{algo}-seed{seed}")


def spread(values: list[float]) -> dict[str, float]:
    """mean, std (population), min, max and n of the finite values."""
    x = np.asarray([v for v in values if isinstance(v, (int, float)) and np.isfinite(v)], np.float64)
    if x.size == 0:
        return {"n": 0}
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max()),
            "n": int(x.size)}


def seed_curves(out: str, algo: str, seeds, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values [seed, step]) of ``key``, at the steps every seed logged it."""
    per_seed = []
    for seed in seeds:
        rows = MetricsLog(os.path.join(run_dir(out, algo, seed), "metrics.jsonl")).read()
        per_seed.append({r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))})
    steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
    values = np.asarray([[s[step] for step in steps] for s in per_seed], np.float64).reshape(len(per_seed), -1)
    return np.asarray(steps), values


def curves(out: str, algo: str, seeds, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, std) over seeds of ``key``, at the steps every seed logged it."""
    steps, values = seed_curves(out, algo, seeds, key)
    return steps, values.mean(axis=0), values.std(axis=0)


def plot(out: str, algos, seeds) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if len(algos) > 1 else 1  # the second row: each algorithm minus the first
    fig, grid = plt.subplots(rows, len(PANELS), figsize=(4.2 * len(PANELS), 3.6 * rows), squeeze=False)
    axes = grid[0]
    colors = {algo: f"C{i}" for i, algo in enumerate(algos)}  # the same colour in every panel
    if rows == 2:
        _plot_differences(grid[1], out, algos, seeds, colors)
    for ax, (key, title) in zip(axes, PANELS):
        for algo in algos:
            steps, values = seed_curves(out, algo, seeds, key)
            if len(steps):
                mean, std, color = values.mean(axis=0), values.std(axis=0), colors[algo]
                ax.plot(steps, mean, marker="o" if len(steps) < 15 else None, ms=3, label=algo, color=color)
                ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
                for seed_values in values:  # each seed, thin: a mean can hide runs that went different ways
                    ax.plot(steps, seed_values, color=color, lw=0.6, alpha=0.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"mean ± 1 std over {len(seeds)} seed(s), thin lines each seed" + (
        f"; bottom: minus {algos[0]}, paired by seed, mean and 95 % interval" if rows == 2 else ""), fontsize=10)
    fig.tight_layout()
    path = os.path.join(out, "comparison.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_differences(axes, out: str, algos, seeds, colors) -> None:
    """Each algorithm minus the first on `STEP_ENDPOINTS`, paired by seed: mean and 95 % band."""
    for ax, (key, name) in zip(axes, STEP_ENDPOINTS):
        for algo in algos[1:]:
            steps, mean, half = difference_curve(out, algos[0], algo, seeds, key)
            if len(steps):
                ax.plot(steps, mean, marker="o", ms=3, color=colors[algo], label=f"{algo} − {algos[0]}")
                ax.fill_between(steps, mean - half, mean + half, color=colors[algo], alpha=0.2)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_title(f"held-out {name}: difference", fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[len(STEP_ENDPOINTS):]:
        ax.axis("off")


def paired(runs: dict, baseline: str, algo: str, seeds, key: str) -> dict[str, float]:
    """`paired_test` over seeds of ``algo``'s final ``key`` minus ``baseline``'s at the same seed."""
    diffs = [runs[f"{algo}/seed{s}"].get(key) - runs[f"{baseline}/seed{s}"].get(key) for s in seeds
             if all(isinstance(runs[f"{a}/seed{s}"].get(key), (int, float)) for a in (algo, baseline))]
    return paired_test(diffs)


def paired_at_step(out: str, baseline: str, algo: str, seeds, key: str, step: int) -> dict[str, float]:
    """`paired_test` of ``algo`` minus ``baseline`` on metrics.jsonl's ``key`` at ``step``, by seed."""
    _, base = _values_at(out, baseline, seeds, key, [step])
    _, other = _values_at(out, algo, seeds, key, [step])
    return paired_test(list((other - base)[:, 0])) if base.size and other.size else {"n": 0}


def _values_at(out: str, algo: str, seeds, key: str, steps) -> tuple[np.ndarray, np.ndarray]:
    all_steps, values = seed_curves(out, algo, seeds, key)
    keep = np.isin(all_steps, steps)
    return all_steps[keep], values[:, keep]


def difference_curve(out: str, baseline: str, algo: str, seeds, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, 95 % half-width) of ``algo`` minus ``baseline`` on ``key``, paired by seed."""
    steps_b, base = seed_curves(out, baseline, seeds, key)
    steps_a, other = seed_curves(out, algo, seeds, key)
    steps = np.intersect1d(steps_a, steps_b)
    diff = other[:, np.isin(steps_a, steps)] - base[:, np.isin(steps_b, steps)]
    n = diff.shape[0]
    half = t975(n - 1) * diff.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.full(len(steps), np.nan)
    return steps, diff.mean(axis=0), half


def seed_table(runs: dict, algos, seeds) -> str:
    """Markdown: one row per seed, each algorithm's final figures side by side."""
    head = "| seed | " + " | ".join(f"{a} {k}" for k in PAIRED_KEYS for a in algos) + " |"
    rule = "|---|" + "---|" * (len(PAIRED_KEYS) * len(algos))
    fmt = lambda v: "–" if not isinstance(v, (int, float)) else f"{v:.3f}"  # noqa: E731
    rows = [f"| {s} | " + " | ".join(fmt(runs[f"{a}/seed{s}"].get(k)) for k in PAIRED_KEYS for a in algos) + " |"
            for s in seeds]
    return "\n".join([head, rule, *rows])


def table(aggregate: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per algorithm, mean ± std (n) of the final figures."""
    def cell(s):
        return "–" if not s.get("n") else f"{s['mean']:.3f} ± {s['std']:.3f}"
    head = "| | " + " | ".join(SUMMARY_KEYS) + " |\n|---|" + "---|" * len(SUMMARY_KEYS)
    rows = [f"| {algo} (n={max(s.get('n', 0) for s in stats.values())}) | "
            + " | ".join(cell(stats[k]) for k in SUMMARY_KEYS) + " |" for algo, stats in aggregate.items()]
    return "\n".join([head, *rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu_default", help="preset name or JSON path")
    parser.add_argument("--algos", nargs="+", default=["dapo", "fipo"], choices=LOSS_MODES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--at-steps", nargs="*", type=int, default=[], metavar="STEP",
                        help="evaluation steps at which to test the paired differences (besides the final figures)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from fipo_jax.train.trainer import Trainer

    runs = {}
    for seed in args.seeds:
        for algo in args.algos:
            config = apply_overrides(with_algo(load_config(args.config), algo), args.overrides + [f"seed={seed}"])
            summary = Trainer(config, run_dir(args.out, algo, seed), progress=not args.no_progress).train()
            runs[f"{algo}/seed{seed}"] = {k: v for k, v in summary.items() if k != "plots"}
            print(f"{algo} seed {seed}: accuracy {summary.get('accuracy_before')} → {summary.get('accuracy_after')}, "
                  f"length → {summary.get('mean_length_after')}", flush=True)
    aggregate = {algo: {key: spread([runs[f"{algo}/seed{s}"].get(key) for s in args.seeds]) for key in SUMMARY_KEYS}
                 for algo in args.algos}
    baseline = args.algos[0]
    differences = {f"{algo} - {baseline}": {
        **{f"{name}@{step}": paired_at_step(args.out, baseline, algo, args.seeds, key, step)
           for step in args.at_steps for key, name in STEP_ENDPOINTS},
        **{key: paired(runs, baseline, algo, args.seeds, key) for key in PAIRED_KEYS}} for algo in args.algos[1:]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "comparison.json"), "w") as f:
        json.dump({"config": args.config, "overrides": args.overrides, "seeds": args.seeds, "runs": runs,
                   "aggregate": aggregate, "paired_differences": differences}, f, indent=2)
    plot(args.out, args.algos, args.seeds)
    print(table(aggregate))
    print()
    print(seed_table(runs, args.algos, args.seeds))
    print()
    print(test_table(differences))
    return 0


def test_table(differences: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per (comparison, endpoint): mean difference, 95 % interval, wins/losses/ties, sign p."""
    head = "| comparison | endpoint | mean difference | 95 % interval | wins / losses / ties | sign test p |"
    rows = [head, "|---|---|---|---|---|---|"]
    for name, stats in differences.items():
        for key, t in stats.items():
            if t.get("n"):
                rows.append(f"| {name} | {key} | {t['mean']:+.3f} | [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}] | "
                            f"{t['wins']} / {t['losses']} / {t['ties']} | {t['sign_p']:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
