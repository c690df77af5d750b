"""Building a `TrainConfig` from JSON and command-line strings: each value is converted to its
field's annotated type (`_coerce`), unknown names are errors with a suggestion, and a value given
for a field the config ignores is refused (`ignored.check_given_fields`).

>>> apply_overrides(TrainConfig(), ["rollout.n=4", "algo.mini_batches=4"]).rollout.n
4
>>> _coerce("yes", bool, "tensorboard")
True
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from typing import Any, Literal

from fipo_jax.config.ignored import check_given_fields
from fipo_jax.config.presets import PRESETS
from fipo_jax.config.specs import ConfigError, TrainConfig
from fipo_jax.core import _checks
from fipo_jax.core.losses import MODE_DEPENDENT_FIELDS


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert JSON / command-line values to a field's annotated type."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        _checks.require(isinstance(value, dict), f"{where} must be a mapping, got {value!r}", error=ConfigError)
        return from_dict(annotation, value, where)
    if origin is Literal:
        _checks.check_choice(where, value, typing.get_args(annotation), error=ConfigError)
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, annotation, where)
    if origin is tuple:
        return _coerce_tuple(value, typing.get_args(annotation)[0], where)
    scalar = _SCALARS.get(annotation)
    return value if scalar is None else scalar(value, where)


def _coerce_union(value: Any, annotation: Any, where: str) -> Any:
    """The first member type that accepts ``value``; None only where the union allows it."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    # "none" / "null" mean None only where None is allowed (remat's "none" is a policy name).
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        _checks.require(optional, f"{where} cannot be None", error=ConfigError)
        return None
    errors = []
    for arg in args:
        try:
            return _coerce(value, arg, where)
        except (ConfigError, ValueError, TypeError) as err:
            errors.append(str(err))
    raise ConfigError(errors[0])


def _coerce_tuple(value: Any, inner: Any, where: str) -> tuple:
    if isinstance(value, str):  # not valid JSON (apply_overrides parsed it): one literal item, never split
        _checks.require(inner is str, f"{where} must be a JSON list like [2, 2, 2], got {value!r}",
                        error=ConfigError)
        value = [value]
    _checks.require(isinstance(value, (list, tuple)), f"{where} must be a list, got {value!r}", error=ConfigError)
    return tuple(_coerce(v, inner, where) for v in value)


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, str):
        _checks.require(value.lower() in ("true", "false", "1", "0", "yes", "no"),
                        f"{where} must be a bool, got {value!r}", error=ConfigError)
        return value.lower() in ("true", "1", "yes")
    _checks.check_bool(where, value, error=ConfigError)
    return value


def _to_int(value: Any, where: str) -> int:
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be an int, got {value!r}") from None
    _checks.require(not isinstance(value, bool) and math.isfinite(as_float) and as_float == int(as_float),
                    f"{where} must be an int, got {value!r}", error=ConfigError)
    return int(as_float)


def _to_float(value: Any, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number, got {value!r}") from None


def _to_str(value: Any, where: str) -> str:
    _checks.require(isinstance(value, str), f"{where} must be a string, got {value!r}", error=ConfigError)
    return value


# A config field's scalar type → how a JSON or command-line value becomes it.
_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


# Fields that moved, old path → new path: a config file of an earlier version is told where.
MOVED_FIELDS = {"algo.loss.ratio_quantiles": "metrics.ratio_quantiles"}


def from_dict(cls, data: dict[str, Any], where: str = ""):
    """Build dataclass `cls` from a (nested) dict; unknown keys are errors with suggestions."""
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        _checks.require(path not in MOVED_FIELDS, f"config field {path!r} moved to {MOVED_FIELDS.get(path)!r}",
                        error=ConfigError)
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(f"unknown config field {path!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; fields of {cls.__name__}: {names}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``a.b.c=value`` strings (values parsed as JSON when possible)."""
    data = config.to_dict()
    paths = [item.split("=", 1)[0].strip() for item in overrides]
    if "algo.loss.loss_mode" in paths:
        # Fields whose default depends on the mode are re-resolved for the new mode.
        for name in MODE_DEPENDENT_FIELDS:
            if f"algo.loss.{name}" not in paths:
                data["algo"]["loss"][name] = None
    for item in overrides:
        _checks.require("=" in item, f"override {item!r} must look like field.path=value", error=ConfigError)
        path, raw = item.split("=", 1)
        _checks.require(path.strip() not in MOVED_FIELDS,
                        f"config field {path.strip()!r} moved to {MOVED_FIELDS.get(path.strip())!r}", error=ConfigError)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        keys = path.strip().split(".")
        for key in keys[:-1]:
            _checks.require(isinstance(node.get(key), dict), f"unknown config section {key!r} in override {item!r}",
                            error=ConfigError)
            node = node[key]
        _checks.require(keys[-1] in node, f"unknown config field {path!r} in override {item!r}"
                        + (f" (did you mean {difflib.get_close_matches(keys[-1], list(node), n=1)[0]!r}?)"
                           if difflib.get_close_matches(keys[-1], list(node), n=1) else ""), error=ConfigError)
        node[keys[-1]] = value
    config = from_dict(TrainConfig, data)
    check_given_fields(config, [path.strip() for path in paths], "override")
    return config


def load_config(name_or_path: str) -> TrainConfig:
    """A named preset (see `PRESETS`) or a JSON file holding a (partial) `TrainConfig`."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    if not os.path.isfile(name_or_path):
        raise ConfigError(f"no config named {name_or_path!r}: not a preset {sorted(PRESETS)} nor an existing file")
    try:
        with open(name_or_path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {name_or_path}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {name_or_path}: not valid JSON: {err.msg} at line {err.lineno} column "
                          f"{err.colno}") from None
    _checks.require(isinstance(data, dict), f"config file {name_or_path}: must hold a JSON object of TrainConfig "
                    f"fields, got {type(data).__name__}", error=ConfigError)
    try:
        config = from_dict(TrainConfig, data)
    except ConfigError as err:
        raise ConfigError(f"config file {name_or_path}: {err}") from None
    check_given_fields(config, _dotted_keys(data), f"config file {name_or_path}: field")
    return config


def _dotted_keys(data: dict, prefix: str = "") -> list[str]:
    """Every leaf key of a nested dict as a dotted path."""
    out: list[str] = []
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        out += _dotted_keys(value, path) if isinstance(value, dict) else [path]
    return out
