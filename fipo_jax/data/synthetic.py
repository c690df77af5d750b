"""A synthetic reasoning task where careful step-by-step work beats guessing.

Problem: a chain of digit operations evaluated left to right, modulo 10, e.g.
``Q: 3+5*2+7=`` means ((3 + 5) · 2 + 7) mod 10 = 3. Two styles of answer:

    direct        Answer: 3
    step-by-step  3+5=8
                  8*2=6
                  6+7=3
                  Answer: 3

Mixing + and · makes the result order-dependent, so it cannot be read off an average of
the digits (a plain sum can: small transformers learn that in one shot). Each written step
is a single lookup in a 10 × 10 table, which a small model learns almost perfectly; the
whole chain "in its head" it mostly cannot. A policy trained on a mix of both styles is
therefore right far more often when it writes the longer chain, and RL with a verifiable
reward should move it toward longer, correct chains — the effect FIPO reports at 32B, in
miniature. The texts use the DAPO answer format, so the real reward code scores them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fipo_jax.core import _checks

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
_SYMBOLS = (PAD, BOS, EOS, "Q:", "Answer:", "+", "*", "=", " ", "\n") + tuple("0123456789")


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


_OPS = {"+": lambda a, b: a + b, "*": lambda a, b: a * b}


@dataclasses.dataclass(frozen=True)
class ChainTask:
    """``n_terms`` digits joined by ops from ``ops``, evaluated left to right mod ``modulus``."""

    n_terms: int = 5
    ops: str = "+*"
    modulus: int = 10

    def __post_init__(self):
        _checks.check_int("n_terms", self.n_terms, minimum=2)
        _checks.require(bool(self.ops) and all(op in _OPS for op in self.ops),
                        f"ops must be a non-empty string over {sorted(_OPS)}, got {self.ops!r}")
        _checks.check_int("modulus (answers are single digits)", self.modulus, minimum=2, maximum=10)

    def sample(self, rng: np.random.Generator, n: int) -> list[tuple[tuple[int, ...], str]]:
        """n problems as (digits, op string)."""
        digits = rng.integers(0, 10, size=(n, self.n_terms))
        ops = rng.integers(0, len(self.ops), size=(n, self.n_terms - 1))
        return [(tuple(int(d) for d in ds), "".join(self.ops[o] for o in os_)) for ds, os_ in zip(digits, ops)]

    @staticmethod
    def prompt(problem) -> str:
        digits, ops = problem
        return "Q: " + "".join(f"{d}{op}" for d, op in zip(digits, ops)) + f"{digits[-1]}="

    def partial_results(self, problem) -> list[int]:
        digits, ops = problem
        values = [digits[0] % self.modulus]
        for d, op in zip(digits[1:], ops):
            values.append(_OPS[op](values[-1], d) % self.modulus)
        return values

    def answer(self, problem) -> str:
        return str(self.partial_results(problem)[-1])

    def direct_solution(self, problem) -> str:
        return "Answer: " + self.answer(problem)

    def step_solution(self, problem) -> str:
        """One line per operation with its result, then the answer line."""
        digits, ops = problem
        values = self.partial_results(problem)
        lines = [f"{values[i]}{op}{digits[i + 1]}={values[i + 1]}" for i, op in enumerate(ops)]
        return "\n".join(lines + [f"Answer: {values[-1]}"])

    def max_response_tokens(self) -> int:
        """Tokens of a step-by-step solution (all the same length), plus EOS."""
        problem = ((0,) * self.n_terms, self.ops[0] * (self.n_terms - 1))
        return len(CharTokenizer().encode(self.step_solution(problem))) + 1

    def prompt_tokens(self) -> int:
        """Tokens of a prompt (all the same length), plus BOS."""
        problem = ((0,) * self.n_terms, self.ops[0] * (self.n_terms - 1))
        return len(CharTokenizer().encode(self.prompt(problem))) + 1

    def demonstrations(self, rng: np.random.Generator, n: int, step_fraction: float) -> list[tuple[str, str]]:
        """(prompt, solution) pairs; a ``step_fraction`` share is worked step by step."""
        _checks.require(0.0 <= step_fraction <= 1.0, f"step_fraction must be in [0, 1], got {step_fraction}")
        steps = rng.random(n) < step_fraction
        return [(self.prompt(p), self.step_solution(p) if s else self.direct_solution(p))
                for p, s in zip(self.sample(rng, n), steps)]

    def problems(self, rng: np.random.Generator, n: int) -> list[dict]:
        """Prompt records: {"prompt": str, "ground_truth": str}."""
        return [{"prompt": self.prompt(p), "ground_truth": self.answer(p)} for p in self.sample(rng, n)]
