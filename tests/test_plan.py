"""The memory planner: exact parameter and optimizer bytes, and per-device update memory within
15 % of XLA's ``memory_analysis`` of the compiled sharded update on 8 fake CPU devices."""

import json

import pytest

from fipo_jax import plan as plan_lib
from fipo_jax.config import ConfigError, apply_overrides, cpu_default, load_config
from tests.multi_device import run_json

# (mesh, remat, attention chunk): data-parallel only, data × fsdp × tensor, and fsdp without data.
CASES = [((2, 2, 2), False, None), ((2, 2, 2), True, None), ((8,), False, None), ((8,), True, None),
         ((2, 2, 2), True, 64), ((1, 4, 2), True, None)]
OVERRIDES = ["data.max_prompt_tokens=32", "rollout.max_response_tokens=224", "rollout.n=4",
             "rollout.prompts_per_step=8", "algo.mini_batches=2", "algo.micro_batch_size=8",
             "model.logprob_chunk_size=64", "rollout.engine_slots=32"]
MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2)

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp
from flax import nnx
from fipo_jax import engine, rl_step
from fipo_jax.config import apply_overrides, cpu_default
from fipo_jax.models import CausalLM, ModelConfig
from fipo_jax.rollouts import PROMPT_BUCKET_SLACK
from fipo_jax.sampling import SamplingConfig, row_shardings, row_split
from fipo_jax.sharding import batch_sharding, make_mesh, param_shardings, replicated
from tests.test_plan import CASES, MODEL, OVERRIDES

assert jax.device_count() == 8
config = apply_overrides(cpu_default(), OVERRIDES)
M, R = config.algo.mini_batches, config.algo.micro_batch_size
K = config.rollout.prompts_per_step * config.rollout.n // (M * R)
P, N = config.data.max_prompt_tokens, config.rollout.max_response_tokens
out = []
for shape, remat, chunk in CASES:
    mesh = make_mesh(shape)
    model_config = ModelConfig(**MODEL, remat=remat, attention_chunk_size=chunk)
    model = nnx.eval_shape(lambda: CausalLM(model_config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = rl_step.make_optimizer(rl_step.warmup_schedule(1e-6, 1, M), 0.9, 0.999, 1e-8, 0.1, 1.0)
    shardings = rl_step.state_shardings(params, optimizer, mesh)
    state = rl_step.RLState(params=params, opt_state=jax.eval_shape(optimizer.tx.init, params),
                            step=jax.ShapeDtypeStruct((), jnp.int32), key=jax.eval_shape(lambda: jax.random.key(0)))
    S = jax.ShapeDtypeStruct
    batch = rl_step.RLBatch(input_ids=S((M, K, R, P + N), jnp.int32), attention_mask=S((M, K, R, P + N), bool),
                            response_mask=S((M, K, R, N), bool), scores=S((M, K, R), jnp.float32),
                            sampler_log_probs=S((M, K, R, N), jnp.float32))
    batch = jax.tree.map(lambda x, s: S(x.shape, x.dtype, sharding=s), batch, rl_step.batch_shardings(batch, mesh))
    update_config = rl_step.UpdateConfig(loss=config.algo.loss, group_size=config.rollout.n,
                                         logprob_chunk_size=config.model.logprob_chunk_size)
    update = rl_step.jit_rl_update(graphdef, rest, optimizer, update_config, shardings, replicated(mesh))
    memory = update.lower(rl_step.abstract_state(state, shardings), batch).compile().memory_analysis()
    sizes = lambda m: {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",  # noqa: E731
                                                       "alias_size_in_bytes", "temp_size_in_bytes")}
    out.append({"update": sizes(memory)})
    if remat or chunk:  # the decode call does not depend on them: compiled once per mesh (below)
        continue
    # The engine's decode call as the trainer makes it: slots split over data (kv heads over tensor).
    rows = batch_sharding(mesh)
    row_sharding, split = row_split(rows)
    slots = -(-min(config.rollout.engine_slots, config.rollout.prompts_per_round * config.rollout.n) // split) * split
    width = P + PROMPT_BUCKET_SLACK
    whole = replicated(mesh)
    graphdef, params_and_rest = nnx.split(model)
    params_and_rest = jax.tree.map(lambda x, s: S(x.shape, x.dtype, sharding=s), params_and_rest,
                                   param_shardings(params_and_rest, mesh))
    slot_state = jax.eval_shape(lambda: engine.init_slots(model.config, slots, width + N - 1, (1, 1)))
    slot_state = jax.tree.map(lambda x, s: S(x.shape, x.dtype, sharding=s), slot_state,
                              row_shardings(slot_state, row_sharding))
    prefixes = jax.eval_shape(lambda: engine.init_prefixes(model.config, engine.EngineConfig().prefill_batch, width))
    prefixes = jax.tree.map(lambda x, s: S(x.shape, x.dtype, sharding=s), prefixes, row_shardings(prefixes, whole))
    ints = lambda shape, dtype=jnp.int32: S(shape, dtype, sharding=whole)  # noqa: E731
    refill = engine.Refill(ints((slots,)), ints((slots,)), ints((slots,)), ints((slots, 1, 1)), ints((slots, 1, 1), bool))
    sampling = SamplingConfig(max_new_tokens=N, eos_token_ids=(1,), pad_token_id=0)
    decode = engine._advance_jit.lower(graphdef, params_and_rest, slot_state, prefixes, refill,
                                       jax.eval_shape(lambda: jax.random.key(0)), ints(()), sampling,
                                       config.rollout.engine_steps_per_sync, row_sharding).compile()
    out[-1]["sampler"] = sizes(decode.memory_analysis())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    return run_json(SCRIPT)


def peak(sizes: dict) -> int:
    """XLA's per-device peak of a compiled call: arguments + temporaries + outputs not aliased to
    (donated) arguments."""
    return (sizes["argument_size_in_bytes"] + sizes["temp_size_in_bytes"] + sizes["output_size_in_bytes"]
            - sizes["alias_size_in_bytes"])


@pytest.mark.parametrize("case", [0, 2])  # remat does not change the sampler
def test_sampler_memory_within_15_percent_of_xla(compiled, case):
    shape, _, _ = CASES[case]
    result = plan_lib.plan(apply_overrides(cpu_default(), OVERRIDES), shape, model=plan_lib.ModelConfig(**MODEL))
    xla = compiled[case]["sampler"]
    assert xla["alias_size_in_bytes"] >= result.kv_cache  # the slots' cache is donated, not copied
    assert abs(result.sampler_program / peak(xla) - 1) <= 0.15, (result.sampler_program, peak(xla), result.table())
    if shape == (2, 2, 2):  # the cache model is really exercised (data-only: parameters dominate)
        assert result.kv_cache > 0.25 * result.sampler_program, result.table()


@pytest.mark.parametrize("case", range(len(CASES)))
def test_update_memory_within_15_percent_of_xla(compiled, case):
    shape, remat, chunk = CASES[case]
    xla = compiled[case]["update"]
    model = plan_lib.ModelConfig(**MODEL, remat=remat, attention_chunk_size=chunk)
    result = plan_lib.plan(apply_overrides(cpu_default(), OVERRIDES), shape, model=model)
    # Parameters and AdamW moments are exact: they are the update's arguments, with the batch
    # (ids int32, masks bool, scores and sampler log-probs float32: 13 bytes per response token).
    rows = 8 * 4 // shape[0]
    batch_inputs = rows * (32 + 224) * 5 + rows * 224 * 5 + rows * 4
    state = xla["argument_size_in_bytes"] - batch_inputs
    assert abs(state - (result.parameters + result.optimizer)) <= 64, (state, result)  # + step, key, counts
    assert abs(result.update_peak / peak(xla) - 1) <= 0.15, (result.update_peak, peak(xla), result.table())
    if shape == (2, 2, 2):  # the activation model is really exercised (data-only: parameters dominate)
        assert result.activations > 0.3 * result.update_peak, result.table()


def test_remat_and_mesh_change_what_they_should():
    config = apply_overrides(cpu_default(), OVERRIDES)
    plain = plan_lib.plan(config, (2, 2, 2), model=plan_lib.ModelConfig(**MODEL))
    remat = plan_lib.plan(config, (2, 2, 2), model=plan_lib.ModelConfig(**MODEL, remat=True))
    assert remat.activations < plain.activations == remat.activations_other_remat
    data_only = plan_lib.plan(config, (8,), model=plan_lib.ModelConfig(**MODEL))
    assert 3.9 < data_only.parameters / plain.parameters <= 4  # fsdp × tensor split all but the norms


def test_cli_verdict_and_suggestions(capsys):
    assert plan_lib.main(["--config", "qwen2.5-32b-fipo", "--mesh", "2,16,4", "--device-memory", "80GiB"]) == 1
    out = capsys.readouterr().out
    assert "L=64 D=5120 F=27648 H=40/8 V=152064" in out and "does NOT fit in 80.00 GiB" in out
    assert "would fit with mesh" in out
    assert plan_lib.main(["--config", "qwen2.5-7b-fipo", "--mesh", "4,4,4", "--device-memory", "80GiB"]) == 0
    assert "fits in 80.00 GiB" in capsys.readouterr().out
    assert plan_lib.main(["--config", "qwen2.5-7b-fipo", "--mesh", "4,4,4"]) == 0  # no memory: table only
    assert plan_lib.main(["--config", "qwen2.5-7b-fipo", "--mesh", "2,4,8"]) == 2  # 28 heads on 8-way tensor
    assert "dimension 'heads' of size 28 is not divisible" in capsys.readouterr().err


def test_suggested_settings_really_fit():
    config = load_config("qwen2.5-7b-fipo")
    for line in plan_lib.suggestions(config, (8, 1, 1), "80GiB"):
        setting = line.split(":")[0]
        if setting.startswith("mesh "):
            candidate, shape = config, plan_lib.parse_mesh(setting[5:])
        else:
            candidate, shape = apply_overrides(config, [setting]), (8, 1, 1)
        assert plan_lib.plan(candidate, shape, "80GiB").fits, line


def test_model_from_config_json_or_known_name(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False}))
    config = apply_overrides(load_config("qwen2.5-7b-fipo"), [f"model.path={folder}"])
    model = plan_lib.model_config(config)
    assert (model.num_hidden_layers, model.hidden_size, model.dtype, model.remat) == (3, 64, "bfloat16", True)
    assert plan_lib.model_config(load_config("qwen2.5-7b-fipo")).hidden_size == 3584  # by name
    unknown = apply_overrides(load_config("qwen2.5-7b-fipo"), [f"model.path={tmp_path}/mystery"])
    with pytest.raises(ConfigError, match="no config.json there and no known architecture"):
        plan_lib.model_config(unknown)


@pytest.mark.parametrize("text, expected", [("80GiB", 80 * 2**30), ("95GB", 95 * 10**9), ("16g", 16 * 2**30),
                                            ("1.5TiB", int(1.5 * 2**40)), ("12345", 12345)])
def test_parse_bytes(text, expected):
    assert plan_lib.parse_bytes(text) == expected


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="device memory must look like"):
        plan_lib.parse_bytes("lots")
    with pytest.raises(ValueError, match="mesh must have 1 to 3 positive sizes"):
        plan_lib.parse_mesh("2,2,2,2")
    with pytest.raises(ValueError, match="mesh must be comma-separated"):
        plan_lib.parse_mesh("2x4")
    config = apply_overrides(cpu_default(), OVERRIDES)
    with pytest.raises(ConfigError, match="must divide by the mesh's data axis"):
        plan_lib.plan(config, (16,))  # 8-row micro-batches on 16 data-parallel devices
