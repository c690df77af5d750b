"""Prompt sources for RL: the verl/DAPO parquet schema, JSONL, and a resumable iterator.

The DAPO-Math-17k and AIME-2024 parquet files used by the official recipe share one schema:

    data_source: str
    prompt:       list[{"role": str, "content": str}]   (chat messages)
    ability:      str
    reward_model: {"ground_truth": str, "style": str}
    extra_info:   {"index": str | int, ...}

JSONL files may use the same nested fields or flat ones (``prompt``/``problem``/
``question`` and ``ground_truth``/``answer``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

from fipo_jax import _checks


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


def record_from_row(row: dict[str, Any], where: str = "row") -> PromptRecord:
    """Build a `PromptRecord` from a parquet/JSONL row in the DAPO or a flat schema."""
    prompt = next((row[k] for k in _PROMPT_FIELDS if row.get(k) is not None), None)
    _checks.require(prompt is not None,
                    f"{where}: no prompt field (expected one of {_PROMPT_FIELDS}); fields: {sorted(row)}")
    if isinstance(prompt, (list, tuple, np.ndarray)):
        try:
            prompt = tuple((str(m["role"]), str(m["content"])) for m in prompt)
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where}: prompt messages must be {{'role', 'content'}} dicts, got {prompt!r:.200}") from err
        _checks.require(bool(prompt), f"{where}: prompt has no messages")
    elif not isinstance(prompt, str):
        raise ValueError(f"{where}: prompt must be a string or a list of messages, got {type(prompt).__name__}")
    reward_model = row.get("reward_model")
    answer = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    if answer is None:
        answer = next((row[k] for k in _ANSWER_FIELDS if row.get(k) is not None), None)
    _checks.require(answer is not None,
                    f"{where}: no answer (expected reward_model.ground_truth or one of {_ANSWER_FIELDS}); "
                    f"fields: {sorted(row)}")
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    return PromptRecord(prompt=prompt, ground_truth=str(answer), data_source=str(row.get("data_source") or ""),
                        index=str(extra.get("index", row.get("index", ""))))


def load_prompt_records(path: str, limit: int | None = None) -> list[PromptRecord]:
    """Read a ``.parquet`` (DAPO schema) or ``.jsonl``/``.json`` file of prompts."""
    _checks.require(os.path.exists(path), f"prompt file not found: {path}", error=FileNotFoundError)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows: Iterable[dict] = pq.read_table(path).to_pylist()
    elif path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rows = json.loads(text) if path.endswith(".json") else [json.loads(l) for l in text.splitlines() if l.strip()]
    else:
        raise ValueError(f"unsupported prompt file type: {path} (expected .parquet, .jsonl or .json)")
    records = []
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            break
        records.append(record_from_row(row, where=f"{os.path.basename(path)} row {i}"))
    _checks.require(bool(records), f"{path} holds no prompts")
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

    The position (``epoch``, ``offset``) is all the state; `state()` / `from_state`
    round-trip it through a checkpoint so a resumed run sees exactly the same prompts.
    """

    records: Sequence[PromptRecord]
    seed: int = 0
    shuffle: bool = True
    epoch: int = 0
    offset: int = 0

    def __post_init__(self):
        _checks.require(len(self.records) > 0, "PromptIterator needs at least one prompt")

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.records)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def next_batch(self, size: int) -> list[PromptRecord]:
        _checks.check_int("batch size", size, minimum=1)
        out = []
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
        _checks.require(int(state["size"]) == len(self.records) and int(state["seed"]) == self.seed,
                        f"prompt iterator state is for {state['size']} prompts / seed {state['seed']}, not "
                        f"{len(self.records)} / {self.seed}: the data or seed changed since the checkpoint")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
