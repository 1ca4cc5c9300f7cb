"""Typed, strict configs: dataclasses loaded from YAML with dotted overrides.

Each component owns its config dataclass (next to the code it configures) and
declares fields with :func:`option`, which carries a help string and an optional
range. :func:`from_dict` turns plain data (YAML, JSON) into the dataclass and
fails with one line naming the offending field:

    unknown key 'sampler.stpes' (valid: guidance, solver, steps, ...)
    sampler.steps: expected int, got 'ten'
    sampler.steps: must be >= 1, got 0
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range."""


def option(default: Any = dataclasses.MISSING, help: str = "", *,
           default_factory: Any = dataclasses.MISSING,
           min: float | None = None, max: float | None = None,
           min_exclusive: bool = False) -> Any:
    """A dataclass field with a help string and an optional numeric range."""
    meta = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a type annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected bool, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        raise ConfigError(f"{where}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected str, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


def _check_range(value: Any, f: dataclasses.Field, where: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if lo is not None:
        if f.metadata.get("min_exclusive") and not value > lo:
            raise ConfigError(f"{where}: must be > {lo}, got {value!r}")
        if value < lo:
            raise ConfigError(f"{where}: must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: must be <= {hi}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from plain data, strictly (see module doc)."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in valid:
            name = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown key '{name}' (valid: {', '.join(valid)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in data:
            continue
        where = f"{prefix}.{f.name}" if prefix else f.name
        value = _convert(data[f.name], hints[f.name], where)
        _check_range(value, f, where)
        kwargs[f.name] = value
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        name = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(f"missing required key '{name}'")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{prefix + ': ' if prefix else ''}{e}") from None
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-ready data for a config dataclass (tuples as lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(obj))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=v`` strings to nested plain data; values parse as YAML."""
    data = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] = (),
         base: dict[str, Any] | None = None) -> T:
    """Resolve a config: ``base`` data, then a YAML file, then ``--set`` overrides."""
    data = _deep_copy(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        data = _merge(data, loaded)
    data = apply_overrides(data, list(overrides))
    return from_dict(cls, data)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dump(obj: Any) -> str:
    """The resolved config as YAML (what ``--dry-run`` prints)."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
