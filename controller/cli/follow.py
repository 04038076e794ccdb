"""Jobs as srctl shows them, and following one until it ends.

Every command that starts a job takes `--wait/--no-wait` (`WaitOption`) and
hands the job to `follow`: with --wait (the default) it is watched like
`srctl jobs watch` — a progress bar per step for people, one document per
change for scripts — and the exit code says how it ended; with --no-wait the
job's id is printed and srctl returns at once.
"""

from __future__ import annotations

from typing import Annotated

import grpc
import typer

from siterecovery.common import errors
from siterecovery.common.pb import admin_pb2
from siterecovery.controller.cli import output
from siterecovery.controller.cli.output import Format
from siterecovery.controller.cli.session import explain, profile

WaitOption = Annotated[
    bool, typer.Option("--wait/--no-wait", help="follow the job until it ends (default) or return at once")
]
FAILED = (admin_pb2.JOB_STATUS_FAILED, admin_pb2.JOB_STATUS_COMPENSATED)


def status(job_or_step) -> str:
    return output.enum_label(admin_pb2.JobStatus.Name(job_or_step.status), "JOB_STATUS_")


def job_json(job: admin_pb2.Job) -> dict:
    data = output.message_dict(job)
    data["status"] = status(job)
    for step, step_data in zip(job.steps, data.get("steps", []), strict=True):
        step_data["status"] = status(step)
    return data


def follow(job: admin_pb2.Job, wait: bool, output_format: Format) -> None:
    """Watch `job` until it ends (--wait), or say how to follow it (--no-wait)."""
    if not wait:
        output.emit(
            output_format,
            {"job": job.id, "kind": job.kind, "target": job.target},
            lambda: output.console.print(f"Job {job.id} ({job.kind}) started: srctl jobs watch {job.id}",
                                         highlight=False),
        )
        return
    watch(job.id, output_format)


def watch(job_id: str, output_format: Format) -> None:
    """Follow a job live; raise the job's failure (exit 5) when it did not succeed."""
    from rich.progress import BarColumn, Progress, TextColumn

    chosen = profile()
    final: admin_pb2.Job | None = None
    try:
        stream = chosen.admin().WatchJob(admin_pb2.GetJobRequest(id=job_id))
        if output_format is not Format.table:
            for final in stream:
                output.emit_item(output_format, job_json(final))
        else:
            columns = (TextColumn("{task.description}"), BarColumn(),
                       TextColumn("{task.percentage:>3.0f}%  {task.fields[status]}"))
            with Progress(*columns) as bars:
                tasks: dict[int, int] = {}
                for final in stream:
                    for i, step in enumerate(final.steps):
                        if i not in tasks:
                            tasks[i] = bars.add_task(f"{i + 1}. {step.name}", total=1.0, status="")
                        bars.update(tasks[i], completed=step.progress, status=f"{status(step)} {step.message}".strip())
    except grpc.RpcError as exc:
        raise explain(exc, chosen) from exc
    if final is None:
        return
    if final.status == admin_pb2.JOB_STATUS_SUCCEEDED:
        if output_format is Format.table:
            output.console.print(f"Job {final.id} {status(final)}", highlight=False)
        return
    failed = final.status in FAILED
    cls = errors.PreconditionFailed if failed else errors.SiteRecoveryError
    raise cls(
        f"job {final.id} ({final.kind}) {status(final)}" + (f": {final.error_message}" if final.error_message else ""),
        hint=f"`srctl jobs show {final.id}` shows each step and why; fix the cause, then run the command again",
        code=final.error_code or f"job-{status(final)}",
    )
