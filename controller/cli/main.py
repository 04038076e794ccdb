"""srctl: the administrator's command line for siterecovery."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.markup import escape

from siterecovery.common import errors
from siterecovery.common.pb import admin_pb2, common_pb2
from siterecovery.controller.cli import (
    azure,
    backups,
    completion,
    doctor,
    drill,
    follow,
    lab,
    output,
    protection,
    replication,
    users,
    vcenter,
)
from siterecovery.controller.cli.completion import JobArg
from siterecovery.controller.cli.output import Format, OutputOption
from siterecovery.controller.cli.session import State, call, explain, protect_call
from siterecovery.controller.inventory_view import JOB_STATUS_VALUES

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 unexpected error, 2 invalid input, 3 not found, 4 conflict, "
    "5 precondition failed, 6 unavailable (retry may help), 7 integrity, "
    "8 unauthenticated, 9 permission denied, 10 rate limited, 11 internal error."
)

app = typer.Typer(
    help="Administer a siterecovery site: servers, machines, replication, recovery points, jobs, "
    "vCenter endpoints, Azure sites, the passphrase and a local lab.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
servers_app = typer.Typer(help="Configuration, process and master target servers, and source agents.", no_args_is_help=True)
machines_app = typer.Typer(help="Machines whose source agent registered (protect them with `srctl machine protect`).", no_args_is_help=True)
jobs_app = typer.Typer(help="Long-running actions and their progress.", no_args_is_help=True)
passphrase_app = typer.Typer(help="The connection passphrase agents enroll with.", no_args_is_help=True)
app.add_typer(servers_app, name="servers")
app.add_typer(machines_app, name="machines")
app.add_typer(jobs_app, name="jobs")
app.add_typer(jobs_app, name="job", hidden=True)  # `srctl job watch ID` reads naturally too
app.add_typer(passphrase_app, name="passphrase")
app.add_typer(replication.replication_app, name="replication")
app.add_typer(replication.points_app, name="recovery-points")
app.add_typer(vcenter.app, name="vcenter")
app.add_typer(azure.app, name="azure")
app.add_typer(azure.process_server_app, name="process-server")
app.add_typer(users.users_app, name="user")
app.add_typer(backups.backup_app, name="backup")
app.add_typer(protection.group_app, name="group")
app.add_typer(protection.machine_app, name="machine")
app.add_typer(protection.plan_app, name="plan")
app.add_typer(lab.app, name="lab")
app.command("drill")(drill.drill)
app.command("doctor")(doctor.doctor)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="srctl profile (srctl.toml); default: $SRCTL_CONFIG, the lab's, or the local server's", envvar="SRCTL_CONFIG"),
]


@app.callback()
def _main(config: ConfigOption = None) -> None:
    State.config = config
    output.Requested.format = Format.table  # until the command's --output says otherwise
    # What srctl does itself (the lab starting VMs) is told in its own output;
    # library log lines would only clutter it. Warnings still show.
    from siterecovery.common import logging as sr_logging

    sr_logging.configure(level="warning")



# -- servers -----------------------------------------------------------------
@servers_app.command("list")
def servers_list(
    include_removed: Annotated[bool, typer.Option("--all", help="also list removed (revoked) servers")] = False,
    output_format: OutputOption = Format.table,
) -> None:
    """List enrolled servers and agents with their health."""
    response = call("ListServers", admin_pb2.ListServersRequest(include_removed=include_removed))
    if output_format is not Format.table:
        output.emit(output_format, [_server_json(s) for s in response.servers])
        return
    output.print_table(
        "Servers",
        ["ID", "ROLE", "HOST", "HEALTH", "LAST HEARTBEAT", "ENDPOINT", "DETAILS"],
        [
            [
                s.id,
                output.enum_label(common_pb2.Role.Name(s.role), "ROLE_"),
                s.hostname,
                output.enum_label(common_pb2.Health.Name(s.health), "HEALTH_"),
                output.age(s.heartbeat_age_seconds) + (" ago" if s.heartbeat_age_seconds >= 0 else ""),
                s.inventory.data_endpoint or "-",
                s.health_reason or _server_details(s),
            ]
            for s in response.servers
        ],
    )


@servers_app.command("remove")
def servers_remove(
    server: Annotated[str, typer.Argument(help="id or host name of the agent", autocompletion=completion.servers)],
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    output_format: OutputOption = Format.table,
) -> None:
    """Remove an agent: revoke its certificate, so every port refuses it from now on.

    Disable replication of the disks it serves first. To bring the machine back,
    enroll its agent again (a new identity)."""
    if not yes and not typer.confirm(f"Revoke the certificate of {server}? It cannot be undone", default=False):
        raise typer.Exit(1)
    removed = call("RemoveServer", admin_pb2.RemoveServerRequest(server=server))
    if output_format is not Format.table:
        output.emit(output_format, _server_json(removed))
        return
    output.console.print(
        f"removed {output.enum_label(common_pb2.Role.Name(removed.role), 'ROLE_')} {removed.hostname} ({removed.id}): "
        "its certificate is revoked"
    )


def _server_json(s: common_pb2.ServerInfo) -> dict:
    data = output.message_dict(s)
    data["role"] = output.enum_label(common_pb2.Role.Name(s.role), "ROLE_")
    data["health"] = output.enum_label(common_pb2.Health.Name(s.health), "HEALTH_")
    return data


def _server_details(s: common_pb2.ServerInfo) -> str:
    parts = []
    if s.inventory.disks:
        parts.append(f"{len(s.inventory.disks)} disk(s)")
    for d in s.inventory.directories:
        kind = output.enum_label(common_pb2.DirectoryKind.Name(d.kind), "DIRECTORY_KIND_")
        parts.append(f"{kind} {output.human_bytes(d.free_bytes)} free")
    return ", ".join(parts)


# -- machines ----------------------------------------------------------------
@machines_app.command("list")
def machines_list(output_format: OutputOption = Format.table) -> None:
    """List machines with a source agent, and their disks."""
    response = call("ListMachines", admin_pb2.ListMachinesRequest())
    if output_format is not Format.table:
        rows = []
        for m in response.machines:
            data = output.message_dict(m)
            data["health"] = output.enum_label(common_pb2.Health.Name(m.health), "HEALTH_")
            rows.append(data)
        output.emit(output_format, rows)
        return
    output.print_table(
        "Machines",
        ["ID", "HOST", "OS", "HEALTH", "DISKS"],
        [
            [
                m.id,
                m.hostname,
                m.os,
                output.enum_label(common_pb2.Health.Name(m.health), "HEALTH_"),
                ", ".join(f"{d.name} ({output.human_bytes(d.size_bytes)})" for d in m.disks) or "-",
            ]
            for m in response.machines
        ],
    )


# -- jobs --------------------------------------------------------------------
_job_json = follow.job_json
_status = follow.status


@jobs_app.command("list")
def jobs_list(
    status: Annotated[list[str] | None, typer.Option(help="only jobs in this status (repeatable)")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    output_format: OutputOption = Format.table,
) -> None:
    """List jobs, newest first."""
    unknown = [s for s in status or [] if s not in JOB_STATUS_VALUES]
    if unknown:
        raise errors.InvalidInput(
            f"unknown status {', '.join(unknown)}", hint=f"one of {', '.join(JOB_STATUS_VALUES)}"
        )
    request = admin_pb2.ListJobsRequest(statuses=[JOB_STATUS_VALUES[s] for s in status or []], limit=limit)
    response = call("ListJobs", request)
    if output_format is not Format.table:
        output.emit(output_format, [_job_json(j) for j in response.jobs])
        return
    output.print_table(
        "Jobs",
        ["ID", "KIND", "TARGET", "STATUS", "PROGRESS", "CREATED"],
        [[j.id, j.kind, j.target, _status(j), f"{j.progress:.0%}", output.when(j.created_at)] for j in response.jobs],
    )


@jobs_app.command("show")
def jobs_show(job_id: JobArg, output_format: OutputOption = Format.table) -> None:
    """Show one job with its steps."""
    job = call("GetJob", admin_pb2.GetJobRequest(id=job_id))
    if output_format is not Format.table:
        output.emit(output_format, _job_json(job))
        return
    _print_job(job)


def _print_job(job: admin_pb2.Job) -> None:
    output.console.print(f"[bold]Job {job.id}[/bold]  {job.kind} {job.target}  {_status(job)}  {job.progress:.0%}")
    if job.error_message:
        output.console.print(f"[red]{job.error_code}: {job.error_message}[/red]")
    output.print_table(
        "Steps",
        ["#", "STEP", "STATUS", "ATTEMPT", "PROGRESS", "MESSAGE"],
        [[i + 1, s.name, _status(s), s.attempt, f"{s.progress:.0%}", s.message] for i, s in enumerate(job.steps)],
    )


@jobs_app.command("watch")
def jobs_watch(job_id: JobArg, output_format: OutputOption = Format.table) -> None:
    """Follow a job live until it finishes; the exit code tells how it ended."""
    follow.watch(job_id, output_format)


@jobs_app.command("resume")
def jobs_resume(job_id: JobArg, wait: follow.WaitOption = True, output_format: OutputOption = Format.table) -> None:
    """Confirm the manual action a job waits for (a recovery plan's pause), then follow it (unless --no-wait)."""
    job = protect_call("ResumeJob", admin_pb2.GetJobRequest(id=job_id))
    if wait:
        follow.watch(job.id, output_format)
        return
    output.emit(output_format, _job_json(job),
                lambda: output.console.print(f"job {job.id} resumed; follow it with srctl jobs watch {job.id}"))


# -- passphrase --------------------------------------------------------------
@passphrase_app.command("show")
def passphrase_show(output_format: OutputOption = Format.table) -> None:
    """Print the connection passphrase (put it in each agent's passphrase file)."""
    response = call("GetPassphrase", admin_pb2.GetPassphraseRequest())
    _print_passphrase(response, output_format)


@passphrase_app.command("rotate")
def passphrase_rotate(output_format: OutputOption = Format.table) -> None:
    """Replace the passphrase. Enrolled agents keep working; new agents need the new one."""
    response = call("RotatePassphrase", admin_pb2.RotatePassphraseRequest())
    _print_passphrase(response, output_format)


def _print_passphrase(response: admin_pb2.Passphrase, output_format: Format) -> None:
    if output_format is not Format.table:
        output.emit(output_format, {"passphrase": response.passphrase, "created_at": output.when(response.created_at)})
    else:
        print(response.passphrase)


# When a message comes without a hint, what to do next by its category.
DEFAULT_HINTS = {
    errors.InvalidInput: "check the command's arguments: srctl COMMAND --help",
    errors.NotFound: "check the name; the matching `srctl ... list` shows what exists",
    errors.Conflict: "see how things stand now (`srctl ... list` or `show`), then run the command again",
    errors.PreconditionFailed: "fix what the message names, then run the command again",
    errors.Unavailable: "check that the configuration server runs and is reachable (`srctl doctor`), then retry",
    errors.Integrity: "do not go on with this data; see the configuration server's log for what did not check out",
    errors.Unauthenticated: "your certificate is not accepted: `srctl doctor` checks the profile; "
    "an admin can issue a new one (`srctl user add`)",
    errors.PermissionDenied: "your certificate's role may not do this: use an admin profile, or ask an admin",
    errors.RateLimited: "wait a minute, then retry",
    errors.Internal: "see the configuration server's log for the cause",
}
DEBUG_ENV = "SRCTL_DEBUG"
INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


def error_document(exc: errors.SiteRecoveryError, *, exit_code: int | None = None) -> dict:
    """What `--output json|yaml` prints for an error: its code and category, message, hint and exit code."""
    return {
        "error": {
            "code": exc.code,
            "category": exc.category,
            "message": " ".join(exc.message.split()) or exc.category,
            "hint": " ".join((exc.hint or DEFAULT_HINTS.get(type(exc), "")).split()),
            "exit_code": exc.exit_code if exit_code is None else exit_code,
            "retryable": exc.retryable,
        }
    }


def report(exc: errors.SiteRecoveryError, output_format: Format | None = None, *, exit_code: int | None = None) -> None:
    """Say on stderr what went wrong: for people, two lines (what happened, with the error's code in
    brackets, then `hint:` what to do); with --output json or yaml, `error_document` as one line of
    JSON or one YAML document, so a script reads the code as a field. stdout stays the command's."""
    chosen = output_format or output.Requested.format
    document = error_document(exc, exit_code=exit_code)
    if chosen is Format.json:
        sys.stderr.write(output.to_json(document, indent=None) + "\n")
    elif chosen is Format.yaml:
        sys.stderr.write(output.to_yaml(document))
    else:
        error = document["error"]
        what = escape(f"{error['message']} [{error['code']}]")
        output.err_console.print(f"[red]error:[/red] {what}", highlight=False, soft_wrap=True, markup=True)
        if error["hint"]:
            output.err_console.print(f"hint: {error['hint']}", highlight=False, soft_wrap=True, markup=False)
    sys.stderr.flush()


def main() -> None:
    """Typer handles usage errors (exit 2) and --help; every other error is reported (`report`) and ends
    srctl with its exit code.

    No traceback for what can be expected (an unreachable server, a refused
    certificate, a name that does not exist); for a bug, SRCTL_DEBUG=1 shows it."""
    import os

    try:
        app()
    except errors.SiteRecoveryError as exc:
        report(exc)
        sys.exit(exc.exit_code)
    except grpc.RpcError as exc:  # a call not made through session.call
        error = explain(exc, None)
        report(error)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        report(errors.SiteRecoveryError("interrupted", hint="a job already started goes on: srctl jobs list"),
               exit_code=INTERRUPTED)
        sys.exit(INTERRUPTED)
    except Exception as exc:  # last resort: one line, not a traceback
        if os.environ.get(DEBUG_ENV):
            raise
        report(errors.SiteRecoveryError(
            f"unexpected {type(exc).__name__}: {exc}",
            hint=f"this is a bug in srctl: run it again with {DEBUG_ENV}=1 for the traceback and report it",
        ))
        sys.exit(1)


if __name__ == "__main__":
    main()
