"""Which form of the Future-KL sum is cheapest inside the FIPO loss on this backend?

    python experiments/bench_future_kl_forms.py            # B × T = 2 × 20,480 and 8 × 2,048

The loss-only target (FIPO ≤ 1.5× our DAPO loss) leaves the sum a budget of what the rest of
FIPO's extra work (filter, weights, drop rule) does not already take: `bench_loss.py` measures
that floor. This script times candidate exact forms of F_t = x_t + γ F_{t+1} two ways: alone on a
materialised [B, T] array, and in the loss's own pipeline (x computed from the log-probs, the
weights clip(exp(F)) after), where XLA fuses or fails to fuse around the sum. The library's
methods (scan, associative, blocked) are included; the others are experiments kept here with
their figures (docs/performance.md), not library code.

* ``lanes c``      each row split into c contiguous chunks, one scan over the chunk length with
                   B·c lanes, a short scan over chunk starts, an elementwise fix-up.
* ``levels k``     in-block sums of k tokens by explicit shifted multiply-adds, block starts
                   recursively (log_k T levels), fix-ups on the way back.
* ``columns``      a fori_loop over time that reads and writes one column [B] of the row-major
                   array (no transposes).
* ``blocked k + barrier``  the library's blocked method with x materialised first, so the
                   matmul runs on a plain array instead of a fused producer.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fipo_jax.core.future_kl import _blocked, _decay_powers, _reverse_scan, discounted_reverse_cumsum

from bench_loss import make_batch, time_interleaved  # the same batches and timing

GAMMA = 2 ** (-1 / 32)  # the official τ = 32


def lanes(x, gamma, chunks: int):
    """Row chunks as lanes: F inside each chunk by one scan over its length, then the true F at
    chunk starts (a scan over chunks) carried in: F = local + γ^(K−i) · start_of_next."""
    rows, length = x.shape
    k = -(-length // chunks)
    x_KxBxC = jnp.transpose(jnp.pad(x, [(0, 0), (0, k * chunks - length)]).reshape(rows, chunks, k), (2, 0, 1))
    local = _reverse_scan(jnp.moveaxis(x_KxBxC, 0, -1), gamma)  # [B, C, K]
    starts = _reverse_scan(local[..., 0], _decay_powers(gamma, np.asarray(k), x.dtype))
    following = jnp.concatenate([starts[:, 1:], jnp.zeros_like(starts[:, :1])], -1)
    f = local + following[..., None] * _decay_powers(gamma, k - np.arange(k), x.dtype)
    return f.reshape(rows, k * chunks)[:, :length]


def levels(x, gamma, k: int, min_length: int = 64):
    """In-block reverse sums by Horner over k explicit columns; block starts recursively."""
    length = x.shape[-1]
    if length <= min_length:
        return _reverse_scan(x, gamma)
    blocks = -(-length // k)
    x_NxK = jnp.pad(x, [(0, 0), (0, blocks * k - length)]).reshape(x.shape[0], blocks, k)
    columns, acc = [None] * k, x_NxK[..., k - 1]
    columns[k - 1] = acc
    for i in range(k - 2, -1, -1):
        acc = x_NxK[..., i] + np.float32(gamma) * acc
        columns[i] = acc
    local = jnp.stack(columns, axis=-1)
    starts = levels(local[..., 0], gamma**k, k, min_length)
    following = jnp.concatenate([starts[..., 1:], jnp.zeros_like(starts[..., :1])], -1)
    f = local + following[..., None] * _decay_powers(gamma, k - np.arange(k), x.dtype)
    return f.reshape(x.shape[0], blocks * k)[:, :length]


def columns(x, gamma):
    """One column of the row-major [B, T] array per loop step, from the end."""
    length = x.shape[-1]

    def body(i, state):
        out, carry = state
        t = length - 1 - i
        carry = lax.dynamic_slice_in_dim(x, t, 1, axis=1)[:, 0] + np.float32(gamma) * carry
        return lax.dynamic_update_slice_in_dim(out, carry[:, None], t, axis=1), carry

    return lax.fori_loop(0, length, body, (jnp.zeros_like(x), jnp.zeros(x.shape[:1], x.dtype)))[0]


FORMS = {
    "scan (library default on CPU)": lambda x: discounted_reverse_cumsum(x, GAMMA, "scan"),
    "associative": lambda x: discounted_reverse_cumsum(x, GAMMA, "associative"),
    "blocked 32": lambda x: discounted_reverse_cumsum(x, GAMMA, "blocked", 32),
    "blocked 32 + barrier": lambda x: _blocked(lax.optimization_barrier(x), GAMMA, 32),
    "blocked 8 + barrier": lambda x: _blocked(lax.optimization_barrier(x), GAMMA, 8),
    "lanes 8": lambda x: lanes(x, GAMMA, 8),
    "lanes 128": lambda x: lanes(x, GAMMA, 128),
    "levels 4": lambda x: levels(x, GAMMA, 4),
    "levels 16": lambda x: levels(x, GAMMA, 16),
    "columns": lambda x: columns(x, GAMMA),
}


def summed(lp, old, mask):
    """x_t of the loss: the clamped log-ratio on real tokens with r ≤ c = 10."""
    delta = jnp.clip(lp - old, -20.0, 20.0)
    return jnp.where((mask != 0) & (delta <= jnp.log(10.0)), delta, 0.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2x20480,8x2048")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    results = {}
    for size in args.sizes.split(","):
        b, t = (int(v) for v in size.split("x"))
        lp, old, _, mask = (jnp.asarray(a) for a in make_batch(b, t))
        x = summed(lp, old, mask)
        reference = np.asarray(FORMS["scan (library default on CPU)"](x))
        fns, fn_args, errors = {}, {}, {}
        for name, form in FORMS.items():
            errors[name] = float(np.max(np.abs(np.asarray(jax.jit(form)(x)) - reference)))
            fns[f"{name} | alone"], fn_args[f"{name} | alone"] = jax.jit(form), (x,)
            pipeline = lambda lp, old, mask, form=form: jnp.clip(jnp.exp(form(summed(lp, old, mask))), 1.0, 1.2)  # noqa: E731
            fns[f"{name} | pipeline"], fn_args[f"{name} | pipeline"] = jax.jit(pipeline), (lp, old, mask)
        fns["no sum (F = x) | pipeline"] = jax.jit(lambda lp, old, mask: jnp.clip(jnp.exp(summed(lp, old, mask)), 1.0, 1.2))
        fn_args["no sum (F = x) | pipeline"] = (lp, old, mask)
        seconds = time_interleaved(fns, fn_args, args.repeats)
        results[size] = {"seconds": seconds, "max_abs_error_vs_scan": errors}
        print(f"\n### B × T = {size}: milliseconds (median), max |error| vs scan")
        print("| form | alone | in the pipeline x → F → clip(exp(F)) | max abs error |")
        print("|---|---|---|---|")
        for name in FORMS:
            print(f"| {name} | {seconds[name + ' | alone'] * 1e3:.3f} | {seconds[name + ' | pipeline'] * 1e3:.3f} "
                  f"| {errors[name]:.1e} |")
        print(f"| no sum (F = x) | | {seconds['no sum (F = x) | pipeline'] * 1e3:.3f} | |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"backend": jax.default_backend(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
