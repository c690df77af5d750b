"""Memory planner: will a run fit its mesh? Per-device bytes of every resident piece, before launch.

    python -m fipo_jax.plan --config qwen2.5-32b-fipo --mesh 2,16,4 --device-memory 80GiB

Exact by construction (shapes from the model's abstract parameters, placement from the one rules
table `fipo_jax.sharding.DEFAULT_RULES`): parameters and AdamW moments. Modelled, and checked
against XLA's ``memory_analysis`` of the compiled sharded update and engine decode call on 8 fake
CPU devices within 15 % (``tests/test_plan.py``): gradients (the micro-batch's and the float32
accumulator), the step's per-token arrays, the activations one micro-batch keeps for its backward
pass (with or without remat), the log-prob vocabulary chunks, the rollout KV cache (static sampler
rows or engine slots), the engine's prefix store and a decode step's temporaries.

Two phases never overlap: sampling (parameters, optimizer state, KV cache, prefix store, decode
temporaries) and the update (parameters, optimizer state, gradients, batch, activations, log-prob
chunks); the peak is the larger. The activation model counts what XLA:CPU keeps per token and
layer; GPU/TPU compilers fuse more, so it errs on the high side there.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import sys
from typing import Sequence

import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh

from fipo_jax.config import ConfigError, TrainConfig, load_config
from fipo_jax.engine import EngineConfig
from fipo_jax.models import CausalLM, ModelConfig
from fipo_jax.rollouts import PROMPT_BUCKET_SLACK
from fipo_jax.sharding import DEFAULT_RULES, MESH_AXES, logical_sharding

GiB = 2**30

# Architectures of public checkpoints (their config.json), for planning without the files.
KNOWN_MODELS = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4),
    "qwen2.5-math-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4),
    "qwen2.5-32b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                        num_attention_heads=40, num_key_value_heads=8),
    "gemma3-270m": dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, tie_word_embeddings=True,
                        model_type="gemma3_text", qkv_bias=False, qk_norm=True, norm_unit_offset=True,
                        sandwich_norms=True, hidden_activation="gelu_pytorch_tanh", scale_embeddings=True),
}

# Calibration of the modelled pieces against XLA:CPU (tests/test_plan.py): floats a decoder layer
# keeps per token for its backward pass, in units of the widths below; live [rows, chunk, V]
# float32 buffers of the log-prob head; float32 [M, K, R, T] arrays the update holds per token.
_SAVED_PER_TOKEN = {"hidden": 7, "query": 3, "key_value": 4, "mlp": 4, "scores": 2}
_LOGIT_BUFFERS = 3
_STEP_TOKEN_ARRAYS = 6


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one run on one mesh (see the module docstring), and the verdict.

    Attributes:
      parameters, optimizer, gradients: the model state and AdamW moments (exact, in the
        parameters' dtype), and the gradients of the update (the micro-batch's, in the parameters'
        dtype, and the float32 accumulator).
      batch: the step's per-token arrays on this device (ids, masks, old log-probs, advantages …).
      activations: what one micro-batch's forward keeps for its backward pass (``remat`` as set).
      activations_other_remat: the same with remat switched (for the suggestion).
      logprob_chunks: the log-prob head's live [rows, chunk, vocabulary] float32 buffers.
      kv_cache: the rollout KV cache (static sampler rows or engine slots) on this device.
      prefix_store: the engine's prefilled prompts (replicated) and their last logits.
      sampler_temporaries: one decode step's copy of a layer's cache and its logits.
      update_peak, sampling_peak, peak: the two phases and the larger.
      device_memory: bytes per device the plan is checked against (None: no verdict).
    """

    config_name: str
    mesh_shape: dict[str, int]
    model: ModelConfig
    remat: str
    micro_batch_rows: int
    row_tokens: int
    parameters: int
    optimizer: int
    gradients: int
    batch: int
    activations: int
    activations_other_remat: int
    logprob_chunks: int
    kv_cache: int
    kv_cache_rows: int
    prefix_store: int
    sampler_temporaries: int
    device_memory: int | None = None

    @property
    def update_peak(self) -> int:
        return (self.parameters + self.optimizer + self.gradients + self.batch + self.activations
                + self.logprob_chunks)

    @property
    def sampling_peak(self) -> int:
        return self.parameters + self.optimizer + self.sampler_program

    @property
    def sampler_program(self) -> int:
        """What the sampler's compiled call holds: parameters, cache, prefixes, temporaries."""
        return self.parameters + self.kv_cache + self.prefix_store + self.sampler_temporaries

    @property
    def peak(self) -> int:
        return max(self.update_peak, self.sampling_peak)

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.peak <= self.device_memory

    def table(self) -> str:
        rows = [("parameters", self.parameters), ("optimizer moments (AdamW)", self.optimizer),
                ("gradients (micro-batch + accumulated)", self.gradients), ("step batch (per-token arrays)", self.batch),
                (f"activations, one micro-batch (remat {self.remat})", self.activations),
                (f"  the same with remat {_other_remat(self.remat)}", self.activations_other_remat),
                ("log-prob vocabulary chunks", self.logprob_chunks),
                (f"rollout KV cache ({self.kv_cache_rows} rows on this device)", self.kv_cache),
                ("engine prefix store", self.prefix_store),
                ("sampler temporaries (a layer's cache, logits)", self.sampler_temporaries),
                ("update peak", self.update_peak), ("sampling peak", self.sampling_peak), ("peak", self.peak)]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {_gib(value):>10}" for name, value in rows)


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


def model_config(config: TrainConfig) -> ModelConfig:
    """The architecture ``config.model`` names, without loading weights: the scratch model's fields,
    a checkpoint folder's ``config.json``, or a known public architecture matched by name."""
    spec = config.model
    common = dict(dtype=spec.dtype, compute_dtype=spec.compute_dtype, remat=spec.remat,
                  attention_chunk_size=spec.attention_chunk_size)
    if spec.source == "scratch":
        from fipo_jax.data import CharTokenizer

        return ModelConfig(vocab_size=CharTokenizer().vocab_size, hidden_size=spec.hidden_size,
                           intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                           num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                           tie_word_embeddings=True, **common)
    name = "gemma3-270m" if spec.source == "gemma3-270m" else spec.path
    config_json = os.path.join(name, "config.json")
    if os.path.isfile(config_json):
        import json

        from fipo_jax.models.families import config_from_hf

        with open(config_json) as f:
            return dataclasses.replace(config_from_hf(json.load(f)), **common)
    key = os.path.basename(os.path.normpath(name)).lower().replace("_", "-")
    for known in sorted(KNOWN_MODELS, key=len, reverse=True):
        if known in key:
            return ModelConfig(**KNOWN_MODELS[known], **common)
    raise ConfigError(f"model.path {spec.path!r}: no config.json there and no known architecture in its name "
                      f"(known: {sorted(KNOWN_MODELS)}); point model.path at the checkpoint folder")


def _shard_bytes(shape, dtype, logical_axes, mesh, name: str) -> int:
    """Bytes of one device's shard of a tensor placed by the rules table."""
    return math.prod(logical_sharding(logical_axes, shape, mesh, name=name).shard_shape(tuple(shape))) \
        * np.dtype(dtype).itemsize


def _local(dim: int, mesh, logical: str) -> int:
    """Size of a ``logical`` dimension on one device (the rules table's placement)."""
    return logical_sharding((logical,), (dim,), mesh, name=logical).shard_shape((dim,))[0]


@functools.lru_cache(maxsize=16)
def _parameter_shapes(model: ModelConfig) -> tuple[tuple[str, tuple[int, ...], np.dtype, tuple | None], ...]:
    """(name, shape, dtype, logical axes) of every parameter, from the abstract model (no memory)."""
    abstract = nnx.eval_shape(lambda: CausalLM(model, rngs=nnx.Rngs(0)))
    shapes = []
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        value = variable.get_value() if hasattr(variable, "get_value") else variable.value
        shapes.append((".".join(str(p) for p in path), tuple(value.shape), np.dtype(value.dtype),
                       variable.get_metadata().get("out_sharding")))
    return tuple(shapes)


def parameter_bytes(model: ModelConfig, mesh) -> int:
    """Per-device bytes of the model's parameters, placed by the rules table (exact)."""
    return sum(_shard_bytes(shape, dtype, axes, mesh, name) for name, shape, dtype, axes in _parameter_shapes(model))


def _other_remat(policy: str) -> str:
    """The remat policy the plan also prices, for comparison: "full" without remat, else "none"."""
    return "full" if policy == "none" else "none"


def activation_bytes(model: ModelConfig, mesh, rows: int, row_tokens: int, remat: str) -> int:
    """Bytes one micro-batch of ``rows`` rows × ``row_tokens`` tokens keeps for its backward pass
    on one device: rows split over ``data``, heads / MLP / vocabulary over ``tensor``, and the
    residual stream's width over ``fsdp`` (the compiler follows the weights' ``embed`` split)."""
    local_rows = rows // _ways(mesh, "batch")
    tokens = local_rows * row_tokens
    width = np.dtype(model.compute_dtype).itemsize
    heads = _local(model.num_attention_heads, mesh, "heads")
    kv_heads = _local(model.num_key_value_heads, mesh, "kv_heads")
    chunked = bool(model.attention_chunk_size) and model.attention_chunk_size < row_tokens
    attended = 0 if chunked else row_tokens  # chunked attention rematerialises its scores (transient below)
    hidden = _local(model.hidden_size, mesh, "embed")  # XLA splits the residual stream like the weights' embed
    per_token_layer = (width * (_SAVED_PER_TOKEN["hidden"] * hidden
                                + _SAVED_PER_TOKEN["query"] * heads * model.head_dim
                                + _SAVED_PER_TOKEN["key_value"] * kv_heads * model.head_dim
                                + _SAVED_PER_TOKEN["mlp"] * _local(model.intermediate_size, mesh, "mlp"))
                       + 4 * _SAVED_PER_TOKEN["scores"] * heads * attended)
    layers = model.num_hidden_layers
    if remat != "none":  # layer inputs kept; one layer recomputed at a time
        kept = tokens * (layers * width * hidden + per_token_layer)
    else:
        kept = tokens * layers * per_token_layer
    transient = 0
    if chunked:  # one query chunk's scores and probabilities while it is recomputed
        transient = 4 * _SAVED_PER_TOKEN["scores"] * local_rows * heads * model.attention_chunk_size * row_tokens
    return kept + transient


def sampler_bytes(model: ModelConfig, mesh, local_rows: int, prompt_width: int, new_tokens: int,
                  prefill_rows: int = 0) -> tuple[int, int, int]:
    """(KV cache, engine prefix store, per-step temporaries) of the sampler on one device.

    Each of ``local_rows`` rows (or engine slots) caches prompt width + new tokens − 1 positions,
    kv heads split over ``tensor`` (`sampling.row_shardings`); the engine's ``prefill_rows``
    prefilled prompts are on every row group (kv heads split too), with their float32 logits; a
    decode step copies one layer's keys and values and holds [rows, vocabulary] float32 logits."""
    width = np.dtype(model.compute_dtype).itemsize
    per_position = 2 * model.num_hidden_layers * model.head_dim * width  # keys + values, all layers
    cache = local_rows * (prompt_width + new_tokens - 1) * _local(model.num_key_value_heads, mesh, "kv_heads") \
        * per_position
    prefixes = prefill_rows * (prompt_width * _local(model.num_key_value_heads, mesh, "kv_heads") * per_position
                               + 4 * model.vocab_size)
    temporaries = cache // model.num_hidden_layers + 4 * local_rows * _local(model.vocab_size, mesh, "vocab")
    return cache, prefixes, temporaries


def _ways(mesh, logical: str) -> int:
    """How many ways the rules table splits a ``logical`` axis on ``mesh`` (absent axes count 1)."""
    return math.prod(mesh.shape.get(axis, 1) for axis in DEFAULT_RULES[logical].mesh_axes)


def plan(config: TrainConfig | str, mesh_shape: Sequence[int], device_memory: int | str | None = None,
         model: ModelConfig | None = None) -> MemoryPlan:
    """The per-device memory of ``config`` (a `TrainConfig`, preset name or JSON path) on a mesh of
    ``mesh_shape`` (data, fsdp, tensor); ``device_memory`` (bytes or '80GiB') adds a verdict.
    ``model`` overrides the architecture `model_config` finds."""
    config = load_config(config) if isinstance(config, str) else config
    shape = parse_mesh(mesh_shape)
    mesh = AbstractMesh(shape, MESH_AXES[: len(shape)])
    model = model or model_config(config)
    rollout, algo = config.rollout, config.algo
    row_tokens = config.data.max_prompt_tokens + rollout.max_response_tokens
    sequences = rollout.prompts_per_step * rollout.n
    rows = min(algo.micro_batch_size, sequences // algo.mini_batches)
    data = _ways(mesh, "batch")
    if rows % data:
        raise ConfigError(f"algo.micro_batch_size ({rows} rows) must divide by the mesh's data axis ({data})")
    parameters = parameter_bytes(model, mesh)
    optimizer = 2 * parameters  # AdamW μ and ν, placed like their parameters, in their dtype
    step_tokens = -(-sequences // data) * row_tokens
    batch = _STEP_TOKEN_ARRAYS * 4 * step_tokens
    local_rows = rows // data
    vocab = _local(model.vocab_size, mesh, "vocab")
    logits = _LOGIT_BUFFERS * 4 * local_rows * min(config.model.logprob_chunk_size, row_tokens) * vocab
    round_rows = rollout.prompts_per_round * rollout.n
    engine = rollout.sampler == "engine"
    sampler_rows = -(-min(rollout.engine_slots, round_rows) // data) * data if engine else round_rows
    sampler_local = -(-sampler_rows // data)
    kv_cache, prefix_store, sampler_temporaries = sampler_bytes(
        model, mesh, sampler_local, config.data.max_prompt_tokens + PROMPT_BUCKET_SLACK, rollout.max_response_tokens,
        prefill_rows=EngineConfig().prefill_batch if engine else 0)
    memory = None if device_memory is None else (parse_bytes(device_memory) if isinstance(device_memory, str)
                                                 else int(device_memory))
    return MemoryPlan(
        config_name=config.name, mesh_shape=dict(zip(mesh.axis_names, shape)), model=model, remat=model.remat,
        micro_batch_rows=rows, row_tokens=row_tokens, parameters=parameters, optimizer=optimizer,
        gradients=parameters + parameters * 4 // np.dtype(model.dtype).itemsize, batch=batch,
        activations=activation_bytes(model, mesh, rows, row_tokens, model.remat),
        activations_other_remat=activation_bytes(model, mesh, rows, row_tokens, _other_remat(model.remat)),
        logprob_chunks=logits, kv_cache=kv_cache, kv_cache_rows=sampler_local, prefix_store=prefix_store,
        sampler_temporaries=sampler_temporaries, device_memory=memory)


def _with(config: TrainConfig, section: str, **changes) -> TrainConfig:
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


def _mesh_shapes(devices: int) -> list[tuple[int, int, int]]:
    """Every (data, fsdp, tensor) over ``devices`` devices with tensor ≤ 8 (one host's links)."""
    return [(d, devices // (d * t), t) for t in (1, 2, 4, 8) for d in range(1, devices + 1)
            if devices % (d * t) == 0]


def suggestions(config: TrainConfig | str, mesh_shape: Sequence[int], device_memory: int | str,
                model: ModelConfig | None = None) -> list[str]:
    """Settings that make ``config`` fit (each alone, re-planned): remat, a smaller micro-batch, a
    smaller log-prob chunk, fewer engine slots, other mesh shapes over the same devices."""
    config = load_config(config) if isinstance(config, str) else config
    model = model or model_config(config)
    base = plan(config, mesh_shape, device_memory, model)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fipo_jax.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a preset name or a JSON config file")
    parser.add_argument("--mesh", required=True, help="data,fsdp,tensor sizes, e.g. 2,16,4 (64 devices)")
    parser.add_argument("--device-memory", default=None, help="per-device memory, e.g. 80GiB (H100), 95GiB (v5p)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, as train.py")
    args = parser.parse_args(argv)
    from fipo_jax.config import apply_overrides

    try:
        config = apply_overrides(load_config(args.config), args.set)
        result = plan(config, args.mesh, args.device_memory)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    m = result.model
    print(f"{result.config_name} on mesh {result.mesh_shape} — model L={m.num_hidden_layers} D={m.hidden_size} "
          f"F={m.intermediate_size} H={m.num_attention_heads}/{m.num_key_value_heads} V={m.vocab_size} "
          f"{m.dtype}/{m.compute_dtype}; micro-batch {result.micro_batch_rows} rows × {result.row_tokens} tokens")
    print(result.table())
    if result.device_memory is None:
        return 0
    spare = result.device_memory - result.peak
    if result.fits:
        print(f"fits in {_gib(result.device_memory)}: {_gib(spare)} to spare ({spare / result.device_memory:.0%})")
        return 0
    print(f"does NOT fit in {_gib(result.device_memory)}: {_gib(-spare)} over")
    for line in suggestions(config, args.mesh, result.device_memory, result.model):
        print(f"  would fit with {line}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
