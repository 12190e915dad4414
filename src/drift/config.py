"""Typed stage configs: dataclass fields carry their help text once.

The same keys come from a TOML/YAML file or from CLI flags; the CLI wins, unknown keys and
wrong types are errors that name the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from drift import DriftError

C = TypeVar("C")


def option(default: Any, help: str, result: bool | str = True, **kw: Any) -> Any:
    """A config field with its help text (the only place the help is written).

    `result=False` marks a key that cannot change what the stage produces (paths, threads,
    batch sizes of inference, logging, retries): it is left out of the stage's `settings`.
    `result="changed"` marks a key added after records were written without it: it is in the
    settings only when set away from its default, so those records still match a rerun.
    `unrecorded=value` (a key added to a stage later): while the key holds the value that the
    stage's records made before it existed meant, it is left out of `settings`, so those
    records still match.
    """
    meta = {"help": help, "result": result, **kw}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def settings(cfg: Any) -> dict[str, Any]:
    """The keys of a stage config that shape its output, with their values (JSON-ready).

    A stage stores them next to its output; a rerun compares them before reusing that output.
    """
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if _recorded(f, getattr(cfg, f.name))}


def _recorded(f: dataclasses.Field, value: Any) -> bool:
    if "unrecorded" in f.metadata and value == f.metadata["unrecorded"]:
        return False
    result = f.metadata.get("result", True)
    return result == "changed" and value != f.default if isinstance(result, str) else bool(result)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return settings(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-ready value (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def derive_seed(seed: int, *parts: object) -> int:
    """A reproducible 63-bit seed for one random stream, from a run seed and the stream's name: the
    first 8 bytes of sha256("seed|part|..."), halved. Every seed drift derives comes from here: each
    (prompt, sample, turn) of a rollout (`drift.rollout.protocol.sample_seed`), the rounds of an
    iterated arm, the shuffles and updates of an online iteration."""
    h = hashlib.sha256("|".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every key whose value differs (nested tables as dotted keys)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in differences(a, b)]
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML file into a dict."""
    p = Path(path)
    if not p.is_file():
        raise DriftError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise DriftError(f"{p}: config files must end in .toml, .yaml, .yml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
        raise DriftError(f"{p}: cannot parse config: {e}") from None
    if not isinstance(data, dict):
        raise DriftError(f"{p}: a config file must hold a table of keys")
    return data


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(type without Optional, is_optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), optional
    return tp, False


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Check/convert one value to a field type; raise DriftError naming the key."""
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise DriftError(f"config key '{key}' may not be empty")
    origin = typing.get_origin(base)
    if origin in (typing.Union, types.UnionType):  # e.g. float | Literal["auto"]: the first type that takes it
        for arg in typing.get_args(base):
            try:
                return coerce(arg, value, key)
            except DriftError:
                continue
        raise DriftError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if origin is list:
            (item,) = typing.get_args(base) or (Any,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [coerce(item, v, key) if item is not Any else v for v in value]
        if origin is dict or base is dict:
            if isinstance(value, str):
                value = json.loads(value)
            elif isinstance(value, list):  # key=value items from the command line; values read as JSON where they parse
                value = dict(_key_value(item, key) for item in value)
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if origin is typing.Literal:
            choices = typing.get_args(base)
            if value not in choices:
                raise DriftError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
            return value
    except (ValueError, TypeError, json.JSONDecodeError):
        raise DriftError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}") from None
    return value


def _type_name(tp: Any) -> str:
    base, optional = _base_type(tp)
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        name = " or ".join(_type_name(a) for a in typing.get_args(base))
    elif typing.get_origin(base) is typing.Literal:
        name = " or ".join(repr(a) for a in typing.get_args(base))
    else:
        name = getattr(base, "__name__", str(base).replace("typing.", ""))
    return f"{name} or none" if optional else name


def build(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """Create config `cls` from a dict; unknown keys and wrong types raise DriftError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        full = f"{where}{name}"
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise DriftError(f"unknown config key '{full}'{hint}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise DriftError(f"config key '{full}' must be a table")
            kwargs[name] = build(tp, value, f"{full}.")
        else:
            kwargs[name] = coerce(tp, value, full)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise DriftError(f"{cls.__name__}: {e}") from None
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (from --set) onto a nested dict."""
    out = json.loads(json.dumps(data))
    for item in sets:
        if "=" not in item:
            raise DriftError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise DriftError(f"--set {key}: '{p}' is not a table")
        node[parts[-1]] = _parse_scalar(value)
    return out


def _key_value(item: Any, key: str) -> tuple[str, Any]:
    if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
        raise DriftError(f"config key '{key}' takes key=value items, got {item!r}")
    name, value = item.split("=", 1)
    return name.strip(), _parse_scalar(value)


def _parse_scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def add_arguments(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    """Add one CLI flag per config field (help from the field), defaults left unset.

    Flags default to None so that only what the user typed overrides the config file.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            continue
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        base, _ = _base_type(tp)
        if f.name in positional:
            if typing.get_origin(base) is list:  # absent: left unset (argparse would give []), so a file can set it
                parser.add_argument(f.name, nargs="*", default=argparse.SUPPRESS, help=help_text)
            else:
                parser.add_argument(f.name, nargs="?", default=None, help=help_text)
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        if base is bool:
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=f"{help_text} (default: {default})")
        elif base is dict and "flag" in f.metadata:  # one key=value per use, e.g. --env-arg level=3
            parser.add_argument(flag, dest=f.name, default=None, action="append", metavar="KEY=VALUE",
                                help=f"{help_text} (default: {default})")
        else:
            choices = list(typing.get_args(base)) if typing.get_origin(base) is typing.Literal else None
            parser.add_argument(flag, dest=f.name, default=None, choices=choices,
                                help=f"{help_text} (default: {default})")


def from_cli(cls: type[C], ns: argparse.Namespace, config_file: str | None = None,
             sets: list[str] | None = None) -> C:
    """File values, then --set overrides, then explicit flags; validated by `build`."""
    data = read_config_file(config_file) if config_file else {}
    data = apply_overrides(data, sets or [])
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in names:
        value = getattr(ns, name, None)
        if isinstance(value, list) and _base_type(hints[name])[0] is dict:  # --env-arg k=v items join the file's table
            file_value = data.get(name) or {}
            if not isinstance(file_value, dict):
                raise DriftError(f"config key '{name}' must be a table")
            value = {**file_value, **coerce(hints[name], value, name)}
        if value is not None:
            data[name] = value
    return build(cls, data)
