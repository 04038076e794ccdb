"""Windows services for the source agent and the master target (pywin32).

Each service is the daemon's usual entry shape (CONVENTIONS 7) with the
Service Control Manager in place of signals: its TOML file → settings
(`common/settings.load`, unknown keys refused) → `run(settings, stop)`, where
`stop` is a threading.Event that SvcStop sets. `run` drains and returns as it
does on SIGTERM; readiness is the SCM's RUNNING state.

Only `serve()` and `build_settings()` are needed off Windows (the unit tests
use them); the pywin32 imports are guarded so this module imports anywhere,
and the service classes exist only where pywin32 does. Install and use: see
README.md beside this file.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path
from typing import Any

try:  # pywin32: on Windows only
    import servicemanager
    import win32service
    import win32serviceutil
except ImportError:
    win32serviceutil = None

# daemon name → (module with run(settings, stop), settings class)
DAEMONS: dict[str, tuple[str, str]] = {
    "source-agent": ("siterecovery.agents.source.daemon", "SourceSettings"),
    "master-target": ("siterecovery.agents.master_target.daemon", "MasterTargetSettings"),
}
# Exit code the SCM shows for a service-specific error (ERROR_SERVICE_SPECIFIC_ERROR).
SERVICE_SPECIFIC_ERROR = 1066


def data_dir(environ: Any = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ.get("ProgramData", r"C:\ProgramData")) / "siterecovery"


def default_config(daemon: str, environ: Any = None) -> Path:
    """Where a service reads its TOML unless the service's `config` option says otherwise."""
    return data_dir(environ) / f"{daemon}.toml"


def build_settings(daemon: str, config: Path) -> Any:
    """The daemon's frozen settings from its TOML file (InvalidInput when it is wrong)."""
    from siterecovery.agents import settings as agent_settings
    from siterecovery.common import settings

    _, cls_name = DAEMONS[daemon]
    return settings.load(getattr(agent_settings, cls_name), config)


def serve(daemon: str, config: Path, stop: threading.Event) -> int:
    """Run `daemon` with the settings in `config` until `stop` is set; its exit code.

    A SiteRecoveryError (bad configuration, wrong passphrase, …) propagates with
    its exit_code; the service reports that code to the SCM.
    """
    module_name, _ = DAEMONS[daemon]
    cfg = build_settings(daemon, config)
    return importlib.import_module(module_name).run(cfg, stop)


if win32serviceutil is not None:

    class _DaemonService(win32serviceutil.ServiceFramework):
        _daemon_ = ""

        def __init__(self, args: Any) -> None:
            super().__init__(args)
            self._stop = threading.Event()

        def SvcStop(self) -> None:
            # run() drains: a 5 s gRPC grace, then pairs close their journals.
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=60_000)
            self._stop.set()

        def SvcDoRun(self) -> None:
            from siterecovery.common import errors

            config = Path(
                win32serviceutil.GetServiceCustomOption(
                    self._svc_name_, "config", str(default_config(self._daemon_))
                )
            )
            # A service has no console: the daemon's log (JSON lines) goes to a file.
            logs = data_dir() / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            sys.stderr = sys.stdout = open(logs / f"{self._daemon_}.log", "a", buffering=1, encoding="utf-8")
            self.ReportServiceStatus(win32service.SERVICE_RUNNING)
            servicemanager.LogInfoMsg(f"{self._svc_name_}: starting with {config}")
            try:
                code = serve(self._daemon_, config, self._stop)
            except errors.SiteRecoveryError as exc:
                servicemanager.LogErrorMsg(f"{self._svc_name_}: {exc} ({exc.hint})")
                code = exc.exit_code
            except Exception as exc:  # the SCM must learn that the service died, and why
                servicemanager.LogErrorMsg(f"{self._svc_name_}: unexpected error: {exc!r}")
                code = 1
            if code:
                self.ReportServiceStatus(
                    win32service.SERVICE_STOPPED, win32ExitCode=SERVICE_SPECIFIC_ERROR, svcExitCode=code
                )

    class SourceAgentService(_DaemonService):
        _svc_name_ = "sr-source-agent"
        _svc_display_name_ = "siterecovery source agent"
        _svc_description_ = "Serves this machine's disks and replicates them to the process server."
        _daemon_ = "source-agent"

    class MasterTargetService(_DaemonService):
        _svc_name_ = "sr-master-target"
        _svc_display_name_ = "siterecovery master target"
        _svc_description_ = "Writes replicated disks into its datastores and keeps their undo journals."
        _daemon_ = "master-target"

    SERVICES = {"source-agent": SourceAgentService, "master-target": MasterTargetService}


def main(argv: list[str]) -> int:
    """`python sr_windows_service.py DAEMON [-c CONFIG] [pywin32 options] install|update|start|stop|remove`."""
    if win32serviceutil is None:
        print("sr_windows_service: pywin32 is not installed (this is for Windows)", file=sys.stderr)
        return 2
    if len(argv) < 2 or argv[1] not in SERVICES:
        print(f"usage: {argv[0]} {{{'|'.join(SERVICES)}}} [-c CONFIG] install|update|start|stop|remove",
              file=sys.stderr)
        return 2
    cls = SERVICES[argv[1]]

    def remember_config(opts: list[tuple[str, str]]) -> None:
        for opt, value in opts:
            if opt == "-c":
                win32serviceutil.SetServiceCustomOption(cls._svc_name_, "config", str(Path(value).resolve()))

    win32serviceutil.HandleCommandLine(
        cls, argv=[argv[0], *argv[2:]], customInstallOptions="c:", customOptionHandler=remember_config
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
