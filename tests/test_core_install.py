"""`pip install fipo_jax` alone (no extras) gives the functional core with jax and numpy only: a
fresh virtualenv installs the package without extras, holds no flax / transformers / optax, runs
the README's functional example, and names the extra in one line when a part needs one."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_example() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]


def _run(python: str, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=600, cwd="/")


@pytest.mark.slow
def test_the_core_installs_alone_and_runs_the_readme_example(tmp_path):
    venv = tmp_path / "core"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", ROOT], check=True,
                   timeout=900)
    installed = json.loads(subprocess.run([python, "-m", "pip", "list", "--format", "json"], check=True,
                                          capture_output=True, text=True).stdout)
    names = {p["name"].lower().replace("_", "-") for p in installed}
    assert {"jax", "jaxlib", "numpy", "fipo-jax"} <= names
    assert not names & {"flax", "transformers", "optax", "orbax-checkpoint", "safetensors", "torch", "matplotlib"}

    timed = _run(python, "import time; t = time.perf_counter(); import fipo_jax; print(time.perf_counter() - t)")
    assert timed.returncode == 0, timed.stderr
    print(f"core import: {float(timed.stdout):.2f} s")  # stated in the docs (measured there, not asserted)
    example = _run(python, _readme_example() + "\nassert keep.tolist() == [True, False] and grad.shape == (8, 64)")
    assert example.returncode == 0, example.stderr

    tunix = _run(python, "import fipo_jax.integrations.tunix as t\ntry:\n    t.register()\nexcept ImportError as e:\n"
                         "    print(e)")
    assert tunix.returncode == 0 and tunix.stdout.startswith("fipo_jax.integrations.tunix needs Tunix: pip install "
                                                             "google-tunix"), tunix.stderr
    for module, extra in (("fipo_jax.models", "models"), ("fipo_jax.train.update", "train"),
                          ("fipo_jax.generation.sampling", "models")):
        failed = _run(python, f"import {module}")
        last = failed.stderr.strip().splitlines()[-1]
        assert failed.returncode == 1 and last.startswith("ImportError: this part of fipo_jax needs the "
                                                          f"'{extra}' extra (missing: flax"), failed.stderr
        assert last.endswith(f"pip install 'fipo_jax[{extra}]'"), last
    lazy = _run(python, "from fipo_jax._requires import import_module; import_module('pyarrow.parquet', 'train')")
    assert lazy.stderr.strip().splitlines()[-1] == ("ImportError: this part of fipo_jax needs the 'train' extra "
                                                    "(missing: pyarrow): pip install 'fipo_jax[train]'"), lazy.stderr
