#!/usr/bin/env bash
# Create (or reuse) Tunix's virtualenv: requirements-tunix.txt (google-tunix and its pinned stack) plus
# fipo_jax's core installed WITHOUT its dependencies. Separate from .venv/: google-tunix 0.1.7 requires
# safetensors<0.8, the main stack pins 0.8.0.
#   usage: bash scripts/setup_tunix_env.sh        (or `source` it: puts the venv's bin/ first on PATH)
#   then:  .venv-tunix/bin/python -m pytest -q tests_tunix
# The venv is $FIPO_TUNIX_VENV (default .venv-tunix/ in the repository). Re-installs only when
# requirements-tunix.txt or pyproject.toml change (hash stamp inside the venv). The interpreter is
# $PYTHON if set, else the first Python >= 3.12 (jax 0.11.2 needs it; Tunix itself needs >= 3.11) among
# python3.12, python3, python3.13 and pyenv's installed versions.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FIPO_TUNIX_VENV:-$root/.venv-tunix}"
req="$root/requirements-tunix.txt"
min_python="3.12"

python_ok() {  # the interpreter runs and is >= 3.12
  "$1" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 12))' >/dev/null 2>&1
}

find_python() {
  local candidates=() seen=""
  if [ -n "${PYTHON:-}" ]; then
    python_ok "$PYTHON" && { echo "$PYTHON"; return 0; }
    echo "[setup-tunix] error: PYTHON=$PYTHON is not a Python >= $min_python" >&2
    return 1
  fi
  candidates+=(python3.12 python3 python3.13)
  if command -v pyenv >/dev/null 2>&1; then
    candidates+=("$(pyenv root)"/versions/3.1[2-9]*/bin/python3)
  fi
  candidates+=("$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3.12 /usr/bin/python3.12)
  for candidate in "${candidates[@]}"; do
    [ -e "$candidate" ] || command -v "$candidate" >/dev/null 2>&1 || continue
    python_ok "$candidate" && { echo "$candidate"; return 0; }
    seen="$seen $("$candidate" -c 'import sys; print(sys.executable + "=" + sys.version.split()[0])' 2>/dev/null)"
  done
  echo "[setup-tunix] error: Tunix's environment needs Python >= $min_python (jax 0.11.2); found only:" \
       "${seen:- none}. Install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12" >&2
  return 1
}

if [ -x "$venv/bin/python" ] && ! python_ok "$venv/bin/python"; then
  echo "[setup-tunix] $venv is Python $("$venv/bin/python" -c 'import sys; print(sys.version.split()[0])'):" \
       "recreating it with Python >= $min_python" >&2
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  python="$(find_python)" || exit 1
  echo "[setup-tunix] creating virtualenv $venv with $python" \
       "($("$python" -c 'import sys; print(sys.version.split()[0])'))" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.fipo-requirements-tunix.sha"
want="$(cat "$req" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup-tunix] installing requirements-tunix.txt into $venv (about 1.5 minutes on first run)" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  # fipo_jax's core (jax + numpy only), without the main stack's pins (flax, transformers, safetensors 0.8 ...).
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$root"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
