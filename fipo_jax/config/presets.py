"""The named run configurations (`PRESETS`) and `with_algo`, which swaps a config's loss for the
official one of another algorithm.

>>> sorted(PRESETS)[:2]
['cpu_default', 'cpu_skewed_chain']
>>> with_algo(cpu_default(), "grpo").algo.loss.loss_mode
'grpo'
"""

from __future__ import annotations

import dataclasses

from fipo_jax.config.specs import (
    AlgoSpec,
    ConfigError,
    DataSpec,
    EvalSpec,
    LoraSpec,
    ModelSpec,
    OptimSpec,
    RewardSpec,
    RolloutSpec,
    SFTSpec,
    TrainConfig,
)
from fipo_jax.core import _checks
from fipo_jax.core.losses import LOSS_MODES, LossMode, PolicyLossConfig


def with_algo(config: TrainConfig, algo: LossMode) -> TrainConfig:
    """Swap the loss to the official preset of ``algo``, one of `losses.LOSS_MODES` ("fipo" keeps the
    config's FIPO settings)."""
    _checks.check_choice("--algo", algo, LOSS_MODES, error=ConfigError)
    keep = algo == "fipo" and config.algo.loss.loss_mode == "fipo"
    loss = config.algo.loss if keep else PolicyLossConfig(loss_mode=algo)
    return dataclasses.replace(config, algo=dataclasses.replace(config.algo, loss=loss))


# ------------------------------------------------------------------------------- presets

def cpu_default() -> TrainConfig:
    """The CPU testbed (≤ 10 min, 2 cores): a tiny Qwen2 on invertible 8-term chains, whose answers
    are uniform (no guess beats 1/10) and whose worked solutions pay (README, "The testbed"). It
    starts from the packaged warm start: demonstrations that stop after 0 … 7 worked steps and then
    answer, so every length from a 4-token guess to the 46-token chain is there for RL to choose.
    FIPO with the paper's 8 mini-batch updates per step, τ = 8 scaled to the response length."""
    return TrainConfig(
        name="cpu_default",
        steps=30,
        data=DataSpec(n_terms=8, invertible=True, eval_prompts=128),
        rollout=RolloutSpec(n=8, prompts_per_step=32, prompts_per_round=48, max_rounds=3, max_response_tokens=64),
        reward=RewardSpec(overlong_buffer=16),
        algo=AlgoSpec(loss=PolicyLossConfig(decay_rate=8.0), mini_batches=8, micro_batch_size=32, packing=False),
        optim=OptimSpec(lr=1e-4, warmup_steps=2, weight_decay=0.0),
        eval=EvalSpec(every=10, k=4, top_p=1.0),
        sft=SFTSpec(steps=2000, step_fraction=0.9, partial=True, seed=0),
    )


def cpu_skewed_chain() -> TrainConfig:
    """The CPU experiment before the testbed: 18-term chains mod 10 with × by any digit, whose
    skewed answers let a guess from the last operation be right 33 % of the time (a shortcut that
    beats composing 17 steps); SFT on half direct, half step-by-step solutions, τ = 16."""
    return TrainConfig(
        name="cpu_skewed_chain",
        steps=30,
        data=DataSpec(n_terms=18, eval_prompts=128),
        rollout=RolloutSpec(n=8, prompts_per_step=32, prompts_per_round=48, max_rounds=3, max_response_tokens=128),
        reward=RewardSpec(overlong_buffer=16),
        # Unpacked: with responses ≤ 128 tokens packing saves ~0.4 s of a ~2 s update, less than the
        # ~6 s compile each new packed shape costs in a 30-step run (docs/functional-api.md, "Packed updates").
        algo=AlgoSpec(loss=PolicyLossConfig(decay_rate=16.0), mini_batches=8, micro_batch_size=32, packing=False),
        optim=OptimSpec(lr=1e-4, warmup_steps=2, weight_decay=0.0),
        eval=EvalSpec(every=10, k=4, top_p=1.0),
        sft=SFTSpec(steps=800),
    )


def qwen25_32b_fipo() -> TrainConfig:
    """Official FIPO recipe for Qwen2.5-32B-Base on DAPO-Math-17k (the official release's script)."""
    return TrainConfig(
        name="qwen2.5-32b-fipo",
        steps=575,
        model=ModelSpec(source="hf", path="/path/to/Qwen2.5-32B", dtype="bfloat16", compute_dtype="bfloat16",
                        remat="full", logprob_chunk_size=1024, attention_chunk_size=512),
        data=DataSpec(task="file", train_path="/path/to/dapo-math-17k.parquet", eval_path="/path/to/aime-2024.parquet",
                      max_prompt_tokens=2048),
        rollout=RolloutSpec(n=16, prompts_per_step=512, prompts_per_round=2048, max_rounds=10, on_exhausted="error",
                            max_response_tokens=20480, temperature=1.0, top_p=1.0),
        reward=RewardSpec(overlong_buffer=4096, overlong_factor=1.0),
        algo=AlgoSpec(loss=PolicyLossConfig.fipo_32b(), mini_batches=8, micro_batch_size=8),
        optim=OptimSpec(lr=1e-6, warmup_steps=10, weight_decay=0.1, grad_clip=1.0),
        eval=EvalSpec(every=5, k=32, temperature=1.0, top_p=0.7),
        sft=SFTSpec(enabled=False),
        checkpoint_every=5,
    )


def qwen25_7b_fipo() -> TrainConfig:
    """The 7B pilot (the paper's smaller run): G = 32, balanced influence clip, safety 3, 10,240 tokens."""
    base = qwen25_32b_fipo()
    return dataclasses.replace(
        base,
        name="qwen2.5-7b-math-fipo",
        model=dataclasses.replace(base.model, path="/path/to/Qwen2.5-Math-7B"),
        rollout=dataclasses.replace(base.rollout, n=32, max_response_tokens=10240),
        reward=RewardSpec(overlong_buffer=2048),
        algo=AlgoSpec(loss=PolicyLossConfig.fipo_7b(), mini_batches=8, micro_batch_size=8),
    )


def gemma3_270m_fipo() -> TrainConfig:
    """FIPO on a real pretrained base model that fits this CPU: Gemma 3 270M (the packaged
    Q4_K_M GGUF, dequantised to float32) on two-shot arithmetic word problems of one step, which
    it solves partly before RL (~8–16 % avg@2); generation stops at the next "Question:".
    About 2.5 minutes per RL step on 2 CPU cores (12 steps + load, 4 evaluations and export
    ≈ 35 minutes). Remat (a rematerialised scan over the layers) is on: on XLA:CPU it is as fast
    as without and cuts the update's temporaries from 11 to 2.5 GiB (`bench_gemma.py`)."""
    return TrainConfig(
        name="gemma3-270m-fipo",
        steps=12,
        model=ModelSpec(source="gemma3-270m", dtype="float32", compute_dtype="float32", remat="full",
                        logprob_chunk_size=32),
        data=DataSpec(task="word_problems", train_prompts=4096, eval_prompts=32, max_prompt_tokens=384,
                      max_steps=1, few_shot=2),
        rollout=RolloutSpec(n=4, prompts_per_step=6, prompts_per_round=8, max_rounds=2, on_exhausted="pad",
                            max_response_tokens=64, temperature=1.0, stop=("Question:",)),
        reward=RewardSpec(overlong_buffer=16),
        algo=AlgoSpec(loss=PolicyLossConfig.fipo_32b(), mini_batches=2, micro_batch_size=6),
        optim=OptimSpec(lr=1e-6, warmup_steps=0, weight_decay=0.0),
        eval=EvalSpec(every=4, k=2, temperature=1.0, top_p=1.0),
        sft=SFTSpec(enabled=False),
        checkpoint_every=4,
    )


def gemma3_270m_fipo_lora() -> TrainConfig:
    """The Gemma 3 270M CPU recipe training rank-16 adapters (α 32) on every projection instead of every
    weight (`fipo_jax.models.lora`); the learning rate ×10, as adapters usually take (not tuned here).
    `experiments/bench_lora.py` measures it against the full fine-tune."""
    base = gemma3_270m_fipo()
    return dataclasses.replace(
        base, name="gemma3-270m-fipo-lora",
        model=dataclasses.replace(base.model, lora=LoraSpec(rank=16, alpha=32.0)),
        optim=dataclasses.replace(base.optim, lr=1e-5))


def gemma3_270m_fipo_accelerator() -> TrainConfig:
    """The Gemma 3 270M recipe sized for one GPU / TPU host: 64 prompts × 8 responses per step,
    one to three reasoning steps, 256-token responses, 8 mini-batches (the paper's count),
    bfloat16 compute, 200 steps. Untested on an accelerator so far (none was lent)."""
    base = gemma3_270m_fipo()
    return dataclasses.replace(
        base,
        name="gemma3-270m-fipo-accelerator",
        steps=200,
        model=dataclasses.replace(base.model, compute_dtype="bfloat16", logprob_chunk_size=128),
        data=dataclasses.replace(base.data, max_steps=3, eval_prompts=256),
        rollout=dataclasses.replace(base.rollout, n=8, prompts_per_step=64, prompts_per_round=128, max_rounds=4,
                                    max_response_tokens=256),
        reward=RewardSpec(overlong_buffer=64),
        algo=dataclasses.replace(base.algo, mini_batches=8, micro_batch_size=16),
        optim=OptimSpec(lr=2e-6, warmup_steps=5, weight_decay=0.0),
        eval=EvalSpec(every=10, k=8, temperature=1.0, top_p=1.0),
        checkpoint_every=10,
    )


PRESETS = {"cpu_default": cpu_default, "cpu_skewed_chain": cpu_skewed_chain,
           "qwen2.5-32b-fipo": qwen25_32b_fipo, "qwen2.5-7b-fipo": qwen25_7b_fipo,
           "gemma3-270m-fipo": gemma3_270m_fipo, "gemma3-270m-fipo-lora": gemma3_270m_fipo_lora,
           "gemma3-270m-fipo-accelerator": gemma3_270m_fipo_accelerator}
