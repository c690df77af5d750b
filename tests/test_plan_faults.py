"""The memory planner's faults of issue 31: its cost grew with depth (98 s at 10⁴ layers, no answer at
10⁶), the SFT warm start was not planned (`data.n_terms=100000`: 18.5 GiB planned, 122 TB asked),
a long prompt's prefill was not planned (a raw out-of-memory in the sampler), and FIPO that cannot
act was not named by ``python -m fipo_jax.train.plan``."""

import json

import pytest

from fipo_jax.train import plan as plan_lib
from fipo_jax.config import ConfigError, apply_overrides, cpu_default, load_config
from fipo_jax.train.preflight import check_planned_memory
from tests.multi_device import run_json
from tests.plan_family import draw_cases

GiB = 2**30
# Per-layer pieces: affine in the depth L. Depth-free pieces: the same at every depth.
PER_LAYER = ("parameters", "optimizer", "gradients", "kv_cache", "prefix_store", "activations",
             "activations_other_remat")
DEPTH_FREE = ("batch", "backward_working_set", "logprob_chunks", "embedding_gradient")


def _scratch(layers: int, *overrides: str):
    return apply_overrides(cpu_default(), [f"model.num_layers={layers}", *overrides])


# -- 1. the cost of planning does not grow with depth ------------------------------------------


@pytest.fixture
def one_layer_builds_only(monkeypatch):
    """The abstract model may be built with one decoder layer only (a deeper build is the per-layer
    path whose cost grew with depth); returns the depths it was built with."""
    built = []
    real = plan_lib.CausalLM

    def guarded(config, *, rngs):
        built.append(config.num_hidden_layers)
        assert config.num_hidden_layers == 1, f"the planner built all {config.num_hidden_layers} layers"
        return real(config, rngs=rngs)

    monkeypatch.setattr(plan_lib, "CausalLM", guarded)
    return built


def test_a_million_layers_are_planned_from_one_layer(one_layer_builds_only):
    widths = ["model.hidden_size=96", "model.intermediate_size=160"]  # an architecture no other test plans
    deep, one, two = (plan_lib.plan(_scratch(layers, *widths), (1,)) for layers in (10**6, 1, 2))
    assert one_layer_builds_only == [1]  # built once, cached for every depth
    for piece in PER_LAYER:
        step = getattr(two, piece) - getattr(one, piece)
        expected = getattr(one, piece) + (10**6 - 1) * step  # the modelled pieces round down: a byte a layer
        assert getattr(deep, piece) == pytest.approx(expected, rel=1e-9, abs=10**6), piece


@pytest.mark.parametrize("layers", [3, 7, 64])
def test_a_deep_plan_is_the_shallow_plan_scaled(one_layer_builds_only, layers):
    """Every per-layer piece is affine in L (exactly, up to the modelled ones' rounding down to a
    byte, a byte a layer); the rest does not depend on L."""
    fields = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, remat="dots")
    config = load_config("qwen2.5-7b-fipo")

    def planned(depth):
        return plan_lib.plan(config, (2, 2, 2), model=plan_lib.ModelConfig(num_hidden_layers=depth, **fields))

    one, two, deep = planned(1), planned(2), planned(layers)
    for piece in PER_LAYER:
        expected = getattr(one, piece) + (layers - 1) * (getattr(two, piece) - getattr(one, piece))
        assert getattr(deep, piece) == pytest.approx(expected, rel=1e-9, abs=layers), piece
    for piece in DEPTH_FREE:
        assert getattr(deep, piece) == getattr(one, piece), piece


def test_one_layer_shapes_equal_the_whole_models():
    """The stacked shapes set from one layer are the full abstract build's, sliding layers and all."""
    for case in draw_cases(12, seed=2027):  # the layouts tests/test_plan.py compiles
        fields = dict(case["model"])
        if fields.get("layer_types") is not None:
            fields["layer_types"] = tuple(fields["layer_types"])
        model = plan_lib.ModelConfig(**fields)
        assert plan_lib._parameter_shapes(model) == plan_lib._abstract_parameter_shapes(model), case["name"]


# -- 2. the SFT warm start is a phase of the plan ---------------------------------------------


def test_the_warm_start_is_planned_when_the_run_has_one():
    from fipo_jax.data import ChainTask

    config = cpu_default()
    result = plan_lib.plan(config, (1,))
    warm = result.warm_start
    task = ChainTask(n_terms=config.data.n_terms, ops=config.data.ops)
    assert (warm.rows, warm.row_tokens) == (config.sft.batch_size, task.prompt_tokens() + task.max_response_tokens())
    assert (warm.optimizer, warm.gradients, warm.new_state) == (2 * warm.parameters, warm.parameters,
                                                                3 * warm.parameters)
    assert result.peak == max(result.update_peak, result.sampling_peak, warm.peak)
    assert "warm-start peak" in result.table()
    assert plan_lib.plan(apply_overrides(config, ["sft.enabled=false"]), (1,)).warm_start is None
    assert plan_lib.plan(load_config("gemma3-270m-fipo"), (1,)).warm_start is None  # no SFT on a checkpoint


def test_the_warm_start_runs_whole_on_one_device_whatever_the_mesh():
    config = apply_overrides(cpu_default(), ["mesh_shape=[2,2,2]", "algo.micro_batch_size=8"])
    sharded, single = plan_lib.plan(config, (2, 2, 2)), plan_lib.plan(cpu_default(), (1,))
    assert sharded.warm_start == single.warm_start
    assert sharded.parameters < single.parameters == sharded.warm_start.parameters
    devices = 8
    assert sharded.shared_memory_need(devices) == max(max(sharded.update_peak, sharded.sampling_peak) * devices,
                                                      sharded.warm_start.peak)


def test_a_chain_too_long_for_the_warm_start_is_refused_before_anything_is_built():
    """data.n_terms=100000: the update and sampler were planned at 18.5 GiB, the warm start's
    [64, 800001] demonstrations asked for 122 TB."""
    config = apply_overrides(cpu_default(), ["data.n_terms=100000"])
    with pytest.raises(ConfigError, match=r"the memory planner puts this run's peak at [\d,.]+ [PT]iB"):
        check_planned_memory(config, 64 * GiB)
    result = plan_lib.plan(config, (1,))
    assert result.warm_start.row_tokens == 800_001
    assert result.update_peak < 64 * GiB < result.warm_start.peak == result.peak


def test_a_smaller_sft_batch_is_suggested_and_fits(capsys):
    config = apply_overrides(cpu_default(), ["sft.batch_size=2048"])
    result = plan_lib.plan(config, (1,), "4GiB")
    assert not result.fits and result.warm_start.peak == result.peak
    lines = [line for line in plan_lib.suggestions(config, (1,), "4GiB") if line.startswith("sft.batch_size=")]
    assert lines
    setting = lines[0].split(":")[0]
    assert plan_lib.plan(apply_overrides(config, [setting]), (1,), "4GiB").fits


# -- 3. the sampler's prefill at the widest prompt --------------------------------------------


def test_a_prompt_too_long_for_the_prefill_is_refused_before_the_sampler():
    """A 16k-token prompt width on a 64 GiB host: the update (one-row micro-batches) and the decode
    fit; the prefill's scores, 8 prompts × 4 heads × 16k² floats a layer step, do not."""
    config = apply_overrides(load_config("gemma3-270m-fipo"), ["data.max_prompt_tokens=16384",
                                                               "algo.micro_batch_size=1"])
    with pytest.raises(ConfigError, match=r"the memory planner puts this run's peak at [\d,.]+ GiB of host memory"):
        check_planned_memory(config, 64 * GiB)
    check_planned_memory(apply_overrides(config, ["data.max_prompt_tokens=2048"]), 64 * GiB)
    result = plan_lib.plan(config, (1,))
    assert max(result.update_peak, result.optimizer + result.sampler_program) < 64 * GiB
    assert result.prefill_program > result.sampler_program and result.peak == result.sampling_peak


def test_the_prefill_grows_with_the_prompt_squared_unless_queries_are_chunked():
    def prefill(*overrides):
        return plan_lib.plan(apply_overrides(load_config("gemma3-270m-fipo"), list(overrides)),
                             (1,)).prefill_temporaries

    assert prefill("data.max_prompt_tokens=16384") > 3.5 * prefill("data.max_prompt_tokens=8192")
    chunked = prefill("data.max_prompt_tokens=16384", "model.attention_chunk_size=512")
    assert chunked < prefill("data.max_prompt_tokens=16384") / 8


# -- 4. FIPO that cannot act says so --------------------------------------------------------


def test_the_plan_warns_when_fipo_cannot_act(capsys, tmp_path):
    assert plan_lib.main(["--config", "cpu_default", "--mesh", "1", "--set", "algo.mini_batches=1"]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[warning]")]
    assert len(warnings) == 1 and "algo.mini_batches=1 with loss_mode='fipo'" in warnings[0]
    path = tmp_path / "one_mini_batch.json"
    path.write_text(json.dumps(apply_overrides(cpu_default(), ["algo.mini_batches=1"]).to_dict()))
    assert plan_lib.main(["--config", str(path), "--mesh", "1"]) == 0
    assert "[warning] algo.mini_batches=1" in capsys.readouterr().out
    for quiet in (["--set"], ["--set", "algo.mini_batches=1", "algo.loss.loss_mode=dapo"]):
        assert plan_lib.main(["--config", "cpu_default", "--mesh", "1", *quiet]) == 0
        assert "[warning]" not in capsys.readouterr().out


# -- calibration against XLA (slow: compiles) ------------------------------------------------

# The SFT step as `fipo_jax.train.sft.train_sft` jits it, compiled for each config's warm start; prints
# [[planned, compiled peak], ...].
SFT_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, optax
from flax import nnx
from fipo_jax.train import plan as plan_lib
from fipo_jax.train import shapes
from fipo_jax.config import apply_overrides, cpu_default
from fipo_jax.train.sft import sft_step
from fipo_jax.models import CausalLM
from tests.plan_family import compiled_peak

S = jax.ShapeDtypeStruct
out = []
for overrides in json.loads(sys.argv[1]):
    config = apply_overrides(cpu_default(), overrides)
    model = nnx.eval_shape(lambda: CausalLM(shapes.model_config(config), rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01))
    step = sft_step(graphdef, rest, tx)
    B, T = config.sft.batch_size, plan_lib.warm_start_length(config)
    compiled = step.lower(params, jax.eval_shape(tx.init, params), S((B, T), jnp.int32), S((B, T), bool),
                          S((B, T - 1), bool)).compile().memory_analysis()
    sizes = {k: int(getattr(compiled, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                    "alias_size_in_bytes", "temp_size_in_bytes")}
    out.append([plan_lib.plan(config, (1,)).warm_start.peak, compiled_peak(sizes)])
print(json.dumps(out))
"""
SFT_CASES = [["sft.batch_size=8"], ["model.remat=full", "sft.batch_size=32"], ["model.remat=dots", "sft.batch_size=16"],
             ["model.dtype=bfloat16", "model.compute_dtype=bfloat16", "sft.batch_size=16"]]


@pytest.mark.slow
def test_the_planned_warm_start_never_under_counts_xla():
    for overrides, (planned, compiled) in zip(SFT_CASES, run_json(SFT_SCRIPT, json.dumps(SFT_CASES), devices=1)):
        assert 0.95 <= planned / compiled <= 1.45, (overrides, planned / compiled)


# The sampler's prefill as the engine (`engine._prefill_jit`, its prefix store of 8 rows) and the
# static sampler (`static_sampler._generate_jit`, prefill and decode in one program) compile it; prints
# [[planned, compiled peak], ...] (planned: the prefill's program on one device).
PREFILL_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp
from flax import nnx
from fipo_jax.generation import engine
from fipo_jax.train import plan as plan_lib
from fipo_jax.models import CausalLM, ModelConfig
from fipo_jax.generation.sampling import SamplingConfig
from fipo_jax.generation.static_sampler import _generate_jit
from fipo_jax.parallel.sharding import make_mesh, replicated
from jax.sharding import AbstractMesh
from tests.plan_family import compiled_peak

S = jax.ShapeDtypeStruct
FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
mesh = make_mesh((1,))
out = []
for case in json.loads(sys.argv[1]):
    config = ModelConfig(**case["model"])
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0))))
    rows, width, new = case["rows"], case["width"], case["new"]
    ids, mask = S((rows, width), jnp.int32), S((rows, width), bool)
    engine_rows = engine.EngineConfig().prefill_batch if case["engine"] else 0
    if case["engine"]:
        prefixes = jax.eval_shape(lambda: engine.init_prefixes(config, engine_rows, width))
        lowered = engine._prefill_jit.lower(graphdef, state, prefixes, ids, mask, S((rows,), jnp.int32), None,
                                            replicated(mesh))
    else:
        sampling = SamplingConfig(max_new_tokens=new, eos_token_ids=(1,), pad_token_id=0, prompt_length_buckets=None)
        lowered = _generate_jit.lower(graphdef, state, ids, mask, jax.eval_shape(lambda: jax.random.key(0)),
                                      sampling, None)
    memory = lowered.compile().memory_analysis()
    abstract = AbstractMesh((1,), plan_lib.MESH_AXES[:1])
    cache, prefixes, _ = plan_lib.sampler_bytes(config, abstract, rows, width, new, engine_rows)
    planned = (plan_lib.parameter_bytes(config, abstract) + (prefixes if case["engine"] else cache)
               + plan_lib.prefill_bytes(config, abstract, rows, width, new, engine_rows))
    out.append([planned, compiled_peak({k: int(getattr(memory, k)) for k in FIELDS})])
print(json.dumps(out))
"""
_SMALL = dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
PREFILL_CASES = [
    dict(engine=True, rows=8, width=1024, new=64, model=_SMALL),
    dict(engine=True, rows=8, width=1024, new=64, model=dict(_SMALL, attention_chunk_size=128)),
    dict(engine=True, rows=8, width=1024, new=64, model=dict(_SMALL, num_attention_heads=8, dtype="bfloat16",
                                                             compute_dtype="bfloat16")),
    dict(engine=False, rows=4, width=1024, new=256, model=_SMALL),
    dict(engine=False, rows=16, width=128, new=32, model=dict(_SMALL, hidden_size=512, intermediate_size=2048)),
]


@pytest.mark.slow
def test_the_planned_prefill_never_under_counts_xla():
    results = run_json(PREFILL_SCRIPT, json.dumps(PREFILL_CASES), devices=1)
    for case, (planned, compiled) in zip(PREFILL_CASES, results):
        assert 0.95 <= planned / compiled <= 1.45, (case, planned / compiled)
