"""Benchmark the continuous-batching engine against the static sampler, side by side in one run.

    python experiments/bench_engine.py --out runs/bench_engine          # the figures in docs/performance.md
    python experiments/bench_engine.py --quick                          # a smaller, faster run

(a) long tail: R requests whose budgets are drawn from a log-normal (EOS off, so every response is
    exactly its budget) with max / mean ≥ 5. Static: `static_sampler.generate` decodes all R rows until
    the longest budget. Engine: `engine.generate` with S slots and per-request budgets. Useful
    tokens/s = Σ budgets / seconds for both; the ratio is the gain. Run on a 4-layer d256 model and
    on the CPU experiment's policy shape. Slot utilisation and KV-cache bytes (engine slots vs the
    static cache for the same requests) are reported.
(b) shared prefill: P prompts × G samples, 256-token prompts: the engine with shared prefill vs the
    engine prefilling every request (`share_prompt_prefill=False`) — prefill rows, and the time of
    the prefill alone (the model's forward over the prompt rows, measured as a separate call).
    The engine's tail compaction (`EngineConfig.compact_tail`) is also measured off, in the same run.
(c) gain vs max / mean: (a) on the 4L d256 model for several log-normal spreads; plot.
(d) host syncs: the engine of (a) on the 4L d256 model with K = 1 (a sync per token) … 64 decode
    steps per device call, and with fewer / more slots.

Each timing is the median of `--repeats` runs after one warm-up (compiling) run; static and engine
alternate within each round. Greedy decoding, so both sides do identical work per token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from fipo_jax.generation import engine as engine_lib
from fipo_jax.generation import sampling, static_sampler
from fipo_jax.models import CausalLM, ModelConfig


def model_of(layers: int, hidden: int, intermediate: int, vocab: int, seed: int = 0, heads: int = 4,
             kv_heads: int = 2) -> CausalLM:
    config = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, initializer_range=0.05)
    return CausalLM(config, rngs=nnx.Rngs(seed))


def long_tail_budgets(count: int, mean: float, sigma: float, cap: int, seed: int) -> np.ndarray:
    """Log-normal budgets (median ≈ mean·e^(−σ²/2)), clipped to [1, cap]."""
    rng = np.random.RandomState(seed)
    return np.clip(np.round(rng.lognormal(np.log(mean) - sigma ** 2 / 2, sigma, count)), 1, cap).astype(np.int32)


def prompts(count: int, groups_of: int, length: int, vocab: int, seed: int):
    rng = np.random.RandomState(seed)
    unique = rng.randint(1, vocab, (-(-count // groups_of), length)).astype(np.int32)
    ids = np.repeat(unique, groups_of, axis=0)[:count]
    return ids, np.ones(ids.shape, bool)


def timed(fn, repeats: int):
    fn()  # compile
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def long_tail(model, budgets, ids, mask, args, label: str, uncompacted: bool = False) -> dict:
    cap = int(budgets.max())
    config = sampling.SamplingConfig(max_new_tokens=cap, temperature=0.0, prompt_length_buckets=None)
    engine_config = engine_lib.EngineConfig(num_slots=args.slots, steps_per_sync=args.sync)
    key = jax.random.PRNGKey(0)

    def static():
        out = static_sampler.generate(model, ids, mask, key, config)
        return jax.block_until_ready(out)

    def continuous():
        return engine_lib.generate_with_stats(model, ids, mask, key, config, engine_config, max_new_tokens=budgets)

    static_s, static_out = timed(static, args.repeats)
    engine_s, (engine_out, stats) = timed(continuous, args.repeats)
    extra = {}
    if uncompacted:  # the same engine without moving the last busy slots into fewer slots
        plain = dataclasses.replace(engine_config, compact_tail=False)
        plain_s, (_, plain_stats) = timed(lambda: engine_lib.generate_with_stats(model, ids, mask, key, config, plain,
                                                                                 max_new_tokens=budgets), args.repeats)
        extra = {"engine_uncompacted_s": plain_s, "gain_uncompacted": static_s / plain_s,
                 "slot_utilisation_uncompacted": plain_stats.slot_utilisation}
    useful = int(budgets.sum())
    same = all(np.array_equal(engine_out.tokens[r, :b], np.asarray(static_out.tokens)[r, :b])
               for r, b in enumerate(budgets))
    width = ids.shape[1]
    static_bytes = engine_lib.kv_cache_bytes(model.config, len(budgets), width + cap - 1)
    engine_bytes = engine_lib.kv_cache_bytes(model.config, args.slots, width + cap - 1)
    row = {"model": label, "requests": len(budgets), "slots": args.slots, "steps_per_sync": args.sync,
           "budget_mean": float(budgets.mean()), "budget_max": cap, "max_over_mean": cap / float(budgets.mean()),
           "useful_tokens": useful, "static_s": static_s, "engine_s": engine_s,
           "static_tokens_per_s": useful / static_s, "engine_tokens_per_s": useful / engine_s,
           "gain": static_s / engine_s, "slot_utilisation": stats.slot_utilisation,
           "static_row_utilisation": useful / (len(budgets) * cap), "engine_device_calls": stats.device_calls,
           "tokens_equal_static": same, "static_kv_bytes": static_bytes, "engine_kv_bytes": engine_bytes,
           "kv_bytes_per_row": static_bytes // len(budgets), **extra}
    print(f"[{label}] max/mean {row['max_over_mean']:.1f}: static {static_s:.2f} s, engine {engine_s:.2f} s, "
          f"gain {row['gain']:.2f}x, slot utilisation {stats.slot_utilisation:.3f} "
          f"(static rows {row['static_row_utilisation']:.3f}), tokens equal: {same}"
          + (f"; without tail compaction {extra['gain_uncompacted']:.2f}x, utilisation "
             f"{extra['slot_utilisation_uncompacted']:.3f}" if extra else ""), flush=True)
    return row


def shared_prefill(model, args) -> dict:
    """G samples of each of `--prefill-prompts` prompts, one new token each: the run is the prefill."""
    ids, mask = prompts(args.prefill_prompts * args.group, args.group, args.prefill_len, model.config.vocab_size, 1)
    config = sampling.SamplingConfig(max_new_tokens=1, temperature=0.0, prompt_length_buckets=None)
    out = {}
    for shared in (True, False):
        engine_config = engine_lib.EngineConfig(num_slots=args.slots, prefill_batch=args.group,
                                                share_prompt_prefill=shared)
        seconds, (_, stats) = timed(lambda: engine_lib.generate_with_stats(model, ids, mask, jax.random.PRNGKey(0), config,
                                                                           engine_config), args.repeats)
        out["shared" if shared else "repeated"] = {"seconds": seconds, "prefill_s": stats.prefill_seconds,
                                                   "prefill_calls": stats.prefill_calls,
                                                   "prefilled_prompts": stats.prefilled_prompts}
    out.update(prompts=args.prefill_prompts, group=args.group, prompt_tokens=args.prefill_len,
               prefill_work_ratio=out["repeated"]["prefilled_prompts"] / out["shared"]["prefilled_prompts"],
               prefill_time_ratio=out["repeated"]["prefill_s"] / out["shared"]["prefill_s"],
               end_to_end_ratio=out["repeated"]["seconds"] / out["shared"]["seconds"])
    print(f"[prefill] G={args.group}, {args.prefill_len}-token prompts: prefilled rows "
          f"{out['shared']['prefilled_prompts']} vs {out['repeated']['prefilled_prompts']}, prefill time "
          f"{out['shared']['prefill_s']:.3f} vs {out['repeated']['prefill_s']:.3f} s "
          f"({out['prefill_time_ratio']:.1f}x less); whole call {out['end_to_end_ratio']:.1f}x faster", flush=True)
    return out


def schedule(model, budgets, ids, mask, args) -> list[dict]:
    """(d) The engine alone with other steps per sync K and slot counts S."""
    config = sampling.SamplingConfig(max_new_tokens=int(budgets.max()), temperature=0.0, prompt_length_buckets=None)
    rows = []
    for slots, sync in [(args.slots, k) for k in args.sync_sweep] + [(s, args.sync) for s in args.slot_sweep]:
        engine_config = engine_lib.EngineConfig(num_slots=slots, steps_per_sync=sync)
        seconds, (_, stats) = timed(lambda: engine_lib.generate_with_stats(model, ids, mask, jax.random.PRNGKey(0), config,
                                                                           engine_config, max_new_tokens=budgets), args.repeats)
        rows.append({"slots": slots, "steps_per_sync": sync, "seconds": seconds,
                     "tokens_per_s": float(budgets.sum()) / seconds, "device_calls": stats.device_calls,
                     "slot_utilisation": stats.slot_utilisation})
        print(f"[schedule] S={slots}, K={sync}: {rows[-1]['tokens_per_s']:.0f} useful tokens/s, "
              f"{stats.device_calls} device calls, utilisation {stats.slot_utilisation:.3f}", flush=True)
    return rows


def plot(sweep: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.4))
    ax = fig.subplots()
    x = [r["max_over_mean"] for r in sweep]
    ax.plot(x, [r["gain"] for r in sweep], "o-", label="engine / static (useful tokens/s)")
    ax.plot(x, [1 / r["static_row_utilisation"] for r in sweep], "--", color="grey",
            label="max / mean (padding bound)")
    ax.axhline(1, color="black", lw=0.6)
    ax.set_xlabel("budget max / mean")
    ax.set_ylabel("speed-up")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_engine")
    parser.add_argument("--quick", action="store_true", help="fewer requests and shorter budgets")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--group", type=int, default=16, help="samples per prompt")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--mean", type=float, default=64.0, help="mean budget")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal spread of (a)")
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.25, 0.5, 0.75, 1.0, 1.25])
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--sync", type=int, default=16)
    parser.add_argument("--sync-sweep", type=int, nargs="*", default=[1, 4, 64])
    parser.add_argument("--slot-sweep", type=int, nargs="*", default=[32, 128])
    parser.add_argument("--prefill-prompts", type=int, default=16)
    parser.add_argument("--prefill-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.mean, args.sweep, args.repeats, args.prefill_prompts = 64, 32.0, [0.5, 1.0], 1, 2
        args.slots, args.sync_sweep, args.slot_sweep = 16, [1], [8]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}; load {os.getloadavg()[0]:.2f}", flush=True)
    small = model_of(4, 256, 1024, 512)
    policy = model_of(2, 128, 384, 20)  # the CPU experiment's policy (`ModelSection` defaults, char vocabulary)
    ids, mask = prompts(args.requests, args.group, args.prompt_len, 512, 0)
    budgets = long_tail_budgets(args.requests, args.mean, args.sigma, 20 * int(args.mean), seed=0)
    results = {"long_tail": [long_tail(small, budgets, ids, mask, args, "4L d256", uncompacted=True),
                             long_tail(policy, budgets, ids % 20, mask, args, "CPU policy", uncompacted=True)]}
    results["prefill"] = shared_prefill(small, args)
    results["sweep"] = [long_tail(small, long_tail_budgets(args.requests, args.mean, s, 20 * int(args.mean), seed=0),
                                  ids, mask, args, f"4L d256 sigma {s}") for s in args.sweep]
    plot(results["sweep"], out / "engine_gain.png")
    results["schedule"] = schedule(small, budgets, ids, mask, args)
    results["load_after"] = os.getloadavg()[0]
    (out / "bench_engine.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'bench_engine.json'} and engine_gain.png; load {results['load_after']:.2f}")


if __name__ == "__main__":
    main()
