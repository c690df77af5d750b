"""What the compiled update, decode and prefill programs hold per device beyond their inputs: the planner's model.

Exact pieces (parameters, moments, gradients, the batch, the KV cache) are counted in `fipo_jax.train.plan`;
this module models the temporaries XLA allocates on one device, from the layout the rules table gives:

    update  = gradients + max(kept activations + max(backward, loss) + tied embedding's gradient,
                              optimizer step)                                 (each term × margin)
    decode  = one layer's weights (sliced from the stack) + cache blocks read + prompts copied
              into refilled slots + a cache reshard (see `decode_temporaries`)    (× decode margin)
    prefill = one layer's weights + a new cache (the engine's) + the queries' float32 scores
              against the cache + a layer's widths per token (see `prefill_temporaries`)  (× margin)

* **Kept activations** (`kept_per_token`) — what each step of the layer scan saves for the
  backward pass, per token and layer, by remat policy: "none" every residual, "dots" the weight
  matmuls' outputs (2·D + H·K + 2·N·K + 2·F, + D with sandwich norms), "full" the layer's input
  (D). Measured as the per-layer slope of the compiled update's temporaries (cases compiled at L
  and L + 2 layers; the family features from an ablation of a Llama layer): "dots" and "full"
  match to the byte, "none" within 6 % for Qwen / Llama layers.
* **Working sets** (`Fitted`) — one layer's backward (with remat, its recomputed forward), the
  loss's log-prob chunks, the tied embedding's gradient, the optimizer step (the non-finite skip
  keeps new parameters and moments beside the old until all are known finite) and the decode
  call's buffers: constants fitted by least squares (``python experiments/fit_plan_model.py``).

Widths are one device's share: rows over ``data``; the residual stream over ``fsdp`` (XLA splits
it after the weights' ``embed`` axis), part of it over ``fsdp × tensor``; heads, kv heads (when they
divide), MLP and vocabulary over ``tensor``. Working sets count float32 bytes (XLA:CPU computes
bfloat16 matmuls and all-reduces in float32).

Calibration: XLA:CPU's ``memory_analysis`` on 8 fake devices over 76 generated layouts (model shape ×
mesh × remat × dtype, `tests/plan_family.py`; ``experiments/plan_calibration/``). Fitted alone, the
working sets put the compiled peak at 0.88–1.15 (update) and 0.84–1.08 (decode); the margins lift
the lower ends above 0.95. GPU / TPU compilers fuse more, so there the model should err high; no
accelerator has checked this version (one H200 put the previous model at 0.93–1.23 of the real peak).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fipo_jax.models import ModelConfig
from fipo_jax.parallel.sharding import logical_sharding, ways

F32 = 4


@dataclasses.dataclass(frozen=True)
class Fitted:
    """The working-set constants: multiples of the widths named (float32 bytes per token unless
    said otherwise), fitted to XLA:CPU by ``experiments/fit_plan_model.py``, and the margins."""

    fixed: float = 0.49e6  # bytes every update program holds
    heads: float = 0.73  # per query + key/value width, in any layer backward
    none_hidden: float = 12.27  # a layer backward without remat: residual-stream buffers
    none_mlp: float = 3.01
    none_scores: float = 1.83  # per float32 score of one query
    recompute: float = 0.73  # with remat: share of a "none" layer's residuals (float32) recomputed
    remat_hidden: float = 1.04
    remat_mlp: float = 1.0
    remat_scores: float = 0.65
    logits: float = 3.49  # live [rows, chunk, vocabulary] float32 buffers of the loss
    loss_hidden: float = 5.71
    tied_table: float = 1.4  # [V, D] float32 gradients of a tied embedding
    optimizer_parameters: float = 0.91  # × the parameters' bytes
    optimizer_largest: float = 2.78  # × the largest tensor's float32 bytes (a layer's slice)
    decode_fixed: float = 1.2e5  # bytes
    decode_layer: float = 0.95  # × one layer's parameter bytes
    decode_blocks: float = 0.57  # × the float32 key / value blocks a decode step reads
    decode_inserted: float = 0.33  # × the prompts' keys and values copied into the slots
    decode_reshard: float = 0.57  # × the KV cache, when XLA reshards it (see `decode_temporaries`)
    prefill_scores: float = 2.2  # × the float32 scores of a prefill's queries (scores, probabilities, masks)
    prefill_tokens: float = 0.7  # × a prefill token's float32 widths (residual, q, k, v, MLP)
    margin: float = 1.15  # the update's and the prefill's modelled terms
    decode_margin: float = 1.4  # the decode temporaries


FITTED = Fitted()
# The highest planned / compiled peak measured over the calibration layouts: a plan this much over
# the memory may still fit; one beyond it cannot (`fipo_jax.train.preflight` refuses only those).
HIGHEST_MEASURED_RATIO = 1.30


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


def local(dim: int, mesh, logical: str) -> int:
    """Size of a ``logical`` dimension on one device (the rules table's placement)."""
    return logical_sharding((logical,), (dim,), mesh, name=logical).shard_shape((dim,))[0]


def local_dims(model: ModelConfig, mesh, rows: int, row_tokens: int) -> LocalDims:
    rows_here = rows // ways("batch", mesh)
    hidden = local(model.hidden_size, mesh, "embed")
    heads = local(model.num_attention_heads, mesh, "heads")
    head_dim = model.head_dim
    assert head_dim is not None  # ModelConfig.__post_init__ resolves it
    return LocalDims(
        tokens=rows_here * row_tokens, rows=rows_here, row_tokens=row_tokens, hidden=hidden,
        hidden_split=max(1, hidden // ways("heads", mesh)), query=heads * head_dim,
        key_value=local(model.num_key_value_heads, mesh, "kv_heads") * head_dim,
        mlp=local(model.intermediate_size, mesh, "mlp"), heads=heads, vocab=local(model.vocab_size, mesh, "vocab"),
        compute_bytes=np.dtype(model.compute_dtype).itemsize)


# -- the update ---------------------------------------------------------------------------------


def _attended(model: ModelConfig, dims: LocalDims) -> int:
    """Keys whose float32 score a layer keeps per query: the row, or none when query chunks
    rematerialise their scores."""
    chunk = model.attention_chunk_size
    chunked = bool(chunk and chunk < dims.row_tokens)
    return 0 if chunked else dims.row_tokens


def _scores_per_token(model: ModelConfig, dims: LocalDims) -> float:
    """Float32 bytes of one query's attention scores on this device (its row, or one query chunk)."""
    return F32 * dims.heads * min(model.attention_chunk_size or dims.row_tokens, dims.row_tokens)


def kept_per_token(model: ModelConfig, dims: LocalDims, policy: str) -> float:
    """Bytes one layer keeps per token for the backward pass under remat ``policy`` (measured)."""
    w, d = dims.compute_bytes, dims
    if policy == "full":
        return w * d.hidden
    if policy == "dots":
        return w * ((3 if model.sandwich_norms else 2) * d.hidden + d.query + 2 * d.key_value + 2 * d.mlp)
    kept = (w * (5.44 * d.hidden + 5.96 * d.hidden_split + 2.25 * (d.query + d.key_value) + 6 * d.mlp)
            + 2 * F32 * d.heads * _attended(model, d))
    if model.qk_norm:  # the per-head norms' statistics are float32
        kept += (1.96 * F32 + 1.14 * w) * (d.query + d.key_value)
    if model.sandwich_norms:  # two more norms of the residual stream (their bfloat16 casts add bytes)
        kept += (32.8 - 2 * w) * d.hidden
    if model.hidden_activation == "gelu_pytorch_tanh":
        kept += w * d.mlp
    if "sliding_attention" in model.every_layer_type:  # per-layer windows: each layer's own mask
        kept += d.heads * _attended(model, d)
    return kept


def backward_working_set(model: ModelConfig, dims: LocalDims, policy: str, fitted: Fitted = FITTED) -> float:
    """Bytes one layer's backward holds beyond what the layers keep; with remat, also part of its
    recomputed forward."""
    d, f = dims, fitted
    per_token = F32 * f.heads * (d.query + d.key_value)
    if policy == "none":
        per_token += F32 * (f.none_hidden * d.hidden + f.none_mlp * d.mlp) + f.none_scores * _scores_per_token(model, d)
    else:
        recomputed = kept_per_token(model, dataclasses.replace(d, compute_bytes=F32), "none")
        per_token += (f.recompute * recomputed + F32 * (f.remat_hidden * d.hidden + f.remat_mlp * d.mlp)
                      + f.remat_scores * _scores_per_token(model, d))
    return f.margin * (f.fixed + d.tokens * per_token)


def loss_working_set(dims: LocalDims, chunk: int, fitted: Fitted = FITTED) -> float:
    """The loss's live [rows, chunk, vocabulary] float32 log-prob buffers and residual-stream-sized
    float32 buffers."""
    d, f = dims, fitted
    return f.margin * (f.fixed + F32 * (f.logits * d.rows * min(chunk, d.row_tokens) * d.vocab
                                        + f.loss_hidden * d.tokens * d.hidden))


def embedding_gradient(model: ModelConfig, dims: LocalDims, fitted: Fitted = FITTED) -> float:
    """Tied embeddings: the [V, D] float32 gradients the lookup and the LM head add into."""
    return fitted.margin * fitted.tied_table * F32 * dims.vocab * dims.hidden if model.tie_word_embeddings else 0.0


def optimizer_working_set(parameter_bytes: int, largest_tensor_bytes: int, fitted: Fitted = FITTED) -> float:
    """New parameters and moments held beside the old ones until the non-finite check has seen
    them all, and the update's float32 intermediates of the largest tensor (``largest_tensor_bytes``:
    its float32 bytes on this device; a layer's slice for the stacked layer parameters)."""
    f = fitted
    return f.margin * (f.fixed + f.optimizer_parameters * parameter_bytes + f.optimizer_largest * largest_tensor_bytes)


# -- decoding ---------------------------------------------------------------------------------


def decode_temporaries(model: ModelConfig, mesh, slots: int, layer_parameter_bytes: int, prompt_width: int,
                       cache_length: int, kv_cache_bytes: int, fitted: Fitted = FITTED) -> float:
    """Bytes a decode call holds beyond its inputs on one device with ``slots`` rows: one layer's
    weights sliced out of the stack, the key / value blocks a step reads (float32), the prompts'
    keys and values copied into refilled slots, and — when the kv heads are replicated over a tensor
    axis they share a factor with (2 kv heads on 4 devices) — XLA's reshard of the cache around the
    layer scan (it splits the heads inside the scan and gathers the whole cache back)."""
    f = fitted
    assert model.head_dim is not None  # ModelConfig.__post_init__ resolves it
    kv_width = local(model.num_key_value_heads, mesh, "kv_heads") * model.head_dim
    block = min(model.decode_block_size or cache_length, cache_length)
    blocks = 2 * slots * block * kv_width * F32
    inserted = 2 * slots * model.num_hidden_layers * kv_width * prompt_width * np.dtype(model.compute_dtype).itemsize
    heads, tensor = model.num_key_value_heads, ways("kv_heads", mesh)
    reshard = kv_cache_bytes if heads % tensor and math.gcd(heads, tensor) > 1 else 0
    return f.decode_margin * (f.decode_fixed + f.decode_layer * layer_parameter_bytes + f.decode_blocks * blocks
                              + f.decode_inserted * inserted + f.decode_reshard * reshard)


def prefill_temporaries(model: ModelConfig, mesh, rows: int, prompt_width: int, cache_length: int,
                        layer_parameter_bytes: int, new_cache_bytes: int = 0, fitted: Fitted = FITTED) -> float:
    """Bytes a prefill (one forward over ``rows`` prompts of ``prompt_width`` tokens, writing a
    cache of ``cache_length`` slots) holds beyond its inputs on one device: one layer's weights, the
    cache it fills when that is new (the engine's ``new_cache_bytes``), a layer's float32 widths per
    token, and each query's float32 scores against every slot — all the prompt's queries at once,
    or one chunk of ``attention_chunk_size`` of them. The scores grow as prompt width × cache
    length: a 40k-token prompt needs H · 40k² · 4 B per row and layer step.

        scores = 4 · rows · H/tensor · min(chunk, P) · S
        prefill = margin · (fixed + layer + new cache + prefill_scores · scores
                            + prefill_tokens · 4 · rows · P · (D + q + 2 kv + 2 F/tensor))

    Fitted on XLA:CPU's compiled engine prefill and static sampler (1 device, prompts of 128 to
    2,048 tokens, chunked and not, float32 and bfloat16): scores × 2.05–2.33 where they dominate;
    the planned prefill program is 1.07–1.30 of the compiled one (`tests/test_plan_faults.py`)."""
    f = fitted
    assert model.head_dim is not None  # ModelConfig.__post_init__ resolves it
    heads = local(model.num_attention_heads, mesh, "heads")
    queries = min(model.attention_chunk_size or prompt_width, prompt_width)
    scores = F32 * rows * heads * queries * cache_length
    widths = (model.hidden_size + heads * model.head_dim + 2 * local(model.num_key_value_heads, mesh, "kv_heads")
              * model.head_dim + 2 * local(model.intermediate_size, mesh, "mlp"))
    per_tokens = F32 * rows * prompt_width * widths
    return f.margin * (f.decode_fixed + layer_parameter_bytes + new_cache_bytes + f.prefill_scores * scores
                       + f.prefill_tokens * per_tokens)
