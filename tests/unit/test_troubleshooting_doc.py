"""docs/troubleshooting.md explains every error code the code can raise, and no other.

The codes are collected from the source, not listed by hand. Every Python file
of `agents/`, `common/` and `controller/` (not the generated `common/pb/`) is
parsed with `ast`, and a code is:

- the value of a `code=`, `error_code=` or `reason_code=` keyword argument of
  any call (`errors.PreconditionFailed(..., code="vm-has-snapshots")`, a
  doctor `Check`, a heartbeat `Problem`, a job step's `error_code`), when it is
  a string literal, a module-level string constant (`code=RETENTION_FULL`),
  an f-string, or either side of `x or "literal"` / `a if c else b`;
- the argument in the `code` position of a call to a function of the same
  module that takes a `code` parameter (`self._fail("journal-io", ...)`);
- the `category` class attribute of an error class (the code an error carries
  when it was raised without one: `invalid-input`, `not-found`, ...).

An f-string becomes a pattern with its placeholders named after what they
hold: `f"{role}-not-found"` is documented as `{role}-not-found`, and the doc
says which values it takes. A code passed through a variable (`code=exc.code`)
is not a new code: wherever it comes from, it is collected there.

The document lists codes in the first cell of the rows of tables whose first
column is headed "Code", in backticks (several codes may share a row:
`` `a`, `b` ``). The tests fail when a code of
the source is missing from the document, and when the document lists a code
that nothing raises any more. Run this file as a script to print every code
with where it is raised.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("agents", "common", "controller")
DOC = ROOT / "docs" / "troubleshooting.md"
CODE_KEYWORDS = frozenset({"code", "error_code", "reason_code"})
# A code: lower-case words joined by '-', with {placeholders} where an f-string has them.
CODE_SHAPE = re.compile(r"^(?:[a-z0-9]+|\{[a-z_]+\})(?:-(?:[a-z0-9]+|\{[a-z_]+\}))*$")
CODE_CELL = re.compile(r"^(?:`[^`]+`\s*,\s*)*`[^`]+`$")


def _placeholder(expr: ast.expr) -> str:
    """What an f-string placeholder holds, as a name: {role}, {entity}, {status}."""
    while isinstance(expr, ast.Call):
        expr = expr.func
    if isinstance(expr, ast.Attribute):
        return expr.attr
    if isinstance(expr, ast.Name):
        return expr.id
    return "value"


def _values(expr: ast.expr, constants: dict[str, str]) -> set[str]:
    """The code(s) an argument expression can be, as far as the source says."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return {expr.value} if expr.value else set()
    if isinstance(expr, ast.Name) and expr.id in constants:
        return {constants[expr.id]}
    if isinstance(expr, ast.JoinedStr):
        return {
            "".join(
                str(part.value) if isinstance(part, ast.Constant) else "{" + _placeholder(part.value) + "}"
                for part in expr.values
            )
        }
    if isinstance(expr, ast.BoolOp):
        return set().union(*(_values(v, constants) for v in expr.values))
    if isinstance(expr, ast.IfExp):
        return _values(expr.body, constants) | _values(expr.orelse, constants)
    return set()  # passed through (exc.code, a parameter): collected where it was made


def _module_constants(tree: ast.Module) -> dict[str, str]:
    return {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }


def _code_positions(tree: ast.Module) -> dict[str, int]:
    """Functions of this module that take `code` positionally: name -> index of the argument."""
    positions = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "__init__":
            params = [a.arg for a in node.args.posonlyargs + node.args.args]
            if "code" in params:
                bound = 1 if params[0] in ("self", "cls") else 0
                positions[node.name] = params.index("code") - bound
    return positions


@functools.cache
def collect_codes(root: Path = ROOT) -> dict[str, list[str]]:
    """Every error code under `root`'s sources -> where it is raised ("path:line"); read once per run."""
    found: dict[str, list[str]] = defaultdict(list)
    for top in SOURCES:
        for path in sorted((root / top).rglob("*.py")):
            relative = path.relative_to(root)
            if relative.parts[:2] == ("common", "pb"):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), str(relative))
            constants = _module_constants(tree)
            positions = _code_positions(tree)
            for node in ast.walk(tree):
                codes: set[str] = set()
                if isinstance(node, ast.ClassDef):
                    for item in node.body:
                        if (
                            isinstance(item, ast.Assign)
                            and any(isinstance(t, ast.Name) and t.id == "category" for t in item.targets)
                        ) or (
                            isinstance(item, ast.AnnAssign)
                            and isinstance(item.target, ast.Name)
                            and item.target.id == "category"
                            and item.value is not None
                        ):
                            for code in _values(item.value, constants):
                                found[code].append(f"{relative}:{item.lineno}")
                    continue
                if not isinstance(node, ast.Call):
                    continue
                for keyword in node.keywords:
                    if keyword.arg in CODE_KEYWORDS:
                        codes |= _values(keyword.value, constants)
                func = node.func
                local = func.id if isinstance(func, ast.Name) else None
                if (
                    isinstance(func, ast.Attribute)
                    and isinstance(func.value, ast.Name)
                    and func.value.id == "self"
                ):
                    local = func.attr
                index = positions.get(local or "")
                if index is not None and len(node.args) > index:
                    codes |= _values(node.args[index], constants)
                for code in codes:
                    found[code].append(f"{relative}:{node.lineno}")
    return dict(found)


def documented_codes(text: str) -> dict[str, int]:
    """Codes in the first cell of the rows of tables headed `| Code |` -> the line they are on."""
    codes: dict[str, int] = {}
    in_table = is_code_table = False
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.startswith("|"):
            in_table = False
            continue
        first = line.split("|")[1].strip()
        if not in_table:  # the header row
            in_table, is_code_table = True, first == "Code"
            continue
        if not is_code_table or set(first) <= set("-: "):  # another table, or the |---| row
            continue
        match = CODE_CELL.match(first)
        if not match:
            raise AssertionError(f"{DOC.name} line {number}: the first cell of a code table must be `code`s")
        for code in re.findall(r"`([^`]+)`", first):
            codes.setdefault(code, number)
    return codes


def test_the_collector_sees_every_way_a_code_is_given() -> None:
    codes = collect_codes()
    assert "vm-has-snapshots" in codes  # a literal keyword
    assert "retention-full" in codes  # a module constant (RETENTION_FULL)
    assert "journal-io" in codes  # positionally, to self._fail(...)
    assert "{role}-not-found" in codes  # an f-string
    assert "pair-error" in codes  # `x or "pair-error"`
    assert "step-failed" in codes  # error_code= of a job step
    assert "spool-full" in codes  # a heartbeat Problem
    assert "clock-skew" in codes  # a doctor Check
    assert {"invalid-input", "internal", "error"} <= set(codes)  # categories


def test_every_code_has_the_shape_of_a_code() -> None:
    odd = sorted(
        f"{code!r} ({where[0]})" for code, where in collect_codes().items() if not CODE_SHAPE.match(code)
    )
    assert not odd, "codes are lower-case words joined by '-': " + ", ".join(odd)


def test_every_error_code_is_documented() -> None:
    documented = documented_codes(DOC.read_text(encoding="utf-8"))
    missing = sorted(
        f"{code} (raised at {', '.join(where[:3])})"
        for code, where in collect_codes().items()
        if code not in documented
    )
    assert not missing, (
        f"{len(missing)} error code(s) are not explained in {DOC.relative_to(ROOT)}; add a row "
        "(| `code` | cause | fix |) to the section of their area:\n  " + "\n  ".join(missing)
    )


def test_the_document_lists_no_code_that_is_gone() -> None:
    codes = collect_codes()
    stale = sorted(
        f"{code} (line {line})"
        for code, line in documented_codes(DOC.read_text(encoding="utf-8")).items()
        if code not in codes
    )
    assert not stale, (
        f"{DOC.relative_to(ROOT)} explains code(s) nothing raises any more; remove or rename their rows:\n  "
        + "\n  ".join(stale)
    )


if __name__ == "__main__":
    found = collect_codes(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
    for code in sorted(found):
        print(f"{code}\t{', '.join(found[code])}")
    print(f"{len(found)} codes", file=sys.stderr)
