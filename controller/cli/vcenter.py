"""srctl vcenter …: vCenter and standalone ESXi endpoints, their discovery and inventory."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from siterecovery.common import errors
from siterecovery.common.pb import admin_pb2
from siterecovery.controller.cli import completion, output
from siterecovery.controller.cli.follow import WaitOption, follow
from siterecovery.controller.cli.output import Format, OutputOption
from siterecovery.controller.cli.session import call

app = typer.Typer(
    help="vCenter and standalone ESXi endpoints: credentials, discovery, inventory.", no_args_is_help=True
)

NameArg = Annotated[
    str, typer.Argument(help="the endpoint's name (see `srctl vcenter list`)", autocompletion=completion.vcenters)
]
UserOption = Annotated[str, typer.Option("--user", "-u", help="account, e.g. svc-dr@vsphere.local or root")]
PasswordFileOption = Annotated[
    Path,
    typer.Option("--password-file", help="file holding the password ('-': standard input); never a flag"),
]
# The server logs in before it stores anything (or answers): allow for a slow endpoint.
LOGIN_TIMEOUT = 120.0


def _read_password(path: Path) -> str:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as exc:
        raise errors.InvalidInput(f"cannot read the password file {path}: {exc.strerror}") from exc
    password = text.rstrip("\r\n")
    if not password:
        raise errors.InvalidInput(f"the password file {path} is empty", hint="write the password into it")
    return password


def _vcenter_json(v: admin_pb2.Vcenter) -> dict:
    data = output.message_dict(v)
    data["created_at"] = output.when(v.created_at)
    data["discovered_at"] = output.when(v.discovered_at) if v.HasField("discovered_at") else None
    return data


def _print_vcenters(items, output_format: Format) -> None:
    if output_format is not Format.table:
        output.emit(output_format, [_vcenter_json(v) for v in items])
        return
    output.print_table(
        "vCenter / ESXi endpoints",
        ["NAME", "ADDRESS", "USER", "TRUST", "DISCOVERED", "STATUS", "ERROR"],
        [
            [
                v.name,
                f"{v.host}:{v.port}",
                v.username,
                v.trust,
                output.when(v.discovered_at) if v.HasField("discovered_at") else "never",
                v.discovery_status or "pending",
                v.discovery_error or "-",
            ]
            for v in items
        ],
    )


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="a name for the endpoint, unique")],
    host: Annotated[str, typer.Option(help="vCenter or ESXi host name or address")],
    user: UserOption,
    password_file: PasswordFileOption,
    port: Annotated[int, typer.Option(min=1, max=65535)] = 443,
    ca_file: Annotated[
        Path | None, typer.Option(help="PEM file of the CA that signed its certificate")
    ] = None,
    thumbprint: Annotated[str, typer.Option(help="SHA-1 or SHA-256 fingerprint of its certificate")] = "",
    insecure: Annotated[bool, typer.Option(help="do not check its certificate (labs only)")] = False,
    wait: WaitOption = True,
    output_format: OutputOption = Format.table,
) -> None:
    """Register a vCenter or standalone ESXi host; the server logs in first, then discovers it (a job)."""
    if sum([ca_file is not None, bool(thumbprint), insecure]) > 1:
        raise errors.InvalidInput("give one of --ca-file, --thumbprint and --insecure")
    ca_pem = ""
    if ca_file is not None:
        try:
            ca_pem = ca_file.read_text()
        except OSError as exc:
            raise errors.InvalidInput(f"cannot read the CA file {ca_file}: {exc.strerror}") from exc
    request = admin_pb2.AddVcenterRequest(
        name=name,
        host=host,
        port=port,
        username=user,
        password=_read_password(password_file),
        trust=admin_pb2.VcenterTrust(ca_pem=ca_pem, thumbprint=thumbprint, insecure=insecure),
    )
    response = call("AddVcenter", request, timeout=LOGIN_TIMEOUT)
    added = {"vcenter": _vcenter_json(response.vcenter), "discovery_job": response.discovery.id}
    text = (f"Added {response.vcenter.name} ({response.vcenter.host}:{response.vcenter.port}); "
            f"discovery job {response.discovery.id}")
    if not wait:
        output.emit(output_format, added, lambda: output.console.print(
            f"{text} started (srctl jobs watch {response.discovery.id}).", highlight=False))
        return
    # Followed: for scripts, the endpoint is the first document of the stream, then the job's.
    if output_format is Format.table:
        output.console.print(f"{text}:", highlight=False)
    else:
        output.emit_item(output_format, added)
    follow(response.discovery, wait, output_format)


@app.command("list")
def list_(output_format: OutputOption = Format.table) -> None:
    """List endpoints and how their last discovery went."""
    _print_vcenters(call("ListVcenters", admin_pb2.ListVcentersRequest()).vcenters, output_format)


@app.command("update-credentials")
def update_credentials(
    name: NameArg,
    user: UserOption,
    password_file: PasswordFileOption,
    output_format: OutputOption = Format.table,
) -> None:
    """Replace the account the server uses; it logs in with it before storing it."""
    request = admin_pb2.UpdateVcenterCredentialsRequest(
        name=name, username=user, password=_read_password(password_file)
    )
    _print_vcenters([call("UpdateVcenterCredentials", request, timeout=LOGIN_TIMEOUT)], output_format)


@app.command("remove")
def remove(name: NameArg, output_format: OutputOption = Format.table) -> None:
    """Forget an endpoint and its inventory (nothing changes in vSphere)."""
    call("RemoveVcenter", admin_pb2.RemoveVcenterRequest(name=name))
    if output_format is not Format.table:
        output.emit(output_format, {"removed": name})
    else:
        output.console.print(f"Removed {name}.")


@app.command("discover")
def discover(name: NameArg, wait: WaitOption = True, output_format: OutputOption = Format.table) -> None:
    """Discover an endpoint now (a job; the one already running, if any)."""
    follow(call("DiscoverVcenter", admin_pb2.DiscoverVcenterRequest(name=name)), wait, output_format)


@app.command("inventory")
def inventory(name: NameArg, output_format: OutputOption = Format.table) -> None:
    """Show what the last discovery found: hosts, datastores, VMs and the account's gaps."""
    from siterecovery.controller.providers.vsphere.facts import is_free_edition
    from siterecovery.controller.providers.vsphere.privileges import (
        FAILBACK_DATASTORE_PRIVILEGES,
        FAILBACK_HOST_PRIVILEGES,
        missing,
    )

    response = call("GetVcenterInventory", admin_pb2.GetVcenterInventoryRequest(name=name))
    doc = json.loads(response.document_json)
    if output_format is not Format.table:
        output.emit(output_format,
            {
                "vcenter": _vcenter_json(response.vcenter),
                "discovered_at": output.when(response.discovered_at),
                "inventory": doc,
            }
        )
        return
    output.console.print(
        f"{response.vcenter.name}: {doc.get('api_type')} {doc.get('api_version')}, "
        f"as {doc.get('user')}, discovered {output.when(response.discovered_at)}"
    )
    clusters = {c["id"]: c["name"] for c in doc.get("clusters", [])}
    output.print_table(
        "Hosts",
        ["NAME", "CLUSTER", "PRODUCT", "EDITION", "STATE", "MISSING PRIVILEGES"],
        [
            [
                h["name"],
                clusters.get(h["cluster"], "-"),
                f"{h['product']} {h['version']}",
                h["edition"] + (" (free: not a failback target)" if is_free_edition(h["edition"]) else ""),
                h["connection_state"],
                ", ".join(missing(h["privileges"], FAILBACK_HOST_PRIVILEGES)) or "-",
            ]
            for h in doc.get("hosts", [])
        ],
    )
    hosts = {h["id"]: h["name"] for h in doc.get("hosts", [])}
    output.print_table(
        "Datastores",
        ["NAME", "TYPE", "CAPACITY", "FREE", "HOSTS", "MISSING PRIVILEGES"],
        [
            [
                d["name"],
                d["type"],
                output.human_bytes(d["capacity"]),
                output.human_bytes(d["free_space"]),
                ", ".join(hosts.get(h, h) for h in d["hosts"]),
                ", ".join(missing(d["privileges"], FAILBACK_DATASTORE_PRIVILEGES)) or "-",
            ]
            for d in doc.get("datastores", [])
        ],
    )
    output.print_table(
        "Virtual machines",
        ["NAME", "POWER", "HOST", "DISKS", "IPS", "SNAPSHOTS", "ENABLEUUID", "BIOS UUID"],
        [
            [
                v["name"],
                v["power_state"],
                hosts.get(v["host"], v["host"]),
                ", ".join(
                    f"{d['path']} ({output.human_bytes(d['capacity'])}, {d['controller']})"
                    for d in v["disks"]
                ),
                ", ".join(v["guest_ips"]) or "-",
                len(v["snapshots"]),
                {True: "TRUE", False: "FALSE", None: "-"}[v["enable_uuid"]],
                v["bios_uuid"],
            ]
            for v in doc.get("vms", [])
        ],
    )
