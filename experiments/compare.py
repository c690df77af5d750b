"""Run DAPO and FIPO (and optionally GRPO) with the same seed and budget; plot side by side.

    python experiments/compare.py                         # CPU default experiment, DAPO vs FIPO
    python experiments/compare.py --algos dapo fipo grpo --seeds 0 1 --out runs/compare

Every run shares the supervised warm start (cached), the seed, the prompts and the step
budget; only the loss differs. Writes <out>/comparison.json and <out>/comparison.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


from fipo_jax.config import apply_overrides, load_config, with_algo  # noqa: E402
from fipo_jax.metrics import MetricsLog  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu_default", help="preset name or JSON path")
    parser.add_argument("--algos", nargs="+", default=["dapo", "fipo"], choices=("fipo", "dapo", "grpo"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from fipo_jax.trainer import Trainer

    results = {}
    for seed in args.seeds:
        for algo in args.algos:
            config = apply_overrides(with_algo(load_config(args.config), algo), args.overrides + [f"seed={seed}"])
            run_dir = os.path.join(args.out, f"{algo}-seed{seed}")
            summary = Trainer(config, run_dir, progress=not args.no_progress).train()
            results[f"{algo}/seed{seed}"] = {k: v for k, v in summary.items() if k != "plots"}
            print(f"{algo} seed {seed}: accuracy {summary.get('accuracy_before'):.3f} → "
                  f"{summary.get('accuracy_after'):.3f}, length {summary.get('mean_length_before'):.1f} → "
                  f"{summary.get('mean_length_after'):.1f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "comparison.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(args.out, args.algos, args.seeds)
    print(json.dumps(results, indent=2))
    return 0


def plot(out: str, algos, seeds) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = [("eval/avg@k", "held-out avg@k"), ("rollout/length_mean", "mean response length"),
              ("actor/influence_weights_mean", "mean influence weight")]
    for ax, (key, title) in zip(axes, panels):
        for algo in algos:
            for seed in seeds:
                rows = MetricsLog(os.path.join(out, f"{algo}-seed{seed}", "metrics.jsonl")).read()
                pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), marker="o" if len(pts) < 15 else None, ms=3, label=f"{algo} s{seed}")
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "comparison.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
