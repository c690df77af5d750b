"""FIPO as a Tunix policy loss (`fipo_jax.integrations.tunix`).

Fast, in the main environment (no Tunix here): the module imports, `register` fails in one line naming
the package, and the array-level loss it registers is `policy_loss` in Tunix's terms. Slow: builds (or
reuses) Tunix's own environment (.venv-tunix/, `scripts/setup_tunix_env.sh`: google-tunix 0.1.7 with
safetensors<0.8, which cannot share .venv/) and runs `tests_tunix/` there.
"""

import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fipo_jax
from fipo_jax.integrations import tunix as fipo_tunix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_register_without_tunix_raises_one_line_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tunix", None)  # Tunix missing, even where it is installed
    for register in (fipo_tunix.register, fipo_tunix.register_dapo, fipo_tunix.grpo_config):
        with pytest.raises(ImportError, match="pip install google-tunix") as error:
            register()
        assert "\n" not in str(error.value)
        assert error.value.__cause__ is None


def test_tunix_loss_is_policy_loss_with_tunix_sequence_counts():
    """Tunix's "seq-mean-token-sum" divides by the rows holding tokens (ours by default by all rows)."""
    rng = np.random.default_rng(0)
    lp, old = (jnp.asarray(rng.normal(-2.0, 0.5, (3, 6)), jnp.float32) for _ in range(2))
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [0] * 6, [1] * 6], bool)
    adv = jnp.asarray([1.0, -0.5, -1.0], jnp.float32)
    config = fipo_jax.PolicyLossConfig.fipo_32b()
    loss, aux = fipo_tunix.tunix_loss(lp, old, adv, mask, config, "token-mean")
    want, metrics = fipo_jax.policy_loss(lp, old, adv, mask, config)
    assert float(loss) == float(want) and float(aux["kl"]) == 0.0
    assert set(metrics) <= set(aux)
    summed, _ = fipo_tunix.tunix_loss(lp, old, adv, mask, config, "seq-mean-token-sum")
    want, _ = fipo_jax.policy_loss(lp, old, adv, mask, config.replace(aggregation="seq-mean-token-sum"),
                                   num_sequences=jnp.float32(2))
    np.testing.assert_allclose(summed, want, rtol=1e-6)
    assert jax.grad(lambda x: fipo_tunix.tunix_loss(x, old, adv, mask, config)[0])(lp).shape == lp.shape


def test_loss_config_from_tunix_attributes():
    algo = types.SimpleNamespace(epsilon=0.1, epsilon_high=0.3, epsilon_c=5.0, loss_agg_mode="sequence-mean-token-mean",
                                 beta=None, kl_loss_mode="low_var_kl", fipo_safety_threshold=3.0)
    config = fipo_tunix.loss_config_from_tunix(algo)
    assert config == fipo_jax.PolicyLossConfig.fipo_32b(
        clip_ratio_low=0.1, clip_ratio_high=0.3, clip_ratio_c=5.0, aggregation="seq-mean-token-mean",
        kl_coef=0.0, kl_estimator="k3", safety_threshold=3.0)
    assert fipo_tunix.loss_config_from_tunix(types.SimpleNamespace()) == fipo_jax.PolicyLossConfig.fipo_32b()
    with pytest.raises(ValueError, match="kl_loss_mode"):
        fipo_tunix.loss_config_from_tunix(types.SimpleNamespace(kl_loss_mode="k9"))


@pytest.mark.slow
def test_tunix_environment_runs_tests_tunix():
    """CI's Tunix check: `scripts/setup_tunix_env.sh` (1.5 min the first time, then reused while
    requirements-tunix.txt and pyproject.toml are unchanged), then `pytest tests_tunix` with its python."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "PYTHONPATH", "VIRTUAL_ENV"))}
    setup = subprocess.run(["bash", os.path.join(ROOT, "scripts", "setup_tunix_env.sh")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=1800)
    assert setup.returncode == 0, f"setup_tunix_env.sh failed:\n{setup.stdout[-3000:]}\n{setup.stderr[-6000:]}"
    venv = os.environ.get("FIPO_TUNIX_VENV") or os.path.join(ROOT, ".venv-tunix")
    run = subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests_tunix"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, f"pytest tests_tunix failed:\n{run.stdout[-8000:]}\n{run.stderr[-3000:]}"
    summary = [line for line in run.stdout.splitlines() if line.strip()][-1]
    assert " passed" in summary and "skipped" not in summary, summary
