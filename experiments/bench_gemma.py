"""Benchmark on a real pretrained model: Gemma 3 270M (the packaged Q4_K_M GGUF, dequantised to
float32), our JAX model vs transformers/PyTorch with the same weights, CPU, one run.

    python experiments/bench_gemma.py --out bench_gemma.json       # the figures in docs/performance.md

(a) greedy decode: B = 8 prompts of 64 tokens, 128 new tokens each, KV cache, no early stop.
    Ours: `fipo_jax.generation.static_sampler.generate`. Reference: `transformers` `generate(do_sample=False)`.
    Tokens/s = B·N / seconds; the greedy tokens of the two are compared.
(b) log-prob forward + backward: mean −log p(x_{t+1} | x_≤t) over 8 × 512 tokens, gradient
    w.r.t. every parameter. Ours: jit(value_and_grad(sequence_log_probs)) (LM head in chunks,
    never a [B, T, V] tensor), without and with `remat` (a rematerialised scan over the layers).
    Reference: transformers' own loss (`model(ids, labels=ids).loss`, cross-entropy over the full
    logits) → backward, without and with `gradient_checkpointing_enable()`. (The logits →
    log_softmax → gather formulation of `bench_model.py` does not fit this 24 GiB machine here.)
(c) memory of (b): each variant runs in a fresh process, one after the other (transformers'
    step and ours together would not fit in 24 GiB): RSS after loading and warming up (for ours:
    compiling), then the peak RSS (Linux VmHWM, reset just before) over the timed steps; their
    difference is what the step itself takes (activations, logits, gradients). For ours also
    XLA's compiled temporary-buffer size.

Timings: median (and minimum) over `--repeats` calls after a warm-up call; (a) alternates ours
and the reference within each round, (b) times each variant in its own process in sequence.
Prompts are random tokens from the real vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench_model import throughput, time_alternating, timed  # noqa: E402

from fipo_jax.generation.logprobs import sequence_log_probs  # noqa: E402
from fipo_jax.models import ModelOptions, load_pretrained  # noqa: E402
from fipo_jax.models.assets import gemma3_270m_gguf  # noqa: E402
from fipo_jax.generation.sampling import SamplingConfig  # noqa: E402
from fipo_jax.generation.static_sampler import generate


def torch_model(path: str):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


def random_ids(args, shape, offset: int) -> np.ndarray:
    # Skip the first 1,000 ids (control and special tokens) so prompts are ordinary text pieces.
    return np.random.default_rng(args.seed + offset).integers(1000, 262144, size=shape).astype(np.int32)


def bench_decode(args, reference_model, model) -> dict:
    import torch

    prompts = random_ids(args, (args.batch, args.prompt_len), 0)
    prompts[:, 0] = 2  # <bos>
    config = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, prompt_length_buckets=(args.prompt_len,))
    key = jax.random.key(0)
    prompts_t = torch.tensor(prompts, dtype=torch.long)
    reference_model.generation_config.eos_token_id = None

    def ours():
        return jax.block_until_ready(generate(model, prompts, None, key, config))

    def reference():
        with torch.no_grad():
            return reference_model.generate(prompts_t, attention_mask=torch.ones_like(prompts_t), do_sample=False,
                                            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                            pad_token_id=0)

    first_ours = timed(ours)
    timed(reference)
    medians, minima = time_alternating({"ours": ours, "reference": reference}, args.repeats)
    agreement = float(np.mean(np.asarray(ours().tokens) == reference()[:, args.prompt_len:].numpy()))
    return {"shape": f"B={args.batch}, prompt={args.prompt_len}, new={args.new_tokens}",
            **throughput(args.batch * args.new_tokens, first_ours, medians, minima),
            "greedy_token_agreement": agreement}


def ours_logprob_step(args, model):
    """(jitted (state, ids) → (loss, grads), state) for our model."""
    graphdef, state = nnx.split(model)

    def loss(state, ids_BxT):
        return -jnp.mean(sequence_log_probs(nnx.merge(graphdef, state), ids_BxT, None, chunk_size=args.chunk_size))

    return jax.jit(jax.value_and_grad(loss)), state


def torch_logprob_step(reference_model, ids_t):
    def step():
        # transformers' own loss path (labels=): mean −log p(x_{t+1} | x_≤t), cross-entropy on
        # the full [B, T, V] logits.
        reference_model.zero_grad(set_to_none=True)
        loss = reference_model(ids_t, labels=ids_t).loss
        loss.backward()
        return loss.detach()

    return step


def _status_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 2**20  # kB


def reset_peak_rss() -> float:
    """Resets the process's peak RSS (Linux clear_refs) and returns the current RSS in GiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_gib("VmRSS")


LOGPROB_VARIANTS = ("ours", "ours_remat", "torch", "torch_checkpointing")


def logprob_child(args) -> dict:
    """One variant of (b)/(c) in this fresh process: load, warm up (compile), then reset the
    peak RSS and time `repeats` steps."""
    path = gemma3_270m_gguf()
    ids = random_ids(args, (args.batch, args.train_len), 1)
    variant = args.logprob_child
    out = {"variant": variant}
    if variant.startswith("ours"):
        model = load_pretrained(path, ModelOptions(remat=variant == "ours_remat"))
        step, state = ours_logprob_step(args, model)
        ids_j = jnp.asarray(ids)
        compiled = step.lower(state, ids_j).compile()
        out["xla_temp_gib"] = compiled.memory_analysis().temp_size_in_bytes / 2**30

        def run():
            return jax.block_until_ready(compiled(state, ids_j))[0]
    else:
        import torch

        model = torch_model(path)
        if variant == "torch_checkpointing":
            model.gradient_checkpointing_enable()
            model.train()  # transformers checkpoints only in training mode (no dropout in Gemma 3)
        run = torch_logprob_step(model, torch.tensor(ids, dtype=torch.long))
    out["first_call_s"] = timed(run)
    out["rss_before_gib"] = reset_peak_rss()
    times = [timed(run) for _ in range(args.repeats)]
    out.update(peak_gib=_status_gib("VmHWM"), median_s=statistics.median(times), min_s=min(times),
               loss=float(run()))
    out["step_gib"] = out["peak_gib"] - out["rss_before_gib"]
    out["tokens_per_s"] = args.batch * (args.train_len - 1) / out["median_s"]
    return out


def bench_logprob(args) -> dict:
    """(b) and (c): every variant in its own process, one after the other."""
    out = {"shape": f"B={args.batch}, T={args.train_len}"}
    for variant in LOGPROB_VARIANTS:
        child = [sys.executable, os.path.abspath(__file__), "--logprob-child", variant, "--batch", str(args.batch),
                 "--train-len", str(args.train_len), "--chunk-size", str(args.chunk_size),
                 "--repeats", str(args.repeats), "--seed", str(args.seed)]
        result = subprocess.run(child, capture_output=True, text=True)
        if result.returncode != 0:
            out[variant] = {"error": f"exit {result.returncode}: {result.stderr.strip()[-300:]}"}
        else:
            out[variant] = json.loads(result.stdout.strip().splitlines()[-1])
        print(json.dumps({variant: out[variant]}), flush=True)
    for ours, reference in (("ours", "torch"), ("ours_remat", "torch_checkpointing"), ("ours_remat", "torch")):
        if "median_s" in out[ours] and "median_s" in out[reference]:
            out[f"speed_{ours}_vs_{reference}"] = out[reference]["median_s"] / out[ours]["median_s"]
            out[f"step_memory_{ours}_vs_{reference}"] = out[ours]["step_gib"] / out[reference]["step_gib"]
            out[f"peak_memory_{ours}_vs_{reference}"] = out[ours]["peak_gib"] / out[reference]["peak_gib"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--train-len", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=32, help="log-prob chunk (time steps; × B rows)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=("decode", "logprob"))
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--logprob-child", choices=LOGPROB_VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.logprob_child:
        print(json.dumps(logprob_child(args)))
        return 0
    import torch

    results = {"device": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "load_average_start": os.getloadavg()}
    if "logprob" not in args.skip:
        results["logprob_train"] = bench_logprob(args)
    if "decode" not in args.skip:
        path = gemma3_270m_gguf()
        start = time.perf_counter()
        model = load_pretrained(path)
        results["ours_load_s"] = time.perf_counter() - start
        start = time.perf_counter()
        reference_model = torch_model(path)
        results["reference_load_s"] = time.perf_counter() - start
        results["decode"] = bench_decode(args, reference_model, model)
        print(json.dumps({"decode": results["decode"]}, indent=2), flush=True)
    results["load_average_end"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
