"""DAPO math reward: extraction, normalisation, bounded math-verify, scoring, overlong shaping."""

import concurrent.futures
import dataclasses
import os
import random
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fipo_jax.rewards import (
    MathVerifyWorker,
    RewardConfig,
    RewardResult,
    check_equivalence,
    dapo_math_score,
    extract_answer,
    extract_answer_line,
    extract_last_boxed,
    gold_answer,
    is_equivalent,
    normalize_answer,
    numeric_equal,
    overlong_penalty,
    read_brace_group,
    score_batch,
    shaped_scores,
)

# Generous wall-clock ceilings: they catch a hang, not a slowdown (the machine may be loaded).
HANG_CEILING_S = 20.0


@pytest.fixture(scope="module")
def worker():
    with MathVerifyWorker() as shared:
        yield shared


@pytest.fixture(scope="module")
def config():
    return RewardConfig(verify_timeout_s=1.0)


# ---------------------------------------------------------------------------------------------
# extraction


def test_answer_line_last_wins_and_case_insensitive():
    assert extract_answer_line("Answer: 3\nthinking again...\nAnswer: 7") == "7"
    assert extract_answer_line("Answer: 3. No wait, Answer: 7") == "7"  # last label on one line
    assert extract_answer_line("answer: 5") == "5"
    assert extract_answer_line("FINAL ANSWER:42 ") == "42"
    assert extract_answer_line("Answer:\n  12\n") == "12"  # official \s* crosses the newline
    assert extract_answer_line("Answer: 9\nAnswer:   \n") == "9"  # an empty last label is skipped
    assert extract_answer_line("**Answer:** 17") == "17"
    assert extract_answer_line("所以\nAnswer：５") == "５"  # full-width colon; digit normalised later
    assert extract_answer_line("no label") is None
    assert extract_answer_line("") is None


def test_answer_window_is_official_300_chars_and_configurable():
    text = "Answer: 5\n" + "x" * 400
    assert extract_answer_line(text) is None
    assert extract_answer_line(text, window_chars=None) == "5"
    assert extract_answer_line(text, window_chars=411) == "5"
    assert extract_answer_line("Answer: 12345", window_chars=3) is None  # label cut off
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="window_chars"):
            extract_answer_line("Answer: 1", window_chars=bad)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"first \boxed{1}, then \boxed{2}, finally \boxed{ 3 }.", "3"),
        (r"$\boxed{\sqrt{\frac{a}{b^{2}}}}$", r"\sqrt{\frac{a}{b^{2}}}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not count
        (r"\boxed{a\\}", "a\\\\"),
        (r"so $\boxed 7$", "7"),
        (r"\fbox{4}", "4"),
        (r"\boxed{2} and \fbox{5}", "5"),
        (r"\boxed{5} \boxedfoo{6}", "5"),  # not a box command
        (r"\boxed{1} then truncated \boxed{\frac{1}{2", None),  # last box unbalanced
        (r"\boxed{}", None),
        (r"}}}{{{\boxed{{{", None),
        ("no box", None),
        (r"\boxed", None),
    ],
)
def test_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


_BALANCED = st.recursive(
    st.text(alphabet="ab12+-^_ ", max_size=5),
    lambda inner: st.builds(lambda x, y: "{" + x + "}" + y, inner, inner),
    max_leaves=12,
)


@given(content=_BALANCED, prefix=st.text(alphabet="xy {}$", max_size=8))
def test_boxed_recovers_any_balanced_content(content, prefix):
    expected = content.strip() or None
    assert extract_last_boxed(prefix + r"\boxed{" + content + "}") == expected
    group = read_brace_group("{" + content + "}", 0)
    assert group == (content, len(content) + 2)


_TOKENS = list("{}\\$: \nAnswerbxdfc12") + ["\\boxed{", "\\boxed ", "Answer:", "\\fbox", "\\{", "\\}"]


@given(text=st.lists(st.sampled_from(_TOKENS), max_size=120).map("".join))
def test_extraction_never_raises(text):
    for window in (None, 300, 7):
        for result in (extract_answer(text, window), extract_last_boxed(text, window), extract_answer_line(text, window)):
            assert result is None or (isinstance(result, str) and result)


def test_extract_answer_prefers_answer_line_then_boxed():
    assert extract_answer(r"\boxed{3} ... Answer: 4") == "4"
    assert extract_answer(r"we get \boxed{3}.") == "3"
    assert extract_answer(r"we get \boxed{3}.", boxed_fallback=False) is None
    assert extract_answer("nothing here") is None


# ---------------------------------------------------------------------------------------------
# normalisation


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("$5$.", "5"),
        ("5.", "5"),
        ("The final answer is $12$. I hope it is correct.", "12"),
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\tfrac12", r"\frac{1}{2}"),
        (r"\frac{\sqrt3}2", r"\frac{\sqrt{3}}{2}"),
        ("x = 5", "5"),
        (r"\theta = \frac{\pi}{4}", r"\frac{\pi}{4}"),
        ("f(x) = 2x+1", "2x+1"),
        (r"\text{12 cm}^2", "12"),
        ("90 degrees", "90"),
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90"),
        ("90°", "90"),
        (r"\$25", "25"),
        (r"50\%", "50"),
        ("1,000,000", "1000000"),
        ("1{,}000", "1000"),
        (r"10\!000", "10000"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"\boxed{7}", "7"),
        (r"\textbf{(B)}", "(B)"),
        ("−3", "-3"),  # U+2212 minus
        ("–3", "-3"),  # en dash
        ("½", r"\frac{1}{2}"),
        ("５", "5"),
        ("x²", "x^{2}"),
        ("3×4", r"3\times4"),
        ("+5", "5"),
        ("{7}", "7"),
        ("**17**", "17"),
        ("5 。", "5"),
    ],
)
def test_normalize(raw, expected):
    assert normalize_answer(raw) == expected
    assert normalize_answer(expected) == expected  # canonical forms are fixed points


@pytest.mark.parametrize("raw", ["1,2,3", "A", "2x = 4", r"\frac{1}{2}", "(0,1]", "12,34"])
def test_normalize_keeps_meaningful_text(raw):
    assert normalize_answer(raw) == raw.replace(" ", "")


def test_normalize_rejects_non_str():
    with pytest.raises(TypeError, match="answer must be a str"):
        normalize_answer(5)


# ---------------------------------------------------------------------------------------------
# verification


def test_exact_and_numeric_fast_paths(worker):
    starts = worker.starts
    assert check_equivalence("5", "$5$.", worker=worker).method == "exact"
    verdict = check_equivalence("5", "5.00", worker=worker)
    assert (verdict.equal, verdict.method) == (True, "numeric")
    assert check_equivalence("0.3333333", "0.333333", worker=worker) == check_equivalence("1", "2", worker=worker)
    assert not check_equivalence("5", "6", worker=worker).equal
    assert worker.starts == starts  # no math-verify call was needed
    assert numeric_equal("-0.50", "-.5") and numeric_equal("1/2", "0.5") is None


@pytest.mark.parametrize(
    "gold, predicted, equal",
    [
        (r"\frac{1}{2}", "0.5", True),
        ("0.5", r"\boxed{\frac{1}{2}}", True),
        (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2", True),
        ("1+x^2", "x^2+1", True),
        ("10", "4+6", True),
        (r"\frac{1}{2}", "0.6", False),
        ("5", r"\{1,2,3,4,5\}", False),
        ("5", "1 or 2 or 3 or 4 or 5", False),
    ],
)
def test_math_verify_equivalence(worker, gold, predicted, equal):
    verdict = check_equivalence(gold, predicted, worker=worker)
    assert verdict.equal is equal
    assert verdict.method == "math_verify" and verdict.error is None and not verdict.timed_out
    assert is_equivalent(gold, predicted, worker=worker) is equal


def test_official_rule_has_no_math_verify(worker):
    assert not check_equivalence(r"\frac{1}{2}", "0.5", use_math_verify=False, worker=worker).equal
    assert check_equivalence(r"\frac{1}{2}", r"\dfrac12", use_math_verify=False, worker=worker).equal


def test_overlong_prediction_rejected_unparsed():
    with MathVerifyWorker() as fresh:
        verdict = check_equivalence("5", "1+" * 600 + "4", max_answer_chars=1000, worker=fresh)
        assert (verdict.equal, verdict.method) == (False, "rejected")
        assert fresh.starts == 0


@pytest.mark.parametrize("expression", [r"9^{9^{9^{9}}}", "(" * 200 + "5" + ")" * 200])
def test_pathological_expression_is_bounded(worker, expression):
    start = time.monotonic()
    verdict = check_equivalence("5", expression, timeout_s=1.0, worker=worker)
    assert time.monotonic() - start < HANG_CEILING_S
    assert verdict.timed_out and not verdict.equal
    assert check_equivalence(r"\frac{1}{2}", "0.5", worker=worker).equal  # the worker still serves


def test_unresponsive_worker_is_killed_and_replaced():
    with MathVerifyWorker(kill_grace_s=0.5) as fresh:
        assert fresh.check("1/2", "0.5").equal
        os.kill(fresh.pid, signal.SIGSTOP)  # frozen: it can no longer answer, even via its own timer
        start = time.monotonic()
        verdict = fresh.check("1/3", "0.5", timeout_s=0.5)
        assert time.monotonic() - start < HANG_CEILING_S
        assert verdict.timed_out and not verdict.equal and fresh.kills == 1
        assert fresh.check("1/4", "0.25").equal and fresh.starts == 2


def test_dead_worker_is_restarted():
    with MathVerifyWorker() as fresh:
        assert fresh.check("2/4", "0.5").equal
        pid = fresh.pid
        os.kill(pid, signal.SIGKILL)
        verdict = fresh.check("3/4", "0.75")
        assert verdict.equal and verdict.error is None and fresh.starts == 2


def test_close_is_graceful_and_reopens():
    fresh = MathVerifyWorker()
    with fresh:
        assert fresh.check("1/5", "0.2").equal and fresh.pid is not None
    assert fresh.pid is None and fresh.kills == 0  # the child left on end of input
    assert fresh.check("1/8", "0.125").equal and fresh.starts == 2
    fresh.close()


def test_works_from_threads(worker):
    # math-verify's own signal.alarm timeout would fail outside the main thread
    pairs = [(r"\frac{1}{2}", "0.5", True), (r"\frac{1}{3}", "0.5", False), ("2", r"\sqrt{4}", True)] * 2
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda p: is_equivalent(p[0], p[1], worker=worker), pairs))
    assert results == [p[2] for p in pairs]


def test_verification_argument_errors(worker):
    with pytest.raises(ValueError, match="timeout_s"):
        check_equivalence("1", "2", timeout_s=0, worker=worker)
    with pytest.raises(ValueError, match="timeout_s"):
        check_equivalence("1", "2", timeout_s=float("inf"), worker=worker)
    with pytest.raises(ValueError, match="max_answer_chars"):
        check_equivalence("1", "2", max_answer_chars=0, worker=worker)
    with pytest.raises(TypeError, match="gold and predicted must be str"):
        check_equivalence(1, "2", worker=worker)
    with pytest.raises(ValueError, match="memory_limit_mb"):
        MathVerifyWorker(memory_limit_mb=-1)


# ---------------------------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize(
    "response, gold, correct",
    [
        ("Let me compute.\nAnswer: −3", "-3", True),  # unicode minus
        ("Answer: ½", "0.5", True),
        ("所以答案是：\nAnswer: 5\n这就是最终答案。", "5", True),
        (r"Thus the area is \boxed{\frac{1}{2}}.", "0.5", True),
        ("Answer: \\dfrac{3}{4}", r"\frac{3}{4}", True),
        ("Answer: $5$.", "5", True),
        ("answer: 5", "5", True),
        ("Answer: 5\nHmm, I made a mistake.\nAnswer: 6", "5", False),  # last answer wins
        (r"\boxed{5} ... \boxed{6}", "6", True),  # last box wins
        ("Answer: 1,000", 1000, True),  # numeric gold
        ("Answer: 12", r"\boxed{12}", True),  # boxed gold is unwrapped
        ("I think it is five.", "5", False),
        ("", "5", False),
    ],
)
def test_dapo_math_score(worker, config, response, gold, correct):
    result = dapo_math_score(response, gold, config, worker=worker)
    assert result.correct is correct
    assert result.score == (1.0 if correct else -1.0)
    assert result.error is None and not result.timed_out


def test_no_answer_reports_nothing_extracted(worker):
    assert dapo_math_score("I give up.", "5", worker=worker) == RewardResult(-1.0, False, None)


def test_official_config_is_string_match_on_answer_line(worker):
    official = RewardConfig.official_dapo()
    assert not dapo_math_score(r"\boxed{5}", "5", official, worker=worker).correct
    assert not dapo_math_score("Answer: 0.5", r"\frac{1}{2}", official, worker=worker).correct
    assert dapo_math_score("Answer: \\dfrac{1}{2}", r"\frac12", official, worker=worker).correct


def test_100kb_of_junk_is_fast_and_wrong(worker):
    rng = random.Random(0)
    alphabet = "{}{}\\$^_()[]abcxyz0123456789 \n" + "答案"
    junk = "".join(rng.choice(alphabet) for _ in range(100_000))
    junk_with_traps = junk[:50_000] + r"\boxed{" + junk[50_000:] + "Answer: " + "{" * 2000
    for response in (junk, junk_with_traps):
        for window in (300, None):
            start = time.monotonic()
            result = dapo_math_score(response, "5", RewardConfig(answer_window_chars=window), worker=worker)
            assert time.monotonic() - start < HANG_CEILING_S
            assert not result.correct and result.score == -1.0


def test_huge_single_answer_line_is_rejected(worker):
    response = "Answer: " + "9" * 100_000
    result = dapo_math_score(response, "5", RewardConfig(answer_window_chars=None, max_answer_chars=500), worker=worker)
    assert not result.correct and result.error is None and len(result.extracted) == 500


def test_pathological_answer_times_out_inside_the_bound(worker, config):
    start = time.monotonic()
    result = dapo_math_score(r"Answer: 9^{9^{9^{9}}}", "5", config, worker=worker)
    assert time.monotonic() - start < HANG_CEILING_S
    assert result.timed_out and not result.correct and result.score == -1.0


def test_bad_sample_is_reported_not_raised(worker):
    result = dapo_math_score("Answer: 5", None, worker=worker)
    assert result.error is not None and "gold" in result.error and result.score == -1.0
    result = dapo_math_score(b"Answer: 5", "5", worker=worker)
    assert result.error is not None and "response_text" in result.error
    assert dapo_math_score("Answer: 5", r"\boxed{5", worker=worker).error is not None
    with pytest.raises(TypeError, match="RewardConfig"):
        dapo_math_score("Answer: 5", "5", {"verify_timeout_s": 1})


def test_gold_answer():
    assert gold_answer(7) == "7" and gold_answer("  8 ") == "  8 "
    with pytest.raises(TypeError, match="gold"):
        gold_answer(True)


def test_score_batch_catches_a_raising_reward_function():
    def flaky(response, gold):
        if "boom" in response:
            raise RuntimeError("reward server down")
        return response == gold

    batch = score_batch(["1", "boom", "3"], ["1", "2", "4"], score_fn=flaky)
    assert batch.correct.tolist() == [True, False, False]
    assert batch.scores.tolist() == [1.0, -1.0, -1.0]
    assert batch.num_errors == 1 and batch.num_timeouts == 0
    assert batch.results[1].error == "RuntimeError: reward server down"
    assert batch.results[0].error is None and len(batch) == 3


def test_score_batch_coerces_and_rejects_reward_function_outputs():
    outputs = iter([0.5, True, float("nan"), "yes", RewardResult(-1.0, False, "7")])
    batch = score_batch(["a"] * 5, ["b"] * 5, score_fn=lambda r, g: next(outputs))
    assert batch.base_scores.tolist() == [0.5, 1.0, -1.0, -1.0, -1.0]
    assert batch.correct.tolist() == [True, True, False, False, False]
    assert batch.num_errors == 2
    assert "non-finite" in batch.results[2].error and "RewardResult, bool or float" in batch.results[3].error


def test_score_batch_dapo_with_shaping_and_timeouts(worker, config):
    responses = ["Answer: 3", "Answer: 4", r"\boxed{\frac{6}{2}}", r"Answer: 9^{9^{9^{9}}}", "no answer"]
    batch = score_batch(responses, ["3"] * 5, config, response_lengths=[100, 16384, 18432, 20480, 5], worker=worker)
    assert batch.correct.tolist() == [True, False, True, False, False]
    np.testing.assert_array_equal(batch.base_scores, [1, -1, 1, -1, -1])
    np.testing.assert_array_equal(batch.overlong_penalties, [0, 0, -0.5, -1, 0])
    np.testing.assert_array_equal(batch.scores, [1, -1, 0.5, -2, -1])
    assert batch.scores.dtype == np.float32 and batch.num_timeouts == 1 and batch.num_errors == 0
    unshaped = score_batch(responses[:2], ["3", "3"], RewardConfig(overlong_buffer=None), response_lengths=[1, 10**6])
    np.testing.assert_array_equal(unshaped.scores, [1, -1])


def test_score_batch_argument_errors():
    with pytest.raises(ValueError, match="golds has 1"):
        score_batch(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="response_lengths must have shape"):
        score_batch(["a"], ["a"], response_lengths=[1, 2])
    with pytest.raises(TypeError, match="not a single str"):
        score_batch("abc", "abc")


# ---------------------------------------------------------------------------------------------
# overlong shaping (tokens)


def test_overlong_penalty_hand_computed():
    lengths = np.array([0, 100, 16383, 16384, 16385, 18432, 20480])
    expected = [0, 0, 0, 0, -1 / 4096, -0.5, -1.0]
    np.testing.assert_allclose(overlong_penalty(lengths, 20480, 4096, 1.0), expected, rtol=1e-6)
    np.testing.assert_allclose(overlong_penalty([6, 7, 8, 10, 12], 10, 4), [0, -0.25, -0.5, -1, -1.5])  # no clip
    np.testing.assert_allclose(overlong_penalty([10], 10, 4, penalty_factor=0.5), [-0.5])
    np.testing.assert_allclose(overlong_penalty([10], 10, 10), [-1.0])  # buffer == max length
    out = overlong_penalty(np.array([[8.0, 9.0]]), 10, 4)
    assert out.dtype == np.float32 and out.shape == (1, 2) and isinstance(out, np.ndarray)


def test_overlong_penalty_jax_and_jit():
    lengths = jnp.array([6, 7, 8, 10], jnp.int32)
    eager = overlong_penalty(lengths, 10, 4)
    jitted = jax.jit(lambda n: overlong_penalty(n, 10, 4))(lengths)
    assert isinstance(eager, jax.Array) and eager.dtype == jnp.float32
    np.testing.assert_allclose(jitted, [0, -0.25, -0.5, -1])
    np.testing.assert_allclose(eager, jitted)


@pytest.mark.parametrize(
    "args, match",
    [
        ((20480, 20481, 1.0), "buffer_length"),
        ((20480, 0, 1.0), "buffer_length"),
        ((20480, 4096.0, 1.0), "buffer_length"),
        ((0, 1, 1.0), "max_response_length"),
        ((-5, 1, 1.0), "max_response_length"),
        ((20480, 4096, -1.0), "penalty_factor"),
        ((20480, 4096, float("nan")), "penalty_factor"),
    ],
)
def test_overlong_penalty_validation(args, match):
    with pytest.raises(ValueError, match=match):
        overlong_penalty(np.array([1]), *args)


def test_overlong_penalty_length_validation():
    with pytest.raises(ValueError, match="response_lengths must be >= 0"):
        overlong_penalty([-1, 3], 10, 4)
    with pytest.raises(TypeError, match="token counts"):
        overlong_penalty(["a"], 10, 4)


def test_shaped_scores():
    correct = np.array([True, False, True, False])
    lengths = np.array([5, 5, 9, 10])
    np.testing.assert_allclose(
        shaped_scores(correct, lengths, max_response_length=10, buffer_length=4), [1, -1, 0.25, -2]
    )
    np.testing.assert_allclose(shaped_scores(correct, lengths, max_response_length=10, buffer_length=None), [1, -1, 1, -1])
    as_jax = shaped_scores(jnp.asarray(correct), jnp.asarray(lengths), max_response_length=10, buffer_length=4)
    assert isinstance(as_jax, jax.Array)
    np.testing.assert_allclose(as_jax, [1, -1, 0.25, -2])
    with pytest.raises(ValueError, match="they must match"):
        shaped_scores(correct, lengths[:2], max_response_length=10, buffer_length=4)
    with pytest.raises(TypeError, match="correct must be a bool"):
        shaped_scores(np.array([0.5]), np.array([1]), max_response_length=10, buffer_length=4)


# ---------------------------------------------------------------------------------------------
# config


def test_reward_config_defaults_and_official():
    cfg = RewardConfig()
    assert (cfg.answer_window_chars, cfg.max_response_length, cfg.overlong_buffer, cfg.overlong_factor) == (
        300,
        20480,
        4096,
        1.0,
    )
    official = RewardConfig.official_dapo(verify_timeout_s=2.0)
    assert not official.boxed_fallback and not official.use_math_verify and official.verify_timeout_s == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.overlong_buffer = 1


@pytest.mark.parametrize(
    "field, value",
    [
        ("answer_window_chars", 0),
        ("verify_timeout_s", 0.0),
        ("verify_timeout_s", float("nan")),
        ("max_answer_chars", -3),
        ("max_response_length", 0),
        ("overlong_buffer", 30000),
        ("overlong_buffer", 0),
        ("overlong_factor", -0.1),
        ("boxed_fallback", "yes"),
        ("use_math_verify", 1),
    ],
)
def test_reward_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        RewardConfig(**{field: value})


def test_a_batch_of_slow_answers_stays_within_its_budget():
    """Six answers that each keep math-verify busy up to its time bound: the batch's budget caps the
    total; past it the cheap rules alone decide and the rest are counted (issue 24, item 6)."""
    import time

    from fipo_jax.rewards import RewardConfig, score_batch
    from fipo_jax.rewards.verify import Verdict

    class SlowWorker:
        asked = []

        def check(self, gold, predicted, timeout_s):
            self.asked.append(timeout_s)
            time.sleep(min(timeout_s, 1.0))
            return Verdict(False, "math_verify", timed_out=timeout_s < 1.0)

    worker = SlowWorker()
    responses = [f"Answer: $9^{{9^{{9^{{{k}}}}}}}$" for k in range(6)] + ["Answer: 3"]
    config = RewardConfig(verify_timeout_s=2.0, batch_budget_s=1.5, overlong_buffer=None)
    start = time.monotonic()
    batch = score_batch(responses, ["7"] * 6 + ["3"], config, worker=worker)
    assert time.monotonic() - start < 2.5 and batch.seconds < 2.5
    # Each check is bounded by what is left of the budget: 1.5 s, then what the first left (≤ 0.5 s).
    assert len(worker.asked) == 2 and 1.4 < worker.asked[0] <= 1.5 and worker.asked[1] <= 0.5 + 1e-6
    assert batch.num_over_budget == 4 and [r.over_budget for r in batch.results] == [False] * 2 + [True] * 4 + [False]
    assert batch.correct.tolist() == [False] * 6 + [True]  # past the budget a plain match still scores
