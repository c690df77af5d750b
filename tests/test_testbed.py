"""The CPU testbed: the invertible chain task, its partial demonstrations, and the packaged warm start
(found by its recipe's key, its digest checked, the same weights in processes with other thread settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fipo_jax.config import ConfigError, apply_overrides, load_config
from fipo_jax.data import ChainTask, CharTokenizer
from fipo_jax.train import sft
from fipo_jax.train.build import warm_start_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_invertible_chains_have_uniform_answers_and_no_last_step_shortcut():
    from experiments.testbed import answer_stats

    skewed = answer_stats(ChainTask(n_terms=18), n=50_000)
    uniform = answer_stats(ChainTask(n_terms=8, invertible=True), n=50_000)
    assert skewed["most_common_answer"] > 0.2 and skewed["last_op_guess"] > 0.3  # the old task's shortcut
    assert uniform["most_common_answer"] < 0.11 and uniform["last_op_guess"] < 0.11
    problems = ChainTask(n_terms=8, invertible=True).sample(np.random.default_rng(0), 2000)
    multipliers = {d for digits, ops in problems for d, op in zip(digits[1:], ops) if op == "*"}
    assert multipliers == {1, 3, 7, 9}  # units mod 10: every step a bijection


def test_the_skewed_task_draws_the_problems_it_always_drew():
    """``invertible=False`` keeps the old sampler (the cpu_skewed_chain preset's prompts unchanged)."""
    rng = np.random.default_rng(0)
    digits, ops = rng.integers(0, 10, size=(3, 5)), rng.integers(0, 2, size=(3, 4))
    expected = [(tuple(int(d) for d in ds), "".join("+*"[o] for o in os_)) for ds, os_ in zip(digits, ops)]
    assert ChainTask(n_terms=5).sample(np.random.default_rng(0), 3) == expected


def test_worked_solutions_of_every_length():
    problem = ((3, 5, 7, 1), "+*+")  # ((3+5)·7+1) mod 10 = 7
    lines, values = ChainTask(n_terms=4), ChainTask(n_terms=4, worked="values")
    assert lines.solution(problem) == lines.step_solution(problem) == "3+5=8\n8*7=6\n6+1=7\nAnswer: 7"
    assert lines.solution(problem, 2) == "3+5=8\n8*7=6\nAnswer: 7"
    assert lines.solution(problem, 0) == lines.direct_solution(problem) == "Answer: 7"
    assert values.solution(problem) == "8 6 7\nAnswer: 7" and values.solution(problem, 1) == "8\nAnswer: 7"
    tok = CharTokenizer()
    for task in (lines, values):
        assert task.max_response_tokens() == len(tok.encode(task.solution(problem))) + 1
    with pytest.raises(ValueError, match=r"steps must be an int in \[0, 3\], got 4"):
        lines.solution(problem, 4)
    with pytest.raises(ValueError, match="worked must be one of"):
        ChainTask(worked="prose")


def test_partial_demonstrations_span_every_length():
    task = ChainTask(n_terms=8, invertible=True)
    demos = task.demonstrations(np.random.default_rng(0), 4000, step_fraction=0.9, partial=True)
    steps = np.asarray([s.count("=") for _, s in demos])
    counts = np.bincount(steps, minlength=8) / len(demos)
    assert abs(counts[0] - 0.1) < 0.02 and all(abs(c - 0.9 / 7) < 0.02 for c in counts[1:])
    for prompt, solution in demos[:50]:  # every demonstration ends with the true answer
        digits = tuple(int(c) for c in prompt[3:-1:2])
        assert solution.endswith("Answer: " + task.answer((digits, prompt[4:-1:2])))
    full = task.demonstrations(np.random.default_rng(0), 200, step_fraction=1.0)
    assert {s.count("=") for _, s in full} == {7}


def test_testbed_config_fields_are_checked():
    config = load_config("cpu_default")
    assert (config.data.n_terms, config.data.invertible, config.sft.partial, config.sft.seed) == (8, True, True, 0)
    for bad, message in (("data.worked=prose", "data.worked must be one of"),
                         ("sft.partial=2", "sft.partial must be"), ("sft.packaged=yes please", "sft.packaged must be"),
                         ("sft.seed=1.5", "sft.seed must be")):
        with pytest.raises(ConfigError, match=message):
            apply_overrides(config, [bad])


def test_the_warm_start_key_names_the_recipe_not_where_it_is_kept():
    config = load_config("cpu_default")
    key = warm_start_key(config)
    same = ["sft.cache_dir=/elsewhere", "sft.packaged=false", "seed=7", "steps=3", "algo.loss.loss_mode=dapo"]
    for change in same:  # sft.seed is set: RL seeds share the warm start
        assert warm_start_key(apply_overrides(config, [change])) == key, change
    for change in ("sft.seed=1", "sft.partial=false", "sft.steps=100", "data.n_terms=9", "data.invertible=false",
                   "model.hidden_size=64"):
        assert warm_start_key(apply_overrides(config, [change])) != key, change
    unseeded = apply_overrides(config, ["sft.seed=null"])
    assert warm_start_key(apply_overrides(unseeded, ["seed=1"])) != warm_start_key(unseeded)


def test_the_testbed_warm_start_is_packaged_and_its_digest_checks():
    """The shipped manifest lists the cpu_default recipe; its file loads into that model with the digest
    the manifest records (a spec change that moves the key fails here, not silently on users)."""
    from flax import nnx

    from fipo_jax.models import CausalLM
    from fipo_jax.train.shapes import scratch_model_config

    config = load_config("cpu_default")
    packaged = sft.packaged_warm_start(warm_start_key(config))
    assert packaged is not None and os.path.isfile(packaged.path)
    model = CausalLM(scratch_model_config(config), rngs=nnx.Rngs(0))
    sft.load_packaged(model, packaged)
    assert sft.params_digest(model) == packaged.sha256
    assert sft.packaged_warm_start(warm_start_key(load_config("cpu_skewed_chain"))) is None


def test_a_packaged_warm_start_that_differs_from_its_manifest_is_refused(tmp_path):
    from tests.test_bad_inputs_data import TinyModel

    sft.save_params(TinyModel(1.0), str(tmp_path / "w.npz"))
    digest = sft.params_digest(TinyModel(1.0))
    (tmp_path / "manifest.json").write_text(json.dumps({"k": {"file": "w.npz", "sha256": digest, "made_by": "x"}}))
    packaged = sft.packaged_warm_start("k", str(tmp_path))
    assert sft.packaged_warm_start("other", str(tmp_path)) is None
    model = TinyModel(0.0)
    sft.load_packaged(model, packaged)
    assert sft.params_digest(model) == digest != sft.params_digest(TinyModel(0.0))
    sft.save_params(TinyModel(2.0), str(tmp_path / "w.npz"))  # the file altered after the manifest was made
    with pytest.raises(sft.PackagedWarmStartError, match=rf"^the packaged warm start .*w\.npz has parameters sha256 "
                                                         rf"\w+, its manifest says {digest}; reinstall fipo_jax, or "
                                                         r"set sft\.packaged=false to train the warm start here$"):
        sft.load_packaged(TinyModel(0.0), packaged)
    (tmp_path / "w.npz").write_bytes(b"garbage")
    with pytest.raises(sft.PackagedWarmStartError, match=r"w\.npz is not a complete \.npz archive"):
        sft.load_packaged(TinyModel(0.0), packaged)


_DIGEST = """
import sys
from fipo_jax.config import load_config
from fipo_jax.data import ChainTask
from fipo_jax.parallel.sharding import make_mesh
from fipo_jax.train.build import build_policy, warm_start
config = load_config("cpu_default")
tokenizer, model = build_policy(config, make_mesh((1,)), lambda _: None)
print(warm_start(config, model, tokenizer, ChainTask.of(config.data), lambda _: None, lambda *a: None))
"""


def test_two_processes_with_other_thread_settings_start_rl_from_the_same_weights():
    """What `fipo-train` logs as ``[sft] warm start parameters sha256``: equal in a process on one thread
    and in one with 8 fake devices (settings under which a warm start trained here rounds differently)."""
    settings = [{"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"},
                {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}]
    digests = []
    for extra in settings:
        env = {**os.environ, **extra, "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-c", _DIGEST], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        digests.append(out.stdout.split()[-1])
    packaged = sft.packaged_warm_start(warm_start_key(load_config("cpu_default")))
    assert digests == [packaged.sha256, packaged.sha256]


def test_paired_test_and_sign_test():
    from experiments.compare import paired_test, sign_test

    assert sign_test(8, 0) == pytest.approx(2 / 256) and sign_test(4, 4) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(7, 1) == pytest.approx(2 * 9 / 256)
    t = paired_test([0.1, 0.2, 0.3, 0.0])
    assert (t["n"], t["wins"], t["losses"], t["ties"]) == (4, 3, 0, 1) and t["mean"] == pytest.approx(0.15)
    half = 3.182 * np.std([0.1, 0.2, 0.3, 0.0], ddof=1) / 2  # t(3) quantile · sd / √n
    assert t["ci95"] == pytest.approx([0.15 - half, 0.15 + half]) and t["sign_p"] == pytest.approx(0.25)
    assert paired_test([]) == {"n": 0}


@pytest.mark.slow
def test_the_testbed_script_measures_the_task_and_the_warm_start(tmp_path):
    from experiments import testbed
    from tests.test_trainer import TINY

    out = tmp_path / "tb"
    overrides = TINY + [f"sft.cache_dir={tmp_path / 'sft'}", "data.n_terms=4", "data.invertible=true"]
    sets = [a for o in overrides for a in ("--set", o)]
    assert testbed.main(["--out", str(out), "--k", "2", *sets]) == 0
    result = json.loads((out / "testbed.json").read_text())
    assert result["task"] == {"n_terms": 4, "ops": "+*", "invertible": True}
    assert result["most_common_answer"] < 0.11 and 0 <= result["forced_direct_accuracy"] <= 1
    rows = result["by_steps"].values()
    assert sum(r["share"] for r in rows) == pytest.approx(1.0) and all(0 <= r["accuracy"] <= 1 for r in rows)
    assert sum(r["count"] for r in rows) == 2 * 8  # k × eval prompts
