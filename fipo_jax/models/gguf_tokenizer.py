"""A GGUF file's tokenizer, built without torch: the file's `tokenizer.*` metadata read with the `gguf`
package and turned into a `tokenizers` pipeline by transformers' own GGUF converter.

A `.gguf` file carries its tokenizer as llama.cpp metadata: `tokenizer.ggml.model` (the kind:
"llama" = SentencePiece-style, "gpt2" = byte-level BPE, …), `.pre` (the split regex), `.tokens`,
`.scores`, `.token_type`, `.merges`, the bos / eos / unk / pad ids, `.add_bos_token`,
`.add_eos_token`, and `tokenizer.chat_template`. transformers builds a tokenizer from it in three
steps: read the metadata (`transformers.integrations.gguf.reader`, which imports torch), group the
`tokenizer.*` keys into a tokenizer dict and a tokenizer-config dict (`get_gguf_tokenizer`, which
calls that reader), and convert the tokenizer dict (`convert_gguf_tokenizer`: `tokenizers` and
transformers' tokenizer classes only, no torch). `AutoTokenizer` then wraps the pipeline in the
tokenizer class of the architecture's model type.

Here the first step is the `gguf` package (`gguf_io.read_gguf`, `read_tokenizer_metadata`), the
second is `group_metadata` (the same two dicts, renamed by transformers' own key table
`GGUF_TOKENIZER_MAPPING`, with the same add-BOS defaults, plus one-line refusals of damaged metadata
that transformers would index past or silently truncate), the third is transformers' converter
itself, and the wrapping uses the class `AutoTokenizer` picks (`tokenizer_class`). So the pipeline
and the class are transformers' by construction, the result runs where torch is absent
(requirements.txt), and tests/test_gguf_tokenizer.py checks the whole against
`AutoTokenizer.from_pretrained(folder, gguf_file=…)`. `GGUFTokenizer` holds the converted pieces
before wrapping, which is what `tokenizer.load_tokenizer` caches on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from fipo_jax.models.file_checks import one_line
from fipo_jax.models.gguf_io import ARCHITECTURES, GGUFError, read_gguf

# The id keys of the named special tokens, under `tokenizer.ggml.`.
SPECIAL_TOKEN_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                     "pad_token": "padding_token_id"}
# What `GGUFTokenizer.save` writes beside tokenizer.json.
CONFIG_FILE = "gguf_tokenizer.json"
# Per-token arrays, which must be as long as `tokenizer.ggml.tokens`.
PER_TOKEN_KEYS = ("scores", "token_type")
# llama.cpp adds BOS to a SentencePiece ("llama") vocabulary whose file does not say otherwise, and
# transformers follows it; for "gemma4" transformers adds none whatever the file says (the chat
# template writes `<bos>` itself).
ADD_BOS_DEFAULTS = {"llama": True}
ADD_BOS_OVERRIDES = {"gemma4": False}


def read_tokenizer_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The file's `tokenizer.*` metadata and `general.architecture`, as plain Python values (str, int,
    float, bool, lists of them) — the values transformers' own GGUF reader returns for these keys.

    Raises:
      GGUFError: not a GGUF file, or a truncated / corrupt one (from `gguf_io.read_gguf`).
    """
    reader = read_gguf(path)
    return {key: field.contents() for key, field in reader.fields.items()
            if key.startswith("tokenizer.") or key == "general.architecture"}


def group_metadata(metadata: dict[str, Any]) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """`(architecture, tokenizer_dict, tokenizer_config)` from the metadata, as transformers'
    `get_gguf_tokenizer` groups them: `tokenizer.<key>` renamed by `GGUF_TOKENIZER_MAPPING`, the
    add-BOS defaults above, and each named special token as its string (None without an id).

    Raises:
      GGUFError: a special-token id outside the vocabulary, a per-token array of another length than
        the vocabulary, or a tokenizer kind without a vocabulary (a damaged file).
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    groups = {}
    for group, renames in GGUF_TOKENIZER_MAPPING.items():
        groups[group] = {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                         if f"tokenizer.{key}" in metadata}
    tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
    _check_vocabulary(tokenizer_dict)
    kind = tokenizer_dict.get("tokenizer_type")
    if kind in ADD_BOS_DEFAULTS:
        tokenizer_config.setdefault("add_bos_token", ADD_BOS_DEFAULTS[kind])
    if kind in ADD_BOS_OVERRIDES:
        tokenizer_config["add_bos_token"] = ADD_BOS_OVERRIDES[kind]
    tokenizer_config.update(special_tokens(metadata, tokenizer_dict.get("tokens", [])))
    return metadata.get("general.architecture"), tokenizer_dict, tokenizer_config


def _check_vocabulary(tokenizer_dict: dict[str, Any]) -> None:
    """GGUFError unless a stated tokenizer kind has tokens and every per-token array matches them
    (transformers would zip the arrays and silently drop the tail)."""
    tokens = tokenizer_dict.get("tokens")
    if tokenizer_dict.get("tokenizer_type") is not None and not tokens:
        raise GGUFError(f"GGUF metadata tokenizer.ggml.model={tokenizer_dict['tokenizer_type']!r} comes without "
                        "tokenizer.ggml.tokens: the file is damaged (re-download or re-convert it, or load the "
                        "tokenizer from the model's tokenizer folder)")
    for key in PER_TOKEN_KEYS:
        if key in tokenizer_dict and len(tokenizer_dict[key]) != len(tokens or ()):
            raise GGUFError(f"GGUF metadata tokenizer.ggml.{key} holds {len(tokenizer_dict[key])} values for "
                            f"{len(tokens or ())} tokens: the file is damaged (re-download or re-convert it)")


def special_tokens(metadata: dict[str, Any], tokens: list[str]) -> dict[str, str | None]:
    """{"bos_token": "<bos>", …}: the token each `tokenizer.ggml.<name>_id` names, None where absent.

    Raises:
      GGUFError: an id outside the vocabulary.
    """
    named = {}
    for name, key in SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise GGUFError(f"GGUF metadata tokenizer.ggml.{key}={token_id} is outside the {len(tokens)}-token "
                            "vocabulary: the file is damaged (re-download or re-convert it)")
        named[name] = tokens[token_id] if token_id is not None else None
    return named


def tokenizer_class(architecture: str | None):
    """The tokenizer class `AutoTokenizer` wraps a GGUF tokenizer of `architecture` in: the class of
    the model type's tokenizer (GemmaTokenizer for gemma3, Qwen2Tokenizer for qwen2 / qwen3), else
    `TokenizersBackend` (= `PreTrainedTokenizerFast`, e.g. for llama). All of them are
    `PreTrainedTokenizerFast`s."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

    name = None if architecture is None else TOKENIZER_MAPPING_NAMES.get(ARCHITECTURES.get(architecture, architecture))
    if name in (None, "MistralCommonBackend"):  # AutoTokenizer's fallback (Mistral: without its tekken files)
        return PreTrainedTokenizerFast
    return tokenizer_class_from_name(name) or PreTrainedTokenizerFast


@dataclasses.dataclass(frozen=True)
class GGUFTokenizer:
    """A GGUF file's tokenizer before it is wrapped: the architecture (which picks the tokenizer
    class), transformers' converted `tokenizers` pipeline, and the tokenizer config (special tokens,
    add-BOS / add-EOS, chat template). `wrap()` gives the transformers tokenizer; `save` / `load`
    keep exactly these three on disk, so a reloaded tokenizer is wrapped the same way as a fresh one
    (`save_pretrained` would not do: it drops add_bos_token, and reloading through a model's class
    rebuilds that class's own pipeline — Qwen2Tokenizer adds NFC — instead of the file's)."""

    architecture: str | None
    backend: Any  # tokenizers.Tokenizer
    config: dict[str, Any]

    def wrap(self):
        """The `transformers.PreTrainedTokenizerFast` (of `tokenizer_class(architecture)`)."""
        return tokenizer_class(self.architecture)(tokenizer_object=self.backend, **self.config)

    def save(self, folder: str | os.PathLike) -> None:
        """Writes `tokenizer.json` (the pipeline) and `CONFIG_FILE` (architecture and config) into `folder`."""
        os.makedirs(folder, exist_ok=True)
        self.backend.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump({"architecture": self.architecture, "config": self.config}, f)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "GGUFTokenizer":
        """What `save` wrote into `folder`."""
        from tokenizers import Tokenizer

        with open(os.path.join(folder, CONFIG_FILE), encoding="utf-8") as f:
            saved = json.load(f)
        return cls(saved["architecture"], Tokenizer.from_file(os.path.join(folder, "tokenizer.json")),
                   saved["config"])


def convert(metadata: dict[str, Any]) -> GGUFTokenizer:
    """The tokenizer `metadata` describes: `group_metadata`, then transformers' converter.

    Raises:
      GGUFError: damaged tokenizer metadata (`group_metadata`).
      ValueError, KeyError, …: transformers' converter refusing the metadata (e.g. an unknown kind).
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    architecture, tokenizer_dict, tokenizer_config = group_metadata(metadata)
    # transformers annotates architecture as str; None (no general.architecture) reads as an unknown architecture
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)  # type: ignore[arg-type]  # None is fine
    return GGUFTokenizer(architecture, backend, {**tokenizer_config, **extra})


def read_gguf_tokenizer(path: str | os.PathLike) -> GGUFTokenizer:
    """The tokenizer embedded in the GGUF file at `path`, unwrapped (see the module docstring); every
    failure is a one-line `GGUFError` naming the file.

    Takes tens of seconds for a large vocabulary (Gemma 3's 262,144 tokens: the `gguf` package's parse
    of the metadata, then the merges rebuilt from the vocabulary); `tokenizer.load_tokenizer` caches
    the result on disk.
    """
    path = os.fspath(path)
    metadata = read_tokenizer_metadata(path)  # read_gguf's errors already name the file
    try:
        return convert(metadata)
    except GGUFError as error:
        raise GGUFError(f"{path}: {error}") from error
    except Exception as error:  # the converter raises anything from ValueError to KeyError on odd metadata
        raise GGUFError(f"{path}: transformers cannot build a tokenizer from this GGUF file: "
                        f"{type(error).__name__}: {one_line(error)}") from error


def gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer embedded in the GGUF file at `path`, as a `transformers.PreTrainedTokenizerFast`
    (`read_gguf_tokenizer(path).wrap()`; not cached)."""
    return read_gguf_tokenizer(path).wrap()
