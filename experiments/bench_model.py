"""Benchmark the policy model paths: our jitted sampler and log-prob training step vs the same
weights in PyTorch/transformers, side by side in one run, plus the LM-head memory bound.

    python experiments/bench_model.py --out bench_model.json       # the figures in docs/performance.md
    python experiments/bench_model.py --layers 2 --hidden 128 --repeats 5

(a) decode: greedy, KV cache, B prompts of P tokens, N new tokens each, no early stop.
    Ours: `fipo_jax.generation.static_sampler.generate` (one jitted prefill + while_loop decode).
    Reference: `transformers` `generate(do_sample=False, use_cache=True)` on CPU PyTorch.
    Throughput = B·N / seconds; the first (compiling) call is reported separately.
(b) log-prob forward + backward of Σ log p(x_{t+1} | x_≤t) over a [B, P+N] batch w.r.t. all
    parameters. Ours: jit(grad(sequence_log_probs)) (chunked LM head). Reference: the torch
    model's full logits → log_softmax → gather → backward. Throughput = B·(P+N−1) / seconds.
(d) long decode, ours only: `--long-new-tokens` (default 1,024) new tokens per row with the
    block-wise decode attention (reads only the KV-cache blocks written so far; the default)
    vs dense decode attention (reads the whole preallocated cache every step).
(e) long decode with sliding-window layers (window `--window`, default 256), same weights: the
    position mask with block skipping (the default) vs the same mask over the whole cache, and
    full attention for reference.
(c) memory of the LM-head log-probs at Qwen2.5-0.5B head shape (D=896, V=151,936), B=1,
    T=8,192: XLA's compiled temporary buffers for the chunked computation vs one full-logits
    tensor (both only compiled, never run), forward and forward+backward.

Timings are the median (and, in brackets, the minimum) over `--repeats` rounds after a warm-up
call; ours and the reference alternate within each round. The machine's load average is
printed: on a shared 2-core machine other processes slow PyTorch's OpenMP threads far more
than XLA's, so only runs that start and end near zero load are comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from fipo_jax.generation.logprobs import (  # noqa: E402
    chunked_token_log_probs,
    full_logits_token_log_probs,
    sequence_log_probs,
)
from fipo_jax.models import CausalLM, load_pretrained  # noqa: E402
from fipo_jax.generation.sampling import SamplingConfig  # noqa: E402
from fipo_jax.generation.static_sampler import generate


def build_models(args, path: str):
    """The same random weights as a torch `Qwen2ForCausalLM` and our nnx model."""
    import torch
    import transformers

    torch.manual_seed(args.seed)
    hf_config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, initializer_range=0.2, tie_word_embeddings=False,
        max_position_embeddings=4096,
    )  # fmt: skip
    torch_model = transformers.Qwen2ForCausalLM(hf_config).eval()
    torch_model.save_pretrained(path)
    torch_model.generation_config.eos_token_id = None  # never stop early
    return torch_model, load_pretrained(path)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_alternating(fns: dict, repeats: int) -> tuple[dict, dict]:
    """(median, min) seconds per call of each already-warm fn, alternating the fns every round.

    The minimum is the better estimate on a shared machine (interference only adds time).
    """
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn))
    return (
        {name: statistics.median(s) for name, s in samples.items()},
        {name: min(s) for name, s in samples.items()},
    )


def throughput(work: int, first_ours: float, medians: dict, minima: dict) -> dict:
    """Seconds, work/second and speed-up (reference time ÷ ours) from median and min timings."""
    return {
        "ours_s": medians["ours"],
        "reference_s": medians["reference"],
        "ours_min_s": minima["ours"],
        "reference_min_s": minima["reference"],
        "ours_tokens_per_s": work / medians["ours"],
        "reference_tokens_per_s": work / medians["reference"],
        "ours_best_tokens_per_s": work / minima["ours"],
        "reference_best_tokens_per_s": work / minima["reference"],
        "speedup": medians["reference"] / medians["ours"],
        "speedup_best": minima["reference"] / minima["ours"],
        "ours_compile_s": first_ours - minima["ours"],
    }


def bench_decode(args, torch_model, model) -> dict:
    import torch

    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, args.vocab, size=(args.batch, args.prompt_len)).astype(np.int32)
    mask = np.ones_like(prompts, bool)
    config = SamplingConfig(
        max_new_tokens=args.new_tokens, temperature=0.0, prompt_length_buckets=(args.prompt_len,)
    )
    key = jax.random.key(0)
    prompts_t = torch.tensor(prompts, dtype=torch.long)
    mask_t = torch.ones_like(prompts_t)

    def ours():
        return jax.block_until_ready(generate(model, prompts, mask, key, config))

    def reference():
        with torch.no_grad():
            return torch_model.generate(
                prompts_t, attention_mask=mask_t, do_sample=False, use_cache=True,
                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0,
            )  # fmt: skip

    first_ours = timed(ours)
    first_reference = timed(reference)
    medians, minima = time_alternating({"ours": ours, "reference": reference}, args.repeats)
    ours_tokens = np.asarray(ours().tokens)
    reference_tokens = reference()[:, args.prompt_len :].numpy()
    return {
        "shape": f"B={args.batch}, prompt={args.prompt_len}, new={args.new_tokens}",
        **throughput(args.batch * args.new_tokens, first_ours, medians, minima),
        "ours_first_call_s": first_ours,
        "reference_first_call_s": first_reference,
        "greedy_token_agreement": float(np.mean(ours_tokens == reference_tokens)),
    }


def bench_logprob_train(args, torch_model, model) -> dict:
    import torch

    seq_len = args.prompt_len + args.new_tokens
    rng = np.random.default_rng(args.seed + 1)
    ids = rng.integers(0, args.vocab, size=(args.batch, seq_len)).astype(np.int32)
    ids_j, mask_j = jnp.asarray(ids), jnp.ones(ids.shape, bool)
    ids_t = torch.tensor(ids, dtype=torch.long)

    @nnx.jit
    def ours_step(m, ids_BxT, mask_BxT):
        def loss(m):
            return -jnp.mean(sequence_log_probs(m, ids_BxT, mask_BxT, chunk_size=args.chunk_size))

        return nnx.value_and_grad(loss)(m)

    def ours():
        return jax.block_until_ready(ours_step(model, ids_j, mask_j))

    def reference():
        torch_model.zero_grad(set_to_none=True)
        logits = torch_model(ids_t).logits[:, :-1].float()
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, ids_t[:, 1:, None])[..., 0]
        loss = -log_probs.mean()
        loss.backward()
        return loss.detach()

    first_ours = timed(ours)
    timed(reference)
    medians, minima = time_alternating({"ours": ours, "reference": reference}, args.repeats)
    loss_ours = float(ours()[0])
    loss_reference = float(reference())
    return {
        "shape": f"B={args.batch}, T={seq_len}",
        **throughput(args.batch * (seq_len - 1), first_ours, medians, minima),
        "loss_ours": loss_ours,
        "loss_reference": loss_reference,
    }


def _same_weights(model, **changes):
    """Our model's weights under a changed config (layer types, decode blocks)."""
    import dataclasses

    other = nnx.eval_shape(lambda: CausalLM(dataclasses.replace(model.config, **changes), rngs=nnx.Rngs(0)))
    return nnx.merge(nnx.graphdef(other), nnx.state(model))


def _time_long_decodes(args, models: dict, seed_offset: int) -> tuple[dict, dict, dict]:
    """Greedy decode of `--long-new-tokens` per row with each model, alternating within rounds:
    (median seconds, minimum seconds, tokens) per name."""
    rng = np.random.default_rng(args.seed + seed_offset)
    prompts = rng.integers(0, args.vocab, size=(args.batch, args.prompt_len)).astype(np.int32)
    config = SamplingConfig(max_new_tokens=args.long_new_tokens, temperature=0.0,
                            prompt_length_buckets=(args.prompt_len,))
    key = jax.random.key(0)
    fns = {name: (lambda m=m: jax.block_until_ready(generate(m, prompts, None, key, config)))
           for name, m in models.items()}
    tokens = {name: np.asarray(fn().tokens) for name, fn in fns.items()}  # also the warm-up
    medians, minima = time_alternating(fns, max(3, args.repeats // 2))
    return medians, minima, tokens


def bench_long_decode(args, model) -> dict:
    """Block-wise vs dense decode attention at a long response length (same weights)."""
    medians, minima, tokens = _time_long_decodes(
        args, {"blocked": model, "dense": _same_weights(model, decode_block_size=None)}, seed_offset=2)
    work = args.batch * args.long_new_tokens
    return {"shape": f"B={args.batch}, prompt={args.prompt_len}, new={args.long_new_tokens}, "
                     f"cache {args.prompt_len + args.long_new_tokens - 1} slots, block {model.config.decode_block_size}",
            "blocked_s": medians["blocked"], "dense_s": medians["dense"],
            "blocked_tokens_per_s": work / medians["blocked"], "dense_tokens_per_s": work / medians["dense"],
            "speedup": medians["dense"] / medians["blocked"], "speedup_best": minima["dense"] / minima["blocked"],
            "greedy_tokens_identical": bool(np.array_equal(tokens["blocked"], tokens["dense"]))}


def bench_sliding_decode(args, model) -> dict:
    """(e) Long decode with every layer a sliding-window layer (window W): the position mask with
    block skipping (a step reads only the cache blocks inside the window; the default) vs the
    same mask over the whole cache (decode_block_size=None), and full attention for reference."""
    sliding = dict(layer_types=("sliding_attention",) * model.config.num_hidden_layers, sliding_window=args.window)
    models = {"sliding_blocks": _same_weights(model, **sliding),
              "sliding_dense_mask": _same_weights(model, **sliding, decode_block_size=None),
              "full_blocks": model}
    medians, minima, tokens = _time_long_decodes(args, models, seed_offset=3)
    work = args.batch * args.long_new_tokens
    return {"shape": f"B={args.batch}, prompt={args.prompt_len}, new={args.long_new_tokens}, window {args.window}, "
                     f"block {model.config.decode_block_size}",
            **{f"{name}_tokens_per_s": work / medians[name] for name in models},
            "blocks_vs_dense_mask": medians["sliding_dense_mask"] / medians["sliding_blocks"],
            "blocks_vs_dense_mask_best": minima["sliding_dense_mask"] / minima["sliding_blocks"],
            "sliding_vs_full": medians["full_blocks"] / medians["sliding_blocks"],
            # Greedy ties can flip between the two sliding paths over long random-weight decodes
            # (online vs dense softmax rounding); see docs/performance.md for the exactness check.
            "greedy_tokens_identical": bool(np.array_equal(tokens["sliding_blocks"], tokens["sliding_dense_mask"]))}


def bench_head_memory(args) -> dict:
    """Compiled XLA memory of the LM-head log-probs, chunked vs full logits (compile only)."""
    b, t, d, v = 1, args.head_seq, args.head_dim, args.head_vocab
    shapes = (
        jax.ShapeDtypeStruct((b, t, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
    )

    def chunked(h, w, y):
        return jnp.sum(chunked_token_log_probs(h, w, y, chunk_size=args.chunk_size))

    def full(h, w, y):
        return jnp.sum(full_logits_token_log_probs(h, w, y))

    chunk = args.chunk_size or max(1, 512 // b)
    out = {"shape": f"B={b}, T={t}, D={d}, V={v}, chunk={chunk} steps",
           "full_logits_tensor_bytes": b * t * v * 4}  # fmt: skip
    for label, transform in (("forward", lambda f: f), ("forward_backward", lambda f: jax.grad(f, argnums=(0, 1)))):
        for name, fn in (("chunked", chunked), ("full", full)):
            analysis = jax.jit(transform(fn)).lower(*shapes).compile().memory_analysis()
            out[f"{name}_{label}_temp_bytes"] = int(analysis.temp_size_in_bytes)
            out[f"{name}_{label}_output_bytes"] = int(analysis.output_size_in_bytes)
    return out


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.1f} MiB"


def report(env, model_desc, decode, train, memory) -> str:
    lines = [
        f"# Model benchmark — {env['backend']} ({env['cpu_count']} CPU threads, torch threads "
        f"{env['torch_threads']}), jax {env['jax']}, torch {env['torch']}, transformers {env['transformers']}; "
        f"load average {env['load_average_at_start']:.2f} → {env['load_average_at_end']:.2f}",
        f"tiny Qwen2: {model_desc}",
        "",
        "| measurement (median; best in brackets) | ours (JAX) | PyTorch / transformers | speed-up |",
        "|---|---|---|---|",
    ]
    for label, r in ((f"(a) greedy decode {decode['shape']}: new tokens/s", decode),
                     (f"(b) log-prob fwd+bwd {train['shape']}: tokens/s", train)):  # fmt: skip
        lines.append(
            f"| {label} | {r['ours_tokens_per_s']:.0f} [{r['ours_best_tokens_per_s']:.0f}] "
            f"({r['ours_s']:.3f} s) | {r['reference_tokens_per_s']:.0f} [{r['reference_best_tokens_per_s']:.0f}] "
            f"({r['reference_s']:.3f} s) | {r['speedup']:.2f}× [{r['speedup_best']:.2f}×] |"
        )
    lines += [
        "",
        f"compile (excluded above): sampler {decode['ours_compile_s']:.2f} s, log-prob step "
        f"{train['ours_compile_s']:.2f} s; transformers first generate call {decode['reference_first_call_s']:.2f} s",
        f"greedy tokens identical to transformers: {100 * decode['greedy_token_agreement']:.1f}% ; "
        f"loss ours {train['loss_ours']:.6f} vs torch {train['loss_reference']:.6f}",
        "",
        f"(c) LM-head log-probs memory, {memory['shape']} (one f32 logits tensor = "
        f"{gib(memory['full_logits_tensor_bytes'])}):",
        "| pass | chunked temp | full-logits temp | ratio |",
        "|---|---|---|---|",
    ]
    for label in ("forward", "forward_backward"):
        c, f = memory[f"chunked_{label}_temp_bytes"], memory[f"full_{label}_temp_bytes"]
        lines.append(f"| {label.replace('_', ' + ')} | {gib(c)} | {gib(f)} | {f / c:.0f}× less |")
    lines.append(
        f"(outputs of forward+backward, both: d hidden + f32 d W = {gib(memory['chunked_forward_backward_output_bytes'])})"
    )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--long-new-tokens", type=int, default=1024, help="new tokens for (d) and (e); 0 skips both")
    parser.add_argument("--window", type=int, default=256, help="sliding window W for (e); 0 skips (e)")
    parser.add_argument("--only", choices=("sliding",), default=None, help="run only this section")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="time steps per LM-head log-prob chunk (default: ~512 tokens per chunk)")
    parser.add_argument("--head-seq", type=int, default=8192, help="T for the memory comparison (c)")
    parser.add_argument("--head-dim", type=int, default=896, help="D for (c): Qwen2.5-0.5B")
    parser.add_argument("--head-vocab", type=int, default=151_936, help="V for (c): Qwen2.5 embedding rows")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write all figures as JSON here")
    args = parser.parse_args(argv)

    import torch
    import transformers

    env = {
        "backend": jax.default_backend(), "jax": jax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "load_average_at_start": os.getloadavg()[0],
    }  # fmt: skip
    if env["load_average_at_start"] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: 1-minute load average {env['load_average_at_start']:.2f} on {os.cpu_count()} CPUs; "
              "other processes will distort the timings (PyTorch's OpenMP threads suffer most)", flush=True)
    with tempfile.TemporaryDirectory() as path:
        torch_model, model = build_models(args, path)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    model_desc = (
        f"{args.layers} layers, d {args.hidden}, ffn {args.intermediate}, heads {args.heads}/{args.kv_heads} kv, "
        f"vocab {args.vocab}, {params / 1e6:.2f} M params, float32"
    )
    if args.only == "sliding":
        result = bench_sliding_decode(args, model)
        print(json.dumps(result, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"env": env, "args": vars(args), "model": model_desc, "sliding_decode": result}, f, indent=2)
        return
    print(f"model: {model_desc}\nrunning (a) decode ...", flush=True)
    decode = bench_decode(args, torch_model, model)
    print("running (b) log-prob forward+backward ...", flush=True)
    train = bench_logprob_train(args, torch_model, model)
    long_decode = sliding_decode = None
    if args.long_new_tokens:
        print("running (d) long decode, block-wise vs dense attention ...", flush=True)
        long_decode = bench_long_decode(args, model)
        if args.window:
            print("running (e) long decode, sliding-window layers ...", flush=True)
            sliding_decode = bench_sliding_decode(args, model)
    print("running (c) LM-head memory (compile only) ...", flush=True)
    memory = bench_head_memory(args)
    env["load_average_at_end"] = os.getloadavg()[0]
    print(report(env, model_desc, decode, train, memory))
    if long_decode:
        print(f"\n(d) long greedy decode {long_decode['shape']}: block-wise "
              f"{long_decode['blocked_tokens_per_s']:.0f} new tokens/s vs dense {long_decode['dense_tokens_per_s']:.0f} "
              f"→ {long_decode['speedup']:.2f}× [{long_decode['speedup_best']:.2f}×]; tokens identical: "
              f"{long_decode['greedy_tokens_identical']}")
    if sliding_decode:
        print(f"(e) sliding-window decode {sliding_decode['shape']}: {json.dumps(sliding_decode)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "args": vars(args), "model": model_desc, "params": params,
                       "decode": decode, "logprob_train": train, "long_decode": long_decode,
                       "sliding_decode": sliding_decode,
                       "head_memory": memory}, f, indent=2)  # fmt: skip
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
