"""The install story holds together: requirements.txt pins lie inside pyproject.toml's ranges (so
what CI proves is what the package declares), and the set-up script refuses a Python < 3.12 in one
line instead of building a virtualenv that cannot install jax."""

import os
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins(file: str) -> dict[str, str]:
    pins = {}
    for line in open(os.path.join(ROOT, file), encoding="utf-8"):
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier  # exactly one "==" pin per line
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def _project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_every_declared_dependency_is_pinned_inside_its_range():
    project = _project()
    pins = _pins("requirements.txt")
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    declared = [r for r in declared if canonicalize_name(r.name) != "fipo-jax"]  # extras naming extras
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is declared but requirements.txt does not pin it (CI would not test it)"
        assert requirement.specifier.contains(pins[name]), f"requirements.txt pins {name}=={pins[name]}, " \
                                                           f"outside pyproject's {requirement}"
        lowest = min((s.version for s in requirement.specifier if s.operator == ">="), default=None)
        assert lowest == pins[name], f"{requirement}: the range should start at the tested pin {pins[name]}"
    runtime = {canonicalize_name(r.name) for r in declared}
    assert set(pins) <= runtime, f"pinned but not declared: {sorted(set(pins) - runtime)}"


def test_python_and_jax_versions_agree():
    required = SpecifierSet(_project()["requires-python"])
    assert required.contains(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert not required.contains("3.11")  # jax >= 0.11 has no Python 3.11 wheels
    assert _pins("requirements.txt")["jax"] == _pins("requirements.txt")["jaxlib"]
    assert _pins("requirements-test.txt")["torch"] == "2.13.0"


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH holding only a 'python3' that reports 3.11 (and the tools the script needs)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "python3").write_text("#!/bin/sh\ncase \"$*\" in *version_info*) exit 1;; esac\n"
                                    "echo /fake/python3=3.11.0\n")
    (folder / "python3").chmod(0o755)
    for tool in ("dirname", "cat", "sha256sum", "cut", "rm"):
        (folder / tool).symlink_to(subprocess.check_output(["bash", "-c", f"command -v {tool}"], text=True).strip())
    return folder


def _setup(env: dict, tmp_path) -> subprocess.CompletedProcess:
    env = {**env, "FIPO_VENV": str(tmp_path / "venv")}
    return subprocess.run(["/bin/bash", "-c", f"source {ROOT}/scripts/setup_env.sh requirements.txt"],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.skipif(any(os.path.exists(p) for p in ("/usr/bin/python3.12", "/usr/local/bin/python3.12")),
                    reason="a system Python 3.12 sits where the script also looks")
def test_setup_refuses_an_old_python_in_one_line(tmp_path, fake_bin):
    proc = _setup({"PATH": str(fake_bin), "HOME": str(tmp_path)}, tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[setup] error: fipo_jax needs Python >= 3.12"), proc.stderr
    assert "/fake/python3=3.11.0" in lines[0] and "PYTHON=" in lines[0]
    assert not (tmp_path / "venv").exists()


def test_setup_refuses_a_named_python_that_is_too_old(tmp_path, fake_bin):
    proc = _setup({"PATH": str(fake_bin), "HOME": str(tmp_path), "PYTHON": str(fake_bin / "python3")}, tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"[setup] error: PYTHON={fake_bin / 'python3'} is not a Python >= 3.12"
    assert not (tmp_path / "venv").exists()


def test_the_core_needs_only_jax_and_numpy_and_the_extras_compose():
    from fipo_jax._requires import EXTRAS

    project = _project()
    assert {canonicalize_name(Requirement(r).name) for r in project["dependencies"]} == {"jax", "numpy"}
    extras = {name: [Requirement(r) for r in reqs] for name, reqs in project["optional-dependencies"].items()}
    assert [str(r) for r in extras["all"]] == ["fipo_jax[tensorboard,train]"]
    assert any(r.name == "fipo_jax" and r.extras == {"models"} for r in extras["train"])
    models = {canonicalize_name(r.name) for r in extras["models"]}
    assert {"flax", "transformers", "tokenizers", "safetensors", "huggingface-hub", "ml-dtypes", "gguf"} <= models
    train = {canonicalize_name(r.name) for r in extras["train"]}
    imported = {"orbax.checkpoint": "orbax-checkpoint", "math_verify": "math-verify"}
    for module in EXTRAS["train"]:  # every module the 'train' guard checks comes with the extra
        assert canonicalize_name(imported.get(module, module)) in train | models, module


def test_the_models_extra_brings_every_module_its_guard_checks_jinja2_among_them():
    """Chat templates (`apply_chat_template`) need jinja2, which transformers lists only as an optional
    extra: torch pulled it into the test environment and nothing into the runtime one, so every
    `data.task=file` run failed with `No module named 'jinja2'` (issue 31). The models guard checks it,
    the models extra declares it and requirements.txt pins it."""
    from fipo_jax._requires import EXTRAS

    assert "jinja2" in EXTRAS["models"]
    models = {canonicalize_name(Requirement(r).name) for r in _project()["optional-dependencies"]["models"]}
    for module in EXTRAS["models"]:  # import names: canonicalize_name maps huggingface_hub → huggingface-hub
        assert canonicalize_name(module) in models, module
    assert _pins("requirements.txt")["jinja2"] == "3.1.6"
