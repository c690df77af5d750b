#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install a pinned requirements file into it.
#   usage: source scripts/setup_env.sh requirements.txt|requirements-test.txt
# Re-installs only when the requirements files change (hash stamp inside the venv).
set -euo pipefail
req="${1:-requirements.txt}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FIPO_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtualenv $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.fipo-$(basename "$req").sha"
want="$(cat "$root/requirements.txt" "$root/$req" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing $req into $venv (about a minute on first run)" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$root/$req"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$root"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
