"""The rollout pipeline (issue 33, items 1 and 2): the staleness schedule, the producer thread's
bound and errors, drift split by lag, split device groups and k-stale runs on 8 CPU devices, and a
k = 1 run killed mid-step that resumes with nothing lost and nothing repeated."""

import json
import os
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from fipo_jax.config import ConfigError, apply_overrides, cpu_default
from fipo_jax.core.packing import pack_batch
from fipo_jax.train.pipeline import Produced, RolloutPipeline, sampling_version
from fipo_jax.train.preflight import check_mesh
from fipo_jax.train.update import drift_metrics
from tests.multi_device import ROOT, run_json
from tests.test_trainer import TINY, kill_after_checkpoint


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_each_step_samples_with_weights_at_most_k_versions_old(k):
    for start in (0, 5):
        lags = [step - sampling_version(step, start, k) for step in range(start, start + 10)]
        assert all(0 <= lag <= k for lag in lags)
        assert lags[k:] == [k] * (10 - k)  # from t0 + k on, exactly k
        assert lags[:k] == list(range(k))  # a (re)start samples with its own weights first


def fake_produce(log, fail_at=None, seconds=0.0):
    def produce(step, policy, version):
        time.sleep(seconds)
        if step == fail_at:
            raise ValueError(f"no rollouts for step {step}")
        log.append((step, policy, version))
        return Produced(step, version, None, None, {}, {})
    return produce


@pytest.mark.parametrize("k", [1, 2])
def test_the_producer_draws_ahead_by_at_most_k_and_waits_for_the_weights(k):
    log = []
    pipe = RolloutPipeline(fake_produce(log), start=0, end=8, max_staleness=k, policy="w0")
    for step in range(8):
        item = pipe.get(step)
        assert item.version == sampling_version(step, 0, k)
        time.sleep(0.02)  # an update: the producer runs ahead meanwhile, as far as the weights allow
        assert max(s for s, _, _ in log) <= step + k  # step t + k + 1 needs version t + 1, not published yet
        if pipe.needs(step + 1):
            pipe.publish(step + 1, f"w{step + 1}")
    pipe.close()
    assert [(s, p) for s, p, _ in log] == [(s, f"w{sampling_version(s, 0, k)}") for s in range(8)]
    assert pipe.max_waiting <= k + 1


def test_a_producer_error_is_raised_by_the_step_that_needed_it_and_close_stops_a_waiting_producer():
    pipe = RolloutPipeline(fake_produce([], fail_at=1), start=0, end=5, max_staleness=1, policy="w0")
    pipe.get(0)
    with pytest.raises(ValueError, match="no rollouts for step 1"):
        pipe.get(1)
    pipe.close()
    log = []
    pipe = RolloutPipeline(fake_produce(log), start=0, end=5, max_staleness=1, policy="w0")
    pipe.get(0)
    time.sleep(0.05)  # the producer drew step 1 and now waits for version 1
    closer = threading.Thread(target=pipe.close)
    closer.start()
    closer.join(timeout=5)
    assert not closer.is_alive() and [s for s, _, _ in log] == [0, 1]


def test_drift_is_split_by_lag_and_stale_lags_reach_the_batch():
    mask = jnp.ones((2, 3), bool)
    prox = jnp.zeros((2, 3))
    behaviour = jnp.array([[0.1, 0.1, 0.1], [0.4, 0.4, 0.4]])
    stale = jnp.array([[False] * 3, [True] * 3])
    out = drift_metrics(jnp.ones((2, 3)), prox, behaviour, mask, stale)
    assert float(out["drift/engine"]) == pytest.approx(0.1) and float(out["drift/staleness"]) == pytest.approx(0.4)
    assert float(out["rollout/sampler_logprob_gap"]) == pytest.approx(0.25)
    assert float(out["rollout/stale_token_frac"]) == pytest.approx(0.5)
    fresh = drift_metrics(jnp.ones((2, 3)), prox, behaviour, mask, jnp.zeros((2, 3), bool))
    assert float(fresh["drift/staleness"]) == 0.0  # no stale token: 0, not NaN
    fields = {"prompt_ids": np.ones((4, 2), np.int32), "prompt_mask": np.ones((4, 2), bool),
              "tokens": np.ones((4, 3), np.int32), "response_mask": np.ones((4, 3), bool),
              "scores": np.zeros(4, np.float32), "sampler_log_probs": np.zeros((4, 3), np.float32)}
    assert pack_batch(fields, 2, 2)[0].lags.tolist() == [0, 0, 0, 0]
    assert pack_batch(fields, 2, 2, lags=np.array([0, 1, 2, 1]))[0].lags.tolist() == [0, 1, 2, 1]
    with pytest.raises(ValueError, match="one per sequence"):
        pack_batch(fields, 2, 2, lags=np.array([0, 1]))


def test_the_split_needs_its_devices_and_bad_shapes_are_one_line():
    check_mesh((4,), 8, (4,))
    with pytest.raises(ConfigError, match=r"mesh_shape \[4\] \+ rollout_mesh_shape \[2, 4\] needs 12 devices"):
        check_mesh((4,), 8, (2, 4))
    for bad, match in ((["rollout_mesh_shape=[0]"], r"rollout_mesh_shape \(data axis\) must be a positive int"),
                       (["rollout.max_staleness=-1"], r"rollout.max_staleness must be an int >= 0")):
        with pytest.raises(ConfigError, match=match):
            apply_overrides(cpu_default(), bad)


# Runs in a subprocess with 8 CPU devices, 3 steps each: k = 0 on a shared 4-device mesh and on split
# groups (4 train + 4 rollout); k = 1 (shared) and k = 2 (split 4 + 2 × 2) as run by the trainer's
# pipeline and as a sequential reference (the trainer's own pieces, no thread) fed the same stale weights.
SCRIPT = r"""
import json, os, sys
import jax, numpy as np
from fipo_jax.config import apply_overrides, cpu_default
from fipo_jax.train import update as update_lib
from fipo_jax.train.pipeline import sampling_version
from fipo_jax.train.run_log import MetricsLog
from fipo_jax.train.trainer import Trainer
from tests.test_trainer import TINY

cache, root = sys.argv[1], sys.argv[2]
base = [o for o in TINY if not o.startswith("steps=")] + [f"sft.cache_dir={cache}", "eval.every=0", "steps=3",
                                                         "mesh_shape=[4]"]
comparable = lambda row: {k: v for k, v in row.items() if not k.startswith(("time/", "eval/"))}  # the run evaluates

def trainer(name, *extra):
    return Trainer(apply_overrides(cpu_default(), base + list(extra)), os.path.join(root, name), progress=False,
                   log=lambda line: None)

def run(name, *extra):
    t = trainer(name, *extra)
    t.train()
    return t, [comparable(r) for r in MetricsLog(os.path.join(root, name, "metrics.jsonl")).read()[1:]]

def sequential(name, k, *extra):
    t = trainer(name, f"rollout.max_staleness={k}", *extra)
    policies, rows = {0: t.weight_sync(t.state.params)[0]}, []
    for step in range(3):
        version = sampling_version(step, 0, k)
        produced = t.produce(step, policies[version], version)
        batch = jax.device_put(produced.batch, update_lib.batch_shardings(produced.batch, t.mesh))
        t.state, metrics = t.update(t.state, batch)
        policies[step + 1] = t.weight_sync(t.state.params)[0]
        rows.append(comparable({**produced.metrics, **{k: float(v) for k, v in metrics.items()}}))
    return t, rows

def same(a, b, skip=()):
    params = all(np.array_equal(np.asarray(x), np.asarray(y))
                 for x, y in zip(jax.tree.leaves(a[0].state.params), jax.tree.leaves(b[0].state.params)))
    rows = [{k: v for k, v in r.items() if k not in skip} for r in a[1]], [{k: v for k, v in r.items()
                                                                         if k not in skip} for r in b[1]]
    diff = [sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k)) for x, y in zip(*rows)]
    return {"params": params, "metric_diffs": diff}

out = {}
shared, split = run("shared", "rollout.max_staleness=0"), run("split", "rollout_mesh_shape=[4]")
out["split_vs_shared"] = same(shared, split, skip=("rollout/weight_sync_bytes", "step"))
out["split_sync_bytes"] = [r["rollout/weight_sync_bytes"] for r in split[1]]
for k, extra in ((1, ()), (2, ("rollout_mesh_shape=[2,2]",))):
    piped = run(f"k{k}", f"rollout.max_staleness={k}", *extra)
    reference = sequential(f"k{k}_reference", k, *extra)
    out[f"k{k}"] = {**same(piped, reference, skip=("step", "time/weight_sync_s", "rollout/weight_sync_bytes")),
                    "lags": [r["rollout/staleness_max"] for r in piped[1]],
                    "lag_means": [r["rollout/staleness_mean"] for r in piped[1]],
                    "stale_drift": [r["drift/staleness"] for r in piped[1]],
                    "stale_frac": [r["rollout/stale_token_frac"] for r in piped[1]],
                    "spans": [[r["data/prompts_from"], r["data/prompts_to"]] for r in piped[1]]}
# k = 1 on a shared mesh, continued for a 4th step on 2 + 4 split devices with k = 2: a placement change
logs = []
continued = Trainer(apply_overrides(cpu_default(), base[:-2] + ["steps=4", "mesh_shape=[2]", "rollout_mesh_shape=[4]",
                                                             "rollout.max_staleness=2"]),
                    os.path.join(root, "k1"), progress=False, log=logs.append)
continued.train()
last = MetricsLog(os.path.join(root, "k1", "metrics.jsonl")).read()[-1]
out["continued"] = {"lines": [line for line in logs if line.startswith("[resume] step")], "step": last["step"],
                    "lag": last["rollout/staleness_max"], "from": last["data/prompts_from"],
                    "previous_to": out["k1"]["spans"][-1][1]}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_split_groups_and_stale_pipelines_equal_their_sequential_references(tmp_path):
    out = run_json(SCRIPT, str(tmp_path / "sft"), str(tmp_path / "runs"))
    # k = 0 on split groups: bit for bit the shared mesh (parameters and every metric), the weights moved each step
    assert out["split_vs_shared"] == {"params": True, "metric_diffs": [[], [], []]}
    assert all(b > 0 for b in out["split_sync_bytes"])
    for k in (1, 2):
        run = out[f"k{k}"]
        assert run["params"] and run["metric_diffs"] == [[], [], []], run  # = the sequential reference
        assert run["lags"] == [min(step, k) for step in range(3)] == run["lag_means"]  # ≤ k, and ≥ 1 occurs
        assert run["stale_frac"][0] == 0 and run["stale_frac"][1] == 1 and run["stale_frac"][2] == 1
        assert run["stale_drift"][0] == 0 and run["stale_drift"][2] > 0  # step 1's warm-up LR is 0: no drift yet
        assert all(a[1] == b[0] for a, b in zip(run["spans"], run["spans"][1:]))  # consecutive prompts
    # resumed on another split and k: logged; the first step after it samples with the checkpoint's weights
    continued = out["continued"]
    assert continued["step"] == 4 and continued["lag"] == 0 and continued["from"] == continued["previous_to"]
    assert len(continued["lines"]) == 1
    for change in ("mesh_shape [4] → [2]", "rollout_mesh_shape [] → [4]", "rollout.max_staleness 1 → 2"):
        assert change in continued["lines"][0]


@pytest.mark.slow
def test_a_k1_run_killed_mid_step_resumes_with_nothing_lost_and_nothing_repeated(tmp_path):
    """SIGKILL a k = 1 training process while its producer draws ahead, rerun the same command: every
    step is logged once, the prompts of consecutive steps follow each other, the in-flight rollouts
    are drawn again from the checkpoint's weights."""
    run_dir = str(tmp_path / "killed")
    overrides = [o for o in TINY if not o.startswith("steps=")] + [
        f"sft.cache_dir={tmp_path / 'sft'}", "rollout.max_staleness=1", "eval.every=0", "checkpoint_every=1",
        "optim.lr=1e-4"]  # TINY's 1e-3 collapses the tiny policy by step 5
    cmd = [sys.executable, "-m", "fipo_jax.train.cli", "--run-dir", run_dir, "--no-progress", "--steps", "5"] + [
        a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    kill_after_checkpoint(cmd, env, os.path.join(run_dir, "checkpoints"), 2)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")][1:]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["data/prompts_from"] == 0
    assert all(a["data/prompts_to"] == b["data/prompts_from"] for a, b in zip(rows, rows[1:]))
    assert all(r["rollout/staleness_max"] <= 1 for r in rows)
    assert "[resume] restored step" in done.stdout
