"""The planner with adapters (model.lora): the frozen base, the adapters and their moments exact against the
compiled update's arguments (LoRA and QLoRA), the whole update never under-counted, and the 7B verdict on
one 80 GiB device: full fine-tuning cannot fit, LoRA settings that do are named."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from fipo_jax.config import apply_overrides
from fipo_jax.config.presets import cpu_skewed_chain, qwen25_7b_fipo
from fipo_jax.core.packing import abstract_batch
from fipo_jax.models import CausalLM, ModelConfig
from fipo_jax.models.lora import apply_lora
from fipo_jax.parallel.sharding import make_mesh, replicated
from fipo_jax.train import plan as plan_lib
from fipo_jax.train import update as update_lib
from tests.plan_family import OVERRIDES, compiled_peak

MODEL = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
S = jax.ShapeDtypeStruct


def compiled_update(config) -> tuple[dict, int, int]:
    """memory_analysis of the LoRA update on one device, and the bytes of its frozen-base and batch arguments."""
    model = apply_lora(CausalLM(ModelConfig(**MODEL), rngs=nnx.Rngs(0)), config.model.lora.config())
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    M, R = config.algo.mini_batches, config.algo.micro_batch_size
    K = config.rollout.prompts_per_step * config.rollout.n // (M * R)
    P, N = config.data.max_prompt_tokens, config.rollout.max_response_tokens
    optimizer = update_lib.make_optimizer(update_lib.warmup_schedule(1e-6, 1, M), 0.9, 0.999, 1e-8, 0.1, 1.0)
    mesh = make_mesh((1,))
    shardings = update_lib.state_shardings(params, optimizer, mesh)
    state = update_lib.RLState(params=params, opt_state=jax.eval_shape(optimizer.tx.init, params),
                               step=S((), jnp.int32), key=jax.eval_shape(lambda: jax.random.key(0)))
    update_config = update_lib.UpdateConfig(loss=config.algo.loss, group_size=config.rollout.n,
                                            logprob_chunk_size=config.model.logprob_chunk_size)
    update = update_lib.jit_rl_update(graphdef, rest, optimizer, update_config, shardings, replicated(mesh))
    batch = abstract_batch(M, K, R, P + N, N)
    memory = update.lower(update_lib.abstract_state(state, shardings), batch).compile().memory_analysis()
    sizes = {k: int(getattr(memory, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                  "alias_size_in_bytes", "temp_size_in_bytes")}
    frozen = sum(x.size * x.dtype.itemsize * (4 if "int4" in str(x.dtype) else 8) // 8 for x in jax.tree.leaves(rest))
    return sizes, frozen, sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(batch))


@pytest.mark.slow
@pytest.mark.parametrize("base_dtype", [None, "int8", "int4"])
def test_adapters_and_frozen_base_are_exact_and_the_update_never_under_counted(base_dtype):
    config = apply_overrides(cpu_skewed_chain(), OVERRIDES + ["model.lora.rank=8"]
                             + ([f"model.lora.base_dtype={base_dtype}"] if base_dtype else []))
    sizes, frozen, batch_bytes = compiled_update(config)
    result = plan_lib.plan(config, (1,), model=ModelConfig(**MODEL))
    assert result.parameters - result.adapters == frozen  # the frozen base, quantized or not: exact
    state = sizes["argument_size_in_bytes"] - batch_bytes - frozen
    assert abs(state - (result.adapters + result.optimizer)) <= 64  # + step, key, counts
    ratio = result.update_peak / compiled_peak(sizes)
    assert 0.95 <= ratio <= 1.30, (ratio, result.table())  # measured 1.20-1.21 (LoRA, int8, int4)


def test_a_7b_fipo_run_on_one_80gib_device_fits_with_adapters_only():
    full = plan_lib.plan(qwen25_7b_fipo(), (1, 1, 1), "80GiB")
    assert not full.fits and full.parameters + full.optimizer + full.gradients > full.device_memory
    found = plan_lib.adapter_suggestions(qwen25_7b_fipo(), (1, 1, 1), "80GiB")
    assert len(found) == 3 and found[0].startswith("model.lora.rank=16 algo.micro_batch_size=")
    assert "model.lora.base_dtype=nf4" in found[2]
    settings = [s for s in found[0].split(":")[0].split() if not s.startswith("model.lora.rank")]
    adapted = apply_overrides(qwen25_7b_fipo(), ["model.lora.rank=16", *settings])
    result = plan_lib.plan(adapted, (1, 1, 1), "80GiB")
    assert result.fits and result.optimizer == 2 * result.adapters and result.embedding_gradient == 0
    quantized = plan_lib.plan(apply_overrides(qwen25_7b_fipo(), ["model.lora.rank=16", "model.lora.base_dtype=int8"]),
                              (1, 1, 1))
    assert quantized.parameters < 0.6 * result.parameters  # the projections at one byte, embedding as loaded
