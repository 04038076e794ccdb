"""srctl user: operators with their own client certificates (admin or reader)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import tomli_w
import typer

from siterecovery.common import errors, pki
from siterecovery.common.pb import admin_pb2, common_pb2
from siterecovery.controller.cli import output
from siterecovery.controller.cli.output import Format, OutputOption
from siterecovery.controller.cli.session import call, profile

users_app = typer.Typer(help="Operators: who may use srctl, as admin or read-only reader.", no_args_is_help=True)
ROLES = {"admin": common_pb2.ROLE_ADMIN, "reader": common_pb2.ROLE_READER}


@users_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="the operator's name (lower case, e.g. alice)")],
    role: Annotated[str, typer.Option(help="admin (may change anything) or reader (may only look)")] = "reader",
    out: Annotated[Path | None, typer.Option(help="directory for the operator's srctl profile; default ./srctl-NAME")] = None,
    output_format: OutputOption = Format.table,
) -> None:
    """Issue a client certificate and write a ready srctl profile for it.

    The key is made here and never leaves this machine; hand the directory to
    the operator, who runs `srctl --config DIR/srctl.toml ...`."""
    if role not in ROLES:
        raise errors.InvalidInput(f"unknown role {role!r}", hint="use admin or reader", code="role-invalid")
    directory = out or Path(f"srctl-{name}")
    if directory.exists() and any(directory.iterdir()):
        raise errors.Conflict(f"{directory} exists and is not empty", hint="choose another --out", code="out-exists")
    key = pki.generate_key()
    csr = pki.build_csr(key, common_name=name, sans=[])
    response = call("AddOperator", admin_pb2.AddOperatorRequest(name=name, role=ROLES[role], csr_der=csr))
    pki.make_private_dir(directory)
    pki.write_private(directory / "client.key", pki.private_key_pem(key))
    (directory / "client.crt").write_bytes(response.cert_pem)
    (directory / "ca.crt").write_bytes(response.ca_pem)
    server = profile().server
    text = tomli_w.dumps({"server": server, "ca": "ca.crt", "cert": "client.crt", "key": "client.key"})
    pki.write_private(directory / "srctl.toml", text.encode())
    if output_format is not Format.table:
        output.emit(output_format, {"operator": _json(response.operator), "profile": str(directory / "srctl.toml")})
        return
    output.console.print(
        f"{name} is a{'n' if role == 'admin' else ''} {role}; certificate valid until "
        f"{output.when(response.operator.expires_at)}.\n"
        f"Give {directory}{os.sep} to {name} (it holds a private key): "
        f"srctl --config {directory / 'srctl.toml'} servers list"
    )


@users_app.command("list")
def list_(
    include_removed: Annotated[bool, typer.Option("--all", help="also list removed operators")] = False,
    output_format: OutputOption = Format.table,
) -> None:
    """Operators and their certificates."""
    response = call("ListOperators", admin_pb2.ListOperatorsRequest(include_removed=include_removed))
    if output_format is not Format.table:
        output.emit(output_format, [_json(o) for o in response.operators])
        return
    output.print_table(
        "Operators", ["NAME", "ROLE", "ISSUED", "EXPIRES", "REMOVED", "IDENTITY"],
        [
            [
                o.name, _role(o), output.when(o.issued_at), output.when(o.expires_at),
                output.when(o.revoked_at) if o.HasField("revoked_at") else "-", o.identity_id,
            ]
            for o in response.operators
        ],
    )


@users_app.command("remove")
def remove(
    name: Annotated[str, typer.Argument(help="the operator's name")],
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    output_format: OutputOption = Format.table,
) -> None:
    """Revoke the operator's certificate: every port refuses it from now on."""
    if not yes and not typer.confirm(f"Revoke {name}'s certificate? It cannot be undone", default=False):
        raise typer.Exit(1)
    removed = call("RemoveOperator", admin_pb2.RemoveOperatorRequest(name=name))
    if output_format is not Format.table:
        output.emit(output_format, _json(removed))
        return
    output.console.print(f"removed {removed.name} ({_role(removed)}): the certificate is revoked")


def _role(o: admin_pb2.Operator) -> str:
    return output.enum_label(common_pb2.Role.Name(o.role), "ROLE_")


def _json(o: admin_pb2.Operator) -> dict:
    data = output.message_dict(o)
    data["role"] = _role(o)
    return data
