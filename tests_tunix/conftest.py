"""Tests run in Tunix's own environment (.venv-tunix/, `bash scripts/setup_tunix_env.sh`):
`.venv-tunix/bin/python -m pytest -q tests_tunix`. Tunix's small models with random weights on the
CPU, Tunix's mock tokenizer; no downloads."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402



def pytest_configure(config):
    # Tunix 0.1.7 on jax 0.11.2 / flax 0.12.12 warns about its own use of deprecated jax / flax APIs
    # (~200 lines a run); fipo_jax's own deprecations are checked by the main suite.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning")


if importlib.util.find_spec("tunix") is None:
    # Not Tunix's environment (e.g. the main .venv/): collect nothing here. `tests/test_tunix_env.py`
    # builds .venv-tunix/ and runs this folder with its python.
    collect_ignore_glob = ["*.py"]
else:
    with warnings.catch_warnings():  # Tunix's qwen2 module imports jax.experimental.shard_map
        warnings.simplefilter("ignore", DeprecationWarning)
        from tests_tunix.helpers import tiny_qwen2

    @pytest.fixture(scope="session")
    def vocab():
        """Tunix's mock tokenizer (22 words; pad 0, bos 1, eos 2)."""
        from tunix.tests import test_common

        return test_common.MockVocab()

    @pytest.fixture(scope="session")
    def model(vocab):
        """Tunix's Qwen2, random weights, tiny (`helpers.tiny_qwen2`)."""
        return tiny_qwen2(vocab.GetPieceSize())
