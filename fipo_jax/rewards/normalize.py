"""Minerva/DAPO-style normalisation of a final-answer string before comparison.

The official DAPO reward compares ``normalize(prediction) == normalize(gold)`` (Minerva,
Lewkowycz et al. 2022, Appendix D). This module re-implements that idea with the rules listed in
`normalize_answer`; it is deliberately conservative (e.g. unit words are removed only as whole
words) so that two strings that normalise to the same text are the same answer.
"""

from __future__ import annotations

import re

__all__ = ["UNIT_WORDS", "normalize_answer", "unicode_to_latex"]

_DASHES_AS_MINUS = "\u2212\u2012\u2013\u2014\ufe63\uff0d"  # − ‒ – — ﹣ －
_ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"
_VULGAR_FRACTIONS = {
    "½": (1, 2), "⅓": (1, 3), "⅔": (2, 3), "¼": (1, 4), "¾": (3, 4), "⅕": (1, 5), "⅖": (2, 5),
    "⅗": (3, 5), "⅘": (4, 5), "⅙": (1, 6), "⅚": (5, 6), "⅐": (1, 7), "⅛": (1, 8), "⅜": (3, 8),
    "⅝": (5, 8), "⅞": (7, 8), "⅑": (1, 9), "⅒": (1, 10),
}  # fmt: skip
_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+")
_SYMBOLS = {
    "×": "\\times ", "·": "\\cdot ", "⋅": "\\cdot ", "÷": "\\div ", "π": "\\pi ", "∞": "\\infty ",
    "√": "\\sqrt", "≤": "\\leq ", "≥": "\\geq ", "≠": "\\neq ", "±": "\\pm ", "°": "^\\circ",
    "。": ".", "、": ",", "∈": "\\in ", "∪": "\\cup ", "∩": "\\cap ", "θ": "\\theta ",
}  # fmt: skip

UNIT_WORDS = (
    "degrees", "degree", "radians", "units", "unit", "square", "sq", "cubic", "cm", "mm", "km",
    "meters", "meter", "metres", "metre", "inches", "inch", "feet", "foot", "ft", "miles", "mile",
    "mph", "hours", "hour", "minutes", "minute", "seconds", "sec", "days", "weeks", "years",
    "dollars", "dollar", "cents", "cent", "pounds", "lbs", "grams", "kg", "points", "ways",
    "students", "people", "integers", "digits", "edges", "meals", "mb", "gb",
)  # fmt: skip
"""Words removed when they stand alone (optionally with ``^2``/``^3``): units and counted nouns."""

_UNIT_RE = re.compile(
    r"(?<![A-Za-z\\])(?:" + "|".join(UNIT_WORDS) + r")(?:\^\{?[23]\}?)?(?![A-Za-z])", re.IGNORECASE
)
_TEXT_COMMANDS = (
    "text", "textbf", "textit", "textrm", "textnormal", "textsf", "texttt", "mathrm", "mathbf",
    "mathit", "mathsf", "mbox", "emph", "boxed", "fbox",
)  # fmt: skip
_TEXT_COMMAND_RE = re.compile(r"\\(?:" + "|".join(_TEXT_COMMANDS) + r")(?![A-Za-z])\s*(?=\{)")
_SPACING_RE = re.compile(
    r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg|displaystyle|quad|qquad)(?![A-Za-z])"
    r"|\\[!,;:> ]|~"
)
_DEGREES_RE = re.compile(r"\^\s*(?:\{\s*)?\\circ\s*\}?|\\circ(?![A-Za-z])|\\degree(?![A-Za-z])")
_ASSIGNMENT_RE = re.compile(r"\\?[A-Za-z]+(?:_\{?[A-Za-z0-9]+\}?)?(?:\([A-Za-z]\))?\s*=\s*")  # used with .match
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_PLAIN_NUMBER_RE = re.compile(r"\+(\d+(?:\.\d*)?|\.\d+)")


def unicode_to_latex(text: str) -> str:
    """Map Unicode math that models emit to ASCII/LaTeX.

    Rules: minus-like dashes (``−``, ``–``, full-width ``－``) → ``-``; full-width ASCII
    (U+FF01–U+FF5E, e.g. ``５``, ``：``) → ASCII; vulgar fractions ``½`` → ``\\frac{1}{2}``;
    superscript digits ``x²`` → ``x^{2}``; ``×·÷π∞√≤≥≠±°`` → LaTeX commands; ``。`` → ``.``;
    zero-width characters removed.

    >>> unicode_to_latex("−3½")
    '-3\\\\frac{1}{2}'
    >>> unicode_to_latex("x²")
    'x^{2}'
    """
    out: list[str] = []
    superscript: list[str] = []
    for char in text:
        if char in "⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺":
            superscript.append(char)
            continue
        if superscript:
            out.append("^{" + "".join(superscript).translate(_SUPERSCRIPTS) + "}")
            superscript = []
        code = ord(char)
        if char in _DASHES_AS_MINUS:
            out.append("-")
        elif char in _ZERO_WIDTH:
            continue
        elif 0xFF01 <= code <= 0xFF5E:
            out.append(chr(code - 0xFEE0))
        elif char == "\u3000":
            out.append(" ")
        elif char in _VULGAR_FRACTIONS:
            numerator, denominator = _VULGAR_FRACTIONS[char]
            out.append(f"\\frac{{{numerator}}}{{{denominator}}}")
        else:
            out.append(_SYMBOLS.get(char, char))
    if superscript:
        out.append("^{" + "".join(superscript).translate(_SUPERSCRIPTS) + "}")
    return "".join(out)


_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))  # "$$" first: it wins ties


def _first_math_span(text: str) -> str:
    """Content of the first ``$...$`` / ``$$...$$`` / ``\\(...\\)`` / ``\\[...\\]`` span, if any.

    For each delimiter, the first opening with a non-empty span after it is its first occurrence
    (a later opening only searches a shorter tail), so two ``str.find`` calls per delimiter
    suffice: linear time, whatever the input.
    """
    best: tuple[int, str] | None = None
    for opening, closing in _MATH_DELIMITERS:
        start = text.find(opening)
        if start < 0:
            continue
        end = text.find(closing, start + len(opening) + 1)  # the content is at least one character
        if end >= 0 and (best is None or start < best[0]):
            best = (start, text[start + len(opening) : end])
    return best[1] if best is not None else text


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each ``{`` that closes → index of its ``}`` (backslash escapes skipped), in one pass."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            stack.append(i)
        elif char == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def _unwrap_commands(text: str) -> str:
    """``\\text{abc}`` → ``abc`` (balanced braces) for the text-like and box commands.

    One left-to-right pass with a stack of open braces (linear time): every command name is
    removed; its ``{``/``}`` pair is removed too when the group closes, and the ``{`` is kept when
    it never closes (truncated text). Backslash escapes (``\\{``, ``\\\\``) are not braces or commands.
    """
    out: list[str] = []
    stack: list[tuple[int, bool]] = []  # each open "{": (its index in out, opened by a command?)
    i = 0
    while i < len(text):
        char = text[i]
        command = _TEXT_COMMAND_RE.match(text, i) if char == "\\" else None
        if command is not None:  # the name (and spaces) go; the "{" it ends at is read next
            stack.append((len(out), True))
            out.append("{")
            i = command.end() + 1
            continue
        if char == "\\":
            out.append(text[i : i + 2])
            i += 2
            continue
        if char == "{":
            stack.append((len(out), False))
        elif char == "}" and stack:
            index, unwrap = stack.pop()
            if unwrap:
                out[index] = ""
                i += 1
                continue
        out.append(char)
        i += 1
    return "".join(out)


def _strip_outer_braces(text: str) -> str:
    """``{{x}}`` → ``x``: strip ``{...}`` pairs that enclose the whole text (linear time)."""
    pairs = _matching_braces(text)
    depth = 0
    while depth < len(text) - 1 - depth and pairs.get(depth) == len(text) - 1 - depth:
        depth += 1
    return text[depth : len(text) - depth]


def _strip_assignments(text: str) -> str:
    """Remove leading ``x =``, ``f(x) =``, ... repeatedly, keeping a non-empty right-hand side.

    ``text`` has no surrounding whitespace; the scan moves an index instead of slicing (linear time).
    """
    start = 0
    while True:
        match = _ASSIGNMENT_RE.match(text, start)
        if match is None or match.end() == len(text):
            return text[start:]
        start = match.end()


def normalize_answer(answer: str) -> str:
    """Canonical text of a final answer (Minerva/DAPO normalisation, re-implemented).

    Rules, in order:
      1. Unicode → ASCII/LaTeX (`unicode_to_latex`: ``−`` → ``-``, ``½`` → ``\\frac{1}{2}``, ...).
      2. ``\\$`` (a currency sign) is removed; if a math span ``$...$`` / ``\\(...\\)`` /
         ``\\[...\\]`` is present only its content is kept (the first one, as Minerva does);
         remaining ``$`` are dropped.
      3. ``\\boxed{x}``, ``\\fbox{x}``, ``\\text{x}``, ``\\textbf{x}``, ``\\mathrm{x}``, ``\\mbox{x}``, ...
         → ``x`` (balanced braces; a group that never closes loses only the command name).
      4. Spacing/sizing commands (``\\!``, ``\\,``, ``\\;``, ``\\ ``, ``~``, ``\\left``, ``\\right``,
         ``\\displaystyle``, ``\\quad``) are removed; ``\\dfrac``/``\\tfrac`` → ``\\frac``.
      5. Degrees (``^\\circ``, ``^{\\circ}``, ``°``) and percent signs (``\\%``, ``%``) are removed.
      6. Unit words and counted nouns (`UNIT_WORDS`: "degrees", "cm", "dollars", ...) are removed
         when they stand as whole words, optionally with ``^2``/``^3``.
      7. Leading assignments such as ``x =``, ``k=``, ``\\theta =``, ``a_1 =``, ``f(x) =`` are
         removed, repeatedly.
      8. All whitespace is removed; trailing ``.``, ``,``, ``;`` and markdown ``*`` are stripped
         (``5.`` → ``5``); ``{...}`` pairs enclosing the whole answer are stripped.
      9. LaTeX thousands separators ``{,}`` are removed; ``1,000,000`` (correct 3-digit grouping
         only) → ``1000000``; a leading ``+`` on a plain number is dropped.
     10. Shorthand fractions and roots are braced: ``\\frac12`` → ``\\frac{1}{2}``,
         ``\\sqrt3`` → ``\\sqrt{3}``.

    Case is kept (variables are case-sensitive). The function never raises on str input, and its
    time is linear in the input length (each step is one pass or a bounded regular expression), so
    even a pathological ground truth such as ``"\\text{" * 8000`` is quick.

    >>> normalize_answer("$5$.")
    '5'
    >>> normalize_answer(r"x = \\dfrac{1}{2}")
    '\\\\frac{1}{2}'
    >>> normalize_answer(r"90^\\circ")
    '90'
    >>> normalize_answer(r"\\text{12 cm}^2")
    '12'
    >>> normalize_answer("1,000")
    '1000'
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    text = unicode_to_latex(answer).strip()
    text = text.replace("\\$", "")
    text = _first_math_span(text).replace("$", "")
    text = _unwrap_commands(text)
    text = _SPACING_RE.sub(" ", text)
    text = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", text)
    text = _DEGREES_RE.sub("", text)
    text = text.replace("\\%", "").replace("%", "")
    stripped_units = _UNIT_RE.sub(" ", text)
    if stripped_units.strip():
        text = stripped_units
    text = text.strip()
    text = _strip_assignments(text)
    text = "".join(text.split())
    text = text.rstrip(".,;*").lstrip("*")
    text = _strip_outer_braces(text)
    text = text.replace("{,}", "")
    if _THOUSANDS_RE.fullmatch(text):
        text = text.replace(",", "")
    plus = _PLAIN_NUMBER_RE.fullmatch(text)
    if plus:
        text = plus.group(1)
    text = re.sub(r"\\frac([0-9A-Za-z])([0-9A-Za-z])", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac([0-9A-Za-z])(?=\{)", r"\\frac{\1}", text)
    text = re.sub(r"\\frac(\{[^{}]*\})([0-9A-Za-z])", r"\\frac\1{\2}", text)
    text = re.sub(r"\\sqrt([0-9A-Za-z])", r"\\sqrt{\1}", text)
    return text
