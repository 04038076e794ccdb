"""Settings for every daemon: a TOML file, then command-line flags, into a frozen dataclass.

Each daemon declares a dataclass whose fields are its options (with defaults).
`load(cls, path, overrides)` reads the file, applies the flags that were given,
converts values to the field types and refuses unknown keys with the list of
known ones, so a typo in a config file is an error and not a silent default.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from siterecovery.common.errors import InvalidInput

T = TypeVar("T")


def load(cls: type[T], path: Path | None, overrides: dict[str, Any] | None = None) -> T:
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise InvalidInput(
                f"configuration file {path} does not exist",
                hint="pass --config with the path of an existing TOML file",
                code="config-missing",
            ) from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInput(
                f"configuration file {path} is not valid TOML: {exc}", code="config-invalid"
            ) from exc
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InvalidInput(
            f"unknown setting(s) {', '.join(unknown)} in {path or 'flags'}",
            hint=f"known settings: {', '.join(sorted(fields))}",
            code="config-unknown-key",
        )
    hints = typing.get_type_hints(cls)
    converted = {name: _convert(name, value, hints[name]) for name, value in values.items()}
    return cls(**converted)


def _convert(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return None if value is None else _convert(name, value, inner[0])
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise InvalidInput(f"setting {name} must be a list, not {value!r}", code="config-type")
        item = args[0] if args else Any
        converted = [_convert(name, v, item) for v in value]
        return tuple(converted) if origin is tuple else converted
    if hint is Path:
        return Path(value).expanduser()
    if hint in (int, float, str):
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, hint) or isinstance(value, bool):
            try:
                return hint(value)
            except (TypeError, ValueError) as exc:
                raise InvalidInput(
                    f"setting {name} must be {hint.__name__}, not {value!r}", code="config-type"
                ) from exc
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise InvalidInput(f"setting {name} must be true or false", code="config-type")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise InvalidInput(f"setting {name} must be a table", code="config-type")
        sub_fields = {f.name for f in dataclasses.fields(hint)}
        unknown = sorted(set(value) - sub_fields)
        if unknown:
            raise InvalidInput(
                f"unknown key(s) {', '.join(unknown)} in {name}",
                hint=f"known keys: {', '.join(sorted(sub_fields))}",
                code="config-unknown-key",
            )
        sub_hints = typing.get_type_hints(hint)
        return hint(**{k: _convert(f"{name}.{k}", v, sub_hints[k]) for k, v in value.items()})
    return value


def parse_endpoint(text: str, *, default_port: int) -> tuple[str, int]:
    """`host`, `host:port` or `[v6]:port` → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        host, port = text, str(default_port)
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError as exc:
        raise InvalidInput(f"{text!r} is not host:port", code="bad-endpoint") from exc
    if not host or not 0 <= number <= 65535:
        raise InvalidInput(f"{text!r} is not host:port with a port 0-65535", code="bad-endpoint")
    return host, number


def parse_listen(text: str, *, setting: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) a daemon listens on; the port is required, 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port or not port.isdigit() or not host.strip("[]"):
        raise InvalidInput(
            f"{setting} {text!r} is not host:port",
            hint=f'write it as {setting} = "127.0.0.1:9464" (port 0 picks a free one)',
            code="bad-endpoint",
        )
    return parse_endpoint(text, default_port=0)
