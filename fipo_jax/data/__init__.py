"""Prompt sources: DAPO-schema parquet / JSONL loaders, a resumable iterator, synthetic tasks."""

from fipo_jax.data.prompts import PromptIterator, PromptRecord, load_prompt_records, record_from_row, render_prompt
from fipo_jax.data.synthetic import CharTokenizer, ChainTask

__all__ = ["CharTokenizer", "ChainTask", "PromptIterator", "PromptRecord", "load_prompt_records",
           "record_from_row", "render_prompt"]
