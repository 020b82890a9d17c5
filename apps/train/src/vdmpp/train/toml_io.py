"""TOML ↔ dataclasses for run configs: type coercion, ``--set a.b=value``, the resolved
``config.toml`` writer and the diff of two configs. Nothing is ever ``eval``-ed."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import fields
from typing import Any, get_args, get_origin, get_type_hints

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["apply_override", "build", "config_diff", "dumps", "parse_value", "tomllib"]

# --- TOML → dataclasses --------------------------------------------------------------------------
_ALIASES = {("batch", "global"): "global_size"}  # `global` is a Python keyword


def build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = _ALIASES.get((prefix.rstrip("."), key), key)
        if name not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"config: unknown key '{prefix}{key}' (known here: {known})")
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config: {key} must be a table, got {value!r}")
        return build(tp, value, key + ".")
    origin, args = get_origin(tp), get_args(tp)
    if args and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _coerce(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config: {key} must be a table, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config: {key} must be an array, got {value!r}")
        (inner,) = args
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config: {key} must be a string, got {value!r}")
        return value
    return value


def parse_value(text: str) -> Any:
    """A TOML literal (number, bool, string, array, inline table), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to the raw TOML dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, text = assignment.split("=", 1)
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set: bad key {key!r}")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set: {key!r} goes through a non-table value")
    node[parts[-1]] = parse_value(text.strip())


# --- dataclasses → TOML (the resolved config.toml of a run) --------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    if isinstance(v, str):  # a TOML basic string: JSON's escapes are TOML's, plus DEL
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def dumps(cfg: Any) -> str:
    """The resolved config as TOML (None is written as the string "none", read back as None)."""
    top, tables = [], []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            lines = [f"[{f.name}]"]
            for g in fields(v):
                x = getattr(v, g.name)
                name = "global" if (f.name, g.name) == ("batch", "global_size") else g.name
                lines.append(f"{name} = {_toml_value('none' if x is None else x)}")
            tables.append("\n".join(lines))
        else:
            top.append(f"{f.name} = {_toml_value('none' if v is None else v)}")
    return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"


def config_diff(
    saved: Any, cfg: Any, tables: tuple[str, ...] = ("model", "objective", "optimizer")
) -> str:
    """The keys of ``tables`` that differ between a saved config's TOML text and ``cfg``."""
    if not isinstance(saved, str):
        return "no config saved in the checkpoint"
    try:
        old = tomllib.loads(saved)
        new = tomllib.loads(dumps(cfg))
    except Exception:  # a checkpoint's text is data, never trusted to parse
        return "its saved config does not parse"
    keys = [
        f"{t}.{k}"
        for t in tables
        for k in sorted(set(old.get(t, {})) | set(new.get(t, {})))
        if old.get(t, {}).get(k) != new.get(t, {}).get(k)
    ]
    return "differs in " + ", ".join(keys[:6]) if keys else "same model keys"
