"""The testbed task's properties, measured: can anything but the chain answer it?

    python experiments/testbed.py --out runs/testbed                       # the preset's task and warm start
    python experiments/testbed.py --out runs/testbed_n14 --set data.n_terms=14

For a chain task and the warm start of a config it measures
  - the answer distribution: the most common answer's share, and the best guess from the last
    operation and its operand (both over 200,000 random problems): a shortcut's ceiling;
  - the warm-started policy's responses to held-out prompts (``--k`` samples each at temperature
    1): for each solution length (lines before the answer: 0 = a direct answer) its share and its
    accuracy — whether a direct answer is near chance and whether the worked chain pays;
  - the direct answer's accuracy when forced (the answer digit's probability after "Answer: ").
Writes <out>/testbed.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import numpy as np

from fipo_jax.config import apply_overrides, load_config
from fipo_jax.data import ChainTask


def answer_stats(task: ChainTask, n: int = 200_000, seed: int = 0) -> dict[str, float]:
    """The most common answer's share and the last-operation guess's accuracy over ``n`` problems."""
    problems = task.sample(np.random.default_rng(seed), n)
    answers = np.asarray([int(task.answer(p)) for p in problems])
    last = [(p[1][-1], p[0][-1]) for p in problems]
    by_last: dict = collections.defaultdict(list)
    for key, a in zip(last, answers):
        by_last[key].append(a)
    hits = sum(np.bincount(v, minlength=10).max() for v in by_last.values())
    return {"most_common_answer": float(np.bincount(answers, minlength=10).max() / n),
            "last_op_guess": float(hits / n), "chance": 1 / task.modulus}


def worked_steps(text: str, task: ChainTask) -> int:
    """Operations worked before the answer line (0: a direct answer)."""
    head = text.split("Answer:")[0]
    if task.worked == "values":
        return len(head.split())
    return sum(1 for line in head.split("\n") if "=" in line)


def sampled_by_length(trainer, k: int) -> dict[int, dict[str, float]]:
    """Per number of worked lines: share of responses, accuracy, mean tokens."""
    records = trainer.eval_records
    rollouts = trainer.rollouts.sample(trainer.policy, records, k, trainer.run_key(7), trainer.rollouts.eval_sampling)
    texts = [trainer.rollouts.decode(tokens, int(length)) for tokens, length in zip(rollouts.tokens, rollouts.lengths)]
    groups: dict = collections.defaultdict(list)
    for text, ok, length in zip(texts, rollouts.correct, rollouts.lengths):
        groups[worked_steps(text, ChainTask.of(trainer.config.data))].append((bool(ok), int(length)))
    total = len(texts)
    return {lines: {"share": len(v) / total, "accuracy": float(np.mean([ok for ok, _ in v])),
                    "tokens": float(np.mean([n for _, n in v])), "count": len(v)}
            for lines, v in sorted(groups.items())}


def forced_direct_accuracy(trainer) -> float:
    """Mean probability of the right answer digit right after "Answer: " (the direct answer, forced)."""
    import jax.numpy as jnp

    from fipo_jax.generation.logprobs import sequence_log_probs

    tok = trainer.tokenizer
    rows = [[tok.bos_token_id] + tok.encode(r.prompt) + tok.encode("Answer: " + r.ground_truth) for r in
            trainer.eval_records]
    ids = jnp.asarray(np.asarray(rows, np.int32))
    lp = sequence_log_probs(trainer.policy, ids, jnp.ones(ids.shape, bool), response_start=1)
    return float(jnp.mean(jnp.exp(lp[:, -1])))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cpu_default")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from fipo_jax.train.trainer import Trainer

    config = apply_overrides(load_config(args.config), args.set + ["steps=0"])
    task = ChainTask.of(config.data)
    stats = answer_stats(task)
    trainer = Trainer(config, os.path.join(args.out, "run"), progress=False)
    by_length = sampled_by_length(trainer, args.k)
    result = {"task": {"n_terms": task.n_terms, "ops": task.ops, "invertible": task.invertible}, **stats,
              "forced_direct_accuracy": forced_direct_accuracy(trainer), "by_steps": by_length,
              "sft": {"steps": config.sft.steps, "partial": config.sft.partial,
                      "step_fraction": config.sft.step_fraction}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "testbed.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"most common answer {stats['most_common_answer']:.3f}, last-op guess {stats['last_op_guess']:.3f}, "
          f"forced direct answer {result['forced_direct_accuracy']:.3f}")
    print("| worked steps | share | accuracy | tokens |\n|---|---|---|---|")
    for lines, row in by_length.items():
        print(f"| {lines} | {row['share']:.3f} | {row['accuracy']:.3f} | {row['tokens']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
