"""A run that cannot work says so in one line, before anything heavy, with exit code 2 (issue 24:
stop strings with the scratch model, text prompts for the scratch model, no group with mixed outcomes)."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from fipo_jax.train.build import _fit_prompts
from fipo_jax.config import ConfigError, apply_overrides, cpu_default
from fipo_jax.data import CharTokenizer, PromptRecord
from fipo_jax.train.preflight import check_stop_strings
from fipo_jax.data.encoding import encode_text
from tests.test_trainer import TINY

from fipo_jax.train import cli as train_cli


def test_stop_strings_work_with_the_scratch_vocabulary():
    config = apply_overrides(cpu_default(), ['rollout.stop=["Answer:"]'])
    check_stop_strings(config)
    tokenizer = CharTokenizer()
    assert encode_text(tokenizer, "Answer:") == [tokenizer.ids["Answer:"]]
    assert encode_text(tokenizer, " Answer:") == [tokenizer.ids[" "], tokenizer.ids["Answer:"]]
    with pytest.raises(ConfigError, match=r"rollout\.stop 'Question:': character 'Q' at position 0 is not in the "
                                          r"task vocabulary of the scratch model"):
        check_stop_strings(apply_overrides(cpu_default(), ['rollout.stop=["Question:"]']))


def test_text_prompts_for_the_scratch_model_name_the_file_and_row():
    records = [PromptRecord("Q: 1+2=", "3"), PromptRecord("What is 1+2?", "3")]
    with pytest.raises(ConfigError, match=r"^data\.train_path p\.jsonl, prompt 2: character 'W' at position 0 is not "
                                          r"in the task vocabulary — the scratch model reads only '.*' and the words "
                                          r"'Q:' / 'Answer:'; text prompts need a pretrained model"):
        _fit_prompts(records, CharTokenizer(), 64, "train", print, "data.train_path p.jsonl")


@pytest.mark.slow
def test_no_group_with_mixed_outcomes_is_one_line(tmp_path, capsys):
    """Without the warm start the tiny policy never answers right: the run stops with the message."""
    skip = ("sft.", "steps=")
    args = ["--no-progress", "--run-dir", str(tmp_path / "run"), "--steps", "1"]
    for override in [o for o in TINY if not o.startswith(skip)] + ["sft.enabled=false", "eval.every=0"]:
        args += ["--set", override]
    code = train_cli.main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines and lines[-1].startswith("error: step ") and "had mixed outcomes" in lines[-1], lines


def test_a_ground_truth_that_can_never_score_is_named():
    """``"Answer: 7"`` as a gold: ``Answer: 7``, ``\\boxed{7}`` and ``Answer: Answer: 7`` all score wrong,
    so the prompt's reward would be −1 forever (issue 24, item 5)."""
    from fipo_jax.train.build import check_gold_answers

    good = [PromptRecord("q", g) for g in ("7", "\\frac{1}{2}", "x = 3", "\\boxed{12}", "1,000", "(1, 2)")]
    check_gold_answers(good, "data.train_path ok.jsonl")
    bad = good + [PromptRecord("q", "Answer: 7")]
    with pytest.raises(ConfigError, match=r"^data\.train_path p\.jsonl, prompt 7: ground truth 'Answer: 7' can "
                                          r"never be scored correct \(a response ending 'Answer: Answer: 7' extracts"):
        check_gold_answers(bad, "data.train_path p.jsonl")


def test_a_chat_template_that_refuses_a_prompt_is_named():
    from jinja2.exceptions import TemplateError

    class StrictTokenizer:
        name_or_path = "strict-chat"
        chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"

        def apply_chat_template(self, messages, **kwargs):
            raise TemplateError("Conversation roles must alternate user/assistant")

    records = [PromptRecord((("user", "a"), ("user", "b")), "1")]
    with pytest.raises(ConfigError, match=r"^data\.train_path p\.jsonl, prompt 1: the chat template of the tokenizer "
                                          r"strict-chat refused it: Conversation roles must alternate"):
        _fit_prompts(records, StrictTokenizer(), 64, "train", print, "data.train_path p.jsonl")


def test_a_model_vocabulary_smaller_than_its_tokenizer_is_refused():
    from fipo_jax.train.build import check_vocabulary

    check_vocabulary(151936, 151665, "qwen")  # Qwen2.5: padded vocabulary, fine
    with pytest.raises(ConfigError, match=r"model\.path m: the tokenizer has 151665 tokens \(ids up to 151664\) but "
                                          r"the model's vocabulary is 1000"):
        check_vocabulary(1000, 151665, "m")


def test_a_config_json_transformers_rejects_is_one_model_error(tmp_path):
    from fipo_jax.models import UnsupportedConfigError, load_pretrained

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32,
                                                      "intermediate_size": 48, "num_hidden_layers": 0,
                                                      "num_attention_heads": 4, "num_key_value_heads": 2}))
    with pytest.raises(UnsupportedConfigError, match=r"config\.json: .*num_hidden_layers"):
        load_pretrained(tmp_path)


def test_micro_batch_rows_that_do_not_split_over_data_are_named_before_building():
    """The trainer says what the planner says (issue 24, item 10), from the one rule."""
    from fipo_jax.train import plan
    from fipo_jax.train.preflight import preflight

    overrides = ["mesh_shape=[2]", "rollout.n=3", "rollout.prompts_per_round=3", "algo.micro_batch_size=3",
                 "algo.packing=false"]
    config = apply_overrides(cpu_default(), overrides)
    message = r"algo\.micro_batch_size \(3 rows\) must divide by the mesh's data axis \(2\)"
    with pytest.raises(ConfigError, match=message):
        preflight(config, device_count=2, host_memory=2**40)
    with pytest.raises(ConfigError, match=message):
        plan.plan(config, (2,))


def _main(tmp_path, capsys, run_dir, *overrides):
    args = ["--no-progress", "--run-dir", str(run_dir)]
    for override in TINY + [f"sft.cache_dir={tmp_path / 'sft'}", *overrides]:
        args += ["--set", override]
    code = train_cli.main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_run_directory_that_is_a_file_or_read_only_is_one_line(tmp_path, capsys, monkeypatch):
    from fipo_jax.train import run_dir

    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, lines = _main(tmp_path, capsys, a_file)
    assert code == 2 and lines == [f"error: run directory {a_file} is a file (or lies under one); choose another "
                                   f"--run-dir"], lines

    def read_only(path, exist_ok=False):
        raise OSError(30, "Read-only file system", path)

    monkeypatch.setattr(run_dir.os, "makedirs", read_only)
    code, lines = _main(tmp_path, capsys, tmp_path / "ro")
    assert code == 2 and lines == [f"error: run directory {tmp_path / 'ro'} cannot be written (Read-only file "
                                   f"system); choose a writable --run-dir"], lines


@pytest.mark.slow
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    from fipo_jax.train.checkpoint import Checkpointer

    run = tmp_path / "run"
    original = Checkpointer.save

    def fills_at_step_2(self, step, state, metadata):
        if step == 2:
            raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device")
        return original(self, step, state, metadata)

    monkeypatch.setattr(Checkpointer, "save", fills_at_step_2)
    code, lines = _main(tmp_path, capsys, run, "steps=2", "eval.every=0")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: checkpoint 2 could not be written to "), lines
    assert "the disk is full; the newest complete checkpoint is still step 1" in lines[0]
    assert Checkpointer(str(run / "checkpoints")).latest_step() == 1
    monkeypatch.setattr(Checkpointer, "save", original)  # space freed: the same command resumes and finishes
    code, _ = _main(tmp_path, capsys, run, "steps=2", "eval.every=0")
    assert code == 0 and Checkpointer(str(run / "checkpoints")).latest_step() == 2


def test_a_float_mask_holding_nan_is_refused():
    """NaN is non-zero, so it would count as a real token (issue 24, item 18)."""
    import fipo_jax as fj

    lp = np.zeros((1, 4), np.float32)
    mask = np.array([[1.0, np.nan, 1.0, 0.0]], np.float32)
    with pytest.raises(ValueError, match=r"mask holds NaN or ±inf: a float mask must be finite"):
        fj.policy_loss(lp, lp, np.ones((1,), np.float32), mask, fj.PolicyLossConfig())
    fj.policy_loss(lp, lp, np.ones((1,), np.float32), np.nan_to_num(mask) > 0, fj.PolicyLossConfig())


@pytest.mark.slow
def test_sampling_a_policy_with_nan_weights_raises():
    from flax import nnx

    from fipo_jax.generation import engine
    from fipo_jax.models import CausalLM, ModelConfig
    from fipo_jax.generation.sampling import NonFiniteLogitsError, SamplingConfig
    from fipo_jax.generation.static_sampler import generate

    model = CausalLM(ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1), rngs=nnx.Rngs(0))
    model.norm.weight[...] = np.full((16,), np.nan, np.float32)
    ids = np.ones((2, 3), np.int32)
    config = SamplingConfig(max_new_tokens=3, temperature=1.0, prompt_length_buckets=None)
    with pytest.raises(NonFiniteLogitsError, match="not finite .* at the first sampled token"):
        generate(model, ids, None, jax.random.key(0), config)
    with pytest.raises(NonFiniteLogitsError, match="not finite"):
        engine.generate(model, ids, None, jax.random.key(0), config, engine.EngineConfig(num_slots=2))
