"""Hostile input for the fuzz suite: message strategies built from descriptors, and digests.

`message(cls, overrides)` draws a random protobuf message: every field may be
unset or set to a hostile value (negative and huge numbers, numbers at the
edges of their type, very long strings, `../` and absolute paths, NUL bytes,
non-UTF-8 bytes, unknown enum values), nested messages included. `overrides`
maps a field name to a strategy that mixes in values the site really has, so
the fuzzing reaches past the "not found" checks.

`store_digest` and `tree_digest` are what "nothing is written" is checked
against.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor
from hypothesis import strategies as st

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)

PATHS = [
    "../", "..", "../../etc/passwd", "/etc/passwd", "/", ".", "./x", "a/../../b", "/tmp/../etc/shadow",
    "\\..\\..\\windows", "disk0/../../x", "//server/share", "~root/.ssh/authorized_keys",
]
ODD = [
    "", " ", "\x00", "x\x00y", "disk0\x00", "\n", "-", "--help", "%s%n%x", "' OR 1=1 --", "\u202etxt.exe",
    "\ud7ff\ue000", "\U0001f600" * 20, "a" * 256, "a" * 4097, "latest", "pair-", "NULL", "*",
]
TEXT = st.one_of(
    st.sampled_from(PATHS + ODD),
    st.text(max_size=30),
    st.text(min_size=200, max_size=3000),
    st.builds(lambda a, b: a + b, st.sampled_from(PATHS), st.text(max_size=12)),
)
BYTES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"\x00", b"\xff\xfe\xfd", b"\xc3\x28", b"../../etc/passwd", b"\x00" * 1024]),
    st.binary(min_size=1000, max_size=20_000),
)


def _edges(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Any value of the type, with its edges (and the usual overflow points) drawn often."""
    points = (lo, lo + 1, -1, 0, 1, 4096, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, hi - 1, hi)
    return st.one_of(st.sampled_from(sorted({v for v in points if lo <= v <= hi})), st.integers(lo, hi))


_SCALARS = {
    FieldDescriptor.TYPE_INT32: _edges(*INT32),
    FieldDescriptor.TYPE_SINT32: _edges(*INT32),
    FieldDescriptor.TYPE_SFIXED32: _edges(*INT32),
    FieldDescriptor.TYPE_INT64: _edges(*INT64),
    FieldDescriptor.TYPE_SINT64: _edges(*INT64),
    FieldDescriptor.TYPE_SFIXED64: _edges(*INT64),
    FieldDescriptor.TYPE_UINT32: _edges(*UINT32),
    FieldDescriptor.TYPE_FIXED32: _edges(*UINT32),
    FieldDescriptor.TYPE_UINT64: _edges(*UINT64),
    FieldDescriptor.TYPE_FIXED64: _edges(*UINT64),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32, allow_nan=True, allow_infinity=True),
    FieldDescriptor.TYPE_STRING: TEXT,
    FieldDescriptor.TYPE_BYTES: BYTES,
}


def _enum(field: FieldDescriptor) -> st.SearchStrategy[int]:
    # proto3 enums are open: a peer may send any int32, known or not.
    known = [v.number for v in field.enum_type.values]
    return st.one_of(st.sampled_from(known), st.sampled_from([-1, max(known) + 1, 2**31 - 1]), st.integers(*INT32))


def _value(field: FieldDescriptor, overrides: dict, depth: int) -> st.SearchStrategy:
    if field.name in overrides:
        return overrides[field.name]
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _message(field.message_type, overrides, depth + 1)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return _enum(field)
    return _SCALARS[field.type]


def _message(descriptor, overrides: dict, depth: int) -> st.SearchStrategy[dict]:
    if depth > 3:
        return st.just({})
    optional = {}
    for field in descriptor.fields:
        value = _value(field, overrides, depth)
        if field.is_repeated and field.name not in overrides:
            value = st.lists(value, max_size=3 if depth else 5)
        optional[field.name] = value
    return st.fixed_dictionaries({}, optional=optional)


def _fill(message, values: dict) -> None:
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                target = getattr(message, name)
                for entry in value:
                    key = entry.get("key", field.message_type.fields_by_name["key"].default_value)
                    item = entry.get("value")
                    if field.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                        _fill(target[key], item or {})
                    elif item is not None:
                        target[key] = item
            elif field.is_repeated:
                for item in value:
                    _fill(getattr(message, name).add(), item)
            else:
                getattr(message, name).SetInParent()
                _fill(getattr(message, name), value)
        elif field.is_repeated:
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)


def message(cls, overrides: dict | None = None) -> st.SearchStrategy:
    """Random instances of the protobuf message class `cls`."""

    def build(values: dict):
        out = cls()
        _fill(out, values)
        return out

    return _message(cls.DESCRIPTOR, overrides or {}, 0).map(build)


def mixed(*known, base: st.SearchStrategy = TEXT) -> st.SearchStrategy:
    """Real values of the site, or hostile ones (`base`: text unless told)."""
    return st.one_of(st.sampled_from(known), base) if known else base


# -- "nothing is written" -----------------------------------------------------------

# Columns the agents' own heartbeats rewrite every interval; everything else must hold still.
VOLATILE = {
    "servers": {"last_heartbeat_at", "inventory", "problems"},
    "pair_reports": "*",
    "alembic_version": "*",
}


def store_digest(db: Path) -> str:
    """A digest of every table of the configuration server's SQLite store (read-only)."""
    digest = hashlib.sha256()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        for table in tables:
            skip = VOLATILE.get(table, set())
            if skip == "*":
                continue
            columns = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")') if r[1] not in skip]
            quoted = ", ".join(f'"{c}"' for c in columns)
            rows = conn.execute(f'SELECT {quoted} FROM "{table}" ORDER BY 1').fetchall()
            digest.update(json.dumps([table, columns, rows], default=repr).encode())
    finally:
        conn.close()
    return digest.hexdigest()


def tree_digest(*roots: Path) -> str:
    """A digest of every file (path, mode, content) under `roots`."""
    digest = hashlib.sha256()
    for root in roots:
        for directory, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files) + [f"{d}/" for d in dirs]:
                path = Path(directory) / name.rstrip("/")
                digest.update(str(path.relative_to(root.parent)).encode() + b"\0")
                if name.endswith("/") or not path.is_file():
                    continue
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
    return digest.hexdigest()
