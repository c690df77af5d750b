"""End to end on a tiny model: rewards, dynamic sampling, updates, evaluation, checkpoints,
resume equality (also after a SIGKILL), config refusal, the command line."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fipo_jax.train import update as update_lib
from fipo_jax.core.packing import RLBatch
from fipo_jax.config import ConfigError, apply_overrides, cpu_default
from fipo_jax.rewards.shaping import validate_overlong_args
from fipo_jax.train.run_log import MetricsLog
from fipo_jax.train.trainer import DynamicSamplingExhausted, NonFiniteStateError, Trainer, majority_vote

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=64", "model.num_heads=2",
    "model.num_kv_heads=1", "data.n_terms=3", "data.train_prompts=64", "data.eval_prompts=8",
    "rollout.n=4", "rollout.prompts_per_step=4", "rollout.prompts_per_round=6", "rollout.max_rounds=2",
    "rollout.max_response_tokens=20", "reward.overlong_buffer=4", "algo.mini_batches=2",
    "algo.micro_batch_size=4", "optim.lr=1e-3", "optim.warmup_steps=1", "eval.every=2", "eval.k=2",
    "sft.steps=30", "sft.batch_size=16", "checkpoint_every=1", "keep_checkpoints=2", "steps=4",
    # the pre-testbed recipe, which this 1-layer policy partly solves after 30 SFT steps (the testbed's it cannot)
    "data.invertible=false", "sft.partial=false", "sft.step_fraction=0.5", "sft.seed=null",
]


def tiny_config(cache_dir, *extra):
    return apply_overrides(cpu_default(), TINY + [f"sft.cache_dir={cache_dir}", *extra])


def comparable(rows):
    """Metrics minus wall-clock measurements."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sft_cache"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_dir):
    run_dir = str(tmp_path_factory.mktemp("reference"))
    summary = Trainer(tiny_config(cache_dir, "tensorboard=true"), run_dir, progress=False, log=lambda s: None).train()
    return run_dir, summary


def tensorboard_scalars(directory) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the TFRecord event files in `directory` (last write wins)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):  # record: u64 length, u32 crc, payload, u32 crc
            length = int.from_bytes(data[offset : offset + 8], "little")
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 16 + length
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


@pytest.mark.slow
def test_end_to_end_run_writes_everything(reference_run):
    run_dir, summary = reference_run
    rows = MetricsLog(os.path.join(run_dir, "metrics.jsonl")).read()
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for key in ("accuracy_before", "accuracy_after", "mean_length_before", "mean_length_after"):
        assert 0 <= summary[key] <= (1 if key.startswith("acc") else 20)
    step = rows[1]
    for key in ("rollout/accuracy", "rollout/rounds", "rollout/length_median", "rollout/length_clip_rate",
                "actor/pg_clipfrac", "actor/ppo_kl", "actor/influence_weights_mean", "actor/entropy",
                "actor/grad_norm", "actor/lr", "rollout/sampler_logprob_gap", "time/step_s", "time/tokens_per_s"):
        assert key in step, key
    assert step["actor/lr"] == 0.0  # warm-up counted in rollout steps: the first step has LR 0
    assert rows[2]["actor/lr"] > 0
    assert "eval/avg@k" in rows[0] and "eval/cons@k" in rows[2] and "eval/pass@k" in rows[4]
    # Old log-probs are recomputed by the trainer; they agree with the sampler's to float error.
    assert step["rollout/sampler_logprob_gap"] < 1e-3
    assert {os.path.basename(p) for p in summary["plots"]} >= {"accuracy.png", "length.png", "influence_weights.png",
                                                               "influence_activity.png"}
    # FIPO's activity: mini-batch 1 updates from the rollout policy (nothing active); the run's
    # fraction over mini-batches 2…M is the ratio of the logged counts.
    assert all(r["influence/mb1_active_frac"] == 0.0 for r in rows[1:])
    active, total = (sum(r[f"influence/{k}_tokens_after_first"] for r in rows[1:]) for k in ("active", "loss"))
    assert summary["influence_active_fraction"] == pytest.approx(active / total if total else 0.0)
    assert 0 <= active <= total
    # Influence views at each evaluation after a step: one page, one PNG per response.
    views = sorted(os.listdir(os.path.join(run_dir, "views")))
    assert views == [f"step000{s}{suffix}" for s in (2, 4) for suffix in (".html", "_0.png", "_1.png", "_2.png")]
    page = open(os.path.join(run_dir, "views", "step0004.html"), encoding="utf-8").read()
    assert page.count("Δlog p = ") >= 3 and "influence weights after step 4" in page
    assert json.load(open(os.path.join(run_dir, "summary.json")))["steps"] == 4
    kept = sorted(d for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit())
    assert kept == ["3", "4"]  # keep-last-N
    scalars = tensorboard_scalars(os.path.join(run_dir, "tensorboard"))
    assert sorted(scalars["rollout/accuracy"]) == [1, 2, 3, 4] and sorted(scalars["eval/avg_k"]) == [0, 2, 4]  # TensorBoard tags: "@" → "_"
    assert scalars["actor/pg_loss"][3] == pytest.approx(rows[3]["actor/pg_loss"], rel=1e-6)


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tmp_path, cache_dir, reference_run):
    run_dir = str(tmp_path / "resumed")
    Trainer(tiny_config(cache_dir), run_dir, progress=False, log=lambda s: None).train(total_steps=2)
    Trainer(tiny_config(cache_dir), run_dir, progress=False, log=lambda s: None).train()  # continues to 4
    ours = MetricsLog(os.path.join(run_dir, "metrics.jsonl")).read()
    reference = MetricsLog(os.path.join(reference_run[0], "metrics.jsonl")).read()
    assert comparable(ours) == comparable(reference)


def kill_after_checkpoint(cmd: list[str], env: dict, checkpoints: str, step: int, timeout_s: float = 300) -> None:
    """Start ``cmd`` and SIGKILL it once checkpoint ``step`` appears in ``checkpoints`` (or it ends)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(checkpoints) and str(step) in os.listdir(checkpoints):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_killed_run_resumes_identically(tmp_path, cache_dir, reference_run):
    """SIGKILL a training process after its second checkpoint, rerun the same command."""
    run_dir = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "fipo_jax.train.cli", "--run-dir", run_dir, "--no-progress",
           "--steps", "4"] + [a for o in TINY + [f"sft.cache_dir={cache_dir}"] for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    checkpoints = os.path.join(run_dir, "checkpoints")
    kill_after_checkpoint(cmd, env, checkpoints, 2)
    # Leave a half-written step behind, as a kill during a save would.
    os.makedirs(os.path.join(checkpoints, "9.orbax-checkpoint-tmp-0", "params"), exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "cut')
    assert subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode == 0
    ours = MetricsLog(os.path.join(run_dir, "metrics.jsonl")).read()
    reference = MetricsLog(os.path.join(reference_run[0], "metrics.jsonl")).read()
    assert comparable(ours) == comparable(reference)


@pytest.mark.slow
def test_changed_config_is_refused_on_resume(tmp_path, cache_dir, reference_run):
    import shutil

    run_dir = str(tmp_path / "changed")
    shutil.copytree(reference_run[0], run_dir)
    with pytest.raises(ConfigError, match=r"algo\.loss\.decay_rate: checkpoint 8\.0 vs now 32\.0"):
        Trainer(tiny_config(cache_dir, "algo.loss.decay_rate=32"), run_dir, progress=False,
                log=lambda s: None).train()


@pytest.mark.slow
def test_dynamic_sampling_exhaustion(tmp_path, cache_dir):
    """Asking for more groups than the rounds can produce: an error, or padding when allowed."""
    scarce = ["rollout.prompts_per_round=1", "rollout.max_rounds=1", "steps=1", "eval.every=0"]
    trainer = Trainer(tiny_config(cache_dir, *scarce, "rollout.on_exhausted=error"), str(tmp_path / "a"),
                      progress=False, log=lambda s: None)
    with pytest.raises(DynamicSamplingExhausted, match=r"only [01] of 4 prompt groups had mixed outcomes"):
        trainer.step()
    lines = []
    padded = Trainer(tiny_config(cache_dir, "rollout.prompts_per_round=2", "rollout.max_rounds=1",
                                 "rollout.dynamic_sampling=false", "steps=1"), str(tmp_path / "b"),
                     progress=False, log=lines.append)
    metrics = padded.step()
    assert metrics["rollout/padded_rows"] == 8 and np.isfinite(metrics["actor/loss"])
    # Training on a mostly padded batch is said once, loudly, and counted in the summary.
    summary = padded.train(total_steps=3)
    warnings = [line for line in lines if line.startswith("[warning]")]
    assert len(warnings) == 1 and "8 of 16 rows are padding" in warnings[0], lines
    assert summary["steps_mostly_padding"] == 2  # steps 2 and 3 (step 1 ran outside train())


@pytest.mark.slow
def test_exception_inside_an_update_leaves_the_trainer_usable(tmp_path, cache_dir, monkeypatch):
    """A loss that raises mid-update: the state is untouched, the next step and a save work."""

    trainer = Trainer(tiny_config(cache_dir, "eval.every=0"), str(tmp_path / "run"), progress=False,
                      log=lambda s: None)
    before = jax.tree.map(np.asarray, trainer.state.params)

    def failing_loss(*args, **kwargs):
        raise RuntimeError("injected loss failure")

    with monkeypatch.context() as patch:
        patch.setattr(update_lib, "policy_loss_parts", failing_loss)
        with pytest.raises(RuntimeError, match="injected loss failure"):
            trainer.step()
    assert trainer.step_index == 0
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, trainer.state.params))
    metrics = trainer.step()
    assert metrics["step"] == 1 and np.isfinite(metrics["actor/loss"]) and trainer.step_index == 1
    trainer.save()
    trainer.checkpointer.wait()
    state, metadata = trainer.checkpointer.restore(update_lib.abstract_state(trainer.state, trainer.state_shardings))
    assert metadata["step"] == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params),
                 jax.tree.map(np.asarray, trainer.state.params))
    # Parameters that are not finite are never checkpointed.
    trainer.state = trainer.state.replace(params=jax.tree.map(lambda x: x * np.nan, trainer.state.params))
    with pytest.raises(NonFiniteStateError, match="parameters are not finite; not checkpointing"):
        trainer.save()
    assert trainer.checkpointer.latest_step() == 1


@pytest.mark.parametrize("override, message", [
    ("optim.lr=inf", "optim.lr must be a finite number > 0 and < 1, got inf"),
    ("optim.lr=1e30", "optim.lr must be a finite number > 0 and < 1"),
    ("optim.eps=0", "optim.eps must be a finite number > 0"),
    ("optim.grad_clip=nan", "optim.grad_clip must be a finite number > 0"),
])
def test_insane_optimizer_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(cpu_default(), [override])


def test_checkpointer_knows_nothing_of_the_trainer(tmp_path):
    """save(step, state, metadata) / restore(abstract_state) on a plain pytree; other layouts are refused."""
    from fipo_jax.train.checkpoint import CheckpointFormatError, Checkpointer, abstract_like

    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "key": jax.random.key(3), "n": np.int32(7)}
    state = jax.tree.map(jax.numpy.asarray, state)
    checkpointer = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=1)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpointer.restore(abstract_like(state))
    checkpointer.save(5, state, {"note": "hello"})
    checkpointer.save(6, state, {"note": "again"})
    restored, metadata = checkpointer.restore(abstract_like(state))
    assert metadata == {"note": "again"} and checkpointer.latest_step() == 6
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert jax.numpy.array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(state["key"]))
    os.makedirs(tmp_path / "old" / "3" / "params")  # the layout of an older fipo_jax
    with pytest.raises(CheckpointFormatError, match="checkpoint 3 .* has format None"):
        Checkpointer(str(tmp_path / "old")).metadata()


def test_majority_vote():
    assert majority_vote(["3", None, "4", "4", "3"]) == "3"  # tie: first seen
    assert majority_vote([None, ""]) is None
    assert majority_vote(["7", "8", "8"]) == "8"


def test_overlong_buffer_bound_matches_the_reward_code():
    # L_buf = L_max is allowed (the penalty ramps from length 0), as in rewards.shaping and verl.
    config = apply_overrides(cpu_default(), ["rollout.max_response_tokens=16", "reward.overlong_buffer=16"])
    assert config.reward.overlong_buffer == config.rollout.max_response_tokens
    validate_overlong_args(16, 16, 1.0)
    with pytest.raises(ConfigError, match=r"reward\.overlong_buffer \(17\) must be <= rollout\.max_response_tokens"):
        apply_overrides(cpu_default(), ["rollout.max_response_tokens=16", "reward.overlong_buffer=17"])
    with pytest.raises(ValueError, match="must be <= max_response_length"):
        validate_overlong_args(16, 17, 1.0)


@pytest.mark.slow
def test_cli_help_and_config_errors(tmp_path):
    bin_dir = os.path.dirname(sys.executable)  # the console commands the install put beside the interpreter
    train = os.path.join(bin_dir, "fipo-train")
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([train, "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "--set" in out.stdout and "qwen2.5-32b-fipo" in out.stdout
    assert out.stdout.startswith("usage: fipo-train")
    out = subprocess.run([os.path.join(bin_dir, "fipo-plan"), "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.startswith("usage: fipo-plan") and "--device-memory" in out.stdout
    out = subprocess.run([train, "--set", "rollout.nn=4"], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "unknown config field 'rollout.nn'" in out.stderr and "did you mean 'n'" in out.stderr
    out = subprocess.run([train, "--config", "qwen2.5-32b-fipo", "--algo", "dapo", "--print-config",
                          "--set", "rollout.n=8"], capture_output=True, text=True, env=env)
    printed = json.loads(out.stdout)
    assert printed["rollout"]["n"] == 8 and printed["algo"]["loss"]["loss_mode"] == "dapo"
    assert printed["algo"]["loss"]["drop_dual_clipped_sequences"] is None  # follows loss_mode, as saved
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"rollout": {"n": 0}}))
    out = subprocess.run([train, "--config", str(config_file)], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "rollout.n must be >= 1" in out.stderr


# ----------------------------------------------------------------------------- damaged run directories


def _copy_run(reference_run, tmp_path, name):
    import shutil

    run_dir = str(tmp_path / name)
    shutil.copytree(reference_run[0], run_dir)
    return run_dir


@pytest.mark.slow
def test_asking_for_fewer_steps_than_done_says_so(tmp_path, cache_dir, reference_run):
    """Resuming a 4-step run with --steps 2 trains nothing and says why (issue 24, item 18)."""
    lines = []
    summary = Trainer(tiny_config(cache_dir), _copy_run(reference_run, tmp_path, "fewer"), progress=False,
                      log=lines.append).train(total_steps=2)
    assert summary["steps"] == 4
    assert any(line.startswith("[resume] the run already has 4 steps, at least the 2 asked for: nothing to train")
               for line in lines), lines


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one(tmp_path, cache_dir, reference_run):
    """Checkpoint 4's tensors truncated: resume skips it (saying so), redoes step 4 from checkpoint 3,
    and the metrics equal the uninterrupted run's."""
    import glob

    run_dir = _copy_run(reference_run, tmp_path, "damaged")
    for path in glob.glob(os.path.join(run_dir, "checkpoints", "4", "state", "**", "d", "*"), recursive=True):
        with open(path, "r+b") as f:
            f.truncate(16)
    lines = []
    Trainer(tiny_config(cache_dir), run_dir, progress=False, log=lines.append).train()
    assert any(line.startswith("[resume] checkpoint 4 cannot be restored (tensors unreadable") for line in lines)
    assert "[resume] restored step 3" in "\n".join(lines)
    assert os.listdir(os.path.join(run_dir, "checkpoints.damaged"))
    ours = MetricsLog(os.path.join(run_dir, "metrics.jsonl")).read()
    reference = MetricsLog(os.path.join(reference_run[0], "metrics.jsonl")).read()
    assert comparable(ours) == comparable(reference)


@pytest.mark.slow
def test_metrics_without_a_checkpoint_are_set_aside_not_overwritten(tmp_path, cache_dir, reference_run):
    import shutil

    run_dir = _copy_run(reference_run, tmp_path, "no_checkpoints")
    shutil.rmtree(os.path.join(run_dir, "checkpoints"))
    lines = []
    Trainer(tiny_config(cache_dir), run_dir, progress=False, log=lines.append).train(total_steps=1)
    [previous] = [d for d in os.listdir(run_dir) if d.startswith("previous-")]
    assert any("holds an earlier run's files but no checkpoint to resume: moved them to" in line for line in lines)
    old = MetricsLog(os.path.join(run_dir, previous, "metrics.jsonl")).read()
    reference = MetricsLog(os.path.join(reference_run[0], "metrics.jsonl")).read()
    assert old == reference and os.path.exists(os.path.join(run_dir, previous, "summary.json"))
    new = MetricsLog(os.path.join(run_dir, "metrics.jsonl")).read()
    assert [r["step"] for r in new] == [0, 1] and comparable(new)[0] == comparable(reference)[0]


@pytest.mark.slow
def test_garbled_or_deleted_metrics_keep_what_can_be_kept(tmp_path, cache_dir, reference_run):
    run_dir = _copy_run(reference_run, tmp_path, "garbled")
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        lines = f.read().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2] + "\x00garbled"
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    log = []
    summary = Trainer(tiny_config(cache_dir), run_dir, progress=False, log=log.append).train()
    assert [r["step"] for r in MetricsLog(path).read()] == [0, 1, 3, 4]
    assert any("1 unreadable line(s) (line 3) moved to" in line for line in log)
    assert any("no row for 1 of the steps 0…4 (2)" in line for line in log)
    assert summary["accuracy_before"] == reference_run[1]["accuracy_before"] and summary["metric_rows_missing"] == 1
    os.remove(path)  # deleted: no "before" figures rather than a later evaluation reported as "before"
    summary = Trainer(tiny_config(cache_dir), run_dir, progress=False, log=log.append).train()
    assert summary.get("accuracy_before") is None and summary["metric_rows_missing"] == 5


def _file_task_config(tmp_path, cache_dir, prompts):
    from fipo_jax.data import ChainTask

    task = ChainTask(n_terms=3)
    path = tmp_path / "prompts.jsonl"
    problems = task.sample(np.random.default_rng(prompts), 16)
    path.write_text("".join(json.dumps({"prompt": task.prompt(p), "ground_truth": task.answer(p)}) + "\n"
                            for p in problems))
    skip = ("data.", "sft.")
    return apply_overrides(cpu_default(), [o for o in TINY if not o.startswith(skip)]
                           + ["data.task=file", f"data.train_path={path}", "data.eval_prompts=4", "sft.enabled=false"])


def test_a_changed_prompt_file_is_refused_on_resume(tmp_path, cache_dir):
    run_dir = str(tmp_path / "run")
    Trainer(_file_task_config(tmp_path, cache_dir, 1), run_dir, progress=False, log=lambda s: None).save()
    config = _file_task_config(tmp_path, cache_dir, 2)  # same path, same row count, other prompts
    with pytest.raises(ConfigError, match=r"checkpoint \(step 0\) was made with different prompt data \(digest \w+ vs "
                                          r"now \w+\): the files data\.train_path='.*prompts\.jsonl'"):
        Trainer(config, run_dir, progress=False, log=lambda s: None).train()


def test_a_second_trainer_on_a_run_directory_is_refused(tmp_path, cache_dir):
    from fipo_jax.train.run_dir import RunDirectoryLocked, lock

    run_dir = str(tmp_path / "run")
    trainer = Trainer(_file_task_config(tmp_path, cache_dir, 1), run_dir, progress=False, log=lambda s: None)
    with lock(run_dir):  # as another trainer's train() holds it
        with pytest.raises(RunDirectoryLocked, match="is in use by another trainer"):
            trainer.train()
    assert not os.path.exists(os.path.join(run_dir, "metrics.jsonl"))  # refused before touching anything


@pytest.mark.slow
def test_compare_runs_seeds_and_reports_mean_and_spread(tmp_path, cache_dir):
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare", os.path.join(ROOT, "experiments", "compare.py"))
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    out = str(tmp_path / "cmp")
    sets = [a for o in TINY + [f"sft.cache_dir={cache_dir}", "steps=1", "eval.every=0", "data.eval_prompts=4"]
            for a in ("--set", o)]
    assert compare.main(["--seeds", "0", "1", "--out", out, "--no-progress", "--at-steps", "1", *sets]) == 0
    result = json.load(open(os.path.join(out, "comparison.json")))
    assert sorted(result["runs"]) == ["dapo/seed0", "dapo/seed1", "fipo/seed0", "fipo/seed1"]
    fipo = result["aggregate"]["fipo"]
    assert fipo["accuracy_after"]["n"] == 2 and fipo["accuracy_after"]["min"] <= fipo["accuracy_after"]["mean"]
    assert result["aggregate"]["dapo"]["influence_active_fraction"] == {"n": 0}  # FIPO only
    runs, difference = result["runs"], result["paired_differences"]["fipo - dapo"]["accuracy_after"]
    diffs = [runs[f"fipo/seed{s}"]["accuracy_after"] - runs[f"dapo/seed{s}"]["accuracy_after"] for s in (0, 1)]
    assert difference["n"] == 2 and difference["mean"] == pytest.approx(np.mean(diffs))
    assert difference["ci95"][0] <= difference["mean"] <= difference["ci95"][1] and 0 <= difference["sign_p"] <= 1
    at_one = result["paired_differences"]["fipo - dapo"]["avg@k@1"]  # the evaluation after step 1, paired
    assert at_one["n"] == 2 and set(at_one) >= {"mean", "ci95", "wins", "losses", "ties", "sign_p"}
    assert os.path.exists(os.path.join(out, "comparison.png"))
    steps, mean, std = compare.curves(out, "fipo", [0, 1], "eval/avg@k")
    assert list(steps) == [0, 1] and (std >= 0).all()


@pytest.mark.slow
def test_packed_and_padded_updates_agree_in_the_trainer(tmp_path, cache_dir):
    """`algo.packing` (default on) changes the update's layout, not its result: one step each way
    from the same state and rollouts gives the same metrics (float32 rounding) and less padding."""
    steps = {}
    for packing in ("true", "false"):
        trainer = Trainer(tiny_config(cache_dir, "eval.every=0", f"algo.packing={packing}"),
                          str(tmp_path / packing), progress=False, log=lambda s: None)
        steps[packing] = trainer.step()
        if packing == "true":
            params = jax.tree.map(np.asarray, trainer.state.params)
            assert isinstance(trainer.host_batch(trainer.last_rollouts)[0], RLBatch)
    packed, padded = steps["true"], steps["false"]
    assert packed["batch/padding_frac"] < padded["batch/padding_frac"] == packed["batch/padding_frac_unpacked"]
    for key in padded:
        if not key.startswith(("time/", "batch/padding_frac")):
            np.testing.assert_allclose(packed[key], padded[key], rtol=1e-4, atol=1e-6, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params,
                 jax.tree.map(np.asarray, trainer.state.params))
