"""Seconds per RL step and host↔device bytes per step of the CPU experiment: this checkout's
trainer vs the trainer of an earlier commit, side by side in one run.

    python experiments/bench_rl_step.py --ref cb99b93 --out bench_rl_step.json   # the figures in docs/performance.md

Each code version runs in its own process (one after the other, alternating over ``--rounds``),
from a git worktree of ``--ref`` for the earlier one. A process builds the `cpu_default` trainer
(SFT warm start from the shared cache), runs ``--steps`` RL steps with `Trainer.step()` (no
evaluation) and reports:

* seconds per step: the median over the steps after the first (the first compiles), with the
  rollout (sampling + scoring, unchanged code) and the rest (old log-probs, advantages, updates)
  apart;
* bytes crossing between host and device after the rollout, per step: every `jax.device_put` of
  host arrays (host → device) and every `distributed.to_host` (device → host) from the moment
  the rollouts are collected to the end of the step. (Small implicit transfers such as
  ``jnp.asarray(scores)`` in the earlier trainer are not counted.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import dataclasses, json, sys, time
import jax, numpy as np
import fipo_jax
from fipo_jax.parallel import distributed
from fipo_jax.train import trainer as trainer_lib
from fipo_jax.config import apply_overrides, cpu_default
from fipo_jax.config.specs import DataSpec

steps, cache_dir, run_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
phase = {"name": "idle"}
moved = {"h2d": 0, "d2h": 0}
nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree) if isinstance(x, np.ndarray))

real_put = jax.device_put
def counting_put(x, *args, **kwargs):
    if phase["name"] == "update":
        moved["h2d"] += nbytes(x)
    return real_put(x, *args, **kwargs)
jax.device_put = counting_put

real_to_host = distributed.to_host
def counting_to_host(tree):
    out = real_to_host(tree)
    if phase["name"] == "update":
        moved["d2h"] += nbytes(out)
    return out
distributed.to_host = counting_to_host

if hasattr(trainer_lib.Trainer, "collect"):  # the earlier trainer collects in a method of its own
    owner = trainer_lib.Trainer
else:
    from fipo_jax.train import rollouts as rollouts_lib
    owner = rollouts_lib.RolloutCollector
real_collect = owner.collect
def marking_collect(*args, **kwargs):
    out = real_collect(*args, **kwargs)
    phase["name"] = "update"
    return out
owner.collect = marking_collect

# The workload the figures in docs/performance.md were measured on (the default before issue 11), pinned so
# that both versions run the same config whatever their cpu_default says.
EARLIER_DEFAULT = ["data.n_terms=5", "rollout.max_response_tokens=48", "reward.overlong_buffer=8",
                   "algo.mini_batches=4", "algo.micro_batch_size=64", "algo.loss.decay_rate=8", "steps=50",
                   "sft.steps=800"]
if "invertible" in {f.name for f in dataclasses.fields(DataSpec)}:  # issue 34's testbed fields, at their old values
    EARLIER_DEFAULT += ["data.invertible=false", "sft.partial=false", "sft.step_fraction=0.5", "sft.seed=null"]
config = apply_overrides(cpu_default(), EARLIER_DEFAULT + ["sft.cache_dir=" + cache_dir])
trainer = trainer_lib.Trainer(config, run_dir, progress=False, log=lambda s: None)
rows = []
for _ in range(steps):
    moved.update(h2d=0, d2h=0)
    phase["name"] = "rollout"
    metrics = trainer.step()
    phase["name"] = "idle"
    rows.append({"step_s": metrics["time/step_s"], "rollout_s": metrics["time/rollout_s"],
                 "after_rollout_s": metrics["time/step_s"] - metrics["time/rollout_s"], **moved,
                 "loss": metrics["actor/loss"], "accuracy": metrics["rollout/accuracy"]})
print(json.dumps({"module": fipo_jax.__file__, "rows": rows}))
"""


def run_version(root: str, steps: int, cache_dir: str) -> dict:
    env = {**os.environ, "PYTHONPATH": root, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as run_dir:
        proc = subprocess.run([sys.executable, "-c", WORKER, str(steps), cache_dir, run_dir], capture_output=True,
                              text=True, env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"worker in {root} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if not out["module"].startswith(root):
        raise RuntimeError(f"worker in {root} imported fipo_jax from {out['module']}")
    return out


def summarize(rows: list[dict]) -> dict:
    warm = rows[1:]
    med = lambda key: statistics.median(r[key] for r in warm)  # noqa: E731
    return {"first_step_s": rows[0]["step_s"], "step_s": med("step_s"), "rollout_s": med("rollout_s"),
            "after_rollout_s": med("after_rollout_s"), "h2d_bytes": med("h2d"), "d2h_bytes": med("d2h")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="cb99b93", help="git commit of the earlier trainer")
    parser.add_argument("--steps", type=int, default=8, help="RL steps per process (the first compiles)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per version, alternating")
    parser.add_argument("--cache-dir", default=os.path.join(ROOT, "runs", ".sft_cache"), help="SFT warm-start cache")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step compiles)")

    worktree = os.path.join(tempfile.gettempdir(), f"fipo_jax_ref_{args.ref}")
    if not os.path.isdir(worktree):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", worktree, args.ref], check=True,
                       capture_output=True)
    versions = {"ref": worktree, "new": ROOT}
    rows = {name: [] for name in versions}
    for round_index in range(args.rounds):
        for name, root in versions.items():
            out = run_version(root, args.steps, args.cache_dir)
            rows[name].extend(out["rows"] if round_index == 0 else out["rows"][1:])  # first step: compile, once
            print(f"[round {round_index + 1}] {name}: {summarize(out['rows'])}", flush=True)
    result = {name: summarize(r) for name, r in rows.items()}
    ref, new = result["ref"], result["new"]
    result["ratios"] = {
        "step_s_ref_over_new": ref["step_s"] / new["step_s"],
        "after_rollout_s_ref_over_new": ref["after_rollout_s"] / new["after_rollout_s"],
        "h2d_bytes_ref_over_new": ref["h2d_bytes"] / max(new["h2d_bytes"], 1),
        "d2h_bytes_ref_over_new": ref["d2h_bytes"] / max(new["d2h_bytes"], 1),
    }
    result["setup"] = {"ref": args.ref, "steps": args.steps, "rounds": args.rounds, "config": "cpu_default",
                       "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                       "jax": __import__("jax").__version__}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
