#!/usr/bin/env bash
# Create (or reuse) Tunix's virtualenv: requirements-tunix.txt (google-tunix and its pinned stack) plus
# fipo_jax's core installed WITHOUT its dependencies — scripts/setup_env.sh with another venv and
# requirements file. Separate from .venv/: google-tunix 0.1.7 requires safetensors<0.8, the main stack
# pins 0.8.0.
#   usage: bash scripts/setup_tunix_env.sh        (or `source` it: puts the venv's bin/ first on PATH)
#   then:  .venv-tunix/bin/python -m pytest -q tests_tunix
# The venv is $FIPO_TUNIX_VENV (default .venv-tunix/ in the repository); re-installed only when the
# requirements or pyproject.toml change; the interpreter is found as setup_env.sh finds it (Python >= 3.12:
# jax 0.11.2 needs it; Tunix itself needs >= 3.11).
set -euo pipefail
tunix_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FIPO_VENV="${FIPO_TUNIX_VENV:-$tunix_root/.venv-tunix}"
source "$tunix_root/scripts/setup_env.sh" requirements-tunix.txt
