"""Printing for srctl: a table for people, JSON or YAML for scripts.

Every command that prints data hands it to `emit`, the one place that renders
it: as JSON, as YAML (the same document: the data goes through JSON first, so
both formats always say the same thing), or, for `--output table`, by calling
the command's own function that draws tables for people. Streams (a job being
followed) use `emit_item`: one JSON document per line, or YAML documents
separated by `---`. An error is not data: srctl's `main.report` prints it on
stderr, in the form the command's --output asked for (`Requested`).
"""

from __future__ import annotations

import enum
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

# Rich draws for 80 columns when it writes to a pipe or a file and COLUMNS is
# not set, squeezing a wide table (`srctl replication status`) into "MAC…"
# cells. A pipe gets whole rows instead: grep, less -S and log files want
# lines, not a guess at a terminal. A terminal keeps its own width.
PIPE_WIDTH = 250


def _width(stream) -> int | None:
    if os.environ.get("COLUMNS") or stream.isatty():
        return None
    return PIPE_WIDTH


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))


class Format(enum.StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


class Requested:
    """The --output the running command was given, for the error srctl prints after the command ended."""

    format: Format = Format.table


def _remember(value: Format | None) -> Format | None:
    if value is not None:
        Requested.format = Format(value)
    return value


OutputOption = Annotated[
    Format,
    typer.Option("--output", "-o", help="table for people; json or yaml for scripts", callback=_remember),
]


def message_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def to_json(data: Any, *, indent: int | None = 2) -> str:
    return json.dumps(data, indent=indent, sort_keys=False, default=str)


def to_yaml(data: Any) -> str:
    """The YAML of exactly what `to_json` prints (so values JSON shows as strings stay strings)."""
    import yaml  # PyYAML, already a dependency (the source agent reads netplan); loaded only when asked

    plain = json.loads(to_json(data, indent=None))
    return yaml.safe_dump(plain, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1_000_000)


def render(output_format: Format, data: Any) -> str:
    if output_format is Format.yaml:
        return to_yaml(data)
    return to_json(data) + "\n"


def emit(output_format: Format, data: Any, table: Callable[[], None] | None = None) -> None:
    """Print `data` as JSON or YAML; for a table, call `table` (or print the data as JSON when there is none)."""
    if output_format is Format.table and table is not None:
        table()
        return
    sys.stdout.write(render(Format.json if output_format is Format.table else output_format, data))
    sys.stdout.flush()


def emit_item(output_format: Format, data: Any) -> None:
    """One item of a stream: a line of JSON, or a YAML document starting with `---`."""
    if output_format is Format.yaml:
        sys.stdout.write("---\n" + to_yaml(data))
    else:
        sys.stdout.write(to_json(data, indent=None) + "\n")
    sys.stdout.flush()


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[str(cell) for cell in row])
    console.print(table)


def enum_label(name: str, prefix: str) -> str:
    """ROLE_PROCESS_SERVER → process-server."""
    return name.removeprefix(prefix).lower().replace("_", "-")


def age(seconds: float) -> str:
    if seconds < 0:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def when(stamp: Any) -> str:
    if not stamp or not stamp.seconds:
        return "-"
    return stamp.ToDatetime(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def now_text() -> str:
    return datetime.now().astimezone().strftime("%H:%M:%S")
