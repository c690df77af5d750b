"""The `data.task="file"` path end to end: a Hugging Face Qwen2 checkpoint folder (tiny,
random, written at test time) with the real Qwen2.5 tokenizer and a DAPO-schema parquet."""

import os

import numpy as np
import pytest
import torch
import transformers

from fipo_jax.config import apply_overrides, qwen25_32b_fipo
from fipo_jax.metrics import MetricsLog
from fipo_jax.models.tokenizer import qwen2_5_tokenizer
from fipo_jax.trainer import Trainer
from tests.test_data import write_dapo_parquet


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen")
    tokenizer = qwen2_5_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=512, tie_word_embeddings=True,
                                      eos_token_id=tokenizer.eos_token_id)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return str(path)


def test_file_task_with_hf_checkpoint(tmp_path, hf_folder):
    train, evals = str(tmp_path / "train.parquet"), str(tmp_path / "aime.parquet")
    write_dapo_parquet(train, [f"What is {i}+{i}?" for i in range(12)], [str(2 * i) for i in range(12)])
    write_dapo_parquet(evals, ["What is 2+3?", "Compute 7*6."], ["5", "42"])
    config = apply_overrides(qwen25_32b_fipo(), [
        f"model.path={hf_folder}", "model.dtype=float32", "model.compute_dtype=float32", "model.remat=false",
        f"data.train_path={train}", f"data.eval_path={evals}", "data.max_prompt_tokens=120",
        "rollout.n=2", "rollout.prompts_per_step=2", "rollout.prompts_per_round=2", "rollout.max_rounds=1",
        "rollout.dynamic_sampling=false", "rollout.max_response_tokens=8", "reward.overlong_buffer=4",
        "algo.mini_batches=2", "algo.micro_batch_size=2", "eval.k=2", "eval.every=1", "steps=1",
        "optim.warmup_steps=0",
    ])
    trainer = Trainer(config, str(tmp_path / "run"), progress=False, log=lambda s: None)
    assert trainer.tokenizer.eos_token_id == 151643 and trainer.model.config.vocab_size == 151665
    prompt_ids = trainer._encode_prompt(trainer.train_records[0])
    assert trainer.tokenizer.decode(prompt_ids).startswith("<|im_start|>user\nSolve the following math problem")
    summary = trainer.train()
    rows = MetricsLog(os.path.join(tmp_path, "run", "metrics.jsonl")).read()
    assert [r["step"] for r in rows] == [0, 1] and summary["eval_prompts"] == 2
    # A random policy is always wrong here: equal scores, zero advantages, a zero (finite) gradient.
    assert rows[1]["rollout/accuracy"] == 0.0
    assert np.isfinite(rows[1]["actor/loss"]) and np.isfinite(rows[1]["actor/grad_norm"])
    assert rows[1]["rollout/sampler_logprob_gap"] < 1e-3
