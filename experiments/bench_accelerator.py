"""The accelerator figures in one run: Future-KL methods, train-step MFU of a Qwen2.5-0.5B-shaped
policy, decode tokens/s of the static sampler and the engine, and the memory planner's prediction
against the device's real peak.

    python experiments/bench_accelerator.py --out runs/accelerator.json     # on a GPU / TPU
    python experiments/bench_accelerator.py --tiny                           # a CPU smoke run (tests)

1. **Future-KL methods**: FIPO loss + gradient (no metrics) with each exact method, and our DAPO
   loss, side by side (`bench_loss.time_interleaved`); the fastest method is what
   ``fipo_jax.future_kl.DEFAULT_METHOD_BY_BACKEND`` should say for this backend.
2. **Train-step MFU**: `rl_update` (old-log-prob pass + forward/backward + AdamW) of random bfloat16
   weights of the Qwen2.5-0.5B shape on one micro-batch layout, median seconds per update after
   compiling; model FLOPs per token = 4 × forward (3 for training, 1 for the old log-probs), forward
   = 2 × matmul parameters + 2·H·K·T for causal attention; MFU = FLOPs / s / the chip's dense bf16
   peak (`PEAK_TFLOPS`, or ``--peak-tflops``). Recomputation (remat, chunked attention) is not
   counted, as usual.
3. **Decode**: new tokens/s of `sampling.generate` and `engine.generate` for the same model, every
   row decoding its whole budget (no EOS).
4. **Memory**: `jax.Device.memory_stats()["peak_bytes_in_use"]` after the updates against
   `fipo_jax.plan`'s update peak for the same layout (accelerators only; CPU has no such counter).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import fipo_jax as fj
from fipo_jax import engine as engine_lib
from fipo_jax import plan as plan_lib
from fipo_jax import rl_step
from fipo_jax.config import apply_overrides, cpu_default
from fipo_jax.models import CausalLM, ModelConfig
from fipo_jax.sampling import SamplingConfig, generate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loss import jax_loss_grad, make_batch, time_interleaved  # noqa: E402  the same loss timing

# Dense bfloat16 peak per chip, from the vendors' data sheets (matched against device_kind).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v4": 275.0, "TPU v6": 918.0}

FULL = dict(model=plan_lib.KNOWN_MODELS["qwen2.5-0.5b"], rows=8, prompt=256, response=1792, micro_batches=2,
            logprob_chunk=256, attention_chunk=512, loss_sizes=((2, 20480), (8, 2048), (16, 8192)),
            decode_rows=64, decode_prompt=128, decode_tokens=512, updates=5)
TINY = dict(model=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
            rows=2, prompt=8, response=24, micro_batches=2, logprob_chunk=16, attention_chunk=16,
            loss_sizes=((2, 256),), decode_rows=4, decode_prompt=8, decode_tokens=8, updates=2)


def peak_tflops(device, override: float | None) -> float | None:
    if override:
        return override
    kind = getattr(device, "device_kind", "")
    matches = [v for name, v in PEAK_TFLOPS.items() if name.lower() in kind.lower()]
    return matches[0] if matches else None


def forward_flops_per_token(model: ModelConfig, length: int) -> float:
    """2 × matmul parameters (projections, MLP, LM head) + 2·H·K·T for causal attention (QKᵀ and PV
    over T/2 keys on average)."""
    d, k = model.hidden_size, model.head_dim
    per_layer = d * model.num_attention_heads * k * 2 + 2 * d * model.num_key_value_heads * k \
        + 3 * d * model.intermediate_size
    matmul = model.num_hidden_layers * per_layer + d * model.vocab_size
    return 2 * matmul + 2 * model.num_hidden_layers * model.num_attention_heads * k * length


def future_kl_methods(sizes, repeats: int) -> dict:
    out = {}
    for batch, length in sizes:
        data = tuple(jnp.asarray(a) for a in make_batch(batch, length))
        fns = {"dapo": jax_loss_grad(fj.PolicyLossConfig.dapo(), with_metrics=False)}
        for method, block in (("scan", None), ("associative", None), ("blocked", 32), ("blocked", 128)):
            name = method if block is None else f"{method}/{block}"
            fns[name] = jax_loss_grad(fj.PolicyLossConfig(future_kl_method=method, future_kl_block_size=block), False)
        seconds = time_interleaved(fns, dict.fromkeys(fns, data), repeats)
        fastest = min((n for n in seconds if n != "dapo"), key=seconds.get)
        out[f"{batch}x{length}"] = {"ms": {n: s * 1e3 for n, s in seconds.items()}, "fastest": fastest,
                                    "fipo_over_dapo": seconds[fastest] / seconds["dapo"]}
    return out


def update_layout(sizes: dict):
    """The TrainConfig the synthetic update corresponds to (for the planner), and the batch."""
    rows, mb = sizes["rows"], sizes["micro_batches"]
    config = apply_overrides(cpu_default(), [
        f"data.max_prompt_tokens={sizes['prompt']}", f"rollout.max_response_tokens={sizes['response']}",
        f"rollout.n={rows}", f"rollout.prompts_per_step={mb}", "algo.mini_batches=1",
        f"algo.micro_batch_size={rows}", f"model.logprob_chunk_size={sizes['logprob_chunk']}"])
    rng = np.random.default_rng(0)
    p, n = sizes["prompt"], sizes["response"]
    vocab = sizes["model"]["vocab_size"]
    batch = rl_step.RLBatch(
        input_ids=jnp.asarray(rng.integers(0, vocab, (1, mb, rows, p + n)), jnp.int32),
        attention_mask=jnp.ones((1, mb, rows, p + n), bool), response_mask=jnp.ones((1, mb, rows, n), bool),
        scores=jnp.asarray(rng.choice([-1.0, 1.0], (1, mb, rows)), jnp.float32),
        sampler_log_probs=jnp.asarray(-rng.random((1, mb, rows, n)) * 3, jnp.float32))
    return config, batch


def train_step(model_config: ModelConfig, sizes: dict, peak: float | None) -> dict:
    config, batch = update_layout(sizes)
    model = CausalLM(model_config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = rl_step.make_optimizer(rl_step.warmup_schedule(1e-6, 0, 1), 0.9, 0.999, 1e-8, 0.0, 1.0)
    state = rl_step.init_state(jax.tree.map(jnp.copy, params), optimizer, jax.random.key(0))  # donated
    update = rl_step.jit_rl_update(graphdef, rest, optimizer, rl_step.UpdateConfig(
        loss=config.algo.loss, group_size=sizes["rows"], logprob_chunk_size=sizes["logprob_chunk"]))
    start = time.perf_counter()
    state, metrics = update(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    seconds = []
    for _ in range(sizes["updates"]):
        start = time.perf_counter()
        state, metrics = update(state, batch)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    length = sizes["prompt"] + sizes["response"]
    tokens = sizes["micro_batches"] * sizes["rows"] * length
    flops = 4 * forward_flops_per_token(model_config, length) * tokens
    step_s = statistics.median(seconds)
    out = {"tokens_per_update": tokens, "seconds_per_update": step_s, "compile_seconds": compile_s,
           "tokens_per_second": tokens / step_s, "model_tflops_per_second": flops / step_s / 1e12,
           "mfu": None if peak is None else flops / step_s / (peak * 1e12),
           "loss_finite": bool(np.isfinite(float(metrics["actor/loss"])))}
    stats = jax.local_devices()[0].memory_stats() or {}
    planned = plan_lib.plan(config, (1,), model=model_config)
    out["memory"] = {"planned_update_peak": planned.update_peak,
                     "measured_peak_bytes_in_use": stats.get("peak_bytes_in_use"),
                     "ratio": (planned.update_peak / stats["peak_bytes_in_use"]
                               if stats.get("peak_bytes_in_use") else None)}
    return out, nnx.merge(graphdef, state.params, rest)


def decode(model, sizes: dict) -> dict:
    rows, width, new = sizes["decode_rows"], sizes["decode_prompt"], sizes["decode_tokens"]
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (rows, width)).astype(np.int32)
    config = SamplingConfig(max_new_tokens=new, temperature=1.0, eos_token_ids=(), pad_token_id=0)
    out = {}
    for name, run in (("static", lambda key: generate(model, ids, None, key, config)),
                      ("engine", lambda key: engine_lib.generate(model, ids, None, key, config,
                                                                 engine_lib.EngineConfig(num_slots=rows))[0])):
        jax.block_until_ready(run(jax.random.key(0)).tokens)  # compile
        start = time.perf_counter()
        result = run(jax.random.key(1))
        jax.block_until_ready(result.tokens)
        seconds = time.perf_counter() - start
        out[name] = {"new_tokens_per_second": float(np.sum(result.lengths)) / seconds, "seconds": seconds}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized smoke run")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of one chip")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", default="future_kl,train,decode", help="comma-separated parts")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    device = jax.local_devices()[0]
    peak = peak_tflops(device, args.peak_tflops)
    report = {"device": f"{device.platform}: {getattr(device, 'device_kind', '')}", "jax": jax.__version__,
              "peak_tflops": peak, "sizes": {k: v for k, v in sizes.items() if k != "model"}}
    print(f"# accelerator figures — {report['device']} (dense bf16 peak: {peak or 'unknown'} TFLOP/s)", flush=True)
    parts = set(args.only.split(","))
    if "future_kl" in parts:
        report["future_kl"] = future_kl_methods(sizes["loss_sizes"], args.repeats)
        for size, r in report["future_kl"].items():
            print(f"future-KL {size}: " + ", ".join(f"{n} {v:.3f} ms" for n, v in r["ms"].items())
                  + f" → fastest {r['fastest']} ({r['fipo_over_dapo']:.2f}× DAPO)", flush=True)
    model = None
    if "train" in parts or "decode" in parts:
        model_config = ModelConfig(**sizes["model"], dtype="bfloat16", compute_dtype="bfloat16",
                                   attention_chunk_size=sizes["attention_chunk"])
        report["model"] = dataclasses.asdict(model_config)
        if "train" in parts:
            report["train"], model = train_step(model_config, sizes, peak)
            t = report["train"]
            mfu = "n/a (unknown peak)" if t["mfu"] is None else f"{t['mfu']:.1%}"
            print(f"train step: {t['tokens_per_second']:,.0f} tokens/s, {t['model_tflops_per_second']:.1f} "
                  f"model TFLOP/s, MFU {mfu}, compile {t['compile_seconds']:.1f} s; memory planned "
                  f"{t['memory']['planned_update_peak'] / 2**30:.2f} GiB vs measured "
                  f"{(t['memory']['measured_peak_bytes_in_use'] or 0) / 2**30:.2f} GiB", flush=True)
        if "decode" in parts:
            model = model or CausalLM(model_config, rngs=nnx.Rngs(0))
            report["decode"] = decode(model, sizes)
            print("decode: " + ", ".join(f"{n} {r['new_tokens_per_second']:,.0f} new tokens/s"
                                         for n, r in report["decode"].items()), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
