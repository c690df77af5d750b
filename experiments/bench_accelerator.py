"""The accelerator figures in one short run: Future-KL methods, train-step MFU and compile time of
Qwen2.5-0.5B- and 7B-shaped policies, decode tokens/s of the static sampler and the engine (equal
budgets and a long tail), each part's real peak memory against the planner, and where the time goes.

    python experiments/bench_accelerator.py --out runs/accelerator.json          # on a GPU / TPU (< 8 min)
    python experiments/bench_accelerator.py --only train,decode --out acc.json   # some parts
    python experiments/bench_accelerator.py --tiny                               # a CPU smoke run (tests)

Each part runs in a fresh process (so `memory_stats()["peak_bytes_in_use"]` is that part's own
peak) under its own timeout (`PART_TIMEOUT_S`, ``--timeout-scale``); the JSON report is rewritten
after every part, so a part that times out or fails costs only itself. ``--cache-dir`` shares a
persistent XLA compilation cache between parts and runs; ``--in-process`` runs the parts in this
process, without timeouts (the CPU tests).

Parts:
1. ``future_kl``: FIPO loss + gradient (no metrics) with each exact method, and our DAPO loss, side
   by side (`bench_loss.time_interleaved`); the fastest is what
   ``fipo_jax.core.future_kl.DEFAULT_METHOD_BY_BACKEND`` should say for this backend.
2. ``train`` / ``train_7b`` / ``train_fused``: `rl_update` (old-log-prob pass + forward/backward + AdamW) of random
   bfloat16 weights of the Qwen2.5-0.5B (remat "none") / 7B (remat "full") shape, one layout of 2
   micro-batches × 8 rows × 2,048 tokens: compile seconds, median seconds per update; model FLOPs
   per token = 4 × forward (3 for training, 1 for the old log-probs), forward = 2 × matmul
   parameters + 2·H·K·T for causal attention; MFU = FLOPs / s / the chip's dense bf16 peak
   (`PEAK_TFLOPS`, or ``--peak-tflops``); recomputation (remat, chunked attention) not counted.
   The state is built without a model object, so only the update's own copy of the weights lives.
   ``train`` and ``train_7b`` run ``attention_impl="auto"`` (what a user gets); ``train_fused`` the
   0.5B shape again with the backend's fused kernel (`FUSED_ATTENTION`: cuDNN on GPU, splash on
   TPU; skipped elsewhere), so the two attention paths are measured side by side in one run.
   ``train`` also times the update's parts alone (`time_parts`: old log-probs, layers forward +
   backward, the log-prob head, AdamW) — where the time goes, beside `bench_breakdown`'s FLOPs.
3. ``decode``: new tokens/s of `static_sampler.generate` and `engine.generate`, every row decoding its
   whole budget (no EOS), equal budgets.
4. ``engine_long_tail``: requests with log-normal budgets (max / mean ≈ 5): useful tokens/s of
   the static sampler (decodes every row to the longest budget) and the engine (slots refilled,
   tail compaction on), sized so its few slot counts compile inside the part's timeout.

Every part reports planned / measured peak memory (`fipo_jax.train.plan`: the update peak for the
training parts, the sampler program for the decoding ones; accelerators only, CPU has no counter)
and the 10 device ops that took the most time in one profiled call (`jax.profiler`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import fipo_jax as fj
from fipo_jax.generation import engine as engine_lib
from fipo_jax.train import plan as plan_lib
from fipo_jax.train import shapes
from fipo_jax.train import update as update_lib
from fipo_jax.core.packing import pack_batch
from fipo_jax.config import apply_overrides, cpu_default
from fipo_jax.models import CausalLM, ModelConfig
from fipo_jax.models.attention_kernels import describe_attention
from fipo_jax.generation.sampling import SamplingConfig
from fipo_jax.generation.static_sampler import generate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import long_tail_budgets  # noqa: E402  the same long-tail distribution
from bench_loss import jax_loss_grad, make_batch, time_interleaved  # noqa: E402  the same loss timing

# Dense bfloat16 peak per chip, from the vendors' data sheets (matched against device_kind).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v4": 275.0, "TPU v6": 918.0}

TRAIN_LAYOUT = dict(rows=8, prompt=256, response=1792, micro_batches=2, logprob_chunk=256, attention_chunk=512,
                    updates=5)
FULL = dict(
    future_kl=dict(loss_sizes=((2, 20480), (8, 2048), (16, 8192))),
    train=dict(TRAIN_LAYOUT, model="qwen2.5-0.5b", remat="none", time_parts=True),
    train_7b=dict(TRAIN_LAYOUT, model="qwen2.5-7b", remat="full"),
    train_fused=dict(TRAIN_LAYOUT, model="qwen2.5-0.5b", remat="none", attention="fused", updates=3),
    decode=dict(model="qwen2.5-0.5b", rows=64, prompt=128, new_tokens=256),
    engine_long_tail=dict(model="qwen2.5-0.5b", requests=64, group=8, prompt=128, mean=96, sigma=1.0, cap=512,
                          slots=16),
)
TINY_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)
TINY_LAYOUT = dict(rows=2, prompt=8, response=24, micro_batches=2, logprob_chunk=16, attention_chunk=16, updates=2)
TINY = dict(
    future_kl=dict(loss_sizes=((2, 256),)),
    train=dict(TINY_LAYOUT, model=TINY_MODEL, remat="none", time_parts=True),
    train_7b=dict(TINY_LAYOUT, model=dict(TINY_MODEL, num_hidden_layers=3), remat="full"),
    train_fused=dict(TINY_LAYOUT, model=TINY_MODEL, remat="none", attention="fused"),
    decode=dict(model=TINY_MODEL, rows=4, prompt=8, new_tokens=8),
    engine_long_tail=dict(model=TINY_MODEL, requests=16, group=4, prompt=8, mean=4, sigma=1.0, cap=24, slots=4),
)
PARTS = tuple(FULL)
# Seconds each part may take on one GPU, compiles included (the sum stays under 8 minutes).
PART_TIMEOUT_S = {"future_kl": 45, "train": 105, "train_7b": 125, "train_fused": 55, "decode": 70,
                  "engine_long_tail": 80}
# The fused attention kernel of each backend (`ModelConfig.attention_impl`), what ``train_fused`` runs.
FUSED_ATTENTION = {"gpu": "cudnn", "tpu": "splash"}


def peak_tflops(device, override: float | None) -> float | None:
    if override:
        return override
    kind = getattr(device, "device_kind", "")
    matches = [v for name, v in PEAK_TFLOPS.items() if name.lower() in kind.lower()]
    return matches[0] if matches else None


def model_config(name_or_fields, remat: str = "none", attention_chunk: int | None = None,
                 attention: str = "auto") -> ModelConfig:
    """A bfloat16 `ModelConfig` of a known public shape (`shapes.KNOWN_MODELS`) or explicit fields."""
    fields = shapes.KNOWN_MODELS[name_or_fields] if isinstance(name_or_fields, str) else name_or_fields
    return ModelConfig(**fields, dtype="bfloat16", compute_dtype="bfloat16", remat=remat,
                       attention_chunk_size=attention_chunk, attention_impl=attention)


def forward_flops_per_token(model: ModelConfig, length: int) -> float:
    """2 × matmul parameters (projections, MLP, LM head) + 2·H·K·T for causal attention (QKᵀ and PV
    over T/2 keys on average)."""
    d, k = model.hidden_size, model.head_dim
    per_layer = d * model.num_attention_heads * k * 2 + 2 * d * model.num_key_value_heads * k \
        + 3 * d * model.intermediate_size
    matmul = model.num_hidden_layers * per_layer + d * model.vocab_size
    return 2 * matmul + 2 * model.num_hidden_layers * model.num_attention_heads * k * length


# ----------------------------------------------------------------------------- measuring


def peak_bytes() -> int | None:
    """The process's peak device memory so far (None where the backend keeps no such counter)."""
    return (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def memory_report(planned: int) -> dict:
    measured = peak_bytes()
    return {"planned": planned, "measured_peak_bytes_in_use": measured,
            "planned_over_measured": planned / measured if measured else None}


# Ops that only contain other ops (a while loop's events span its body's): left out of the ranking.
CONTROL_FLOW = re.compile(r"^(while|conditional|call)(\.\d+)?$")


def top_device_ops(fn, count: int = 10) -> list[dict]:
    """The ``count`` XLA ops that took the most device time in one profiled call of ``fn``: summed
    over their executions, from the ``jax.profiler`` trace (device planes' "XLA Ops" lines on a
    GPU / TPU; events carrying an ``hlo_op`` stat on a CPU), control-flow containers left out."""
    from jax.profiler import ProfileData

    folder = tempfile.mkdtemp(prefix="fipo_profile_")
    with jax.profiler.trace(folder):
        jax.block_until_ready(fn())
    files = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return []
    totals: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    data = ProfileData.from_file(files[0])
    device_planes = [p for p in data.planes if p.name.startswith("/device:")]
    with warnings.catch_warnings():  # the trace's pybind types warn on iteration
        warnings.simplefilter("ignore", DeprecationWarning)
        for plane in device_planes or data.planes:
            for line in plane.lines:
                if device_planes and "XLA Ops" not in line.name:
                    continue
                for event in line.events:
                    if CONTROL_FLOW.match(event.name) or (
                            not device_planes and not any(name == "hlo_op" for name, _ in event.stats)):
                        continue
                    totals[event.name] += event.duration_ns
                    calls[event.name] += 1
    whole = sum(totals.values()) or 1
    return [{"op": name, "ms": ns / 1e6, "share": ns / whole, "calls": calls[name]}
            for name, ns in totals.most_common(count)]


def print_top_ops(part: str, ops: list[dict]) -> None:
    if ops:
        print(f"  {part}: top device ops " + "; ".join(f"{o['op']} {o['ms']:.2f} ms ({o['share']:.0%})"
                                                      for o in ops), flush=True)


# ----------------------------------------------------------------------------- parts


def future_kl_methods(sizes: dict, repeats: int, peak: float | None) -> dict:
    out = {}
    for batch, length in sizes["loss_sizes"]:
        data = tuple(jnp.asarray(a) for a in make_batch(batch, length))
        fns = {"dapo": jax_loss_grad(fj.PolicyLossConfig.dapo(), with_metrics=False)}
        for method, block in (("scan", None), ("associative", None), ("blocked", 32), ("blocked", 128)):
            name = method if block is None else f"{method}/{block}"
            fns[name] = jax_loss_grad(fj.PolicyLossConfig(future_kl_method=method, future_kl_block_size=block), False)
        seconds = time_interleaved(fns, dict.fromkeys(fns, data), repeats)
        fastest = min((n for n in seconds if n != "dapo"), key=seconds.get)
        out[f"{batch}x{length}"] = {"ms": {n: s * 1e3 for n, s in seconds.items()}, "fastest": fastest,
                                    "fipo_over_dapo": seconds[fastest] / seconds["dapo"]}
        print(f"future-KL {batch}x{length}: " + ", ".join(f"{n} {v * 1e3:.3f} ms" for n, v in seconds.items())
              + f" → fastest {fastest} ({seconds[fastest] / seconds['dapo']:.2f}× DAPO)", flush=True)
    fastest_fn = fns[out[f"{batch}x{length}"]["fastest"]]
    out["top_ops"] = top_device_ops(lambda: fastest_fn(*data))
    print_top_ops("future_kl", out["top_ops"])
    return out


def update_layout(sizes: dict):
    """The TrainConfig the synthetic update corresponds to (for the planner), and the batch."""
    rows, mb = sizes["rows"], sizes["micro_batches"]
    config = apply_overrides(cpu_default(), [
        f"data.max_prompt_tokens={sizes['prompt']}", f"rollout.max_response_tokens={sizes['response']}",
        f"rollout.n={rows}", f"rollout.prompts_per_step={mb}", "algo.mini_batches=1",
        f"algo.micro_batch_size={rows}", f"model.logprob_chunk_size={sizes['logprob_chunk']}"])
    rng = np.random.default_rng(0)
    p, n, count = sizes["prompt"], sizes["response"], mb * rows
    vocab = model_config(sizes["model"]).vocab_size
    fields = {"prompt_ids": rng.integers(0, vocab, (count, p)).astype(np.int32), "prompt_mask": np.ones((count, p), bool),
              "tokens": rng.integers(0, vocab, (count, n)).astype(np.int32), "response_mask": np.ones((count, n), bool),
              "scores": rng.choice([-1.0, 1.0], count).astype(np.float32),
              "sampler_log_probs": (-rng.random((count, n)) * 3).astype(np.float32)}
    return config, pack_batch(fields, 1, rows, layout="padded")[0]  # on the host: each update gets its own copy


def random_params(config: ModelConfig):
    """(graphdef, params, rest) of a random model, the parameters made inside one jitted call:
    no model object keeps a second copy alive."""
    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    params = jax.jit(lambda: nnx.split(CausalLM(config, rngs=nnx.Rngs(0)), nnx.Param, ...)[1])()
    return graphdef, params, rest


def train_step(sizes: dict, peak: float | None) -> dict:
    attention = sizes.get("attention", "auto")
    if attention == "fused":
        backend = jax.default_backend()
        if backend not in FUSED_ATTENTION:
            print(f"train_fused: skipped (no fused attention kernel on {backend})", flush=True)
            return {"skipped": f"no fused attention kernel on {backend}"}
        attention = FUSED_ATTENTION[backend]
    model = model_config(sizes["model"], sizes["remat"], sizes["attention_chunk"], attention)
    config, batch = update_layout(sizes)
    graphdef, params, rest = random_params(model)
    optimizer = update_lib.make_optimizer(update_lib.warmup_schedule(1e-6, 0, 1), 0.9, 0.999, 1e-8, 0.0, 1.0)
    state = update_lib.init_state(params, optimizer, jax.random.key(0))
    del params  # donated with the state
    update_config = update_lib.UpdateConfig(loss=config.algo.loss, group_size=sizes["rows"],
                                         logprob_chunk_size=sizes["logprob_chunk"])
    update = update_lib.jit_rl_update(graphdef, rest, optimizer, update_config)
    start = time.perf_counter()
    compiled = update.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    seconds = []
    for _ in range(1 + sizes["updates"]):  # the first call also moves the state into place
        placed = jax.block_until_ready(jax.device_put(batch))  # donated: a fresh copy per update, untimed
        start = time.perf_counter()
        state, metrics = compiled(state, placed, rest)  # the compiled update takes the untrained part too
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    length = sizes["prompt"] + sizes["response"]
    tokens = sizes["micro_batches"] * sizes["rows"] * length
    flops = 4 * forward_flops_per_token(model, length) * tokens
    executed = executed_matmul_flops(graphdef, rest, optimizer, update_config, state, batch)
    step_s = statistics.median(seconds[1:])
    planned = plan_lib.plan(config, (1,), model=model)
    out = {"model": sizes["model"] if isinstance(sizes["model"], str) else "tiny", "remat": model.remat,
           "tokens_per_update": tokens, "seconds_per_update": step_s, "compile_seconds": compile_s,
           "tokens_per_second": tokens / step_s, "model_tflops_per_second": flops / step_s / 1e12,
           "mfu": None if peak is None else flops / step_s / (peak * 1e12),
           "executed_over_model_flops": executed / flops, "attention": describe_attention(model.attention_impl),
           "loss_finite": bool(np.isfinite(float(metrics["actor/loss"]))),
           "memory": memory_report(planned.update_peak)}

    def profiled():
        nonlocal state
        state, result = compiled(state, jax.device_put(batch), rest)
        return result

    out["top_ops"] = top_device_ops(profiled)
    if sizes.get("time_parts"):
        out["parts_ms"] = time_parts(graphdef, state.params, rest, model, sizes)
        print("  parts of one micro-batch (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in out["parts_ms"].items()),
              flush=True)
    mfu = "n/a (unknown peak)" if out["mfu"] is None else f"{out['mfu']:.1%}"
    measured = out["memory"]["measured_peak_bytes_in_use"]
    print(f"train {out['model']} (remat {model.remat}, attention {out['attention']}): {out['tokens_per_second']:,.0f} tokens/s, "
          f"{out['model_tflops_per_second']:.1f} model TFLOP/s, MFU {mfu} (executed {executed / flops:.2f}× the model's "
          f"matmul FLOPs), compile {compile_s:.1f} s; memory planned "
          f"{planned.update_peak / 2**30:.2f} GiB vs measured "
          + (f"{measured / 2**30:.2f} GiB" if measured else "n/a"), flush=True)
    print_top_ops("train", out["top_ops"])
    return out


def time_parts(graphdef, params, rest, model: ModelConfig, sizes: dict, repeats: int = 3) -> dict:
    """Milliseconds of each part of one micro-batch's update, each jitted and timed alone (median of
    `repeats`): the old log-probs pass, the decoder layers' forward + backward, the chunked
    log-prob head's forward + backward, the AdamW step (`bench_breakdown.part_functions`)."""
    from bench_breakdown import part_functions  # it imports this module: imported when used
    from fipo_jax.generation.logprobs import chunked_token_log_probs

    rows, length, chunk = sizes["rows"], sizes["prompt"] + sizes["response"], sizes["logprob_chunk"]
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(0, model.vocab_size, (rows, length)), jnp.int32)
    seg = jnp.zeros((rows, length), jnp.int32)
    hidden = jnp.asarray(rng.normal(size=(rows, length, model.hidden_size)), jnp.bfloat16)
    unembed = jnp.asarray(0.02 * rng.normal(size=(model.hidden_size, model.vocab_size)), jnp.bfloat16)
    head = jax.grad(lambda h, w, y: jnp.sum(chunked_token_log_probs(h, w, y, chunk_size=chunk)), argnums=(0, 1))
    optimizer = update_lib.make_optimizer(update_lib.warmup_schedule(1e-6, 0, 1), 0.9, 0.999, 1e-8, 0.0, 1.0)
    opt_state = optimizer.tx.init(params)
    calls = {name: (fn, (params, ids, seg)) for name, (fn, _) in part_functions(graphdef, rest, model, chunk).items()
             if name != "model_fwd_bwd"}
    calls["head_fwd_bwd"] = (head, (hidden, unembed, ids))
    calls["optimizer"] = (lambda g, st, p: optimizer.tx.update(g, st, p), (params, opt_state, params))
    out = {}
    for name, (fn, args) in calls.items():
        jitted = jax.jit(fn)
        jax.block_until_ready(jitted(*args))  # compile
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(jitted(*args))
            seconds.append(time.perf_counter() - start)
        out[name] = statistics.median(seconds) * 1e3
    return out


def executed_matmul_flops(graphdef, rest, optimizer, config, state, batch) -> float:
    """The update's matmul FLOPs as its program executes them (remat's recompute, the log-prob
    head's second pass; `bench_breakdown.program_matmul_flops`), traced, not run."""
    from bench_breakdown import program_matmul_flops  # it imports this module: imported when used

    return program_matmul_flops(jax.make_jaxpr(lambda st, b: update_lib.rl_update(
        st, b, graphdef=graphdef, rest=rest, optimizer=optimizer, config=config))(state, batch).jaxpr)


def random_model(name_or_fields) -> CausalLM:
    config = model_config(name_or_fields)
    return nnx.merge(*random_params(config))


def sampler_plan(model: ModelConfig, rows: int, prompt: int, new_tokens: int, engine_slots: int | None) -> int:
    """The planner's sampler program (parameters, KV cache, prefix store, temporaries) for this run."""
    sampler = ["rollout.sampler=engine", f"rollout.engine_slots={engine_slots}"] if engine_slots else \
        ["rollout.sampler=static"]
    config = apply_overrides(cpu_default(), [
        f"data.max_prompt_tokens={prompt}", f"rollout.max_response_tokens={new_tokens}", "rollout.n=1",
        f"rollout.prompts_per_step={rows}", f"rollout.prompts_per_round={rows}", "algo.mini_batches=1",
        f"algo.micro_batch_size={rows}", "reward.overlong_shaping=false", *sampler])
    return plan_lib.plan(config, (1,), model=model).sampler_program


def decode(sizes: dict, peak: float | None) -> dict:
    model = random_model(sizes["model"])
    rows, width, new = sizes["rows"], sizes["prompt"], sizes["new_tokens"]
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (rows, width)).astype(np.int32)
    config = SamplingConfig(max_new_tokens=new, temperature=1.0, eos_token_ids=(), pad_token_id=0,
                            prompt_length_buckets=None)
    runs = {"static": lambda key: generate(model, ids, None, key, config),
            "engine": lambda key: engine_lib.generate(model, ids, None, key, config,
                                                      engine_lib.EngineConfig(num_slots=rows))}
    out = {}
    for name, run in runs.items():
        start = time.perf_counter()
        jax.block_until_ready(run(jax.random.key(0)).tokens)  # compile
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        result = run(jax.random.key(1))
        jax.block_until_ready(result.tokens)
        seconds = time.perf_counter() - start
        out[name] = {"new_tokens_per_second": float(np.sum(result.lengths)) / seconds, "seconds": seconds,
                     "ms_per_step": seconds / new * 1e3, "first_call_seconds": first_s}
    out["engine_over_static"] = out["engine"]["new_tokens_per_second"] / out["static"]["new_tokens_per_second"]
    out["memory"] = memory_report(max(sampler_plan(model.config, rows, width, new, None),
                                      sampler_plan(model.config, rows, width, new, rows)))
    out["top_ops"] = top_device_ops(lambda: runs["static"](jax.random.key(2)).tokens)
    print("decode: " + ", ".join(f"{n} {r['new_tokens_per_second']:,.0f} new tokens/s ({r['ms_per_step']:.2f} ms/step)"
                                 for n, r in out.items() if isinstance(r, dict) and "seconds" in r)
          + f"; engine / static {out['engine_over_static']:.2f}", flush=True)
    print_top_ops("decode (static)", out["top_ops"])
    return out


def engine_long_tail(sizes: dict, peak: float | None) -> dict:
    model = random_model(sizes["model"])
    budgets = long_tail_budgets(sizes["requests"], sizes["mean"], sizes["sigma"], sizes["cap"], seed=0)
    unique = np.random.default_rng(2).integers(1, model.config.vocab_size,
                                               (sizes["requests"] // sizes["group"], sizes["prompt"]))
    ids = np.repeat(unique, sizes["group"], axis=0).astype(np.int32)
    cap = int(budgets.max())
    config = SamplingConfig(max_new_tokens=cap, temperature=0.0, eos_token_ids=(), pad_token_id=0,
                            prompt_length_buckets=None)
    engine_config = engine_lib.EngineConfig(num_slots=sizes["slots"])
    runs = {"static": lambda: generate(model, ids, None, jax.random.key(0), config),
            "engine": lambda: engine_lib.generate(model, ids, None, jax.random.key(0), config, engine_config,
                                                  max_new_tokens=budgets)}
    out = {"requests": len(budgets), "slots": sizes["slots"], "budget_mean": float(budgets.mean()),
           "budget_max": cap, "max_over_mean": cap / float(budgets.mean())}
    useful = int(budgets.sum())
    for name, run in runs.items():
        start = time.perf_counter()
        jax.block_until_ready(run().tokens)  # compiles (the engine: every slot count of its tail)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(run().tokens)
        seconds = time.perf_counter() - start
        out[name] = {"useful_tokens_per_second": useful / seconds, "seconds": seconds, "first_call_seconds": first_s}
    out["engine_gain"] = out["static"]["seconds"] / out["engine"]["seconds"]
    out["memory"] = memory_report(sampler_plan(model.config, len(budgets), sizes["prompt"], cap, None))
    out["top_ops"] = top_device_ops(lambda: runs["engine"]().tokens)
    print(f"engine long tail ({len(budgets)} requests, max/mean {out['max_over_mean']:.1f}, {sizes['slots']} slots): "
          f"static {out['static']['useful_tokens_per_second']:,.0f}, engine "
          f"{out['engine']['useful_tokens_per_second']:,.0f} useful tokens/s ({out['engine_gain']:.2f}×); "
          f"first calls {out['static']['first_call_seconds']:.0f} / {out['engine']['first_call_seconds']:.0f} s",
          flush=True)
    print_top_ops("engine long tail", out["top_ops"])
    return out


RUNNERS = {"future_kl": lambda sizes, args, peak: future_kl_methods(sizes, args.repeats, peak),
           "train": lambda sizes, args, peak: train_step(sizes, peak),
           "train_7b": lambda sizes, args, peak: train_step(sizes, peak),
           "train_fused": lambda sizes, args, peak: train_step(sizes, peak),
           "decode": lambda sizes, args, peak: decode(sizes, peak),
           "engine_long_tail": lambda sizes, args, peak: engine_long_tail(sizes, peak)}


# ----------------------------------------------------------------------------- driver


def run_part(part: str, args) -> dict:
    """One part in this process."""
    sizes = (TINY if args.tiny else FULL)[part]
    start = time.perf_counter()
    result = RUNNERS[part](sizes, args, peak_tflops(jax.local_devices()[0], args.peak_tflops))
    result["part_seconds"] = time.perf_counter() - start
    return result


def run_part_process(part: str, args, timeout: float) -> dict:
    """One part in a fresh process under ``timeout`` seconds; its last stdout line is its JSON."""
    command = [sys.executable, os.path.abspath(__file__), "--part", part, "--repeats", str(args.repeats)]
    command += ["--tiny"] if args.tiny else []
    command += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
    command += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        lines = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        sys.stdout.write(lines)
        return {"error": f"timed out after {timeout:.0f} s", "part_seconds": time.perf_counter() - start}
    lines = proc.stdout.strip().splitlines()
    sys.stdout.write("\n".join(lines[:-1]) + ("\n" if len(lines) > 1 else ""))
    if proc.returncode or not lines:
        return {"error": f"exit code {proc.returncode}", "part_seconds": time.perf_counter() - start}
    return json.loads(lines[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized smoke run")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of one chip")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiplies every part's timeout")
    parser.add_argument("--cache-dir", default=None, help="a persistent XLA compilation cache shared by the parts")
    parser.add_argument("--in-process", action="store_true", help="run the parts in this process (no timeouts)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # a worker: one part, JSON on stdout
    args = parser.parse_args(argv)
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    if args.part:
        print(json.dumps(run_part(args.part, args), default=str))
        return {}
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {PARTS}")
    device = jax.local_devices()[0]
    peak = peak_tflops(device, args.peak_tflops)
    report = {"device": f"{device.platform}: {getattr(device, 'device_kind', '')}", "jax": jax.__version__,
              "peak_tflops": peak, "sizes": {p: (TINY if args.tiny else FULL)[p] for p in parts}}
    print(f"# accelerator figures — {report['device']} (dense bf16 peak: {peak or 'unknown'} TFLOP/s)", flush=True)
    for part in parts:
        if args.in_process:
            report[part] = run_part(part, args)
        else:
            report[part] = run_part_process(part, args, PART_TIMEOUT_S[part] * args.timeout_scale)
        if "error" in report[part]:
            print(f"{part}: {report[part]['error']}", flush=True)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2, default=str)
    if args.out:
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
