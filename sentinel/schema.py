"""Load YAML into frozen dataclasses, collecting every error with its field path.

Used by the daemon config, the SLO spec and the registry's model.yaml, so every file
reports problems the same way: `FILE: path.to.field: what is wrong`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args, get_origin, get_type_hints

import yaml

from sentinel.errors import ConfigError

T = TypeVar("T")

# Field metadata of a secret (`dataclasses.field(metadata=SECRET, repr=False)`): when its value
# is wrong, the error names the field and the type it got, never the value (a token written as
# a number, or a list, would otherwise be printed by `sentinel config check` and at start-up).
SECRET = types.MappingProxyType({"secret": True})


class _Problems:
    def __init__(self, source: str):
        self.source = source
        self.items: list[str] = []

    def add(self, path: str, msg: str) -> None:
        where = path or "(top level)"
        self.items.append(f"{self.source}: {where}: {msg}")


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, probs: _Problems) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(value, non_none[0], path, probs)
        for a in non_none:  # first that converts cleanly
            trial = _Problems(probs.source)
            out = _convert(value, a, path, trial)
            if not trial.items:
                return out
        probs.add(path, f"expected {' or '.join(_type_name(a) for a in non_none)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in args:
            probs.add(path, f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _load_dataclass(value, tp, path, probs)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            probs.add(path, f"expected a list, got {type(value).__name__}")
            return ()
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, _join(path, i), probs) for i, v in enumerate(value)]
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            probs.add(path, f"expected a mapping, got {type(value).__name__}")
            return {}
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, _join(path, str(k)), probs) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            probs.add(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            probs.add(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            probs.add(path, f"expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            probs.add(path, f"expected a string, got {value!r}")
        return value
    return value


def _load_dataclass(data: Any, cls: type[T], path: str, probs: _Problems) -> T | None:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        probs.add(path, f"expected a mapping, got {type(data).__name__}")
        return None
    hints = get_type_hints(cls)
    reported = len(probs.items)
    fields = {f.name: f for f in dataclasses.fields(cast(Any, cls)) if f.init}
    kwargs: dict[str, Any] = {}
    missing = False
    for key in data:
        if key not in fields:
            close = [f for f in fields if _similar(str(key), f)]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            probs.add(_join(path, str(key)), f"unknown field{hint}; known fields: {', '.join(fields)}")
    for name, f in fields.items():
        fpath = _join(path, name)
        if name in data and f.metadata.get("secret"):
            trial = _Problems(probs.source)
            kwargs[name] = _convert(data[name], hints[name], fpath, trial)
            if trial.items:
                value = data[name]
                probs.add(fpath, f"expected {_expected(hints[name])}, got {_kind(value)} "
                                 "(not shown: the value is a secret)")
        elif name in data:
            kwargs[name] = _convert(data[name], hints[name], fpath, probs)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            probs.add(fpath, "required field is missing")
            missing = True
    if missing:   # said once per field above; the constructor's TypeError would say it again
        return None
    before = len(probs.items)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if len(probs.items) == before:
            probs.add(path, str(exc))
        return None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            for sub, msg in validate():
                probs.add(_join(path, sub) if sub else path, msg)
        except (TypeError, ValueError, AttributeError):
            # a field of the wrong type (`objective: "0.999"`), reported above, tripped a check
            # written for the right one: the report stands, without a traceback
            if len(probs.items) == reported:
                raise
    return obj


_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
          list: "a list", dict: "a mapping"}


def _kind(value: Any) -> str:
    """A value's type in words, never the value."""
    return _KINDS.get(type(value), f"a {type(value).__name__}")


def _expected(tp: Any) -> str:
    """What a field of type `tp` takes, in words (None left out: a secret field's value was given)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in get_args(tp) if a is not type(None))
    return _KINDS.get(tp, _type_name(tp))


def _similar(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    if a == b:
        return True
    if abs(len(a) - len(b)) > 2:
        return False
    # small edit distance
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1] <= 2


def load_mapping(data: Any, cls: type[T], source: str) -> T:
    """Convert an already-parsed mapping into `cls`, raising ConfigError with every problem."""
    probs = _Problems(source)
    obj = _load_dataclass(data, cls, "", probs)
    if probs.items or obj is None:
        raise ConfigError(probs.items or [f"{source}: invalid"])
    return obj


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file, translating I/O and syntax errors to ConfigError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{p}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror}"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(top level)"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{p}: {where}: invalid YAML: {problem}"]) from None


def load_file(path: str | Path, cls: type[T]) -> T:
    """Read a YAML file into `cls`."""
    return load_mapping(read_yaml(path), cls, str(path))
