"""Prompt sources: DAPO-schema parquet / JSONL loaders, a resumable iterator, synthetic tasks, word problems."""

from fipo_jax.data.encoding import encode_prompt, encode_text
from fipo_jax.data.prompts import PromptIterator, PromptRecord, load_prompt_records, record_from_row, render_prompt
from fipo_jax.data.synthetic import ChainTask, CharTokenizer
from fipo_jax.data.word_problems import WordProblem, WordProblemTask, word_problem_splits

__all__ = ["CharTokenizer", "ChainTask", "encode_prompt", "encode_text", "PromptIterator", "PromptRecord",
           "load_prompt_records",
           "record_from_row", "render_prompt", "WordProblem", "WordProblemTask", "word_problem_splits"]
