"""What the compiled update and decode programs hold per device beyond their inputs: the planner's model.

Exact pieces (parameters, moments, the batch, the KV cache) are counted in `fipo_jax.plan`; this
module models the temporaries XLA allocates, per device, from the layout the rules table gives:

    update temporaries = gradients + max(kept activations + max(backward, loss) working set
                                         + tied embedding gradient, optimizer update working set)
    decode temporaries = one layer's weights (sliced from the stack) + cache blocks read
                         + the prompts copied into slots + logits + a cache reshard (see below)

* **Kept activations** — what each step of the layer scan saves for the backward pass, per token
  and layer, by remat policy (`KEPT`): "none" every residual, "dots" the weight matmuls' outputs
  (exactly 2·D + H·K + 2·N·K + 2·F, +D with sandwich norms), "full" the layer's input (D). Measured
  as the per-layer slope of the update's temporaries (each case compiled at L and L + 2 layers).
* **Working sets** — one layer's backward (with remat, its recomputed forward), the log-prob
  chunks of the loss, and the optimizer step (the non-finite skip keeps the new parameters and
  moments beside the old ones until every one is known finite): fitted constants.

Widths are one device's share: rows over ``data``; the residual stream over ``fsdp`` (XLA splits
it after the weights' ``embed`` axis), some of it over ``fsdp × tensor``; heads, kv heads (when
they divide), MLP and vocabulary over ``tensor``. The working-set constants count float32 bytes
(XLA:CPU computes bfloat16 matmuls and all-reduces in float32).

Calibration: XLA:CPU's ``memory_analysis`` on 8 fake devices, a generated family of 36 layouts
(model shape × mesh × remat × dtype, `tests/plan_family.py`, seed 7) each at two depths
(``python experiments/calibrate_plan.py --seed 7 --cases 36 --depth-pairs``) and a Gemma-feature
ablation; tested on the seed-2026 family (`tests/test_plan.py`). GPU / TPU compilers fuse more, so
there the model errs high; one H200 run put the earlier model at 0.93–1.23 of the real peak.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fipo_jax.models import ModelConfig
from fipo_jax.sharding import DEFAULT_RULES, logical_sharding

F32 = 4
# Every modelled term is scaled by these: fitted to the whole measured family, the model alone puts
# XLA's peak at 0.88–1.15 (update) and 0.84–1.08 (decode); the planner must not under-count.
MARGIN = 1.15
DECODE_MARGIN = 1.4
FIXED = 0.5e6  # bytes every update program holds whatever the shapes


@dataclasses.dataclass(frozen=True)
class LocalDims:
    """One device's share of a micro-batch and of a layer's widths (the rules table's placement)."""

    tokens: int  # rows on this device × tokens per row
    rows: int
    row_tokens: int
    hidden: int  # D / fsdp
    hidden_split: int  # D / (fsdp · tensor)
    query: int  # H / tensor · K
    key_value: int  # N / tensor · K (N when the tensor axis does not divide the kv heads)
    mlp: int  # F / tensor
    heads: int  # H / tensor
    vocab: int  # V / tensor
    compute_bytes: int  # bytes of one activation in the compute dtype


def ways(mesh, logical: str) -> int:
    """How many ways the rules table splits a ``logical`` axis on ``mesh`` (absent axes count 1)."""
    return math.prod(mesh.shape.get(axis, 1) for axis in DEFAULT_RULES[logical].mesh_axes)


def local(dim: int, mesh, logical: str) -> int:
    """Size of a ``logical`` dimension on one device (the rules table's placement)."""
    return logical_sharding((logical,), (dim,), mesh, name=logical).shard_shape((dim,))[0]


def local_dims(model: ModelConfig, mesh, rows: int, row_tokens: int) -> LocalDims:
    rows_here = rows // ways(mesh, "batch")
    hidden = local(model.hidden_size, mesh, "embed")
    heads = local(model.num_attention_heads, mesh, "heads")
    return LocalDims(
        tokens=rows_here * row_tokens, rows=rows_here, row_tokens=row_tokens, hidden=hidden,
        hidden_split=max(1, hidden // ways(mesh, "heads")), query=heads * model.head_dim,
        key_value=local(model.num_key_value_heads, mesh, "kv_heads") * model.head_dim,
        mlp=local(model.intermediate_size, mesh, "mlp"), heads=heads, vocab=local(model.vocab_size, mesh, "vocab"),
        compute_bytes=np.dtype(model.compute_dtype).itemsize)


# -- the update ---------------------------------------------------------------------------------


def _slides(model: ModelConfig) -> bool:
    return "sliding_attention" in model.every_layer_type


def _attended(model: ModelConfig, dims: LocalDims) -> int:
    """Keys whose float32 score a layer keeps per query: the row, or none when query chunks
    rematerialise their scores."""
    chunked = bool(model.attention_chunk_size) and model.attention_chunk_size < dims.row_tokens
    return 0 if chunked else dims.row_tokens


def kept_per_token(model: ModelConfig, dims: LocalDims, policy: str) -> float:
    """Bytes one layer keeps per token for the backward pass under remat ``policy``."""
    w, d = dims.compute_bytes, dims
    if policy == "full":
        return w * d.hidden
    if policy == "dots":
        return w * ((3 if model.sandwich_norms else 2) * d.hidden + d.query + 2 * d.key_value + 2 * d.mlp)
    kept = (w * (5.44 * d.hidden + 5.96 * d.hidden_split + 2.25 * (d.query + d.key_value) + 6 * d.mlp)
            + 2 * F32 * d.heads * _attended(model, d))
    if model.qk_norm:  # the per-head norms' statistics are float32
        kept += (1.96 * F32 + 1.14 * w) * (d.query + d.key_value)
    if model.sandwich_norms:  # two more norms of the residual stream (their bf16 casts add bytes)
        kept += (32.8 - 2 * w) * d.hidden
    if model.hidden_activation == "gelu_pytorch_tanh":
        kept += w * d.mlp
    if _slides(model):  # a per-layer window: each layer's mask is its own (bool per head and key)
        kept += d.heads * _attended(model, d)
    return kept


def _scores_per_token(model: ModelConfig, dims: LocalDims) -> float:
    """Float32 bytes of one query's attention scores on this device (its row, or one query chunk)."""
    return F32 * dims.heads * min(model.attention_chunk_size or dims.row_tokens, dims.row_tokens)


def backward_working_set(model: ModelConfig, dims: LocalDims, policy: str) -> float:
    """Bytes one layer's backward holds beyond what the layers keep; with remat, also its
    recomputed forward (three quarters of a "none" layer's residuals, in float32)."""
    d = dims
    per_token = F32 * (0.73 * (d.query + d.key_value))
    if policy == "none":
        per_token += F32 * (12.27 * d.hidden + 3.01 * d.mlp) + 1.83 * _scores_per_token(model, d)
    else:
        recomputed = kept_per_token(model, dataclasses.replace(d, compute_bytes=F32), "none")
        per_token += 0.73 * recomputed + F32 * (1.04 * d.hidden + 1.0 * d.mlp) + 0.65 * _scores_per_token(model, d)
    return MARGIN * (FIXED + d.tokens * per_token)


def loss_working_set(dims: LocalDims, chunk: int) -> float:
    """The loss's live [rows, chunk, vocabulary] float32 log-prob buffers (3.5 of them at the peak)
    and residual-stream-sized float32 buffers."""
    d = dims
    return MARGIN * (FIXED + F32 * (3.49 * d.rows * min(chunk, d.row_tokens) * d.vocab + 5.71 * d.tokens * d.hidden))


def embedding_gradient(model: ModelConfig, dims: LocalDims) -> float:
    """Tied embeddings: the [V, D] float32 gradient the lookup and the LM head add into."""
    return MARGIN * 1.4 * F32 * dims.vocab * dims.hidden if model.tie_word_embeddings else 0.0


def optimizer_working_set(parameter_bytes: int, largest_tensor_bytes: int) -> float:
    """New parameters and moments held beside the old ones until the non-finite check has seen
    them all, and the update's float32 intermediates of the largest tensor (``largest_tensor_bytes``:
    its float32 size on this device; a layer's slice for the stacked layer parameters)."""
    return MARGIN * (FIXED + 0.91 * parameter_bytes + 2.78 * largest_tensor_bytes)


# -- decoding ---------------------------------------------------------------------------------


def decode_temporaries(model: ModelConfig, mesh, slots: int, layer_parameter_bytes: int, prompt_width: int,
                       cache_length: int, kv_cache_bytes: int) -> float:
    """Bytes a decode call holds beyond its inputs on one device with ``slots`` rows: one layer's
    weights sliced out of the stack, the key / value blocks a step reads (float32), the prompts
    copied into refilled slots, and — when the kv heads are replicated over a tensor axis they
    share a factor with — XLA's reshard of the cache around the layer scan (about half of it)."""
    kv_width = local(model.num_key_value_heads, mesh, "kv_heads") * model.head_dim
    block = min(model.decode_block_size or cache_length, cache_length)
    blocks = 2 * slots * block * kv_width * F32
    inserted = 2 * slots * model.num_hidden_layers * kv_width * prompt_width * np.dtype(model.compute_dtype).itemsize
    heads, tensor = model.num_key_value_heads, ways(mesh, "kv_heads")
    reshard = kv_cache_bytes if heads % tensor and math.gcd(heads, tensor) > 1 else 0
    return DECODE_MARGIN * (1.2e5 + 0.95 * layer_parameter_bytes + 0.57 * blocks + 0.33 * inserted + 0.57 * reshard)
