"""Memory planner: will a run fit its mesh? Per-device bytes of every resident piece, before launch.

    fipo-plan --config qwen2.5-32b-fipo --mesh 2,16,4 --device-memory 80GiB

Exact by construction (shapes from the model's abstract parameters, placement from the one rules
table `fipo_jax.parallel.sharding.DEFAULT_RULES`): parameters, AdamW moments, gradients (the micro-batch's
and the float32 accumulator), the step's batch, the KV cache and the engine's prefix store.
Modelled (`fipo_jax.train.memory_model`, calibrated against XLA's ``memory_analysis`` of the compiled
sharded update and engine decode call on 8 fake CPU devices, over a generated family of layouts,
``tests/test_plan.py``): what the layer scan keeps for the backward pass (by remat policy), one
layer's backward working set, the log-prob vocabulary chunks, the optimizer step's working set,
a decode call's temporaries and a prefill's (against the compiled prefill, `tests/test_plan_faults.py`).

Three phases never overlap: sampling (parameters, optimizer state, KV cache, prefix store, and the
larger of the decode and the prefill temporaries — a prefill's attention scores grow with the
widest prompt squared), the update (parameters, optimizer state, gradients, batch, and the larger
of the activations with their working set and the optimizer step's working set), and, for the
scratch model on the chain task, the SFT warm start on one device before the model is sharded
(`WarmStartPlan`); the peak is the largest. The cost of planning does not grow with depth: the
parameters' shapes come from a one-layer model, the layer count set on their stacked axis.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import sys
from typing import Sequence

import numpy as np

import fipo_jax._requires.models  # noqa: F401  one-line ImportError without fipo_jax[models]

# isort: split
from flax import nnx
from jax.sharding import AbstractMesh

from fipo_jax.config import ConfigError, TrainConfig, fipo_inert_reason, load_config
from fipo_jax.generation.engine import EngineConfig
from fipo_jax.models import CausalLM, ModelConfig
from fipo_jax.models.lora import layer_projections, quantization_block
from fipo_jax.parallel.sharding import MESH_AXES, logical_sharding
from fipo_jax.train import memory_model
from fipo_jax.train import shapes as shapes_lib
from fipo_jax.train.shapes import RunShapes, run_shapes

GiB = 2**30

# int32 / float32 [M, K, R, T] arrays of the step's batch, per token (ids, masks, log-probs, scores …).
_STEP_TOKEN_ARRAYS = 6


def _working_set(activations: int, backward: int, logprob_chunks: int, embedding_gradient: int,
                 optimizer_update: int) -> int:
    """A training step's temporaries: the backward pass (kept activations + the larger of one
    layer's backward and the loss's chunks + a tied table's gradient) or the optimizer step."""
    return max(activations + max(backward, logprob_chunks) + embedding_gradient, optimizer_update)


@dataclasses.dataclass(frozen=True)
class WarmStartPlan:
    """Bytes of the SFT warm start (`fipo_jax.train.sft.train_sft`) on the one device it runs on: the
    scratch model is built whole (`fipo_jax.train.build.build_model`) and trained before the trainer
    shards it, one [rows, row_tokens] batch per jitted step, which donates nothing. The modelled
    pieces are the update's (`memory_model`); against the compiled SFT step on XLA:CPU the peak is
    0.98–1.38 of XLA's (`tests/test_plan_faults.py`).

    Attributes:
      rows, row_tokens: ``sft.batch_size`` demonstrations of the chain prompt + longest solution.
      parameters, optimizer, gradients: the model, AdamW μ and ν, one batch's gradients (exact,
        in the parameters' dtype).
      new_state: the step's new parameters and moments, beside the old (no donation; exact).
      batch: the demonstrations' ids (int32), attention and loss masks (bool).
      activations, backward_working_set, logprob_chunks, embedding_gradient, optimizer_update: as
        in `MemoryPlan`, for one batch (log-prob chunks of `DEFAULT_TOKENS_PER_CHUNK` // rows positions).
    """

    rows: int
    row_tokens: int
    parameters: int
    optimizer: int
    gradients: int
    new_state: int
    batch: int
    activations: int
    backward_working_set: int
    logprob_chunks: int
    embedding_gradient: int
    optimizer_update: int

    @property
    def peak(self) -> int:
        working = _working_set(self.activations, self.backward_working_set, self.logprob_chunks,
                               self.embedding_gradient, self.optimizer_update)
        return self.parameters + self.optimizer + self.gradients + self.new_state + self.batch + working

    def table_rows(self) -> list[tuple[str, int]]:
        """The phase's lines of `MemoryPlan.table` (state, activations, working sets, peak)."""
        state = self.parameters + self.optimizer + self.gradients + self.new_state
        working = self.peak - state - self.batch - self.activations
        return [("SFT warm start (one device): model, moments, gradients, new state", state),
                (f"  activations kept, one batch of {self.rows} × {self.row_tokens} tokens", self.activations),
                ("  working sets (layer backward, log-prob chunks, optimizer)", working),
                ("warm-start peak", self.peak)]


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one run on one mesh (see the module docstring), and the verdict.

    Attributes:
      shapes: the run's sizes (`fipo_jax.train.shapes.run_shapes`), the model's included; ``model``,
        ``remat``, ``micro_batch_rows``, ``row_tokens`` and ``kv_cache_rows`` read them.
      parameters, optimizer, gradients: the model state and AdamW moments (exact, in the
        parameters' dtype), and the gradients of the update (the micro-batch's, in the parameters'
        dtype, and the float32 accumulator).
      batch: the step's per-token arrays on this device (ids, masks, old log-probs, advantages …).
      activations: what the layer scan keeps of one micro-batch for its backward pass (``remat``).
      activations_other_remat: the same under the other remat choice (for comparison).
      backward_working_set: one layer's backward (with remat, its recomputed forward too).
      logprob_chunks: the loss's working set: its live [rows, chunk, vocabulary] float32 buffers.
      embedding_gradient: with tied embeddings, the [V, D] float32 gradient of the shared table.
      optimizer_update: new parameters and moments held beside the old until all are known finite.
      kv_cache: the rollout KV cache (static sampler rows or engine slots) on this device.
      prefix_store: the engine's prefilled prompts (rows on every device group) and their logits.
      sampler_temporaries: a decode call's temporaries (a layer's weights, cache blocks, refills).
      prefill_temporaries: a prefill's temporaries (its queries' scores against the cache …) at
        the widest prompt bucket (`RunShapes.sampler_prompt_width`).
      warm_start: the SFT warm start, a phase of its own on one device (None: the run has none).
      update_peak, sampling_peak, peak: the phases and the largest (the warm start's included).
      device_memory: bytes per device the plan is checked against (None: no verdict).
    """

    config_name: str
    mesh_shape: dict[str, int]
    shapes: RunShapes
    parameters: int
    optimizer: int
    gradients: int
    batch: int
    activations: int
    activations_other_remat: int
    backward_working_set: int
    logprob_chunks: int
    embedding_gradient: int
    optimizer_update: int
    kv_cache: int
    prefix_store: int
    sampler_temporaries: int
    prefill_temporaries: int
    device_memory: int | None = None
    warm_start: WarmStartPlan | None = None
    group: str = "shared"
    max_staleness: int = 0
    adapters: int | None = None  # bytes of the trained adapters (model.lora); None: every parameter trains

    @property
    def model(self) -> ModelConfig:
        return self.shapes.model

    @property
    def remat(self) -> str:
        return self.shapes.model.remat

    @property
    def micro_batch_rows(self) -> int:
        return self.shapes.micro_batch_rows

    @property
    def row_tokens(self) -> int:
        return self.shapes.row_tokens

    @property
    def kv_cache_rows(self) -> int:
        """Rows (engine slots) of the rollout KV cache on one device."""
        return self.shapes.sampler_local_rows

    @property
    def update_peak(self) -> int:
        working = _working_set(self.activations, self.backward_working_set, self.logprob_chunks,
                               self.embedding_gradient, self.optimizer_update)
        return self.parameters + self.optimizer + self.gradients + self.batch + working

    @property
    def sampling_peak(self) -> int:
        """The larger of the sampler's decode and prefill with the optimizer moments resident (the
        parameters counted once)."""
        return self.optimizer + max(self.sampler_program, self.prefill_program)

    @property
    def sampler_program(self) -> int:
        """What the sampler's compiled decode call holds: parameters, cache, prefixes, temporaries."""
        return self.parameters + self.kv_cache + self.prefix_store + self.sampler_temporaries

    @property
    def prefill_program(self) -> int:
        """What a prefill holds, the rollout cache and prefixes resident: it grows with the prompt
        width squared (`memory_model.prefill_temporaries`)."""
        return self.parameters + self.kv_cache + self.prefix_store + self.prefill_temporaries

    @property
    def warm_start_peak(self) -> int:
        """The SFT warm start's peak on its one device (0 without a warm start)."""
        return 0 if self.warm_start is None else self.warm_start.peak

    @property
    def rollout_peak(self) -> int:
        """What the rollout engine holds on its own: its copy of the weights (two while the next
        version arrives, k ≥ 1), cache, prefixes and the larger of decode and prefill temporaries."""
        extra_copy = (self.parameters if self.adapters is None else self.adapters) if self.max_staleness else 0
        return max(self.sampler_program, self.prefill_program) + extra_copy

    @property
    def overlapped_peak(self) -> int:
        """A shared mesh with k ≥ 1: the next steps' rollouts are drawn while the update runs."""
        return self.update_peak + self.rollout_peak if self.max_staleness else 0

    @property
    def peak(self) -> int:
        """The group's largest phase (`GROUPS`): a shared mesh's sampling, update, both at once when
        rollouts are drawn ahead, or the warm start; a training group's update or warm start; a
        rollout group's engine."""
        if self.group == "train":
            return max(self.update_peak, self.warm_start_peak)
        if self.group == "rollout":
            return self.rollout_peak
        return max(self.update_peak, self.sampling_peak, self.warm_start_peak, self.overlapped_peak)

    def shared_memory_need(self, devices: int) -> int:
        """Bytes ``devices`` devices sharing one memory (CPU devices of one host) need at once: the
        sharded phases on each of them, the warm start on one (nothing else is resident then)."""
        sharded = self.peak if self.group == "rollout" else max(self.update_peak, self.sampling_peak,
                                                                  self.overlapped_peak)
        return max(sharded * devices, self.warm_start_peak if self.group != "rollout" else 0)

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.peak <= self.device_memory

    def table(self) -> str:
        rows = [("parameters", self.parameters)]
        if self.adapters is not None:
            rows.append(("  of which trained: LoRA adapters (the rest frozen)", self.adapters))
        rows += [("optimizer moments (AdamW)", self.optimizer),
                ("gradients (micro-batch + accumulated)", self.gradients),
                ("step batch (per-token arrays)", self.batch),
                (f"activations kept, one micro-batch (remat {self.remat})", self.activations),
                (f"  the same with remat {_other_remat(self.remat)}", self.activations_other_remat),
                ("one layer's backward working set", self.backward_working_set),
                ("log-prob vocabulary chunks", self.logprob_chunks),
                ("tied embedding's gradient", self.embedding_gradient),
                ("optimizer step working set", self.optimizer_update),
                (f"rollout KV cache ({self.kv_cache_rows} rows on this device)", self.kv_cache),
                ("engine prefix store", self.prefix_store),
                ("decode temporaries (a layer's weights, cache blocks)", self.sampler_temporaries),
                ("prefill temporaries (attention scores of the widest prompt)", self.prefill_temporaries),
                ("update peak", self.update_peak), ("sampling peak", self.sampling_peak)]
        if self.max_staleness and self.group == "shared":
            rows.append(("update + rollouts drawn ahead (k ≥ 1)", self.overlapped_peak))
        if self.group == "rollout":  # a sampling group: no update, no optimizer state
            rows = [r for r in rows if r[0] in _ROLLOUT_ROWS or r[0].startswith("rollout KV")]
            rows.append(("rollout engine peak (weights + next weights when k ≥ 1)", self.rollout_peak))
        rows += self.warm_start.table_rows() if self.warm_start is not None and self.group != "rollout" else []
        rows.append((f"peak ({self.group} devices)" if self.group != "shared" else "peak", self.peak))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {_gib(value):>10}" for name, value in rows)


_ROLLOUT_ROWS = ("parameters", "engine prefix store", "decode temporaries (a layer's weights, cache blocks)",
                 "prefill temporaries (attention scores of the widest prompt)")

GROUPS = ("shared", "train", "rollout")  # a mesh that samples and updates, or one of a split's two


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def parse_bytes(text: str) -> int:
    """'80GiB', '95 GB', '16g', '1.5TiB', '12345' → bytes (GB = 10⁹, GiB = 2³⁰; bare k/m/g/t are binary)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", str(text).lower())
    if not match:
        raise ValueError(f"device memory must look like '80GiB', '95GB' or a byte count, got {text!r}")
    value, prefix, suffix = float(match.group(1)), match.group(2), match.group(3)
    power = "_kmgt".index(prefix) if prefix else 0
    base = 1000 if suffix == "b" and prefix else 1024
    return int(value * base**power)


def parse_mesh(text: str | Sequence[int]) -> tuple[int, ...]:
    """'2,16,4' → (2, 16, 4): sizes of the data, fsdp and tensor axes (as many as given)."""
    try:
        shape = tuple(int(v) for v in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        raise ValueError(f"mesh must be comma-separated positive sizes (data,fsdp,tensor), got {text!r}") from None
    if not shape or len(shape) > len(MESH_AXES) or min(shape) < 1:
        raise ValueError(f"mesh must have 1 to {len(MESH_AXES)} positive sizes (data,fsdp,tensor), got {text!r}")
    return shape


def _shard_bytes(shape, dtype, logical_axes, mesh, name: str) -> int:
    """Bytes of one device's shard of a tensor placed by the rules table."""
    return math.prod(logical_sharding(logical_axes, shape, mesh, name=name).shard_shape(tuple(shape))) \
        * np.dtype(dtype).itemsize


def _one_layer(model: ModelConfig) -> ModelConfig:
    """The same architecture with one decoder layer: every layer has the same parameters (the
    layers are one scan over stacked weights), so one layer's shapes give all L layers'."""
    types = None if model.layer_types is None else model.layer_types[:1]
    return dataclasses.replace(model, num_hidden_layers=1, layer_types=types)


@functools.lru_cache(maxsize=16)
def _abstract_parameter_shapes(model: ModelConfig) -> tuple[tuple[str, tuple[int, ...], np.dtype, tuple | None], ...]:
    """(name, shape, dtype, logical axes) of every parameter of ``model``, from its abstract build
    (no memory; its cost grows with the depth, so `_parameter_shapes` calls it for one layer)."""
    abstract = nnx.eval_shape(lambda: CausalLM(model, rngs=nnx.Rngs(0)))
    shapes = []
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        value = variable.get_value() if hasattr(variable, "get_value") else variable.value
        shapes.append((".".join(str(p) for p in path), tuple(value.shape), np.dtype(value.dtype),
                       variable.get_metadata().get("out_sharding")))
    return tuple(shapes)


def _parameter_shapes(model: ModelConfig) -> tuple[tuple[str, tuple[int, ...], np.dtype, tuple | None], ...]:
    """(name, shape, dtype, logical axes) of every parameter: a one-layer model's, with the stacked
    layer parameters' leading ``layers`` axis set to L (cost independent of the depth)."""
    depth = model.num_hidden_layers
    return tuple((name, (depth, *shape[1:]) if name.startswith("layers.") else shape, dtype, axes)
                 for name, shape, dtype, axes in _abstract_parameter_shapes(_one_layer(model)))


def parameter_bytes(model: ModelConfig, mesh) -> int:
    """Per-device bytes of the model's parameters, placed by the rules table (exact)."""
    return sum(_shard_bytes(shape, dtype, axes, mesh, name) for name, shape, dtype, axes in _parameter_shapes(model))


# Bits per element of a QLoRA base (`lora.BASE_DTYPES`): 4-bit types as accelerators store them, two per byte.
_QUANTIZED_BITS = {"int8": 8, "int4": 4, "nf4": 4}


@dataclasses.dataclass(frozen=True)
class LoraBytes:
    """One device's bytes of an adapted model (`fipo_jax.models.lora`): the frozen base (quantized
    projections under QLoRA, their per-channel scales in the parameter dtype), the adapters, the
    largest adapter's float32 bytes (the optimizer step's working set) and one layer's adapted
    kernels dequantized in the compute dtype (what a QLoRA layer step materialises; 0 otherwise)."""

    frozen: int
    adapters: int
    largest_adapter: int
    dequantized_layer: int


@functools.lru_cache(maxsize=16)
def _gemm_shapes(model: ModelConfig) -> dict[str, tuple[int, int, str | None, str | None]]:
    """Projection path → (D_in, D_out, first input axis, first output axis) of a decoder layer."""
    abstract = nnx.eval_shape(lambda: CausalLM(_one_layer(model), rngs=nnx.Rngs(0)))
    out = {}
    for path, projection in layer_projections(abstract.layers).items():
        axes = projection.kernel.get_metadata().get("out_sharding") or (None,) * 8
        out[path] = (math.prod(projection.in_shape), math.prod(projection.out_shape), axes[1],
                     axes[1 + projection.num_contracted])
    return out


def lora_bytes(model: ModelConfig, lora, mesh) -> LoraBytes:
    """`LoraBytes` of ``model`` adapted by ``lora`` (a `LoraConfig`) on one device of ``mesh``."""
    layers, rank, param = model.num_hidden_layers, lora.rank, np.dtype(model.dtype)
    adapted = {p: g for p, g in _gemm_shapes(model).items() if re.fullmatch(lora.module_path, p)}
    frozen = sum(_shard_bytes(shape, dtype, axes, mesh, name) for name, shape, dtype, axes in _parameter_shapes(model)
                 if name.removeprefix("layers.").removesuffix(".kernel").replace(".", "/") not in adapted)
    adapters = largest = dequantized = 0
    block = quantization_block(lora, [d_in for d_in, *_ in adapted.values()])
    for path, (d_in, d_out, in_axis, out_axis) in adapted.items():
        a = _shard_bytes((layers, d_in, rank), param, ("layers", in_axis, None), mesh, path)
        b = _shard_bytes((layers, rank, d_out), param, ("layers", None, out_axis), mesh, path)
        adapters, largest = adapters + a + b, max(largest, max(a, b) * 4 // param.itemsize // layers)
        full = _shard_bytes((layers, d_in, d_out), param, ("layers", in_axis, out_axis), mesh, path)
        if lora.base_dtype is None:
            frozen += full
            continue
        frozen += full * _QUANTIZED_BITS[lora.base_dtype] // (8 * param.itemsize)
        scales = (layers, d_in // block if block else 1, d_out)  # one per output channel and input block
        frozen += _shard_bytes(scales, param, ("layers", None, out_axis), mesh, path)
        dequantized += full // layers * np.dtype(model.compute_dtype).itemsize // param.itemsize
    return LoraBytes(frozen, adapters, largest, dequantized)


def _other_remat(policy: str) -> str:
    """The remat policy the plan also prices, for comparison: "full" without remat, else "none"."""
    return "full" if policy == "none" else "none"


def layer_parameter_bytes(model: ModelConfig, mesh) -> int:
    """Per-device bytes of one decoder layer's parameters (a slice of the stacked ones)."""
    stacked = sum(_shard_bytes(shape, dtype, axes, mesh, name) for name, shape, dtype, axes in _parameter_shapes(model)
                  if name.startswith("layers."))
    return stacked // model.num_hidden_layers


def largest_tensor_bytes(model: ModelConfig, mesh) -> int:
    """Float32 bytes on one device of the largest single parameter tensor (of a stacked layer
    parameter, one layer's slice)."""
    def one(name, shape, dtype, axes):
        per_layer = model.num_hidden_layers if name.startswith("layers.") else 1
        return _shard_bytes(shape, dtype, axes, mesh, name) * 4 // np.dtype(dtype).itemsize // per_layer

    return max(one(*entry) for entry in _parameter_shapes(model))


def activation_bytes(model: ModelConfig, mesh, rows: int, row_tokens: int, remat: str,
                     fitted: memory_model.Fitted = memory_model.FITTED) -> int:
    """Bytes the layer scan keeps of one micro-batch of ``rows`` × ``row_tokens`` tokens for its
    backward pass on one device, under remat policy ``remat`` (`memory_model.kept_per_token`)."""
    dims = memory_model.local_dims(model, mesh, rows, row_tokens)
    kept = dims.tokens * model.num_hidden_layers * memory_model.kept_per_token(model, dims, remat)
    return int(fitted.margin * kept)


def sampler_bytes(model: ModelConfig, mesh, local_rows: int, prompt_width: int, new_tokens: int,
                  prefill_rows: int = 0, fitted: memory_model.Fitted = memory_model.FITTED) -> tuple[int, int, int]:
    """(KV cache, engine prefix store, decode temporaries) of the sampler on one device.

    Each of ``local_rows`` rows (or engine slots) caches prompt width + new tokens − 1 positions of
    every layer, kv heads split over ``tensor`` (`sharding.row_shardings`); the engine's
    ``prefill_rows`` prefilled prompts are on every row group (kv heads split too), with their
    float32 logits; the temporaries are `memory_model.decode_temporaries`."""
    per_position = _kv_bytes_per_position(model, mesh)
    length = prompt_width + new_tokens - 1
    cache = local_rows * length * per_position
    prefixes = prefill_rows * (prompt_width * per_position + 4 * model.vocab_size)
    temporaries = memory_model.decode_temporaries(model, mesh, local_rows, layer_parameter_bytes(model, mesh),
                                                  prompt_width, length, cache, fitted)
    return cache, prefixes, int(temporaries)


def _kv_bytes_per_position(model: ModelConfig, mesh) -> int:
    """Keys and values of one cached position, every layer, kv heads split over ``tensor``."""
    kv_heads = memory_model.local(model.num_key_value_heads, mesh, "kv_heads")
    assert model.head_dim is not None  # ModelConfig.__post_init__ resolves it
    return 2 * model.num_hidden_layers * model.head_dim * np.dtype(model.compute_dtype).itemsize * kv_heads


def prefill_bytes(model: ModelConfig, mesh, local_rows: int, prompt_width: int, new_tokens: int,
                  prefill_rows: int = 0, fitted: memory_model.Fitted = memory_model.FITTED) -> int:
    """A prefill's temporaries on one device at prompt width ``prompt_width``: the static sampler
    prefills its ``local_rows`` rows into their cache of prompt width + new tokens − 1 slots; the
    engine up to ``prefill_rows`` prompts (on every row group) into a new cache of their own width
    (`memory_model.prefill_temporaries`)."""
    layer = layer_parameter_bytes(model, mesh)
    if prefill_rows:
        new_cache = prefill_rows * prompt_width * _kv_bytes_per_position(model, mesh)
        return int(memory_model.prefill_temporaries(model, mesh, prefill_rows, prompt_width, prompt_width, layer,
                                                    new_cache, fitted))
    return int(memory_model.prefill_temporaries(model, mesh, local_rows, prompt_width,
                                                prompt_width + new_tokens - 1, layer, 0, fitted))


def warm_start_length(config: TrainConfig) -> int:
    """Tokens of one SFT demonstration row (`fipo_jax.train.build.warm_start`): the chain task's prompt
    and its longest (step-by-step) solution, whatever ``data.max_prompt_tokens`` says."""
    from fipo_jax.data import ChainTask

    task = ChainTask.of(config.data)
    return task.prompt_tokens() + task.max_response_tokens()


def warm_start_plan(config: TrainConfig, model: ModelConfig,
                    fitted: memory_model.Fitted = memory_model.FITTED) -> WarmStartPlan | None:
    """The SFT warm start's bytes on its one device (see `WarmStartPlan`), or None when the run
    has none (`fipo_jax.train.build.needs_warm_start`)."""
    from fipo_jax.generation.logprobs import DEFAULT_TOKENS_PER_CHUNK
    from fipo_jax.train.build import needs_warm_start

    if not needs_warm_start(config):
        return None
    mesh = AbstractMesh((1,), MESH_AXES[:1])
    rows, row_tokens = config.sft.batch_size, warm_start_length(config)
    dims = memory_model.local_dims(model, mesh, rows, row_tokens)
    parameters = parameter_bytes(model, mesh)
    return WarmStartPlan(
        rows=rows, row_tokens=row_tokens, parameters=parameters, optimizer=2 * parameters, gradients=parameters,
        new_state=3 * parameters, batch=rows * row_tokens * (4 + 1 + 1),
        activations=activation_bytes(model, mesh, rows, row_tokens, model.remat, fitted),
        backward_working_set=int(memory_model.backward_working_set(model, dims, model.remat, fitted)),
        logprob_chunks=int(memory_model.loss_working_set(dims, max(1, DEFAULT_TOKENS_PER_CHUNK // rows), fitted)),
        embedding_gradient=int(memory_model.embedding_gradient(model, dims, fitted)),
        optimizer_update=int(memory_model.optimizer_working_set(parameters, largest_tensor_bytes(model, mesh),
                                                                fitted)))


def plan(config: TrainConfig | str, mesh_shape: Sequence[int], device_memory: int | str | None = None,
         model: ModelConfig | None = None, fitted: memory_model.Fitted = memory_model.FITTED,
         group: str = "shared") -> MemoryPlan:
    """The per-device memory of ``config`` (a `TrainConfig`, preset name or JSON path) on a mesh of
    ``mesh_shape`` (data, fsdp, tensor); ``device_memory`` (bytes or '80GiB') adds a verdict.
    ``model`` overrides the architecture `shapes.model_config` finds; ``fitted`` the model's constants;
    ``group`` (`GROUPS`) what the mesh does: everything ("shared"), or one side of a split."""
    config = load_config(config) if isinstance(config, str) else config
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    shape = parse_mesh(mesh_shape)
    mesh = AbstractMesh(shape, MESH_AXES[: len(shape)])
    sizes = run_shapes(config, shape, model, updates=group != "rollout")
    model = sizes.model
    lora = config.model.lora.config()
    adapted = None if lora is None else lora_bytes(model, lora, mesh)
    parameters = parameter_bytes(model, mesh) if adapted is None else adapted.frozen + adapted.adapters
    prefill_rows = EngineConfig().prefill_batch if config.rollout.sampler == "engine" else 0
    sampler = (model, mesh, sizes.sampler_local_rows, sizes.sampler_prompt_width, sizes.response_tokens)
    kv_cache, prefix_store, sampler_temporaries = sampler_bytes(*sampler, prefill_rows=prefill_rows, fitted=fitted)
    memory = None if device_memory is None else (parse_bytes(device_memory) if isinstance(device_memory, str)
                                                 else int(device_memory))
    update = _update_bytes(config, sizes, mesh, parameters, adapted, fitted) if group != "rollout" else dict.fromkeys(
        _UPDATE_FIELDS, 0)
    return MemoryPlan(
        config_name=config.name, mesh_shape=dict(zip(mesh.axis_names, shape)), shapes=sizes, parameters=parameters,
        **update, kv_cache=kv_cache, prefix_store=prefix_store, sampler_temporaries=sampler_temporaries,
        prefill_temporaries=prefill_bytes(*sampler, prefill_rows, fitted), device_memory=memory,
        warm_start=warm_start_plan(config, model, fitted) if group != "rollout" else None, group=group,
        max_staleness=config.rollout.max_staleness, adapters=None if adapted is None else adapted.adapters)


_UPDATE_FIELDS = ("optimizer", "gradients", "batch", "activations", "activations_other_remat", "backward_working_set",
                  "logprob_chunks", "embedding_gradient", "optimizer_update")


def _update_bytes(config: TrainConfig, sizes: RunShapes, mesh, parameters: int, adapted: LoraBytes | None,
                  fitted: memory_model.Fitted) -> dict[str, int]:
    """The update's pieces (`_UPDATE_FIELDS`) on one device of ``mesh``; with adapters (``adapted``) only
    they have moments and gradients, the embedding none, and a QLoRA layer step holds its kernels
    dequantized."""
    model, rows, row_tokens = sizes.model, sizes.micro_batch_rows, sizes.row_tokens
    dims = memory_model.local_dims(model, mesh, rows, row_tokens)
    trained = parameters if adapted is None else adapted.adapters
    largest = largest_tensor_bytes(model, mesh) if adapted is None else adapted.largest_adapter
    backward = memory_model.backward_working_set(model, dims, model.remat, fitted)
    return dict(
        optimizer=2 * trained,  # AdamW μ and ν, placed like their parameters, in their dtype
        gradients=trained + trained * 4 // np.dtype(model.dtype).itemsize,
        batch=_STEP_TOKEN_ARRAYS * 4 * -(-sizes.step_rows // sizes.data_split) * row_tokens,
        activations=activation_bytes(model, mesh, rows, row_tokens, model.remat, fitted),
        activations_other_remat=activation_bytes(model, mesh, rows, row_tokens, _other_remat(model.remat), fitted),
        backward_working_set=int(backward + (0 if adapted is None else fitted.margin * adapted.dequantized_layer)),
        logprob_chunks=int(memory_model.loss_working_set(dims, config.model.logprob_chunk_size, fitted)),
        embedding_gradient=int(memory_model.embedding_gradient(model, dims, fitted)) if adapted is None else 0,
        optimizer_update=int(memory_model.optimizer_working_set(trained, largest, fitted)))


def plan_groups(config: TrainConfig, device_memory: int | str | None = None,
                model: ModelConfig | None = None) -> dict[str, MemoryPlan]:
    """Each device group of ``config`` planned for its own phases: {"shared": …} on
    ``mesh_shape``, or {"train": …, "rollout": …} when ``rollout_mesh_shape`` splits the devices."""
    if not config.rollout_mesh_shape:
        return {"shared": plan(config, config.mesh_shape, device_memory, model)}
    return {"train": plan(config, config.mesh_shape, device_memory, model, group="train"),
            "rollout": plan(config, config.rollout_mesh_shape, device_memory, model, group="rollout")}


def split_suggestions(config: TrainConfig, devices: int, device_memory: int | str,
                      model: ModelConfig | None = None, limit: int = 2) -> list[str]:
    """Splits of ``devices`` into a training and a rollout group (a quarter, half or three quarters
    sampling) under which both groups fit, each group on its best-fitting mesh shape."""
    found = []
    for rollout_devices in sorted({devices // 4, devices // 2, 3 * devices // 4} - {0, devices}):
        best = {}
        for group, count in (("train", devices - rollout_devices), ("rollout", rollout_devices)):
            fitting = []
            for shape in _mesh_shapes(count):
                try:
                    result = plan(config, shape, device_memory, model, group=group)
                except (ConfigError, ValueError):
                    continue
                if result.fits:
                    fitting.append((result.peak, shape))
            if fitting:
                best[group] = min(fitting)
        if len(best) == 2:
            (train_peak, train), (rollout_peak, rollout) = best["train"], best["rollout"]
            found.append(f"mesh_shape=[{','.join(map(str, train))}] rollout_mesh_shape=[{','.join(map(str, rollout))}]"
                         f" (split {devices - rollout_devices} + {rollout_devices}): peaks {_gib(train_peak)} "
                         f"(train) / {_gib(rollout_peak)} (rollout) per device")
    return found[:limit]


def _with(config: TrainConfig, section: str, **changes) -> TrainConfig:
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


def _mesh_shapes(devices: int) -> list[tuple[int, int, int]]:
    """Every (data, fsdp, tensor) over ``devices`` devices with tensor ≤ 8 (one host's links)."""
    return [(d, devices // (d * t), t) for t in (1, 2, 4, 8) for d in range(1, devices + 1)
            if devices % (d * t) == 0]


def suggestions(config: TrainConfig | str, mesh_shape: Sequence[int], device_memory: int | str,
                model: ModelConfig | None = None) -> list[str]:
    """Settings that make ``config`` fit (each alone, re-planned): remat, a smaller micro-batch, a
    smaller log-prob chunk, a smaller SFT batch, fewer engine slots, other mesh shapes over the
    same devices."""
    config = load_config(config) if isinstance(config, str) else config
    model = model or shapes_lib.model_config(config)
    base = plan(config, mesh_shape, device_memory, model)
    assert base.device_memory is not None  # device_memory was given
    if base.fits:
        return []
    found = []

    def attempt(label: str, candidate: TrainConfig, shape=mesh_shape, candidate_model=model) -> bool:
        try:
            result = plan(candidate, shape, device_memory, candidate_model)
        except (ConfigError, ValueError):
            return False
        if result.fits:
            found.append(f"{label}: peak {_gib(result.peak)} per device")
        return bool(result.fits)

    if model.remat == "none":
        attempt("model.remat=full", _with(config, "model", remat="full"),
                candidate_model=dataclasses.replace(model, remat="full"))
    if not model.attention_chunk_size and base.row_tokens > 2048:
        attempt("model.attention_chunk_size=512", _with(config, "model", attention_chunk_size=512),
                candidate_model=dataclasses.replace(model, attention_chunk_size=512))
    rows = base.micro_batch_rows // 2
    while rows >= 1 and not attempt(f"algo.micro_batch_size={rows}", _with(config, "algo", micro_batch_size=rows)):
        rows //= 2
    chunk = config.model.logprob_chunk_size // 2
    while chunk >= 64 and not attempt(f"model.logprob_chunk_size={chunk}",
                                      _with(config, "model", logprob_chunk_size=chunk)):
        chunk //= 2
    if base.warm_start_peak > base.device_memory:
        size = config.sft.batch_size // 2
        while size >= 1 and not attempt(f"sft.batch_size={size}", _with(config, "sft", batch_size=size)):
            size //= 2
    if config.rollout.sampler == "engine" and base.sampling_peak > base.device_memory:
        slots = config.rollout.engine_slots // 2
        while slots >= 1 and not attempt(f"rollout.engine_slots={slots}", _with(config, "rollout", engine_slots=slots)):
            slots //= 2
    devices = math.prod(parse_mesh(mesh_shape))
    fitting = []
    for shape in _mesh_shapes(devices):
        try:
            result = plan(config, shape, device_memory, model)
        except (ConfigError, ValueError):
            continue
        if result.fits:
            fitting.append((result.peak, shape))
    for peak, shape in sorted(fitting)[:3]:
        found.append(f"mesh {','.join(map(str, shape))}: peak {_gib(peak)} per device")
    return found


def adapter_suggestions(config: TrainConfig, mesh_shape: Sequence[int], device_memory: int | str,
                        model: ModelConfig | None = None) -> list[str]:
    """LoRA settings that fit (re-planned): rank 16 (or ``config``'s rank) with the base as loaded,
    int8 and nf4, each with the largest micro-batch and engine slots that then fit (halved in turn,
    the update's or the sampler's, whichever is over)."""
    from fipo_jax.config.specs import LoraSpec

    found = []
    rank = config.model.lora.rank or 16
    for base_dtype in (None, "int8", "nf4"):
        candidate = _with(config, "model", lora=LoraSpec(rank=rank, base_dtype=base_dtype))
        for _ in range(32):
            result = plan(candidate, mesh_shape, device_memory, model)
            assert result.device_memory is not None  # device_memory was given
            algo, rollout = candidate.algo, candidate.rollout
            if result.fits:
                found.append(f"model.lora.rank={rank}" + (f" model.lora.base_dtype={base_dtype}" if base_dtype else "")
                             + f" algo.micro_batch_size={algo.micro_batch_size} rollout.engine_slots="
                             f"{rollout.engine_slots}: peak {_gib(result.peak)} per device")
                break
            if result.update_peak > result.device_memory and algo.micro_batch_size > 1:
                candidate = _with(candidate, "algo", micro_batch_size=algo.micro_batch_size // 2)
            elif result.sampling_peak > result.device_memory and rollout.engine_slots > 1:
                candidate = _with(candidate, "rollout", engine_slots=rollout.engine_slots // 2)
            else:
                break
    return found


# Remat policies from the most recompute to the least (`bench_breakdown`: executed / model matmul
# FLOPs of the 7B-shaped update, full 1.23, dots 1.07, none ≈ 1.0).
_LESS_RECOMPUTE = {"full": ("dots", "none"), "dots": ("none",), "none": ()}


def less_recompute(config: TrainConfig, mesh_shape: Sequence[int], device_memory: int | str,
                   model: ModelConfig | None = None) -> list[str]:
    """Remat policies that recompute less than ``config``'s and still fit (each re-planned)."""
    model = model or shapes_lib.model_config(config)
    found = []
    for policy in _LESS_RECOMPUTE[model.remat]:
        result = plan(_with(config, "model", remat=policy), mesh_shape, device_memory,
                      dataclasses.replace(model, remat=policy))
        if result.fits:
            found.append(f"model.remat={policy}: peak {_gib(result.peak)} per device")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--pipeline" in argv:  # the step-time model of `fipo_jax.train.pipeline_model`
        from fipo_jax.train import pipeline_model

        return pipeline_model.main([a for a in argv if a != "--pipeline"])
    parser = argparse.ArgumentParser(prog="fipo-plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a preset name or a JSON config file")
    parser.add_argument("--mesh", required=True, help="data,fsdp,tensor sizes, e.g. 2,16,4 (64 devices)")
    parser.add_argument("--device-memory", default=None, help="per-device memory, e.g. 80GiB (H100), 95GiB (v5p)")
    parser.add_argument("--rollout-mesh", default=None,
                        help="the rollout group's own data,fsdp,tensor sizes (split devices; default: shared)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, as train.py")
    args = parser.parse_args(argv)
    from fipo_jax.config import apply_overrides

    try:
        config = apply_overrides(load_config(args.config), args.set)
        config = dataclasses.replace(config, mesh_shape=parse_mesh(args.mesh))
        if args.rollout_mesh:
            config = dataclasses.replace(config, rollout_mesh_shape=parse_mesh(args.rollout_mesh))
        groups = plan_groups(config, args.device_memory)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    reason = fipo_inert_reason(config)
    if reason is not None:
        print(f"[warning] {reason}")
    codes = [_report(config, result) for result in groups.values()]
    return max(codes)


def _report(config: TrainConfig, result: MemoryPlan) -> int:
    """Print one group's plan and verdict (with what would fit); 1 if it does not fit, else 0."""
    m, mesh = result.model, tuple(result.mesh_shape.values())
    what = "" if result.group == "shared" else f" ({result.group} group)"
    print(f"{result.config_name}{what} on mesh {result.mesh_shape} — model L={m.num_hidden_layers} D={m.hidden_size} "
          f"F={m.intermediate_size} H={m.num_attention_heads}/{m.num_key_value_heads} V={m.vocab_size} "
          f"{m.dtype}/{m.compute_dtype}; micro-batch {result.micro_batch_rows} rows × {result.row_tokens} tokens")
    print(result.table())
    if result.device_memory is None:
        return 0
    spare = result.device_memory - result.peak
    if result.fits:
        print(f"fits in {_gib(result.device_memory)}: {_gib(spare)} to spare ({spare / result.device_memory:.0%})")
        if result.group != "rollout":
            for line in less_recompute(config, mesh, result.device_memory, result.model):
                print(f"  also fits, with less recompute (faster): {line}")
        return 0
    print(f"does NOT fit in {_gib(result.device_memory)}: {_gib(-spare)} over")
    state = result.parameters + result.optimizer + result.gradients
    if result.adapters is None and state > result.device_memory:
        print(f"  full fine-tuning cannot fit at any batch size: parameters, moments and gradients alone are "
              f"{_gib(state)}")
    if result.group != "shared":
        return 1
    found = suggestions(config, mesh, result.device_memory, result.model)
    for line in found:
        print(f"  would fit with {line}")
    for line in adapter_suggestions(config, mesh, result.device_memory, result.model):
        print(f"  would fit with adapters (LoRA): {line}")
    if not any(line.startswith("mesh ") for line in found):  # no shared mesh of these devices fits: split them?
        for line in split_suggestions(config, math.prod(mesh), result.device_memory,
                                      result.model):
            print(f"  would fit on split devices with {line}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
