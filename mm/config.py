"""Typed dataclass configs: YAML presets plus `--key=value` overrides.

    cfg = parse_config(CLIPConfig, sys.argv[1:], preset_dir="recipes/clip/configs")

Order of precedence: dataclass defaults < `--config=NAME_OR_PATH` (a YAML preset) < `--key=value`.
Unknown keys and values of the wrong type raise `ConfigError`, whose message lists what is accepted.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null", "~", ""}


class ConfigError(ValueError):
    """A config key or value that is not accepted. The message says what is."""


def field_comments(cls) -> dict[str, str]:
    """The `# comment` after each field in the class source: our help text (one place to write it)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", src, flags=re.M)
    return dict(found)


def describe_fields(cls) -> str:
    """One line per field: name, type, default and comment. Printed by --help and in errors."""
    comments, hints = field_comments(cls), _hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{f.name}={default!r}  ({_type_name(hints[f.name])})  {comments.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def parse_bool(text: str) -> bool:
    """An argparse `type=` for true/false flags (argparse's `type=bool` takes "false" as True)."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    import argparse  # an ArgumentTypeError is what argparse reports as a usage error
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def coerce(value: Any, tp, key: str) -> Any:
    """Convert `value` (a YAML value or a command-line string) to type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        for option in allowed:
            if value == option or (isinstance(value, str) and value == str(option)):
                return option
        raise ConfigError(f"--{key}={value}: accepted values are {', '.join(map(str, allowed))}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in _NONE)):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"--{key}: {value!r} is not a {_type_name(tp)}")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"--{key}: expected a list ({_type_name(tp)}), got {value!r}")
        return origin(coerce(v, item_tp, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"--{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"--{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"--{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"--{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"--{key}: expected a string, got {value!r}")
    raise ConfigError(f"--{key}: unsupported field type {tp}")


def apply_overrides(cfg, overrides: dict[str, Any]):
    """Return a copy of `cfg` with `overrides` applied, each checked against the field's type."""
    hints = _hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    changes = {}
    for key, value in overrides.items():
        k = key.replace("-", "_")
        if k not in names:
            close = difflib.get_close_matches(k, names, n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown config key {key!r} for {type(cfg).__name__}.{hint}\nAccepted keys:\n{describe_fields(type(cfg))}")
        changes[k] = coerce(value, hints[k], k)
    return dataclasses.replace(cfg, **changes)


def find_preset(name: str, preset_dir: str | Path) -> Path:
    """A preset by path, or by name in `preset_dir` (`tiny` -> `<preset_dir>/tiny.yaml`)."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = Path(preset_dir) / f"{name}.yaml"
    if candidate.exists():
        return candidate
    available = sorted(q.stem for q in Path(preset_dir).glob("*.yaml"))
    raise ConfigError(f"no preset {name!r}: not a YAML file, and not one of {available} in {preset_dir}")


def load_preset(path: str | Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of key: value, got {type(data).__name__}")
    return data


def split_argv(argv: list[str]) -> dict[str, str]:
    """`--key=value` / `--key value` / `--flag` (=true) into a dict, in order."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: arguments are --key=value")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = body, argv[i + 1]
            i += 1
        else:
            key, value = body, "true"
        out[key] = value
        i += 1
    return out


def parse_config(cls, argv: list[str], preset_dir: str | Path):
    """Build `cls` from defaults, an optional `--config=` preset and `--key=value` overrides."""
    if "--help" in argv or "-h" in argv:
        print(f"Usage: --config=PRESET --key=value ...\nPresets in {preset_dir}.\nKeys:\n{describe_fields(cls)}")
        raise SystemExit(0)
    args = split_argv(argv)
    cfg = cls()
    preset = args.pop("config", None)
    if preset is not None:
        cfg = apply_overrides(cfg, load_preset(find_preset(preset, preset_dir)))
    return apply_overrides(cfg, args)


def save_config(cfg, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
