"""Final-answer extraction from a model response: DAPO/Minerva ``Answer:`` lines and ``\\boxed{}``.

Official behaviour (verl ``utils/reward_score/math_dapo.py``): the response is cut to its last
300 characters, and the answer is the text after the last case-insensitive ``Answer:`` up to the
end of that line (whitespace, newlines included, may separate the colon from the answer). We keep
that rule and add a fallback to the last ``\\boxed{...}`` when no ``Answer:`` line is found.
Ground truths may carry GSM8K's ``#### <answer>`` marker (`after_gsm8k_marker`); responses never do.

Every function here is pure, linear in the input length, and never raises on malformed text
(unbalanced braces, truncated responses): it returns ``None`` instead.
"""

from __future__ import annotations

import re

from fipo_jax.core import _checks

__all__ = [
    "DEFAULT_ANSWER_WINDOW_CHARS",
    "after_gsm8k_marker",
    "extract_answer",
    "extract_answer_line",
    "extract_last_boxed",
    "read_brace_group",
    "tail_window",
]

DEFAULT_ANSWER_WINDOW_CHARS = 300
"""Official window: only the last 300 characters of a response are searched."""

# "Answer:" (any case), optionally markdown-bold ("**Answer:**", "**Answer**:"), with an ASCII or
# full-width colon, then any whitespace (newlines included, as in the official `Answer\s*:\s*`).
_ANSWER_LINE = re.compile(r"answer\s*(?:\*{1,2}\s*)?[:\uff1a](?:\s*\*{1,2}(?!\*))?\s*", re.IGNORECASE)
_BOX_COMMANDS = ("\\boxed", "\\fbox")


def tail_window(text: str, window_chars: int | None) -> str:
    """The last ``window_chars`` characters of ``text`` (all of it when ``window_chars`` is None).

    >>> tail_window("abcdef", 2)
    'ef'
    """
    _checks.check_int("window_chars (None: the whole response)", window_chars, minimum=1, allow_none=True)
    _checks.require(isinstance(text, str), f"text must be a str, got {type(text).__name__}", error=TypeError)
    return text if window_chars is None else text[-window_chars:]


def extract_answer_line(text: str, window_chars: int | None = DEFAULT_ANSWER_WINDOW_CHARS) -> str | None:
    """Text after the last ``Answer:`` in the last ``window_chars`` characters, to the end of its line.

    Rule: among all case-insensitive matches of ``answer\\s*:\\s*`` (colon may be full-width
    ``：``; markdown bold around the label is skipped), take the last one followed by a non-empty
    rest of line, and return that rest stripped. Differs from the official regex only when two
    ``Answer:`` labels share a line (the official one keeps the first label's whole line; we keep
    the text after the last label).

    >>> extract_answer_line("Answer: 3\\nwait, no.\\nanswer:  5 ")
    '5'
    >>> extract_answer_line("no label here") is None
    True
    """
    window = tail_window(text, window_chars)
    for match in reversed(list(_ANSWER_LINE.finditer(window))):
        end = window.find("\n", match.end())
        rest = window[match.end() : None if end < 0 else end].strip()
        if rest:
            return rest
    return None


def read_brace_group(text: str, open_index: int) -> tuple[str, int] | None:
    """Content of the balanced ``{...}`` group opening at ``text[open_index]``, and the index after it.

    Backslash escapes (``\\{``, ``\\}``, ``\\\\``) do not count as grouping braces. Returns None
    when ``text[open_index]`` is not ``{`` or the group never closes (truncated output).

    >>> read_brace_group(r"x{\\frac{1}{2}}y", 1)
    ('\\\\frac{1}{2}', 14)
    >>> read_brace_group("{a{b}", 0) is None
    True
    """
    if not 0 <= open_index < len(text) or text[open_index] != "{":
        return None
    depth, i = 0, open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i], i + 1
        i += 1
    return None


def _last_box_command(text: str) -> tuple[int, int] | None:
    """(start, end) of the last ``\\boxed`` / ``\\fbox`` not followed by a letter (not ``\\boxedx``)."""
    best: tuple[int, int] | None = None
    for command in _BOX_COMMANDS:
        stop = len(text)
        while True:
            start = text.rfind(command, 0, stop)
            if start < 0:
                break
            end = start + len(command)
            if end < len(text) and text[end].isalpha():
                stop = start
                continue
            if best is None or start > best[0]:
                best = (start, end)
            break
    return best


def extract_last_boxed(text: str, window_chars: int | None = None) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed x``) in the window.

    Rule: find the last box command; if a ``{`` follows (after optional spaces), return its
    balanced content; if only spaces then a token follow (``\\boxed 5$``), return the token up to
    the next whitespace or ``$``. The last box being unbalanced (e.g. a response truncated inside
    it) gives None: earlier boxes are intermediate results, not the final answer.

    >>> extract_last_boxed(r"\\boxed{1} then \\boxed{\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> extract_last_boxed(r"so $\\boxed 7$")
    '7'
    >>> extract_last_boxed(r"\\boxed{2} \\boxed{\\frac{1}{2") is None
    True
    """
    window = tail_window(text, window_chars)
    found = _last_box_command(window)
    if found is None:
        return None
    i = found[1]
    while i < len(window) and window[i] in " \t":
        i += 1
    if i < len(window) and window[i] == "{":
        group = read_brace_group(window, i)
        content = group[0].strip() if group is not None else ""
        return content or None
    if i == found[1]:  # "\boxed" directly followed by something other than a space or "{"
        return None
    token = re.match(r"[^\s$]+", window[i:])
    return token.group(0) if token else None


def after_gsm8k_marker(text: str) -> str | None:
    """The text after the last GSM8K ``####`` marker, stripped; None when the text has no marker.

    GSM8K's ``answer`` field is a worked solution whose last line is ``#### <final answer>``; the
    final answer is what follows the marker (``####`` means nothing in a LaTeX answer).

    >>> after_gsm8k_marker("48/2 = 24 clips in May.\\n#### 72"), after_gsm8k_marker("72") is None
    ('72', True)
    """
    _checks.require(isinstance(text, str), f"text must be a str, got {type(text).__name__}", error=TypeError)
    marker = text.rfind("####")
    return None if marker < 0 else text[marker + len("####") :].strip()


def extract_answer(
    text: str,
    window_chars: int | None = DEFAULT_ANSWER_WINDOW_CHARS,
    boxed_fallback: bool = True,
) -> str | None:
    """The raw (unnormalised) final answer: the ``Answer:`` line if any, else the last ``\\boxed{}``.

    Both are searched in the last ``window_chars`` characters (official: 300; None = everything).
    ``boxed_fallback=False`` gives the official Minerva-only rule. Returns None when nothing is found.

    >>> extract_answer("... so x = 2.\\nAnswer: $2$")
    '$2$'
    >>> extract_answer(r"thus \\boxed{\\dfrac{3}{4}}")
    '\\\\dfrac{3}{4}'
    >>> extract_answer(r"thus \\boxed{4}", boxed_fallback=False) is None
    True
    """
    answer = extract_answer_line(text, window_chars)
    if answer is None and boxed_fallback:
        answer = extract_last_boxed(text, window_chars)
    return answer
