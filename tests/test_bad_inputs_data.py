"""Issue 10, data side: every bad input is named (file, row, field), nothing is silently converted,
pathological ground truths stay cheap, and a damaged SFT cache is rebuilt rather than fatal."""

import io
import json
import pickle
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fipo_jax.train import sft

from fipo_jax.data.prompts import ground_truth_text, load_prompt_records
from fipo_jax.rewards import MathVerifyWorker, RewardConfig, check_equivalence, dapo_math_score, normalize_answer
from fipo_jax.rewards import verify as verify_module

# The inputs of the issue: quadratic in the old normaliser (29.6 s and 63 s), linear now.
PATHOLOGICAL_GOLDS = {
    "text_8000": ("\\text{" * 8000, "{" * 8000),  # unclosed groups keep their "{"
    "text_96kb": ("\\text{" * 16000, "{" * 16000),
    "nested_braces": ("{" * 20000 + "}" * 20000, ""),
    "assignments": ("x=" * 20000 + "1", "1"),
    "math_openings": ("\\(" * 20000, "\\(" * 20000),
    "boxed_nested": ("\\boxed{" * 8000 + "7" + "}" * 8000, "7"),
}


# ---------------------------------------------------------------------------------------------
# item 12: ground-truth normalisation is bounded


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL_GOLDS))
def test_normaliser_is_linear_on_pathological_ground_truths(name):
    raw, expected = PATHOLOGICAL_GOLDS[name]
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        (r"\text{ \text{a}", "{a"),  # the outer group never closes: only its name goes
        (r"\boxed{\text{x}}", "x"),
        (r"\text{a}}", "a}"),
        (r"\{\text{a}\}", r"\{a\}"),  # escaped braces are not groups
        ("{{7}}", "7"),
        ("{1}{2}", "{1}{2}"),  # braces that do not enclose the whole answer stay
        ("x = y = 3", "3"),
        ("$$1$$ and $2$", "1"),
        (r"\(4\) or $5$", "4"),
    ],
)
def test_linear_normaliser_keeps_the_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_over_long_gold_is_rejected_before_normalisation(monkeypatch):
    def refuse(text):
        raise AssertionError("an over-long gold must not be normalised")

    monkeypatch.setattr(verify_module, "normalize_answer", refuse)
    worker = MathVerifyWorker()
    verdict = check_equivalence("\\text{" * 8000, "5", max_answer_chars=1024, worker=worker)
    assert (verdict.equal, verdict.method) == (False, "rejected")
    assert verdict.error == "gold answer is 48000 characters, over max_answer_chars=1024: not compared"
    assert worker.starts == 0


def test_over_long_gold_scores_wrong_and_says_so():
    result = dapo_math_score("Answer: 5", "5" + " " * 2000, RewardConfig(use_math_verify=False))
    assert result.score == -1.0 and not result.correct
    assert "gold answer is 2001 characters, over max_answer_chars=1024" in result.error


# ---------------------------------------------------------------------------------------------
# item 3: ground truths are strings (or plain integers), checked on every loader path


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def write_parquet(path, table):
    import pyarrow.parquet as pq

    pq.write_table(table, str(path))
    return str(path)


BAD_GROUND_TRUTHS = [
    (["1", "2"], r"answer must be a string \(or an integer\), got list \['1', '2'\]"),
    (True, r"answer must be a string \(or an integer\), got bool True"),
    (float("nan"), r"answer must be a string \(or an integer\), got float nan"),
    (2.5, r"answer must be a string \(or an integer\), got float 2.5"),
    ({"value": "3"}, r"answer must be a string \(or an integer\), got dict"),
    ("", "answer is empty"),
    ("   ", "answer is empty"),
    (r"\boxed{", r"answer '\\\\boxed\{' has an empty or unbalanced \\boxed\{\}"),
    (r"so \boxed{}", r"answer 'so \\\\boxed\{\}' has an empty or unbalanced \\boxed\{\}"),
    ("$ $", "answer '\\$ \\$' is empty after normalisation"),
    ("7" * 1025, "answer is 1025 characters long, over the 1024-character limit"),
]


@pytest.mark.parametrize("value, message", BAD_GROUND_TRUTHS)
def test_bad_ground_truth_in_flat_jsonl_is_named(tmp_path, value, message):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "ok?", "answer": "1"}, {"problem": "q?", "answer": value}])
    with pytest.raises(ValueError, match=r"p\.jsonl line 2: " + message):
        load_prompt_records(path)


def test_bad_ground_truth_in_nested_schemas_is_named(tmp_path):
    import pyarrow as pa

    nested = {"prompt": [{"role": "user", "content": "q?"}], "reward_model": {"ground_truth": True}}
    path = write_jsonl(tmp_path / "dapo.jsonl", [nested])
    with pytest.raises(ValueError, match=r"dapo\.jsonl line 1: reward_model\.ground_truth must be a string .*got bool"):
        load_prompt_records(path)
    (tmp_path / "dapo.json").write_text(json.dumps([nested]))
    with pytest.raises(ValueError, match=r"dapo\.json row 0: reward_model\.ground_truth must be a string"):
        load_prompt_records(str(tmp_path / "dapo.json"))
    messages = [[{"role": "user", "content": "a?"}], [{"role": "user", "content": "b?"}]]
    for values, row, message in [
        (pa.array([b"1", b"2"]), 0, "got bytes b'1'"),
        (pa.array([3, float("nan")]), 0, "got float 3.0"),  # a float column: 3.0 is not taken for "3"
        (pa.array([["1"], ["1", "2"]]), 0, "got list"),
        (pa.array(["3", r"\boxed{4"]), 1, r"has an empty or unbalanced \\boxed"),
    ]:
        table = pa.table({"prompt": messages, "reward_model": pa.StructArray.from_arrays([values], ["ground_truth"])})
        path = write_parquet(tmp_path / "dapo.parquet", table)
        with pytest.raises(ValueError, match=rf"dapo\.parquet row {row}: reward_model\.ground_truth .*" + message):
            load_prompt_records(path)
    table = pa.table({"question": ["a?", "b?"], "ground_truth": [True, False]})
    with pytest.raises(ValueError, match=r"flat\.parquet row 0: ground_truth must be a string .*got bool True"):
        load_prompt_records(write_parquet(tmp_path / "flat.parquet", table))


def test_integer_ground_truths_are_written_as_digits(tmp_path):
    import pyarrow as pa

    path = write_jsonl(tmp_path / "ints.jsonl", [{"problem": "q?", "answer": 42}, {"problem": "r?", "answer": -7}])
    assert [r.ground_truth for r in load_prompt_records(path)] == ["42", "-7"]
    table = pa.table({"question": ["a?"], "ground_truth": pa.array([1024], pa.int64())})
    assert load_prompt_records(write_parquet(tmp_path / "ints.parquet", table))[0].ground_truth == "1024"
    assert ground_truth_text(r"\boxed{5}", "x") == r"\boxed{5}"  # kept as written; the reward unwraps it


def test_ground_truth_cap_is_configurable_and_checked(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "q?", "answer": "12345"}])
    with pytest.raises(ValueError, match="p.jsonl line 1: answer is 5 characters long, over the 4-character limit"):
        load_prompt_records(path, max_ground_truth_chars=4)
    with pytest.raises(ValueError, match="max_ground_truth_chars must be a positive int, got 0"):
        load_prompt_records(path, max_ground_truth_chars=0)
    with pytest.raises(ValueError, match="limit must be a positive int or None, got 0"):
        load_prompt_records(path, limit=0)


def test_pathological_ground_truth_is_refused_at_load(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "q?", "answer": "\\text{" * 8000}])
    with pytest.raises(ValueError, match="p.jsonl line 1: answer is 48000 characters long, over the 1024-character"):
        load_prompt_records(path)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "", "answer": "1"}, "line 1: prompt is empty"),
        ({"prompt": [], "answer": "1"}, "line 1: prompt has no messages"),
        ({"prompt": [{"role": "user", "content": None}], "answer": "1"},
         r"line 1: prompt messages must be \{'role': str, 'content': str\} dicts"),
        ({"prompt": 5, "answer": "1"}, "line 1: prompt must be a string or a list of messages, got int"),
        ({"prompt": "q", "reward_model": "1"}, "line 1: reward_model must be an object with a ground_truth field, got str"),
    ],
)
def test_bad_prompt_fields_are_named(tmp_path, row, message):
    with pytest.raises(ValueError, match=r"p\.jsonl " + message):
        load_prompt_records(write_jsonl(tmp_path / "p.jsonl", [row]))


# ---------------------------------------------------------------------------------------------
# item 13: broken files are named, with the real line


def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"problem": "ok", "answer": "1"}).encode() + b"\n"
                     + '{"problem": "caf\u00e9", "answer": "2"}'.encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=r"latin1\.jsonl line 2: not UTF-8 text \(byte 0xe9 at column 17\); "
                                         r"save the file as UTF-8"):
        load_prompt_records(str(path))
    json_path = tmp_path / "latin1.json"
    json_path.write_bytes(b'[\n{"problem": "ok", "answer": "1"},\n{"problem": "caf\xe9", "answer": "2"}]')
    with pytest.raises(ValueError, match=r"latin1\.json line 3: not UTF-8 text \(byte 0xe9"):
        load_prompt_records(str(json_path))


def test_bad_jsonl_line_reports_its_real_line_number(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n\n{"problem": "b", "answer": "2"}\n{"problem": "c", answer: 3}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl line 4: not valid JSON \(Expecting property name enclosed in "
                                         r"double quotes, column 18\)"):
        load_prompt_records(str(path))


@pytest.mark.parametrize("line, kind", [('["q", "1"]', "list"), ("3", "int"), ('"q"', "str"), ("null", "NoneType")])
def test_non_object_jsonl_line_is_named(tmp_path, line, kind):
    path = tmp_path / "p.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"p\.jsonl line 2: expected a JSON object per line, got {kind}"):
        load_prompt_records(str(path))


def test_empty_and_misshapen_files_are_named(tmp_path):
    for name, text in [("empty.jsonl", ""), ("blank.jsonl", "\n  \n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name} holds no prompts \(no rows, or only blank lines\)"):
            load_prompt_records(str(tmp_path / name))
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ValueError, match=r"empty\.json is empty: expected a JSON list of prompt objects"):
        load_prompt_records(str(tmp_path / "empty.json"))
    (tmp_path / "obj.json").write_text('{"problem": "a", "answer": "1"}')
    with pytest.raises(ValueError, match=r"obj\.json: expected a JSON list of prompt objects, got dict"):
        load_prompt_records(str(tmp_path / "obj.json"))
    (tmp_path / "items.json").write_text('[{"problem": "a", "answer": "1"}, 7]')
    with pytest.raises(ValueError, match=r"items\.json row 1: expected a JSON object, got int"):
        load_prompt_records(str(tmp_path / "items.json"))
    (tmp_path / "bad.json").write_text('[{"problem": "a",\n "answer": }]')
    with pytest.raises(ValueError, match=r"bad\.json line 2: not valid JSON \(Expecting value, column 12\)"):
        load_prompt_records(str(tmp_path / "bad.json"))
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"prompt file .*folder\.jsonl is not a file"):
        load_prompt_records(str(tmp_path / "folder.jsonl"))


def test_byte_order_mark_and_unicode_line_separators_are_fine(tmp_path):
    path = tmp_path / "p.jsonl"
    row = json.dumps({"problem": "a\u2028b", "answer": "1"}, ensure_ascii=False)  # U+2028 inside a string
    path.write_bytes(b"\xef\xbb\xbf" + row.encode() + b"\r\n")
    assert [(r.prompt, r.ground_truth) for r in load_prompt_records(str(path))] == [("a\u2028b", "1")]


@pytest.mark.parametrize("content", [b"", b"not a parquet file at all", b"PAR1" + b"\0" * 64])
def test_file_that_is_not_parquet_is_named(tmp_path, content):
    path = tmp_path / "data.parquet"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"data\.parquet: not a readable parquet file \("):
        load_prompt_records(str(path))


# ---------------------------------------------------------------------------------------------
# item 10: a damaged SFT cache is named and rebuilt


class TinyModel(nnx.Module):
    """Two parameters: enough for the cache's checks, no model build."""

    def __init__(self, value: float = 0.0):
        self.w = nnx.Param(jnp.full((2, 3), value, jnp.float32))
        self.b = nnx.Param(jnp.full((3,), value, jnp.float32))


def _values(model):
    return float(model.w[...].sum()), float(model.b[...].sum())


def _damage(path, how):
    data = path.read_bytes()
    if how == "garbage":
        path.write_bytes(b"this is not a zip archive" * 4)
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "bit_flip":  # inside a stored array: the zip CRC check catches it
        middle = len(data) // 3
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    elif how == "npy":  # a bare array where an archive should be
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(3))
        path.write_bytes(buffer.getvalue())


DAMAGE = {
    "garbage": r"is not a complete \.npz archive \(truncated or overwritten\)",
    "truncated": r"is not a complete \.npz archive \(truncated or overwritten\)",
    "empty": "is empty",
    "bit_flip": r"is unreadable \(BadZipFile: Bad CRC-32 for file '[wb]\.npy'\)",
    "npy": r"is a bare \.npy array, not an \.npz archive",
}


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_sft_cache_raises_naming_the_file(tmp_path, how):
    path = tmp_path / "sft-abc.npz"
    sft.save_params(TinyModel(1.0), str(path))
    _damage(path, how)
    model = TinyModel(0.0)
    with pytest.raises(sft.SFTCacheError, match=rf"^SFT cache {re.escape(str(path))} {DAMAGE[how]}; "
                                                r"delete it to retrain the warm start$"):
        sft.load_params(model, str(path))
    assert _values(model) == (0.0, 0.0)  # untouched


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_sft_cache_is_moved_aside_and_rebuilt(tmp_path, how):
    path = tmp_path / "sft-abc.npz"
    sft.save_params(TinyModel(1.0), str(path))
    _damage(path, how)
    damaged = path.read_bytes()
    model = TinyModel(0.0)
    with pytest.warns(RuntimeWarning, match=rf"SFT cache {re.escape(str(path))} {DAMAGE[how]}: moved it to "
                                            rf"{re.escape(str(path))}\.corrupt; retraining the warm start"):
        assert sft.load_cached_params(model, str(path)) is False
    assert not path.exists() and (tmp_path / "sft-abc.npz.corrupt").read_bytes() == damaged  # nothing lost
    sft.save_params(TinyModel(2.0), str(path))  # what the caller does next: retrain, rewrite
    assert sft.load_cached_params(model, str(path)) is True and _values(model) == (12.0, 6.0)


def test_sft_cache_of_another_model_or_with_nans_is_refused(tmp_path):
    path = str(tmp_path / "sft.npz")
    np.savez(path, w=np.zeros((2, 3), np.float32))
    with pytest.raises(sft.SFTCacheError, match=r"sft\.npz lacks parameter 'b' \(the model changed\)"):
        sft.load_params(TinyModel(), path)
    np.savez(path, w=np.zeros((3, 2), np.float32), b=np.zeros(3, np.float32))
    with pytest.raises(sft.SFTCacheError, match=r"sft\.npz has parameter 'w' of shape \(3, 2\), the model expects "
                                                r"\(2, 3\)"):
        sft.load_params(TinyModel(), path)
    np.savez(path, w=np.full((2, 3), np.nan, np.float32), b=np.zeros(3, np.float32))
    with pytest.raises(sft.SFTCacheError, match=r"sft\.npz has non-finite values in parameter 'w'"):
        sft.load_params(TinyModel(), path)
    messages = []
    assert sft.load_cached_params(TinyModel(), path, warn=messages.append) is False
    assert messages == [f"SFT cache {path} has non-finite values in parameter 'w': moved it to {path}.corrupt; "
                        "retraining the warm start"]
    assert sft.load_cached_params(TinyModel(), path) is False  # no file: nothing to warn about
    err = sft.SFTCacheError(path, "is odd")
    assert pickle.loads(pickle.dumps(err)).args == err.args
