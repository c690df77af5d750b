"""The environment users install runs what the README documents (issue 31, item 1).

The test environment (requirements-test.txt) brings torch, and torch drags in modules the library
needs without declaring them (jinja2 for chat templates; transformers' GGUF tokenizer code imports
torch itself), so a green suite there proved nothing about `pip install -r requirements.txt`. These
tests build (or reuse) a second virtualenv from requirements.txt alone — `$FIPO_RUNTIME_VENV`,
default `.venv-rt/`, made by `scripts/setup_env.sh` exactly as `scripts/main.sh` makes `.venv/` —,
check that torch is absent there, and run in it a small version of each documented command: the main
job, the file task on a Hugging Face folder (chat template) with `--export`, the Gemma 3 270M preset
(its tokenizer built from the GGUF file, one step), and the planner. Slow: the first build takes
about two minutes, each run well under one.
"""

import json
import os
import subprocess

import numpy as np
import pytest

from tests.test_trainer import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _clean_env(**extra) -> dict[str, str]:
    """The caller's environment without its virtualenv, JAX flags or PYTHONPATH, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "PYTHONPATH", "VIRTUAL_ENV"))}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


@pytest.fixture(scope="module")
def runtime_python() -> str:
    venv = os.environ.get("FIPO_RUNTIME_VENV") or os.path.join(ROOT, ".venv-rt")
    setup = subprocess.run(["bash", os.path.join(ROOT, "scripts", "setup_env.sh"), "requirements.txt"], cwd=ROOT,
                           env=_clean_env(FIPO_VENV=venv), capture_output=True, text=True, timeout=1800)
    assert setup.returncode == 0, f"setup_env.sh requirements.txt failed:\n{setup.stderr[-6000:]}"
    return os.path.join(venv, "bin", "python")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """A fresh FIPO_CACHE_DIR: the GGUF tokenizer is converted in the runtime environment, not read back."""
    return str(tmp_path_factory.mktemp("fipo_cache"))


def console_script(runtime_python: str, name: str) -> str:
    """A console command the package installs (`fipo-train`, `fipo-plan`) in the runtime environment."""
    return os.path.join(os.path.dirname(runtime_python), name)


def run(python: str, cache_dir: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python *args`` in the runtime environment (``python`` may be one of its console commands)."""
    result = subprocess.run([python, *args], cwd=ROOT, env=_clean_env(FIPO_CACHE_DIR=cache_dir),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stderr[-6000:]}"
    return result


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _file_task_args(tmp) -> list[str]:
    from tests.test_data import write_dapo_parquet

    folder = _hf_folder(tmp / "model")
    train_file = str(tmp / "train.parquet")
    write_dapo_parquet(train_file, [f"What is {i}+{i}?" for i in range(8)], [str(2 * i) for i in range(8)])
    return ["--config", "qwen2.5-7b-fipo", "--steps", "1", "--export", str(tmp / "export"), *sets(
        f"model.path={folder}", "model.dtype=float32", "model.compute_dtype=float32", "model.remat=none",
        f"data.train_path={train_file}", "data.eval_path=", "data.max_prompt_tokens=120", "rollout.n=2",
        "rollout.prompts_per_step=2", "rollout.prompts_per_round=2", "rollout.max_rounds=1",
        "rollout.dynamic_sampling=false", "rollout.max_response_tokens=8", "reward.overlong_buffer=4",
        "algo.mini_batches=2", "algo.micro_batch_size=2", "optim.warmup_steps=0", "eval.every=0")]


# The documented fipo-train commands, sized down: the main job (what scripts/main.sh runs: SFT warm start,
# RL, eval), the file task with a chat template and --export, the README's real-model recipe.
RUNS = {
    "main": lambda tmp: ["--steps", "1", *sets(*[o for o in TINY if not o.startswith("steps=")],
                                               f"sft.cache_dir={tmp / 'sft'}")],
    # The main job itself (its model and warm start: the one shipped in the package), fewer rollouts.
    "main_packaged": lambda tmp: ["--steps", "1", *sets(
        "data.eval_prompts=4", "eval.k=1", "rollout.prompts_per_step=4", "rollout.prompts_per_round=6",
        "rollout.on_exhausted=pad", "algo.micro_batch_size=4", f"sft.cache_dir={tmp / 'sft'}")],
    "file": _file_task_args,
    "gemma": lambda tmp: ["--config", "gemma3-270m-fipo", "--steps", "1", *sets(
        "data.train_prompts=8", "data.eval_prompts=1", "rollout.n=2", "rollout.prompts_per_step=2",
        "rollout.prompts_per_round=2", "rollout.max_rounds=1", "rollout.dynamic_sampling=false",
        "rollout.max_response_tokens=4", "reward.overlong_buffer=2", "algo.micro_batch_size=2", "eval.every=0",
        "eval.k=1")],
}


@pytest.fixture(scope="module")
def runs(runtime_python, cache_dir, tmp_path_factory):
    """Every `RUNS` command started at once in the runtime environment (each compiles mostly on one
    core: run side by side they take about as long as the longest); name → (process, run dir, log)."""
    started = {}
    for name, make_args in RUNS.items():
        tmp = tmp_path_factory.mktemp(name)
        log = open(tmp / "log.txt", "w+", encoding="utf-8")  # a file, not a pipe: nobody reads until the end
        command = [console_script(runtime_python, "fipo-train"), "--no-progress", "--run-dir", str(tmp / "run"),
                   *make_args(tmp)]
        started[name] = (subprocess.Popen(command, cwd=ROOT, env=_clean_env(FIPO_CACHE_DIR=cache_dir), stdout=log,
                                          stderr=subprocess.STDOUT, text=True), tmp, log)
    yield started
    for process, _, log in started.values():
        process.kill()
        log.close()


def finished(runs, name: str) -> tuple[dict, str, object]:
    """(summary.json, the log, the run's folder) once the run ``name`` has exited 0."""
    process, tmp, log = runs[name]
    code = process.wait(timeout=1800)
    log.seek(0)
    text = log.read()
    assert code == 0, f"{name}: train.py exited {code}:\n{text[-6000:]}"
    with open(tmp / "run" / "summary.json", encoding="utf-8") as f:
        return json.load(f), text, tmp


def test_the_runtime_environment_has_no_torch_and_every_declared_module(runtime_python, cache_dir):
    probe = ("import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in "
             "('torch', 'jinja2', 'gguf', 'tokenizers', 'math_verify', 'tensorboardX')}))")
    found = json.loads(run(runtime_python, cache_dir, "-c", probe).stdout)
    assert found == {"torch": False, "jinja2": True, "gguf": True, "tokenizers": True, "math_verify": True,
                     "tensorboardX": True}


def test_the_main_job(runs):
    summary, _, _ = finished(runs, "main")
    assert summary["steps"] == 1 and summary["accuracy_after"] is not None


def test_the_main_job_starts_from_the_packaged_warm_start(runs):
    """An installed runtime finds the shipped file (package data) and its digest checks."""
    from fipo_jax.config import load_config
    from fipo_jax.train import sft
    from fipo_jax.train.build import warm_start_key

    summary, log, tmp = finished(runs, "main_packaged")
    packaged = sft.packaged_warm_start(warm_start_key(load_config("cpu_default")))
    assert "[sft] loaded the packaged warm start cpu_default.npz" in log
    assert summary["warm_start_sha256"] == packaged.sha256 and not (tmp / "sft").exists()  # nothing trained


def _hf_folder(path) -> str:
    """A tiny random Qwen2 with the real Qwen2.5 tokenizer and a chat template (written here, with
    fipo_jax's own export: no torch)."""
    from flax import nnx

    from fipo_jax.models import CausalLM, ModelConfig, save_pretrained
    from fipo_jax.models.tokenizer import qwen2_5_tokenizer

    tokenizer = qwen2_5_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    model = CausalLM(ModelConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),
                     rngs=nnx.Rngs(0))
    save_pretrained(model, str(path), tokenizer=tokenizer, extra_config={"eos_token_id": tokenizer.eos_token_id})
    return str(path)


def test_the_file_task_with_a_chat_template_and_export(runs):
    from fipo_jax.models import load_pretrained

    summary, _, tmp = finished(runs, "file")
    export = tmp / "export"
    assert summary["steps"] == 1
    exported = load_pretrained(str(export))  # a Hugging Face folder again, which this environment reads back
    assert exported.config.vocab_size == 151665 and os.path.isfile(export / "tokenizer_config.json")
    with open(export / "tokenizer_config.json", encoding="utf-8") as f:
        assert "chat_template" in json.load(f) or os.path.isfile(export / "chat_template.jinja")
    assert np.isfinite(float(np.asarray(exported(np.asarray([[1, 2, 3]], np.int32))).sum()))


def test_the_gemma3_270m_preset(runs):
    """The README's real-model recipe, one tiny step: the GGUF assembled from its package, its
    tokenizer built from the file's own metadata (no torch), few-shot prompts, stop strings, FIPO."""
    summary, log, _ = finished(runs, "gemma")
    assert summary["steps"] == 1 and "[model] attention: xla" in log


def test_the_planner(runtime_python, cache_dir):
    result = run(console_script(runtime_python, "fipo-plan"), cache_dir, "--config", "qwen2.5-7b-fipo",
                 "--mesh", "4,4,4", "--device-memory", "80GiB")
    assert "fits" in result.stdout.lower(), result.stdout


@pytest.mark.parametrize("command", ["fipo-train", "fipo-plan"])
def test_the_console_commands_answer_help(runtime_python, cache_dir, command):
    result = run(console_script(runtime_python, command), cache_dir, "--help")
    assert result.stdout.startswith(f"usage: {command}") and "--config" in result.stdout
