"""Rotary position embeddings (RoPE) in Hugging Face's rotate-half layout, with frequency scaling.

    ω_i   = θ^(−2i/K), i = 0 … K/2 − 1        (then optionally scaled: `RopeScaling`)
    angle = p · concat(ω, ω)                   per position p, [K]
    RoPE(x) = x · cos(angle) + rotate_half(x) · sin(angle),   rotate_half([x₁, x₂]) = [−x₂, x₁]

Angles, cos/sin and the rotation are float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fipo_jax.models.config import RopeScaling


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """ω_i = θ^(−2i/K) for i = 0 … K/2 − 1, scaled by `scaling` (see `RopeScaling`), float32 [K/2].

    Computed in float32 as transformers does, so the angles match its RoPE bit for bit before
    the cos/sin.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is not None:
        inv_freq = _scale_frequencies(inv_freq, scaling)
    return jnp.asarray(inv_freq, jnp.float32)


def _scale_frequencies(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    factor = np.float32(scaling.factor)
    if scaling.rope_type == "linear":
        return (inv_freq / factor).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by the factor, interpolate in between.
    context = np.float32(scaling.original_max_position_embeddings)
    low, high = np.float32(scaling.low_freq_factor), np.float32(scaling.high_freq_factor)
    wavelength = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelength < context / high) & ~(wavelength > context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(
    positions_BxT: jax.Array, head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, K] (float32): angles = concat(p·ω, p·ω)."""
    inv_freq_1x1xHalf = rope_inverse_frequencies(head_dim, theta, scaling)[None, None, :]
    angles_BxTxHalf = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_1x1xHalf
    angles_BxTxK = jnp.concatenate([angles_BxTxHalf, angles_BxTxHalf], axis=-1)
    return jnp.cos(angles_BxTxK), jnp.sin(angles_BxTxK)


def apply_rope(x_BxTxNxK: jax.Array, cos_BxTxK: jax.Array, sin_BxTxK: jax.Array) -> jax.Array:
    """x·cos + rotate_half(x)·sin, computed in float32, returned in x's dtype."""
    x32 = x_BxTxNxK.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x32 * cos_BxTxK[:, :, None, :] + rotated * sin_BxTxK[:, :, None, :]
    return out.astype(x_BxTxNxK.dtype)
