"""Run a test script on fake CPU devices in a subprocess: the device count is fixed when JAX
starts, so multi-device tests cannot share the main test process."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json(script: str, *args: str, devices: int = 8):
    """Runs ``python -c script *args`` from the repository root with ``devices`` CPU devices and
    returns the JSON value of its last stdout line (the test fails with its stderr otherwise)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
