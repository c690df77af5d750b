"""A model of one RL step's time, in sequence or k-stale, on shared or split devices — for the pods
we cannot rent. Modelled, not measured: `experiments/bench_pipeline.py` checks it against CPU steps.

A step has five phases (seconds, on D devices): G generation at full occupancy (device), L its
tail (the longest responses decoding on nearly empty replicas: latency-bound, the same on any number
of devices), S scoring and packing (host), U update (device), W weight sync. On one shared mesh the
device phases cannot overlap each other; host work overlaps device work once rollouts are drawn
ahead (``rollout.max_staleness`` k ≥ 1); on split groups the rollouts of the next step, tail
included, are drawn while the update runs:

    shared,  k = 0:   T = G + L + S + U + W
    shared,  k ≥ 1:   T = max(G + L + U + W, G + L + S)
    split,   k = 0:   T = G·D/D_r + L + S + U·D/D_t + W        (D_r rollout + D_t training devices)
    split,   k ≥ 1:   T = max(G·D/D_r + L + S, U·D/D_t + W)

(G and U given for all D devices scale as D / D_r and D / D_t: throughput-bound phases, batches
large enough to fill any group.) Without a tail a split cannot beat the shared mesh (balanced, both
give G + U); what it hides is the tail. Tokens per second = tokens per step / T; `best_split`
picks D_r.

`recipe_phases` gives the phases of a recipe from first principles: decode is a roofline over the
chip's HBM bandwidth (the weights once per decode step, the KV cache of every running sequence) and
its FLOPs; the update is 8·P FLOPs per token (forward and backward 6·P, the π_old recompute 2·P) plus
attention's, at a stated MFU; the weight sync is each rollout chip's shard over its link.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from fipo_jax.core import _checks


@dataclasses.dataclass(frozen=True)
class Phases:
    """Seconds of one step's phases on ``devices`` devices, and the tokens it trains on."""

    generate_s: float
    score_s: float
    update_s: float
    sync_s: float
    tokens: float
    devices: int
    tail_s: float = 0.0

    def __post_init__(self):
        for name in ("generate_s", "score_s", "update_s", "sync_s", "tokens", "tail_s"):
            _checks.check_number(f"Phases.{name}", getattr(self, name), minimum=0)
        _checks.check_int("Phases.devices", self.devices, minimum=1)


def step_seconds(phases: Phases, max_staleness: int, rollout_devices: int = 0, concurrent: bool = False) -> float:
    """T of the module docstring: ``rollout_devices`` = 0 shares the mesh, else D_r of D (the rest train).

    ``concurrent`` (shared mesh, k ≥ 1): the devices run generation and the update at once, each at
    its full speed, T = max(G + L + S, U + W) — the bound for devices that one phase leaves half idle
    (a small model on CPU cores), where the serial formula is the bound for devices each phase fills."""
    _checks.check_int("max_staleness", max_staleness, minimum=0)
    g, s, u, w, d = phases.generate_s, phases.score_s, phases.update_s, phases.sync_s, phases.devices
    if not rollout_devices:
        g += phases.tail_s
        if max_staleness == 0:
            return g + s + u + w
        return max(g + s, u + w) if concurrent else max(g + u + w, g + s)
    _checks.check_int("rollout_devices", rollout_devices, minimum=1, maximum=d - 1)
    g, u = g * d / rollout_devices + phases.tail_s, u * d / (d - rollout_devices)
    return g + s + u + w if max_staleness == 0 else max(g + s, u + w)


def best_split(phases: Phases, max_staleness: int, multiple: int = 1) -> tuple[int, float]:
    """(D_r, T): the rollout devices (a multiple of ``multiple``, e.g. a replica's tensor-parallel
    width) that minimise the step time of a split mesh, and that time."""
    options = range(multiple, phases.devices, multiple)
    _checks.require(len(options) > 0, f"{phases.devices} devices cannot split into groups of {multiple}")
    return min(((r, step_seconds(phases, max_staleness, r)) for r in options), key=lambda x: x[1])


def phases_from_log(rows: Sequence[dict[str, Any]], devices: int, skip_first: int = 1) -> Phases:
    """Mean phases of a run's metrics rows (metrics.jsonl) after the first ``skip_first`` steps
    (compiles), means so that they add up to the mean step: G = ``time/rollout_s`` − ``time/score_s``,
    S = ``time/score_s`` + ``time/pack_s``, U = ``time/update_s``, W = ``time/weight_sync_s``,
    tokens = ``time/tokens_per_s`` · ``time/step_s``."""
    steps = [r for r in rows if r.get("step", 0) > skip_first and "time/rollout_s" in r]
    _checks.require(bool(steps), f"no step after the first {skip_first} holds phase times (time/rollout_s)")
    mean = lambda f: sum(f(r) for r in steps) / len(steps)  # noqa: E731
    return Phases(generate_s=mean(lambda r: r["time/rollout_s"] - r.get("time/score_s", 0.0)),
                  score_s=mean(lambda r: r.get("time/score_s", 0.0) + r.get("time/pack_s", 0.0)),
                  update_s=mean(lambda r: r["time/update_s"]),
                  sync_s=mean(lambda r: r.get("time/weight_sync_s", 0.0)),
                  tokens=mean(lambda r: r["time/tokens_per_s"] * r["time/step_s"]), devices=devices)


def run_phases(rows: Sequence[dict[str, Any]], mesh_shape: Sequence[int],
               rollout_mesh_shape: Sequence[int] = ()) -> Phases:
    """`phases_from_log` of a run on ``mesh_shape`` (and ``rollout_mesh_shape`` when split), stated
    for all its devices: a split run's generation was measured on D_r devices and its update on D_t,
    so G·D_r/D and U·D_t/D are what all D devices would take (the linear scaling of the model)."""
    train, rollout = math.prod(mesh_shape), math.prod(rollout_mesh_shape) if rollout_mesh_shape else 0
    phases = phases_from_log(rows, train + rollout)
    if not rollout:
        return phases
    return dataclasses.replace(phases, generate_s=phases.generate_s * rollout / phases.devices,
                               update_s=phases.update_s * train / phases.devices)


@dataclasses.dataclass(frozen=True)
class Chip:
    """An accelerator's datasheet figures: dense bf16 FLOP/s, HBM bytes/s and bytes, link bytes/s."""

    name: str
    flops: float
    hbm_bandwidth: float
    memory: float
    link_bandwidth: float


CHIPS = {  # vendor datasheets; link: the per-chip bandwidth between hosts (IB 400 Gb/s per GPU; v5p ICI)
    "h100": Chip("H100 SXM", 989e12, 3.35e12, 80 * 2**30, 50e9),
    "tpu-v5p": Chip("TPU v5p", 459e12, 2.765e12, 95 * 2**30, 100e9),
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a step of an RL recipe computes (defaults: the official FIPO Qwen2.5-32B run).

    parameters, kv_bytes_per_token, layers and attention_width (query heads × head dim) describe the
    model; responses the kept responses per step, keep_rate the share of generated responses kept
    (official: 512 of 2048 prompts per generation round); prompt_tokens and response_tokens the
    mean lengths, max_response_tokens the longest (the tail's length); tensor_parallel the
    rollout replica's width; update_mfu and decode_flops_use what the update and decode reach of the
    chip's FLOP/s; score_s_per_response the host seconds of one math-verify check, on cores_per_chip."""

    parameters: float = 32.8e9
    kv_bytes_per_token: float = 2 * 64 * 8 * 128 * 2
    layers: int = 64
    attention_width: int = 40 * 128
    responses: int = 8192
    keep_rate: float = 0.25
    prompt_tokens: float = 200.0
    response_tokens: float = 10_000.0
    max_response_tokens: float = 20_480.0
    tensor_parallel: int = 4
    update_mfu: float = 0.4
    decode_flops_use: float = 0.5
    kv_memory_share: float = 0.9
    score_s_per_response: float = 0.05
    cores_per_chip: int = 12


def decode_tokens_per_s(recipe: Recipe, chip: Chip) -> float:
    """One rollout replica's decode throughput: as many sequences as its KV memory holds, each
    decode step reading the weights once and every sequence's cache (at half its final length)."""
    tp, weights = recipe.tensor_parallel, 2 * recipe.parameters
    context = recipe.prompt_tokens + recipe.response_tokens / 2
    free = tp * chip.memory * recipe.kv_memory_share - weights
    _checks.require(free > 0, f"{recipe.parameters:.3g} parameters do not fit a replica of {tp} × {chip.name}")
    batch = free / (recipe.kv_bytes_per_token * context)
    memory_s = (weights + batch * context * recipe.kv_bytes_per_token) / (tp * chip.hbm_bandwidth)
    compute_s = 2 * recipe.parameters * batch / (tp * chip.flops * recipe.decode_flops_use)
    return batch / max(memory_s, compute_s)


def recipe_phases(recipe: Recipe, chip: Chip, devices: int) -> Phases:
    """The phases of one step of ``recipe`` with all ``devices`` chips on each phase (module docstring)."""
    generated = recipe.responses / recipe.keep_rate * recipe.response_tokens
    replicas = devices / recipe.tensor_parallel
    trained = recipe.responses * (recipe.prompt_tokens + recipe.response_tokens)
    context = recipe.prompt_tokens + recipe.response_tokens / 2  # attention's mean span (causal)
    flops_per_token = 8 * recipe.parameters + 4 * 4 * recipe.layers * recipe.attention_width * context
    return Phases(generate_s=generated / (replicas * decode_tokens_per_s(recipe, chip)),
                  score_s=recipe.responses / recipe.keep_rate * recipe.score_s_per_response
                  / (devices * recipe.cores_per_chip),
                  update_s=trained * flops_per_token / (devices * chip.flops * recipe.update_mfu),
                  sync_s=2 * recipe.parameters / recipe.tensor_parallel / chip.link_bandwidth,
                  tokens=trained, devices=devices, tail_s=tail_seconds(recipe, chip))


def tail_seconds(recipe: Recipe, chip: Chip) -> float:
    """L: the longest response's decode steps, each reading a replica's weights once (latency-bound)."""
    return recipe.max_response_tokens * 2 * recipe.parameters / (recipe.tensor_parallel * chip.hbm_bandwidth)


def recipe_table(recipe: Recipe, chip: Chip, device_counts: Sequence[int] = (64, 128, 256)) -> str:
    """Markdown: per device count, the step time in sequence on a shared mesh, k = 1 on a shared
    mesh, k = 0 and k = 1 on the best split, and the k = 1 split's throughput and speed-up."""
    head = ("| chips | G / L / U (s, all chips) | shared, k = 0 | shared, k = 1 | best split k = 0 | best split k = 1 "
            "| tokens/s (split k = 1) | speed-up |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for devices in device_counts:
        phases = recipe_phases(recipe, chip, devices)
        base = step_seconds(phases, 0)
        r0, t0 = best_split(phases, 0, recipe.tensor_parallel)
        r1, t1 = best_split(phases, 1, recipe.tensor_parallel)
        rows.append(f"| {devices} | {phases.generate_s:,.0f} / {phases.tail_s:,.0f} / {phases.update_s:,.0f} | "
                    f"{base:,.0f} s | "
                    f"{step_seconds(phases, 1):,.0f} s | {t0:,.0f} s ({r0} + {devices - r0}) | "
                    f"{t1:,.0f} s ({r1} + {devices - r1}) | {phases.tokens / t1:,.0f} | {base / t1:.2f}× |")
    return "\n".join([head, *rows])


def describe(phases: Phases, multiple: int = 1) -> str:
    """Markdown: the step time and tokens/s of each arrangement of ``phases``' devices."""
    lines = ["| arrangement | step (s) | tokens/s | vs shared k = 0 |", "|---|---|---|---|"]
    base = step_seconds(phases, 0)
    options = [("shared mesh, k = 0", 0, 0), ("shared mesh, k ≥ 1", 1, 0)]
    if phases.devices > multiple:
        options += [(f"split {r} + {phases.devices - r}, k = {k}", k, r)
                    for k in (0, 1) for r in [best_split(phases, k, multiple)[0]]]
    for label, k, r in options:
        t = step_seconds(phases, k, r)
        lines.append(f"| {label} | {t:,.2f} | {phases.tokens / t:,.0f} | {base / t:.2f}× |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``fipo-plan --pipeline``: the step time of a run's phases (measured or given) on shared and
    split devices, in sequence and k-stale; or the modelled table of a recipe on a chip."""
    import argparse
    import json
    import os
    import sys

    parser = argparse.ArgumentParser(prog="fipo-plan --pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="phases measured by a run (its metrics.jsonl and config.json)")
    parser.add_argument("--phases", help="G,S,U,W seconds on --devices devices (with --tokens), e.g. 40,2,30,0.5")
    parser.add_argument("--tokens", type=float, default=0.0, help="tokens per step (with --phases)")
    parser.add_argument("--tail", type=float, default=0.0, help="L, the generation tail in seconds (with --phases)")
    parser.add_argument("--devices", type=int, default=None, help="devices of the given phases (with --phases)")
    parser.add_argument("--multiple", type=int, default=1, help="rollout devices come in groups of (tensor parallel)")
    parser.add_argument("--recipe", action="store_true", help="the modelled FIPO Qwen2.5-32B table (Recipe defaults)")
    parser.add_argument("--chip", choices=sorted(CHIPS), default="h100")
    parser.add_argument("--chips", default="64,128,256", help="device counts of the recipe table")
    parser.add_argument("--response-tokens", type=float, default=Recipe.response_tokens)
    args = parser.parse_args(argv)
    try:
        if args.recipe:
            recipe = Recipe(response_tokens=args.response_tokens)
            print(f"modelled, not measured: FIPO Qwen2.5-32B on {CHIPS[args.chip].name}, mean response "
                  f"{args.response_tokens:,.0f} tokens")
            print(recipe_table(recipe, CHIPS[args.chip], [int(c) for c in args.chips.split(",")]))
            return 0
        if args.run_dir:
            with open(os.path.join(args.run_dir, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
            with open(os.path.join(args.run_dir, "metrics.jsonl"), encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
            phases = run_phases(rows, config.get("mesh_shape", [1]), config.get("rollout_mesh_shape") or [])
        elif args.phases:
            g, s, u, w = (float(v) for v in args.phases.split(","))
            phases = Phases(g, s, u, w, args.tokens, args.devices or 1, args.tail)
        else:
            parser.error("give --run-dir, --phases or --recipe")
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"phases on {phases.devices} device(s): generate {phases.generate_s:.2f} s, tail {phases.tail_s:.2f} s, "
          f"score + pack {phases.score_s:.2f} s, update {phases.update_s:.2f} s, weight sync {phases.sync_s:.2f} s; "
          f"{phases.tokens:,.0f} tokens per step")
    print(describe(phases, args.multiple))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
