"""Where an RL update's work goes: XLA's own FLOP and byte counts per part, against model FLOPs.

    python experiments/bench_breakdown.py --out runs/breakdown.json        # 0.5B and 7B shapes, CPU ok
    python experiments/bench_breakdown.py --tiny                           # a seconds-long run (tests)

Each part is compiled ahead of time from abstract bfloat16 weights (no weights are made, so the 7B
shape runs on a laptop) and its matmul FLOPs counted from the program itself (`program_matmul_flops`: every
`dot_general` of the jaxpr, a scan's body times its length, remat's recomputed forward included) —
XLA's `cost_analysis` is reported beside it but counts a loop body once whatever its trip count, so
it under-counts the layer scan — for one micro-batch of ``rows`` × ``prompt + response`` tokens:

- ``old_log_probs``: the old-policy pass (forward through the layers and the chunked LM head);
- ``layers_fwd_bwd``: the decoder layers' forward + backward alone (gradient of Σ hidden states);
- ``head_fwd_bwd``: the chunked log-prob head alone (`chunked_token_log_probs`, forward + backward);
- ``model_fwd_bwd``: both together (gradient of Σ log p), what each micro-batch's loss costs;
- ``optimizer``: the AdamW step on the parameters (no model FLOPs: bytes matter);
- ``rl_update``: the whole jitted update over ``micro_batches`` micro-batches.

Model FLOPs: forward = 2 × matmul parameters + 2·H·K·T causal attention per token
(`bench_accelerator.forward_flops_per_token`); backward = 2 × forward. ``program_over_model`` > 1 is
recomputed work (remat, the log-prob head's per-chunk recompute) and attention computed over masked
keys (the model counts causal attention as T/2 keys per query; query chunks compute the full
square). Matmuls only: elementwise work and float32 upcasts are not in either count.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax._src import core as jax_core  # jaxprs_in_params: the sub-programs of an equation

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_accelerator import forward_flops_per_token  # noqa: E402
from bench_compile import QWEN_05B, QWEN_7B  # noqa: E402

from fipo_jax.train import update as update_lib  # noqa: E402
from fipo_jax.generation.logprobs import chunked_token_log_probs  # noqa: E402
from fipo_jax.core.losses import PolicyLossConfig  # noqa: E402
from fipo_jax.models import CausalLM, ModelConfig  # noqa: E402
from fipo_jax.core.packing import abstract_batch  # noqa: E402

LAYOUT = dict(micro_batches=2, rows=8, prompt=256, response=1792, logprob_chunk=256, attention_chunk=512)
SHAPES = {"0.5b/none": (QWEN_05B, "none"), "0.5b/full": (QWEN_05B, "full"), "7b/full": (QWEN_7B, "full"),
          "7b/dots": (QWEN_7B, "dots")}
TINY_LAYOUT = dict(micro_batches=2, rows=2, prompt=8, response=24, logprob_chunk=16, attention_chunk=16)
TINY_SHAPES = {"tiny/none": (dict(QWEN_05B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2), "none")}


def cost(fn, *args, jitted=None) -> dict:
    """The matmul FLOPs ``fn(*args)`` executes (`program_matmul_flops`), XLA's `cost_analysis` of
    the compiled program (``jitted``, default ``jax.jit(fn)``) and its compile time (abstract args)."""
    flops = program_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)
    start = time.perf_counter()
    compiled = (jitted or jax.jit(fn)).lower(*args).compile()
    return dict(program_matmul_flops=flops, **xla_counts(compiled), compile_s=time.perf_counter() - start)


def xla_counts(compiled) -> dict:
    """XLA's own FLOPs and bytes: its cost analysis counts a loop body once, whatever the trip
    count (the layer scan, the head's chunks), so these under-count scanned programs."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return {"xla_flops_loop_bodies_once": float(analysis.get("flops", 0.0)),
            "xla_bytes_loop_bodies_once": float(analysis.get("bytes accessed", 0.0))}


def program_matmul_flops(jaxpr) -> float:
    """Σ 2·batch·M·N·K over the program's `dot_general`s, a scan's body times its length, the
    costlier branch of a `cond`, remat's recomputed forward included (it is in the jaxpr)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract_l, _), (batch_l, _) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            contract = np.prod([lhs[i] for i in contract_l]) if contract_l else 1
            batch = np.prod([lhs[i] for i in batch_l]) if batch_l else 1
            total += 2.0 * np.prod(lhs) * np.prod(rhs) / (contract * batch)
            continue
        subs = [program_matmul_flops(getattr(j, "jaxpr", j)) for j in jax_core.jaxprs_in_params(eqn.params)]
        if eqn.primitive.name == "cond":
            total += max(subs, default=0.0)
        else:
            total += eqn.params.get("length", 1) * sum(subs) if eqn.primitive.name == "scan" else sum(subs)
    return total


def abstract_model(fields: dict, remat: str, layout: dict):
    config = ModelConfig(**fields, dtype="bfloat16", compute_dtype="bfloat16", remat=remat,
                         attention_chunk_size=layout["attention_chunk"])
    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return config, graphdef, params, rest


def part_functions(graphdef, rest, config: ModelConfig, chunk: int) -> dict:
    """name → (function of (params, ids, segments), model-FLOP multiple of one forward)."""

    def log_probs(params, ids, seg):
        return update_lib.packed_log_probs(graphdef, params, rest, ids, seg, chunk)[0]

    def hidden(params, ids, seg):
        return nnx.merge(graphdef, params, rest).hidden_states(ids, None, seg >= 0, seg)

    return {
        "old_log_probs": (lambda p, i, s: jax.lax.stop_gradient(log_probs(p, i, s)), "forward"),
        "layers_fwd_bwd": (jax.grad(lambda p, i, s: jnp.sum(hidden(p, i, s).astype(jnp.float32))), "layers"),
        "model_fwd_bwd": (jax.grad(lambda p, i, s: jnp.sum(log_probs(p, i, s))), "model"),
    }


def shape_breakdown(name: str, fields: dict, remat: str, layout: dict) -> dict:
    config, graphdef, params, rest = abstract_model(fields, remat, layout)
    rows, length = layout["rows"], layout["prompt"] + layout["response"]
    tokens = rows * length
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    seg = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    forward = forward_flops_per_token(config, length) * tokens
    head = 2 * config.hidden_size * config.vocab_size * tokens
    model_flops = {"forward": forward, "layers": 3 * (forward - head), "model": 3 * forward}
    out = {"shape": name, "remat": remat, "tokens_per_micro_batch": tokens, "parts": {}}
    for part, (fn, kind) in part_functions(graphdef, rest, config, layout["logprob_chunk"]).items():
        out["parts"][part] = dict(cost(fn, params, ids, seg), model_flops=model_flops[kind])
    hidden = jax.ShapeDtypeStruct((rows, length, config.hidden_size), jnp.bfloat16)
    unembed = jax.ShapeDtypeStruct((config.hidden_size, config.vocab_size), jnp.bfloat16)
    head_fn = jax.grad(lambda h, w, y: jnp.sum(chunked_token_log_probs(h, w, y, chunk_size=layout["logprob_chunk"])),
                       argnums=(0, 1))
    out["parts"]["head_fwd_bwd"] = dict(cost(head_fn, hidden, unembed, ids), model_flops=3 * head)
    optimizer = update_lib.make_optimizer(update_lib.warmup_schedule(1e-6, 0, 1), 0.9, 0.999, 1e-8, 0.0, 1.0)
    opt_state = jax.eval_shape(optimizer.tx.init, params)
    out["parts"]["optimizer"] = dict(cost(lambda g, s, p: optimizer.tx.update(g, s, p), params, opt_state, params),
                                     model_flops=0.0)
    out["parts"]["rl_update"] = dict(update_cost(graphdef, rest, params, optimizer, opt_state, layout),
                                     model_flops=4 * forward * layout["micro_batches"])
    for part in out["parts"].values():
        part["program_over_model"] = part["program_matmul_flops"] / part["model_flops"] if part["model_flops"] else None
    return out


def update_cost(graphdef, rest, params, optimizer, opt_state, layout: dict) -> dict:
    k, r, p, n = layout["micro_batches"], layout["rows"], layout["prompt"], layout["response"]
    state = update_lib.RLState(params=params, opt_state=opt_state, step=jax.ShapeDtypeStruct((), jnp.int32),
                            key=jax.eval_shape(lambda: jax.random.key(0)))
    config = update_lib.UpdateConfig(loss=PolicyLossConfig(), group_size=r, logprob_chunk_size=layout["logprob_chunk"])
    update = functools.partial(update_lib.rl_update, graphdef=graphdef, rest=rest, optimizer=optimizer, config=config)
    return cost(update, state, abstract_batch(1, k, r, p + n, n),
                jitted=update_lib.jit_rl_update(graphdef, rest, optimizer, config))


def print_breakdown(result: dict) -> None:
    print(f"{result['shape']} (remat {result['remat']}, {result['tokens_per_micro_batch']:,} tokens per micro-batch)")
    for part, r in result["parts"].items():
        ratio = "" if r["program_over_model"] is None else f"  program / model {r['program_over_model']:.2f}"
        print(f"  {part:15s} matmul {r['program_matmul_flops'] / 1e12:9.3f} TFLOP  model {r['model_flops'] / 1e12:9.3f}"
              f" TFLOP{ratio}  (XLA, loop bodies once: {r['xla_flops_loop_bodies_once'] / 1e12:.3f} TFLOP,"
              f" {r['xla_bytes_loop_bodies_once'] / 2**30:.2f} GiB)", flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and layout (seconds; the tests)")
    parser.add_argument("--only", default=None, help="comma-separated shape names (default: all)")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    shapes, layout = (TINY_SHAPES, TINY_LAYOUT) if args.tiny else (SHAPES, LAYOUT)
    names = list(shapes) if args.only is None else args.only.split(",")
    unknown = sorted(set(names) - set(shapes))
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {list(shapes)}")
    report = {"backend": jax.default_backend(), "jax": jax.__version__, "layout": layout, "shapes": {}}
    for name in names:
        fields, remat = shapes[name]
        report["shapes"][name] = shape_breakdown(name, fields, remat, layout)
        print_breakdown(report["shapes"][name])
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1, default=lambda x: float(x) if isinstance(x, np.floating) else str(x))
    return report


if __name__ == "__main__":
    main()
