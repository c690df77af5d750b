"""`RewardConfig`: every knob of the DAPO math reward, validated once at construction."""

from __future__ import annotations

import dataclasses

from fipo_jax.core import _checks
from fipo_jax.rewards.extract import DEFAULT_ANSWER_WINDOW_CHARS
from fipo_jax.rewards.shaping import validate_overlong_args
from fipo_jax.rewards.verify import DEFAULT_MAX_ANSWER_CHARS, DEFAULT_VERIFY_TIMEOUT_S

__all__ = ["RewardConfig"]


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """DAPO math reward settings (official 32B recipe values by default, plus two extensions).

    Attributes:
      answer_window_chars: only the last this-many characters of a response are searched for the
        answer (official: 300). None searches the whole response.
      boxed_fallback: with no ``Answer:`` line, use the last ``\\boxed{}`` (extension; official: off).
      use_math_verify: when normalised strings differ, ask math-verify (extension; official: off,
        string match only).
      verify_timeout_s: hard time bound of one math-verify check, seconds.
      max_answer_chars: extracted answers longer than this are scored wrong without parsing; a gold
        answer longer than this is never normalised either (the sample is scored wrong, with an error).
      max_response_length: L_max, generation limit in tokens (official: 20480).
      overlong_buffer: L_buf in tokens (official: 4096); None disables overlong shaping.
      overlong_factor: penalty at L_max tokens is ``−overlong_factor`` (official: 1.0); at most
        `shaping.MAX_OVERLONG_FACTOR` (2^20: larger ones overflow or drown the ±1 in float32).
      batch_budget_s: seconds `score_batch` may spend on one batch; past them the remaining answers
        are compared by the string and decimal rules only (math-verify is not asked: an answer only
        it would accept scores wrong, counted as over budget). A custom ``score_fn`` is bounded too
        (it runs in a worker thread; what it has not scored in time is over budget). None: no bound.
    """

    answer_window_chars: int | None = DEFAULT_ANSWER_WINDOW_CHARS
    boxed_fallback: bool = True
    use_math_verify: bool = True
    verify_timeout_s: float = DEFAULT_VERIFY_TIMEOUT_S
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS
    max_response_length: int = 20480
    overlong_buffer: int | None = 4096
    overlong_factor: float = 1.0
    batch_budget_s: float | None = 600.0

    def __post_init__(self):
        _checks.check_int("answer_window_chars", self.answer_window_chars, minimum=1, allow_none=True)
        for name in ("boxed_fallback", "use_math_verify"):
            _checks.check_bool(name, getattr(self, name))
        _checks.check_number("verify_timeout_s (seconds)", self.verify_timeout_s, minimum=0, exclusive_minimum=True)
        _checks.check_int("max_answer_chars", self.max_answer_chars, minimum=1)
        _checks.check_number("batch_budget_s (seconds)", self.batch_budget_s, minimum=0, exclusive_minimum=True,
                             allow_none=True)
        _checks.check_int("max_response_length", self.max_response_length, minimum=1)
        if self.overlong_buffer is not None:
            try:
                validate_overlong_args(self.max_response_length, self.overlong_buffer, self.overlong_factor)
            except ValueError as exc:  # re-word with the config's field names
                message = (str(exc).replace("buffer_length", "overlong_buffer")
                           .replace("penalty_factor", "overlong_factor"))
                raise ValueError(message) from None

    @classmethod
    def official_dapo(cls, **overrides) -> RewardConfig:
        """The verl DAPO reward exactly: ``Answer:`` line only, normalised string match only."""
        return cls(**{"boxed_fallback": False, "use_math_verify": False, **overrides})
