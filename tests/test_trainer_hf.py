"""The `data.task="file"` path end to end: a Hugging Face checkpoint folder of each family (tiny,
random, written at test time) with the real Qwen2.5 tokenizer and a DAPO-schema parquet; and the
word-problem task with stop strings."""

import os

import numpy as np
import pytest
import torch
import transformers

from fipo_jax.config import apply_overrides, load_config, qwen25_32b_fipo
from fipo_jax.train.run_log import MetricsLog
from fipo_jax.models.tokenizer import qwen2_5_tokenizer
from fipo_jax.data.encoding import encode_prompt
from fipo_jax.train.trainer import Trainer
from tests.test_data import write_dapo_parquet


FAMILIES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=8)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                    dict(num_hidden_layers=2, head_dim=8, sliding_window=16, sliding_window_pattern=2)),
}


def write_folder(path, family: str, chat_template: bool = True) -> str:
    tokenizer = qwen2_5_tokenizer()
    if chat_template:
        tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>"
                                   "\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                  max_position_embeddings=512, tie_word_embeddings=True,
                                  eos_token_id=tokenizer.eos_token_id), **extra})
    model_cls(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=list(FAMILIES))
def hf_folder(request, tmp_path_factory):
    return request.param, write_folder(tmp_path_factory.mktemp(f"tiny_{request.param}"), request.param)


@pytest.mark.slow
def test_file_task_with_hf_checkpoint(tmp_path, hf_folder):
    family, hf_folder = hf_folder
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
    assert trainer.tokenizer.eos_token_id == 151643 and trainer.policy.config.vocab_size == 151665
    assert trainer.policy.config.model_type == family
    prompt_ids = encode_prompt(trainer.train_records[0], trainer.tokenizer)
    assert trainer.tokenizer.decode(prompt_ids).startswith("<|im_start|>user\nSolve the following math problem")
    summary = trainer.train()
    rows = MetricsLog(os.path.join(tmp_path, "run", "metrics.jsonl")).read()
    assert [r["step"] for r in rows] == [0, 1] and summary["eval_prompts"] == 2
    # A random policy is always wrong here: equal scores, zero advantages, a zero (finite) gradient.
    assert rows[1]["rollout/accuracy"] == 0.0
    assert np.isfinite(rows[1]["actor/loss"]) and np.isfinite(rows[1]["actor/grad_norm"])
    assert rows[1]["rollout/sampler_logprob_gap"] < 1e-3


@pytest.mark.slow
def test_word_problems_with_stop_strings(tmp_path):
    """task="word_problems" on a pretrained tokenizer: plain-text few-shot prompts (no chat
    template), stop strings turned into token sequences, the stop string cut from the scored text."""
    folder = write_folder(tmp_path / "llama", "llama", chat_template=False)
    config = apply_overrides(load_config("gemma3-270m-fipo"), [
        "model.source=hf", f"model.path={folder}", "data.train_prompts=16", "data.eval_prompts=2",
        "rollout.n=2", "rollout.prompts_per_step=2", "rollout.prompts_per_round=2", "rollout.max_rounds=1",
        "rollout.max_response_tokens=12", "rollout.dynamic_sampling=false", "reward.overlong_buffer=4",
        "algo.micro_batch_size=2", "eval.k=2",
        "steps=1", 'rollout.stop=["Question:", "\\n\\n"]'])
    trainer = Trainer(config, str(tmp_path / "run"), progress=False, log=lambda s: None)
    tokenizer = trainer.tokenizer
    assert trainer.sampling.stop_sequences == tuple(dict.fromkeys(
        tuple(tokenizer(v, add_special_tokens=False)["input_ids"]) for s in ("Question:", "\n\n") for v in (s, " " + s)))
    prompt = encode_prompt(trainer.train_records[0], trainer.tokenizer)
    assert tokenizer.decode(prompt).startswith("Question: ") and tokenizer.decode(prompt).endswith("Solution:")
    # A sampled response that ends with a stop sequence is scored without it.
    stop = trainer.sampling.stop_sequences[0]
    answer = tokenizer(" 7\nAnswer: 7\n\n", add_special_tokens=False)["input_ids"]
    tokens = np.asarray([answer + list(stop)], np.int32)
    assert trainer.rollouts.decode(tokens[0], len(answer)).endswith("Answer: 7\n\n")
    rows = MetricsLog(os.path.join(trainer.train() and trainer.run_dir, "metrics.jsonl")).read()
    assert [r["step"] for r in rows] == [0, 1] and np.isfinite(rows[1]["actor/loss"])
    # The trained policy exports as a checkpoint folder transformers loads, with equal logits.
    trainer.export(str(tmp_path / "export"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))("Question:")["input_ids"] == \
        tokenizer("Question:")["input_ids"]
    ids = np.asarray([prompt[:20]], np.int32)
    with torch.no_grad():
        ref = reloaded(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(trainer.policy(ids)), ref, atol=1e-4, rtol=0)
