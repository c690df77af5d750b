"""Ahead-of-time compile time of the RL update, by model depth, on this machine's CPU — no weights.

    python experiments/bench_compile.py --out runs/bench_compile.json                 # this tree
    python experiments/bench_compile.py --baseline 1637682 --out runs/bench_compile.json   # + an older commit

Each case lowers and compiles `rl_update` (old-log-prob pass, forward + backward, AdamW) of an
abstract bfloat16 model — `jit(...).lower(abstract state, abstract batch).compile()` — in a fresh
process with no compilation cache, and reports the seconds of `lower` and of `compile`. The layout
is the GPU run's: 2 micro-batches × 8 rows × 2,048 tokens (256 prompt + 1,792 response).

Cases: the Qwen2.5-0.5B and 7B shapes with and without remat, and the 0.5B width at 12 / 24 / 48
layers (flat in depth when the layers are one scan). ``--baseline REF`` also compiles every case on
the code of commit REF (a temporary ``git worktree``), in the same run, so before / after are measured
side by side on the same machine state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
QWEN_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4)
LAYOUT = dict(micro_batches=2, rows=8, prompt=256, response=1792, logprob_chunk=256, attention_chunk=512)

# name → (architecture, layers, remat policy)
CASES = {
    "0.5b/none": (QWEN_05B, 24, "none"),
    "0.5b/full": (QWEN_05B, 24, "full"),
    "0.5b-12L/none": (QWEN_05B, 12, "none"),
    "0.5b-48L/none": (QWEN_05B, 48, "none"),
    "0.5b-12L/full": (QWEN_05B, 12, "full"),
    "0.5b-48L/full": (QWEN_05B, 48, "full"),
    "7b/full": (QWEN_7B, 28, "full"),
    "7b/none": (QWEN_7B, 28, "none"),
}
TINY_CASES = {"tiny-2L/none": (dict(QWEN_05B, vocab_size=512, hidden_size=64, intermediate_size=128,
                                    num_attention_heads=4, num_key_value_heads=2), 2, "none")}
TINY_LAYOUT = dict(micro_batches=2, rows=2, prompt=8, response=24, logprob_chunk=16, attention_chunk=16)


def compile_case(name: str, tiny: bool) -> dict:
    """Lower and compile one case with the `fipo_jax` on ``sys.path`` (this tree or a baseline's)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import fipo_jax
    from fipo_jax.train import update as update_lib
    from fipo_jax.core.losses import PolicyLossConfig
    from fipo_jax.models import CausalLM, ModelConfig

    arch, layers, policy = (TINY_CASES if tiny else CASES)[name]
    layout = TINY_LAYOUT if tiny else LAYOUT
    common = dict(arch, num_hidden_layers=layers, dtype="bfloat16", compute_dtype="bfloat16",
                  attention_chunk_size=layout["attention_chunk"])
    try:
        model_config = ModelConfig(**common, remat=policy)
    except (TypeError, ValueError):  # code from before the remat policies: a bool
        model_config = ModelConfig(**common, remat=policy != "none")
    model = nnx.eval_shape(lambda: CausalLM(model_config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = update_lib.make_optimizer(update_lib.warmup_schedule(1e-6, 0, 1), 0.9, 0.999, 1e-8, 0.0, 1.0)
    state = update_lib.RLState(params=params, opt_state=jax.eval_shape(optimizer.tx.init, params),
                            step=jax.ShapeDtypeStruct((), jnp.int32), key=jax.eval_shape(lambda: jax.random.key(0)))
    k, r, p, n = layout["micro_batches"], layout["rows"], layout["prompt"], layout["response"]
    s = jax.ShapeDtypeStruct
    try:
        from fipo_jax.core.packing import abstract_batch  # one batch type (issue 25 on)
        batch = abstract_batch(1, k, r, p + n, n)
    except ImportError:  # a --baseline tree from before: the padded RLBatch
        batch = update_lib.RLBatch(input_ids=s((1, k, r, p + n), jnp.int32), attention_mask=s((1, k, r, p + n), bool),
                                response_mask=s((1, k, r, n), bool), scores=s((1, k, r), jnp.float32),
                                sampler_log_probs=s((1, k, r, n), jnp.float32))
    update = update_lib.jit_rl_update(graphdef, rest, optimizer, update_lib.UpdateConfig(
        loss=PolicyLossConfig(), group_size=r, logprob_chunk_size=layout["logprob_chunk"]))
    start = time.perf_counter()
    lowered = update.lower(state, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return {"case": name, "layers": layers, "remat": policy, "lower_s": lower_s, "compile_s": compile_s,
            "temp_bytes": int(getattr(memory, "temp_size_in_bytes", 0)), "fipo_jax": fipo_jax.__file__,
            "jax": jax.__version__}


def run_case(tree: str, name: str, tiny: bool, timeout: float) -> dict:
    """One case in a fresh process importing `fipo_jax` from ``tree``; no persistent XLA cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(PYTHONPATH=tree, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    command = [sys.executable, os.path.abspath(__file__), "--worker", name] + (["--tiny"] if tiny else [])
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tree, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": name, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode:
        return {"case": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worktree(ref: str) -> str:
    """A temporary checkout of commit ``ref`` of this repository (removed at exit by the caller)."""
    folder = tempfile.mkdtemp(prefix="fipo_baseline_")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", folder, ref], check=True,
                   capture_output=True, text=True)
    return folder


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=None, help="a git commit to compile the same cases on, side by side")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per case")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(compile_case(args.worker, args.tiny)))
        return {}
    names = args.cases.split(",") if args.cases else list(TINY_CASES if args.tiny else CASES)
    trees = {"this tree": ROOT}
    if args.baseline:
        trees[f"baseline {args.baseline}"] = worktree(args.baseline)
    report = {"layout": TINY_LAYOUT if args.tiny else LAYOUT, "machine": f"{os.cpu_count()} CPU cores", "runs": {}}
    try:
        for name in names:  # alternate trees case by case, so machine drift hits both alike
            for label, tree in trees.items():
                result = run_case(tree, name, args.tiny, args.timeout)
                report["runs"].setdefault(label, []).append(result)
                shown = result.get("error") or (
                    f"lower {result['lower_s']:.1f} s, compile {result['compile_s']:.1f} s, "
                    f"temporaries {result['temp_bytes'] / 2**30:.2f} GiB")
                print(f"{name:<16} {label:<20} {shown}", flush=True)
                if args.out:
                    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                    with open(args.out, "w") as f:
                        json.dump(report, f, indent=2)
    finally:
        for label, tree in trees.items():
            if tree != ROOT:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)
    return report


if __name__ == "__main__":
    main()
