"""Training on a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 fake CPU devices gives the same
step as one device, padded or packed. Runs in a subprocess: the device count is fixed when JAX starts."""

import pytest

from tests.multi_device import run_json

SCRIPT = r"""
import json, sys
import jax
from fipo_jax.config import apply_overrides, cpu_default
from fipo_jax.train.trainer import Trainer
from tests.test_trainer import TINY
assert jax.device_count() == 8, jax.devices()
out = {}
for shape, packing in (("[1]", "false"), ("[2,2,2]", "false"), ("[2,2,2]", "true")):
    cfg = apply_overrides(cpu_default(), TINY + ["sft.cache_dir=" + sys.argv[1], "mesh_shape=" + shape,
                                                 "model.num_heads=4", "model.num_kv_heads=2", "algo.packing=" + packing])
    trainer = Trainer(cfg, sys.argv[1] + "/run" + shape.replace(",", "x") + packing, progress=False, log=lambda s: None)
    metrics = trainer.step()
    specs = {str(v.sharding.spec) for v in jax.tree.leaves(trainer.state.params) if hasattr(v, "sharding")}
    out[shape + packing] = {"metrics": {k: v for k, v in metrics.items() if not k.startswith(("time/", "batch/padding"))},
                            "specs": sorted(specs)}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_eight_device_mesh_matches_one_device(tmp_path):
    out = run_json(SCRIPT, str(tmp_path))
    one = out["[1]false"]
    assert not any("fsdp" in s or "tensor" in s for s in one["specs"])
    for eight in (out["[2,2,2]false"], out["[2,2,2]true"]):  # padded, and packed (rows a multiple of data = 2)
        assert any("fsdp" in s or "tensor" in s for s in eight["specs"]), eight["specs"]  # really sharded
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
from fipo_jax.models import Qwen2Config, CausalLM
from fipo_jax.parallel.sharding import param_shardings
from fipo_jax.generation.sampling import SamplingConfig
from fipo_jax.generation.static_sampler import generate
from fipo_jax.parallel.sharding import make_mesh
mesh = make_mesh((4, 2))
model = CausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
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
# Per-device KV cache inside the compiled sampler: [8/4 rows, 2 layers, 2 kv heads, 8 + 12 - 1 slots, 8].
from fipo_jax.generation.static_sampler import _generate_jit
graphdef, state = nnx.split(model)
rows = NamedSharding(mesh, PartitionSpec("data"))
ids = jax.device_put(np.ones((8, 8), np.int32), rows)
hlo = _generate_jit.lower(graphdef, state, ids, jax.device_put(np.ones((8, 8), bool), rows), jax.random.key(0),
                          config, rows).compile().as_text()
out["cache_split"] = "f32[2,2,2,19,8]" in hlo and "f32[8,2,2,19,8]" not in hlo
print(json.dumps(out))
"""


@pytest.mark.slow
def test_sampler_splits_rows_over_the_data_axis(tmp_path):
    out = run_json(SAMPLER_SCRIPT)
    assert out["8"]["spec"] == "data"
    assert out["cache_split"]  # each device holds only its rows' KV cache
    assert out["6"]["shape"] == [6, 12]
    for rows in ("8", "6"):
        assert out[rows]["same_tokens"], out
        assert out[rows]["log_prob_diff"] < 1e-5, out


ENGINE_SCRIPT = r"""
import json
import jax, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from fipo_jax.generation import engine as engine_lib
from fipo_jax.models import Qwen2Config, CausalLM
from fipo_jax.generation.sampling import SamplingConfig
from fipo_jax.generation.static_sampler import generate
from fipo_jax.parallel.sharding import make_mesh
mesh = make_mesh((4, 2))
model = CausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                     decode_block_size=4), rngs=nnx.Rngs(0))
config = SamplingConfig(max_new_tokens=12, temperature=1.0, eos_token_ids=(3,), prompt_length_buckets=(8,))
rng = np.random.default_rng(0)
ids = np.repeat(rng.integers(4, 64, size=(5, 6)).astype(np.int32), 2, axis=0)
mask = np.ones_like(ids, bool)
mask[:4, :3] = False
budgets = rng.integers(1, 13, size=len(ids))
rows = NamedSharding(mesh, PartitionSpec("data"))
static = jax.device_get(generate(model, ids, mask, jax.random.key(1), config))
split, stats = engine_lib.generate_with_stats(model, ids, mask, jax.random.key(1), config, engine_lib.EngineConfig(num_slots=4),
                                              max_new_tokens=budgets, row_sharding=rows)
same = all(np.array_equal(split.tokens[r, :n], static.tokens[r, :n]) for r, n in enumerate(split.lengths))
lengths = np.minimum(static.lengths, budgets)
try:
    engine_lib.generate(model, ids, mask, jax.random.key(1), config, engine_lib.EngineConfig(num_slots=6),
                        row_sharding=rows)
    indivisible = "no error"
except ValueError as error:
    indivisible = str(error)
# Per-device KV cache inside the compiled engine call: [4/4 slots, 1, 2 layers, 2 kv heads, 8 + 12 - 1, 8].
graphdef, state = nnx.split(model)
hlo = engine_lib._advance_jit.lower(
    graphdef, state, engine_lib._init_slots_jit(model.config, 4, 19, (1, 1), None),
    engine_lib._init_prefixes_jit(model.config, 8, 8, None),
    engine_lib.Refill(*(np.zeros(s, np.int32) for s in (4, 4, 4, (4, 1, 1))), np.zeros((4, 1, 1), bool)),
    jax.random.key(0), np.int32(0), config, 16, rows).compile().as_text()
# With a tensor axis the slots' and the prefix store's kv heads are split too: [4/2 slots, 1, 2, 2/2 kv heads, 19, 8].
tensor_rows = NamedSharding(make_mesh((2, 2, 2)), PartitionSpec("data"))
tensor_split = engine_lib.generate(model, ids, mask, jax.random.key(1), config,
                                   engine_lib.EngineConfig(num_slots=4), max_new_tokens=budgets,
                                   row_sharding=tensor_rows)
same_tensor = all(np.array_equal(tensor_split.tokens[r, :n], static.tokens[r, :n])
                  for r, n in enumerate(tensor_split.lengths))
tensor_hlo = engine_lib._advance_jit.lower(
    graphdef, state, engine_lib._init_slots_jit(model.config, 4, 19, (1, 1), None),
    engine_lib._init_prefixes_jit(model.config, 8, 8, None),
    engine_lib.Refill(*(np.zeros(s, np.int32) for s in (4, 4, 4, (4, 1, 1))), np.zeros((4, 1, 1), bool)),
    jax.random.key(0), np.int32(0), config, 16, tensor_rows).compile().as_text()
print(json.dumps({"same_tokens": same, "same_lengths": bool(np.array_equal(split.lengths, lengths)),
                  "indivisible": indivisible, "cache_split": "f32[1,2,2,19,8]" in hlo and "f32[4,2,2,19,8]" not in hlo,
                  "same_tokens_tensor": same_tensor,
                  "cache_split_tensor": "f32[2,2,1,19,8]" in tensor_hlo and "f32[2,2,2,19,8]" not in tensor_hlo}))
"""


@pytest.mark.slow
def test_engine_splits_slots_over_the_data_axis():
    out = run_json(ENGINE_SCRIPT)
    assert out["same_tokens"] and out["same_lengths"], out
    assert "num_slots=6 must be a multiple of the 4 devices" in out["indivisible"], out
    assert out["cache_split"], out  # each device holds only its slots' KV cache
    assert out["same_tokens_tensor"], out  # a (2, 2, 2) mesh: the same tokens
    assert out["cache_split_tensor"], out  # ... and each device holds only its kv heads of its slots


# ------------------------------------------------------------------ the rules table, in process
# An AbstractMesh has axis sizes but no devices: shardings of any mesh shape can be derived (and
# checked) with the one CPU device of the test process.


def _abstract_mesh(shape):
    from jax.sharding import AbstractMesh

    from fipo_jax.parallel.sharding import MESH_AXES

    return AbstractMesh(tuple(shape), MESH_AXES[: len(shape)])


def _param_specs(config, mesh, rules=None):
    from flax import nnx

    from fipo_jax.models import CausalLM
    from fipo_jax.parallel.sharding import param_shardings

    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    shardings = param_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
    return {".".join(map(str, path)): tuple(v.get_value().spec) for path, v in nnx.to_flat_state(shardings)}


def _gemma3_270m():
    from fipo_jax.models import ModelConfig

    return ModelConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=256, model_type="gemma3_text",
                       qkv_bias=False, qk_norm=True, norm_unit_offset=True, sandwich_norms=True,
                       hidden_activation="gelu_pytorch_tanh", scale_embeddings=True, tie_word_embeddings=True)


def test_rules_table_covers_every_logical_axis_and_names_only_mesh_axes():
    import pytest

    from fipo_jax.models import KV_CACHE_AXES, LOGICAL_AXES
    from fipo_jax.parallel.sharding import DEFAULT_RULES, MESH_AXES, AxisRule

    assert set(LOGICAL_AXES) | set(KV_CACHE_AXES) | {"batch", "length", "mini_batch", "micro_batch"} \
        <= set(DEFAULT_RULES)
    assert all(isinstance(r, AxisRule) and set(r.mesh_axes) <= set(MESH_AXES) for r in DEFAULT_RULES.values())
    assert {k for k, r in DEFAULT_RULES.items() if r.if_indivisible == "replicate"} == {"kv_heads"}
    assert DEFAULT_RULES["batch"].mesh_axes == ("data",) and DEFAULT_RULES["length"].mesh_axes == ()
    with pytest.raises(TypeError):
        DEFAULT_RULES["batch"] = AxisRule()  # the one table is read-only; pass rules= to deviate


def test_models_shard_on_the_trainer_meshes_and_gemma3_270m():
    import pytest

    from fipo_jax.data import CharTokenizer
    from fipo_jax.models import KV_CACHE_AXES, Qwen2Config
    from fipo_jax.parallel.sharding import DEFAULT_RULES, ShardingRuleError, logical_to_mesh_spec, rule

    vocab = CharTokenizer().vocab_size  # the trainer's tiny model: vocab 20 on a 2-way tensor axis
    tiny = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)
    one = _param_specs(tiny, _abstract_mesh((1,)))
    assert all(set(spec) <= {None} for spec in one.values()), one  # no fsdp / tensor axis: all whole
    eight = _param_specs(tiny, _abstract_mesh((2, 2, 2)))
    assert eight["embed_tokens.embedding"] == ("tensor", "fsdp")
    assert eight["lm_head.kernel"] == ("fsdp", "tensor")
    # Decoder layers are stacked on a leading "layers" axis, which is never split.
    assert eight["layers.self_attn.q_proj.kernel"] == (None, "fsdp", "tensor", None)
    assert eight["layers.self_attn.k_proj.kernel"] == (None, "fsdp", "tensor", None)  # 2 kv heads split 2 ways
    assert eight["layers.self_attn.o_proj.kernel"] == (None, "tensor", None, "fsdp")
    assert eight["layers.mlp.down_proj.kernel"] == (None, "tensor", "fsdp")
    assert eight["layers.attn_norm.weight"] == (None, None)
    assert tuple(logical_to_mesh_spec(KV_CACHE_AXES, (8, 1, 2, 19, 8), _abstract_mesh((2, 2, 2)))) \
        == ("data", None, "tensor", None, None)
    assert _param_specs(tiny, _abstract_mesh((1, 2, 4)))["layers.self_attn.k_proj.kernel"] \
        == (None, "fsdp", None, None)  # 2 kv heads on 4-way tensor: the declared fallback
    with pytest.raises(ShardingRuleError, match=r"logical axis 'layers' is never split"):
        _param_specs(tiny, _abstract_mesh((2, 2, 2)), {**DEFAULT_RULES, "layers": rule("fsdp")})
    with pytest.raises(ShardingRuleError, match=r"cannot shard embed_tokens\.embedding of shape \(20, 32\) .* on mesh "
                                                r"\{'data': 1, 'fsdp': 1, 'tensor': 8\}: dimension 'vocab' of size 20"):
        _param_specs(Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=8, num_key_value_heads=8), _abstract_mesh((1, 1, 8)))

    gemma = _gemma3_270m()
    for shape in ((2, 2, 2), (1, 2, 4), (4, 4)):
        specs = _param_specs(gemma, _abstract_mesh(shape))
        tensor = "tensor" if len(shape) == 3 else None
        assert specs["embed_tokens.embedding"] == (tensor, "fsdp"), shape
        assert specs["layers.self_attn.q_proj.kernel"] == (None, "fsdp", tensor, None), shape
        assert specs["layers.self_attn.k_proj.kernel"] == (None, "fsdp", None, None), shape  # 1 kv head: whole
        assert specs["layers.self_attn.q_norm.weight"] == (None, None), shape
        assert specs["layers.mlp.gate_proj.kernel"] == (None, "fsdp", tensor), shape
        assert tuple(logical_to_mesh_spec(KV_CACHE_AXES, (8, 18, 1, 64, 256), _abstract_mesh(shape))) \
            == ("data", None, None, None, None), shape
    with pytest.raises(ShardingRuleError, match=r"cannot shard layers\.self_attn\.\w_proj\.kernel of shape "
                                                r"\(.*\) with logical axes \(.*'heads'.*\) on mesh "
                                                r"\{'data': 1, 'fsdp': 1, 'tensor': 8\}: dimension 'heads' of size 4"):
        _param_specs(gemma, _abstract_mesh((1, 1, 8)))  # 4 query heads do not split 8 ways


def test_batch_sharding_and_shard_batch_follow_the_table():
    import numpy as np
    import pytest
    from jax.sharding import AbstractMesh

    from fipo_jax.parallel.sharding import ShardingRuleError, batch_sharding, make_mesh, rule, shard_batch

    mesh = make_mesh((1,))
    assert tuple(batch_sharding(mesh).spec) == ("data",)
    placed = shard_batch({"ids": np.zeros((6, 5), np.int32), "scores": np.zeros(6)}, mesh)
    assert tuple(placed["ids"].sharding.spec) == ("data", None) and tuple(placed["scores"].sharding.spec) == ("data",)
    assert tuple(batch_sharding(_abstract_mesh((4, 2))).spec) == ("data",)
    assert tuple(batch_sharding(AbstractMesh((2,), ("tensor",))).spec) == (None,)  # no data axis: whole
    custom = {"batch": rule("data", "fsdp")}
    assert tuple(batch_sharding(_abstract_mesh((2, 2, 2)), custom).spec) == (("data", "fsdp"),)
    with pytest.raises(ShardingRuleError, match="no rule for logical axis 'batch'"):
        batch_sharding(mesh, {"embed": rule("fsdp")})
    with pytest.raises(ShardingRuleError, match=r"cannot shard batch field 'ids' of shape \(6, 5\) with logical axes "
                                                r"\('batch', None\) on mesh \{'data': 4\}: dimension 'batch' of size 6 "
                                                r"is not divisible by mesh axes \('data',\) of total size 4"):
        shard_batch({"ids": np.zeros((6, 5), np.int32)}, AbstractMesh((4,), ("data",)))
