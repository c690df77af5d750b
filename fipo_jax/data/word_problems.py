"""Generated arithmetic word problems for RL on a small pretrained base LM, prompted few-shot.

A problem is a short story about one person's collection of objects that changes in 1 to 3
arithmetic steps (+, −, ×, and exact ÷ only); the question asks how many objects they have at
the end. Every intermediate value and the answer are positive integers. E.g. (two steps)::

    Maria had 20 stickers and gave 8 to her friend. Then she buys 3 more stickers. How many
    stickers does Maria have now?

Its worked solution has one short sentence per step, each with the step's arithmetic written
``a <op> b = c`` (ops ``+ - * /``), then the DAPO answer line::

    Maria had 20 stickers and gave away 8, so she has 20 - 8 = 12 stickers.
    Then she buys 3 more, so she has 12 + 3 = 15 stickers.
    Answer: 15

The prompt is plain text (no chat template): ``few_shot`` solved examples, then the target::

    Question: <example 1>
    Solution: <worked solution 1>
    Answer: <a1>

    Question: <example 2>
    Solution: <worked solution 2>
    Answer: <a2>

    Question: <target question>
    Solution:

The model continues after ``Solution:`` (the response a demonstration gives is
``" " + solution``); the trainer stops generation at the next ``Question:`` (``rollout.stop``),
and the reward reads the text after the response's last ``Answer:``, so the examples' answer
lines in the prompt never count. The examples come from a fixed pool generated from a separate
seed (`WordProblemTask.few_shot_pool`); sampled problems never repeat a pool question, and each
prompt picks its examples from the pool by a stable hash of its question, so
`WordProblemTask.prompt` is a pure function of the problem.

Wording varies: 8–9 templates per operation for the opening sentence and 8 for each later
("Then …") step, 8 question sentences, 20 names, 20 kinds of object, 8 containers and 7
relatives, so a held-out split (`word_problem_splits`) is different text, not just different
numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import numpy as np

from fipo_jax.core import _checks
from fipo_jax.data.prompts import PromptRecord

__all__ = ["WordProblem", "WordProblemTask", "word_problem_splits", "OPS", "FEW_SHOT_SEED", "FEW_SHOT_POOL_SIZE"]

OPS = "+-*/"
FEW_SHOT_SEED = 271_828  # the few-shot pool's own seed, never used for train or eval problems
FEW_SHOT_POOL_SIZE = 16

_NAMES = (
    ("Tom", "m"), ("Ben", "m"), ("Ali", "m"), ("Ravi", "m"), ("Omar", "m"), ("Leo", "m"), ("Jack", "m"),
    ("Hugo", "m"), ("Kofi", "m"), ("Diego", "m"),
    ("Maria", "f"), ("Sofia", "f"), ("Emma", "f"), ("Lena", "f"), ("Grace", "f"), ("Nina", "f"),
    ("Aisha", "f"), ("Mei", "f"), ("Zoe", "f"), ("Hana", "f"),
)
_PRONOUNS = {
    "m": {"he": "he", "He": "He", "him": "him", "his": "his", "His": "His", "himself": "himself"},
    "f": {"he": "she", "He": "She", "him": "her", "his": "her", "His": "Her", "himself": "herself"},
}
_OBJECTS = (
    ("marble", "marbles"), ("sticker", "stickers"), ("stamp", "stamps"), ("shell", "shells"), ("card", "cards"),
    ("coin", "coins"), ("pencil", "pencils"), ("crayon", "crayons"), ("bead", "beads"), ("button", "buttons"),
    ("book", "books"), ("toy car", "toy cars"), ("balloon", "balloons"), ("feather", "feathers"),
    ("rock", "rocks"), ("comic", "comics"), ("eraser", "erasers"), ("ribbon", "ribbons"), ("apple", "apples"),
    ("cookie", "cookies"),
)
_CONTAINERS = (
    ("box", "boxes"), ("bag", "bags"), ("pack", "packs"), ("jar", "jars"), ("basket", "baskets"), ("tin", "tins"),
    ("tray", "trays"), ("bucket", "buckets"),
)
_RELATIVES = (
    ("sister", "sisters"), ("brother", "brothers"), ("friend", "friends"), ("cousin", "cousins"),
    ("neighbor", "neighbors"), ("classmate", "classmates"), ("teammate", "teammates"),
)

# Template fields: {name}; pronouns {he} {He} {him} {his} {His} {himself}; {obj} {objs}; {box} {boxes};
# {rel} {rels}; numbers {a} (opening value), {x} (value before a later step), {b} (the step's operand),
# {c} (its result); counted nouns {a_objs} {b_objs} {c_objs} ("1 apple", "7 apples") and {b_noun}, the
# noun in {b}'s number ("1 more apple", "2 more apples"); {b_rels}: the {b} - 1 relatives of
# "{b} children in all" ("her sister, 2 children in all").
# Each entry is (question sentence, solution sentence). The question sentences name no number but
# {a}/{x} and {b}; each solution sentence writes its step as "<a or x> <op> <b> = <c>".

# The opening sentence: the start value {a} and the first step with operand {b}.
_FIRST = {
    "+": (
        ("{name} has {a_objs} and buys {b} more {b_noun}.",
         "{name} has {a_objs} and buys {b} more, so {he} has {a} + {b} = {c_objs}."),
        ("{name} had {a_objs}. {His} {rel} gave {him} {b} more.",
         "{name} had {a_objs} and got {b} more, so {he} has {a} + {b} = {c_objs}."),
        ("{name} collects {a_objs} on Monday and {b_objs} on Tuesday.",
         "{name} collects {a} and then {b} more, so {he} has {a} + {b} = {c_objs}."),
        ("{name} starts the day with {a_objs}. At lunch {he} finds {b} more.",
         "{name} starts with {a_objs} and finds {b} more, so {he} has {a} + {b} = {c_objs}."),
        ("{name} owns {a_objs}. For {his} birthday {he} gets {b} more.",
         "{name} owns {a_objs} and gets {b} more, so {he} has {a} + {b} = {c_objs}."),
        ("{name} picks up {a_objs} in the park and later {b} more.",
         "{name} picks up {a} and then {b} more, so {he} has {a} + {b} = {c_objs}."),
        ("{name} has {a_objs}. {His} {rel} gives {him} {b_objs} as a present.",
         "{name} has {a_objs} and gets {b} more, so {he} has {a} + {b} = {c_objs}."),
        ("{name} wins {a_objs} in the first game and {b_objs} in the second game.",
         "{name} wins {a} and then {b}, so {he} has {a} + {b} = {c_objs}."),
        ("There are {a_objs} in {name}'s {box}. {He} puts in {b} more {b_noun}.",
         "The {box} had {a_objs} and gets {b} more, so {name} has {a} + {b} = {c_objs}."),
    ),
    "-": (
        ("{name} had {a_objs} and gave {b} to {his} {rel}.",
         "{name} had {a_objs} and gave away {b}, so {he} has {a} - {b} = {c_objs}."),
        ("{name} has {a_objs}. {He} loses {b} of them on the way home.",
         "{name} has {a_objs} and loses {b}, so {he} has {a} - {b} = {c_objs}."),
        ("{name} buys {a_objs} and uses {b} of them for a school project.",
         "{name} buys {a_objs} and uses {b}, so {he} has {a} - {b} = {c_objs} left."),
        ("{name} has {a_objs} and sells {b} of them.",
         "{name} has {a_objs} and sells {b}, so {he} has {a} - {b} = {c_objs}."),
        ("{name} has {a_objs}. {His} {rel} borrows {b} of them.",
         "{name} has {a_objs} and lends {b}, so {he} has {a} - {b} = {c_objs}."),
        ("{name} starts with {a_objs} and trades away {b} of them.",
         "{name} starts with {a_objs} and trades away {b}, so {he} has {a} - {b} = {c_objs}."),
        ("{name} had {a_objs}, but {b} of them got lost.",
         "{name} had {a_objs} and lost {b}, so {he} has {a} - {b} = {c_objs}."),
        ("{name} owns {a_objs}. {He} donates {b} of them to the school.",
         "{name} owns {a_objs} and donates {b}, so {he} has {a} - {b} = {c_objs}."),
        ("{name} brings {a_objs} to school and hands out {b} of them to classmates.",
         "{name} brings {a_objs} and hands out {b}, so {he} has {a} - {b} = {c_objs}."),
    ),
    "*": (  # {a} groups of {b}
        ("{name} buys {a} {boxes} of {objs}. Each {box} holds {b_objs}.",
         "{name} buys {a} {boxes} of {b}, so {he} has {a} * {b} = {c_objs}."),
        ("{name} has {a} {boxes} with {b_objs} in each {box}.",
         "{name} has {a} {boxes} of {b}, so {he} has {a} * {b} = {c_objs}."),
        ("A {box} holds {b_objs}. {name} fills {a} {boxes}.",
         "{name} fills {a} {boxes} with {b} each, so {he} has {a} * {b} = {c_objs}."),
        ("{name} starts with no {objs} and gets {b} every day for {a} days.",
         "{name} gets {b} a day for {a} days, so {he} has {a} * {b} = {c_objs}."),
        ("{name} has no {objs}. Each of {his} {a} {rels} gives {him} {b_objs}.",
         "{a} {rels} give {b} each, so {name} has {a} * {b} = {c_objs}."),
        ("{name} makes {a} piles of {objs} with {b_objs} in each pile.",
         "{name} makes {a} piles of {b}, so {he} has {a} * {b} = {c_objs}."),
        ("{name} buys {a} {boxes} of {objs}, and there are {b_objs} in every {box}.",
         "{name} buys {a} {boxes} with {b} each, so {he} has {a} * {b} = {c_objs}."),
        ("{name} wins {a} games and earns {b_objs} for each game.",
         "{name} wins {a} games with {b} each, so {he} has {a} * {b} = {c_objs}."),
        ("{name} lines up {a} rows of {objs} with {b_objs} in each row.",
         "{name} has {a} rows of {b}, so {he} has {a} * {b} = {c_objs}."),
    ),
    "/": (  # {a} shared equally {b} ways; the person keeps one share
        ("{a_objs} are shared equally among {b} children, and {name} is one of them.",
         "{a} {objs} shared by {b} children gives {name} {a} / {b} = {c_objs}."),
        ("{name} has {a_objs} and splits them into {b} equal piles. {He} keeps one pile and gives the rest away.",
         "{name} keeps one of {b} equal piles, so {he} has {a} / {b} = {c_objs}."),
        ("{name}'s teacher splits {a_objs} equally among {b} students, including {name}.",
         "{a} {objs} split among {b} students gives {name} {a} / {b} = {c_objs}."),
        ("{name} buys {a_objs} and packs them equally into {b} {boxes}. {He} keeps one {box} and gives the "
         "other {boxes} away.",
         "{name} keeps one of {b} equal {boxes}, so {he} has {a} / {b} = {c_objs}."),
        ("{name} has {a_objs}. {He} keeps one out of every {b} of them and gives the rest away.",
         "{name} keeps one in every {b}, so {he} has {a} / {b} = {c_objs}."),
        ("A bag of {a_objs} is divided equally among {b} children. {name} is one of the children.",
         "{a} {objs} divided among {b} children gives {name} {a} / {b} = {c_objs}."),
        ("{name} and {his} {b_rels}, {b} children in all, share {a_objs} equally.",
         "{a} {objs} shared by {b} children gives {name} {a} / {b} = {c_objs}."),
        ("{name} finds {a_objs} and sorts them into {b} equal groups. {He} keeps one group.",
         "{name} keeps one of {b} equal groups, so {he} has {a} / {b} = {c_objs}."),
    ),
}

# A later step: the previous value {x} and the operand {b}.
_CHAIN = {
    "+": (
        ("Then {he} buys {b} more {b_noun}.", "Then {he} buys {b} more, so {he} has {x} + {b} = {c_objs}."),
        ("After that, {his} {rel} gives {him} {b} more {b_noun}.",
         "{His} {rel} gives {him} {b} more, so {he} has {x} + {b} = {c_objs}."),
        ("Later {he} finds {b} more {b_noun}.", "{He} finds {b} more, so {he} has {x} + {b} = {c_objs}."),
        ("The next day {he} gets {b} more {b_noun}.", "{He} gets {b} more, so {he} has {x} + {b} = {c_objs}."),
        ("Then {he} wins {b} more {b_noun} in a game.", "{He} wins {b} more, so {he} has {x} + {b} = {c_objs}."),
        ("Then {he} picks up another {b_objs}.", "{He} picks up {b} more, so {he} has {x} + {b} = {c_objs}."),
        ("After lunch {he} collects {b} more {b_noun}.",
         "{He} collects {b} more, so {he} has {x} + {b} = {c_objs}."),
        ("Then {his} {rel} adds {b_objs} to {his} collection.",
         "{His} {rel} adds {b}, so {he} has {x} + {b} = {c_objs}."),
    ),
    "-": (
        ("Then {he} gives {b} of {his} {objs} to {his} {rel}.",
         "{He} gives {b} to {his} {rel}, so {he} has {x} - {b} = {c_objs}."),
        ("After that, {he} loses {b} of {his} {objs}.", "{He} loses {b}, so {he} has {x} - {b} = {c_objs}."),
        ("Then {he} sells {b} of {his} {objs}.", "{He} sells {b}, so {he} has {x} - {b} = {c_objs}."),
        ("Later {he} uses up {b} of {his} {objs}.", "{He} uses {b}, so {he} has {x} - {b} = {c_objs} left."),
        ("The next day {his} {rel} borrows {b} of {his} {objs}.",
         "{He} lends {b}, so {he} has {x} - {b} = {c_objs}."),
        ("Then {he} gives away {b} of {his} {objs}.", "{He} gives away {b}, so {he} has {x} - {b} = {c_objs}."),
        ("Then {he} drops {b} of {his} {objs} and cannot find them.",
         "{He} loses {b}, so {he} has {x} - {b} = {c_objs}."),
        ("After that, {he} trades away {b} of {his} {objs}.",
         "{He} trades away {b}, so {he} has {x} - {b} = {c_objs}."),
    ),
    "*": (
        ("Then the number of {objs} {he} has becomes {b} times as large.",
         "{His} {objs} become {b} times as many, so {he} has {x} * {b} = {c_objs}."),
        ("After a month, {he} has {b} times as many {objs} as before.",
         "{He} has {b} times as many, so {he} has {x} * {b} = {c_objs}."),
        ("Then {he} makes {his} collection of {objs} {b} times bigger.",
         "{His} collection is {b} times bigger, so {he} has {x} * {b} = {c_objs}."),
        ("By the end of the year, {his} collection of {objs} has grown to {b} times its size.",
         "{His} collection grows to {b} times its size, so {he} has {x} * {b} = {c_objs}."),
        ("Then {his} {rel} gives {him} enough {objs} to make {his} collection {b} times as big.",
         "{His} collection becomes {b} times as big, so {he} has {x} * {b} = {c_objs}."),
        ("Then {he} keeps collecting until {he} has {b} times as many {objs} as before.",
         "{He} ends with {b} times as many, so {he} has {x} * {b} = {c_objs}."),
        ("Then {he} trades each of {his} {objs} for {b} new ones.",
         "Each one becomes {b}, so {he} has {x} * {b} = {c_objs}."),
        ("Then every {obj} {he} has is swapped for {b} new ones.",
         "Each one becomes {b}, so {he} has {x} * {b} = {c_objs}."),
    ),
    "/": (
        ("Then {he} splits {his} {objs} into {b} equal piles and keeps one pile.",
         "{He} keeps one of {b} equal piles, so {he} has {x} / {b} = {c_objs}."),
        ("Then {he} shares {his} {objs} equally among {b} children, including {himself}.",
         "{b} children share them equally, so {he} has {x} / {b} = {c_objs}."),
        ("After that, {he} packs {his} {objs} equally into {b} {boxes} and keeps only one {box}.",
         "{He} keeps one of {b} equal {boxes}, so {he} has {x} / {b} = {c_objs}."),
        ("Then {he} keeps one out of every {b} of {his} {objs} and gives the rest away.",
         "{He} keeps one in every {b}, so {he} has {x} / {b} = {c_objs}."),
        ("Then {he} and {his} {b_rels}, {b} children in all, share {his} {objs} equally.",
         "{b} children share them equally, so {he} has {x} / {b} = {c_objs}."),
        ("Then {he} sorts {his} {objs} into {b} equal groups and gives away all groups but one.",
         "{He} keeps one of {b} equal groups, so {he} has {x} / {b} = {c_objs}."),
        ("Next, {he} puts {his} {objs} into {b} equal rows and keeps just one row.",
         "{He} keeps one of {b} equal rows, so {he} has {x} / {b} = {c_objs}."),
        ("Then {he} gives most of {his} {objs} away, keeping one in every {b}.",
         "{He} keeps one in every {b}, so {he} has {x} / {b} = {c_objs}."),
    ),
}

_QUESTIONS = (
    "How many {objs} does {name} have now?",
    "How many {objs} does {he} have now?",
    "How many {objs} does {name} have at the end?",
    "How many {objs} does {name} end up with?",
    "How many {objs} does {he} have in the end?",
    "What is the number of {objs} {name} has now?",
    "Now how many {objs} does {name} have?",
    "How many {objs} are in {name}'s collection now?",
)

_APPLY = {
    "+": lambda x, b: x + b,
    "-": lambda x, b: x - b,
    "*": lambda x, b: x * b,
    "/": lambda x, b: x // b,
}


def _count(n: int, noun: tuple[str, str]) -> str:
    return f"{n} {noun[0] if n == 1 else noun[1]}"


@dataclasses.dataclass(frozen=True)
class WordProblem:
    """One problem as structure; its question and solution texts are rendered from it.

    Attributes:
      start: the opening value (the first count, or the number of groups for an opening ``*``).
      steps: ``((op, operand), ...)``, 1 to 3 of them, applied left to right to ``start``.
      templates: per step, the index of its sentence template: ``_FIRST[op]`` for step 0,
        ``_CHAIN[op]`` after.
      question_template: index of the final question sentence.
      name, gender ("m" / "f"), obj (singular, plural), box (container), rel (relative): the wording.
    """

    start: int
    steps: tuple[tuple[str, int], ...]
    templates: tuple[int, ...]
    question_template: int
    name: str
    gender: str
    obj: tuple[str, str]
    box: tuple[str, str]
    rel: tuple[str, str]

    @property
    def values(self) -> list[int]:
        """``[start, after step 1, ...]``; the last is the answer. Division must be exact."""
        values = [self.start]
        for op, b in self.steps:
            if op == "/" and values[-1] % b:
                raise ValueError(f"inexact division {values[-1]} / {b} in {self}")
            values.append(_APPLY[op](values[-1], b))
        return values

    @property
    def answer(self) -> int:
        return self.values[-1]

    def _fields(self, i: int) -> dict[str, str | int]:
        values = self.values
        fields: dict[str, str | int] = dict(_PRONOUNS[self.gender], name=self.name, obj=self.obj[0], objs=self.obj[1],
                                            box=self.box[0], boxes=self.box[1], rel=self.rel[0], rels=self.rel[1])
        if i < len(self.steps):
            b, c = self.steps[i][1], values[i + 1]
            fields.update(a=values[0], x=values[i], b=b, c=c, a_objs=_count(values[0], self.obj),
                          b_objs=_count(b, self.obj), c_objs=_count(c, self.obj),
                          b_noun=self.obj[0] if b == 1 else self.obj[1],
                          b_rels=self.rel[0] if b == 2 else self.rel[1])
        return fields

    def _template(self, i: int) -> tuple[str, str]:
        table = _FIRST if i == 0 else _CHAIN
        return table[self.steps[i][0]][self.templates[i]]

    @property
    def question(self) -> str:
        """The story's sentences (one per step) and the question, on one line."""
        sentences = [self._template(i)[0].format(**self._fields(i)) for i in range(len(self.steps))]
        sentences.append(_QUESTIONS[self.question_template].format(**self._fields(len(self.steps))))
        return " ".join(_capitalize(s) for s in sentences)

    @property
    def solution(self) -> str:
        """One line per step (``... a <op> b = c ...``), then ``Answer: <answer>``."""
        lines = [_capitalize(self._template(i)[1].format(**self._fields(i))) for i in range(len(self.steps))]
        return "\n".join(lines + [f"Answer: {self.answer}"])


def _capitalize(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


@dataclasses.dataclass(frozen=True)
class WordProblemTask:
    """Arithmetic word problems of ``min_steps``..``max_steps`` steps over the ops in ``ops``.

    Attributes:
      min_steps, max_steps: the number of arithmetic steps, drawn uniformly (1 <= min <= max <= 3).
      max_operand: the largest number added or subtracted, the largest opening count of a ``+`` /
        ``-`` problem, and the largest group size (``b`` in "a boxes of b", the share in "a split b ways").
      max_factor: the largest multiplier, divisor or number of groups (>= 2).
      max_value: the largest value anywhere: products, dividends and every intermediate result
        (>= 2 · max(max_operand, max_factor), so every op can always open a problem).
      few_shot: worked examples in each prompt, from the fixed pool (0..8).
      ops: the operations used, a subset of ``"+-*/"``.
    Every value is a positive integer; a step whose op cannot keep it so (``-`` from 1, ``/`` of
    a value no divisor in [2, max_factor] divides, ``*`` past max_value) is never drawn.
    """

    min_steps: int = 1
    max_steps: int = 3
    max_operand: int = 20
    max_factor: int = 5
    max_value: int = 100
    few_shot: int = 2
    ops: str = OPS

    def __post_init__(self):
        _checks.check_int("min_steps", self.min_steps, minimum=1, maximum=3)
        _checks.check_int("max_steps", self.max_steps, minimum=1, maximum=3)
        _checks.require(self.max_steps >= self.min_steps, f"max_steps must be >= min_steps, got "
                        f"max_steps={self.max_steps} < min_steps={self.min_steps}")
        _checks.check_int("max_operand", self.max_operand, minimum=2)
        _checks.check_int("max_factor", self.max_factor, minimum=2)
        _checks.check_int("max_value", self.max_value, minimum=2 * max(self.max_operand, self.max_factor))
        _checks.check_int("few_shot", self.few_shot, minimum=0, maximum=FEW_SHOT_POOL_SIZE // 2)
        _checks.require(isinstance(self.ops, str) and bool(self.ops) and all(op in OPS for op in self.ops)
                        and len(set(self.ops)) == len(self.ops),
                        f"ops must be a non-empty string of distinct ops from {OPS!r}, got {self.ops!r}")

    # ---- sampling -------------------------------------------------------------------------

    def _feasible(self, op: str, x: int) -> bool:
        if op == "+":
            return x + 1 <= self.max_value
        if op == "-":
            return x >= 2
        if op == "*":
            return 2 * x <= self.max_value
        return any(x % k == 0 for k in range(2, self.max_factor + 1))

    def _first_step(self, rng: np.random.Generator, op: str) -> tuple[int, int]:
        """(start, operand) of an opening step."""
        m, f, v = self.max_operand, self.max_factor, self.max_value
        if op == "+":
            a = int(rng.integers(1, m + 1))
            return a, int(rng.integers(1, min(m, v - a) + 1))
        if op == "-":
            a = int(rng.integers(2, m + 1))
            return a, int(rng.integers(1, a))
        if op == "*":
            a = int(rng.integers(2, f + 1))
            return a, int(rng.integers(2, min(m, v // a) + 1))
        k = int(rng.integers(2, f + 1))
        q = int(rng.integers(1, min(m, v // k) + 1))
        return k * q, k

    def _next_operand(self, rng: np.random.Generator, op: str, x: int) -> int:
        m, f, v = self.max_operand, self.max_factor, self.max_value
        if op == "+":
            return int(rng.integers(1, min(m, v - x) + 1))
        if op == "-":
            return int(rng.integers(1, min(m, x - 1) + 1))
        if op == "*":
            return int(rng.integers(2, min(f, v // x) + 1))
        divisors = [k for k in range(2, f + 1) if x % k == 0]
        return divisors[int(rng.integers(len(divisors)))]

    def _sample_one(self, rng: np.random.Generator, n_steps: int) -> WordProblem:
        for _ in range(1000):
            op = self.ops[int(rng.integers(len(self.ops)))]
            start, b = self._first_step(rng, op)
            steps, templates = [(op, b)], [int(rng.integers(len(_FIRST[op])))]
            x = _APPLY[op](start, b)
            while len(steps) < n_steps:
                feasible = [o for o in self.ops if self._feasible(o, x)]
                if not feasible:
                    break
                op = feasible[int(rng.integers(len(feasible)))]
                b = self._next_operand(rng, op, x)
                used = {t for (o, _), t in zip(steps[1:], templates[1:]) if o == op}  # no repeated sentence
                free = [t for t in range(len(_CHAIN[op])) if t not in used]
                steps.append((op, b))
                templates.append(free[int(rng.integers(len(free)))])
                x = _APPLY[op](x, b)
            if len(steps) < n_steps:
                continue
            name, gender = _NAMES[int(rng.integers(len(_NAMES)))]
            return WordProblem(
                start=start, steps=tuple(steps), templates=tuple(templates),
                question_template=int(rng.integers(len(_QUESTIONS))), name=name, gender=gender,
                obj=_OBJECTS[int(rng.integers(len(_OBJECTS)))], box=_CONTAINERS[int(rng.integers(len(_CONTAINERS)))],
                rel=_RELATIVES[int(rng.integers(len(_RELATIVES)))])
        raise RuntimeError(f"could not build a {n_steps}-step problem with ops={self.ops!r} and "
                           f"max_value={self.max_value} in 1000 tries; allow more ops or a larger max_value")

    def few_shot_pool(self) -> tuple[WordProblem, ...]:
        """The fixed worked examples (seed `FEW_SHOT_SEED`, step counts cycling min..max); never sampled.

        Drawn with this task's own settings, so the examples match its ops and step range; the
        same task always has the same pool (train and eval prompts share it).
        """
        return _few_shot_pool(self)

    def sample(self, rng: np.random.Generator, n: int) -> list[WordProblem]:
        """n problems (step counts uniform in [min_steps, max_steps]), none a few-shot pool question."""
        _checks.check_int("n", n, minimum=0)
        pool = {p.question for p in self.few_shot_pool()}
        out = []
        for _ in range(n):
            for _ in range(1000):
                problem = self._sample_one(rng, int(rng.integers(self.min_steps, self.max_steps + 1)))
                if problem.question not in pool:
                    break
            else:
                raise RuntimeError("every sampled problem repeats a few-shot example; widen the task")
            out.append(problem)
        return out

    # ---- texts ----------------------------------------------------------------------------

    @staticmethod
    def question(problem: WordProblem) -> str:
        return problem.question

    @staticmethod
    def solution(problem: WordProblem) -> str:
        """The worked solution: one sentence per step, then ``Answer: <n>`` (no leading ``Solution:``)."""
        return problem.solution

    @staticmethod
    def answer(problem: WordProblem) -> str:
        return str(problem.answer)

    def examples_for(self, problem: WordProblem) -> list[WordProblem]:
        """The ``few_shot`` pool examples shown with ``problem``: chosen by a stable hash of its question."""
        pool = self.few_shot_pool()
        pick = np.random.default_rng(zlib.crc32(problem.question.encode("utf-8")))
        return [pool[int(i)] for i in pick.choice(len(pool), size=self.few_shot, replace=False)]

    def prompt(self, problem: WordProblem) -> str:
        """Few-shot prompt text, ending in ``Solution:`` (format in the module docstring)."""
        blocks = [f"Question: {ex.question}\nSolution: {ex.solution}" for ex in self.examples_for(problem)]
        blocks.append(f"Question: {problem.question}\nSolution:")
        return "\n\n".join(blocks)

    def problems(self, rng: np.random.Generator, n: int) -> list[dict]:
        """Prompt records: {"prompt": str, "ground_truth": str}."""
        return [{"prompt": self.prompt(p), "ground_truth": self.answer(p)} for p in self.sample(rng, n)]

    def demonstrations(self, rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
        """(prompt, response) pairs; the response is ``" " + solution`` (the prompt ends in ``Solution:``)."""
        return [(self.prompt(p), " " + self.solution(p)) for p in self.sample(rng, n)]


@functools.lru_cache(maxsize=32)
def _few_shot_pool(task: WordProblemTask) -> tuple[WordProblem, ...]:
    rng = np.random.default_rng(FEW_SHOT_SEED)
    span = task.max_steps - task.min_steps + 1
    pool: list[WordProblem] = []
    seen: set[str] = set()
    for _ in range(100 * FEW_SHOT_POOL_SIZE):
        problem = task._sample_one(rng, task.min_steps + len(pool) % span)
        if problem.question not in seen:
            seen.add(problem.question)
            pool.append(problem)
            if len(pool) == FEW_SHOT_POOL_SIZE:
                return tuple(pool)
    raise RuntimeError(f"could not build {FEW_SHOT_POOL_SIZE} distinct few-shot examples for {task}")


def _records(task: WordProblemTask, problems: list[WordProblem]) -> list[PromptRecord]:
    return [PromptRecord(prompt=task.prompt(p), ground_truth=task.answer(p), data_source="word_problems", index=str(i))
            for i, p in enumerate(problems)]


def word_problem_splits(task: WordProblemTask, seed: int, n_train: int, n_eval: int,
                        max_tries: int | None = None) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """Train and held-out eval prompts from different seeds; no eval question is a train question.

    Train: ``task.sample(default_rng([seed, 0]), n_train)`` (repeats allowed). Eval: problems drawn
    one at a time from ``default_rng([seed, 1])``, keeping those whose question text is neither a
    train question nor an eval question already kept, until ``n_eval``; after ``max_tries``
    candidates (default ``50 · n_eval + 1000``) it raises ValueError. Deterministic in ``seed``.
    """
    _checks.check_int("seed", seed, minimum=0)
    _checks.check_int("n_train", n_train, minimum=0)
    _checks.check_int("n_eval", n_eval, minimum=0)
    train = task.sample(np.random.default_rng([seed, 0]), n_train)
    taken = {p.question for p in train}
    rng = np.random.default_rng([seed, 1])
    max_tries = 50 * n_eval + 1000 if max_tries is None else max_tries
    _checks.check_int("max_tries", max_tries, minimum=1)
    held_out: list[WordProblem] = []
    tries = 0
    while len(held_out) < n_eval:
        if tries == max_tries:
            raise ValueError(f"found only {len(held_out)} of n_eval={n_eval} distinct held-out problems not in the "
                             f"{n_train} train problems after {max_tries} candidates; lower n_eval or n_train, or "
                             f"widen the task (max_operand, max_steps, ops)")
        tries += 1
        (problem,) = task.sample(rng, 1)
        if problem.question not in taken:
            taken.add(problem.question)
            held_out.append(problem)
    return _records(task, train), _records(task, held_out)
