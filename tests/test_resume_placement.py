"""Resume on any mesh (issue 33, item 4): the resume fingerprint refuses what changes the math and
lets what only changes placement or speed (`PLACEMENT_FIELDS`) change, saying so; a run stopped on
one mesh continues on another (Orbax restores into the new shardings) as if it never stopped."""

import json

import pytest

from fipo_jax.config import PLACEMENT_FIELDS, apply_overrides, cpu_default
from fipo_jax.train.trainer import placement_changes
from tests.multi_device import run_json

PLACEMENT_CHANGES = ["mesh_shape=[2,4]", "model.remat=full", "model.attention_chunk_size=16",
                     "model.logprob_chunk_size=64", "model.attention_impl=xla", "rollout.sampler=static",
                     "algo.packing=false"]


def test_placement_is_outside_the_fingerprint_and_the_math_is_inside():
    base = cpu_default()
    moved = apply_overrides(base, PLACEMENT_CHANGES)
    assert moved.fingerprint() == base.fingerprint()
    assert set(moved.placement()) == set(PLACEMENT_FIELDS)
    assert moved.placement() != base.placement()
    for math in ("algo.loss.decay_rate=4", "rollout.n=4", "seed=3", "model.dtype=bfloat16", "algo.mini_batches=4"):
        assert apply_overrides(base, [math]).fingerprint() != base.fingerprint(), math


def test_placement_changes_are_named_from_new_and_older_checkpoints():
    base, moved = cpu_default(), apply_overrides(cpu_default(), ["mesh_shape=[2,4]", "model.remat=full"])
    saved = {"placement": json.loads(json.dumps(base.placement()))}
    assert placement_changes(saved, moved) == ["mesh_shape [1] → [2, 4]", "model.remat none → full"]
    assert placement_changes(saved, base) == []
    older = {"fingerprint": json.loads(json.dumps(base.to_dict()))}  # placements were in the fingerprint
    assert placement_changes(older, moved) == ["mesh_shape [1] → [2, 4]", "model.remat none → full"]
    assert placement_changes({"fingerprint": {}}, moved) == []  # nothing known: nothing claimed


# Runs in a subprocess with 8 CPU devices: one run of 3 steps on a 1 × 8 mesh (fsdp), and runs stopped
# after step 2 and continued on (2, 4) with remat full, and on 4 devices; prints their differences.
SCRIPT = r"""
import json, os, shutil, sys
import jax, numpy as np
from fipo_jax.config import apply_overrides, cpu_default
from fipo_jax.train.run_log import MetricsLog
from fipo_jax.train.trainer import Trainer
from tests.test_trainer import TINY

cache, root = sys.argv[1], sys.argv[2]
base = [o for o in TINY if not o.startswith("steps=")] + [f"sft.cache_dir={cache}", "eval.every=0"]
logs = []

def run(name, steps, *extra):
    config = apply_overrides(cpu_default(), base + [f"steps={steps}", *extra])
    trainer = Trainer(config, os.path.join(root, name), progress=False, log=logs.append)
    trainer.train()
    return trainer

def last_row(name):
    row = MetricsLog(os.path.join(root, name, "metrics.jsonl")).read()[-1]
    # Not wall-clock times, nor how busy the engine's slots were (a schedule: it follows the mesh).
    return {k: v for k, v in row.items() if not k.startswith("time/") and k != "rollout/slot_utilisation"
            and isinstance(v, (int, float))}

reference = run("reference", 3, "mesh_shape=[1,8]")
run("stopped", 2, "mesh_shape=[1,8]")
out = {}
for name, extra in (("onto_2x4_remat_full", ["mesh_shape=[2,4]", "model.remat=full"]),
                    ("onto_4_devices", ["mesh_shape=[4]"])):
    shutil.copytree(os.path.join(root, "stopped"), os.path.join(root, name))  # the run stopped after step 2
    continued = run(name, 3, *extra)
    diffs = [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
             for a, b in zip(jax.tree.leaves(reference.state.params), jax.tree.leaves(continued.state.params))]
    ref_row, row = last_row("reference"), last_row(name)
    # each metric within 1 % + 1e-4 (float32 rounding of the new layout; drift/engine is ~1e-6 itself)
    excess = {k: abs(row[k] - v) - 1e-2 * abs(v) for k, v in ref_row.items()}
    worst = max(excess, key=excess.get)
    out[name] = {"param_diff": max(diffs), "metric_excess": [worst, excess[worst]], "same_keys": set(row) == set(ref_row),
                 "steps": [r["step"] for r in MetricsLog(os.path.join(root, name, "metrics.jsonl")).read()]}
out["resume_lines"] = [line for line in logs if line.startswith("[resume] step")]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_run_continues_on_another_mesh_and_remat_as_if_it_never_stopped(tmp_path):
    out = run_json(SCRIPT, str(tmp_path / "sft"), str(tmp_path), devices=8)
    for name in ("onto_2x4_remat_full", "onto_4_devices"):
        result = out[name]
        steps = result["steps"]
        assert steps == sorted(set(steps)) and steps[-1] == 3, steps  # nothing lost, nothing logged twice
        assert result["same_keys"], name
        assert result["param_diff"] < 1e-4, (name, result)
        assert result["metric_excess"][1] <= 1e-4, (name, result)
    assert any("mesh_shape [1, 8] → [2, 4]; model.remat none → full" in line for line in out["resume_lines"])
    assert any("mesh_shape [1, 8] → [4]" in line for line in out["resume_lines"])


def test_a_math_change_is_still_refused_on_resume():
    """Quick: the fingerprint comparison itself (the trainer's `_check_resumable` reads it)."""
    from fipo_jax.train.checkpoint import config_differences

    saved = json.loads(json.dumps(cpu_default().fingerprint()))
    now = json.loads(json.dumps(apply_overrides(cpu_default(), ["algo.loss.decay_rate=4",
                                                                *PLACEMENT_CHANGES]).fingerprint()))
    assert config_differences(saved, now) == ["algo.loss.decay_rate: checkpoint 8.0 vs now 4.0"]
