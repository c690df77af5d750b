"""Prompt sources: DAPO-schema parquet / JSONL loaders, a resumable iterator, synthetic tasks, word problems."""

from fipo_jax.data.prompts import PromptIterator, PromptRecord, load_prompt_records, record_from_row, render_prompt
from fipo_jax.data.synthetic import CharTokenizer, ChainTask
from fipo_jax.data.word_problems import WordProblem, WordProblemTask, word_problem_splits

__all__ = ["CharTokenizer", "ChainTask", "PromptIterator", "PromptRecord", "load_prompt_records",
           "record_from_row", "render_prompt", "WordProblem", "WordProblemTask", "word_problem_splits"]
