"""LoRA / QLoRA against full fine-tuning on a real model: the RL update of the Gemma 3 270M CPU preset
(`gemma3-270m-fipo`: the packaged GGUF dequantised to float32, remat on), one fresh process per variant,
one after the other, ratios to full fine-tuning from the same run.

    python experiments/bench_lora.py --out bench_lora.json      # the figures in README.md and docs

Each variant loads the model (adapting it with `apply_lora` unless "full"), builds the trainer's optimizer
and jitted update (`jit_rl_update`, state and batch donated, the frozen base an argument), compiles it on
a batch of the preset's shape (24 responses of 64 tokens after 384-token prompts, 2 mini-batches of 2
micro-batches of 6 rows, random tokens, scores ±1), then: update seconds (median of `--repeats` calls
after the compiling one), peak RSS over those calls (Linux VmHWM, reset after the first) and RSS after
loading, the state's bytes (trained parameters + AdamW moments), the frozen base's bytes, and the size
of a checkpoint of the state written by the trainer's `Checkpointer`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench_gemma import _status_gib as status_gib, reset_peak_rss  # noqa: E402  the same RSS probes

from fipo_jax.config import apply_overrides, load_config  # noqa: E402
from fipo_jax.core.packing import RLBatch  # noqa: E402
from fipo_jax.train import runtime_configs  # noqa: E402
from fipo_jax.train import update as update_lib  # noqa: E402

VARIANTS = {"full": [], "lora": ["model.lora.rank=16"],
            "qlora_int8": ["model.lora.rank=16", "model.lora.base_dtype=int8"],
            "qlora_nf4": ["model.lora.rank=16", "model.lora.base_dtype=nf4"]}


def random_batch(config, vocab: int, seed: int) -> RLBatch:
    """The preset's step as the update sees it: one response per row, prompt then response."""
    M, R = config.algo.mini_batches, config.algo.micro_batch_size
    S = config.rollout.prompts_per_step * config.rollout.n
    K = S // (M * R)
    P, N = config.data.max_prompt_tokens, config.rollout.max_response_tokens
    rng = np.random.default_rng(seed)
    shape = (M, K, R, P + N)
    response = np.zeros(shape, bool)
    response[..., P:] = True
    segments = np.arange(S, dtype=np.int32).reshape(M, K, R, 1) * np.ones(shape, np.int32)
    return RLBatch(input_ids=jnp.asarray(rng.integers(0, vocab, shape), jnp.int32), segment_ids=jnp.asarray(segments),
                   response_mask=jnp.asarray(response),
                   sampler_log_probs=jnp.asarray(np.where(response, -1.0, 0.0), jnp.float32),
                   scores=jnp.asarray(rng.choice([-1.0, 1.0], S), jnp.float32),
                   sequences=jnp.full((M, K), float(R), jnp.float32), response_width=N,
                   lags=jnp.zeros((S,), jnp.int32))


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def child(variant: str, repeats: int) -> dict:
    """One variant in this fresh process (see the module docstring)."""
    from fipo_jax.parallel.sharding import make_mesh
    from fipo_jax.train.build import adapt, build_model, build_tokenizer
    from fipo_jax.train.checkpoint import Checkpointer

    config = apply_overrides(load_config("gemma3-270m-fipo"), VARIANTS[variant])
    model = build_model(config, build_tokenizer(config), make_mesh((1,)), lambda s: None)
    adapted = adapt(config, model, lambda s: None) is not None
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam if adapted else nnx.Param, ...)
    optim = config.optim
    optimizer = update_lib.make_optimizer(update_lib.warmup_schedule(optim.lr, optim.warmup_steps,
                                                                     config.algo.mini_batches),
                                          optim.b1, optim.b2, optim.eps, optim.weight_decay, optim.grad_clip)
    state = update_lib.init_state(params, optimizer, jax.random.key(0))
    update = update_lib.jit_rl_update(graphdef, rest, optimizer, runtime_configs.update_config(config))
    batch = random_batch(config, model.config.vocab_size, 0)
    out = {"variant": variant, "rss_loaded_gib": status_gib("VmRSS"),
           "state_bytes": sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state))),
           "frozen_bytes": sum(x.nbytes for x in jax.tree.leaves(rest)),
           "xla_temp_gib": update.lower(state, batch).compile().memory_analysis().temp_size_in_bytes / 2**30}
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(update(state, batch))
    out["first_call_s"] = time.perf_counter() - start
    out["rss_before_gib"] = reset_peak_rss()
    times = []
    for seed in range(1, repeats + 1):
        batch = random_batch(config, model.config.vocab_size, seed)
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(update(state, batch))
        times.append(time.perf_counter() - start)
    out.update(peak_gib=status_gib("VmHWM"), update_s=statistics.median(times), update_min_s=min(times),
               loss=float(metrics["actor/loss"]))
    with tempfile.TemporaryDirectory() as directory:
        Checkpointer(directory).save(1, state, {"step": 1})
        out["checkpoint_bytes"] = folder_bytes(directory)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_lora.json")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeats)))
        return
    results = {}
    for variant in args.variants:
        run = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", variant, "--repeats",
                              str(args.repeats)], capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{run.stderr[-3000:]}")
        results[variant] = json.loads(run.stdout.strip().splitlines()[-1])
        print(json.dumps(results[variant]), flush=True)
    full = results.get("full")
    print("| variant | update s | peak RSS GiB | state MiB | frozen MiB | checkpoint MiB |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = (lambda key: f" ({r[key] / full[key]:.2f}×)" if full else "")  # noqa: E731
        print(f"| {name} | {r['update_s']:.1f}{ratio('update_s')} | {r['peak_gib']:.2f}{ratio('peak_gib')} | "
              f"{r['state_bytes'] / 2**20:.0f}{ratio('state_bytes')} | {r['frozen_bytes'] / 2**20:.0f} | "
              f"{r['checkpoint_bytes'] / 2**20:.1f}{ratio('checkpoint_bytes')} |")
    with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
