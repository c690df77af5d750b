"""Rule-based math reward for RL (the verl DAPO reward, re-implemented) and overlong shaping.

Modules, one concern each:
  extract    — final answer from a response: last ``Answer:`` line, else last ``\\boxed{}``
  normalize  — Minerva/DAPO answer normalisation (plus Unicode → LaTeX)
  verify     — equivalence: normalised string, exact decimals, math-verify in a killable worker
  shaping    — overlong penalty in tokens and the shaped ±1 score
  config     — `RewardConfig`
  scoring    — `dapo_math_score` for one response, `score_batch` for a batch
  gold       — the answer a ground truth states, and the responses it must score correct

Typical use in the trainer::

    cfg = RewardConfig(max_response_length=20480, overlong_buffer=4096)
    batch = score_batch(texts, golds, cfg, response_lengths=mask.sum(-1))
    scores, acc = batch.scores, batch.correct   # shaped reward on the last token; acc for filtering
"""

from fipo_jax.rewards.config import RewardConfig
from fipo_jax.rewards.extract import (
    DEFAULT_ANSWER_WINDOW_CHARS,
    after_gsm8k_marker,
    extract_answer,
    extract_answer_line,
    extract_last_boxed,
    read_brace_group,
    tail_window,
)
from fipo_jax.rewards.gold import correct_responses, stated_answer
from fipo_jax.rewards.normalize import normalize_answer, unicode_to_latex
from fipo_jax.rewards.scoring import BatchRewards, RewardResult, dapo_math_score, gold_answer, score_batch
from fipo_jax.rewards.shaping import (
    MAX_OVERLONG_FACTOR,
    check_overlong_factor,
    overlong_penalty,
    shaped_scores,
    validate_overlong_args,
)
from fipo_jax.rewards.verify import (
    MathVerifyMissingError,
    MathVerifyWorker,
    Verdict,
    check_equivalence,
    default_worker,
    is_equivalent,
    numeric_equal,
)

__all__ = [
    "DEFAULT_ANSWER_WINDOW_CHARS",
    "MAX_OVERLONG_FACTOR",
    "BatchRewards",
    "MathVerifyMissingError",
    "MathVerifyWorker",
    "RewardConfig",
    "RewardResult",
    "Verdict",
    "after_gsm8k_marker",
    "check_equivalence",
    "check_overlong_factor",
    "correct_responses",
    "dapo_math_score",
    "default_worker",
    "extract_answer",
    "extract_answer_line",
    "extract_last_boxed",
    "gold_answer",
    "is_equivalent",
    "normalize_answer",
    "numeric_equal",
    "overlong_penalty",
    "read_brace_group",
    "score_batch",
    "shaped_scores",
    "stated_answer",
    "tail_window",
    "unicode_to_latex",
    "validate_overlong_args",
]
