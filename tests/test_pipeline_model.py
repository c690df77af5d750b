"""The pipeline model (issue 33, item 5) and the planner's device groups (item 1): step times in
sequence and k-stale on shared and split devices, phases read from a run log, the modelled recipe
table, each group planned for its own phases and the split named when no shared mesh fits."""

import json

import pytest

from fipo_jax.config import apply_overrides, cpu_default, load_config
from fipo_jax.train import plan as plan_lib
from fipo_jax.train.pipeline_model import (
    CHIPS,
    Phases,
    Recipe,
    best_split,
    main,
    phases_from_log,
    recipe_phases,
    recipe_table,
    step_seconds,
)

PHASES = Phases(generate_s=40.0, score_s=2.0, update_s=30.0, sync_s=0.5, tokens=1e5, devices=8, tail_s=5.0)


def test_the_step_time_of_each_arrangement_follows_its_formula():
    g, l_, s, u, w = 40.0, 5.0, 2.0, 30.0, 0.5
    assert step_seconds(PHASES, 0) == g + l_ + s + u + w
    assert step_seconds(PHASES, 1) == step_seconds(PHASES, 2) == max(g + l_ + u + w, g + l_ + s)
    assert step_seconds(PHASES, 0, 4) == g * 2 + l_ + s + u * 2 + w
    assert step_seconds(PHASES, 1, 4) == max(g * 2 + l_ + s, u * 2 + w)
    assert step_seconds(PHASES, 1, concurrent=True) == max(g + l_ + s, u + w)  # phases that each leave cores idle
    host_bound = Phases(1.0, 50.0, 10.0, 0.0, 1.0, 8)  # scoring dominates: overlap hides the device work
    assert step_seconds(host_bound, 1) == 51.0 < step_seconds(host_bound, 0) == 61.0


def test_without_a_tail_no_split_beats_the_shared_mesh_and_with_one_the_best_split_hides_it():
    flat = Phases(40.0, 0.0, 40.0, 0.0, 1.0, 8)
    assert min(step_seconds(flat, 1, r) for r in range(1, 8)) == step_seconds(flat, 0) == 80.0
    tailed = Phases(40.0, 0.0, 40.0, 0.0, 1.0, 64, tail_s=20.0)
    rollout, seconds = best_split(tailed, 1)
    assert seconds == min(step_seconds(tailed, 1, r) for r in range(1, 64)) < step_seconds(tailed, 0) == 100.0
    assert seconds > step_seconds(flat, 0)  # the split pays the tail once, on fewer devices
    assert best_split(tailed, 1, multiple=16)[0] % 16 == 0
    with pytest.raises(ValueError, match="cannot split into groups of 64"):
        best_split(tailed, 1, multiple=64)


def test_phases_are_read_from_a_run_log_skipping_the_compiling_step():
    rows = [{"step": 0, "eval/avg@k": 0.1}]
    rows += [{"step": s, "time/rollout_s": 10.0 + s, "time/score_s": 2.0, "time/pack_s": 0.5, "time/update_s": 7.0,
              "time/weight_sync_s": 0.25, "time/step_s": 20.0, "time/tokens_per_s": 50.0} for s in (1, 2, 3, 4)]
    rows[1]["time/update_s"] = 99.0  # step 1 compiles
    phases = phases_from_log(rows, devices=4)
    assert (phases.generate_s, phases.score_s, phases.update_s, phases.sync_s, phases.tokens) == (
        13.0 - 2, 2.5, 7.0, 0.25, 1000.0)  # steps 2-4: means
    with pytest.raises(ValueError, match="no step after the first 1 holds phase times"):
        phases_from_log(rows[:2], devices=4)


def test_the_recipe_model_scales_with_chips_and_its_table_is_marked_as_a_model(capsys):
    recipe = Recipe()
    small, large = (recipe_phases(recipe, CHIPS["h100"], n) for n in (64, 128))
    assert small.generate_s == pytest.approx(2 * large.generate_s) and small.update_s == pytest.approx(2 * large.update_s)
    assert small.tail_s == large.tail_s > 0 and small.tokens == recipe.responses * 10_200
    assert recipe_phases(Recipe(response_tokens=4000), CHIPS["h100"], 64).update_s < small.update_s
    table = recipe_table(recipe, CHIPS["tpu-v5p"], [64])
    assert table.count("\n") == 2 and "| 64 |" in table
    with pytest.raises(ValueError, match="do not fit a replica"):
        recipe_phases(Recipe(parameters=1e12), CHIPS["h100"], 64)
    assert main(["--recipe", "--chip", "h100", "--chips", "64,128"]) == 0
    assert "modelled, not measured" in capsys.readouterr().out
    assert main(["--phases", "40,2,30,0.5", "--tokens", "1e5", "--devices", "8", "--tail", "5"]) == 0
    out = capsys.readouterr().out
    assert "| shared mesh, k = 0 | 77.50 |" in out and "split" in out


def test_fipo_plan_pipeline_reads_a_run_directory(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"mesh_shape": [2, 2]}))
    rows = [{"step": s, "time/rollout_s": 4.0, "time/score_s": 1.0, "time/update_s": 3.0, "time/step_s": 8.0,
             "time/tokens_per_s": 10.0} for s in range(4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    assert plan_lib.main(["--pipeline", "--run-dir", str(tmp_path)]) == 0
    assert "phases on 4 device(s): generate 3.00 s" in capsys.readouterr().out
    assert plan_lib.main(["--pipeline", "--run-dir", str(tmp_path / "missing")]) == 2
    (tmp_path / "config.json").write_text(json.dumps({"mesh_shape": [2], "rollout_mesh_shape": [2]}))
    assert plan_lib.main(["--pipeline", "--run-dir", str(tmp_path)]) == 0  # split: 3 s on 2 of 4 devices
    assert "phases on 4 device(s): generate 1.50 s" in capsys.readouterr().out


def test_each_group_is_planned_for_its_own_phases():
    config = apply_overrides(cpu_default(), ["mesh_shape=[4]", "rollout_mesh_shape=[2,2]"])
    groups = plan_lib.plan_groups(config)
    train, rollout = groups["train"], groups["rollout"]
    assert train.peak == max(train.update_peak, train.warm_start_peak)  # no rollout engine on the training devices
    assert rollout.optimizer == rollout.gradients == 0 and rollout.warm_start is None
    assert rollout.peak == max(rollout.sampler_program, rollout.prefill_program)  # k = 0: one copy of the weights
    stale = plan_lib.plan_groups(apply_overrides(config, ["rollout.max_staleness=1"]))["rollout"]
    assert stale.peak == rollout.peak + rollout.parameters  # the next weights arrive while the engine samples
    shared = plan_lib.plan(apply_overrides(cpu_default(), ["rollout.max_staleness=2"]), (1,))
    assert shared.peak >= shared.update_peak + shared.rollout_peak  # drawn ahead: both phases at once
    assert "update + rollouts drawn ahead" in shared.table() and "rollout engine peak" in rollout.table()


def test_the_planner_names_a_split_when_no_shared_mesh_fits(capsys):
    args = ["--config", "qwen2.5-32b-fipo", "--mesh", "1,16,4", "--device-memory", "64GiB",
            "--set", "rollout.max_staleness=1"]
    assert plan_lib.main(args) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "would fit on split devices" in x)
    train = line.split("mesh_shape=[")[1].split("]")[0]
    rollout = line.split("rollout_mesh_shape=[")[1].split("]")[0]
    assert plan_lib.main(["--config", "qwen2.5-32b-fipo", "--mesh", train, "--rollout-mesh", rollout,
                          "--device-memory", "64GiB", "--set", "rollout.max_staleness=1"]) == 0
    assert "(train group)" in capsys.readouterr().out
    config = load_config("qwen2.5-32b-fipo")
    assert plan_lib.split_suggestions(config, 64, "80GiB")  # k = 0 splits fit too
