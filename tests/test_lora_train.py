"""RL with adapters (model.lora) on the tiny policy: the state trains adapters only (the base unchanged, not
in the state, checkpoints a fraction of a full run's), a resumed run equals an uninterrupted one, adapters
of another base are refused on resume, and the exports (merged HF model, PEFT adapters) come out."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from fipo_jax.config import ConfigError
from fipo_jax.models.lora import is_adapted
from fipo_jax.models.weights import flat_params
from fipo_jax.train.trainer import Trainer
from tests.test_trainer import comparable, tiny_config

LORA = ["model.lora.rank=2", "model.lora.alpha=4"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sft_cache"))


def quiet(config, run_dir) -> Trainer:
    return Trainer(config, str(run_dir), progress=False, log=lambda s: None)


@pytest.mark.slow
def test_rl_with_adapters_trains_them_alone_and_resumes_exactly(tmp_path, cache_dir):
    trainer = quiet(tiny_config(cache_dir, *LORA, "steps=3"), tmp_path / "straight")
    base_before = {k: v for k, v in flat_params(trainer.policy).items() if "lora" not in k}
    trainer.train()
    assert is_adapted(trainer.policy)
    trained = nnx.to_flat_state(trainer.state.params)
    assert trained and all(isinstance(v, nnx.LoRAParam) for _, v in trained)  # the state: adapters only
    assert all(float(np.abs(np.asarray(v.get_value())).max()) > 0 for p, v in trained if p[-1] == "kernel_lora_b")
    base_after = {k: v for k, v in flat_params(trainer.policy).items() if "lora" not in k}
    assert base_after.keys() == base_before.keys()
    assert all(np.array_equal(base_after[k], base_before[k]) for k in base_before)  # the base never moves

    # A checkpoint: adapters, their moments, step and key, no base weight (its bytes: bench_lora.py).
    state_dir = tmp_path / "straight" / "checkpoints" / "3" / "state"
    saved = json.loads((state_dir / "_METADATA").read_text())["tree_metadata"]
    params = [key for key in saved if key.startswith("('params'")]
    assert params and all("kernel_lora_" in key for key in params), params
    assert not any("embed" in key or "norm" in key for key in saved)

    quiet(tiny_config(cache_dir, *LORA, "steps=2"), tmp_path / "resumed").train()  # evaluates at 2, as the above
    resumed = quiet(tiny_config(cache_dir, *LORA, "steps=3"), tmp_path / "resumed")
    resumed.train()
    assert comparable(resumed.run_log.read()) == comparable(trainer.run_log.read())
    for (_, ours), (_, theirs) in zip(nnx.to_flat_state(resumed.state.params), trained):
        np.testing.assert_array_equal(np.asarray(ours.get_value()), np.asarray(theirs.get_value()))


@pytest.mark.slow
def test_adapters_of_another_base_are_refused_on_resume(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    quiet(tiny_config(cache_dir, *LORA, "steps=1"), run_dir).train()
    cached = [f for f in os.listdir(cache_dir) if f.endswith(".npz")]
    assert len(cached) == 1
    weights = dict(np.load(os.path.join(cache_dir, cached[0])))
    name = next(k for k in weights if k.endswith("o_proj/kernel"))
    weights[name] = weights[name] + 1e-3  # same settings, another base
    np.savez(os.path.join(cache_dir, cached[0]), **weights)
    with pytest.raises(ConfigError, match=r"holds adapters of another base \(sha256 [0-9a-f]{16}…, this run's"):
        quiet(tiny_config(cache_dir, *LORA, "steps=2"), run_dir).train()


@pytest.mark.parametrize("override, message", [
    ("model.lora.module_path=mlp/nothing", r"model.lora: lora.module_path 'mlp/nothing' matches no projection"),
    ("model.lora.rank=99", r"model.lora: lora.rank 99 exceeds self_attn/k_proj's smaller side 16 \(\[32, 16\]\)"),
])
def test_bad_lora_settings_fail_in_one_line(tmp_path, cache_dir, override, message):
    with pytest.raises(ConfigError, match=message):
        quiet(tiny_config(cache_dir, "model.lora.rank=2", override), tmp_path / "run")


@pytest.mark.parametrize("override, message", [
    ("model.lora.rank=-1", "model.lora.rank must be"), ("model.lora.base_dtype=int3", "model.lora.base_dtype"),
    ("model.lora.dropout=0.5", "model.lora.dropout 0.5 is not supported yet"),
])
def test_bad_lora_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("/nonexistent", "model.lora.rank=2", override)


@pytest.mark.slow
def test_qlora_run_keeps_its_base_quantized(tmp_path, cache_dir):
    trainer = quiet(tiny_config(cache_dir, *LORA, "model.lora.base_dtype=int8", "steps=1"), tmp_path / "run")
    trainer.train()
    dtypes = {str(x.dtype) for x in jax.tree.leaves(trainer.rest)}
    assert "int8" in dtypes
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(trainer.state.params))
