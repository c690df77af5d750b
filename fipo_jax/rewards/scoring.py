"""The DAPO math reward of one response and of a batch (verl ``math_dapo.compute_score`` + ``DAPORewardManager``).

    score(y) = +1 if extract(y) ≡ gold else −1          (``correct`` is the official ``acc``)
    shaped(y) = score(y) + min(−(|y|_tokens − (L_max − L_buf)) / L_buf · factor, 0)

Failures never escape a sample: an exception while scoring one response is recorded in its
`RewardResult.error`, the response is scored as wrong, and `score_batch` counts errors and timeouts.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Sequence

import numpy as np

from fipo_jax import _checks
from fipo_jax.rewards.config import RewardConfig
from fipo_jax.rewards.extract import extract_answer, extract_last_boxed
from fipo_jax.rewards.normalize import normalize_answer
from fipo_jax.rewards.shaping import overlong_penalty
from fipo_jax.rewards.verify import MathVerifyWorker, check_equivalence

__all__ = ["BatchRewards", "RewardResult", "dapo_math_score", "gold_answer", "score_batch"]

CORRECT_SCORE = 1.0
INCORRECT_SCORE = -1.0


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """Reward of one response.

    Attributes:
      score: +1.0 if correct else −1.0 (before overlong shaping).
      correct: the official ``acc``; dynamic sampling keeps groups whose ``correct`` varies.
      extracted: the normalised predicted answer (official ``pred``); None if none was found.
      error: why scoring failed (exception text), else None. A failed sample is scored wrong.
      timed_out: math-verify hit its time bound on this sample (scored wrong).
      over_budget: the batch's scoring budget was spent before this sample; the string and decimal
        rules found no match and math-verify was not asked (scored wrong).
    """

    score: float
    correct: bool
    extracted: str | None
    error: str | None = None
    timed_out: bool = False
    over_budget: bool = False


def gold_answer(gold: str | numbers.Real) -> str:
    """The reference answer as text: finite numbers are formatted, a ``\\boxed{}`` gold is unwrapped.

    Raises TypeError for anything but a str or a real number (bools included), ValueError for a
    NaN/infinite number and for a gold whose last ``\\boxed``/``\\fbox`` is empty or unbalanced.

    >>> gold_answer(42), gold_answer(r"The answer is \\boxed{\\frac{1}{2}}.")
    ('42', '\\\\frac{1}{2}')
    """
    _checks.require(isinstance(gold, str) or _checks.is_real(gold),
                    f"gold must be a str or a number, got {type(gold).__name__}", error=TypeError)
    _checks.require(isinstance(gold, str) or math.isfinite(gold), f"gold must be a finite number, got {gold!r}")
    text = gold if isinstance(gold, str) else str(gold)
    if "\\boxed" in text or "\\fbox" in text:
        text = extract_last_boxed(text, None)
        _checks.require(text is not None, f"gold {gold!r:.80} has an empty or unbalanced \\boxed{{}}")
    return text


def dapo_math_score(
    response_text: str,
    gold: str | numbers.Real,
    config: RewardConfig | None = None,
    *,
    worker: MathVerifyWorker | None = None,
) -> RewardResult:
    """DAPO reward of one decoded response: +1 if its final answer matches ``gold``, else −1.

    Extraction: ``Answer:`` line (else last ``\\boxed{}`` if ``config.boxed_fallback``) within the
    last ``config.answer_window_chars`` characters; comparison: `check_equivalence` (normalised
    string, exact decimals, then math-verify under ``config.verify_timeout_s``).
    Never raises for a bad sample (the error is returned in the result); raises TypeError only
    when ``config`` is not a `RewardConfig`.

    >>> dapo_math_score("... so the total is 12.\\nAnswer: 12", "12")
    RewardResult(score=1.0, correct=True, extracted='12', error=None, timed_out=False, over_budget=False)
    """
    config = RewardConfig() if config is None else config
    _checks.require(isinstance(config, RewardConfig), f"config must be a RewardConfig, got {type(config).__name__}",
                    error=TypeError)
    try:
        _checks.require(isinstance(response_text, str),
                        f"response_text must be a str, got {type(response_text).__name__}", error=TypeError)
        gold_text = gold_answer(gold)
        raw = extract_answer(response_text, config.answer_window_chars, config.boxed_fallback)
        if raw is None:
            return RewardResult(INCORRECT_SCORE, False, None)
        if len(raw) > config.max_answer_chars:  # rejected unparsed; keep a prefix for inspection
            return RewardResult(INCORRECT_SCORE, False, raw[: config.max_answer_chars])
        verdict = check_equivalence(
            gold_text,
            raw,
            timeout_s=config.verify_timeout_s,
            max_answer_chars=config.max_answer_chars,
            use_math_verify=config.use_math_verify,
            worker=worker,
        )
        score = CORRECT_SCORE if verdict.equal else INCORRECT_SCORE
        return RewardResult(score, verdict.equal, normalize_answer(raw), verdict.error, verdict.timed_out)
    except Exception as exc:
        return RewardResult(INCORRECT_SCORE, False, None, error=f"{type(exc).__name__}: {exc}")


@dataclasses.dataclass(frozen=True)
class BatchRewards:
    """Rewards of a batch of responses (all arrays ``[B]``, numpy, on the host).

    Attributes:
      results: one `RewardResult` per response.
      scores: ``base_scores + overlong_penalties`` (float32): the reward placed on the last token.
      base_scores: the reward function's score (±1 for `dapo_math_score`).
      overlong_penalties: ``min(−(len − (L_max − L_buf)) / L_buf · factor, 0)``; zeros when no
        lengths were given or ``config.overlong_buffer`` is None.
      correct: bool ``acc`` per response (dynamic sampling filters on this, not on ``scores``).
      num_errors: responses whose scoring raised or reported an error.
      num_timeouts: responses whose math-verify check ran out of time.
      num_over_budget: responses scored past ``config.batch_budget_s`` without math-verify's answer.
      seconds: the time scoring the batch took.
    """

    results: tuple[RewardResult, ...]
    scores: np.ndarray
    base_scores: np.ndarray
    overlong_penalties: np.ndarray
    correct: np.ndarray
    num_errors: int
    num_timeouts: int
    num_over_budget: int = 0
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.results)


def _as_result(value) -> RewardResult:
    """Accept a RewardResult, a bool (correctness) or a real score (correct iff > 0)."""
    if isinstance(value, RewardResult):
        result = value
    elif isinstance(value, (bool, np.bool_)):
        result = RewardResult(CORRECT_SCORE if value else INCORRECT_SCORE, bool(value), None)
    elif isinstance(value, numbers.Real):
        result = RewardResult(float(value), float(value) > 0, None)
    else:
        raise TypeError(f"score_fn must return a RewardResult, bool or float, got {type(value).__name__}")
    _checks.require(math.isfinite(result.score), f"score_fn returned a non-finite score {result.score!r}")
    return result


def score_batch(
    responses: Sequence[str],
    golds: Sequence[str | numbers.Real],
    config: RewardConfig | None = None,
    *,
    response_lengths=None,
    score_fn: Callable[[str, str | numbers.Real], RewardResult | bool | float] | None = None,
    worker: MathVerifyWorker | None = None,
) -> BatchRewards:
    """Score every (response, gold) pair; add the overlong penalty when token lengths are given.

    Args:
      responses: ``B`` decoded response texts.
      golds: ``B`` reference answers (repeat each prompt's gold for each of its G samples).
      config: reward settings; default `RewardConfig()`.
      response_lengths: optional ``[B]`` valid response TOKEN counts for overlong shaping.
      score_fn: ``(response, gold) -> RewardResult | bool | float``; default `dapo_math_score`
        with ``config``. Whatever it raises (an ``Exception``) is caught per sample, reported in
        ``results[i].error`` and counted in ``num_errors``, and the sample is scored −1.
      worker: math-verify process for the default ``score_fn``.

    The default ``score_fn`` keeps the whole batch within ``config.batch_budget_s``: each
    math-verify check is bounded by the time left, and once none is left the remaining answers are
    compared by the string and decimal rules only (`RewardResult.over_budget`, ``num_over_budget``).

    >>> batch = score_batch(["Answer: 3", "Answer: 4"], ["3", "3"], response_lengths=[10, 18432])
    >>> batch.scores.tolist(), batch.correct.tolist(), batch.num_errors
    ([1.0, -1.5], [True, False], 0)
    """
    config = RewardConfig() if config is None else config
    _checks.require(isinstance(config, RewardConfig), f"config must be a RewardConfig, got {type(config).__name__}",
                    error=TypeError)
    _checks.require(not isinstance(responses, str) and not isinstance(golds, str),
                    "responses and golds must be sequences of items, not a single str", error=TypeError)
    responses, golds = list(responses), list(golds)
    _checks.require(len(responses) == len(golds),
                    f"responses has {len(responses)} items but golds has {len(golds)}; they must match")
    if response_lengths is not None:
        lengths = np.asarray(response_lengths)
        _checks.require(lengths.shape == (len(responses),), f"response_lengths must have shape ({len(responses)},) "
                                                            f"to match responses, got {lengths.shape}")
    start = time.monotonic()
    results = _score_each(responses, golds, config, score_fn, worker)
    batch = len(results)
    base = np.asarray([r.score for r in results], np.float32).reshape(batch)
    correct = np.asarray([r.correct for r in results], bool).reshape(batch)
    penalties = np.zeros(batch, np.float32)
    if response_lengths is not None and config.overlong_buffer is not None:
        penalties = overlong_penalty(lengths, config.max_response_length, config.overlong_buffer, config.overlong_factor)
    return BatchRewards(
        results=tuple(results),
        scores=(base + penalties).astype(np.float32),
        base_scores=base,
        overlong_penalties=penalties,
        correct=correct,
        num_errors=sum(r.error is not None for r in results),
        num_timeouts=sum(r.timed_out for r in results),
        num_over_budget=sum(r.over_budget for r in results),
        seconds=time.monotonic() - start,
    )


def _score_each(responses, golds, config: RewardConfig, score_fn, worker) -> list[RewardResult]:
    """One `RewardResult` per pair; a raising ``score_fn`` scores −1 with the error kept. The
    default scorer runs within ``config.batch_budget_s`` (see `score_batch`)."""
    budgeted = score_fn is None and config.batch_budget_s is not None
    deadline = time.monotonic() + (config.batch_budget_s or 0.0)
    results = []
    for response, gold in zip(responses, golds):
        try:
            if budgeted:
                result = _budgeted_score(response, gold, config, worker, deadline - time.monotonic())
            elif score_fn is None:
                result = dapo_math_score(response, gold, config, worker=worker)
            else:
                result = _as_result(score_fn(response, gold))
        except Exception as exc:
            result = RewardResult(INCORRECT_SCORE, False, None, error=f"{type(exc).__name__}: {exc}")
        results.append(result)
    return results


def _budgeted_score(response: str, gold, config: RewardConfig, worker, remaining_s: float) -> RewardResult:
    """`dapo_math_score` with math-verify bounded by ``remaining_s``; with none left, the string and
    decimal rules only, and an answer only math-verify might have accepted is marked over budget."""
    if remaining_s <= 0:
        quick = dapo_math_score(response, gold, dataclasses.replace(config, use_math_verify=False))
        unasked = not quick.correct and quick.extracted is not None and config.use_math_verify
        return dataclasses.replace(quick, over_budget=True) if unasked else quick
    bounded = dataclasses.replace(config, verify_timeout_s=min(config.verify_timeout_s, remaining_s))
    return dapo_math_score(response, gold, bounded, worker=worker)
