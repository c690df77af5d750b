"""A synthetic reasoning task where careful step-by-step work beats guessing.

Problem: a chain of digit operations evaluated left to right, modulo 10, e.g.
``Q: 3+5*2+7=`` means ((3 + 5) · 2 + 7) mod 10 = 3. Answers range from direct to worked:

    direct        Answer: 3
    step-by-step  3+5=8
                  8*2=6
                  6+7=3
                  Answer: 3

and a partial solution works the first few operations, then states the answer. Each written step
is a single lookup in a 10 × 10 table, which a small model learns almost perfectly; the whole
chain "in its head" it mostly cannot. With ``invertible=True`` (the testbed, `cpu_default`) × takes
only 1, 3, 7, 9, so every step is a bijection and the answer is uniform: no shortcut (the last
operation, the most common answer) beats 1/10, and only a response that works (nearly) every step
pays — RL with a verifiable reward can gain only by lengthening the chain, the effect FIPO reports
at 32B, in miniature. With × by any digit the answers are skewed (a guess from the last operation
is right a third of the time on 18 terms). The texts use the DAPO answer format, so the real reward
code scores them.
"""

from __future__ import annotations

import dataclasses
import math

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


WORKED_FORMATS = ("lines", "values")
_OPS = {"+": lambda a, b: a + b, "*": lambda a, b: a * b}


@dataclasses.dataclass(frozen=True)
class ChainTask:
    """``n_terms`` digits joined by ops from ``ops``, evaluated left to right mod ``modulus``.

    ``invertible=True`` multiplies only by units of the modulus (1, 3, 7, 9 mod 10), so every step
    is a bijection of the running value: with a uniform first digit the answer is uniform, and no
    guess from the last operation (or any other shortcut that skips the chain) beats 1/modulus.
    """

    n_terms: int = 5
    ops: str = "+*"
    modulus: int = 10
    invertible: bool = False
    worked: str = "lines"

    def __post_init__(self):
        _checks.check_int("n_terms", self.n_terms, minimum=2)
        _checks.require(bool(self.ops) and all(op in _OPS for op in self.ops),
                        f"ops must be a non-empty string over {sorted(_OPS)}, got {self.ops!r}")
        _checks.check_int("modulus (answers are single digits)", self.modulus, minimum=2, maximum=10)
        _checks.check_bool("invertible", self.invertible)
        _checks.check_choice("worked", self.worked, WORKED_FORMATS)

    @classmethod
    def of(cls, data) -> "ChainTask":
        """The task a `DataSpec` (anything with ``n_terms``, ``ops``, ``invertible``) names."""
        return cls(n_terms=data.n_terms, ops=data.ops, invertible=data.invertible, worked=data.worked)

    @property
    def n_ops(self) -> int:
        return self.n_terms - 1

    def operands(self, op: str) -> tuple[int, ...]:
        """The digits ``op`` may take: all ten, or the modulus's units for × in an invertible chain."""
        if op == "*" and self.invertible:
            return tuple(d for d in range(10) if math.gcd(d, self.modulus) == 1)
        return tuple(range(10))

    def sample(self, rng: np.random.Generator, n: int) -> list[tuple[tuple[int, ...], str]]:
        """n problems as (digits, op string); an invertible chain's × digits drawn among the units."""
        digits = rng.integers(0, 10, size=(n, self.n_terms))
        ops = rng.integers(0, len(self.ops), size=(n, self.n_ops))
        if self.invertible and "*" in self.ops:
            units = np.asarray(self.operands("*"))
            times = ops == self.ops.index("*")
            digits[:, 1:] = np.where(times, units[rng.integers(0, len(units), size=(n, self.n_ops))], digits[:, 1:])
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

    def solution(self, problem, steps: int | None = None) -> str:
        """The first ``steps`` operations worked (None: all), then the answer line; 0 steps is
        `direct_solution`. ``worked="lines"`` writes each as ``3+5=8``; ``"values"`` writes only the
        running values, space-separated (``8 6 3``): one value per operand, so the value that uses
        operand i sits a fixed distance after it, whatever i is."""
        steps = self.n_ops if steps is None else steps
        _checks.check_int("steps", steps, minimum=0, maximum=self.n_ops)
        digits, ops = problem
        values = self.partial_results(problem)
        if self.worked == "values":
            work = [" ".join(str(v) for v in values[1 : steps + 1])] if steps else []
        else:
            work = [f"{values[i]}{ops[i]}{digits[i + 1]}={values[i + 1]}" for i in range(steps)]
        return "\n".join(work + [f"Answer: {values[-1]}"])

    def step_solution(self, problem) -> str:
        """Every operation worked, then the answer line."""
        return self.solution(problem)

    def max_response_tokens(self) -> int:
        """Tokens of a step-by-step solution (the longest: all the same length), plus EOS."""
        problem = ((0,) * self.n_terms, self.ops[0] * self.n_ops)
        return len(CharTokenizer().encode(self.step_solution(problem))) + 1

    def prompt_tokens(self) -> int:
        """Tokens of a prompt (all the same length), plus BOS."""
        problem = ((0,) * self.n_terms, self.ops[0] * self.n_ops)
        return len(CharTokenizer().encode(self.prompt(problem))) + 1

    def demonstrations(self, rng: np.random.Generator, n: int, step_fraction: float,
                       partial: bool = False) -> list[tuple[str, str]]:
        """(prompt, solution) pairs; a ``step_fraction`` share is worked, the rest answered directly.
        ``partial``: a worked solution stops after a uniformly drawn 1 … all operations and then
        states the answer, so the demonstrations span every length between direct and complete."""
        _checks.require(0.0 <= step_fraction <= 1.0, f"step_fraction must be in [0, 1], got {step_fraction}")
        worked = rng.random(n) < step_fraction
        steps = rng.integers(1, self.n_ops + 1, size=n) if partial else np.full(n, self.n_ops)
        return [(self.prompt(p), self.solution(p, int(k)) if w else self.direct_solution(p))
                for p, w, k in zip(self.sample(rng, n), worked, steps)]

    def problems(self, rng: np.random.Generator, n: int) -> list[dict]:
        """Prompt records: {"prompt": str, "ground_truth": str}."""
        return [{"prompt": self.prompt(p), "ground_truth": self.answer(p)} for p in self.sample(rng, n)]
