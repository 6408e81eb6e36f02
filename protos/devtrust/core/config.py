"""Typed configuration from YAML (STYLE 5): a file maps onto frozen dataclasses whose fields
carry defaults and units in their names (``interval_s``). Unknown keys, wrong types and
unparsable YAML are errors that name the file and the key; nothing reads a global config.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from devtrust.core.errors import ConfigError

T = TypeVar("T")


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where}: not valid YAML: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def from_mapping(cls: type[T], data: Any, *, where: str, base: Path | None = None) -> T:
    """Build dataclass ``cls`` from a mapping; relative paths resolve against ``base``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(fields)}"
        )
    missing = [
        name
        for name, f in fields.items()
        if name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ConfigError(f"{where}: {', '.join(missing)} {verb} required")
    kwargs = {
        name: _convert(hints[name], data[name], f"{where}.{name}", base)
        for name in fields
        if name in data
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _convert(tp: Any, value: Any, where: str, base: Path | None) -> Any:  # noqa: PLR0911, PLR0912
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        # ``str | list[str]`` (one address or several): the member whose kind the value has;
        # otherwise the first, as for ``X | None``.
        for member in inner[1:]:
            kind = typing.get_origin(member) or member
            if isinstance(kind, type) and isinstance(value, kind):
                return _convert(member, value, where, base)
        return _convert(inner[0], value, where, base)
    if dataclasses.is_dataclass(tp):
        return from_mapping(typing.cast(type[Any], tp), value, where=where, base=base)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, str) and value:
            p = Path(value).expanduser()
            return base / p if base is not None and not p.is_absolute() else p
    elif origin in (list, tuple):
        if isinstance(value, list):
            items = [_convert(args[0], v, f"{where}[{i}]", base) for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif origin is dict:
        if isinstance(value, dict):
            return {
                _convert(args[0], k, f"{where} key", base): _convert(
                    args[1], v, f"{where}.{k}", base
                )
                for k, v in value.items()
            }
    else:
        raise ConfigError(f"{where}: unsupported type {tp}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)
