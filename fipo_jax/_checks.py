"""Trace-time argument checks with messages that name the argument and what was expected.

They look only at static information (shapes, dtypes, Python numbers), so they cost
nothing under `jit` and never branch on traced values.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _dtype(x):
    return x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype


def check_floating(name: str, x, *, min_rank: int | None = None, rank: int | None = None) -> None:
    """`x` must be a floating-point array of the given rank (or at least `min_rank`)."""
    if not jnp.issubdtype(_dtype(x), jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {_dtype(x)}")
    check_rank(name, x, min_rank=min_rank, rank=rank)


def check_rank(name: str, x, *, min_rank: int | None = None, rank: int | None = None, what: str = "") -> None:
    shape = _shape(x)
    if rank is not None and len(shape) != rank:
        raise ValueError(f"{name} must have rank {rank}{what}, got shape {shape}")
    if min_rank is not None and len(shape) < min_rank:
        raise ValueError(f"{name} must have rank >= {min_rank}{what}, got shape {shape}")


def check_same_shape(name: str, x, ref_name: str, ref) -> None:
    if _shape(x) != _shape(ref):
        raise ValueError(f"{name} has shape {_shape(x)} but {ref_name} has shape {_shape(ref)}; they must match")


def check_mask(name: str, mask, ref_name: str, ref) -> None:
    """A mask is bool or numeric (non-zero = valid) with the shape of `ref`."""
    dtype = _dtype(mask)
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"{name} must be a bool or numeric (int/float) array, got dtype {dtype}")
    check_same_shape(name, mask, ref_name, ref)


def _concrete_scalar(value):
    """A Python/NumPy number, or None when `value` is traced or not a scalar."""
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0:
        return float(value)
    if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer) and value.ndim == 0:
        return float(value)
    return None


def check_positive(name: str, value) -> None:
    """A concrete number must be finite and > 0 (traced values are the caller's concern)."""
    v = _concrete_scalar(value)
    if v is not None and not (np.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
