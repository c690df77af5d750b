"""Training on a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 fake CPU devices gives the same
step as one device. Runs in a subprocess: the device count is fixed when JAX starts."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
import jax
from fipo_jax.config import apply_overrides, cpu_default
from fipo_jax.trainer import Trainer
from tests.test_trainer import TINY
assert jax.device_count() == 8, jax.devices()
out = {}
for shape in ("[1]", "[2,2,2]"):
    cfg = apply_overrides(cpu_default(), TINY + ["sft.cache_dir=" + sys.argv[1], "mesh_shape=" + shape,
                                                 "model.num_heads=4", "model.num_kv_heads=2"])
    trainer = Trainer(cfg, sys.argv[1] + "/run" + shape.replace(",", "x"), progress=False, log=lambda s: None)
    metrics = trainer.step()
    specs = {str(v.sharding.spec) for v in jax.tree.leaves(trainer.state.params) if hasattr(v, "sharding")}
    out[shape] = {"metrics": {k: v for k, v in metrics.items() if not k.startswith("time/")}, "specs": sorted(specs)}
print(json.dumps(out))
"""


def test_eight_device_mesh_matches_one_device(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, eight = out["[1]"], out["[2,2,2]"]
    assert any("fsdp" in s or "tensor" in s for s in eight["specs"]), eight["specs"]  # really sharded
    assert not any("fsdp" in s or "tensor" in s for s in one["specs"])
    mismatched = {}
    for key, value in one["metrics"].items():
        other = eight["metrics"][key]
        close = abs(value - other) <= 1e-4 * max(1.0, abs(value)) if isinstance(value, float) else value == other
        if not close:
            mismatched[key] = (value, other)
    # Counts of weights sitting exactly at a clip bound flip with 1e-7 rounding differences
    # (FutureKL is exactly 0 on the first mini-batch on one device, ±1e-7 when sharded);
    # everything else, the loss, gradient norm and rewards included, must agree.
    assert set(mismatched) <= {"actor/clip_frac_lower", "actor/total_clip_frac"}, mismatched


SAMPLER_SCRIPT = r"""
import json
import jax, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from fipo_jax.models import Qwen2Config, Qwen2ForCausalLM
from fipo_jax.models.hf_io import param_shardings
from fipo_jax.sampling import SamplingConfig, generate
from fipo_jax.sharding import make_mesh
mesh = make_mesh((4, 2))
model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                     decode_block_size=4),  # the block-wise decode path, split by rows
                         rngs=nnx.Rngs(0))
params = nnx.state(model, nnx.Param)
nnx.update(model, jax.device_put(params, param_shardings(params, mesh)))
config = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, prompt_length_buckets=(8,))
rng = np.random.default_rng(0)
out = {}
for rows in (8, 6):  # 6 rows: padded to 8 for the 4-way split, trimmed back
    ids = rng.integers(1, 64, size=(rows, 5)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[0, :2] = False
    plain = jax.device_get(generate(model, ids, mask, jax.random.key(1), config))
    split = generate(model, ids, mask, jax.random.key(1), config,
                     row_sharding=NamedSharding(mesh, PartitionSpec("data")))
    out[rows] = {"spec": split.tokens.sharding.spec[0] if rows == 8 else None,
                 "shape": list(split.tokens.shape),
                 "same_tokens": bool(np.array_equal(plain.tokens, np.asarray(split.tokens))),
                 "log_prob_diff": float(np.abs(plain.log_probs - np.asarray(split.log_probs)).max())}
# Per-device KV cache inside the compiled sampler: [8/4 rows, 2 kv heads, 8 + 12 - 1 slots, 8].
from fipo_jax.sampling import _generate_jit
graphdef, state = nnx.split(model)
rows = NamedSharding(mesh, PartitionSpec("data"))
ids = jax.device_put(np.ones((8, 8), np.int32), rows)
hlo = _generate_jit.lower(graphdef, state, ids, jax.device_put(np.ones((8, 8), bool), rows), jax.random.key(0),
                          config, rows).compile().as_text()
out["cache_split"] = "f32[2,2,19,8]" in hlo and "f32[8,2,19,8]" not in hlo
print(json.dumps(out))
"""


def test_sampler_splits_rows_over_the_data_axis(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", SAMPLER_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["8"]["spec"] == "data"
    assert out["cache_split"]  # each device holds only its rows' KV cache
    assert out["6"]["shape"] == [6, 12]
    for rows in ("8", "6"):
        assert out[rows]["same_tokens"], out
        assert out[rows]["log_prob_diff"] < 1e-5, out
