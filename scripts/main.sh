#!/usr/bin/env bash
# Set up the runtime environment and run the main job.
#   usage: bash scripts/main.sh [args for the main job]
# Until the RL trainer lands, the main job is the FIPO loss benchmark (README "Performance").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh" requirements-test.txt  # the benchmark compares against PyTorch
cd "$root"
mkdir -p runs
exec python experiments/bench_loss.py --out runs/bench_loss.json "$@"
