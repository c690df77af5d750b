"""Benchmark the FIPO loss: ours (JAX, each Future-KL method) vs our DAPO loss vs the
official O(T²) chunked formulation (PyTorch transcription and JAX), side by side in one run.

    python experiments/bench_loss.py                       # the figures in docs/performance.md
    python experiments/bench_loss.py --sizes 2x20480 --repeats 5 --out bench.json

Every timing is forward + backward (d loss / d log_probs) of a jitted (ours) or eager
(PyTorch) call, after warm-up: the median over rounds of the mean time of a batch of
back-to-back calls, with the order of the variants shuffled every round.
Memory is XLA's compiled temporary-buffer size for the same computation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import fipo_jax as fj  # noqa: E402

METHODS = ("scan", "associative", "blocked")


def make_batch(batch: int, length: int, seed: int = 0):
    """Synthetic rollout: drifted log-probs, ±1-ish advantages, random right padding."""
    rng = np.random.default_rng(seed)
    old = (-np.abs(rng.normal(size=(batch, length))) * 2).astype(np.float32)
    new = (old + rng.normal(size=(batch, length)) * 0.05).astype(np.float32)
    lengths = rng.integers(length // 2, length + 1, size=batch)
    lengths[0] = length
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
    adv = (rng.choice([-1.0, 1.0], size=(batch, 1)) * mask).astype(np.float32)
    return new, old, adv, mask


def jax_loss_grad(config: fj.PolicyLossConfig, with_metrics: bool):
    """Jitted (loss, grad) — and all metrics when `with_metrics` (otherwise XLA drops them)."""

    def fn(lp, old, adv, mask):
        (loss, metrics), grad = jax.value_and_grad(
            lambda x: fj.policy_loss(x, old, adv, mask, config), has_aux=True)(lp)
        return (loss, grad, metrics) if with_metrics else (loss, grad)

    return jax.jit(fn)


def time_interleaved(fns: dict, args: dict, repeats: int, min_batch_seconds: float = 0.05, seed: int = 0):
    """Median seconds per call of each fn.

    Each fn is warmed up, then timed in rounds; a round times `n` back-to-back calls
    (n chosen so one batch takes >= `min_batch_seconds`), and the order of the fns is
    shuffled every round so no variant always follows a heavy one.
    """
    calls = {}
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))  # compile
        start = time.perf_counter()
        jax.block_until_ready(fn(*args[name]))
        once = time.perf_counter() - start
        calls[name] = max(1, int(min_batch_seconds / max(once, 1e-6)))
    samples = {name: [] for name in fns}
    order = list(fns)
    rng = np.random.default_rng(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            fn, a, n = fns[name], args[name], calls[name]
            jax.block_until_ready(fn(*a))  # re-warm caches after the previous variant
            start = time.perf_counter()
            for _ in range(n):
                out = fn(*a)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(v) for name, v in samples.items()}


def torch_variants(batch_np):
    import torch

    from tests import torch_reference

    torch.set_num_threads(os.cpu_count() or 1)
    lp, old, adv, mask = (torch.tensor(a) for a in batch_np)

    def run(loss):
        def fn():
            x = lp.clone().requires_grad_(True)
            value, _ = torch_reference.policy_loss(x, old, adv, mask, loss=loss)
            value.backward()
            return value.item(), x.grad

        return lambda *_: fn()

    return run("fipo"), run("dapo")


def without_future_kl_sum(config: fj.PolicyLossConfig):
    """The FIPO loss with the Future-KL sum skipped (F_t = x_t, no scan): NOT a valid loss, the cost
    floor of everything around the sum (filter, weights, drop rule) for the loss-only comparison."""
    import unittest.mock

    from fipo_jax.core import losses
    from fipo_jax.core.future_kl import summed_tokens

    def fn(lp, old, adv, mask):
        skip = lambda delta, m, decay_rate, filter_threshold=None, **_: jnp.where(  # noqa: E731
            summed_tokens(delta, m, filter_threshold), delta, 0.0)
        with unittest.mock.patch.object(losses, "future_kl", skip):
            return jax.value_and_grad(lambda x: fj.policy_loss(x, old, adv, mask, config)[0])(lp)

    return jax.jit(fn)


def future_kl_alone(method: str):
    """Only the discounted sum of a given [B, T] array (no filter, no loss around it)."""
    return jax.jit(lambda x: fj.discounted_reverse_cumsum(x, fj.discount_factor(32.0), method))


def temp_bytes(fn, *args) -> int:
    analysis = fn.lower(*args).compile().memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", -1)) if analysis is not None else -1


def bench_size(batch: int, length: int, repeats: int, with_torch: bool, with_quadratic: bool) -> dict:
    data_np = make_batch(batch, length)
    data = tuple(jnp.asarray(a) for a in data_np)
    fns, args = {}, {}
    fns["dapo"] = jax_loss_grad(fj.PolicyLossConfig.dapo(), with_metrics=False)
    fns["dapo+metrics"] = jax_loss_grad(fj.PolicyLossConfig.dapo(), with_metrics=True)
    for method in METHODS:
        cfg = fj.PolicyLossConfig(future_kl_method=method)
        fns[f"fipo[{method}]"] = jax_loss_grad(cfg, with_metrics=False)
        fns[f"fipo[{method}]+metrics"] = jax_loss_grad(cfg, with_metrics=True)
    fns["fipo, Future-KL sum skipped (floor)"] = without_future_kl_sum(fj.PolicyLossConfig())
    for method in METHODS:
        fns[f"Future-KL sum alone [{method}]"] = future_kl_alone(method)
    if with_quadratic:
        fns["fipo[quadratic O(T²)]"] = jax_loss_grad(fj.PolicyLossConfig(future_kl_method="quadratic"), False)
    for name in fns:
        args[name] = data[:1] if name.startswith("Future-KL sum alone") else data
    memory = {name: temp_bytes(fn, *args[name]) for name, fn in fns.items()}
    if with_torch:
        fns["torch fipo (official O(T²))"], fns["torch dapo (official)"] = torch_variants(data_np)
        args["torch fipo (official O(T²))"] = args["torch dapo (official)"] = ()
    seconds = time_interleaved(fns, args, repeats)
    return {"batch": batch, "length": length, "seconds": seconds, "temp_bytes": memory}


def report(results: list[dict]) -> str:
    lines = []
    for r in results:
        s, m = r["seconds"], r["temp_bytes"]
        dapo, dapo_m = s["dapo"], s["dapo+metrics"]
        lines.append(f"\n### B={r['batch']}, T={r['length']}  (forward+backward, median)")
        lines.append("| variant | time (ms) | × our DAPO | XLA temp memory |")
        lines.append("|---|---|---|---|")
        for name, sec in s.items():
            base = dapo_m if name.endswith("+metrics") else dapo
            mem = m.get(name)
            mem_s = f"{mem / 2**20:.2f} MiB" if mem is not None and mem >= 0 else "n/a"
            lines.append(f"| {name} | {sec * 1e3:.3f} | {sec / base:.2f}× | {mem_s} |")
        best = min(METHODS, key=lambda k: s[f"fipo[{k}]"])
        lines.append(f"\nfastest Future-KL method here: **{best}**")
        if "torch fipo (official O(T²))" in s:
            lines.append(
                f"official-formulation FIPO (PyTorch) / official DAPO (PyTorch): "
                f"{s['torch fipo (official O(T²))'] / s['torch dapo (official)']:.1f}×; "
                f"our FIPO[{best}] speed-up over it: {s['torch fipo (official O(T²))'] / s[f'fipo[{best}]']:.0f}×")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2x20480,8x2048", help="comma-separated BxT sizes")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per variant (median)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch official-formulation runs")
    parser.add_argument("--no-quadratic", action="store_true", help="skip the JAX O(T²) formulation")
    parser.add_argument("--memory-lengths", default="2048,8192,20480,32768",
                        help="T values (B=2) at which to report XLA temp memory of FIPO[default]")
    parser.add_argument("--out", default=None, help="write all figures as JSON here")
    args = parser.parse_args(argv)

    env = {"backend": jax.default_backend(), "devices": str(jax.devices()), "jax": jax.__version__,
           "cpu_count": os.cpu_count(), "platform": platform.platform()}
    print(f"# FIPO loss benchmark — {env['backend']} ({env['cpu_count']} CPU threads), jax {env['jax']}")
    results = []
    for size in args.sizes.split(","):
        b, t = (int(v) for v in size.lower().split("x"))
        print(f"running B={b} T={t} ...", flush=True)
        results.append(bench_size(b, t, args.repeats, not args.no_torch, not args.no_quadratic))
    print(report(results))

    scaling = {}
    fn = jax_loss_grad(fj.PolicyLossConfig(), with_metrics=True)
    for t in (int(v) for v in args.memory_lengths.split(",")):
        data = tuple(jnp.asarray(a) for a in make_batch(2, t))
        scaling[t] = temp_bytes(fn, *data)
    print("\n### Memory scaling of FIPO (default method, with metrics), B=2")
    print("| T | XLA temp memory | bytes per token |")
    print("|---|---|---|")
    for t, nbytes in scaling.items():
        print(f"| {t} | {nbytes / 2**20:.2f} MiB | {nbytes / (2 * t):.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "results": results, "memory_scaling_B2": scaling}, f, indent=2)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
