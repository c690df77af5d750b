#!/usr/bin/env bash
# Set up the runtime environment and run the main job: the CPU default experiment
# (supervised warm start of a tiny Qwen2, then FIPO RL; <= 10 minutes on 2 CPU cores).
#   usage: bash scripts/main.sh [extra args for fipo-train, e.g. --algo dapo]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh" requirements.txt
cd "$root"
exec fipo-train "$@"
