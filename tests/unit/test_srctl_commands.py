"""Every srctl command, found by walking the typer app: each takes --output table|json|yaml, and each
that starts a job takes --wait/--no-wait. YAML and JSON render the same document.

Which commands start a job is not a list kept by hand: an RPC starts one when
the contract says it answers with a Job (or a message holding one), and a
command reaches an RPC when its function, or a srctl helper it calls, names
it (`call("X", …)`, `protect_call("X", …)` or `stub.X(…)`). A new job command
without --wait/--no-wait, or a new job RPC no command reaches, fails here.
"""

from __future__ import annotations

import ast
import inspect
import json
import textwrap
import types
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
import yaml

from siterecovery.common.pb import admin_pb2, protection_pb2
from siterecovery.controller.cli import output
from siterecovery.controller.cli.main import app

# Reading a job is not starting one.
READS = {"GetJob", "WatchJob"}
# Commands that run jobs to an end by their nature: there is nothing to return early to.
ALWAYS_WAIT = {
    "lab up": "protecting the lab's VM is part of bringing the lab up",
    "drill": "it runs the whole cycle and judges it",
}


def commands() -> Iterator[tuple[str, Callable]]:
    def walk(typer_app, prefix: str):
        for info in typer_app.registered_commands:
            name = info.name or info.callback.__name__.replace("_", "-")
            yield f"{prefix}{name}", info.callback
        for group in typer_app.registered_groups:
            yield from walk(group.typer_instance, f"{prefix}{group.name} ")

    yield from walk(app, "")


def _holds_job(message) -> bool:
    if message.full_name == "siterecovery.v1.Job":
        return True
    return any(f.message_type is not None and f.message_type.full_name == "siterecovery.v1.Job"
               and not f.is_repeated for f in message.fields)


def job_rpcs() -> set[str]:
    found = set()
    for module in (admin_pb2, protection_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if method.name not in READS and _holds_job(method.output_type):
                    found.add(method.name)
    return found


def all_rpcs() -> set[str]:
    return {m.name for mod in (admin_pb2, protection_pb2) for s in mod.DESCRIPTOR.services_by_name.values()
            for m in s.methods}


def rpcs_reached(func: Callable, seen: set | None = None) -> set[str]:
    seen = set() if seen is None else seen
    known = all_rpcs()
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    reached: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        callee = node.func
        if isinstance(callee, ast.Name) and callee.id in ("call", "protect_call") and node.args:
            if isinstance(node.args[0], ast.Constant):
                reached.add(node.args[0].value)
        if isinstance(callee, ast.Attribute) and callee.attr in known:
            reached.add(callee.attr)
        target = None
        if isinstance(callee, ast.Name):
            target = func.__globals__.get(callee.id)
        elif isinstance(callee, ast.Attribute) and isinstance(callee.value, ast.Name):
            owner = func.__globals__.get(callee.value.id)
            target = getattr(owner, callee.attr, None) if isinstance(owner, types.ModuleType) else None
        if (inspect.isfunction(target) and target.__module__.startswith("siterecovery.controller.cli")
                and target not in seen):
            seen.add(target)
            reached |= rpcs_reached(target, seen)
    return reached


def _options(func: Callable) -> dict[str, object]:
    """The typer option of each parameter (from its Annotated metadata)."""
    found = {}
    for name, parameter in inspect.signature(func, eval_str=True).parameters.items():
        for meta in getattr(parameter.annotation, "__metadata__", ()):
            found[name] = meta
    return found


ALL = sorted(commands())


def test_the_walk_finds_the_commands() -> None:
    names = {name for name, _ in ALL}
    assert {"doctor", "servers list", "machine failover", "plan failover", "vcenter add",
            "process-server deploy azure", "lab up", "drill"} <= names
    assert len(names) > 50


@pytest.mark.parametrize(("name", "func"), ALL, ids=[n for n, _ in ALL])
def test_every_command_takes_output_table_json_yaml(name: str, func: Callable) -> None:
    option = _options(func).get("output_format")
    assert option is not None, f"srctl {name} has no --output"
    assert "--output" in (option.default, *option.param_decls)
    parameter = inspect.signature(func, eval_str=True).parameters["output_format"]
    assert [f.value for f in parameter.annotation.__origin__] == ["table", "json", "yaml"]
    assert parameter.default is output.Format.table


def test_every_job_rpc_is_reached_by_a_command() -> None:
    reached = set().union(*(rpcs_reached(func) for _, func in ALL))
    jobs = job_rpcs()
    assert {"ProtectMachine", "StartWorkflow", "StartPlanWorkflow", "ResumeJob", "DiscoverVcenter", "AddVcenter",
            "DeployAzureProcessServer"} <= jobs
    assert jobs <= reached, f"no srctl command starts {sorted(jobs - reached)}"


@pytest.mark.parametrize(("name", "func"), ALL, ids=[n for n, _ in ALL])
def test_every_command_that_starts_a_job_takes_wait_no_wait(name: str, func: Callable) -> None:
    starts = rpcs_reached(func) & job_rpcs()
    if not starts or name in ALWAYS_WAIT:
        return
    option = _options(func).get("wait")
    assert option is not None, f"srctl {name} starts a job ({', '.join(sorted(starts))}) without --wait/--no-wait"
    assert "--wait/--no-wait" in (option.default, *option.param_decls)
    assert inspect.signature(func).parameters["wait"].default is True, f"srctl {name} should wait by default"


SAMPLE = {
    "name": "app01",
    "count": 2**63 - 1,
    "ratio": 0.25,
    "empty": None,
    "flags": [True, False],
    "when": datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),  # JSON shows it as a string: so must YAML
    "text": "ünïcode: a: b # not a comment\nsecond line",
    "looks_like": ["yes", "no", "1.0", "null", "~", "0x1f", "2025-01-02"],
    "nested": {"list": [{"a": 1}, []], "map": {}},
}


@pytest.mark.parametrize("data", [SAMPLE, [SAMPLE, SAMPLE], [], {}, "plain", 3])
def test_yaml_is_the_same_document_as_json(data) -> None:
    as_json = json.loads(output.render(output.Format.json, data))
    assert yaml.safe_load(output.render(output.Format.yaml, data)) == as_json


def test_streams_are_one_document_per_item(capsys) -> None:
    for fmt in (output.Format.json, output.Format.yaml):
        for item in ({"step": 1}, SAMPLE):
            output.emit_item(fmt, item)
        text = capsys.readouterr().out
        docs = (list(yaml.safe_load_all(text)) if fmt is output.Format.yaml
                else [json.loads(line) for line in text.splitlines()])
        assert docs == [{"step": 1}, json.loads(output.to_json(SAMPLE))]


def test_table_calls_the_people_printer_and_scripts_get_data(capsys) -> None:
    shown = []
    output.emit(output.Format.table, {"a": 1}, lambda: shown.append("table"))
    assert shown == ["table"] and capsys.readouterr().out == ""
    output.emit(output.Format.yaml, {"a": 1}, lambda: shown.append("table"))
    assert shown == ["table"] and yaml.safe_load(capsys.readouterr().out) == {"a": 1}
