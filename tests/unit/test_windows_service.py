"""deploy/windows/sr_windows_service.py without pywin32: settings from TOML, run until the stop event.

The Windows service classes only set a threading.Event in SvcStop and call
`serve()` in SvcDoRun; this is the part tested here, with the real daemons'
`run`, whose configuration server is unreachable (they are then retrying
enrollment, the state in which an administrator most often stops a service).
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import pytest

from siterecovery.agents.settings import MasterTargetSettings, SourceSettings
from siterecovery.common import errors

MODULE = Path(__file__).resolve().parents[2] / "deploy" / "windows" / "sr_windows_service.py"


@pytest.fixture(scope="module")
def service():
    spec = importlib.util.spec_from_file_location("sr_windows_service", MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unreachable_server() -> str:
    # A port that was just free: connecting is refused, so each enrollment attempt fails fast.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def write_config(tmp_path: Path, daemon: str, extra: str = "") -> Path:
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("not-the-real-one\n")
    config = tmp_path / f"{daemon}.toml"
    config.write_text(
        f'server = "{unreachable_server()}"\n'
        f'passphrase_file = "{passphrase}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        'port = 0\nlog_level = "warning"\nlog_json = true\n' + extra
    )
    return config


def test_importable_without_pywin32(service):
    assert service.win32serviceutil is None
    assert not hasattr(service, "SERVICES")
    assert service.main(["sr_windows_service.py", "source-agent", "install"]) == 2


def test_default_config_lives_under_programdata(service):
    path = service.default_config("master-target", {"ProgramData": "D:\\Data"})
    assert path.name == "master-target.toml"
    assert path.parent.name == "siterecovery"


def test_settings_come_from_the_toml(service, tmp_path):
    config = write_config(tmp_path, "master-target", "retention_reserve_bytes = 1048576\n")
    cfg = service.build_settings("master-target", config)
    assert isinstance(cfg, MasterTargetSettings)
    assert cfg.retention_reserve_bytes == 1048576
    assert cfg.state_dir == tmp_path / "state"
    image = tmp_path / "disk0.img"
    image.write_bytes(b"\0" * 65536)
    config = write_config(tmp_path, "source-agent", f'nbd_port = 0\n[[disks]]\npath = "{image}"\nname = "disk0"\n')
    cfg = service.build_settings("source-agent", config)
    assert isinstance(cfg, SourceSettings)
    assert [d.name for d in cfg.disks] == ["disk0"]


def test_a_bad_config_is_refused_before_anything_runs(service, tmp_path):
    config = write_config(tmp_path, "master-target", "retention_dri = \"x\"\n")
    with pytest.raises(errors.InvalidInput) as caught:
        service.serve("master-target", config, threading.Event())
    assert caught.value.exit_code == 2
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("daemon", ["master-target", "source-agent"])
def test_stop_event_ends_the_daemon_cleanly(service, tmp_path, daemon):
    image = tmp_path / "disk0.img"
    image.write_bytes(b"\0" * 65536)
    disks = f'nbd_port = 0\nnetwork_root = "{tmp_path}"\n[[disks]]\npath = "{image}"\nname = "disk0"\n'
    config = write_config(tmp_path, daemon, disks if daemon == "source-agent" else "")
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(service.serve(daemon, config, stop)))
    thread.start()
    stop.set()  # what SvcStop does
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert result == [0]
    # It ran for real: it took the state directory's lock, and gave it back.
    assert (tmp_path / "state" / f"{daemon}.lock").exists()
