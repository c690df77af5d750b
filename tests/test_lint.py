"""fipo_jax/ stays lint-clean and type-clean: `ruff check` with pyproject's [tool.ruff] (rules E, F, I, W)
and `mypy` with pyproject's [tool.mypy] (default, non-strict checking of the annotated code).

Both tools are pinned in requirements-test.txt; a test is skipped only where its tool is not installed.
mypy keeps its cache in .mypy_cache/: a warm run takes seconds, a cold one (fresh checkout) about 90 s.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tool: str, *args: str) -> None:
    """Run ``python -m tool args`` in the repository root; fail with the tool's output unless it exits 0."""
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed (pip install -r requirements-test.txt)")
    result = subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"`{' '.join((tool, *args))}` exited {result.returncode}:\n{result.stdout}{result.stderr}",
                    pytrace=False)


def test_ruff_is_clean():
    _run("ruff", "check", "fipo_jax")


def test_mypy_is_clean():
    _run("mypy")  # files and settings from pyproject.toml's [tool.mypy]
