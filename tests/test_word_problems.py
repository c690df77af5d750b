"""Generated arithmetic word problems: correctness, variety, prompt format, splits, the real reward."""

import collections
import re

import numpy as np
import pytest

from fipo_jax.data import PromptRecord, WordProblem, WordProblemTask, word_problem_splits
from fipo_jax.data import word_problems as wp
from fipo_jax.rewards import RewardConfig, score_batch

EXPR = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def recompute(problem):
    """Values from the structure, independently of the module; checks positivity and exact division."""
    values = [problem.start]
    for op, b in problem.steps:
        x = values[-1]
        if op == "+":
            y = x + b
        elif op == "-":
            y = x - b
        elif op == "*":
            y = x * b
        else:
            assert op == "/" and b > 0 and x % b == 0, (x, op, b)
            y = x // b
        assert isinstance(y, int) and y >= 1, (problem, y)
        values.append(y)
    return values


def target_question(prompt):
    head, last = prompt.rsplit("Question: ", 1)
    assert last.endswith("\nSolution:")
    return last[: -len("\nSolution:")]


def test_deterministic_for_a_seed():
    task = WordProblemTask()
    a = task.problems(np.random.default_rng(7), 50)
    b = task.problems(np.random.default_rng(7), 50)
    c = task.problems(np.random.default_rng(8), 50)
    assert a == b and a != c
    assert all(set(r) == {"prompt", "ground_truth"} for r in a)
    assert task.sample(np.random.default_rng(3), 20) == task.sample(np.random.default_rng(3), 20)
    assert task.few_shot_pool() == WordProblemTask().few_shot_pool()


def test_answers_and_worked_solutions_are_correct():
    task = WordProblemTask()
    problems = task.sample(np.random.default_rng(0), 600)
    records = task.problems(np.random.default_rng(0), 600)
    for problem, record in zip(problems, records):
        values = recompute(problem)
        assert record["ground_truth"] == str(values[-1]) == task.answer(problem)
        assert target_question(record["prompt"]) == problem.question
        # Every number in the question is the start or an operand, and all of them appear.
        assert sorted(int(n) for n in re.findall(r"\d+", problem.question)) == sorted(
            [problem.start] + [b for _, b in problem.steps])
        # One "a op b = c" per step, chained, each correct; then the answer line.
        lines = task.solution(problem).split("\n")
        assert len(lines) == len(problem.steps) + 1 and lines[-1] == f"Answer: {values[-1]}"
        for i, (line, (op, b)) in enumerate(zip(lines, problem.steps)):
            (expr,) = EXPR.findall(line)
            x, got_op, y, z = int(expr[0]), expr[1], int(expr[2]), int(expr[3])
            assert (x, got_op, y, z) == (values[i], op, b, values[i + 1]), line
            assert z == eval(f"{x} {got_op} {y}"), line  # "/" in Python is exact when it divides
            assert line.endswith("."), line


def test_values_respect_bounds_and_ops():
    task = WordProblemTask(max_operand=9, max_factor=3, max_value=40)
    for problem in task.sample(np.random.default_rng(1), 1000):
        values = recompute(problem)
        assert max(values) <= 40 and min(values) >= 1
        for i, (op, b) in enumerate(problem.steps):
            if op in "+-":
                assert 1 <= b <= 9
            elif i == 0 and op == "*":  # "a groups of b"
                assert 2 <= problem.start <= 3 and 2 <= b <= 9
            else:
                assert 2 <= b <= 3
            if i == 0 and op in "+-":
                assert problem.start <= 9
            if i == 0 and op == "/":
                assert problem.start // b <= 9
    for ops in ("+", "-", "*", "/", "+-", "*/", "-/"):
        task = WordProblemTask(ops=ops)
        used = {op for p in task.sample(np.random.default_rng(2), 200) for op, _ in p.steps}
        assert used == set(ops), ops
        for p in task.sample(np.random.default_rng(4), 50):
            recompute(p)


def test_step_counts():
    counts = collections.Counter(len(p.steps) for p in WordProblemTask().sample(np.random.default_rng(0), 600))
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 150
    two = WordProblemTask(min_steps=2, max_steps=2).sample(np.random.default_rng(0), 100)
    assert {len(p.steps) for p in two} == {2}
    assert {len(p.steps) for p in WordProblemTask(max_steps=1).sample(np.random.default_rng(0), 100)} == {1}
    assert {len(p.steps) for p in WordProblemTask(min_steps=2).sample(np.random.default_rng(0), 200)} == {2, 3}


def test_wording_varies():
    one_step = WordProblemTask(max_steps=1).sample(np.random.default_rng(0), 200)
    assert len({p.question for p in one_step}) >= 190
    skeletons = {re.sub(r"\d+", "N", p.question) for p in one_step}  # text without its numbers
    assert len(skeletons) >= 150
    problems = WordProblemTask().sample(np.random.default_rng(1), 3000)
    first = {(p.steps[0][0], p.templates[0]) for p in problems}
    chain = {(op, t) for p in problems for (op, _), t in zip(p.steps[1:], p.templates[1:])}
    assert first == {(op, t) for op in wp.OPS for t in range(len(wp._FIRST[op]))}
    assert chain == {(op, t) for op in wp.OPS for t in range(len(wp._CHAIN[op]))}
    assert all(len(wp._FIRST[op]) >= 8 and len(wp._CHAIN[op]) >= 8 for op in wp.OPS)
    assert {p.question_template for p in problems} == set(range(len(wp._QUESTIONS)))
    assert len({p.name for p in problems}) == len(wp._NAMES) >= 15
    assert len({p.obj for p in problems}) == len(wp._OBJECTS) >= 15
    assert {p.gender for p in problems} == {"m", "f"}
    for p in problems[:300]:  # every placeholder was filled; pronouns match the name
        text = p.question + "\n" + p.solution
        assert "{" not in text and "}" not in text
        assert not re.search(r"\b1 (%s)\b" % "|".join(re.escape(o[1]) for o in wp._OBJECTS), text), text
        other = ("she", "her") if p.gender == "m" else ("he", "him", "his")
        assert not set(re.findall(r"\b\w+\b", text.lower())) & set(other), text


def test_prompt_format():
    problem = WordProblem(start=20, steps=(("-", 8), ("+", 3)), templates=(0, 0), question_template=0, name="Maria",
                          gender="f", obj=("sticker", "stickers"), box=("box", "boxes"), rel=("friend", "friends"))
    assert problem.question == ("Maria had 20 stickers and gave 8 to her friend. Then she buys 3 more stickers. "
                                "How many stickers does Maria have now?")
    assert problem.solution == ("Maria had 20 stickers and gave away 8, so she has 20 - 8 = 12 stickers.\n"
                                "Then she buys 3 more, so she has 12 + 3 = 15 stickers.\nAnswer: 15")
    for few_shot in (0, 1, 2, 4):
        task = WordProblemTask(few_shot=few_shot)
        for record in task.problems(np.random.default_rng(few_shot), 30):
            prompt = record["prompt"]
            assert prompt.endswith("\nSolution:") and prompt.startswith("Question: ")
            assert len(re.findall(r"^Answer: \d+$", prompt, flags=re.M)) == few_shot
            assert prompt.count("Question: ") == few_shot + 1 and prompt.count("Solution:") == few_shot + 1
            blocks = prompt.split("\n\n")
            assert len(blocks) == few_shot + 1
            pool = {p.question: p for p in task.few_shot_pool()}
            for block in blocks[:-1]:
                question, rest = block.removeprefix("Question: ").split("\nSolution: ", 1)
                assert pool[question].solution == rest
            if few_shot == 0:
                assert prompt == f"Question: {target_question(prompt)}\nSolution:"
    task = WordProblemTask()
    (problem,) = task.sample(np.random.default_rng(0), 1)
    assert task.prompt(problem) == task.prompt(problem)  # a pure function of the problem
    assert len({ex.question for ex in task.examples_for(problem)}) == task.few_shot


def test_few_shot_examples_never_appear_as_problems():
    for task in (WordProblemTask(), WordProblemTask(max_steps=1, ops="+", max_operand=3, max_factor=2, max_value=6)):
        pool = {p.question for p in task.few_shot_pool()}
        assert len(pool) == wp.FEW_SHOT_POOL_SIZE
        sampled = {p.question for p in task.sample(np.random.default_rng(0), 2000)}
        assert not pool & sampled
    train, held_out = word_problem_splits(WordProblemTask(), seed=0, n_train=500, n_eval=100)
    pool = {p.question for p in WordProblemTask().few_shot_pool()}
    assert not pool & {target_question(r.prompt) for r in train + held_out}


def test_splits_are_disjoint_and_deterministic():
    task = WordProblemTask()
    train, held_out = word_problem_splits(task, seed=3, n_train=400, n_eval=100)
    assert len(train) == 400 and len(held_out) == 100
    assert all(isinstance(r, PromptRecord) and r.data_source == "word_problems" for r in train + held_out)
    assert [r.index for r in train] == [str(i) for i in range(400)] and held_out[-1].index == "99"
    train_q = {target_question(r.prompt) for r in train}
    eval_q = [target_question(r.prompt) for r in held_out]
    assert len(set(eval_q)) == 100 and not train_q & set(eval_q)
    assert all(r.ground_truth.isdigit() for r in train + held_out)
    assert (train, held_out) == word_problem_splits(task, seed=3, n_train=400, n_eval=100)
    other_train, other_eval = word_problem_splits(task, seed=4, n_train=400, n_eval=100)
    assert other_train != train and other_eval != held_out
    # The eval draws come from their own seed, not from continuing the train stream.
    continued = [target_question(r.prompt) for r in word_problem_splits(task, 3, 410, 0)[0][400:]]
    assert eval_q[:10] != continued
    # The search for held-out problems is bounded; running out raises a clear error.
    with pytest.raises(ValueError, match="found only 50 of n_eval=100 distinct held-out problems"):
        word_problem_splits(task, seed=0, n_train=50, n_eval=100, max_tries=50)


def test_the_real_reward_scores_worked_solutions():
    task = WordProblemTask()
    demos = task.demonstrations(np.random.default_rng(0), 20)
    problems = task.sample(np.random.default_rng(0), 20)
    golds = [task.answer(p) for p in problems]
    right = [response for _, response in demos]
    assert all(r.startswith(" ") and r[1:] == task.solution(p) for r, p in zip(right, problems))
    wrong = [r.rsplit("Answer: ", 1)[0] + f"Answer: {int(g) + 1}" for r, g in zip(right, golds)]
    # A response that copies the prompt's examples' answers but ends with the right one is right, and vice versa.
    for config in (RewardConfig(max_response_length=256, overlong_buffer=None),
                   RewardConfig.official_dapo(max_response_length=256, overlong_buffer=None)):
        batch = score_batch(right + wrong, golds + golds, config, response_lengths=[40] * 40)
        assert batch.correct.tolist() == [True] * 20 + [False] * 20
        assert batch.scores.tolist() == [1.0] * 20 + [-1.0] * 20 and batch.num_errors == 0
    prompt, response = demos[0]
    full = prompt + response  # the examples' "Answer:" lines are in the prompt, never in the response
    assert full.count("Answer:") == task.few_shot + 1


@pytest.mark.parametrize("kwargs, match", [
    ({"min_steps": 0}, "min_steps must be an int in \\[1, 3\\]"),
    ({"max_steps": 4}, "max_steps must be an int in \\[1, 3\\]"),
    ({"min_steps": 3, "max_steps": 2}, "max_steps must be >= min_steps"),
    ({"max_operand": 1}, "max_operand must be an int >= 2"),
    ({"max_factor": 1}, "max_factor must be an int >= 2"),
    ({"max_value": 39}, "max_value must be an int >= 40"),
    ({"few_shot": -1}, "few_shot must be an int in \\[0, 8\\]"),
    ({"few_shot": 9}, "few_shot must be an int in \\[0, 8\\]"),
    ({"min_steps": 1.0}, "min_steps must be an int"),
    ({"few_shot": True}, "few_shot must be an int"),
    ({"ops": ""}, "ops must be a non-empty string"),
    ({"ops": "+%"}, "ops must be a non-empty string"),
    ({"ops": "++"}, "ops must be a non-empty string of distinct ops"),
])
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WordProblemTask(**kwargs)


def test_split_and_sample_argument_errors():
    task = WordProblemTask()
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        task.sample(np.random.default_rng(0), -1)
    with pytest.raises(ValueError, match="n_eval must be an int >= 0"):
        word_problem_splits(task, seed=0, n_train=1, n_eval=-2)
    with pytest.raises(ValueError, match="seed must be an int"):
        word_problem_splits(task, seed="0", n_train=1, n_eval=1)
    with pytest.raises(ValueError, match="inexact division"):
        _ = WordProblem(7, (("/", 2),), (0,), 0, "Tom", "m", ("a", "as"), ("b", "bs"), ("c", "cs")).values
