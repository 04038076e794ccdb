"""deploy/config/*.toml: each loads through the real settings loader and documents every option.

The examples follow one rule (stated at the top of each file): a line "# text"
explains, a line "#key = value" (or "#[table]") is an option left commented
out. The tests read a file twice: as shipped, and with every commented-out
option uncommented. Both must load through `common/settings.load` (which
refuses unknown keys), the second must name every field of the settings
dataclass, nested tables included, and a commented-out option that has a real
default must show that default. So a new setting without an entry here, a
renamed one, or a changed default breaks the build.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest

from siterecovery.agents.settings import MasterTargetSettings, ProcessServerSettings, SourceSettings
from siterecovery.common import settings
from siterecovery.controller.settings import ConfigServerSettings

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "config"
CASES = {
    "config-server.toml": ConfigServerSettings,
    "process-server.toml": ProcessServerSettings,
    "master-target.toml": MasterTargetSettings,
    "source-agent.toml": SourceSettings,
}
# "#key = …", "#[table]", "#[[table]]": a commented-out option; "# …" is prose.
COMMENTED_OPTION = re.compile(r"^#(?=[A-Za-z_\[])")


def uncomment(text: str) -> str:
    return "\n".join(COMMENTED_OPTION.sub("", line) for line in text.splitlines())


def missing_fields(cls: type, table: dict[str, Any], where: str) -> list[str]:
    """Fields of `cls` (recursively, through nested dataclasses and tuples of them) absent from `table`."""
    missing = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        name = f"{where}{field.name}"
        if field.name not in table:
            missing.append(name)
            continue
        hint = hints[field.name]
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else None
        if dataclasses.is_dataclass(hint):
            missing += missing_fields(hint, table[field.name], f"{name}.")
        elif item is not None and dataclasses.is_dataclass(item):
            if not table[field.name]:
                missing.append(f"{name} (an example table)")
            for entry in table[field.name]:
                missing += missing_fields(item, entry, f"{name}[].")
    return missing


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_loads_as_shipped(name, tmp_path):
    cfg = settings.load(CASES[name], EXAMPLES / name)
    assert isinstance(cfg, CASES[name])


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_documents_every_option(name, tmp_path):
    cls = CASES[name]
    text = uncomment((EXAMPLES / name).read_text())
    # Duplicate keys (an option both set and commented out) fail here, as TOML forbids them.
    table = tomllib.loads(text)
    missing = missing_fields(cls, table, "")
    assert not missing, f"deploy/config/{name} does not document: {', '.join(missing)}"
    # And every documented value is one the loader takes.
    settings.load(cls, write(tmp_path, name, text))


@pytest.mark.parametrize("name", sorted(CASES))
def test_commented_out_options_show_their_default(name, tmp_path):
    cls = CASES[name]
    shipped = tomllib.loads((EXAMPLES / name).read_text())
    everything = settings.load(cls, write(tmp_path, name, uncomment((EXAMPLES / name).read_text())))
    wrong = []
    for field in dataclasses.fields(cls):
        default = default_of(field)
        # Options without a real default (None, an empty list, a table) show an example instead.
        if field.name in shipped or default in (None, (), dataclasses.MISSING) or dataclasses.is_dataclass(default):
            continue
        if getattr(everything, field.name) != default:
            wrong.append(f"{field.name} shows {getattr(everything, field.name)!r}, default is {default!r}")
    assert not wrong, f"deploy/config/{name}: " + "; ".join(wrong)


def test_a_missing_option_is_caught(tmp_path):
    # The check itself: drop one option from an example and it must be reported.
    text = (EXAMPLES / "master-target.toml").read_text()
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#retention_dir"))
    assert missing_fields(MasterTargetSettings, tomllib.loads(uncomment(text)), "") == ["retention_dir"]
    source = uncomment((EXAMPLES / "source-agent.toml").read_text())
    source = "\n".join(line for line in source.splitlines() if not line.startswith("mtu ="))
    assert missing_fields(SourceSettings, tomllib.loads(source), "") == ["network.interfaces[].mtu"]


def test_every_daemon_has_an_example():
    shipped = {path.name for path in EXAMPLES.glob("*.toml")}
    assert shipped == set(CASES)
