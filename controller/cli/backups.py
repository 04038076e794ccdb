"""srctl backup: take a backup of the configuration server; restore one on a new host."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from siterecovery.common.pb import admin_pb2
from siterecovery.controller.cli import output
from siterecovery.controller.cli.output import Format, OutputOption
from siterecovery.controller.cli.session import call

backup_app = typer.Typer(help="Backups of the configuration server: store, CA, keys.", no_args_is_help=True)
PassphraseOption = Annotated[
    Path, typer.Option("--passphrase-file", help="0600 file holding the backup passphrase (12+ characters)")
]


@backup_app.command("create")
def create(
    out: Annotated[Path, typer.Option(help="file to write the sealed backup to")],
    passphrase_file: PassphraseOption,
    output_format: OutputOption = Format.table,
) -> None:
    """Back up the running server now (consistent while it works); the file is sealed with the passphrase."""
    from siterecovery.controller import backup

    passphrase = backup.read_passphrase(passphrase_file)
    chunks = call("CreateBackup", admin_pb2.CreateBackupRequest(passphrase=passphrase), timeout=600)
    data = b"".join(chunk.data for chunk in chunks)
    backup.write_file(out, data)
    if output_format is not Format.table:
        output.emit(output_format, {"path": str(out), "bytes": len(data)})
        return
    output.console.print(f"backup written to {out} ({output.human_bytes(len(data))}); keep the passphrase apart from it")


@backup_app.command("restore")
def restore(
    file: Annotated[Path, typer.Argument(help="a backup made by `srctl backup create` or the schedule")],
    passphrase_file: PassphraseOption,
    state_dir: Annotated[Path, typer.Option(help="the new server's state directory (empty)")],
    store_url: Annotated[str, typer.Option(help="SQLAlchemy URL of an empty store; default SQLite in the state dir")] = "",
    output_format: OutputOption = Format.table,
) -> None:
    """Make a new host the backed-up configuration server (run it with the server stopped).

    Then start sr-config-server with this state directory, the same advertised
    names and the same port: agents and operators carry on as before."""
    from siterecovery.controller import backup

    manifest = backup.restore(
        file.read_bytes(), backup.read_passphrase(passphrase_file), state_dir, store_url=store_url
    )
    if output_format is not Format.table:
        output.emit(output_format, manifest)
        return
    rows = sum(manifest.get("rows", {}).values())
    output.console.print(
        f"restored the backup of {manifest.get('hostname')} taken {manifest.get('created_at')} into {state_dir}: "
        f"{rows} rows, {len(manifest.get('files', []))} files.\n"
        f"Next: start sr-config-server --state-dir {state_dir} with the same advertised names and port."
    )
