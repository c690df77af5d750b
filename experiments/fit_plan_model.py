"""Fit the planner's working-set constants (`fipo_jax.train.memory_model.Fitted`) to compiled memory.

    python experiments/fit_plan_model.py                       # the stored calibration data
    python experiments/fit_plan_model.py runs/more_cases.json  # + cases from calibrate_plan.py --out

Each case of ``experiments/plan_calibration/*.json`` holds XLA's ``memory_analysis`` of the compiled
sharded update and engine decode call on 8 fake CPU devices (``experiments/calibrate_plan.py``). The
update's constants and the decode call's are fitted separately, by least squares on the relative
error of the planned peak (margins held at 1, constants ≥ 0); then the planned / compiled ranges are
printed with the margins of `Fitted` (the planner must not under-count) and without.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys

import numpy as np
from scipy.optimize import least_squares

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fipo_jax.train import plan as plan_lib  # noqa: E402
from fipo_jax.config import apply_overrides, cpu_default  # noqa: E402
from fipo_jax.train.memory_model import FITTED, Fitted  # noqa: E402
from tests.plan_family import OVERRIDES, compiled_peak  # noqa: E402

UPDATE = ("fixed", "heads", "none_hidden", "none_mlp", "none_scores", "recompute", "remat_hidden", "remat_mlp",
          "remat_scores", "logits", "loss_hidden", "tied_table", "optimizer_parameters", "optimizer_largest")
DECODE = ("decode_fixed", "decode_layer", "decode_blocks", "decode_inserted", "decode_reshard")
SCALE = {"fixed": 1e6, "decode_fixed": 1e5}  # fitted in these units


def load(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        rows += json.load(open(path))
    return rows


def planned(case: dict, fitted: Fitted) -> plan_lib.MemoryPlan:
    fields = dict(case["model"])
    if fields.get("layer_types") is not None:
        fields["layer_types"] = tuple(fields["layer_types"])
    config = apply_overrides(cpu_default(), OVERRIDES)
    return plan_lib.plan(config, case["mesh"], model=plan_lib.ModelConfig(**fields), fitted=fitted)


def ratios(rows: list[dict], fitted: Fitted, part: str) -> np.ndarray:
    attribute = "update_peak" if part == "update" else "sampler_program"
    return np.array([getattr(planned(r, fitted), attribute) / compiled_peak(r["xla"][part]) for r in rows
                     if part in r["xla"]])


def fit(rows: list[dict], names: tuple[str, ...], part: str) -> Fitted:
    unfitted = dataclasses.replace(FITTED, margin=1.0, decode_margin=1.0)

    def with_values(values) -> Fitted:
        return dataclasses.replace(unfitted, **{n: v * SCALE.get(n, 1) for n, v in zip(names, values)})

    start = [getattr(FITTED, n) / SCALE.get(n, 1) for n in names]
    result = least_squares(lambda v: ratios(rows, with_values(v), part) - 1, start, bounds=(0, np.inf))
    return with_values(result.x)


def main(argv=None) -> Fitted:
    argv = sys.argv[1:] if argv is None else argv
    paths = sorted(glob.glob(os.path.join(ROOT, "experiments", "plan_calibration", "*.json"))) + list(argv)
    rows = load(paths)
    update_fit, decode_fit = fit(rows, UPDATE, "update"), fit(rows, DECODE, "sampler")
    fitted = dataclasses.replace(update_fit, **{n: getattr(decode_fit, n) for n in DECODE})
    print("fitted constants (margins 1):")
    for name in UPDATE + DECODE:
        print(f"  {name:<22} {getattr(fitted, name):12.4g}   (in use: {getattr(FITTED, name):.4g})")
    for label, constants in (("fitted, no margin", fitted),
                             (f"fitted, margins {FITTED.margin} / {FITTED.decode_margin}",
                              dataclasses.replace(fitted, margin=FITTED.margin, decode_margin=FITTED.decode_margin)),
                             ("the constants in use", FITTED)):
        update, decode = ratios(rows, constants, "update"), ratios(rows, constants, "sampler")
        print(f"{label}: planned / compiled update {update.min():.3f}–{update.max():.3f}, "
              f"decode {decode.min():.3f}–{decode.max():.3f} over {len(update)} / {len(decode)} cases")
    return fitted


if __name__ == "__main__":
    main()
