"""srctl azure … (Azure sites) and srctl process-server deploy azure … (a process server VM in Azure)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from siterecovery.common import errors
from siterecovery.common.azure.site import ClientSecret
from siterecovery.common.pb import admin_pb2
from siterecovery.controller.cli import completion, output
from siterecovery.controller.cli.follow import WaitOption, follow
from siterecovery.controller.cli.output import Format, OutputOption
from siterecovery.controller.cli.session import call

app = typer.Typer(
    help="Azure sites: subscription, network, storage and the service principal jobs use.", no_args_is_help=True
)
process_server_app = typer.Typer(help="Process servers.", no_args_is_help=True)
deploy_app = typer.Typer(help="Deploy a process server.", no_args_is_help=True)
process_server_app.add_typer(deploy_app, name="deploy")

NameArg = Annotated[
    str, typer.Argument(help="the site's name (see `srctl azure list`)", autocompletion=completion.azure_sites)
]
SecretFileOption = Annotated[
    Path,
    typer.Option(
        "--secret-file",
        help="file holding the service principal's secret, readable only by you (chmod 600); never a flag",
    ),
]
SSH_KEY_DEFAULTS = ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub")


def _site_json(s: admin_pb2.AzureSite) -> dict:
    data = output.message_dict(s)
    data["created_at"] = output.when(s.created_at)
    data["updated_at"] = output.when(s.updated_at)
    return data


def _print_sites(items, output_format: Format) -> None:
    if output_format is not Format.table:
        output.emit(output_format, [_site_json(s) for s in items])
        return
    output.print_table(
        "Azure sites",
        ["NAME", "SUBSCRIPTION", "RESOURCE GROUP", "REGION", "NETWORK", "STORAGE", "CLIENT ID"],
        [
            [
                s.name,
                s.settings.subscription_id,
                s.settings.resource_group,
                s.settings.region,
                f"{s.settings.vnet}/{s.settings.subnet}",
                f"{s.settings.storage_account}/{s.settings.container}",
                s.settings.client_id,
            ]
            for s in items
        ],
    )


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="a name for the site, unique")],
    subscription: Annotated[str, typer.Option(help="subscription id (a GUID)")],
    tenant: Annotated[str, typer.Option(help="Microsoft Entra tenant id (a GUID)")],
    client_id: Annotated[str, typer.Option(help="the service principal's application (client) id")],
    secret_file: SecretFileOption,
    resource_group: Annotated[str, typer.Option(help="resource group for VMs, disks and NICs")],
    region: Annotated[str, typer.Option(help="region name, e.g. westeurope")],
    vnet: Annotated[str, typer.Option(help="virtual network failed-over machines join")],
    subnet: Annotated[str, typer.Option(help="subnet of that network")],
    storage_account: Annotated[str, typer.Option(help="storage account for the replica page blobs")],
    container: Annotated[str, typer.Option(help="blob container in that account")] = "siterecovery",
    vnet_resource_group: Annotated[
        str, typer.Option(help="resource group of the network, when not the site's")
    ] = "",
    test_subnet: Annotated[
        str, typer.Option(help="an isolated subnet of that network for test failovers")
    ] = "",
    blob_endpoint: Annotated[
        str, typer.Option(help="the storage account's blob endpoint, when not the public cloud's (sovereign clouds)")
    ] = "",
    output_format: OutputOption = Format.table,
) -> None:
    """Register an Azure site; the secret is stored encrypted and never shown again."""
    request = admin_pb2.AddAzureSiteRequest(
        name=name,
        settings=admin_pb2.AzureSiteSettings(
            subscription_id=subscription,
            tenant_id=tenant,
            client_id=client_id,
            resource_group=resource_group,
            region=region,
            vnet=vnet,
            subnet=subnet,
            storage_account=storage_account,
            container=container,
            vnet_resource_group=vnet_resource_group,
            test_subnet=test_subnet,
            blob_endpoint=blob_endpoint,
        ),
        client_secret=ClientSecret.from_file(secret_file).reveal(),
    )
    site = call("AddAzureSite", request)
    if output_format is not Format.table:
        output.emit(output_format, _site_json(site))
        return
    output.console.print(
        f"Added Azure site {site.name} ({site.settings.region}, resource group {site.settings.resource_group})."
    )


@app.command("list")
def list_(output_format: OutputOption = Format.table) -> None:
    """List Azure sites (never their secrets)."""
    _print_sites(call("ListAzureSites", admin_pb2.ListAzureSitesRequest()).sites, output_format)


@app.command("update-credentials")
def update_credentials(
    name: NameArg,
    secret_file: SecretFileOption,
    client_id: Annotated[str, typer.Option(help="a new client id; default: keep the current one")] = "",
    output_format: OutputOption = Format.table,
) -> None:
    """Replace the service principal's secret (and client id); the next job step uses it."""
    request = admin_pb2.UpdateAzureSiteCredentialsRequest(
        name=name, client_id=client_id, client_secret=ClientSecret.from_file(secret_file).reveal()
    )
    _print_sites([call("UpdateAzureSiteCredentials", request)], output_format)


@app.command("remove")
def remove(name: NameArg, output_format: OutputOption = Format.table) -> None:
    """Forget a site (nothing changes in Azure); refused while a job uses it."""
    call("RemoveAzureSite", admin_pb2.RemoveAzureSiteRequest(name=name))
    if output_format is not Format.table:
        output.emit(output_format, {"removed": name})
    else:
        output.console.print(f"Removed Azure site {name}.")


def _ssh_public_key(path: Path | None) -> str:
    candidates = [path] if path is not None else [Path.home() / ".ssh" / n for n in SSH_KEY_DEFAULTS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_text().strip()
    raise errors.InvalidInput(
        f"no SSH public key at {', '.join(str(c) for c in candidates)}",
        hint="pass --ssh-public-key FILE.pub (the VM's admin user logs in with it)",
        code="azure-deploy-invalid",
    )


def _image(text: str) -> admin_pb2.AzureImage | None:
    if not text:
        return None
    parts = text.split(":")
    if len(parts) not in (3, 4) or not all(parts):
        raise errors.InvalidInput(
            f"{text!r} is not an image reference", hint="give publisher:offer:sku[:version]", code="azure-deploy-invalid"
        )
    return admin_pb2.AzureImage(publisher=parts[0], offer=parts[1], sku=parts[2], version=parts[3] if len(parts) == 4 else "")


@deploy_app.command("azure")
def deploy_azure(
    site: NameArg,
    name: Annotated[str, typer.Option(help="the VM's name")],
    subnet: Annotated[str, typer.Option(help="subnet of the site's virtual network")],
    private_ip: Annotated[str, typer.Option(help="a free address of that subnet (made static)")],
    size: Annotated[str, typer.Option(help="VM size")] = "Standard_D4s_v3",
    ssh_public_key: Annotated[
        Path | None, typer.Option(help="OpenSSH public key for the admin user; default ~/.ssh/id_*.pub")
    ] = None,
    admin_user: Annotated[str, typer.Option(help="the VM's admin user")] = "sradmin",
    image: Annotated[str, typer.Option(help="publisher:offer:sku[:version]; default Ubuntu 24.04 LTS")] = "",
    config_server: Annotated[
        str, typer.Option(help="host:port the VM enrolls with; default the server's advertised address")
    ] = "",
    install_command: Annotated[str, typer.Option(help="how the VM installs siterecovery")] = "",
    wait: WaitOption = True,
    output_format: OutputOption = Format.table,
) -> None:
    """Deploy a process server VM in Azure; it enrolls with the current passphrase (rotate it afterwards)."""
    request = admin_pb2.DeployAzureProcessServerRequest(
        site=site,
        name=name,
        subnet=subnet,
        private_ip=private_ip,
        size=size,
        admin_username=admin_user,
        ssh_public_key=_ssh_public_key(ssh_public_key),
        config_server=config_server,
        install_command=install_command,
    )
    chosen_image = _image(image)
    if chosen_image is not None:
        request.image.CopyFrom(chosen_image)
    job = call("DeployAzureProcessServer", request)
    if wait and output_format is Format.table:
        output.console.print(f"Deployment job {job.id}: {job.target}", highlight=False)
    follow(job, wait, output_format)
