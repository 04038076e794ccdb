"""The systemd notify messages of common/daemon.py, received on a real datagram socket."""

import os
import secrets
import socket
import threading

import pytest

from siterecovery.common import daemon


@pytest.fixture
def notify_socket(monkeypatch):
    address = f"\0siterecovery-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(10.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + address[1:])
        yield sock


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only():
    assert daemon.watchdog_interval({}) is None
    assert daemon.watchdog_interval({"WATCHDOG_USEC": "garbage"}) is None
    assert daemon.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert daemon.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert daemon.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    # Inherited by a child: the child must not ping for its parent.
    assert daemon.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None


def test_no_watchdog_thread_unless_systemd_asks():
    assert daemon.start_watchdog(threading.Event(), {}) is None


def test_watchdog_pings_until_stopped(notify_socket):
    stop = threading.Event()
    thread = daemon.start_watchdog(stop, {"WATCHDOG_USEC": "20000"})  # a ping every 10 ms
    assert thread is not None
    pings = [notify_socket.recv(4096).decode() for _ in range(3)]
    assert pings == ["WATCHDOG=1"] * 3
    stop.set()
    thread.join(timeout=10.0)
    assert not thread.is_alive()


def test_status_is_one_line(notify_socket):
    daemon.report_status("heartbeat failed:\nserver unreachable\n  retrying")
    assert notify_socket.recv(4096).decode() == "STATUS=heartbeat failed: server unreachable retrying"


def test_ready_carries_a_status(notify_socket, tmp_path):
    daemon.report_ready(tmp_path, "process-server", port=9443, agent_id="ps-1")
    message = notify_socket.recv(4096).decode().split("\n")
    assert message[0] == "READY=1"
    assert message[1] == "STATUS=port=9443 agent_id=ps-1"
