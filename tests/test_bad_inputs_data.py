"""Issue 10, data side: every bad input is named (file, row, field), nothing is silently converted,
pathological ground truths stay cheap, and a damaged SFT cache is rebuilt rather than fatal."""

import json

import pytest

from fipo_jax.rewards import MathVerifyWorker, RewardConfig, check_equivalence, dapo_math_score, normalize_answer
from fipo_jax.rewards import verify as verify_module

# The inputs of the issue: quadratic in the old normaliser (29.6 s and 63 s), linear now.
PATHOLOGICAL_GOLDS = {
    "text_8000": ("\\text{" * 8000, "{" * 8000),  # unclosed groups keep their "{"
    "text_96kb": ("\\text{" * 16000, "{" * 16000),
    "nested_braces": ("{" * 20000 + "}" * 20000, ""),
    "assignments": ("x=" * 20000 + "1", "1"),
    "math_openings": ("\\(" * 20000, "\\(" * 20000),
    "boxed_nested": ("\\boxed{" * 8000 + "7" + "}" * 8000, "7"),
}


# ---------------------------------------------------------------------------------------------
# item 12: ground-truth normalisation is bounded


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL_GOLDS))
def test_normaliser_is_linear_on_pathological_ground_truths(name):
    raw, expected = PATHOLOGICAL_GOLDS[name]
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        (r"\text{ \text{a}", "{a"),  # the outer group never closes: only its name goes
        (r"\boxed{\text{x}}", "x"),
        (r"\text{a}}", "a}"),
        (r"\{\text{a}\}", r"\{a\}"),  # escaped braces are not groups
        ("{{7}}", "7"),
        ("{1}{2}", "{1}{2}"),  # braces that do not enclose the whole answer stay
        ("x = y = 3", "3"),
        ("$$1$$ and $2$", "1"),
        (r"\(4\) or $5$", "4"),
    ],
)
def test_linear_normaliser_keeps_the_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_over_long_gold_is_rejected_before_normalisation(monkeypatch):
    def refuse(text):
        raise AssertionError("an over-long gold must not be normalised")

    monkeypatch.setattr(verify_module, "normalize_answer", refuse)
    worker = MathVerifyWorker()
    verdict = check_equivalence("\\text{" * 8000, "5", max_answer_chars=1024, worker=worker)
    assert (verdict.equal, verdict.method) == (False, "rejected")
    assert verdict.error == "gold answer is 48000 characters, over max_answer_chars=1024: not compared"
    assert worker.starts == 0


def test_over_long_gold_scores_wrong_and_says_so():
    result = dapo_math_score("Answer: 5", "5" + " " * 2000, RewardConfig(use_math_verify=False))
    assert result.score == -1.0 and not result.correct
    assert "gold answer is 2001 characters, over max_answer_chars=1024" in result.error
