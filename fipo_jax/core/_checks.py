"""The one vocabulary for argument and config checks, with messages that name what was wrong.

Two families, both cheap and never branching on traced values:

* value checks for configs and Python arguments — `require`, `check_int`, `check_number`,
  `check_choice`, `check_bool` — each raising ``error`` (default `ValueError`; configs pass their
  own subclass, e.g. `fipo_jax.config.ConfigError`) with "``name`` must be …, got …";
* array checks for function inputs — `check_floating`, `check_rank`, `check_same_shape`,
  `check_mask`, `check_positive`, `check_token_ids` — looking at static information (shapes,
  dtypes, Python numbers), and at values only where they are concrete (never under `jit`).

These play the role of ``chex`` asserts in rlax, with messages written for our users.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- values


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A Python or NumPy real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def require(ok: bool, message: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error(message)`` unless ``ok``."""
    if not ok:
        raise error(message)


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
              allow_none: bool = False, error: type[Exception] = ValueError) -> None:
    """``value`` is an int in [``minimum``, ``maximum``] (either may be open), or None when ``allow_none``."""
    if value is None and allow_none:
        return
    ok = is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        if maximum is not None:
            what = f"an int in [{minimum}, {maximum}]" if minimum is not None else f"an int <= {maximum}"
        else:
            what = "an int" if minimum is None else ("a positive int" if minimum == 1 else f"an int >= {minimum}")
        raise error(f"{name} must be {what}{' or None' if allow_none else ''}, got {value!r}")


def check_number(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
                 exclusive_minimum: bool = False, exclusive_maximum: bool = False, allow_none: bool = False,
                 error: type[Exception] = ValueError) -> None:
    """``value`` is a finite real number within the given bounds, or None when ``allow_none``."""
    if value is None and allow_none:
        return
    ok = is_real(value) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if exclusive_minimum else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if exclusive_maximum else value <= maximum
    if not ok:
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>' if exclusive_minimum else '>='} {minimum}")
        if maximum is not None:
            bounds.append(f"{'<' if exclusive_maximum else '<='} {maximum}")
        what = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        raise error(f"{name} must be {what}{' or None' if allow_none else ''}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any], error: type[Exception] = ValueError) -> None:
    """``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise error(f"{name} must be one of {choices}, got {value!r}")


def check_bool(name: str, value: Any, error: type[Exception] = ValueError) -> None:
    """``value`` is a bool (not 0/1)."""
    if not isinstance(value, bool):
        raise error(f"{name} must be a bool, got {value!r}")


# ----------------------------------------------------------------------------- arrays


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
    """A mask is bool or numeric (non-zero = valid) with the shape of `ref`. A concrete float mask
    holding NaN / ±inf is refused (NaN is non-zero, so it would count as a real token); inside jit
    the values cannot be seen: pass a bool mask there."""
    dtype = _dtype(mask)
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"{name} must be a bool or numeric (int/float) array, got dtype {dtype}")
    check_same_shape(name, mask, ref_name, ref)
    if jnp.issubdtype(dtype, jnp.floating) and _is_concrete(mask) and not np.all(np.isfinite(np.asarray(mask))):
        raise ValueError(f"{name} holds NaN or ±inf: a float mask must be finite (non-zero marks a real token); "
                         f"pass a bool mask")


def _is_concrete(x) -> bool:
    """Values that can be looked at: NumPy arrays and jax arrays outside a trace."""
    return isinstance(x, np.ndarray) or (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer))


def check_token_ids(name: str, ids, vocab_size: int) -> None:
    """Concrete token ids lie in [0, vocab_size): an id ≥ V reads no embedding row and gives NaN
    log-probs, and −1 would silently read the last row (JAX wraps negative indices). Inside jit
    the values cannot be seen; ids the library produces there (sampler, packing) are in range."""
    if not _is_concrete(ids) or not np.size(ids):
        return
    values = np.asarray(ids)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name} holds token id {low if low < 0 else high}, outside the vocabulary [0, {vocab_size}); "
                         f"use the model's own tokenizer (and a pad id inside the vocabulary)")


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
