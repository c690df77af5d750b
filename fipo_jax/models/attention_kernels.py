"""Full-sequence attention through the accelerators' fused kernels, chosen by `ModelConfig.attention_impl`.

    implementation  backend  kernel                                                  how the mask reaches it
    xla             any      `attention.grouped_query_attention` (this library's)    every mask, windows in positions
    cudnn           gpu      `jax.nn.dot_product_attention(implementation="cudnn")`  causal and window by the kernel,
                                                                                     padding / segments as a bool mask
    splash          tpu      Pallas splash attention (MQA kernel per kv head)        causal and window by the kernel,
                                                                                     padding / segments as segment ids

"auto" takes `AUTO_ATTENTION[backend]`: the XLA form everywhere until a fused path has passed its
hardware test module on real hardware (`tests/test_fused_attention_gpu.py` for cuDNN; none yet for
splash) — an explicit "cudnn" / "splash" opts in before that.

A full forward's queries are its keys (query t at slot t), so every form here is causal over
slots. The fused kernels count a sliding window in slots, the XLA form in RoPE positions: the same
keys whenever a sequence's tokens sit in consecutive slots (left / right padding, packed segments:
everything this library builds); a caller whose positions skip inside a sequence should use "xla".
Pad queries attend to the row's pad keys (never to nothing, so no NaN): finite outputs that differ
from the XLA form's, at positions the model never reads. A layer whose window is traced (the scan
over a model mixing sliding and full layers) runs the sliding or the full kernel under `lax.cond`:
kernels take static windows.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from fipo_jax.models.attention import AttentionMask, grouped_query_attention

# What "auto" runs on each backend: the XLA form until a fused path passes its GPU / TPU test module.
AUTO_ATTENTION = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}
# The backends each implementation runs on (None: any).
KERNEL_BACKENDS = {"xla": None, "cudnn": ("gpu",), "splash": ("tpu",)}
# `jax.nn.dot_product_attention` implementations `fused_attention` may name ("xla": JAX's reference
# lowering of the same call, what the CPU tests compare; "cudnn": the GPU's flash-attention kernel).
FUSED_IMPLEMENTATIONS = ("xla", "cudnn")
# Splash works on blocks of 128 query / key slots; sequences are padded to a multiple of this.
SPLASH_ALIGN = 128


def resolve_attention_impl(requested: str, backend: str | None = None) -> str:
    """The implementation `requested` ("auto" or a name in `KERNEL_BACKENDS`) runs on `backend`
    (default: JAX's); ValueError in one line when that backend cannot run it."""
    backend = backend or jax.default_backend()
    impl = AUTO_ATTENTION.get(backend, "xla") if requested == "auto" else requested
    if impl not in KERNEL_BACKENDS:
        raise ValueError(f"attention_impl must be 'auto' or one of {tuple(KERNEL_BACKENDS)}, got {requested!r}")
    backends = KERNEL_BACKENDS[impl]
    if backends is not None and backend not in backends:
        raise ValueError(f"attention_impl={impl!r} runs on {' / '.join(backends)}, not on this {backend!r} backend "
                         "(use 'auto' or 'xla')")
    return impl


def describe_attention(requested: str, backend: str | None = None) -> str:
    """One line for a run's log: the implementation `requested` runs and why (ValueError as
    `resolve_attention_impl`)."""
    backend = backend or jax.default_backend()
    impl = resolve_attention_impl(requested, backend)
    why = (f"auto on {backend}: no fused kernel verified on this backend yet" if requested == "auto" and impl == "xla"
           else "auto" if requested == "auto" else "chosen")
    return f"{impl} ({why}); cached forwards (prefill, decode): xla"


def full_attention(
    q_BxTxHxK: jax.Array,
    k_BxNxTxK: jax.Array,
    v_BxNxTxK: jax.Array,
    mask: AttentionMask,
    scale: float,
    window: int | jax.Array | None,
    query_chunk_size: int | None,
    implementation: str,
    sliding_window: int | None,
) -> jax.Array:
    """Attention of a full forward (no cache) by `implementation` (see module doc). `window` is the
    layer's (None, a static int, or traced: then it is `sliding_window` or a window nothing reaches)."""
    backend = jax.default_backend()
    impl = resolve_attention_impl(implementation, backend)
    if impl == "xla":
        return grouped_query_attention(q_BxTxHxK, k_BxNxTxK, v_BxNxTxK, mask, scale, window, query_chunk_size)
    # Off their hardware (only where `KERNEL_BACKENDS` is widened, as the CPU tests do) the same calls
    # run JAX's reference lowering / Pallas's interpreter.
    if impl == "cudnn":
        attend = functools.partial(fused_attention, q_BxTxHxK, k_BxNxTxK, v_BxNxTxK, mask, scale,
                                   implementation="cudnn" if backend == "gpu" else "xla")
    else:
        attend = functools.partial(splash_attention, q_BxTxHxK, k_BxNxTxK, v_BxNxTxK, mask, scale,
                                   interpret=backend != "tpu")
    if window is None or isinstance(window, int):
        return attend(window)
    assert sliding_window is not None, "a traced window is the model's sliding_window or one nothing reaches"
    return lax.cond(window <= sliding_window, lambda: attend(sliding_window), lambda: attend(None))


def sequence_ids(mask: AttentionMask) -> jax.Array:
    """int32 [B, T]: the segment id of each real token (0 without segments), and for pad slots one
    id below every real id of the row, so pads form their own sequence."""
    valid_BxT = mask.key_valid_BxS
    ids_BxT = (jnp.zeros(valid_BxT.shape, jnp.int32) if mask.key_segments_BxS is None
               else mask.key_segments_BxS.astype(jnp.int32))
    pad_B1 = jnp.min(jnp.where(valid_BxT, ids_BxT, 0), axis=1, keepdims=True) - 1
    return jnp.where(valid_BxT, ids_BxT, pad_B1)


def fused_attention(
    q_BxTxHxK: jax.Array,
    k_BxNxTxK: jax.Array,
    v_BxNxTxK: jax.Array,
    mask: AttentionMask,
    scale: float,
    window: int | None = None,
    implementation: Literal["xla", "cudnn"] = "xla",
) -> jax.Array:
    """A full forward's attention through `jax.nn.dot_product_attention` (GQA by its own grouping):
    ``is_causal`` and a (W − 1, 0) ``local_window_size`` — masks the kernel applies itself, skipping
    masked blocks — and ``mask`` [B, 1, T, T] = same `sequence_ids` for padding and segments."""
    if implementation not in FUSED_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {FUSED_IMPLEMENTATIONS}, got {implementation!r}")
    if window is not None and not isinstance(window, int):
        raise TypeError(f"fused_attention needs a static int window (or None), got {type(window).__name__}")
    ids_BxT = sequence_ids(mask)
    same_Bx1xTxT = (ids_BxT[:, :, None] == ids_BxT[:, None, :])[:, None]
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(
        q_BxTxHxK, k_BxNxTxK.transpose(0, 2, 1, 3), v_BxNxTxK.transpose(0, 2, 1, 3), mask=same_Bx1xTxT,
        scale=scale, is_causal=True, local_window_size=local, implementation=implementation)


def splash_attention(
    q_BxTxHxK: jax.Array,
    k_BxNxTxK: jax.Array,
    v_BxNxTxK: jax.Array,
    mask: AttentionMask,
    scale: float,
    window: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """A full forward's attention through the splash kernel: for each row and kv head, the MQA
    kernel over that head's G query heads, causal (and local (W − 1, 0)) by its static mask, padding
    and segments by `sequence_ids`; T padded to a multiple of `SPLASH_ALIGN` with pad slots. The
    kernel has no scale argument: q is scaled first. ``interpret``: Pallas's interpreter (any backend)."""
    batch, length, heads, head_dim = q_BxTxHxK.shape
    kv_heads = k_BxNxTxK.shape[1]
    padded = -(-length // SPLASH_ALIGN) * SPLASH_ALIGN
    pad = padded - length
    ids_BxT = jnp.pad(sequence_ids(mask), ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).min)
    q_BxNxGxTxK = (q_BxTxHxK.astype(jnp.float32) * scale).astype(q_BxTxHxK.dtype).reshape(
        batch, length, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    q_BxNxGxTxK = jnp.pad(q_BxNxGxTxK, ((0, 0),) * 3 + ((0, pad), (0, 0)))
    k_BxNxTxK, v_BxNxTxK = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (k_BxNxTxK, v_BxNxTxK))
    kernel = _splash_kernel(padded, heads // kv_heads, window, interpret)

    def one_head(q_GxTxK, k_TxK, v_TxK, ids_T):
        return kernel(q_GxTxK, k_TxK, v_TxK, segment_ids=_splash_segments(ids_T))

    per_row = jax.vmap(one_head, in_axes=(0, 0, 0, None))
    out_BxNxGxTxK = jax.vmap(per_row)(q_BxNxGxTxK, k_BxNxTxK, v_BxNxTxK, ids_BxT)
    return out_BxNxGxTxK[:, :, :, :length].transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)


def _splash_segments(ids_T: jax.Array):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel

    return splash_attention_kernel.SegmentIds(q=ids_T, kv=ids_T)


@functools.lru_cache(maxsize=64)
def _splash_kernel(length: int, groups: int, window: int | None, interpret: bool):
    """The MQA splash kernel of `groups` query heads over `length` slots, causal or local (W − 1, 0)
    (built once per shape: the mask's block structure is computed on the host)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    shape = (length, length)
    head_mask = masks.CausalMask(shape) if window is None else masks.LocalMask(shape, (window - 1, 0), offset=0)
    block = next(b for b in (512, 256, SPLASH_ALIGN) if length % b == 0)
    sizes = kernels.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                               block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return kernels.make_splash_mqa_single_device(masks.MultiHeadMask([head_mask] * groups), block_sizes=sizes,
                                                 interpret=interpret)
