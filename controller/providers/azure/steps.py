"""Job steps for Azure compute: deploying a process server VM.

(Failover, failback and deleting the cloud VM of a protected machine are steps
of the protection workflows, which reach Azure through
controller/protection/cloud.py.)

Each step does one kind of thing through `AzureCompute`, whose operations are
idempotent, so a step may run twice (the engine's rule). Resource names come
from the job's params and nothing else, which is what makes the record of what
a job may have created complete:

- before a step creates anything it reports progress naming the full resource
  id it is about to create, so the store holds the id before Azure does;
- a step that fails cleans up what it created in that attempt (the engine does
  not compensate a failed step); when the clean-up fails too, the step's error
  names the ids left behind, and that message is stored with the step;
- a step that succeeded is compensated by deleting what its params name
  (deletes are no-ops for resources already gone), so a partial or repeated
  execute is undone all the same.

Job kind:

    azure-deploy-process-server  create-nic (static IP) → create-vm (image + cloud-init)

Steps get their `AzureCompute` from a factory called with the step context, so
wiring decides where the site's settings and credential come from. Secrets
never enter params (params are stored as plain JSON): the process server's
custom data, which carries an enrollment passphrase, comes from a second
factory at execute time.
"""

from __future__ import annotations

from collections.abc import Callable

from siterecovery.common import errors
from siterecovery.common.logging import get_logger
from siterecovery.controller.jobs.engine import JobKind, Step, StepContext
from siterecovery.controller.providers.azure.compute import (
    AzureCompute,
    ImageRef,
    VmSpec,
)

log = get_logger(__name__)

ComputeFactory = Callable[[StepContext], AzureCompute]
CustomDataFactory = Callable[[StepContext], bytes]
DEPLOY_PROCESS_SERVER = "azure-deploy-process-server"


def _nic_id(azure: AzureCompute, name: str) -> str:
    return f"{azure.site.resource_group_id}/providers/Microsoft.Network/networkInterfaces/{name}"


def _vm_id(azure: AzureCompute, name: str) -> str:
    return f"{azure.site.resource_group_id}/providers/Microsoft.Compute/virtualMachines/{name}"


def _tags(ctx: StepContext, extra: dict | None = None) -> dict[str, str]:
    return {"sr-managed": "true", "sr-job": ctx.job.id, **{k: str(v) for k, v in (extra or {}).items()}}


def _clean_up_after_failure(
    exc: errors.SiteRecoveryError, created: list[str], delete: Callable[[str], None]
) -> errors.SiteRecoveryError:
    """Delete what this attempt created; return the error to raise (naming what is left)."""
    left = []
    for resource_id in reversed(created):
        try:
            delete(resource_id)
        except errors.SiteRecoveryError as cleanup_error:
            log.warning("could not clean up after a failed step", resource=resource_id, error=str(cleanup_error))
            left.append(resource_id)
    if not left:
        return exc
    return type(exc)(
        f"{exc.message}; could not delete what this step created: {', '.join(left)}",
        hint=f"{exc.hint + '; ' if exc.hint else ''}delete those resources in Azure, then retry",
        code=exc.code,
    )


class AzureStep(Step):
    def __init__(self, compute_for: ComputeFactory) -> None:
        self.compute_for = compute_for


class CreateNic(AzureStep):
    """A NIC in the site's subnet. params["nic"]: {name, private_ip?}."""

    name = "create-nic"

    def execute(self, ctx: StepContext) -> dict:
        azure = self.compute_for(ctx)
        nic = ctx.params["nic"]
        nic_id = _nic_id(azure, nic["name"])
        existed = azure.find_nic(nic["name"]) is not None
        ctx.progress(0.0, f"creating network interface {nic_id}")
        try:
            info = azure.ensure_nic(nic["name"], private_ip=nic.get("private_ip", ""), tags=_tags(ctx))
        except errors.SiteRecoveryError as exc:
            created = [] if existed else [nic_id]
            raise _clean_up_after_failure(exc, created, lambda rid: azure.delete_nic(nic["name"])) from exc
        ctx.progress(1.0, f"network interface {info.name} has {info.private_ip or 'a dynamic address'}")
        return {"nic_id": info.id or nic_id, "private_ip": info.private_ip}

    def compensate(self, ctx: StepContext) -> None:
        azure = self.compute_for(ctx)
        name = ctx.params["nic"]["name"]
        ctx.progress(0.0, f"deleting network interface {_nic_id(azure, name)}")
        azure.delete_nic(name)


class CreateVm(AzureStep):
    """The VM from an image, with custom data, on the NIC of create-nic.

    params["vm"]: {name, size, tags?, image: {publisher, offer, sku, version?},
    admin_username, ssh_public_key}.
    """

    name = "create-vm"

    def __init__(self, compute_for: ComputeFactory, custom_data_for: CustomDataFactory) -> None:
        super().__init__(compute_for)
        self.custom_data_for = custom_data_for

    def _spec(self, ctx: StepContext) -> VmSpec:
        vm = ctx.params["vm"]
        return VmSpec(
            name=vm["name"],
            size=vm["size"],
            nic_id=ctx.outputs["create-nic"]["nic_id"],
            image=ImageRef(**vm["image"]),
            admin_username=vm["admin_username"],
            ssh_public_key=vm["ssh_public_key"],
            custom_data=self.custom_data_for(ctx),
            tags=_tags(ctx, vm.get("tags")),
        )

    def execute(self, ctx: StepContext) -> dict:
        azure = self.compute_for(ctx)
        spec = self._spec(ctx)
        vm_id = _vm_id(azure, spec.name)
        existed = azure.find_vm(spec.name) is not None
        ctx.progress(0.0, f"creating VM {vm_id}")
        try:
            info = azure.ensure_vm(spec)
        except errors.SiteRecoveryError as exc:
            created = [] if existed else [vm_id]
            raise _clean_up_after_failure(exc, created, lambda rid: azure.delete_vm(spec.name)) from exc
        ctx.progress(1.0, f"VM {info.name} is {info.provisioning_state}")
        return {"vm_id": info.id or vm_id}

    def compensate(self, ctx: StepContext) -> None:
        azure = self.compute_for(ctx)
        name = ctx.params["vm"]["name"]
        ctx.progress(0.0, f"deleting VM {_vm_id(azure, name)}")
        azure.delete_vm(name)


# --- job kinds -------------------------------------------------------------------------


def deploy_process_server_kind(compute_for: ComputeFactory, custom_data_for: CustomDataFactory) -> JobKind:
    """A process server VM in a subnet with a static IP, enrolled through cloud-init.

    params: {nic: {name, private_ip}, vm: {name, size, image: {...}, admin_username, ssh_public_key}}
    """
    return JobKind(DEPLOY_PROCESS_SERVER, [CreateNic(compute_for), CreateVm(compute_for, custom_data_for)])


# Where the default install command puts siterecovery on the VM (a venv: Ubuntu's own Python
# refuses pip installs, PEP 668); cloud-init looks for sr-process-server there first.
INSTALL_DIR = "/opt/siterecovery"


def process_server_cloud_init(*, config_server: str, passphrase: str, install_command: str) -> bytes:
    """cloud-init user data that installs the process server and enrolls it.

    The passphrase lands in a 0600 file read once by `--passphrase-file`. Azure
    keeps custom data with the VM model, readable by whoever may read the VM:
    rotate the passphrase (`srctl passphrase rotate`) after deploying.
    """
    for name, value in (("config_server", config_server), ("install_command", install_command)):
        if not value or "\n" in value:
            raise errors.InvalidInput(f"{name} must be one non-empty line", code="azure-cloud-init")
    if not passphrase or "\n" in passphrase.strip():
        raise errors.InvalidInput("the passphrase must be one non-empty line", code="azure-cloud-init")
    lines = [
        "#cloud-config",
        "write_files:",
        "  - path: /etc/siterecovery/passphrase",
        "    permissions: '0600'",
        "    content: |",
        f"      {passphrase.strip()}",
        "runcmd:",
        f"  - [sh, -c, {_yaml_quote(install_command)}]",
        "  - [sh, -c, "
        + _yaml_quote(
            f"PATH={INSTALL_DIR}/bin:$PATH sr-process-server --server "
            + config_server
            + " --passphrase-file /etc/siterecovery/passphrase --state-dir /var/lib/siterecovery/process-server"
            + " >/var/log/sr-process-server.log 2>&1 &"
        )
        + "]",
    ]
    return ("\n".join(lines) + "\n").encode()


def _yaml_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def kinds(compute_for: ComputeFactory, custom_data_for: CustomDataFactory) -> list[JobKind]:
    """Every Azure job kind, to register with a runner."""
    return [deploy_process_server_kind(compute_for, custom_data_for)]
