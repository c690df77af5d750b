"""Is this checkpoint file / folder usable? The checks model loading runs before and after reading weights.

Every failure is one line naming the path, file or tensor:
- a model path that does not exist (hub ids are not downloaded) or names a file inside a checkpoint
  folder (`check_model_path`);
- a JSON file (config.json, the sharded index, tokenizer files) that is not valid JSON or not an
  object (`read_json_object`);
- a sharded index without a usable "weight_map", or one listing absent shards, and a folder with
  no weights at all (`checkpoint_files`);
- a safetensors file `safe_open` refuses: truncated (naming the tensors the truncation cut off),
  not a safetensors file at all, or otherwise corrupt (`open_safetensors`);
- NaN / ±inf weights after loading: one jitted on-device all-finite reduction per tensor
  (`nonfinite_tensors`), reported per file (`check_finite`).

Bad files raise `CheckpointFileError` (`gguf_io.GGUFError` subclasses it); missing paths raise
`FileNotFoundError` / `NotADirectoryError`. This module reads files and flags arrays; importing and
exporting weights is `hf_io`, which re-exports these names.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from safetensors import SafetensorError, safe_open

from fipo_jax.core._checks import require


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (library messages sometimes span several)."""
    return " ".join(str(error).split()) or type(error).__name__


SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be used as it is: malformed JSON (config.json, the sharded index,
    tokenizer files), a truncated or corrupt safetensors file, non-finite (NaN / ±inf) weights. The
    message names the file, and the tensor(s) when known."""


_JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
                    bool: "a boolean", type(None): "null"}


def read_json_object(path: str | os.PathLike, error: type[Exception] = CheckpointFileError) -> dict[str, Any]:
    """The JSON object stored in ``path``; ``error`` naming the file if it is not valid JSON or holds
    something other than an object (an array, a string, ...)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e})") from e
    require(isinstance(value, dict),
            f"{path} must hold a JSON object, got {_JSON_TYPE_NAMES.get(type(value), type(value).__name__)}", error)
    return value


def check_model_path(path: str) -> None:
    """A model path names an existing checkpoint folder or GGUF file, not a hub id or a file inside a folder."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist (expected a local Hugging Face checkpoint "
                                "folder or a .gguf file; hub ids are not downloaded)")
    if os.path.isfile(path) and path.endswith((".safetensors", ".json")):
        raise NotADirectoryError(f"model path {path!r} is a file inside a checkpoint folder; pass the folder "
                                f"{os.path.dirname(os.path.abspath(path))!r} instead")


def checkpoint_files(path: str | os.PathLike) -> list[str]:
    """The safetensors files of a checkpoint folder (sharded index first, then single file)."""
    path = os.fspath(path)
    index_path = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.exists(index_path):
        weight_map = read_json_object(index_path).get("weight_map")
        if not (isinstance(weight_map, dict) and bool(weight_map)
                and all(isinstance(name, str) for name in weight_map.values())):
            raise CheckpointFileError(f"{index_path} has no \"weight_map\" object (tensor name → shard file name)")
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        absent = [os.path.basename(file) for file in files if not os.path.isfile(file)]
        if absent:
            raise FileNotFoundError(f"{index_path} lists shard files that do not exist in {path}: {absent}")
        return files
    single = os.path.join(path, SAFETENSORS_SINGLE)
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no {SAFETENSORS_INDEX} or {SAFETENSORS_SINGLE} in {path}")


def open_safetensors(file: str):
    """`safe_open(file)`, or a CheckpointFileError naming the file (and the tensors a truncation cut off)."""
    try:
        return safe_open(file, framework="numpy")
    except SafetensorError as error:
        raise CheckpointFileError(_safetensors_damage(file, error)) from error


def _safetensors_damage(file: str, error: Exception) -> str:
    """One line saying what is wrong with a safetensors file that `safe_open` refused.

    Layout: 8-byte little-endian header length n, n bytes of JSON header ({name: {dtype, shape,
    data_offsets: [begin, end]}}), then the data; offsets count from the end of the header.
    """
    generic = f"{file} is not a readable safetensors file (truncated or corrupt?): {error}"
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            prefix = f.read(9)
            if len(prefix) < 8:
                return f"{file} is truncated: {size} bytes, too short for a safetensors header"
            header_bytes = int.from_bytes(prefix[:8], "little")
            if header_bytes > 100_000_000 or prefix[8:] not in (b"", b"{"):  # the JSON header must follow
                return f"{file} is not a safetensors file (it starts with {prefix!r}): {error}"
            f.seek(8)
            if 8 + header_bytes > size:
                return f"{file} is truncated: {size} bytes, but its header alone needs {8 + header_bytes}"
            header = json.loads(f.read(header_bytes))
        data_bytes = size - 8 - header_bytes
        ends = {name: int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"}
        cut = sorted((name for name, end in ends.items() if end > data_bytes), key=ends.__getitem__)
        if cut:
            shown = ", ".join(repr(name) for name in cut[:5]) + (f" and {len(cut) - 5} more" if len(cut) > 5 else "")
            return (f"{file} is truncated: {size} bytes on disk, its header describes "
                    f"{8 + header_bytes + max(ends.values())}; tensors cut off: {shown}")
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return generic
    return generic


@jax.jit
def _is_finite(array: jax.Array) -> jax.Array:
    """One fused reduction: True iff every element is finite (compiled once per shape/dtype/sharding)."""
    return jnp.isfinite(array).all()


def finite_flags(arrays: Mapping[Any, jax.Array]) -> dict[Any, jax.Array]:
    """Key → on-device bool "every element finite", for the floating-point arrays of ``arrays``:
    one jitted reduction each, dispatched and not fetched (so the arrays may be dropped at once)."""
    return {key: _is_finite(array) for key, array in arrays.items() if jnp.issubdtype(array.dtype, jnp.inexact)}


def nonfinite_tensors(arrays: Mapping[Any, jax.Array]) -> list[Any]:
    """The keys of ``arrays`` whose array holds a NaN or ±inf, in the mapping's order.

    One jitted all-finite reduction per array, all dispatched before a single device→host
    transfer of the flags; nothing the size of an array is copied. Non-float arrays are skipped.
    """
    flags = finite_flags(arrays)
    return [key for key, ok in zip(flags, jax.device_get(list(flags.values()))) if not ok]


def check_finite(loaded: Mapping[str, jax.Array], locate: Callable[[str], tuple[str, str]]) -> None:
    """Raises a CheckpointFileError naming every loaded tensor (and its file) that holds NaN or ±inf;
    ``locate(name)`` gives the (file, tensor name inside that file) of an HF tensor name."""
    raise_if_nonfinite(finite_flags(loaded), locate)


def raise_if_nonfinite(flags: Mapping[str, jax.Array], locate: Callable[[str], tuple[str, str]]) -> None:
    """`check_finite` from `finite_flags` taken earlier (one device→host transfer of all flags)."""
    bad = [key for key, ok in zip(flags, jax.device_get(list(flags.values()))) if not ok]
    if not bad:
        return
    by_file: dict[str, list[str]] = {}
    for key in bad:
        file, name = locate(key)
        by_file.setdefault(file, []).append(name if name == key else f"{name} ({key})")
    where = "; ".join(f"{file}: {names}" for file, names in by_file.items())
    raise CheckpointFileError(f"{len(bad)} tensor(s) hold NaN or ±inf values (a corrupt or diverged checkpoint): "
                              f"{where}")


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) says the disk is full (ENOSPC, or Orbax's RESOURCE_EXHAUSTED)."""
    seen = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if (isinstance(current, OSError) and current.errno == errno.ENOSPC) or "No space left on device" in text \
                or "RESOURCE_EXHAUSTED" in text:
            return True
        current = current.__cause__ or current.__context__
    return False
