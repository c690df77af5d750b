"""A damaged run directory loses nothing without a word (issue 10, items 7, 9, 11, 14): damaged
checkpoints are skipped and set aside, garbled metric lines cost only themselves, one trainer per
directory. Fast, on plain pytrees; the trainer-level recoveries are in test_trainer.py."""

import glob
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fipo_jax.train import run_dir
from fipo_jax.train.checkpoint import CheckpointFormatError, Checkpointer, abstract_like, nonfinite_leaves
from fipo_jax.train.run_log import MetricsLog
from fipo_jax.train.summary import summarize


def _state(value=1.0):
    return {"w": jnp.full((1024,), value, jnp.float32), "b": jnp.arange(3.0), "n": jnp.int32(7)}


def _three_checkpoints(directory):
    checkpointer = Checkpointer(directory, max_to_keep=5)
    for step in (1, 2, 3):
        checkpointer.save(step, _state(step), {"step": step})
    checkpointer.wait()
    return os.path.join(directory, "3")


def _tensor_files(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    assert files, os.listdir(os.path.join(step_dir, "state"))
    return files


def _truncate_tensors(step_dir):
    for path in _tensor_files(step_dir):
        with open(path, "r+b") as f:
            f.truncate(8)


def _garbage_tensors(step_dir):
    for path in _tensor_files(step_dir):
        with open(path, "wb") as f:
            f.write(b"\x00garbage" * 20)


def _garbage_metadata(step_dir):
    with open(os.path.join(step_dir, "metadata", "metadata"), "w") as f:
        f.write("{not json")


def _empty_step_dir(step_dir):
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


def _no_state(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state"))


@pytest.mark.parametrize("damage, reason", [
    (_truncate_tensors, "tensors unreadable"),
    (_garbage_tensors, "tensors unreadable"),
    (_garbage_metadata, "metadata unreadable: JSONDecodeError"),
    (_empty_step_dir, r"metadata unreadable: .*holds no items \(an empty step folder\)"),
    (_no_state, "tensors unreadable"),
])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, reason):
    directory = str(tmp_path / "checkpoints")
    damage(_three_checkpoints(directory))
    checkpointer = Checkpointer(directory, max_to_keep=5)
    restored = checkpointer.restore_newest(abstract_like(_state()))
    assert restored.step == 2 and restored.metadata == {"step": 2}
    np.testing.assert_array_equal(restored.state["w"], np.full((1024,), 2.0))
    [(step, why, moved)] = restored.skipped
    assert step == 3 and re.search(reason, why), why
    # Set aside with its reason, so nothing is deleted and step 3 can be saved again.
    assert moved.startswith(directory + ".damaged") and open(os.path.join(moved, "reason.txt")).read().strip() == why
    assert checkpointer.latest_step() == 2
    checkpointer.save(3, _state(3), {"step": 3})
    checkpointer.wait()
    assert checkpointer.restore_newest(abstract_like(_state())).step == 3


def test_non_finite_values_in_a_checkpoint_are_named_and_skipped(tmp_path):
    directory = str(tmp_path / "checkpoints")
    _three_checkpoints(directory)
    checkpointer = Checkpointer(directory, max_to_keep=5)
    bad = _state()
    bad["b"] = bad["b"].at[1].set(jnp.inf)
    checkpointer.save(4, bad, {"step": 4})
    checkpointer.wait()
    restored = checkpointer.restore_newest(abstract_like(_state()))
    assert restored.step == 3
    assert restored.skipped[0][:2] == (4, "non-finite values in ['b']")
    assert nonfinite_leaves({"x": jnp.array([1.0, jnp.nan]), "y": jnp.ones(2), "k": jnp.int32(1)}) == ["['x']"]


def test_no_restorable_checkpoint_and_refusals_that_are_not_damage(tmp_path):
    directory = str(tmp_path / "checkpoints")
    _garbage_metadata(_three_checkpoints(directory))
    for step in ("1", "2"):
        _truncate_tensors(os.path.join(directory, step))
    restored = Checkpointer(directory).restore_newest(abstract_like(_state()))
    assert restored.step is None and [s for s, _, _ in restored.skipped] == [3, 2, 1]
    # A checkpoint of another fipo_jax layout is refused, not set aside; so is what `check` refuses.
    os.makedirs(tmp_path / "old" / "3" / "params")
    with pytest.raises(CheckpointFormatError, match="checkpoint 3 .* has format None"):
        Checkpointer(str(tmp_path / "old")).restore_newest(abstract_like(_state()))
    other = str(tmp_path / "other")
    _three_checkpoints(other)

    def refuse(step, metadata):
        raise ValueError(f"refused {step}")

    with pytest.raises(ValueError, match="refused 3"):
        Checkpointer(other).restore_newest(abstract_like(_state()), refuse)
    assert sorted(os.listdir(other)) == ["1", "2", "3"]


def test_a_garbled_metrics_line_costs_only_itself(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    rows = [{"step": s, "x": s} for s in range(6)]
    lines = [json.dumps(r) for r in rows]
    lines[2] = '{"step": 2, "x"\x00\x00 garbled'
    lines.insert(4, "[1, 2]")  # valid JSON, not a row
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + '{"step": 6, "cut')  # and a line cut by a kill
    log = MetricsLog(path)
    assert [r["step"] for r in log.read()] == [0, 1, 3, 4, 5]
    notes = log.truncate_after(4)
    assert [r["step"] for r in log.read()] == [0, 1, 3, 4]
    assert "3 unreadable line(s) (line 3, 5, 8) moved to" in notes[0] and path + ".garbled" in notes[0]
    assert "no row for 1 of the steps 0…4 (2)" in notes[1]
    with open(path + ".garbled") as f:
        assert f.read().splitlines() == [lines[2], "[1, 2]", '{"step": 6, "cut']


def test_a_summary_without_the_step_0_evaluation_has_no_before_figures(tmp_path):
    evaluation = {"eval/avg@k": 0.5, "eval/pass@k": 0.75, "eval/cons@k": 0.5, "eval/k": 2, "eval/length_mean": 9.0}
    rows = [{"step": 3, "rollout/accuracy": 0.4}, {"step": 4, **evaluation}]
    summary = summarize(rows, "run", "fipo", 4, 8, str(tmp_path / "plots"))
    assert summary["accuracy_before"] is None and summary["accuracy_after"] == 0.5
    assert summary["metric_rows_missing"] == 3  # steps 0, 1, 2
    summary = summarize([{"step": 0, **evaluation}, *rows], "run", "fipo", 4, 8, str(tmp_path / "plots"))
    assert summary["accuracy_before"] == 0.5 and summary["metric_rows_missing"] == 2


def test_one_trainer_per_run_directory(tmp_path):
    directory = str(tmp_path / "run")
    with run_dir.lock(directory):
        with pytest.raises(run_dir.RunDirectoryLocked, match=rf"run directory {directory} is in use by another "
                                                             rf"trainer \(pid {os.getpid()} on .*\)"):
            with run_dir.lock(directory):
                pass
    with run_dir.lock(directory):  # released on exit
        pass


def test_an_earlier_runs_files_are_set_aside(tmp_path):
    directory = tmp_path / "run"
    assert run_dir.set_aside(str(directory)) is None
    (directory / "plots").mkdir(parents=True)
    (directory / "metrics.jsonl").write_text('{"step": 0}\n')
    (directory / "config.json").write_text("{}")
    moved = run_dir.set_aside(str(directory))
    assert sorted(os.listdir(moved)) == ["config.json", "metrics.jsonl", "plots"]
    assert not (directory / "metrics.jsonl").exists()
    (directory / "config.json").write_text("{}")
    assert run_dir.set_aside(str(directory)) != moved  # never onto an earlier set-aside


@pytest.mark.slow
def test_a_damaged_sft_cache_is_rebuilt_by_the_warm_start(tmp_path):
    from flax import nnx

    from fipo_jax.train.build import build_policy, warm_start
    from fipo_jax.config import apply_overrides, cpu_default
    from fipo_jax.data import ChainTask

    config = apply_overrides(cpu_default(), [
        "model.num_layers=1", "model.hidden_size=16", "model.intermediate_size=32", "model.num_heads=2",
        "model.num_kv_heads=1", "data.n_terms=3", "sft.steps=2", "sft.batch_size=4", f"sft.cache_dir={tmp_path}"])
    tokenizer, model = build_policy(config, None, lambda s: None)
    task = ChainTask(n_terms=3)
    warm_start(config, model, tokenizer, task, lambda s: None, lambda total, desc: None)
    [cache] = [p for p in os.listdir(tmp_path) if p.endswith(".npz")]
    with open(tmp_path / cache, "r+b") as f:
        f.truncate(100)
    log = []
    warm_start(config, model, tokenizer, task, log.append, lambda total, desc: None)
    assert log[0].startswith(f"[warning] SFT cache {tmp_path / cache}") and "retraining the warm start" in log[0]
    assert os.path.exists(tmp_path / (cache + ".corrupt"))
    retrained = [np.array(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    log.clear()
    nnx.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    warm_start(config, model, tokenizer, task, log.append, lambda total, desc: None)  # the rebuilt cache loads
    assert log[0] == f"[sft] loaded cached warm start {tmp_path / cache}"
    assert log[1].startswith("[sft] warm start parameters sha256 ") and len(log) == 2
    for loaded, saved in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), retrained):
        np.testing.assert_array_equal(loaded, saved)
