"""Prompt sources for RL: the verl/DAPO parquet schema, JSONL, and a resumable iterator.

The DAPO-Math-17k and AIME-2024 parquet files used by the official recipe share one schema:

    data_source: str
    prompt:       list[{"role": str, "content": str}]   (chat messages)
    ability:      str
    reward_model: {"ground_truth": str, "style": str}
    extra_info:   {"index": str | int, ...}

JSONL files (one JSON object per line; blank lines are skipped) and ``.json`` files (one list of
objects) may use the same nested fields or flat ones (``prompt``/``problem``/``question`` and
``ground_truth``/``answer``/``solution``).

Every row is checked as it is loaded, and a bad one stops the load with one line naming the file,
the row and the field: parquet rows and ``.json`` items are counted from 0 (``row 0`` is the
first), JSONL lines from 1 as in an editor (``line 1``). JSON files must be UTF-8 (a byte-order mark is allowed).

Ground truths (``reward_model.ground_truth``, else the first flat answer field present) must be
strings. The one conversion: a JSON/parquet integer such as ``42`` is accepted as ``"42"``.
Booleans, floats (NaN included), lists, objects and bytes are rejected, as are ground truths that
are empty, longer than ``max_ground_truth_chars`` (1024 by default, the reward's
``max_answer_chars``), with nothing after a GSM8K ``####`` marker, whose last ``\\boxed{}`` is empty
or unbalanced, or that normalise to nothing. A GSM8K solution (``... #### 72``) is kept as written:
the reward reads its answer after the marker (`rewards.gold_answer`). Whether a correct response can
match a gold is checked by the trainer's loader (`fipo_jax.train.build.check_gold_answers`).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np

from fipo_jax.core import _checks
from fipo_jax.rewards.extract import after_gsm8k_marker
from fipo_jax.rewards.normalize import normalize_answer
from fipo_jax.rewards.scoring import gold_answer
from fipo_jax.rewards.verify import DEFAULT_MAX_ANSWER_CHARS

DEFAULT_MAX_GROUND_TRUTH_CHARS = DEFAULT_MAX_ANSWER_CHARS
"""Longest ground truth a loader accepts (the reward would not compare a longer one)."""


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One RL prompt: chat messages (or plain text) and the verifiable answer."""

    prompt: str | tuple[tuple[str, str], ...]  # text, or ((role, content), ...)
    ground_truth: str
    data_source: str = ""
    index: str = ""

    def messages(self) -> list[dict[str, str]]:
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [{"role": r, "content": c} for r, c in self.prompt]


_PROMPT_FIELDS = ("prompt", "problem", "question")
_ANSWER_FIELDS = ("ground_truth", "answer", "solution")


def _prompt_value(row: dict[str, Any], where: str) -> str | tuple[tuple[str, str], ...]:
    """The row's prompt: a non-empty string or a non-empty list of ``{"role", "content"}`` string dicts."""
    field = next((k for k in _PROMPT_FIELDS if row.get(k) is not None), None)
    _checks.require(field is not None,
                    f"{where}: no prompt field (expected one of {_PROMPT_FIELDS}); fields: {sorted(row)}")
    assert field is not None  # for the type checker: require raised otherwise
    prompt = row[field]
    if isinstance(prompt, str):
        _checks.require(bool(prompt.strip()), f"{where}: {field} is empty")
        return prompt
    _checks.require(isinstance(prompt, (list, tuple, np.ndarray)),
                    f"{where}: {field} must be a string or a list of messages, got {type(prompt).__name__}")
    messages = []
    for m in prompt:
        _checks.require(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str),
                        f"{where}: {field} messages must be {{'role': str, 'content': str}} dicts, got {m!r:.200}")
        messages.append((m["role"], m["content"]))
    _checks.require(bool(messages), f"{where}: {field} has no messages")
    return tuple(messages)


def _answer_value(row: dict[str, Any], where: str) -> tuple[str, Any]:
    """(field name, raw value) of the row's ground truth: ``reward_model.ground_truth``, else a flat field."""
    reward_model = row.get("reward_model")
    _checks.require(reward_model is None or isinstance(reward_model, dict),
                    f"{where}: reward_model must be an object with a ground_truth field, "
                    f"got {type(reward_model).__name__}")
    if reward_model is not None and reward_model.get("ground_truth") is not None:
        return "reward_model.ground_truth", reward_model["ground_truth"]
    field = next((k for k in _ANSWER_FIELDS if row.get(k) is not None), None)
    _checks.require(field is not None,
                    f"{where}: no answer (expected reward_model.ground_truth or one of {_ANSWER_FIELDS}); "
                    f"fields: {sorted(row)}")
    assert field is not None  # for the type checker: require raised otherwise
    return field, row[field]


def ground_truth_text(value: Any, where: str, field: str = "ground_truth",
                      max_chars: int = DEFAULT_MAX_GROUND_TRUTH_CHARS) -> str:
    """The ground truth as the reward will read it, or a ValueError naming ``where`` and ``field``.

    Accepts a str, or an int (not a bool) written as its decimal digits; see the module docstring
    for what is rejected.

    >>> ground_truth_text(42, "f.jsonl line 3")
    '42'
    """
    name = f"{where}: {field}"
    if _checks.is_int(value):
        value = str(value)
    _checks.require(isinstance(value, str),
                    f"{name} must be a string (or an integer), got {type(value).__name__} {value!r:.80}")
    _checks.require(len(value) <= max_chars,
                    f"{name} is {len(value)} characters long, over the {max_chars}-character limit "
                    f"(max_ground_truth_chars)")
    _checks.require(bool(value.strip()), f"{name} is empty")
    _checks.require(after_gsm8k_marker(value) != "",
                    f"{name} {value!r:.80} has nothing after its GSM8K '####' marker; write the answer after it")
    try:
        gold = gold_answer(value)
    except ValueError as err:
        raise ValueError(f"{name} {value!r:.80} has an empty or unbalanced \\boxed{{}}") from err
    _checks.require(bool(normalize_answer(gold)), f"{name} {value!r:.80} is empty after normalisation")
    return value


def record_from_row(row: dict[str, Any], where: str = "row",
                    max_ground_truth_chars: int = DEFAULT_MAX_GROUND_TRUTH_CHARS) -> PromptRecord:
    """Build a `PromptRecord` from a parquet/JSONL row in the DAPO or a flat schema (checked; see module docstring)."""
    _checks.require(isinstance(row, dict), f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt = _prompt_value(row, where)
    field, answer = _answer_value(row, where)
    extra_info = row.get("extra_info")
    extra = extra_info if isinstance(extra_info, dict) else {}
    return PromptRecord(prompt=prompt, ground_truth=ground_truth_text(answer, where, field, max_ground_truth_chars),
                        data_source=str(row.get("data_source") or ""),
                        index=str(extra.get("index", row.get("index", ""))))


def _parquet_rows(path: str) -> Iterator[tuple[str, dict]]:
    """(``"path row i"``, row) for each row of a parquet file; a file that is not parquet is named."""
    from fipo_jax._requires import import_module

    pa, pq = import_module("pyarrow", "train"), import_module("pyarrow.parquet", "train")

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None
    for i, row in enumerate(rows):
        yield f"{path} row {i}", row


def _decode_utf8(data: bytes, path: str, first_line: int = 1) -> str:
    """``data`` (starting at line ``first_line`` of ``path``) as UTF-8 text, or a ValueError naming the line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(f"{path} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
                         f"save the file as UTF-8") from None


def _read_bytes(path: str) -> bytes:
    """The file's bytes, without a leading UTF-8 byte-order mark."""
    with open(path, "rb") as f:
        data = f.read()
    return data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data


def _json_value(text: str, path: str, line: int):
    """One JSON document, or a ValueError naming the file and the real line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {line + err.lineno - 1}: not valid JSON ({err.msg}, "
                         f"column {err.colno})") from None


def _jsonl_rows(path: str) -> Iterator[tuple[str, dict]]:
    """(``"path line n"``, object) for each non-blank line of a JSONL file (lines counted from 1)."""
    for number, raw in enumerate(_read_bytes(path).split(b"\n"), start=1):  # only "\n" ends a line (not U+2028)
        text = _decode_utf8(raw, path, number)
        if not text.strip():
            continue
        row = _json_value(text, path, number)
        _checks.require(isinstance(row, dict),
                        f"{path} line {number}: expected a JSON object per line, got {type(row).__name__}")
        yield f"{path} line {number}", row


def _json_rows(path: str) -> Iterator[tuple[str, dict]]:
    """(``"path row i"``, object) for each item of a ``.json`` file holding a list of objects."""
    text = _decode_utf8(_read_bytes(path), path)
    _checks.require(bool(text.strip()), f"{path} is empty: expected a JSON list of prompt objects")
    rows = _json_value(text, path, 1)
    _checks.require(isinstance(rows, list),
                    f"{path}: expected a JSON list of prompt objects, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        yield f"{path} row {i}", row


def load_prompt_records(path: str, limit: int | None = None, *,
                        max_ground_truth_chars: int = DEFAULT_MAX_GROUND_TRUTH_CHARS) -> list[PromptRecord]:
    """Read a ``.parquet`` (DAPO schema) or ``.jsonl``/``.json`` file of prompts, checking every row read."""
    _checks.check_int("limit", limit, minimum=1, allow_none=True)
    _checks.check_int("max_ground_truth_chars", max_ground_truth_chars, minimum=1)
    _checks.require(os.path.exists(path), f"prompt file not found: {path}", error=FileNotFoundError)
    _checks.require(os.path.isfile(path), f"prompt file {path} is not a file")
    if path.endswith(".parquet"):
        rows = _parquet_rows(path)
    elif path.endswith(".jsonl"):
        rows = _jsonl_rows(path)
    elif path.endswith(".json"):
        rows = _json_rows(path)
    else:
        raise ValueError(f"unsupported prompt file type: {path} (expected .parquet, .jsonl or .json)")
    records: list[PromptRecord] = []
    for where, row in rows:
        if limit is not None and len(records) >= limit:
            break
        records.append(record_from_row(row, where, max_ground_truth_chars))
    _checks.require(bool(records), f"{path} holds no prompts (no rows, or only blank lines)")
    return records


def render_prompt(record: PromptRecord, tokenizer=None) -> str:
    """Prompt text: the tokenizer's chat template when it has one, else the raw contents."""
    if isinstance(record.prompt, str) and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
        return record.prompt
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(record.messages(), add_generation_prompt=True, tokenize=False)
    return "\n".join(m["content"] for m in record.messages())


@dataclasses.dataclass
class PromptIterator:
    """Deterministic, resumable batches of prompts: a fresh permutation per epoch.

    The position (``epoch``, ``offset``) is all the state; `state()` / `restore`
    round-trip it through a checkpoint so a resumed run sees exactly the same prompts.
    ``0 <= offset < len(records)`` always (a finished epoch moves on to the next at once), so an
    offset beyond the data is refused, not taken as "the next epoch": it can only come from a
    damaged state or other data, and either would resume on prompts the run never chose.
    """

    records: Sequence[PromptRecord]
    seed: int = 0
    shuffle: bool = True
    epoch: int = 0
    offset: int = 0

    def __post_init__(self):
        _checks.require(len(self.records) > 0, "PromptIterator needs at least one prompt")
        _check_position(self.epoch, self.offset, len(self.records))

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.records)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def next_batch(self, size: int) -> list[PromptRecord]:
        _checks.check_int("batch size", size, minimum=1)
        out: list[PromptRecord] = []
        while len(out) < size:
            order = self._order(self.epoch)
            take = min(size - len(out), len(order) - self.offset)
            out.extend(self.records[i] for i in order[self.offset : self.offset + take])
            self.offset += take
            if self.offset == len(order):
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "size": len(self.records)}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a `state()`; refused in one line when it is for other data or another seed, or
        its position is not in the data (``0 <= offset < size``, ``epoch >= 0``)."""
        keys = ("epoch", "offset", "seed", "size")
        _checks.require(isinstance(state, dict) and all(_checks.is_int(state.get(k)) for k in keys),
                        f"prompt iterator state must hold the integers {keys}, got {state!r:.200}: the checkpoint's "
                        f"data position is damaged")
        _checks.require(int(state["size"]) == len(self.records) and int(state["seed"]) == self.seed,
                        f"prompt iterator state is for {state['size']} prompts / seed {state['seed']}, not "
                        f"{len(self.records)} / {self.seed}: the data or seed changed since the checkpoint")
        _check_position(int(state["epoch"]), int(state["offset"]), len(self.records))
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def _check_position(epoch: int, offset: int, size: int) -> None:
    """A data position is an epoch >= 0 and an offset into the data: 0 <= offset < size."""
    _checks.require(_checks.is_int(epoch) and epoch >= 0 and _checks.is_int(offset) and 0 <= offset < size,
                    f"prompt iterator position epoch {epoch!r}, offset {offset!r} is not in the data of {size} "
                    f"prompts (0 <= offset < {size}): the checkpoint's data position is damaged or for other data")
