"""Multi-host training as two real JAX processes on this machine (gloo collectives on CPU).

Two processes with 2 CPU devices each form one (data=2, fsdp=2) mesh through
`jax.distributed`; they train one step, stop, and resume for a second step from the Orbax
checkpoint both wrote. Their metrics.jsonl must equal, line for line and value for value,
one process training two steps on 4 devices with the same mesh shape.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fipo_jax.parallel import distributed
from tests.test_trainer import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["-m", "fipo_jax.train.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train_command(cache_dir, run_dir, steps):
    tiny = [item for item in TINY if not item.startswith("steps=")]  # --steps gives it (a disagreeing --set is refused)
    sets = [a for item in tiny + [f"sft.cache_dir={cache_dir}", "mesh_shape=[2,2]"] for a in ("--set", item)]
    return [sys.executable, *TRAIN, *sets, "--steps", str(steps), "--run-dir", str(run_dir), "--no-progress"]


def environment(devices: int) -> dict:
    return {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def run_two_processes(cache_dir, run_dir, steps) -> list[str]:
    port = free_port()
    procs = [subprocess.Popen(train_command(cache_dir, run_dir, steps)
                              + ["--distributed", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(2), cwd=ROOT)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    return outputs


def metric_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in f]


@pytest.mark.slow
def test_two_processes_train_and_resume_like_one(tmp_path):
    cache_dir = tmp_path / "sft"
    multi = tmp_path / "multi"
    run_two_processes(cache_dir, multi, steps=1)
    outputs = run_two_processes(cache_dir, multi, steps=2)  # resumes from step 1
    assert "[resume] restored step 1" in outputs[0]
    assert "run directory:" in outputs[0] and "run directory:" not in outputs[1]  # only process 0 reports
    assert sorted(os.listdir(multi / "checkpoints")) == ["1", "2"]

    single = tmp_path / "single"
    proc = subprocess.run(train_command(cache_dir, single, steps=2), capture_output=True, text=True,
                          env=environment(4), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    multi_rows, single_rows = metric_rows(multi), metric_rows(single)
    assert [r["step"] for r in multi_rows] == [0, 1, 2]
    # A run always evaluates at its last step, so the stop at step 1 adds eval/* there.
    assert {k for k in multi_rows[1] if k not in single_rows[1]} == {k for k in multi_rows[1] if k.startswith("eval/")}
    multi_rows[1] = {k: v for k, v in multi_rows[1].items() if not k.startswith("eval/")}
    assert multi_rows == single_rows
    assert "actor/pg_loss" in multi_rows[1] and "eval/avg@k" in multi_rows[2]


MISMATCH = r"""
import sys
from fipo_jax.parallel import distributed
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
distributed.check_same_on_all_processes({"seed": 0}, "the seed")
try:
    distributed.check_same_on_all_processes({"path": "/data/host" + sys.argv[2]}, "the prompt data")
except RuntimeError as err:
    print("REFUSED:", err)
"""


def test_processes_with_different_inputs_are_refused():
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", MISMATCH, f"localhost:{port}", str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=environment(1), cwd=ROOT) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for out in outputs:
        assert "REFUSED: the prompt data differs between processes: process 0 and process(es) [1]" in out, out[-3000:]


# --------------------------------------------------------------------------- one process


def test_single_process_helpers_are_no_ops():
    assert distributed.is_primary()
    tree = {"a": jax.numpy.arange(3), "b": 1.5, "c": np.ones(2)}
    host = distributed.to_host(tree)
    assert isinstance(host["a"], np.ndarray) and host["b"] == 1.5
    np.testing.assert_array_equal(host["a"], [0, 1, 2])
    distributed.check_same_on_all_processes({"x": 1}, "anything")
    distributed.barrier("nothing")
    assert distributed.fingerprint({"a": 1, "b": 2}) == distributed.fingerprint({"b": 2, "a": 1})


@pytest.mark.parametrize(
    "args, message",
    [(("localhost:1234", None, None), "give all of"), (("localhost:1234", 2, 2), "process_id < num_processes"),
     ((None, 2, 0), "give all of")],
)
def test_initialize_rejects_partial_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize(*args)


@pytest.mark.parametrize(
    "flags, message",
    [(["--num-processes", "2"], "need --distributed HOST:PORT"),
     (["--distributed", "nohostport"], "'auto' or HOST:PORT"),
     (["--distributed", "localhost:1", "--process-id", "0"], "needs --num-processes and --process-id"),
     (["--distributed", "auto", "--process-id", "0"], "detects")],
)
def test_cli_rejects_bad_distributed_flags(flags, message):
    proc = subprocess.run([sys.executable, *TRAIN, *flags], capture_output=True, text=True,
                          env=environment(1), cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_a_missing_process_is_named_and_the_wait_is_bounded():
    """Process 0 of 2 with no second process: it says whom it waits for, then one line and exit 2
    when the timeout passes, instead of minutes of silence and a fatal stack trace (issue 24, item 16)."""
    port = free_port()
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *TRAIN, "--distributed", f"127.0.0.1:{port}", "--num-processes", "2",
                           "--process-id", "0", "--distributed-timeout", "3", "--no-progress"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("[distributed]", "error:"))]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines[0] == f"[distributed] waiting up to 3 s for all 2 processes at coordinator 127.0.0.1:{port} (this " \
                       f"is process 0)"
    assert lines[-1].startswith("error: not every process joined within 3 s") and "--distributed-timeout" in lines[-1]
    assert time.monotonic() - start < 60
