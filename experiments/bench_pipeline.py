"""The rollout pipeline on a CPU: steps/s with rollouts drawn one step ahead (k = 1) against the
sequential loop (k = 0), side by side in one run, and the pipeline model's prediction of the k = 1 step.

    python experiments/bench_pipeline.py --out runs/bench_pipeline          # the figures in docs/pipeline.md
    python experiments/bench_pipeline.py --steps 4 --verify-chars 800       # quicker

Both runs train the `cpu_skewed_chain` preset's policy (the CPU default until issue 34: 128-token
responses give the update and the sampler comparable shares; the cached warm start) for ``--steps`` steps
with the same seed on the same mesh, the weights held still (``optim.lr=1e-30``, below float32
rounding: every update computed, no change), so both draw the same rollouts and do the same work per
step — only the schedule differs, not where training led (a run whose responses collapse to a few
tokens samples faster). The reward has a realistic cost: besides the task's own answer, each
response's score asks math-verify about a long, unique worked answer (``--verify-chars`` characters
of LaTeX ending in a boxed fraction, checked against a decimal gold, so the string rules never
decide: DAPO's scorer on long chains of thought); its cost per response is measured and reported
and counted in the step's ``time/score_s``. The first ``--skip`` steps (compiles) are left out; each
figure is the mean step time over the rest.

The model's prediction (`fipo_jax.train.pipeline_model`, shared mesh): phases G, S, U, W measured in
the k = 0 run (means), then T(k = 1) between the serial bound max(G + U + W, G + S) (devices that each
phase fills) and the concurrent bound max(G + S, U + W) (phases that each leave the devices half idle),
against the measured k = 1 step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import jax

from fipo_jax.config import apply_overrides, load_config
from fipo_jax.rewards import score_batch
from fipo_jax.train import pipeline_model
from fipo_jax.train import rollouts as rollouts_lib
from fipo_jax.train.run_log import MetricsLog
from fipo_jax.train.trainer import Trainer

_DERIVATION = (r"We expand the product and collect terms: $\left(\frac{3x+1}{x-2}\right)\cdot\frac{x^2-4}{6x+2}"
               r" = \frac{(3x+1)(x-2)(x+2)}{(x-2)\cdot 2(3x+1)} = \frac{x+2}{2}$. ")


def long_answer(index: int, chars: int) -> tuple[str, str]:
    """A worked answer of about ``chars`` characters ending in \\boxed{a/b}, and its decimal gold."""
    numerator, denominator = 7 + index, 8
    text = (_DERIVATION * (chars // len(_DERIVATION) + 1))[:chars]
    return text + rf" Hence the answer is $\boxed{{\frac{{{numerator}}}{{{denominator}}}}}$.", str(numerator / 8)


class CostlyScoring:
    """``score_batch`` that also asks math-verify about one long unique answer per response."""

    def __init__(self, chars: int):
        self.chars, self.calls, self.responses, self.seconds = chars, 0, 0, 0.0
        self.real = rollouts_lib.score_batch

    def __call__(self, texts, golds, config=None, **kwargs):
        start = time.perf_counter()
        extra = [long_answer(self.responses + i, self.chars) for i in range(len(texts))]
        checked = score_batch([t for t, _ in extra], [g for _, g in extra], config)
        assert checked.correct.all(), "the long answers equal their golds"
        seconds = time.perf_counter() - start
        self.calls, self.responses, self.seconds = self.calls + 1, self.responses + len(texts), self.seconds + seconds
        result = self.real(texts, golds, config, **kwargs)
        return dataclasses.replace(result, seconds=result.seconds + seconds)  # in the step's time/score_s


def run(out: str, k: int, steps: int, overrides: list[str]) -> list[dict]:
    config = apply_overrides(load_config("cpu_skewed_chain"), ["optim.lr=1e-30"] + overrides + [
        f"steps={steps}", f"rollout.max_staleness={k}", "eval.every=0", f"checkpoint_every={steps}"])
    path = os.path.join(out, f"k{k}")
    start = time.perf_counter()
    Trainer(config, path, progress=False, log=lambda line: None).train()
    print(f"k = {k}: {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    return [r for r in MetricsLog(os.path.join(path, "metrics.jsonl")).read() if r.get("step", 0) > 0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_pipeline")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=2, help="first steps left out (compiles)")
    parser.add_argument("--verify-chars", type=int, default=3000, help="length of each long answer math-verify reads")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    scoring = CostlyScoring(args.verify_chars)
    rollouts_lib.score_batch = scoring  # the collector scores through this module's name
    rows = {k: run(args.out, k, args.steps, args.overrides) for k in (0, 1)}
    kept = {k: [r for r in rs if r["step"] > args.skip] for k, rs in rows.items()}
    step_s = {k: statistics.mean(r["time/step_s"] for r in rs) for k, rs in kept.items()}
    phases = pipeline_model.phases_from_log(rows[0], devices=1, skip_first=args.skip)
    serial, concurrent = (pipeline_model.step_seconds(phases, 1, concurrent=c) for c in (False, True))
    result = {
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
                  f"{jax.default_backend()}",
        "steps": args.steps, "skip": args.skip, "verify_chars": args.verify_chars,
        "verify_s_per_response": scoring.seconds / max(1, scoring.responses),
        "step_s": step_s, "steps_per_s_ratio_k1_over_k0": step_s[0] / step_s[1],
        "phases_k0": {"generate_s": phases.generate_s, "score_s": phases.score_s, "update_s": phases.update_s,
                      "sync_s": phases.sync_s},
        "predicted_k0_step_s": pipeline_model.step_seconds(phases, 0),
        "predicted_k1_step_s_serial": serial, "predicted_k1_step_s_concurrent": concurrent,
        "k1_rollout_wait_s": statistics.mean(r["time/rollout_wait_s"] for r in kept[1]),
        "same_rollouts": [r["rollout/length_mean"] for r in rows[0]] == [r["rollout/length_mean"] for r in rows[1]],
        "staleness_max": max(r["rollout/staleness_max"] for r in rows[1]),
    }
    with open(os.path.join(args.out, "bench_pipeline.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
