"""Text and prompts to token ids, for the scratch character vocabulary and Hugging Face tokenizers."""

from __future__ import annotations

from fipo_jax.data.prompts import PromptRecord, render_prompt
from fipo_jax.data.synthetic import CharTokenizer


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of plain text, no special tokens (the scratch vocabulary or a Hugging Face tokenizer)."""
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(record: PromptRecord, tokenizer) -> list[int]:
    """Token ids of a prompt: BOS + characters for the scratch vocabulary; otherwise the chat template
    (which writes its own special tokens) or plain text with the tokenizer's special tokens (Gemma and
    Llama start with BOS, Qwen adds nothing)."""
    if isinstance(tokenizer, CharTokenizer):
        return [tokenizer.bos_token_id] + tokenizer.encode(record.prompt if isinstance(record.prompt, str)
                                                           else render_prompt(record))
    templated = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(render_prompt(record, tokenizer), add_special_tokens=not templated)["input_ids"]
