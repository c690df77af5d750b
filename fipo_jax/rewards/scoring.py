"""The DAPO math reward of one response and of a batch (verl ``math_dapo.compute_score`` + ``DAPORewardManager``).

    score(y) = +1 if extract(y) ≡ gold else −1          (``correct`` is the official ``acc``)
    shaped(y) = score(y) + min(−(|y|_tokens − (L_max − L_buf)) / L_buf · factor, 0)

Failures never escape a sample: an exception while scoring one response is recorded in its
`RewardResult.error`, the response is scored as wrong, and `score_batch` counts errors and timeouts.
The one exception is `MathVerifyMissingError` (math-verify needed but not installed): an install
problem that would score every such correct answer wrong, so it is raised.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from fipo_jax.core import _checks
from fipo_jax.rewards.config import RewardConfig
from fipo_jax.rewards.extract import after_gsm8k_marker, extract_answer, extract_last_boxed
from fipo_jax.rewards.normalize import normalize_answer
from fipo_jax.rewards.shaping import overlong_penalty
from fipo_jax.rewards.verify import MathVerifyMissingError, MathVerifyWorker, check_equivalence

__all__ = ["BatchRewards", "RewardResult", "dapo_math_score", "gold_answer", "score_batch"]

CORRECT_SCORE = 1.0
INCORRECT_SCORE = -1.0
_FLOAT32_MAX = float(np.finfo(np.float32).max)


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
    """The reference answer as text: finite numbers are formatted, a GSM8K solution gives what follows
    its last ``####`` marker, and a ``\\boxed{}`` gold is unwrapped.

    Raises TypeError for anything but a str or a real number (bools included), ValueError for a
    NaN/infinite number, for a gold with nothing after its ``####`` marker and for a gold whose last
    ``\\boxed``/``\\fbox`` is empty or unbalanced.

    >>> gold_answer(42), gold_answer(r"The answer is \\boxed{\\frac{1}{2}}."), gold_answer("3 + 4 = 7\\n#### 7")
    ('42', '\\\\frac{1}{2}', '7')
    """
    _checks.require(isinstance(gold, str) or _checks.is_real(gold),
                    f"gold must be a str or a number, got {type(gold).__name__}", error=TypeError)
    _checks.require(isinstance(gold, str) or math.isfinite(gold), f"gold must be a finite number, got {gold!r}")
    text = gold if isinstance(gold, str) else str(gold)
    marked = after_gsm8k_marker(text)
    if marked is not None:
        _checks.require(bool(marked), f"gold {gold!r:.80} has nothing after its GSM8K '####' marker")
        text = marked
    if "\\boxed" in text or "\\fbox" in text:
        boxed = extract_last_boxed(text, None)
        _checks.require(boxed is not None, f"gold {gold!r:.80} has an empty or unbalanced \\boxed{{}}")
        assert boxed is not None  # for the type checker: require raised otherwise
        text = boxed
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
    when ``config`` is not a `RewardConfig`, and `MathVerifyMissingError` when math-verify must
    judge but is not installed.

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
    except MathVerifyMissingError:  # an install problem, not this sample's: see the module docstring
        raise
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
      num_errors: responses whose scoring raised or reported an error (over-budget ones not included).
      num_timeouts: responses whose math-verify check ran out of time.
      num_over_budget: responses scored past ``config.batch_budget_s`` without math-verify's answer,
        or, with a custom ``score_fn``, not scored at all (their ``error`` names the budget).
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
    """Accept a RewardResult, a bool (correctness) or a real score (correct iff > 0). A score that
    is not finite, or does not fit float32 (the dtype of `BatchRewards.scores`), is refused: it
    would become ±inf there."""
    if isinstance(value, RewardResult):
        result = value
    elif isinstance(value, (bool, np.bool_)):
        result = RewardResult(CORRECT_SCORE if value else INCORRECT_SCORE, bool(value), None)
    elif isinstance(value, numbers.Real):
        result = RewardResult(float(value), float(value) > 0, None)
    else:
        raise TypeError(f"score_fn must return a RewardResult, bool or float, got {type(value).__name__}")
    _checks.require(math.isfinite(result.score), f"score_fn returned a non-finite score {result.score!r}")
    _checks.require(abs(result.score) <= _FLOAT32_MAX,
                    f"score_fn returned {result.score!r}, which does not fit float32 (|score| <= {_FLOAT32_MAX:.4g}): "
                    f"it would be ±inf in the batch's scores")
    return result


def _custom_result(score_fn, response: str, gold) -> RewardResult:
    """``score_fn(response, gold)`` as a `RewardResult`; what it raises scores −1 with the error kept
    (except `MathVerifyMissingError`, an install problem: see the module docstring)."""
    try:
        return _as_result(score_fn(response, gold))
    except MathVerifyMissingError:
        raise
    except Exception as exc:
        return RewardResult(INCORRECT_SCORE, False, None, error=f"{type(exc).__name__}: {exc}")


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
        ``results[i].error`` and counted in ``num_errors``, and the sample is scored −1; so is a
        score that is not finite or does not fit float32.
      worker: math-verify process for the default ``score_fn``.

    The whole batch is kept within ``config.batch_budget_s``. The default ``score_fn``: each
    math-verify check is bounded by the time left, and once none is left the remaining answers are
    compared by the string and decimal rules only (`RewardResult.over_budget`, ``num_over_budget``).
    A custom ``score_fn`` runs in a worker thread (`_custom_within_budget`); the answers it has not
    scored when the budget is spent are scored −1, over budget, with an error naming the budget.
    With ``batch_budget_s=None`` it runs in the calling thread, unbounded (for a function that must:
    e.g. one that uses ``signal``, which works only in the main thread).

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
        penalties = overlong_penalty(lengths, config.max_response_length, config.overlong_buffer,
                                     config.overlong_factor)
    return BatchRewards(
        results=tuple(results),
        scores=(base + penalties).astype(np.float32),
        base_scores=base,
        overlong_penalties=penalties,
        correct=correct,
        num_errors=sum(r.error is not None and not r.over_budget for r in results),
        num_timeouts=sum(r.timed_out for r in results),
        num_over_budget=sum(r.over_budget for r in results),
        seconds=time.monotonic() - start,
    )


def _score_each(responses, golds, config: RewardConfig, score_fn, worker) -> list[RewardResult]:
    """One `RewardResult` per pair; a raising ``score_fn`` scores −1 with the error kept. Both the
    default scorer and a custom ``score_fn`` run within ``config.batch_budget_s`` (see `score_batch`)."""
    if score_fn is not None:
        pairs = list(zip(responses, golds))
        if config.batch_budget_s is None:
            return [_custom_result(score_fn, response, gold) for response, gold in pairs]
        return _custom_within_budget(score_fn, pairs, config.batch_budget_s)
    budgeted = config.batch_budget_s is not None
    deadline = time.monotonic() + (config.batch_budget_s or 0.0)
    results = []
    for response, gold in zip(responses, golds):
        try:
            if budgeted:
                result = _budgeted_score(response, gold, config, worker, deadline - time.monotonic())
            else:
                result = dapo_math_score(response, gold, config, worker=worker)
        except MathVerifyMissingError:
            raise
        except Exception as exc:
            result = RewardResult(INCORRECT_SCORE, False, None, error=f"{type(exc).__name__}: {exc}")
        results.append(result)
    return results


def _custom_within_budget(score_fn, pairs: list, budget_s: float) -> list[RewardResult]:
    """`_custom_result` of each pair, in order, by a daemon worker thread; what is not scored within
    ``budget_s`` seconds (the pair in progress and the rest) is over budget, scored −1.

    Why a thread: a Python call cannot be interrupted from outside, so a hung ``score_fn`` is left
    behind instead — a daemon thread, which never blocks interpreter exit; it stops after the call it
    is in (if that ever returns) and scores nothing more for this batch.
    """
    done: queue.Queue = queue.Queue()
    stop = threading.Event()

    def work():
        for response, gold in pairs:
            if stop.is_set():
                return
            try:
                done.put(_custom_result(score_fn, response, gold))
            except BaseException as exc:  # MathVerifyMissingError (or worse): raised in the caller
                done.put(exc)
                return

    threading.Thread(target=work, name="score-fn", daemon=True).start()
    deadline = time.monotonic() + budget_s
    results: list[RewardResult] = []
    while len(results) < len(pairs):
        try:
            item = done.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if isinstance(item, BaseException):
            raise item
        results.append(item)
    stop.set()
    late = RewardResult(INCORRECT_SCORE, False, None, over_budget=True,
                        error=f"score_fn ran past the batch's budget batch_budget_s={budget_s:g} s: not scored")
    return results + [late] * (len(pairs) - len(results))


def _budgeted_score(response: str, gold, config: RewardConfig, worker, remaining_s: float) -> RewardResult:
    """`dapo_math_score` with math-verify bounded by ``remaining_s``; with none left, the string and
    decimal rules only, and an answer only math-verify might have accepted is marked over budget."""
    if remaining_s <= 0:
        quick = dapo_math_score(response, gold, dataclasses.replace(config, use_math_verify=False))
        unasked = not quick.correct and quick.extracted is not None and config.use_math_verify
        return dataclasses.replace(quick, over_budget=True) if unasked else quick
    bounded = dataclasses.replace(config, verify_timeout_s=min(config.verify_timeout_s, remaining_s))
    return dapo_math_score(response, gold, bounded, worker=worker)
