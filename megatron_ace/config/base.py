"""Config plumbing shared by every component config.

Configs are trees of small keyword-only dataclasses (one per component). A field is documented
by a docstring line under it; a required field has no default; `__post_init__` validates and
raises `ValueError` naming the field. This module adds what every tree needs:

- `apply_overrides(cfg, ["optim.lr=1e-6", "grpo.temperature=0.9"])`: dotted command-line
  overrides, parsed with the type of the field they replace.
- `to_dict` / `from_dict`: the JSON form saved with every run, and read back on resume.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def to_dict(cfg: Any) -> Any:
    """Plain JSON-able form of a config tree (enums by value, tuples as lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert `value` (from JSON or a command-line string) to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(f"{where}: cannot interpret {value!r} as {tp}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where=where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("[") else [
                v for v in value.split(",") if v.strip()
            ]
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, str):
            value = json.loads(value)
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in tp)
            raise ValueError(f"{where}: {value!r} is not one of: {allowed}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, str):
            value = float(value) if any(c in value for c in ".eE") else int(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build a config dataclass from its dict form; unknown keys are an error naming the key."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown config field(s): {', '.join(prefix + k for k in unknown)}")
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Return a copy of `cfg` with `a.b.c=value` overrides applied (validated again)."""
    data = to_dict(cfg)
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        path, raw = item.split("=", 1)
        keys = path.split(".")
        node_cls: Any = type(cfg)
        node = data
        for depth, key in enumerate(keys):
            hints = _field_types(node_cls)
            if key not in hints:
                known = ", ".join(sorted(hints))
                raise ValueError(
                    f"override {path!r}: no field {key!r} in {node_cls.__name__} (fields: {known})"
                )
            if depth == len(keys) - 1:
                node[key] = _coerce(raw, hints[key], path)
                node[key] = to_dict(node[key])
            else:
                node_cls = hints[key]
                origin_args = typing.get_args(node_cls)
                if origin_args and not dataclasses.is_dataclass(node_cls):
                    node_cls = next(a for a in origin_args if dataclasses.is_dataclass(a))
                if node.get(key) is None:
                    raise ValueError(f"override {path!r}: section {key!r} is not set")
                node = node[key]
    return from_dict(type(cfg), data)


def save_json(cfg: Any, path: str | Path) -> None:
    """Write the config tree as JSON (atomically: a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def load_json(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, json.loads(Path(path).read_text()))
