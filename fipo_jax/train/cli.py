"""Train a policy with FIPO (or DAPO / GRPO).

    fipo-train                                        # the CPU default experiment (≤ 10 min, 2 cores)
    fipo-train --algo dapo --run-dir runs/dapo
    fipo-train --config qwen2.5-32b-fipo --set model.path=/ckpt/Qwen2.5-32B \\
        --set data.train_path=/data/dapo-math-17k.parquet --set data.eval_path=/data/aime-2024.parquet

Multi-host (one process per host, all with the same arguments; see docs/real-models.md, "Multi-host"):

    fipo-train --config qwen2.5-7b-fipo --distributed auto ...          # TPU pod / SLURM
    fipo-train ... --distributed HOST:PORT --num-processes 4 --process-id $RANK

Re-running with the same --run-dir resumes from its last complete checkpoint; a larger
--steps continues a finished run. Configs: a preset name or a JSON file of (partial)
`fipo_jax.config.TrainConfig` fields; --set overrides any field by its dotted path.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from fipo_jax.config import (
    PRESETS,
    ConfigError,
    apply_overrides,
    fipo_inert_reason,
    load_config,
    sampler_as_old_warning,
    with_algo,
)
from fipo_jax.core.losses import LOSS_MODES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fipo-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu_default",
                        help=f"preset ({', '.join(sorted(PRESETS))}) or path to a JSON config (default: cpu_default)")
    parser.add_argument("--algo", choices=LOSS_MODES, default=None,
                        help="loss: fipo (default of every preset), dapo (clip-higher + dual-clip) or grpo")
    parser.add_argument("--steps", type=int, default=None, help="total number of RL steps (continues a finished run)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: runs/<config name>-<algo>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set rollout.n=8 --set algo.loss.decay_rate=16")
    parser.add_argument("--seed", type=int, default=None, help="shorthand for --set seed=N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--print-config", action="store_true",
                        help="print the config as the run saves it (a null loss field follows loss_mode) and exit")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="after training, write the policy as a Hugging Face checkpoint folder (safetensors, "
                             "config.json, tokenizer) that transformers loads")
    parser.add_argument("--export-adapters", default=None, metavar="DIR",
                        help="after training a run with adapters (model.lora.rank >= 1), write them alone in PEFT's "
                             "format (adapter_config.json, adapter_model.safetensors)")
    group = parser.add_argument_group("multi-host (jax.distributed)")
    group.add_argument("--distributed", default=None, metavar="auto|HOST:PORT",
                       help="start jax.distributed before training: 'auto' detects the cluster (Cloud TPU, SLURM, "
                            "Open MPI), HOST:PORT is process 0's coordinator address (then also give "
                            "--num-processes and --process-id)")
    group.add_argument("--num-processes", type=int, default=None, help="number of processes (with HOST:PORT)")
    group.add_argument("--process-id", type=int, default=None, help="this process's rank (with HOST:PORT)")
    group.add_argument("--distributed-timeout", type=float, default=300.0, metavar="SECONDS",
                       help="how long to wait for every process to join before giving up (default 300)")
    return parser


def start_distributed(args) -> None:
    """jax.distributed.initialize from the CLI flags (must run before any other JAX use)."""
    if args.distributed is None:
        if args.num_processes is not None or args.process_id is not None:
            raise ConfigError("--num-processes / --process-id need --distributed HOST:PORT")
        return
    from fipo_jax.parallel import distributed

    if args.distributed == "auto":
        if args.num_processes is not None or args.process_id is not None:
            raise ConfigError("--distributed auto detects --num-processes / --process-id itself; drop them")
        distributed.initialize(timeout_s=args.distributed_timeout)
        return
    if ":" not in args.distributed:
        raise ConfigError(f"--distributed must be 'auto' or HOST:PORT, got {args.distributed!r}")
    if args.num_processes is None or args.process_id is None:
        raise ConfigError("--distributed HOST:PORT needs --num-processes and --process-id")
    try:
        distributed.initialize(args.distributed, args.num_processes, args.process_id,
                               timeout_s=args.distributed_timeout)
    except ValueError as err:
        raise ConfigError(str(err)) from err


# The config field each shorthand flag sets; a --set of the same field must agree with it.
FLAG_FIELDS = {"algo": "algo.loss.loss_mode", "seed": "seed", "steps": "steps"}


def resolve_config(args):
    config = load_config(args.config)
    check_flags_agree(args, config)
    if args.algo:
        config = with_algo(config, args.algo)
    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    return apply_overrides(config, overrides) if overrides else config


def check_flags_agree(args, config) -> None:
    """A shorthand flag (--algo, --seed, --steps) and a --set of the field it sets (or of a section
    holding it) must give the same value: otherwise one of them would be silently ignored."""
    set_keys = [o.partition("=")[0].strip() for o in args.overrides]
    overridden = None
    for flag, field in FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is None or not any(field == k or field.startswith(k + ".") for k in set_keys):
            continue
        overridden = overridden or apply_overrides(config, args.overrides)
        given = functools.reduce(getattr, field.split("."), overridden)
        if given != value:
            raise ConfigError(f"--{flag} {value} and --set {field}={given} disagree; give the value once")


def export_problem(target: str, config, run_dir: str, adapters: bool = False) -> str | None:
    """Why ``--export target`` (``--export-adapters`` when `adapters`) cannot be written (checked before
    anything is built, not after the training), or None."""
    from fipo_jax.models import ExportFolderError, check_export_folder
    from fipo_jax.train.run_dir import ExportDestinationError, check_export_destination

    if adapters and not config.model.lora.rank:
        return "--export-adapters needs a run with adapters: set model.lora.rank >= 1"
    if config.model.source == "scratch":
        return ("--export needs a pretrained model (model.source 'hf' or 'gemma3-270m'); the scratch model's task "
                "vocabulary is not a Hugging Face tokenizer")
    try:
        check_export_destination(target, run_dir)
        check_export_folder(target)
    except (ExportFolderError, ExportDestinationError) as err:
        return str(err)
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = resolve_config(args)
        if not args.print_config:
            start_distributed(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        for warning in (fipo_inert_reason(config), sampler_as_old_warning(config)):
            if warning:
                print(f"[warning] {warning}", file=sys.stderr)
        return 0
    run_dir = args.run_dir or os.path.join("runs", f"{config.name}-{config.algo.loss.loss_mode}")
    from fipo_jax.models import ExportFolderError
    from fipo_jax.train.checkpoint import CheckpointFormatError
    from fipo_jax.train.run_dir import ExportDestinationError, RunDirectoryError, RunDirectoryLocked
    from fipo_jax.train.trainer import DynamicSamplingExhausted, Trainer

    for target in (args.export, args.export_adapters):
        if target and (problem := export_problem(target, config, run_dir, adapters=target == args.export_adapters)):
            print(f"config error: {problem}", file=sys.stderr)
            return 2
    try:
        trainer = Trainer(config, run_dir, progress=not args.no_progress)
        summary = trainer.train()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (RunDirectoryLocked, RunDirectoryError, DynamicSamplingExhausted, CheckpointFormatError) as err:
        # each says what to do
        print(f"error: {err}", file=sys.stderr)
        return 2
    from fipo_jax.parallel.distributed import is_primary

    try:
        if args.export:
            trainer.export(args.export)
        if args.export_adapters:
            trainer.export_adapters(args.export_adapters)
    except (ExportFolderError, ExportDestinationError) as err:  # the folder changed during the training
        print(f"error: {err} (the run itself is complete: {run_dir})", file=sys.stderr)
        return 2
    if is_primary():
        print(json.dumps({k: v for k, v in summary.items() if k != "plots"}, indent=2))
        print(f"run directory: {run_dir}")
        if args.export:
            print(f"exported policy: {args.export}")
        if args.export_adapters:
            print(f"exported adapters: {args.export_adapters}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
