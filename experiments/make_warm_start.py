"""Train a preset's warm start and ship it: the file under fipo_jax/train/warm_starts/ and its
entry (recipe key, parameters' SHA-256, the command) in manifest.json there.

    python experiments/make_warm_start.py                   # the CPU default (the testbed)
    python experiments/make_warm_start.py --config cpu_default --name cpu_default

Training the same recipe on another machine, or with other XLA:CPU thread settings, rounds
differently and gives other weights (README, "The testbed"); shipping the file makes every
machine start RL from the same ones, and the digest proves it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

from fipo_jax.config import apply_overrides, load_config
from fipo_jax.data import ChainTask
from fipo_jax.parallel.sharding import make_mesh
from fipo_jax.train import sft
from fipo_jax.train.build import build_policy, warm_start, warm_start_key


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cpu_default")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default=None, help="file name stem (default: the config's name)")
    parser.add_argument("--dir", default=sft.WARM_STARTS)
    args = parser.parse_args(argv)
    config = apply_overrides(load_config(args.config), args.set + ["sft.packaged=false", "sft.cache_dir=null"])
    tokenizer, model = build_policy(config, make_mesh((1,)), print)
    start = time.perf_counter()
    digest = warm_start(config, model, tokenizer, ChainTask.of(config.data), print, lambda total, desc: None)
    seconds = time.perf_counter() - start
    name = f"{args.name or config.name}.npz"
    os.makedirs(args.dir, exist_ok=True)
    sft.save_params(model, os.path.join(args.dir, name))
    manifest_path = os.path.join(args.dir, "manifest.json")
    manifest = json.load(open(manifest_path, encoding="utf-8")) if os.path.exists(manifest_path) else {}
    made_by = " ".join(["python experiments/make_warm_start.py", *(sys.argv[1:] if argv is None else argv)])
    manifest = {k: v for k, v in manifest.items() if v["file"] != name}  # one entry per file
    manifest[warm_start_key(config)] = {"file": name, "sha256": digest, "made_by": made_by.strip(),
                                        "config": config.name, "jax": jax.__version__,
                                        "sft_seconds": round(seconds, 1)}
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {os.path.join(args.dir, name)} (sha256 {digest}, {seconds:.0f} s) and {manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
