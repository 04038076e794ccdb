"""srctl vcenter: input refused on the client, before any server is called (exit 2).

The profile named does not exist, so reaching the server would fail differently."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from siterecovery.common.errors import InvalidInput
from siterecovery.controller.cli.main import app


def _run(tmp_path: Path, *args: str):
    missing_profile = tmp_path / "no-such-srctl.toml"
    return CliRunner().invoke(app, ["--config", str(missing_profile), "vcenter", *args])


@pytest.mark.parametrize(
    "extra",
    [
        ["--password-file", "EMPTY"],
        ["--password-file", "MISSING"],
        ["--password-file", "GOOD", "--insecure", "--thumbprint", "AB" * 20],
        ["--password-file", "GOOD", "--ca-file", "MISSING"],
    ],
)
def test_add_refuses_bad_input_without_calling_the_server(tmp_path: Path, extra: list[str]) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "good").write_text("secret\n")
    files = {"EMPTY": tmp_path / "empty", "MISSING": tmp_path / "missing", "GOOD": tmp_path / "good"}
    args = [str(files.get(a, a)) for a in extra]
    result = _run(tmp_path, "add", "vc01", "--host", "vc.example", "--user", "u", *args)
    # srctl's main() turns InvalidInput into exit code 2 (the runner calls the app directly).
    assert isinstance(result.exception, InvalidInput), result.output
    assert result.exception.exit_code == 2
    assert "secret" not in str(result.exception)
