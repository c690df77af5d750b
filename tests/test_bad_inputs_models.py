"""Bad inputs on the model-loading path (`load_pretrained`, `load_tokenizer`), each refused in one line
that names the path, file or tensor (issue 10, items 13 and 14): missing paths, files passed for
folders, malformed config.json / index JSON, truncated safetensors, corrupt tokenizer files, NaN /
±inf weights. Tiny checkpoints only (a 2-layer Qwen2 of 64 tokens, a 4-word tokenizer)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from fipo_jax.models import (  # noqa: E402
    ModelOptions,
    CheckpointFileError,
    UnsupportedConfigError,
    load_pretrained,
    nonfinite_tensors,
    save_pretrained,
)
from fipo_jax.models.tokenizer import load_tokenizer  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A pristine tiny Qwen2 checkpoint folder (untied head); tests copy it before damaging it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pristine")
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, tie_word_embeddings=False)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """A pristine 4-token word-level tokenizer folder (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tokenizer")
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>",
                                         unk_token="<unk>").save_pretrained(path)
    return str(path)


def copy_of(folder, tmp_path, name="copy") -> str:
    return shutil.copytree(folder, tmp_path / name)


def edit_tensors(path, edit, file="model.safetensors"):
    tensors = load_file(os.path.join(path, file))
    edit(tensors)
    save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------


def test_a_missing_model_or_tokenizer_path_is_named(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match=f"model path {re.escape(repr(missing))} does not exist"):
        load_pretrained(missing)
    with pytest.raises(FileNotFoundError, match=r"model path 'Qwen/Qwen2.5-0.5B' does not exist .*hub ids are not"):
        load_pretrained("Qwen/Qwen2.5-0.5B")
    with pytest.raises(FileNotFoundError, match=f"model path {re.escape(repr(missing + '.gguf'))} does not exist"):
        load_pretrained(missing + ".gguf")
    with pytest.raises(FileNotFoundError, match=f"tokenizer path {re.escape(repr(missing))} does not exist"):
        load_tokenizer(missing)


def test_a_file_inside_the_checkpoint_folder_is_refused(checkpoint):
    for name in ("config.json", "model.safetensors"):
        with pytest.raises(NotADirectoryError, match=f"is a file inside a checkpoint folder; pass the folder "
                                                     f"{re.escape(repr(checkpoint))}"):
            load_pretrained(os.path.join(checkpoint, name))


def test_a_folder_without_config_json_is_named(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(path))} has no config.json"):
        load_pretrained(path)


# ------------------------------------------------------------------------------------------
# config.json and the sharded index
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, pattern", [
    ("{not json", r"is not valid JSON \(Expecting property name"),
    ("", r"is not valid JSON \(Expecting value: line 1 column 1"),
    ("[1, 2]", "must hold a JSON object, got an array"),
    ('"qwen2"', "must hold a JSON object, got a string"),
], ids=["not-json", "empty", "array", "string"])
def test_a_malformed_config_json_is_named(checkpoint, tmp_path, text, pattern):
    path = copy_of(checkpoint, tmp_path)
    config_file = os.path.join(path, "config.json")
    with open(config_file, "w") as f:
        f.write(text)
    with pytest.raises(CheckpointFileError, match=re.escape(config_file) + " " + pattern):
        load_pretrained(path)


def test_an_unsupported_config_json_names_its_file(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    with open(config_file, "w") as f:
        json.dump({**config, "model_type": "mistral"}, f)
    with pytest.raises(UnsupportedConfigError, match=re.escape(config_file) + ": unsupported model_type 'mistral'"):
        load_pretrained(path)


def test_a_damaged_sharded_index_is_named(checkpoint, tmp_path):
    path = str(tmp_path / "sharded")
    save_pretrained(load_pretrained(checkpoint), path, max_shard_bytes=20_000)
    index = os.path.join(path, "model.safetensors.index.json")
    with open(index) as f:
        original = json.load(f)
    shards = sorted(set(original["weight_map"].values()))
    assert len(shards) > 1
    with open(index, "w") as f:
        f.write("{\"weight_map\": ")
    with pytest.raises(CheckpointFileError, match=re.escape(index) + r" is not valid JSON"):
        load_pretrained(path)
    with open(index, "w") as f:
        json.dump({"metadata": {}}, f)
    with pytest.raises(CheckpointFileError, match=re.escape(index) + r' has no "weight_map" object'):
        load_pretrained(path)
    with open(index, "w") as f:
        json.dump(original, f)
    os.remove(os.path.join(path, shards[-1]))
    with pytest.raises(FileNotFoundError, match=re.escape(index) + rf" lists shard files that do not exist in .*"
                                                                   rf"\['{re.escape(shards[-1])}'\]"):
        load_pretrained(path)


# ------------------------------------------------------------------------------------------
# Truncated safetensors
# ------------------------------------------------------------------------------------------


def _last_tensor(file) -> str:
    """The tensor whose data ends last in a safetensors file (the first one a truncation cuts)."""
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return max(header, key=lambda name: header[name]["data_offsets"][1])


def test_a_truncated_safetensors_file_is_named_with_the_tensors_it_lost(checkpoint, tmp_path):
    file = os.path.join(checkpoint, "model.safetensors")
    data = open(file, "rb").read()
    for cut, pattern in [
        (len(data) - 100, rf"is truncated: {len(data) - 100} bytes on disk, its header describes {len(data)}; "
                          rf"tensors cut off: '{re.escape(_last_tensor(file))}'$"),
        (len(data) // 2, r"is truncated: .* tensors cut off: '.*' and \d+ more$"),
        (100, r"is truncated: 100 bytes, but its header alone needs \d+$"),
        (5, r"is truncated: 5 bytes, too short for a safetensors header$"),
    ]:
        path = copy_of(checkpoint, tmp_path, f"cut{cut}")
        damaged = os.path.join(path, "model.safetensors")
        with open(damaged, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(CheckpointFileError, match=re.escape(damaged) + " " + pattern):
            load_pretrained(path)


def test_a_file_that_is_not_safetensors_is_named(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    damaged = os.path.join(path, "model.safetensors")
    with open(damaged, "wb") as f:
        f.write(b"PK\x03\x04" + bytes(200))  # a zip archive's magic: an absurd header length
    with pytest.raises(CheckpointFileError, match=re.escape(damaged) + " is not a safetensors file"):
        load_pretrained(path)


# ------------------------------------------------------------------------------------------
# NaN / ±inf weights (item 14)
# ------------------------------------------------------------------------------------------


def test_nonfinite_weights_are_named_with_their_file(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)

    def poison(tensors):
        tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan
        tensors["lm_head.weight"][0, 0] = -np.inf

    edit_tensors(path, poison)
    file = os.path.join(path, "model.safetensors")
    expected = (r"2 tensor\(s\) hold NaN or ±inf values \(a corrupt or diverged checkpoint\): "
                + re.escape(f"{file}: ['lm_head.weight', 'model.layers.1.mlp.up_proj.weight']") + "$")
    with pytest.raises(CheckpointFileError, match=expected):
        load_pretrained(path)
    edit_tensors(path, lambda tensors: tensors["lm_head.weight"].fill(0.5))
    with pytest.raises(CheckpointFileError, match=r"1 tensor\(s\) hold NaN.*\['model.layers.1.mlp.up_proj.weight'\]$"):
        load_pretrained(path, ModelOptions(dtype="bfloat16"))


def test_nonfinite_weights_in_a_sharded_checkpoint_name_the_shard(checkpoint, tmp_path):
    path = str(tmp_path / "sharded")
    save_pretrained(load_pretrained(checkpoint), path, max_shard_bytes=20_000)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = json.load(f)["weight_map"]["model.norm.weight"]
    edit_tensors(path, lambda t: t["model.norm.weight"].__setitem__(0, np.inf), file=shard)
    with pytest.raises(CheckpointFileError, match=re.escape(f"{os.path.join(path, shard)}: ['model.norm.weight']")):
        load_pretrained(path)


def test_a_tied_lm_head_copy_with_nan_is_reported_as_nan(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "tied")
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, tie_word_embeddings=True)).save_pretrained(path)

    def poison(tensors):
        tensors["model.embed_tokens.weight"][1, 2] = np.nan
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()

    edit_tensors(path, poison)
    with pytest.raises(CheckpointFileError, match=r"1 tensor\(s\) hold NaN.*\['model.embed_tokens.weight'\]"):
        load_pretrained(path)


def test_nonfinite_tensors_checks_float_arrays_only():
    arrays = {"ok": jnp.ones((3, 2)), "nan": jnp.array([0.0, jnp.nan], jnp.bfloat16), "ids": jnp.arange(3),
              "inf": jnp.full((2, 2), -jnp.inf)}
    assert nonfinite_tensors(arrays) == ["nan", "inf"]
    assert nonfinite_tensors({}) == []


# ------------------------------------------------------------------------------------------
# Tokenizer files
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, text, pattern", [
    ("tokenizer.json", "{not json", r"is not valid JSON \(Expecting property name"),
    ("tokenizer.json", None, r"is not valid JSON \(Expecting"),  # truncated to half
    ("tokenizer.json", '{"version": "1.0"}', r"is not a valid tokenizer.json \(Model missing"),
    ("tokenizer_config.json", "[1]", "must hold a JSON object, got an array"),
], ids=["tokenizer-not-json", "tokenizer-truncated", "tokenizer-wrong-schema", "config-array"])
def test_a_corrupt_tokenizer_file_is_named(tokenizer_folder, tmp_path, name, text, pattern):
    assert load_tokenizer(tokenizer_folder).encode("a b") == [2, 3]
    path = copy_of(tokenizer_folder, tmp_path)
    file = os.path.join(path, name)
    if text is None:
        text = open(file).read()
        text = text[: len(text) // 2]
    with open(file, "w") as f:
        f.write(text)
    with pytest.raises(CheckpointFileError, match=re.escape(file) + " " + pattern):
        load_tokenizer(path)
