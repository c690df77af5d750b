"""FIPO and DAPO with stale rollouts: ``rollout.max_staleness`` k = 0 / 1 / 2 over several seeds.

    python experiments/staleness.py --seeds 0 1 2 --out runs/staleness --set steps=10 --set eval.every=5

Each (algorithm, k, seed) run shares the supervised warm start (cached) and the prompts of its seed;
only the loss and the staleness bound differ. Runs are resumable (a finished run is read back). Writes
<out>/staleness.json (each run's final figures and its step means of the three drifts; per (algorithm,
k): mean / std over seeds) and <out>/staleness.png (final held-out accuracy, mean response length,
FIPO's influence activity and the three drifts against k), and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from experiments.compare import spread
from fipo_jax.config import apply_overrides, load_config, with_algo
from fipo_jax.train.run_log import MetricsLog

FINAL_KEYS = ("accuracy_after", "mean_length_after", "influence_active_fraction", "seconds_per_step")
# Step means over the run (metrics.jsonl keys): the three drifts of the decoupled objective, and the lags.
STEP_KEYS = ("drift/update", "drift/staleness", "drift/engine", "rollout/staleness_mean", "influence/active_frac")


def run_dir(out: str, algo: str, k: int, seed: int) -> str:
    return os.path.join(out, f"{algo}-k{k}-seed{seed}")


# A drift over responses of one kind is averaged over the steps that had such responses: drift/engine over
# steps with lag-0 responses, drift/staleness over steps with stale ones (else a step's 0 means "none").
_HAS_TOKENS = {"drift/engine": lambda r: r.get("rollout/stale_token_frac", 0.0) < 1.0,
               "drift/staleness": lambda r: r.get("rollout/stale_token_frac", 0.0) > 0.0}


def step_means(path: str) -> dict[str, float]:
    """The mean over the run's steps of each `STEP_KEYS` metric it logged (see `_HAS_TOKENS`)."""
    rows = [r for r in MetricsLog(os.path.join(path, "metrics.jsonl")).read() if r.get("step", 0) > 0]
    out = {}
    for key in STEP_KEYS:
        values = [r[key] for r in rows if key in r and _HAS_TOKENS.get(key, lambda r: True)(r)]
        if values:
            out[key] = float(np.mean(values))
    return out


def figures(out: str, algo: str, k: int, seed: int) -> dict[str, float]:
    path = run_dir(out, algo, k, seed)
    with open(os.path.join(path, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    return {**{key: summary.get(key) for key in FINAL_KEYS}, **step_means(path)}


def plot(out: str, aggregate: dict[str, dict[str, dict]], algos, ks) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("accuracy_after", "held-out avg@k after"), ("mean_length_after", "mean response length after"),
              ("influence/active_frac", "FIPO: tokens with |f − 1| > 0.01"), (None, "FIPO: |Δ log p| per token"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        series = ([(algo, key, f"C{i}") for i, algo in enumerate(algos)] if key else
                  [("fipo", drift, f"C{i + 2}") for i, drift in enumerate(STEP_KEYS[:3])])
        for algo, name, color in series:
            points = [(k, s) for k in ks if (s := aggregate.get(f"{algo}/k{k}", {}).get(name, {})).get("n")]
            if not points:  # e.g. drift/staleness at k = 0: no stale response
                continue
            mean, std = np.array([s["mean"] for _, s in points]), np.array([s["std"] for _, s in points])
            ax.errorbar([k for k, _ in points], mean, yerr=std, marker="o", capsize=3, color=color,
                        label=algo if key else name)
        if key is None:
            ax.set_yscale("log")  # the engine's drift is ~1e-7, the others ~1e-2
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rollout.max_staleness k")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("mean ± 1 std over seeds", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out, "staleness.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(aggregate: dict[str, dict[str, dict]]) -> str:
    keys = FINAL_KEYS + STEP_KEYS
    cell = lambda s: "–" if not s.get("n") else f"{s['mean']:.3g} ± {s['std']:.2g}"  # noqa: E731
    head = "| run | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys)
    return "\n".join([head, *(f"| {name} | " + " | ".join(cell(stats.get(k, {})) for k in keys) + " |"
                              for name, stats in aggregate.items())])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu_skewed_chain",
                        help="preset name or JSON path (default: the CPU default of the measured run, issue 33)")
    parser.add_argument("--algos", nargs="+", default=["dapo", "fipo"])
    parser.add_argument("--ks", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", default="runs/staleness")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from fipo_jax.train.trainer import Trainer

    runs = {}
    for seed in args.seeds:
        for k in args.ks:
            for algo in args.algos:
                path = run_dir(args.out, algo, k, seed)
                if not os.path.isfile(os.path.join(path, "summary.json")):
                    config = apply_overrides(with_algo(load_config(args.config), algo),
                                             args.overrides + [f"seed={seed}", f"rollout.max_staleness={k}"])
                    Trainer(config, path, progress=not args.no_progress).train()
                runs[f"{algo}/k{k}/seed{seed}"] = figures(args.out, algo, k, seed)
                print(f"{algo} k={k} seed {seed}: {runs[f'{algo}/k{k}/seed{seed}']}", flush=True)
    aggregate = {f"{algo}/k{k}": {key: spread([runs[f"{algo}/k{k}/seed{s}"].get(key) for s in args.seeds])
                                  for key in FINAL_KEYS + STEP_KEYS} for algo in args.algos for k in args.ks}
    with open(os.path.join(args.out, "staleness.json"), "w", encoding="utf-8") as f:
        json.dump({"config": args.config, "overrides": args.overrides, "seeds": args.seeds, "runs": runs,
                   "aggregate": aggregate}, f, indent=2)
    plot(args.out, aggregate, args.algos, args.ks)
    print(table(aggregate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
