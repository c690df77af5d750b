"""Benchmark packed updates against padded ones, side by side in one run.

    python experiments/bench_packing.py --out runs/bench_packing        # the figures in docs/performance.md
    python experiments/bench_packing.py --quick                         # a smaller, faster run

The same sequences either way: S responses whose lengths are drawn from the engine benchmark's
log-normal (max / mean ≥ 5), each after a prompt of ``--prompt-len`` tokens, groups of ``--group``.
Padded (`packing.pack_batch(..., layout="padded")`): one sequence per row, every row as wide as
prompt + the longest response. Packed (``layout="packed"``): each mini-batch's sequences packed into
rows of that width by first-fit decreasing, micro-batches of at most the same row count.

(a) the update: the jitted `update_lib.rl_update` (old log-probs, advantages, M optimizer updates of
    forward + backward through the model) — real tokens / s and the ratio packed / padded;
(b) the old-log-prob pass alone (forward without gradient over every micro-batch);
(c) gain vs max / mean: (a) for several log-normal spreads; plot;
and the padding fraction of both layouts. Each timing is the median of ``--repeats`` runs after
one compiling run; padded and packed alternate within each round. FIPO loss, 4L d256 model.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import fipo_jax as fj
from bench_engine import long_tail_budgets as long_tail_lengths, model_of  # the same models and lengths
from fipo_jax.train import update as update_lib
from fipo_jax.core.packing import pack_batch


def rollout_fields(lengths: np.ndarray, prompt_len: int, group: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Host fields of `packing.pack_batch`: prompts shared by groups, responses of ``lengths``."""
    rng = np.random.RandomState(seed)
    count, width = len(lengths), int(lengths.max())
    prompts = np.repeat(rng.randint(1, vocab, (-(-count // group), prompt_len)), group, axis=0)[:count]
    response_mask = np.arange(width)[None] < lengths[:, None]
    return {"prompt_ids": prompts.astype(np.int32), "prompt_mask": np.ones(prompts.shape, bool),
            "tokens": (rng.randint(1, vocab, (count, width)) * response_mask).astype(np.int32),
            "response_mask": response_mask,
            "scores": rng.choice([-1.0, 1.0], count).astype(np.float32),
            "sampler_log_probs": np.where(response_mask, -3.0, 0.0).astype(np.float32)}


def median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function (``block_until_ready`` on its result), alternating, after a
    compiling call of each."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def compare(model, lengths: np.ndarray, args, label: str, old_log_probs: bool = True) -> dict:
    fields = rollout_fields(lengths, args.prompt_len, args.group, model.config.vocab_size, seed=0)
    padded, _ = pack_batch(fields, args.mini_batches, args.micro_batch_size, layout="padded")
    packed, stats = pack_batch(fields, args.mini_batches, args.micro_batch_size)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    schedule = update_lib.warmup_schedule(1e-4, 0, args.mini_batches)
    optimizer = update_lib.make_optimizer(schedule, 0.9, 0.999, 1e-8, 0.0, 1.0)
    config = update_lib.UpdateConfig(loss=fj.PolicyLossConfig(), group_size=args.group, logprob_chunk_size=1024)
    update = jax.jit(functools.partial(update_lib.rl_update, graphdef=graphdef, rest=rest, optimizer=optimizer,
                                       config=config))  # not donated: the same state is reused
    state = update_lib.init_state(params, optimizer, jax.random.key(0))
    padded_dev, packed_dev = jax.device_put(padded), jax.device_put(packed)
    real = int(fields["prompt_mask"].sum() + fields["response_mask"].sum())
    times = median_times({"padded": lambda: update(state, padded_dev)[1],
                          "packed": lambda: update(state, packed_dev)[1]}, args.repeats)
    _, metrics_padded = update(state, padded_dev)
    _, metrics_packed = update(state, packed_dev)
    loss_gap = abs(float(metrics_packed["actor/loss"]) - float(metrics_padded["actor/loss"]))
    result = {
        "label": label, "sequences": len(lengths), "mean_length": float(lengths.mean()), "max_length": int(lengths.max()),
        "max_over_mean": float(lengths.max() / lengths.mean()), "real_tokens": real,
        "padded_shape": list(padded.input_ids.shape), "packed_shape": list(packed.input_ids.shape),
        "padding_frac_padded": stats["padding_frac_unpacked"], "padding_frac_packed": stats["padding_frac"],
        "update_s_padded": times["padded"], "update_s_packed": times["packed"],
        "update_tokens_per_s_padded": real / times["padded"], "update_tokens_per_s_packed": real / times["packed"],
        "update_gain": times["padded"] / times["packed"], "loss_abs_difference": loss_gap,
    }
    if old_log_probs:
        probs = jax.jit(lambda p, b: update_lib._old_log_probs(graphdef, p, rest, b.input_ids, b.segment_ids, 1024))
        t = median_times({"padded": lambda: probs(params, padded_dev),
                          "packed": lambda: probs(params, packed_dev)}, args.repeats)
        result |= {"old_log_probs_s_padded": t["padded"], "old_log_probs_s_packed": t["packed"],
                   "old_log_probs_gain": t["padded"] / t["packed"]}
    print(json.dumps(result), flush=True)
    return result


def plot(sweep: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    x = [r["max_over_mean"] for r in sweep]
    ax.plot(x, [r["update_gain"] for r in sweep], "o-", label="update tokens/s, packed / padded")
    ax.plot(x, [1 / (1 - r["padding_frac_padded"]) * (1 - r["padding_frac_packed"]) for r in sweep], "s--",
            label="padded tokens / packed tokens")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("max / mean response length")
    ax.set_ylabel("ratio")
    ax.set_title("Packed vs padded update, 4L d256, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_packing")
    parser.add_argument("--quick", action="store_true", help="fewer sequences, shorter responses, one repeat")
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--group", type=int, default=16, help="responses per prompt")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--mean", type=float, default=48.0, help="mean response length")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal spread of (a)")
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.25, 0.5, 0.75, 1.25])
    parser.add_argument("--mini-batches", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.sequences, args.mean, args.sweep, args.repeats, args.micro_batch_size = 32, 24.0, [0.5], 1, 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}; load {os.getloadavg()[0]:.2f}", flush=True)
    small = model_of(4, 256, 1024, 512)
    cap = 20 * int(args.mean)
    results = {"args": vars(args),
               "long_tail": compare(small, long_tail_lengths(args.sequences, args.mean, args.sigma, cap, 0), args,
                                    f"4L d256 sigma {args.sigma}")}
    results["sweep"] = [compare(small, long_tail_lengths(args.sequences, args.mean, s, cap, 0), args,
                                f"4L d256 sigma {s}", old_log_probs=False) for s in args.sweep]
    sweep = sorted(results["sweep"] + [results["long_tail"]], key=lambda r: r["max_over_mean"])
    plot(sweep, out / "packing_gain.png")
    results["load_after"] = os.getloadavg()[0]
    (out / "bench_packing.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'bench_packing.json'} and packing_gain.png; load {results['load_after']:.2f}")


if __name__ == "__main__":
    main()
