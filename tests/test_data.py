"""Prompt loaders (DAPO parquet schema, JSONL), the resumable iterator, the synthetic task."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fipo_jax.data import CharTokenizer, ChainTask, PromptIterator, PromptRecord, load_prompt_records, render_prompt

DAPO_INSTRUCTION = ("Solve the following math problem step by step. The last line of your response should be of the "
                    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{q}\n\n"
                    "Remember to put your answer on its own line after \"Answer:\".")


def write_dapo_parquet(path, questions, answers):
    """A fixture in the DAPO-Math-17k / AIME-2024 parquet schema."""
    table = pa.table({
        "data_source": ["math_dapo"] * len(questions),
        "prompt": [[{"role": "user", "content": DAPO_INSTRUCTION.format(q=q)}] for q in questions],
        "ability": ["MATH"] * len(questions),
        "reward_model": [{"ground_truth": a, "style": "rule-lighteval/MATH_v2"} for a in answers],
        "extra_info": [{"index": f"id-{i}"} for i in range(len(questions))],
    })
    pq.write_table(table, path)


def test_dapo_parquet_schema(tmp_path):
    path = str(tmp_path / "dapo.parquet")
    write_dapo_parquet(path, ["What is 1+1?", "Compute $2^{10}$."], ["2", "1024"])
    records = load_prompt_records(path)
    assert [r.ground_truth for r in records] == ["2", "1024"]
    assert records[1].messages()[0]["role"] == "user" and "2^{10}" in records[1].messages()[0]["content"]
    assert records[0].data_source == "math_dapo" and records[1].index == "id-1"
    assert render_prompt(records[0]).endswith('after "Answer:".')
    assert len(load_prompt_records(path, limit=1)) == 1


def test_jsonl_flat_schema_and_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"problem": "1+2?", "answer": 3}) + "\n\n" + json.dumps({"prompt": "x", "ground_truth": "y"}))
    assert [(r.prompt, r.ground_truth) for r in load_prompt_records(str(good))] == [("1+2?", "3"), ("x", "y")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}))
    with pytest.raises(ValueError, match=r"bad.jsonl line 1: no answer .*fields: \['question'\]"):
        load_prompt_records(str(bad))
    bad.write_text(json.dumps({"answer": "1"}))
    with pytest.raises(ValueError, match="no prompt field"):
        load_prompt_records(str(bad))
    with pytest.raises(FileNotFoundError):
        load_prompt_records(str(tmp_path / "missing.parquet"))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="unsupported prompt file type"):
        load_prompt_records(str(tmp_path / "x.csv"))


def test_chat_template_is_used_when_present():
    class Tok:
        chat_template = "yes"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return "<|im_start|>user\n" + messages[0]["content"] + "<|im_end|>\n<|im_start|>assistant\n"

    assert render_prompt(PromptRecord("hi", "1"), Tok()).endswith("assistant\n")


def test_iterator_is_deterministic_and_resumable():
    records = [PromptRecord(str(i), str(i)) for i in range(10)]
    a = PromptIterator(records, seed=3)
    first = [r.prompt for r in a.next_batch(7)] + [r.prompt for r in a.next_batch(7)]
    assert sorted(first[:10]) == sorted(str(i) for i in range(10))  # one full epoch, then the next
    b = PromptIterator(records, seed=3)
    b.next_batch(7)
    state = b.state()
    c = PromptIterator(records, seed=3)
    c.restore(state)
    assert [r.prompt for r in c.next_batch(7)] == first[7:]
    with pytest.raises(ValueError, match="the data or seed changed"):
        PromptIterator(records[:5], seed=3).restore(state)


def test_char_tokenizer_round_trip_and_errors():
    tok = CharTokenizer()
    text = "Q: 3+5=\n3+5=8\nAnswer: 8"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.ids["Answer:"] in ids
    assert tok.decode([tok.bos_token_id] + ids + [tok.eos_token_id, tok.pad_token_id]) == text
    with pytest.raises(ValueError, match="character 'x' at position 0"):
        tok.encode("x")


def test_chain_task():
    task = ChainTask(n_terms=4)
    problem = ((3, 5, 2, 7), "+*+")
    assert task.prompt(problem) == "Q: 3+5*2+7=" and task.answer(problem) == "3"  # ((3+5)·2+7) mod 10
    assert task.step_solution(problem) == "3+5=8\n8*2=6\n6+7=3\nAnswer: 3"
    assert task.direct_solution(problem) == "Answer: 3"
    tok = CharTokenizer()
    assert tok.decode(tok.encode(task.step_solution(problem))) == task.step_solution(problem)
    assert task.max_response_tokens() == len(tok.encode(task.step_solution(problem))) + 1
    assert task.prompt_tokens() == len(tok.encode(task.prompt(problem))) + 1
    demos = task.demonstrations(np.random.default_rng(0), 400, step_fraction=0.25)
    share = np.mean(["\n" in s for _, s in demos])
    assert 0.18 < share < 0.32
    for record in task.problems(np.random.default_rng(1), 20):
        assert record["ground_truth"] in "0123456789" and record["prompt"].startswith("Q: ")
    with pytest.raises(ValueError, match="n_terms must be an int >= 2"):
        ChainTask(n_terms=1)
    with pytest.raises(ValueError, match="ops must be a non-empty string"):
        ChainTask(ops="/")
    with pytest.raises(ValueError, match="step_fraction must be in"):
        task.demonstrations(np.random.default_rng(0), 1, 1.5)
