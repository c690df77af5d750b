"""A generated family of planner cases (model shape × mesh × remat × dtype) and the compiled memory of
each: the sharded `rl_update` and the engine's decode call, as XLA's ``memory_analysis`` reports them
on 8 fake CPU devices. Used by ``tests/test_plan.py`` and ``experiments/calibrate_plan.py``.

Cases are drawn from a seeded generator, not picked: head_dim, query / kv heads, width, MLP width,
vocabulary, tied embeddings, the family's layer (Qwen2: biases, SiLU; Llama: none; Gemma 3: q/k norms,
sandwich norms, GeGLU, 3 sliding layers : 1 global), depth, float32 or bfloat16 parameters and compute,
remat none / full / dots, query-chunked attention, and a mesh of 8 devices over data / fsdp / tensor.
"""

from __future__ import annotations

import random

# The step layout every case plans and compiles (rows split over data: 8 divides every mesh's data axis).
OVERRIDES = ["data.max_prompt_tokens=32", "rollout.max_response_tokens=224", "rollout.n=4",
             "rollout.prompts_per_step=8", "algo.mini_batches=2", "algo.micro_batch_size=8",
             "model.logprob_chunk_size=64", "rollout.engine_slots=32"]
MESHES = ((8,), (2, 2, 2), (4, 2, 1), (1, 8, 1), (2, 1, 4), (1, 4, 2), (1, 2, 4), (2, 4, 1))
FAMILIES = {
    "qwen2": dict(qkv_bias=True),
    "llama": dict(qkv_bias=False, model_type="llama"),
    "gemma3": dict(qkv_bias=False, model_type="gemma3_text", qk_norm=True, norm_unit_offset=True, sandwich_norms=True,
                   hidden_activation="gelu_pytorch_tanh", scale_embeddings=True, sliding_window=64,
                   sliding_rope_theta=10000.0),
}


def draw_cases(count: int, seed: int = 2026) -> list[dict]:
    """``count`` cases {"model": ModelConfig fields, "mesh": shape, "name": str} from a seeded generator."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        mesh = rng.choice(MESHES)
        tensor = mesh[2] if len(mesh) == 3 else 1
        heads = rng.choice([4, 8])
        if heads % tensor:
            continue  # the rules table refuses heads a tensor axis does not divide (said by the planner's CLI)
        head_dim = rng.choice([32, 64, 128])
        family = rng.choice(sorted(FAMILIES))
        layers = rng.choice([2, 4, 6])
        model = dict(FAMILIES[family], vocab_size=rng.choice([1024, 4096, 8192]),
                     hidden_size=rng.choice([128, 256, 512]), num_attention_heads=heads,
                     num_key_value_heads=rng.choice([n for n in (1, 2, 4) if heads % n == 0]), head_dim=head_dim,
                     num_hidden_layers=layers, tie_word_embeddings=rng.random() < 0.5,
                     remat=rng.choice(["none", "full", "dots"]),
                     attention_chunk_size=64 if rng.random() < 0.25 else None)
        model["intermediate_size"] = model["hidden_size"] * rng.choice([2, 4])
        dtype = rng.choice(["float32", "bfloat16"])
        model.update(dtype=dtype, compute_dtype=dtype)
        if family == "gemma3":
            model["layer_types"] = tuple("full_attention" if (i + 1) % 4 == 0 else "sliding_attention"
                                         for i in range(layers))
        name = (f"{family}-L{layers}-D{model['hidden_size']}-H{heads}/{model['num_key_value_heads']}x{head_dim}"
                f"-V{model['vocab_size']}{'-tied' if model['tie_word_embeddings'] else ''}-{dtype}"
                f"-remat_{model['remat']}{'-chunk64' if model['attention_chunk_size'] else ''}"
                f"-mesh{'x'.join(map(str, mesh))}")
        cases.append({"name": name, "model": model, "mesh": mesh})
    return cases


# Run in a subprocess with 8 fake CPU devices (tests.multi_device.run_json): prints one JSON list of
# {"update": sizes, "sampler": sizes} for the cases given as JSON on argv[1] (no "sampler" for a case
# with "sampler": false).
COMPILE_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp
from flax import nnx
from fipo_jax.generation import engine
from fipo_jax.train import update as update_lib
from fipo_jax.core.packing import abstract_batch
from fipo_jax.config import apply_overrides
from fipo_jax.config.presets import cpu_skewed_chain
from fipo_jax.models import CausalLM, ModelConfig
from fipo_jax.train.shapes import PROMPT_BUCKET_SLACK, engine_slots
from fipo_jax.generation.sampling import SamplingConfig
from fipo_jax.parallel.sharding import row_shardings, row_split
from fipo_jax.parallel.sharding import batch_sharding, make_mesh, param_shardings, replicated
from tests.plan_family import OVERRIDES

S = jax.ShapeDtypeStruct
FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
config = apply_overrides(cpu_skewed_chain(), OVERRIDES)
M, R = config.algo.mini_batches, config.algo.micro_batch_size
K = config.rollout.prompts_per_step * config.rollout.n // (M * R)
P, N = config.data.max_prompt_tokens, config.rollout.max_response_tokens


def sizes(compiled):
    memory = compiled.memory_analysis()
    return {k: int(getattr(memory, k)) for k in FIELDS}


def placed(tree, shardings):
    return jax.tree.map(lambda x, s: S(x.shape, x.dtype, sharding=s), tree, shardings)


def update_sizes(model, mesh):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = update_lib.make_optimizer(update_lib.warmup_schedule(1e-6, 1, M), 0.9, 0.999, 1e-8, 0.1, 1.0)
    shardings = update_lib.state_shardings(params, optimizer, mesh)
    state = update_lib.RLState(params=params, opt_state=jax.eval_shape(optimizer.tx.init, params),
                            step=S((), jnp.int32), key=jax.eval_shape(lambda: jax.random.key(0)))
    batch = abstract_batch(M, K, R, P + N, N)
    update_config = update_lib.UpdateConfig(loss=config.algo.loss, group_size=config.rollout.n,
                                         logprob_chunk_size=config.model.logprob_chunk_size)
    update = update_lib.jit_rl_update(graphdef, rest, optimizer, update_config, shardings, replicated(mesh))
    return sizes(update.lower(update_lib.abstract_state(state, shardings),
                              placed(batch, update_lib.batch_shardings(batch, mesh))).compile())


def sampler_sizes(model, mesh):
    # The engine's decode call as the trainer makes it: slots split over data (kv heads over tensor).
    row_sharding, split = row_split(batch_sharding(mesh))
    slots = engine_slots(config.rollout.engine_slots, config.rollout.prompts_per_round * config.rollout.n, split)
    width = P + PROMPT_BUCKET_SLACK
    whole = replicated(mesh)
    graphdef, state = nnx.split(model)
    state = placed(state, param_shardings(state, mesh))
    slot_state = jax.eval_shape(lambda: engine.init_slots(model.config, slots, width + N - 1, (1, 1)))
    slot_state = placed(slot_state, row_shardings(slot_state, row_sharding))
    prefixes = jax.eval_shape(lambda: engine.init_prefixes(model.config, engine.EngineConfig().prefill_batch, width))
    prefixes = placed(prefixes, row_shardings(prefixes, whole))
    ints = lambda shape, dtype=jnp.int32: S(shape, dtype, sharding=whole)  # noqa: E731
    refill = engine.Refill(ints((slots,)), ints((slots,)), ints((slots,)), ints((slots, 1, 1)),
                           ints((slots, 1, 1), bool))
    sampling = SamplingConfig(max_new_tokens=N, eos_token_ids=(1,), pad_token_id=0)
    return sizes(engine._advance_jit.lower(graphdef, state, slot_state, prefixes, refill,
                                           jax.eval_shape(lambda: jax.random.key(0)), ints(()), sampling,
                                           config.rollout.engine_steps_per_sync, row_sharding).compile())


assert jax.device_count() == 8
out = []
for case in json.loads(sys.argv[1]):
    fields = dict(case["model"])
    if fields.get("layer_types") is not None:
        fields["layer_types"] = tuple(fields["layer_types"])
    model = nnx.eval_shape(lambda: CausalLM(ModelConfig(**fields), rngs=nnx.Rngs(0)))
    mesh = make_mesh(tuple(case["mesh"]))
    out.append({"update": update_sizes(model, mesh)})
    if case.get("sampler", True):
        out[-1]["sampler"] = sampler_sizes(model, mesh)
print(json.dumps(out))
"""


def compiled_peak(sizes: dict) -> int:
    """XLA's per-device peak of a compiled call: arguments + temporaries + outputs not aliased to
    (donated) arguments."""
    return (sizes["argument_size_in_bytes"] + sizes["temp_size_in_bytes"] + sizes["output_size_in_bytes"]
            - sizes["alias_size_in_bytes"])
