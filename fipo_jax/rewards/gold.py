"""What a ground truth states as its final answer, and the responses that must score correct against it.

The reward compares a response's extracted answer with the whole gold (after `gold_answer`, which
reads GSM8K's ``####`` marker and ``\\boxed{}``). A gold that is a sentence (``She has 7 apples
left.``) or carries a marker the reward does not read (``The answer is 7``) matches only a response
that copies it word for word: a correct ``Answer: 7`` scores −1 against it forever, and training on
it teaches nothing. `stated_answer` reads the answer such a gold states, as a model would write it;
`correct_responses` are the responses a usable gold must score correct (the loader's check).
"""

from __future__ import annotations

import re

from fipo_jax.rewards.extract import extract_answer_line
from fipo_jax.rewards.scoring import gold_answer

__all__ = ["SENTENCE_WORDS", "correct_responses", "is_sentence", "stated_answer"]

SENTENCE_WORDS = frozenset((
    "the", "is", "are", "was", "were", "be", "has", "have", "had", "so", "thus", "therefore", "hence",
    "we", "he", "she", "they", "it", "there", "this", "that", "answer", "total", "equals",
))  # fmt: skip
"""English words (articles, verbs, pronouns, connectives) that make a gold a sentence, not an answer."""

_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]+(?![A-Za-z])")  # letters not part of a LaTeX command
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+)$", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)", re.DOTALL)


def is_sentence(text: str) -> bool:
    """Does ``text`` hold an English sentence word (`SENTENCE_WORDS`) outside LaTeX commands?

    >>> is_sentence("She has 7 apples left."), is_sentence(r"\\text{Monday}"), is_sentence(r"\\theta = 3")
    (True, False, False)
    """
    return any(word.lower() in SENTENCE_WORDS for word in _WORD.findall(text))


def _marked_answer(text: str) -> str | None:
    """The text after the last ``Answer:`` label or ``answer is`` phrase, to the end of its line."""
    labelled = extract_answer_line(text, None)
    if labelled is not None:
        return labelled
    phrases = [m.group(1).strip() for m in _ANSWER_IS.finditer(text)]
    return phrases[-1] if phrases and phrases[-1] else None


def stated_answer(gold) -> str:
    """The final answer ``gold`` states, as a model writing a correct answer would write it.

    Rules, in order, on `gold_answer` (GSM8K ``####`` and ``\\boxed{}`` already read):
      1. after the last ``Answer:`` label or ``answer is`` phrase, to the end of its line;
      2. a sentence (`is_sentence`): its last math span (``$...$``, ``\\(...\\)``), else its last
         number (``72``, ``-1.5``, ``1,000``, ``3/4``);
      3. otherwise the gold itself (a bare answer states itself).

    >>> stated_answer("She has 7 apples left."), stated_answer("The answer is $\\\\frac{1}{2}$.")
    ('7', '$\\\\frac{1}{2}$.')
    >>> stated_answer("x = 3")
    'x = 3'
    """
    text = gold_answer(gold)
    marked = _marked_answer(text)
    if marked is not None:
        return marked
    if is_sentence(text):
        spans = [next(g for g in m.groups() if g is not None) for m in _MATH_SPAN.finditer(text)]
        numbers = _NUMBER.findall(text)
        found = spans[-1] if spans else numbers[-1] if numbers else None
        if found is not None:
            return " ".join(found.split())
    return text


def correct_responses(gold) -> tuple[str, ...]:
    """Responses that must score correct against ``gold`` for it to be usable: the gold itself on an
    ``Answer:`` line (``Answer: Answer: 7`` for the gold ``Answer: 7`` cannot), then, when it
    differs, the answer it states (`stated_answer`) written so (``Answer: 7`` for ``#### 7``: read by
    the reward; for ``She has 7 apples left.``: not).

    >>> correct_responses("She has 7 apples left.")
    ('Answer: She has 7 apples left.', 'Answer: 7')
    """
    itself, stated = f"Answer: {gold_answer(gold)}", f"Answer: {stated_answer(gold)}"
    return (itself,) if stated == itself else (itself, stated)
