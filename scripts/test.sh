#!/usr/bin/env bash
# Set up the test environment (pinned, CPU torch) and run the whole test suite.
#   usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh" requirements-test.txt
cd "$root"
exec python -m pytest -q "$@"
