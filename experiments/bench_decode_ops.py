"""Device ops per decode step of both samplers, from their compiled HLO, and CPU ms per decode step.

    python experiments/bench_decode_ops.py --out runs/bench_decode_ops.json      # ~1–2 min on 2 cores
    python experiments/bench_decode_ops.py --skip-timing                         # op counts only

(a) op counts: `static_sampler.generate`'s jitted program and `engine.advance`'s are compiled
    (`jax.jit(...).lower(...).compile().as_text()`) for a Qwen2-shaped model (bench_engine's 4L d256
    by default). In each, the decode loop is the entry-level `while` whose body holds the most work;
    its body is counted by opcode twice: `body_*` the body computation's own instructions, and
    `per_step_*` what one decode step runs — nested loops with a known trip count (the layer scan)
    multiplied by it, other loops (the decode attention's block loop, data-dependent) counted once
    per trip, `call`s inlined, conditionals by their costlier branch, a fusion one kernel.
    `kernels` leaves out what launches nothing (parameter, tuple, get-tuple-element, constant,
    bitcast).
(b) timing: every request the same budget (no long tail, EOS off), τ = 1, R rows in the static
    sampler vs R requests in R engine slots: ms per decode step = call seconds / budget, static and
    engine alternating, medians of `--repeats` warm runs; `engine_over_static` = static ms / engine ms
    (≥ 1: the engine is at least as fast).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_engine import model_of  # noqa: E402  the same model shapes
from fipo_jax.generation import engine as engine_lib  # noqa: E402
from fipo_jax.generation import sampling, static_sampler  # noqa: E402

# Opcodes that launch no kernel.
FREE_OPCODES = frozenset({"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all"})
# Opcodes reported one by one (the rest are summed under "other").
REPORTED_OPCODES = ("fusion", "custom-call", "dot", "convolution", "scatter", "gather", "dynamic-update-slice",
                    "dynamic-slice", "sort", "while", "conditional", "call", "copy", "reduce", "transpose",
                    "broadcast", "select", "concatenate", "pad", "slice", "iota", "compare", "add", "convert")

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")
_OPCODE = re.compile(r"(?<![\w\[\{:.\-])([a-z][a-z0-9\-_]*)\(")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def parse_computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """({computation name: its instruction lines}, the entry computation's name) of HLO text."""
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        stripped = line.strip()
        header = _HEADER.match(stripped) if current is None else None
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif stripped == "}":
            current = None
        elif current is not None and "=" in stripped:
            computations[current].append(stripped)
    return computations, entry


def instruction_opcode(line: str) -> str | None:
    """The opcode of one HLO instruction line (``%x = f32[2]{0} add(%a, %b)`` → ``add``)."""
    _, _, rhs = line.partition("=")
    match = _OPCODE.search(rhs)
    return match.group(1) if match else None


def called(line: str, role: str) -> list[str]:
    """Computations an instruction names for `role` (body, condition, to_apply, calls, branch_computations,
    true_computation, false_computation)."""
    match = re.search(rf"\b{role}=(\{{[^}}]*\}}|%?[\w.\-]+)", line)
    if not match:
        return []
    return [name.strip().lstrip("%") for name in match.group(1).strip("{}").split(",") if name.strip()]


def trip_count(line: str) -> int | None:
    """A `while` instruction's known trip count (XLA's backend_config), else None."""
    match = _TRIP.search(line)
    return int(match.group(1)) if match else None


def own_ops(computations: dict[str, list[str]], name: str) -> Counter:
    """Opcode counts of one computation's own instructions (nothing it calls)."""
    return Counter(op for op in map(instruction_opcode, computations[name]) if op)


def step_ops(computations: dict[str, list[str]], name: str) -> Counter:
    """Opcodes one run of computation `name` executes: nested whiles × their known trip count (once
    when unknown), calls inlined, a conditional's costlier branch; fusions count as one op."""
    total = Counter()
    for line in computations[name]:
        op = instruction_opcode(line)
        if op is None:
            continue
        total[op] += 1
        if op == "while":
            inner = step_ops(computations, called(line, "body")[0])
            total.update({k: v * (trip_count(line) or 1) for k, v in inner.items()})
        elif op == "call":
            total.update(step_ops(computations, called(line, "to_apply")[0]))
        elif op == "conditional":
            branches = called(line, "branch_computations") or (called(line, "true_computation")
                                                                + called(line, "false_computation"))
            total.update(max((step_ops(computations, b) for b in branches), key=lambda c: sum(c.values()),
                             default=Counter()))
    return total


def decode_loop_body(computations: dict[str, list[str]], entry: str) -> str:
    """The body of the entry's `while` that runs the most ops per iteration (the decode loop)."""
    bodies = [called(line, "body")[0] for line in computations[entry] if instruction_opcode(line) == "while"]
    if not bodies:
        raise ValueError("the program has no entry-level while loop")
    return max(bodies, key=lambda body: sum(step_ops(computations, body).values()))


def summarise(counts: Counter) -> dict:
    """{instructions, kernels, by_opcode: the reported opcodes (+ other)} of an opcode count."""
    kernels = {op: n for op, n in counts.items() if op not in FREE_OPCODES}
    by_opcode = {op: counts.get(op, 0) for op in REPORTED_OPCODES}
    by_opcode["other"] = sum(n for op, n in kernels.items() if op not in REPORTED_OPCODES)
    return {"instructions": sum(counts.values()), "kernels": sum(kernels.values()), "by_opcode": by_opcode}


def loop_op_counts(hlo_text: str) -> dict:
    """The decode loop's op counts in compiled HLO text: its body's own and one step's (`step_ops`)."""
    computations, entry = parse_computations(hlo_text)
    body = decode_loop_body(computations, entry)
    return {"body": summarise(own_ops(computations, body)), "per_step": summarise(step_ops(computations, body)),
            "program_instructions": sum(len(lines) for lines in computations.values())}


# ---------------------------------------------------------------------------------------------
# The two samplers' programs
# ---------------------------------------------------------------------------------------------


def sampling_config(new_tokens: int, temperature: float) -> sampling.SamplingConfig:
    """τ-sampling, top-p = 1, top-k = 0, EOS off: every row decodes its whole budget."""
    return sampling.SamplingConfig(max_new_tokens=new_tokens, temperature=temperature, eos_token_ids=(),
                                   prompt_length_buckets=None)


def static_hlo(model, rows: int, prompt: int, config: sampling.SamplingConfig) -> str:
    """Compiled HLO text of `static_sampler.generate`'s jitted program."""
    graphdef, state = nnx.split(model)
    ids = np.ones((rows, prompt), np.int32)
    return static_sampler._generate_jit.lower(graphdef, state, ids, np.ones_like(ids, bool), jax.random.key(0), config,
                                        None).compile().as_text()


def engine_hlo(model, slots: int, prompt: int, config: sampling.SamplingConfig, steps_per_sync: int) -> str:
    """Compiled HLO text of `engine.advance`'s jitted program (insert + ≤ K decode steps)."""
    graphdef, state = nnx.split(model)
    slot_state = engine_lib._init_slots_jit(model.config, slots, prompt + config.max_new_tokens - 1, (1, 1), None)
    prefixes = engine_lib._init_prefixes_jit(model.config, engine_lib.EngineConfig().prefill_batch, prompt, None)
    ints = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    refill = engine_lib.Refill(ints(slots), ints(slots), ints(slots), ints(slots, 1, 1), np.zeros((slots, 1, 1), bool))
    return engine_lib._advance_jit.lower(graphdef, state, slot_state, prefixes, refill, jax.random.key(0),
                                         np.int32(0), config, steps_per_sync, None).compile().as_text()


def op_counts(model, args) -> dict:
    """Both samplers' decode-loop op counts (static and engine)."""
    config = sampling_config(args.new_tokens, args.temperature)
    return {"static": loop_op_counts(static_hlo(model, args.rows, args.prompt, config)),
            "engine": loop_op_counts(engine_hlo(model, args.rows, args.prompt, config, args.sync))}


# ---------------------------------------------------------------------------------------------
# CPU timing at equal budgets
# ---------------------------------------------------------------------------------------------


def sampler_runs(model, args) -> dict:
    """{"static", "engine"}: a call each that samples `--new-tokens` for `--rows` random prompts."""
    ids = np.random.default_rng(1).integers(1, model.config.vocab_size, (args.rows, args.prompt)).astype(np.int32)
    config = sampling_config(args.new_tokens, args.temperature)
    engine_config = engine_lib.EngineConfig(num_slots=args.rows, steps_per_sync=args.sync)
    key = jax.random.key(0)
    return {"static": lambda: jax.block_until_ready(static_sampler.generate(model, ids, None, key, config)),
            "engine": lambda: engine_lib.generate(model, ids, None, key, config, engine_config)}


def time_alternating(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each run over `repeats` rounds, the runs alternating within a round (after a warm-up)."""
    outputs = {name: run() for name, run in runs.items()}  # compile
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name] = run()
            seconds[name].append(time.perf_counter() - start)
    same = bool(np.array_equal(np.asarray(outputs["static"].tokens), np.asarray(outputs["engine"].tokens)))
    return {"seconds": seconds, "tokens_equal": same}


def timing(model, args) -> dict:
    """ms per decode step of both samplers at equal budgets, and engine_over_static (static ms / engine ms)."""
    timed = time_alternating(sampler_runs(model, args), args.repeats)
    ms = {name: 1e3 * statistics.median(s) / args.new_tokens for name, s in timed["seconds"].items()}
    best = {name: 1e3 * min(s) / args.new_tokens for name, s in timed["seconds"].items()}
    return {"ms_per_step": ms, "best_ms_per_step": best, "engine_over_static": ms["static"] / ms["engine"],
            "best_engine_over_static": best["static"] / best["engine"], "tokens_equal": timed["tokens_equal"],
            "rows": args.rows, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "round_ms_per_step": {name: [1e3 * x / args.new_tokens for x in s] for name, s in timed["seconds"].items()}}


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--rows", type=int, default=16, help="static rows = engine slots = requests")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256,
                        help="every request's budget (P + N − 1 > 256 slots: the block decode attention runs)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--sync", type=int, default=16, help="engine decode steps per device call")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-timing", action="store_true")
    return parser.parse_args(argv)


def report_line(name: str, counts: dict) -> str:
    step = counts["per_step"]
    return (f"{name}: decode loop body {counts['body']['instructions']} instructions "
            f"({counts['body']['kernels']} kernels); per step {step['instructions']} instructions, "
            f"{step['kernels']} kernels: " + ", ".join(f"{op} {n}" for op, n in step["by_opcode"].items() if n))


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = model_of(args.layers, args.hidden, args.intermediate, args.vocab)
    result = {"jax": jax.__version__, "platform": jax.devices()[0].platform, "cores": os.cpu_count(),
              "processor": platform.processor() or platform.machine(), "load_before": os.getloadavg()[0],
              "model": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                        "vocab": args.vocab, "heads": 4, "kv_heads": 2},
              "ops": op_counts(model, args)}
    for name, counts in result["ops"].items():
        print(report_line(name, counts), flush=True)
    if not args.skip_timing:
        result["timing"] = timing(model, args)
        t = result["timing"]
        print(f"ms/step (median of {args.repeats}): static {t['ms_per_step']['static']:.3f}, engine "
              f"{t['ms_per_step']['engine']:.3f}; engine / static speed {t['engine_over_static']:.3f}× "
              f"(best rounds {t['best_engine_over_static']:.3f}×); tokens equal: {t['tokens_equal']}", flush=True)
    result["load_after"] = os.getloadavg()[0]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
