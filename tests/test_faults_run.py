"""Issue 31 (nothing silent, round 3): the run's own faults — each injected, each refused in one
line or said out loud — the CLI's flags, the attention kernel on the train.py path, FIPO that
cannot act, updates that are skipped, token ids outside the vocabulary, a second trainer on a
live run directory, a config.json whose architecture and family disagree."""

import json
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fipo_jax.train import update as update_lib
from fipo_jax.config import apply_overrides, cpu_default, fipo_inert_reason
from fipo_jax.generation.logprobs import chunked_token_log_probs, sequence_log_probs
from fipo_jax.models import CausalLM, ModelConfig
from fipo_jax.models.families import config_from_hf, config_to_hf
from fipo_jax.train.trainer import Trainer
from tests.test_trainer import TINY, tiny_config

from fipo_jax.train import cli as train_cli


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sft_cache"))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = train_cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("args, message", [
    (["--algo", "dapo", "--set", "algo.loss.loss_mode=fipo"], "--algo dapo and --set algo.loss.loss_mode=fipo disagree"),
    (["--algo", "dapo", "--set", 'algo.loss={"loss_mode": "grpo"}'], "--algo dapo and --set algo.loss.loss_mode=grpo disagree"),
    (["--seed", "1", "--set", "seed=2"], "--seed 1 and --set seed=2 disagree"),
    (["--steps", "3", "--set", "steps=4"], "--steps 3 and --set steps=4 disagree"),
])
def test_a_flag_and_a_set_of_the_same_field_must_agree(capsys, args, message):
    code, out, err = run_cli(capsys, *args, "--print-config")
    assert code == 2 and out == "" and err.strip() == f"config error: {message}; give the value once"


def test_a_flag_and_a_set_that_agree_are_accepted(capsys):
    code, out, _ = run_cli(capsys, "--seed", "3", "--set", "seed=3", "--algo", "dapo", "--set", "algo.loss.loss_mode=dapo",
                           "--print-config")
    config = json.loads(out)
    assert code == 0 and config["seed"] == 3 and config["algo"]["loss"]["loss_mode"] == "dapo"


# ----------------------------------------------------------------------------- FIPO that cannot act


def test_fipo_with_one_mini_batch_per_step_is_named():
    assert fipo_inert_reason(cpu_default()) is None  # 8 mini-batches: FIPO acts from the second
    one = apply_overrides(cpu_default(), ["algo.mini_batches=1", "algo.micro_batch_size=32"])
    assert "Future-KL is identically 0 and FIPO is exactly DAPO" in fipo_inert_reason(one)
    assert fipo_inert_reason(apply_overrides(one, ["algo.loss.loss_mode=dapo"])) is None  # DAPO: nothing lost


def test_print_config_warns_when_fipo_cannot_act(capsys):
    code, out, err = run_cli(capsys, "--set", "algo.mini_batches=1", "--print-config")
    assert code == 0 and json.loads(out)["algo"]["mini_batches"] == 1
    assert err.strip().startswith("[warning] algo.mini_batches=1 with loss_mode='fipo'") and len(err.splitlines()) == 1
    _, _, err = run_cli(capsys, "--print-config")
    assert err == ""


# ----------------------------------------------------------------------------- attention on the train.py path


def test_a_gpu_attention_kernel_on_a_cpu_is_one_line_from_train_py(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--no-progress", "--run-dir", str(tmp_path / "run"), "--set",
                           "model.attention_impl=cudnn")
    assert code == 2 and err.strip() == ("config error: model.attention_impl: attention_impl='cudnn' runs on gpu, not "
                                         "on this 'cpu' backend (use 'auto' or 'xla')")
    assert not os.path.exists(tmp_path / "run")  # refused before the run directory is made


def test_the_trainer_logs_its_attention_and_warns_when_fipo_cannot_act(tmp_path, cache_dir):
    lines = []
    config = tiny_config(cache_dir, "sft.enabled=false", "algo.mini_batches=1")
    Trainer(config, str(tmp_path / "run"), progress=False, log=lines.append)
    assert [line for line in lines if line.startswith("[model] attention:")] == [
        "[model] attention: xla (auto on cpu: no fused kernel verified on this backend yet); cached forwards "
        "(prefill, decode): xla"]
    assert [line for line in lines if line.startswith("[warning]")] == [f"[warning] {fipo_inert_reason(config)}"]


# ----------------------------------------------------------------------------- skipped updates


@pytest.mark.slow
def test_skipped_updates_are_said_every_step_and_counted_in_the_summary(tmp_path, cache_dir, monkeypatch):
    """A loss that is NaN: every update is skipped; each step says so, summary.json counts them."""
    real = update_lib.policy_loss_parts
    monkeypatch.setattr(update_lib, "policy_loss_parts", lambda lp, *a, **k: real(lp * jnp.nan, *a, **k))
    lines = []
    run_dir = str(tmp_path / "run")
    summary = Trainer(tiny_config(cache_dir, "eval.every=0", "steps=2"), run_dir, progress=False,
                      log=lines.append).train()
    warned = [line for line in lines if "updates skipped" in line]
    assert [w.split(":")[0] for w in warned] == ["[warning] step 1", "[warning] step 2"], lines
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        skipped = [int(r["actor/skipped_updates"]) for r in map(json.loads, f) if r["step"] > 0]
    assert len(skipped) == 2 and min(skipped) >= 1  # a mini-batch of padding rows only has no loss to be NaN
    assert warned[0].startswith(f"[warning] step 1: {skipped[0]} of 2 updates skipped (non-finite gradients or "
                                f"parameters")
    assert summary["updates_skipped"] == sum(skipped) and summary["steps_with_skipped_updates"] == 2
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["updates_skipped"] == sum(skipped)


# ----------------------------------------------------------------------------- token ids


def _tiny_model(vocab=32):
    return CausalLM(ModelConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("bad", [32, -1])
def test_token_ids_outside_the_vocabulary_are_refused(bad):
    model = _tiny_model()
    ids = np.asarray([[1, 2, bad]], np.int32)
    message = rf"^input_ids holds token id {bad}, outside the vocabulary \[0, 32\)"
    with pytest.raises(ValueError, match=message):
        model(ids)
    with pytest.raises(ValueError, match=message):
        sequence_log_probs(model, jnp.asarray(ids))
    hidden = jnp.ones((1, 3, 16), jnp.float32)
    with pytest.raises(ValueError, match=rf"^targets_BxT holds token id {bad}, outside the vocabulary"):
        chunked_token_log_probs(hidden, jnp.ones((16, 32), jnp.float32), jnp.asarray(ids))
    good = jnp.asarray([[1, 2, 31]], jnp.int32)  # the last id is fine, eagerly and under jit
    np.testing.assert_allclose(sequence_log_probs(model, good), jax.jit(lambda x: sequence_log_probs(model, x))(good),
                               rtol=1e-6)


# ----------------------------------------------------------------------------- a live run directory


@pytest.mark.slow
def test_a_second_trainer_on_a_live_run_dir_writes_nothing_into_it(tmp_path, cache_dir):
    """The second trainer is refused by the lock; it leaves no TensorBoard events file (the writer
    opens with the first row) and no exit-time traceback."""
    import subprocess

    from fipo_jax.train.run_dir import lock

    run_dir = tmp_path / "run"
    args = [a for o in TINY + [f"sft.cache_dir={cache_dir}", "tensorboard=true", "sft.enabled=false"]
            for a in ("--set", o)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with lock(str(run_dir)):  # the live run
        proc = subprocess.run([sys.executable, "-m", "fipo_jax.train.cli", "--no-progress",
                               "--run-dir", str(run_dir), *args], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": root}, timeout=300)
    assert proc.returncode == 2 and "is in use by another trainer" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert not (run_dir / "tensorboard").exists() or not os.listdir(run_dir / "tensorboard")


# ----------------------------------------------------------------------------- config.json


def test_an_architecture_of_another_family_loads_by_model_type_and_says_so():
    hf = config_to_hf(ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = config_from_hf(hf)  # Qwen2ForCausalLM with model_type qwen2: silent
    with pytest.warns(UserWarning, match=r"architectures \['LlamaForCausalLM'\] is the 'llama' family but model_type "
                                         r"is 'qwen2'; loading it as 'qwen2'"):
        mislabelled = config_from_hf({**hf, "architectures": ["LlamaForCausalLM"]})
    assert mislabelled == same


# ----------------------------------------------------------------------------- the reward's shaping


@pytest.mark.parametrize("factor", ["1e308", "1e30", "2097152"])
def test_an_overlong_factor_that_can_overflow_is_refused_by_the_config(capsys, factor):
    """1e308 made every shaped reward −inf: every update was skipped and the run ended with exit 0."""
    code, out, err = run_cli(capsys, "--set", f"reward.overlong_factor={factor}", "--print-config")
    assert code == 2 and out == "" and err.startswith(f"config error: reward.overlong_factor={float(factor)!r} is over "
                                                      f"1048576 (2^20)")
    assert run_cli(capsys, "--set", "reward.overlong_factor=1048576", "--print-config")[0] == 0


# ----------------------------------------------------------------------------- damaged checkpoint metadata


def _edit_metadata(run_dir, step, edit) -> None:
    path = os.path.join(run_dir, "checkpoints", str(step), "metadata", "metadata")
    with open(path, encoding="utf-8") as f:
        metadata = json.load(f)
    edit(metadata)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(metadata, f)


@pytest.mark.slow
def test_checkpoint_metadata_the_trainer_cannot_use_is_damage(tmp_path, cache_dir, capsys):
    """Metadata without its fingerprint, or with a data position outside the data, used to end in a
    raw KeyError / a silent jump to the next epoch: the checkpoint is set aside and resume falls back.
    A checkpoint of an older format is one line at the CLI (exit 2)."""
    run_dir = str(tmp_path / "run")
    config = tiny_config(cache_dir, "eval.every=0", "steps=3", "keep_checkpoints=3", "sft.enabled=false")
    trainer = Trainer(config, run_dir, progress=False, log=lambda s: None)
    for step in (1, 2, 3):  # checkpoints of steps 1-3 without training them (only the step counter moves)
        trainer.state = trainer.state.replace(step=jnp.asarray(step, trainer.state.step.dtype))
        trainer.save()
    trainer.checkpointer.wait()
    _edit_metadata(run_dir, 3, lambda m: m.pop("fingerprint"))
    _edit_metadata(run_dir, 2, lambda m: m["iterator"].update(offset=10**6))
    lines = []
    trainer = Trainer(config, run_dir, progress=False, log=lines.append)
    assert trainer.resume() == 1
    assert [line.split(" (")[0] for line in lines if line.startswith("[resume]")] == [
        "[resume] checkpoint 3 cannot be restored", "[resume] checkpoint 2 cannot be restored"], lines
    assert "the metadata has no 'fingerprint'" in lines[-2] and "offset 1000000 is not in the data" in lines[-1]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints.damaged"))) and \
        trainer.checkpointer.latest_step() == 1
    _edit_metadata(run_dir, 1, lambda m: m.update(format="fipo_jax.rl_state.v1"))
    args = [a for o in [o for o in TINY if not o.startswith(("steps=", "keep_"))] + [
        f"sft.cache_dir={cache_dir}", "eval.every=0", "keep_checkpoints=3", "sft.enabled=false"] for a in ("--set", o)]
    code, _, err = run_cli(capsys, "--no-progress", "--run-dir", run_dir, "--steps", "3", *args)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: checkpoint 1 in ") \
        and "has format 'fipo_jax.rl_state.v1'" in err, err
