"""The decoder-only causal LM of every supported family (Qwen2/2.5, Qwen3, Llama 3, Gemma 3).

    h⁰ = E[ids] (· √D when scale_embeddings)                       E: [V, D]
    for each layer ℓ (type full or sliding, RoPE of its type):
        a   = Attn(RMSNorm(hˡ))                    q/k normed per head when qk_norm; GQA; window
        hˡ' = hˡ + (RMSNorm(a) if sandwich_norms else a)
        m   = MLP(RMSNorm(hˡ'))                    act(x W_gate) ⊙ (x W_up), then W_down
        hˡ⁺¹ = hˡ' + (RMSNorm(m) if sandwich_norms else m)
    logits = RMSNorm(hᴸ) W_lm                                       W_lm = Eᵀ when tied

Padding: `attention_mask` [B, T] (True = real token) removes pad keys from attention; RoPE
positions default to `cumsum(mask) − 1`, so a left-padded row gets positions 0, 1, … for its
real tokens and computes exactly what that row would compute alone (sliding windows included:
they are measured in positions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fipo_jax.core import _checks
from fipo_jax.core.segments import check_segment_ids, segment_cumsum
from fipo_jax.models.attention import AttentionMask
from fipo_jax.models.config import ModelConfig
from fipo_jax.models.kv_cache import KVCache, LayerCache, init_kv_cache, query_slots, write_row_slots
from fipo_jax.models.layers import AXIS_EMBED, AXIS_LAYERS, AXIS_VOCAB, MLP, Attention, DenseGeneral, Embed, RMSNorm
from fipo_jax.models.rope import rope_cos_sin


def positions_from_mask(mask_BxT: jax.Array, start_B: jax.Array | None = None,
                        segment_ids_BxT: jax.Array | None = None) -> jax.Array:
    """RoPE positions p_bt = start_b + (#real tokens in row b up to and including t) − 1.

    Real tokens get consecutive positions starting at `start_b` (0 by default) whatever the
    padding; pad tokens get the position of the preceding real token (clipped at 0), which is
    harmless because pad keys are masked out. With `segment_ids_BxT` (packed sequences) the
    count restarts at 0 wherever the id changes.
    """
    counts_BxT = segment_cumsum(mask_BxT, segment_ids_BxT)
    if start_B is not None:
        counts_BxT = counts_BxT + start_B.astype(jnp.int32)[:, None]
    return jnp.maximum(counts_BxT - 1, 0)


class DecoderLayer(nnx.Module):
    """Pre-norm residual block, with post-norms too when `sandwich_norms` (see module doc)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        # Nothing layer-type specific is stored: every layer has the same graph, so the layers are
        # one scan over stacked parameters (the window and RoPE come in as arguments).
        self.attn_norm = RMSNorm(config)
        self.self_attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config)
        self.mlp = MLP(config, rngs=rngs)
        self.attn_output_norm: RMSNorm | None
        self.mlp_output_norm: RMSNorm | None
        if config.sandwich_norms:
            self.attn_output_norm = RMSNorm(config)
            self.mlp_output_norm = RMSNorm(config)
        else:
            self.attn_output_norm = self.mlp_output_norm = None

    def __call__(
        self,
        x_BxTxD: jax.Array,
        cos_BxTxK: jax.Array,
        sin_BxTxK: jax.Array,
        mask: AttentionMask,
        window: int | jax.Array | None = None,
        cache: LayerCache | None = None,
        write_index: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        attn_BxTxD, new_cache = self.self_attn(self.attn_norm(x_BxTxD), cos_BxTxK, sin_BxTxK, mask, window,
                                               cache, write_index)
        if self.attn_output_norm is not None:
            attn_BxTxD = self.attn_output_norm(attn_BxTxD)
        x_BxTxD = x_BxTxD + attn_BxTxD
        mlp_BxTxD = self.mlp(self.mlp_norm(x_BxTxD))
        if self.mlp_output_norm is not None:
            mlp_BxTxD = self.mlp_output_norm(mlp_BxTxD)
        return x_BxTxD + mlp_BxTxD, new_cache


# A window no position difference reaches: "full attention" for a layer scanned with sliding ones.
_NO_WINDOW = 2**30

# `ModelConfig.remat` → what a layer step saves for the backward pass (None: everything, no remat).
CHECKPOINT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stack_layers(layers: list[DecoderLayer]) -> DecoderLayer:
    """One `DecoderLayer` whose every variable holds the L layers' values stacked on a leading
    ``layers`` axis (logical axis "layers" prepended to its sharding metadata): what the layer
    scan reads, one layer per step, and what checkpoints, the optimizer and the rules table see."""
    def stack(*variables: nnx.Variable) -> nnx.Variable:
        axes = variables[0].get_metadata().get("out_sharding")
        return variables[0].replace(jnp.stack([v.get_value() for v in variables]),
                                    out_sharding=None if axes is None else (AXIS_LAYERS, *axes))

    states = [nnx.state(layer) for layer in layers]
    stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(nnx.graphdef(layers[0]), stacked)


class CausalLM(nnx.Module):
    """Decoder-only causal LM; `config` decides the family. Parameter paths: see `families`.

    Call forms (all shapes static; B batch, T new tokens, V vocab, D hidden):

      logits_BxTxV = model(input_ids_BxT, positions_BxT=None, attention_mask_BxT=None)
          Full forward. Default mask: all True. Default positions: cumsum(mask) − 1, i.e.
          0..T−1 without padding, per-row 0-based real-token positions with left padding.

      logits_BxTxV, cache = model.extend(input_ids_BxT, cache, positions, attention_mask)
          Cached forward: writes the T new keys/values
          at slots [cache.index, cache.index + T), marks those slots valid where
          attention_mask is True, attends causally over every valid slot ≤ its own, and returns
          the cache with index += T and next_position_B advanced past the row's real tokens.
          Default positions: cache.next_position_B + cumsum(mask) − 1. The caller must keep
          cache.index + T ≤ cache.max_len (dynamic_update_slice would clamp silently). A cache
          whose index is [B] (one write slot per row, `KVCache`) takes T = 1: row b writes at its
          own slot, all rows in one batched update (the engine's decode slots).

      logits_BxV, cache = model.prefill(prompt_ids_BxP, prompt_mask_BxP, cache)
      logits_BxV, cache = model.decode_step(tokens_B, emitting_B, cache)
          The samplers' two cached calls: the last prompt position's logits (real for every
          left-padded row), and one token per row.

    The L decoder layers are one `DecoderLayer` module whose parameters are stacked on a leading
    ``layers`` axis (`stack_layers`), run as one `lax.scan` in every call form: compile time
    does not grow with depth, and no call restacks the weights. Logits are float32. For log-probs
    without a [B, T, V] tensor use `hidden_states` + `unembedding` / `unembed` on chunks.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embed(config, rngs=rngs)
        # Initialised layer by layer (the same values as L separate layers), then stacked.
        self.layers = stack_layers([DecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = DenseGeneral("btd,dv->btv", (config.hidden_size, config.vocab_size),
                                        (AXIS_EMBED, AXIS_VOCAB), config, rngs=rngs)

    # -- output head ------------------------------------------------------------------------

    def unembedding(self) -> jax.Array:
        """The LM-head matrix W [D, V] (Eᵀ when embeddings are tied), in the param dtype."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def unembed(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """logits = h W in float32 (accumulated in float32 whatever the compute dtype).

        Tied: contracted with E [V, D] directly — materialising Eᵀ would copy the whole table
        on every decode step (0.7 GB at Gemma 3's 262k vocabulary)."""
        if self.lm_head is None:
            embedding_VxD = self.embed_tokens.embedding[...].astype(hidden_BxTxD.dtype)
            return jnp.einsum("...d,vd->...v", hidden_BxTxD, embedding_VxD, preferred_element_type=jnp.float32)
        weight_DxV = self.lm_head.kernel[...].astype(hidden_BxTxD.dtype)
        return jnp.einsum("...d,dv->...v", hidden_BxTxD, weight_DxV, preferred_element_type=jnp.float32)

    # -- trunk ------------------------------------------------------------------------------

    def _layer_inputs(self, positions_BxT: jax.Array):
        """Per-layer scanned data and the RoPE lookup: (window_L or None, type_index_L, rope),
        where ``rope(type_index)`` gives the layer's (cos, sin). RoPE tables are computed once per
        forward for each layer type present; windows are per-layer data only when some layer
        slides (full layers then get a window no position difference reaches)."""
        config = self.config
        layer_types = config.every_layer_type
        types = sorted(set(layer_types))
        head_dim = config.head_dim
        assert head_dim is not None  # ModelConfig.__post_init__ resolves it
        tables = [rope_cos_sin(positions_BxT, head_dim, *config.rope(t)) for t in types]
        type_index_L = jnp.asarray([types.index(t) for t in layer_types], jnp.int32)
        window_L = (jnp.asarray([config.window(t) or _NO_WINDOW for t in layer_types], jnp.int32)
                    if config.sliding_window is not None and "sliding_attention" in layer_types else None)
        if len(tables) == 1:
            return window_L, type_index_L, lambda _: tables[0]
        cos_YxBxTxK = jnp.stack([cos for cos, _ in tables])
        sin_YxBxTxK = jnp.stack([sin for _, sin in tables])
        return window_L, type_index_L, lambda index: (cos_YxBxTxK[index], sin_YxBxTxK[index])

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [B, T, D] (compute dtype) of a full forward pass.

        `segment_ids` (int [B, T], optional) packs several sequences in a row: a token attends
        only to its own segment, and default positions restart at 0 in each segment, so every
        packed sequence computes what it computes alone.

        The layers run as one `lax.scan` over their stacked parameters; `config.remat` chooses
        what each step keeps for the backward pass (`CHECKPOINT_POLICIES`): with "full" only the
        L layer inputs are kept (Gemma 3 270M, 8 × 512 tokens on XLA:CPU: forward + backward
        temporaries 1.4 GiB, against 9.6 GiB for the unrolled loop an earlier version ran).
        """
        mask_BxT = self._check_inputs(input_ids, positions, attention_mask)
        if segment_ids is not None:
            check_segment_ids(segment_ids, input_ids.shape)
        if positions is None:
            positions = positions_from_mask(mask_BxT, segment_ids_BxT=segment_ids)
        positions = positions.astype(jnp.int32)
        window_L, type_index_L, rope = self._layer_inputs(positions)
        mask = AttentionMask(jnp.arange(input_ids.shape[1], dtype=jnp.int32), mask_BxT, positions, positions,
                             segment_ids, segment_ids)
        graphdef, stacked = nnx.split(self.layers)

        def step(x_BxTxD, per_layer):
            state, type_index, window = per_layer  # window: None when no layer slides
            layer = nnx.merge(graphdef, state)
            return layer(x_BxTxD, *rope(type_index), mask, window)[0], None

        policy = self.config.remat
        if policy != "none":
            step = jax.checkpoint(step, prevent_cse=False, policy=CHECKPOINT_POLICIES[policy])
        x_BxTxD = self.embed_tokens(input_ids, self.config.activation_dtype)
        x_BxTxD, _ = jax.lax.scan(step, x_BxTxD, (stacked, type_index_L, window_L))
        return self.norm(x_BxTxD)

    def hidden_states_with_cache(
        self,
        input_ids: jax.Array,
        kv_cache: KVCache,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Cached forward (see class docstring): final-normed hidden [B, T, D] and new cache.

        The layer scan carries the stacked cache: step ℓ writes the new keys / values into layer
        ℓ in place and reads only that layer."""
        mask_BxT = self._check_inputs(input_ids, positions, attention_mask)
        seq_len = input_ids.shape[1]
        layers = self.config.num_hidden_layers
        _check_cache_fits(kv_cache, input_ids.shape, layers)
        if positions is None:
            positions = positions_from_mask(mask_BxT, kv_cache.next_position_B)
        positions = positions.astype(jnp.int32)
        window_L, type_index_L, rope = self._layer_inputs(positions)
        index = kv_cache.index
        valid_BxS = write_row_slots(kv_cache.valid_BxS, mask_BxT, index)
        positions_BxS = write_row_slots(kv_cache.positions_BxS, positions, index)
        mask = AttentionMask(query_slots(index, seq_len), valid_BxS, positions, positions_BxS)
        graphdef, stacked = nnx.split(self.layers)

        def step(carry, per_layer):
            x_BxTxD, keys, values = carry
            state, type_index, window, layer_index = per_layer
            layer = nnx.merge(graphdef, state)
            x_BxTxD, cache = layer(x_BxTxD, *rope(type_index), mask, window, LayerCache(keys, values, layer_index),
                                   index)
            return (x_BxTxD, cache.keys, cache.values), None

        x_BxTxD = self.embed_tokens(input_ids, self.config.activation_dtype)
        (x_BxTxD, keys, values), _ = jax.lax.scan(
            step, (x_BxTxD, kv_cache.keys, kv_cache.values),
            (stacked, type_index_L, window_L, jnp.arange(layers, dtype=jnp.int32)))
        # Next position = last real position + 1; rows with no real token keep their counter.
        last_real_B = jnp.max(jnp.where(mask_BxT, positions, -1), axis=1)
        next_position_B = jnp.where(jnp.any(mask_BxT, axis=1), last_real_B + 1, kv_cache.next_position_B)
        new_cache = KVCache(
            keys=keys,
            values=values,
            valid_BxS=valid_BxS,
            positions_BxS=positions_BxS,
            next_position_B=next_position_B.astype(jnp.int32),
            index=(index + seq_len).astype(jnp.int32),
        )
        return self.norm(x_BxTxD), new_cache

    # -- logits -----------------------------------------------------------------------------

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] float32 of a full forward (`segment_ids`: packed sequences, see
        `hidden_states`)."""
        return self.unembed(self.hidden_states(input_ids, positions, attention_mask, segment_ids))

    def extend(
        self,
        input_ids: jax.Array,
        kv_cache: KVCache,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """(logits [B, T, V] float32, the cache with the T new tokens): the cached forward."""
        hidden_BxTxD, cache = self.hidden_states_with_cache(input_ids, kv_cache, positions, attention_mask)
        return self.unembed(hidden_BxTxD), cache

    def prefill(self, prompt_ids: jax.Array, prompt_mask: jax.Array, kv_cache: KVCache) -> tuple[jax.Array, KVCache]:
        """(next-token logits [B, V] after each left-padded prompt, the cache holding the prompts);
        only the last position goes through the LM head."""
        hidden_BxTxD, cache = self.hidden_states_with_cache(prompt_ids, kv_cache, None, prompt_mask)
        return self.unembed(hidden_BxTxD[:, -1]), cache

    def decode_step(self, tokens: jax.Array, emitting: jax.Array, kv_cache: KVCache) -> tuple[jax.Array, KVCache]:
        """(next-token logits [B, V], the cache with one more token per row): ``tokens`` [B] fed where
        ``emitting`` [B]; a row that does not emit feeds a masked token (its cache slot stays
        invalid and its position does not advance)."""
        hidden_Bx1xD, cache = self.hidden_states_with_cache(tokens[:, None], kv_cache, None, emitting[:, None])
        return self.unembed(hidden_Bx1xD[:, 0]), cache

    def init_kv_cache(self, batch_size: int, max_len: int, dtype: str | jnp.dtype | None = None) -> KVCache:
        """`init_kv_cache(self.config, batch_size, max_len, dtype)`."""
        return init_kv_cache(self.config, batch_size, max_len, dtype)

    # -- validation -------------------------------------------------------------------------

    def _check_inputs(self, input_ids: jax.Array, positions: jax.Array | None,
                      attention_mask: jax.Array | None) -> jax.Array:
        """Validates shapes/dtypes at trace time; returns the bool mask (default all True)."""
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer [B, T] array, got {input_ids.dtype}{list(input_ids.shape)}")
        _checks.check_token_ids("input_ids", input_ids, self.config.vocab_size)
        if positions is not None and (positions.shape != input_ids.shape
                                      or not jnp.issubdtype(positions.dtype, jnp.integer)):
            raise ValueError(f"positions must be an integer array of shape {input_ids.shape}, "
                             f"got {positions.dtype}{list(positions.shape)}")
        if attention_mask is None:
            return jnp.ones(input_ids.shape, jnp.bool_)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have shape {input_ids.shape}, got {attention_mask.shape}")
        return attention_mask.astype(jnp.bool_)


def _check_cache_fits(kv_cache: KVCache, input_shape: tuple[int, ...], layers: int) -> None:
    """Raise ValueError unless ``kv_cache`` is a stacked [B, L, N, S, K] cache of this batch with room
    for the new tokens (the slot index is only checkable outside jit)."""
    batch, seq_len = input_shape
    if kv_cache.keys.ndim != 5 or kv_cache.keys.shape[1] != layers:
        raise ValueError(f"kv_cache keys must be [B, {layers} layers, N, S, K], got {list(kv_cache.keys.shape)} "
                         "(make it with init_kv_cache)")
    if kv_cache.valid_BxS.shape[0] != batch:
        raise ValueError(f"kv_cache batch {kv_cache.valid_BxS.shape[0]} != input batch {batch}")
    if seq_len > kv_cache.max_len:
        raise ValueError(f"{seq_len} new tokens do not fit a cache of {kv_cache.max_len} slots")
    if kv_cache.index.ndim not in (0, 1) or (kv_cache.index.ndim == 1 and kv_cache.index.shape != (batch,)):
        raise ValueError(f"kv_cache index must be a scalar or one slot per row [{batch}], got "
                         f"{list(kv_cache.index.shape)}")
    if kv_cache.index.ndim == 1 and seq_len != 1:
        raise ValueError(f"a cache with one write index per row takes one new token per row, got {seq_len}")
    if not isinstance(kv_cache.index, jax.core.Tracer) and int(jnp.max(kv_cache.index)) + seq_len > kv_cache.max_len:
        raise ValueError(f"{seq_len} new tokens at slot {int(jnp.max(kv_cache.index))} do not fit a cache of "
                         f"{kv_cache.max_len} slots")
