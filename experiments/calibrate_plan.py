"""The memory planner against XLA on a generated family of cases: planned / compiled peak of the
sharded update and of the engine's decode call, per case, on 8 fake CPU devices.

    python experiments/calibrate_plan.py --cases 40 --out runs/calibrate_plan.json

The cases come from `tests.plan_family.draw_cases` (model shape × mesh × remat × dtype, seeded);
``tests/test_plan.py`` runs the first ones and requires every ratio in [0.95, 1.15]. This script
runs more of them and keeps the compiled sizes with each case's planned breakdown, which is what the
planner's activation constants (`fipo_jax.train.plan._KEPT_PER_TOKEN`, ...) were fitted on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fipo_jax.train import plan as plan_lib  # noqa: E402
from fipo_jax.config import apply_overrides  # noqa: E402
from fipo_jax.config.presets import cpu_skewed_chain  # noqa: E402
from tests.multi_device import run_json  # noqa: E402
from tests.plan_family import COMPILE_SCRIPT, OVERRIDES, compiled_peak, draw_cases  # noqa: E402


def model_of(case: dict) -> plan_lib.ModelConfig:
    fields = dict(case["model"])
    if fields.get("layer_types") is not None:
        fields["layer_types"] = tuple(fields["layer_types"])
    return plan_lib.ModelConfig(**fields)


def _deeper_types(model: dict):
    """The layer types of the same model with 2 more layers (the family's pattern continued)."""
    types = model.get("layer_types")
    if not types:
        return types
    layers = model["num_hidden_layers"] + 2
    return tuple("full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(layers))


def planned(case: dict) -> plan_lib.MemoryPlan:
    return plan_lib.plan(apply_overrides(cpu_skewed_chain(), OVERRIDES), case["mesh"], model=model_of(case))


def ratios(case: dict, compiled: dict) -> dict:
    plan = planned(case)
    out = {"update_ratio": plan.update_peak / compiled_peak(compiled["update"])}
    if "sampler" in compiled:
        out["sampler_ratio"] = plan.sampler_program / compiled_peak(compiled["sampler"])
    return out


def summarise(rows: list[dict]) -> None:
    for key in ("update_ratio", "sampler_ratio"):
        values = [r[key] for r in rows if key in r]
        print(f"{key}: min {min(values):.3f}, max {max(values):.3f} over {len(values)} cases")


def replan(path: str) -> list[dict]:
    """The planner's ratios for the compiled sizes stored in ``path`` (after a change to the model)."""
    rows = []
    for row in json.load(open(path)):
        row |= ratios(row, row["xla"])
        rows.append(row)
        print(f"{row['update_ratio']:6.3f} {row.get('sampler_ratio', float('nan')):6.3f}  {row['name']}")
    summarise(rows)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--first", type=int, default=0, help="skip this many cases of the family")
    parser.add_argument("--seed", type=int, default=2026, help="the family's seed (the tests use 2026)")
    parser.add_argument("--batch", type=int, default=6, help="cases compiled per subprocess")
    parser.add_argument("--depth-pairs", action="store_true",
                        help="also compile each update with 2 more layers: the per-layer cost is the difference")
    parser.add_argument("--replan", default=None, help="a JSON this script wrote: plan its cases again, no compiling")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.replan:
        return replan(args.replan)
    cases = draw_cases(args.first + args.cases, args.seed)[args.first:]
    rows = []
    for start in range(0, len(cases), args.batch):
        chunk = cases[start:start + args.batch]
        deeper = [dict(case, sampler=False, model=dict(case["model"], layer_types=_deeper_types(case["model"]),
                                                       num_hidden_layers=case["model"]["num_hidden_layers"] + 2))
                  for case in chunk] if args.depth_pairs else []
        compiled_all = run_json(COMPILE_SCRIPT, json.dumps(chunk + deeper))
        for i, (case, compiled) in enumerate(zip(chunk, compiled_all)):
            if deeper:
                compiled["update_2_more_layers"] = compiled_all[len(chunk) + i]["update"]
            row = {**case, "xla": compiled, "plan": dataclasses.asdict(planned(case)) | {"model": None},
                   **ratios(case, compiled)}
            rows.append(row)
            print(f"{row['update_ratio']:6.3f} {row['sampler_ratio']:6.3f}  {case['name']}", flush=True)
            if args.out:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=1, default=str)
    summarise(rows)
    return rows


if __name__ == "__main__":
    main()
