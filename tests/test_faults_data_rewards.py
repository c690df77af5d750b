"""Issue 31, data and rewards: results that were silently wrong are now right or refused in one line.
Each test injects the fault of the issue (and would pass silently without the fix)."""

import json
import os
import re
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fipo_jax as fj
from fipo_jax.train.build import build_prompts, check_gold_answers
from fipo_jax.config import ConfigError, apply_overrides, cpu_default
from fipo_jax.data import CharTokenizer, PromptIterator, PromptRecord
from fipo_jax.data.prompts import ground_truth_text
from fipo_jax.rewards import (MAX_OVERLONG_FACTOR, MathVerifyMissingError, MathVerifyWorker, RewardConfig,
                              dapo_math_score, overlong_penalty, score_batch, stated_answer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# score_batch with a custom score_fn: float32 overflow, a hung call


def test_a_custom_score_that_overflows_float32_is_an_error_for_its_sample():
    batch = score_batch(["a", "b"], ["1", "1"], score_fn=lambda response, gold: 1e300 if response == "a" else 3e38)
    assert np.all(np.isfinite(batch.scores)) and batch.scores.tolist() == [-1.0, np.float32(3e38)]
    assert batch.num_errors == 1 and not batch.correct[0]
    assert batch.results[0].error == ("ValueError: score_fn returned 1e+300, which does not fit float32 "
                                      "(|score| <= 3.403e+38): it would be ±inf in the batch's scores")


def test_a_hung_custom_score_fn_is_bounded_by_the_batch_budget():
    release = threading.Event()

    def score_fn(response, gold):
        if response == "hang":
            release.wait()  # a call that never returns (until the test lets it go)
        return response == gold

    try:
        start = time.monotonic()
        batch = score_batch(["1", "hang", "3"], ["1", "2", "3"], RewardConfig(batch_budget_s=0.3), score_fn=score_fn)
        assert time.monotonic() - start < 3
    finally:
        release.set()
    assert batch.correct.tolist() == [True, False, False] and batch.scores.tolist() == [1.0, -1.0, -1.0]
    assert batch.num_over_budget == 2 and batch.num_errors == 0
    assert [r.over_budget for r in batch.results] == [False, True, True]
    assert batch.results[1].error == "score_fn ran past the batch's budget batch_budget_s=0.3 s: not scored"


def test_a_custom_score_fn_within_its_budget_scores_as_before():
    values = [True, False, 0.5, -2.0, fj.rewards.RewardResult(1.0, True, "x")]
    batch = score_batch([str(i) for i in range(5)], ["g"] * 5, score_fn=lambda response, gold: values[int(response)])
    assert batch.scores.tolist() == [1.0, -1.0, 0.5, -2.0, 1.0] and batch.correct.tolist() == [1, 0, 1, 0, 1]
    assert (batch.num_errors, batch.num_over_budget) == (0, 0)


def test_without_a_budget_a_custom_score_fn_runs_in_the_calling_thread():
    """The documented escape hatch for a score_fn that must (e.g. one using signal.alarm)."""
    threads = []
    score_batch(["1"], ["1"], RewardConfig(batch_budget_s=None),
                score_fn=lambda response, gold: threads.append(threading.current_thread()) or True)
    assert threads == [threading.main_thread()]


def test_a_score_fn_that_never_returns_does_not_block_interpreter_exit():
    code = ("import time\nfrom fipo_jax.rewards import RewardConfig, score_batch\n"
            "b = score_batch(['x'], ['1'], RewardConfig(batch_budget_s=0.2), score_fn=lambda r, g: time.sleep(1e6))\n"
            "print(b.num_over_budget)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr


# ---------------------------------------------------------------------------------------------
# overlong factors that overflow


@pytest.mark.parametrize("factor", [1e308, 1e30, MAX_OVERLONG_FACTOR * 2])
def test_an_overlong_factor_that_can_overflow_is_refused(factor):
    refused = rf"{re.escape(repr(factor))} is over 1048576 \(2\^20\): shaped rewards in \[-1 - factor, 1\] then lose"
    with pytest.raises(ValueError, match=rf"^overlong_factor={refused}"):
        RewardConfig(overlong_factor=factor)
    with pytest.raises(ValueError, match=rf"^penalty_factor={refused}"):
        overlong_penalty([10], 16, 4, factor)


def test_the_largest_factor_keeps_rewards_finite_and_correctness_visible():
    """The bound's derivation, checked: at f = 2^20, a group of 2^16 overlong responses (half right)
    has finite advantages whose sign follows correctness."""
    group = 2**16
    correct = np.arange(group) % 2 == 0
    scores = fj.rewards.shaped_scores(correct, np.full(group, 16), max_response_length=16, buffer_length=4,
                                      penalty_factor=MAX_OVERLONG_FACTOR)
    assert np.all(np.isfinite(scores)) and len(set(scores.tolist())) == 2
    advantages = np.asarray(fj.grpo_advantages(jnp.asarray(scores), group))
    assert np.all(np.isfinite(advantages)) and np.all((advantages > 0) == correct)


# ---------------------------------------------------------------------------------------------
# dynamic sampling on the reward's ±1, non-finite scores in advantages


def test_dynamic_sampling_reads_the_rewards_plus_minus_one():
    assert fj.dynamic_sampling_mask(np.array([1.0, -1.0, -1.0, -1.0]), 2).tolist() == [True, False]
    assert fj.dynamic_sampling_mask(jnp.array([1, -1, 1, 1]), 2).tolist() == [True, False]
    assert fj.dynamic_sampling_mask(np.array([True, False, False, False]), 2).tolist() == [True, False]
    assert fj.dynamic_sampling_mask(np.array([1, 0, 1, 1]), 2).tolist() == [True, False]
    jitted = jax.jit(lambda outcomes: fj.dynamic_sampling_mask(outcomes, 2))
    assert jitted(jnp.array([1.0, -1.0, -1.0, -1.0])).tolist() == [True, False]


@pytest.mark.parametrize("value", [-1.5, 0.5, np.nan, 2.0])
def test_dynamic_sampling_refuses_what_is_not_correctness(value):
    with pytest.raises(ValueError, match=rf"^outcomes must be correctness \(bool, 0/1 or the reward's ±1\), got "
                                         rf"{value} at row 1: pass BatchRewards.correct, not shaped scores$"):
        fj.dynamic_sampling_mask(np.array([1.0, value, -1.0, -1.0]), 2)


@pytest.mark.parametrize("estimator", [fj.grpo_advantages, fj.dr_grpo_advantages, fj.core.advantages.rloo_advantages])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_advantages_refuse_a_non_finite_score(estimator, bad):
    scores = np.array([1.0, -1.0, bad, 1.0], np.float32)
    with pytest.raises(ValueError, match=rf"^scores must be finite, got {bad} at row 2 \(1 non-finite in all\)"):
        estimator(scores, 2)
    with pytest.raises(ValueError, match="scores must be finite"):
        estimator(jnp.asarray(scores), 2)


def test_under_jit_a_non_finite_score_makes_only_its_group_nan():
    """What the module docstring documents: values are not seen under jit."""
    advantages = jax.jit(lambda s: fj.grpo_advantages(s, 2))(jnp.array([1.0, -1.0, jnp.inf, 1.0]))
    assert np.all(np.isfinite(advantages[:2])) and np.all(np.isnan(advantages[2:]))


# ---------------------------------------------------------------------------------------------
# gold answers a correct response cannot match


def test_a_gsm8k_gold_is_read_after_its_marker():
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 in all.\n#### 72"
    assert dapo_math_score("so 72 clips\nAnswer: 72", solution).correct
    quick = RewardConfig(use_math_verify=False)
    assert dapo_math_score("Answer: 7", "#### 7").correct
    assert not dapo_math_score("Answer: #### 7", "#### 7", quick).correct  # what the old check accepted
    assert dapo_math_score("Answer: 1000", "#### 1,000").correct
    with pytest.raises(ValueError, match=r"^f\.jsonl line 2: answer 'work\\n####' has nothing after its GSM8K '####' "
                                         r"marker; write the answer after it$"):
        ground_truth_text("work\n####", "f.jsonl line 2", "answer")


@pytest.mark.parametrize("gold, stated", [
    ("The answer is 7", "7"),
    ("She has 7 apples left.", "7"),
    ("x is -3", "-3"),
    ("So the total is $\\frac{3}{4}$ cups", "\\frac{3}{4}"),  # scores right: the normaliser reads the span
])
def test_a_sentence_gold_states_its_answer(gold, stated):
    assert stated_answer(gold) == stated


@pytest.mark.parametrize("gold", ["The answer is 7", "She has 7 apples left.", "x is -3", "Thus 12 were sold."])
def test_a_gold_a_correct_response_cannot_match_is_refused_naming_file_and_row(gold):
    records = [PromptRecord("q", "5"), PromptRecord("q", gold)]
    bare = stated_answer(gold)
    expected = (f"data.train_path p.jsonl, prompt 2: ground truth {gold!r} is not a bare answer: the correct "
                f"response 'Answer: {bare}' scores wrong against it; write the bare answer, e.g. '{bare}'")
    with pytest.raises(ConfigError, match=rf"^{re.escape(expected)}$"):
        check_gold_answers(records, "data.train_path p.jsonl")


def test_usable_golds_pass_the_correct_response_check():
    golds = ["#### 7", "7", "\\frac{1}{2}", "x = 3", "\\boxed{12}", "1,000", "(1, 2)", "\\text{Monday}", "odd",
             "3 hours and 20 minutes", "So the total is $\\frac{3}{4}$ cups", "Work.\n#### 72"]
    check_gold_answers([PromptRecord("q", g) for g in golds], "data.train_path ok.jsonl")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_file_with_gsm8k_golds_loads_and_one_with_a_sentence_solution_is_refused(tmp_path):
    rows = [{"question": "Q: 1+2=", "answer": "1+2 = 3\n#### 3"}, {"question": "Q: 3*3=", "answer": "#### 9"}]
    path = _write_jsonl(tmp_path / "g.jsonl", rows)
    config = apply_overrides(cpu_default(), ["data.task=file", f"data.train_path={path}", "rollout.prompts_per_step=2"])
    train, _ = build_prompts(config, CharTokenizer(), lambda line: None)
    assert [r.ground_truth for r in train] == ["1+2 = 3\n#### 3", "#### 9"]
    rows.append({"problem": "Q: 2+2=", "solution": "Adding two and two, the total is 4."})
    path = _write_jsonl(tmp_path / "s.jsonl", rows)
    config = apply_overrides(cpu_default(), ["data.task=file", f"data.train_path={path}"])
    with pytest.raises(ConfigError, match=rf"^data\.train_path {re.escape(str(path))}, prompt 3: ground truth 'Adding "
                                          rf"two and two, the total is 4\.' is not a bare answer: the correct response "
                                          rf"'Answer: 4'"):
        build_prompts(config, CharTokenizer(), lambda line: None)


# ---------------------------------------------------------------------------------------------
# math-verify missing from the install


def test_missing_math_verify_is_the_one_line_extra_error_when_it_is_needed(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # what a core install without [train] looks like
    worker = MathVerifyWorker()
    message = "this part of fipo_jax needs the 'train' extra (missing: math_verify): pip install 'fipo_jax[train]'"
    with pytest.raises(MathVerifyMissingError, match=rf"^{re.escape(message)}$"):
        dapo_math_score("Answer: \\frac{2}{4}", "\\frac{1}{2}", worker=worker)
    with pytest.raises(ImportError, match="needs the 'train' extra"):
        score_batch(["Answer: 5", "Answer: \\frac{2}{4}"], ["5", "\\frac{1}{2}"], worker=worker)
    with pytest.raises(ImportError, match="needs the 'train' extra"):
        score_batch(["Answer: \\frac{2}{4}"], ["\\frac{1}{2}"], worker=worker,
                    score_fn=lambda response, gold: dapo_math_score(response, gold, worker=worker))
    # not needed: the string and decimal rules decide, or math-verify is off
    assert dapo_math_score("Answer: 5.0", "5", worker=worker).correct
    assert not dapo_math_score("Answer: 6", "5", worker=worker).correct
    assert not dapo_math_score("Answer: \\frac{2}{4}", "\\frac{1}{2}", RewardConfig(use_math_verify=False)).correct
    assert worker.starts == 0


# ---------------------------------------------------------------------------------------------
# build_prompts: the chain task's prompt length, empty eval sets, eval = train, small train sets


def _chain(*overrides):
    return apply_overrides(cpu_default(), list(overrides))


def test_the_chain_task_obeys_max_prompt_tokens():
    tokens = len(CharTokenizer().encode("Q: 1+2*3=")) + 1  # BOS
    train, _ = build_prompts(_chain("data.n_terms=3", f"data.max_prompt_tokens={tokens}"), CharTokenizer(), print)
    assert train
    with pytest.raises(ConfigError, match=rf"^no train prompt fits data\.max_prompt_tokens={tokens - 1}: the chain "
                                          rf"task's prompts are {tokens} tokens \(data\.n_terms=3\); lower "
                                          rf"data\.n_terms or raise data\.max_prompt_tokens$"):
        build_prompts(_chain("data.n_terms=3", f"data.max_prompt_tokens={tokens - 1}"), CharTokenizer(), print)


def test_a_huge_chain_is_refused_before_any_problem_is_made():
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"^no train prompt fits data\.max_prompt_tokens=2048: the chain task's "
                                          r"prompts are 200003 tokens \(data\.n_terms=100000\)"):
        build_prompts(_chain("data.n_terms=100000"), CharTokenizer(), print)
    assert time.monotonic() - start < 3


def test_an_empty_chain_eval_set_is_refused():
    config = _chain("data.n_terms=2", "data.ops=+", "data.train_prompts=4096")
    with pytest.raises(ConfigError, match=r"^the chain task's eval set is empty: data\.n_terms=2 data\.ops='\+' has "
                                          r"100 distinct problems and the 4096 train prompts cover every one drawn for "
                                          r"eval; raise data\.n_terms, add an op to data\.ops or lower "
                                          r"data\.train_prompts$"):
        build_prompts(config, CharTokenizer(), print)


def test_an_eval_file_that_is_all_too_long_is_refused(tmp_path):
    train = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Q: 1+2=", "ground_truth": "3"}] * 4)
    evals = _write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Q: " + "1+" * 30 + "1=", "ground_truth": "1"}] * 2)
    config = apply_overrides(cpu_default(), ["data.task=file", f"data.train_path={train}", f"data.eval_path={evals}",
                                             "data.max_prompt_tokens=16", "rollout.prompts_per_step=4"])
    with pytest.raises(ConfigError, match=r"^no eval prompt fits data\.max_prompt_tokens=16: raise it, or use shorter"):
        build_prompts(config, CharTokenizer(), print)


def test_eval_path_that_is_the_train_file_is_warned_about(tmp_path):
    (tmp_path / "d").mkdir()
    path = _write_jsonl(tmp_path / "d" / "p.jsonl", [{"prompt": "Q: 1+2=", "ground_truth": "3"}] * 4)
    other = _write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Q: 1+3=", "ground_truth": "4"}] * 4)
    same = f"{tmp_path}/d/../d/p.jsonl"  # another spelling of the same file
    for eval_path, warned in ((same, True), (str(other), False)):
        lines = []
        config = apply_overrides(cpu_default(), ["data.task=file", f"data.train_path={path}",
                                                 f"data.eval_path={eval_path}", "rollout.prompts_per_step=4"])
        build_prompts(config, CharTokenizer(), lines.append)
        expected = (f"[warning] data.eval_path {same} is the file data.train_path {path}: the eval measures prompts "
                    f"the run trains on, not held-out ones")
        assert lines == ([expected] if warned else []), lines


def test_fewer_train_prompts_than_one_step_is_warned_about(tmp_path):
    path = _write_jsonl(tmp_path / "one.jsonl", [{"prompt": "Q: 1+2=", "ground_truth": "3"}])
    lines = []
    config = apply_overrides(cpu_default(), ["data.task=file", f"data.train_path={path}", "rollout.prompts_per_step=2",
                                             "rollout.prompts_per_round=2"])
    train, evals = build_prompts(config, CharTokenizer(), lines.append)
    assert (len(train), evals) == (1, [])
    assert lines == ["[warning] the train set has 1 prompt, fewer than rollout.prompts_per_step=2: every step "
                     "repeats prompts; add prompts or lower rollout.prompts_per_step"]
    assert PromptIterator(train).next_batch(2) == train * 2  # the step still works


# ---------------------------------------------------------------------------------------------
# the prompt iterator's position


def test_an_iterator_offset_beyond_the_data_is_refused():
    records = [PromptRecord(str(i), str(i)) for i in range(4)]
    iterator = PromptIterator(records, seed=1)
    iterator.next_batch(3)
    good = iterator.state()
    for offset in (4, 70, -1):
        with pytest.raises(ValueError, match=rf"^prompt iterator position epoch 0, offset {offset} is not in the data "
                                             rf"of 4 prompts \(0 <= offset < 4\): the checkpoint's data position is "
                                             rf"damaged or for other data$"):
            PromptIterator(records, seed=1).restore({**good, "offset": offset})
    with pytest.raises(ValueError, match=r"^prompt iterator state must hold the integers \('epoch', 'offset', 'seed', "
                                         r"'size'\), got \{'epoch': 0\}"):
        PromptIterator(records, seed=1).restore({"epoch": 0})
    with pytest.raises(ValueError, match="offset 9 is not in the data of 4 prompts"):
        PromptIterator(records, offset=9)
    resumed = PromptIterator(records, seed=1)
    resumed.restore(good)
    assert resumed.next_batch(5) == iterator.next_batch(5)
