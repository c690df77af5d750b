"""A synthetic reasoning task where careful step-by-step work beats guessing.

Problem: the sum of ``n_terms`` digits, e.g. ``Q: 3+5+2+7=``. Two styles of answer:

    direct        Answer: 17
    step-by-step  3+5=8
                  8+2=10
                  10+7=17
                  Answer: 17

A small transformer learns every single step of the chain almost perfectly but cannot add
five digits "in its head" in one token, so a policy trained on a mix of both styles is
right far more often when it writes the longer chain. RL with a verifiable reward should
therefore move it toward longer, correct chains — the effect FIPO reports at 32B, in
miniature. The texts use the DAPO answer format, so the real reward code scores them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
_SYMBOLS = (PAD, BOS, EOS, "Q:", "Answer:", "+", "=", " ", "\n") + tuple("0123456789")


class CharTokenizer:
    """The task's tiny vocabulary (digits, operators, two words, specials).

    Mirrors the parts of a Hugging Face tokenizer the trainer uses: ``encode``,
    ``decode``, ``pad_token_id``, ``eos_token_id``, ``bos_token_id``, ``vocab_size``.
    """

    def __init__(self):
        self.tokens = _SYMBOLS
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = (self.ids[t] for t in (PAD, BOS, EOS))
        self._words = sorted((t for t in self.tokens if len(t) > 1 and not t.startswith("<")), key=len, reverse=True)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Greedy longest match over the vocabulary; unknown characters are an error."""
        out, i = [], 0
        while i < len(text):
            word = next((w for w in self._words if text.startswith(w, i)), None)
            if word is None:
                if text[i] not in self.ids:
                    raise ValueError(f"character {text[i]!r} at position {i} is not in the task vocabulary")
                word = text[i]
            out.append(self.ids[word])
            i += len(word)
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        specials = {self.pad_token_id, self.bos_token_id, self.eos_token_id}
        return "".join(self.tokens[int(i)] for i in ids if not (skip_special_tokens and int(i) in specials))


@dataclasses.dataclass(frozen=True)
class DigitSumTask:
    """Sums of ``n_terms`` digits in [0, ``max_digit``]."""

    n_terms: int = 5
    max_digit: int = 9

    def __post_init__(self):
        if not (isinstance(self.n_terms, int) and self.n_terms >= 2):
            raise ValueError(f"n_terms must be an int >= 2, got {self.n_terms!r}")
        if not (isinstance(self.max_digit, int) and 1 <= self.max_digit <= 9):
            raise ValueError(f"max_digit must be an int in [1, 9], got {self.max_digit!r}")

    def sample_terms(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(0, self.max_digit + 1, size=(n, self.n_terms))

    @staticmethod
    def prompt(terms) -> str:
        return "Q: " + "+".join(str(int(t)) for t in terms) + "="

    @staticmethod
    def answer(terms) -> str:
        return str(int(np.sum(terms)))

    @staticmethod
    def direct_solution(terms) -> str:
        return "Answer: " + str(int(np.sum(terms)))

    @staticmethod
    def step_solution(terms) -> str:
        """One line per partial sum, then the answer line."""
        lines, total = [], int(terms[0])
        for t in terms[1:]:
            lines.append(f"{total}+{int(t)}={total + int(t)}")
            total += int(t)
        return "\n".join(lines + [f"Answer: {total}"])

    def max_response_tokens(self) -> int:
        """Length of the longest step-by-step solution in tokens (plus EOS)."""
        worst = np.full(self.n_terms, self.max_digit)
        return len(CharTokenizer().encode(self.step_solution(worst))) + 1

    def demonstrations(self, rng: np.random.Generator, n: int, step_fraction: float) -> list[tuple[str, str]]:
        """(prompt, solution) pairs; a ``step_fraction`` share is worked step by step."""
        if not 0.0 <= step_fraction <= 1.0:
            raise ValueError(f"step_fraction must be in [0, 1], got {step_fraction}")
        terms = self.sample_terms(rng, n)
        steps = rng.random(n) < step_fraction
        return [(self.prompt(t), self.step_solution(t) if s else self.direct_solution(t)) for t, s in zip(terms, steps)]

    def problems(self, rng: np.random.Generator, n: int) -> list[dict]:
        """Prompt records in the trainer's format: {"prompt": str, "ground_truth": str}."""
        return [{"prompt": self.prompt(t), "ground_truth": self.answer(t)} for t in self.sample_terms(rng, n)]
