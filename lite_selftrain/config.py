"""Turning plain dicts (TOML files, CLI flags) into the dataclasses that configure each part, checked.

    cfg = load_config(RestEMConfig, "examples/rest_em_gsm8k_150m.toml", ["train.lr=1e-5", "iterations=2"])

Every part keeps its own `@dataclass` beside its code, its ranges in its annotations (`lr: PositiveFloat`,
`mode: Literal["full", "lora"]`); this file fills one from a dict and checks it in one pass with pydantic's
dataclass validation (strict: no "4" for 4, no 1.5 for a count, a table where a table belongs). The first
problem becomes one line naming the file and the key: `rest_em.toml: train.lr must be a positive number,
got {x = 1}`. Unknown keys are refused with a suggestion. Nested dataclass fields are filled from nested
tables on top of the parent's own default for that field (RPO's `sample` table changes RPO's sampling
defaults, not the generic ones). `check_fields(self)` in a `__post_init__` applies the same annotations to
a dataclass built directly in Python.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import Field, TypeAdapter, ValidationError

from .errors import UserError, UserTypeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

T = TypeVar("T")

# ranges, used in the dataclasses' annotations; `description` is what an error says was expected
PositiveInt = Annotated[int, Field(gt=0, description="a positive integer")]
Count = Annotated[int, Field(ge=0, description="an integer >= 0")]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False, description="a positive number")]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False, description="a number >= 0")]
Fraction = Annotated[float, Field(ge=0, le=1, description="a number in [0, 1]")]
Name = Annotated[str, Field(min_length=1, description="a non-empty string")]


def _toml(value: Any) -> str:
    """`value` as it would be written in TOML, for messages (`{x = 1}`, `[1, 2]`, `"4"`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_toml, value)) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    return str(value)


def _described(tp: Any) -> str | None:
    """The `description` of a range annotation (looking inside `X | None`), None when it has none."""
    for meta in getattr(tp, "__metadata__", ()):
        if getattr(meta, "description", None):
            return meta.description
    for arg in typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ():
        found = _described(arg)
        if found:
            return found
    return None


def _walk(root: Any, loc: tuple) -> tuple[Any, tuple]:
    """(annotation, key path) of pydantic's error location `loc` inside `root`; a union member's tag in
    `loc` ("constrained-int") ends the walk there, so the message speaks of the whole field."""
    tp, kept = root, []
    for part in loc:
        base = tp
        while typing.get_origin(base) is Annotated or type(None) in typing.get_args(base):
            base = typing.get_args(base)[0]
        if isinstance(part, str) and dataclasses.is_dataclass(base):
            tp = _hints(base).get(part)
        elif isinstance(part, int) and typing.get_args(base):
            tp = typing.get_args(base)[0]
        else:
            break
        kept.append(part)
    return tp, tuple(kept)


def _key(head: str, loc: tuple) -> str:
    """`head` and pydantic's error location as a TOML key: `train.lr`, `eval.ks[0]`."""
    for part in loc:
        head += f"[{part}]" if isinstance(part, int) else f".{part}" if head else str(part)
    return head


def _message(root: Any, error: dict, head: str) -> str:
    """One line for a pydantic error inside `root` (a dataclass or an annotation) at key `head`."""
    tp, loc = _walk(root, tuple(error["loc"]))
    key = _key(head, loc)
    if error["type"] == "value_error":  # a __post_init__ check across fields: its own words
        text, parent = str(error["ctx"]["error"]), _key(head, loc[:-1])
        if loc and text.startswith(f"{loc[-1]}."):  # it names its own table ("eval.select_on ..."): keep that
            return f"{parent}.{text}" if parent else text
        return f"{key}: {text}" if key else text
    if error["type"] == "missing":
        return f"{key} is required"
    wanted = _described(tp) or error["msg"].replace("Input should be ", "")
    wanted = {"an object": "a table", "a valid number": "a number", "a valid integer": "an integer",
              "a valid string": "a string", "a valid boolean": "true or false", "a valid array": "a list",
              "a valid list": "a list", "a valid tuple": "a list", "a valid dictionary": "a table"}.get(wanted, wanted)
    return f"{key} must be {wanted}, got {_toml(error['input'])}"


def _fill(cls: type, data: Any, prefix: str) -> Any:
    """`data` with unknown keys refused and nested tables laid over the field's default."""
    if not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    out = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(fields))})"
            raise UserError(f"unknown config key '{prefix}{key}'{hint}")
        f, tp = fields[key], hints[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(value, dict) and dataclasses.is_dataclass(tp):
            init = {g.name for g in dataclasses.fields(tp) if g.init}
            base = {k: v for k, v in to_dict(default).items() if k in init} if dataclasses.is_dataclass(default) else {}
            value = base | _fill(tp, value, f"{prefix}{key}.")
        out[key] = value
    return out


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "", source: str = "") -> T:
    """Build and check dataclass `cls` from `data`; any problem raises one `UserError`.

    `where` prefixes the keys in messages (a nested table's name); `source` names the file.
    """
    lead = f"{source}: " if source else ""
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise UserError(f"{lead}{where or 'config'} must be a table, got {_toml(data)}")
    try:
        filled = _fill(cls, data, prefix)
        return _adapter(cls).validate_json(json.dumps(filled, default=str), strict=True)
    except ValidationError as e:
        error = e.errors()[0]
        kind = UserError if error["type"] in _RANGE_ERRORS | {"value_error"} else UserTypeError
        raise kind(lead + _message(cls, error, where)) from None
    except UserError as e:
        raise type(e)(f"{lead}{e}") from None


def check_fields(obj: Any) -> None:
    """Check each field of dataclass `obj` against its annotation (for objects built in Python).

    A wrong type raises `UserTypeError`, a value out of range `UserError`, saying what was expected.
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if not dataclasses.is_dataclass(hints[f.name]):  # nested configs checked themselves when built
            check_value(getattr(obj, f.name), hints[f.name], f"{type(obj).__name__}.{f.name}")


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
                 "string_too_short", "literal_error", "string_pattern_mismatch"}


def check_value(value: Any, annotation: Any, key: str) -> None:
    """Check one value against an annotation such as `PositiveInt`; the message names `key`."""
    try:
        _value_adapter(annotation).validate_python(value, strict=True)
    except ValidationError as e:
        error = e.errors()[0]
        kind = UserError if error["type"] in _RANGE_ERRORS else UserTypeError
        raise kind(_message(annotation, error, key)) from None


@functools.cache
def _value_adapter(annotation: Any) -> TypeAdapter:
    return TypeAdapter(annotation)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) dataclass."""
    return dataclasses.asdict(obj)


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def parse_overrides(pairs) -> dict[str, Any]:
    """`a.b=1` strings → a nested dict, values parsed as TOML (bare words fall back to strings)."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair or not pair.split("=", 1)[0].strip():
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
            if not isinstance(node, dict):
                raise UserError(f"--set {pair}: '{part}' is given both a value and a table")
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
    source = Path(path).name if path else "--set" if overrides else ""
    return from_dict(cls, merge(data, parse_overrides(overrides)), source=source)
