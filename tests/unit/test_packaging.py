"""Every package folder is listed in pyproject.toml, so a wheel carries it."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAPPING = {"common": "siterecovery.common", "controller": "siterecovery.controller", "agents": "siterecovery.agents", "siterecovery": "siterecovery"}


def test_every_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top, name in MAPPING.items():
        for init in (ROOT / top).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *relative.parts]))
    assert found - listed == set()
