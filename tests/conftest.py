"""Test-wide settings: offline Hugging Face, a session-local XLA compilation cache, strict JAX rank
promotion, bounded hypothesis."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A persistent compilation cache in a fresh folder for this session only (removed at exit). The
# trainer tests, their `fipo-train` subprocesses and the notebook kernels compile the same
# tiny programs over and over (a tiny run is ~60 % XLA compile); a hit loads the executable XLA
# built earlier in the session instead of building it again: the same code, the same results.
# Set through the environment, so subprocesses and notebook kernels share it. Only compiles that
# took >= 0.2 s are stored, which keeps the writes a small fraction of what they save.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="fipo_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Implicit rank promotion hides shape bugs ([B] + [B, T]); make it an error in tests.
jax.config.update("jax_numpy_rank_promotion", "raise")
# Also here, in case a plugin imported jax before this file set the environment (the cache is set up
# at the first compile).
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def golden_dir():
    """The official release's golden cases (tests/golden; $FIPO_GOLDEN_DIR points elsewhere)."""
    return os.environ.get("FIPO_GOLDEN_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
