"""Turning plain dicts (TOML files, CLI flags) into the dataclasses that configure each part.

    cfg = load_config(RestEMConfig, "examples/rest_em_gsm8k_150m.toml", ["train.lr=1e-5", "iterations=2"])

Every part keeps its own `@dataclass` beside its code; this file only knows how to fill one from a dict,
refusing unknown keys with a suggestion, how to read a TOML file, and how `key=value` overrides (dotted
keys reach nested tables, values are TOML) go on top of it. Nested dataclass fields are filled from nested
tables, on top of the parent's own default for that field (RPO's `sample` table changes RPO's sampling
defaults, not the generic ones).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

T = TypeVar("T")


def _unknown_key(key: str, known: list[str], where: str) -> UserError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"
    name = key if where == "config" else f"{where}.{key}"
    return UserError(f"unknown config key '{name}'{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) one value against its annotated type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, where=key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
        raise UserError(f"config key '{key}': {value!r} is not {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}': expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise UserError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise UserError(f"config key '{key}': expected int, got {value!r}")
    return value


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise `UserError`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(key, list(fields), where)
        default = _default(fields[key])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):  # a table overrides the parent's default
            value = {f.name: getattr(default, f.name) for f in dataclasses.fields(default) if f.init} | value
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where != "config" else key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad {where}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) dataclass."""
    return dataclasses.asdict(obj)


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None


def parse_overrides(pairs) -> dict[str, Any]:
    """`a.b=1` strings → a nested dict, values parsed as TOML (bare words fall back to strings)."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects key=value, got '{pair}'")
        key, raw = pair.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` on top, nested tables merged key by key."""
    merged = dict(base)
    for k, v in over.items():
        merged[k] = merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(cls: type[T], path: str | Path | None = None, overrides=(), base: T | None = None) -> T:
    """`cls` from a TOML file (or `base`, or the class defaults) with `key=value` overrides on top."""
    data = read_toml(path) if path else to_dict(base) if base is not None else {}
    return from_dict(cls, merge(data, parse_overrides(overrides)))
