"""sd_notify over a real unix datagram socket: the protocol itself, and the daemon under a
pretend service manager (NOTIFY_SOCKET + WATCHDOG_USEC) on a private D-Bus."""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentrig import Rig, wait_for_log
from dbusbus import PrivateBus

from updateagent.sdnotify import Notifier

AGENT = str(Path(sys.executable).parent / "update-agent")
UNIT = Path(__file__).resolve().parent.parent / "systemd" / "update-agent.service"


class ServiceManager:
    """The receiving end of NOTIFY_SOCKET, as systemd holds it."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.address = address

    @property
    def env_value(self) -> str:
        if isinstance(self.address, bytes):
            return "@" + self.address[1:].decode()
        return self.address

    def receive(self, timeout: float = 10) -> dict[str, str]:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            raise AssertionError(f"no notification within {timeout}s")
        data = self.sock.recv(4096).decode()
        assert data.endswith("\n")
        return dict(line.split("=", 1) for line in data.splitlines())

    def pending(self) -> list[dict[str, str]]:
        out = []
        while select.select([self.sock], [], [], 0)[0]:
            out.append(dict(line.split("=", 1) for line in self.sock.recv(4096).decode().splitlines()))
        return out

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30) -> tuple[dict[str, str], list]:
        """Messages until one has ``key`` (starting with ``value``); returns it and everything before it."""
        seen: list[dict[str, str]] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                break
            msg = self.receive(0)
            if key in msg and (value is None or msg[key].startswith(value)):
                return msg, seen
            seen.append(msg)
        raise AssertionError(f"no {key}={value} within {timeout}s; got {seen}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServiceManager]:
    address: str | bytes = str(tmp_path / "notify.sock") if request.param == "path" else (
        b"\0update-agent-test-" + os.urandom(6).hex().encode())
    m = ServiceManager(address)
    yield m
    m.close()


def test_messages_on_the_wire(manager: ServiceManager) -> None:
    n = Notifier(manager.env_value)
    assert n.ready("idle; running 1.0.0")
    assert manager.receive() == {"READY": "1", "STATUS": "idle; running 1.0.0"}
    assert n.status("downloading 2.0.0 (50%)\nsecond line")
    assert manager.receive() == {"STATUS": "downloading 2.0.0 (50%) second line"}  # one line, one assignment
    assert n.status("downloading 2.0.0 (50%)\nsecond line")  # unchanged: not sent again
    assert n.watchdog() and n.stopping()
    assert manager.receive() == {"WATCHDOG": "1"}
    assert manager.receive() == {"STOPPING": "1"}
    assert manager.pending() == []
    n.close()


def test_environment_is_read_and_unset(manager: ServiceManager) -> None:
    env = {"NOTIFY_SOCKET": manager.env_value, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid()),
           "OTHER": "x"}
    n = Notifier.from_environ(env)
    assert env == {"OTHER": "x"}  # hooks and health checks the daemon starts cannot speak for it
    assert n.enabled and n.watchdog_interval == 1.5
    assert n.send(READY="1") and manager.receive() == {"READY": "1"}
    # A watchdog meant for another process (a parent that exec'd us) is not ours to feed.
    other = Notifier.from_environ({"NOTIFY_SOCKET": manager.env_value, "WATCHDOG_USEC": "3000000",
                                   "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None


def test_outside_systemd_nothing_is_sent_and_nothing_fails() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled and n.watchdog_interval is None
    assert not n.ready("x") and not n.watchdog() and not n.status("y")


def test_a_vanished_socket_is_dropped_quietly(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "gone.sock"))
    assert not n.ready() and not n.watchdog()  # no exception: the daemon carries on


async def test_watchdog_pings_come_from_the_event_loop(manager: ServiceManager) -> None:
    """A loop that is stuck sends no pings (so systemd restarts it); once it runs again, they resume."""
    n = Notifier(manager.env_value, watchdog_usec=200_000)  # ping every 0.1 s
    task = asyncio.ensure_future(n.keep_alive())
    try:
        await asyncio.to_thread(manager.receive)  # the first ping
        time.sleep(0.5)  # noqa: ASYNC251 -- blocking the loop is the point: 5 intervals with no chance to ping
        assert len(manager.pending()) <= 1  # at most one already on its way before the block
        await asyncio.to_thread(manager.receive)
        assert await asyncio.to_thread(manager.receive) == {"WATCHDOG": "1"}
    finally:
        task.cancel()
        n.close()


def test_daemon_reports_ready_status_watchdog_and_stopping(rig: Rig, bus: PrivateBus, tmp_path: Path,
                                                          manager: ServiceManager) -> None:
    log = tmp_path / "agent.log"
    env = {**os.environ, "NOTIFY_SOCKET": manager.env_value, "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    with log.open("w") as out:
        proc = subprocess.Popen([AGENT, "--config", str(rig.write_config()), "--update-conf", "/nonexistent",
                                 "--bus-address", bus.address], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        ready, before = manager.wait_for("READY", "1")
        # READY comes after the agent's D-Bus name is served.
        dbus_ready = wait_for_log(proc, log, "dbus_ready", timeout=5)
        assert dbus_ready["name"] == "com.coreos.update1"
        assert all("READY" not in m for m in before)
        assert "STATUS" in ready
        # The agent's phase in words, then the reboot coordinator's status text.
        manager.wait_for("STATUS", "idle; running 1.0.0; reboot: ")
        # Pings keep coming (every 0.5 s with WatchdogSec=1s) from the running daemon.
        manager.wait_for("WATCHDOG", "1", timeout=10)
        manager.wait_for("WATCHDOG", "1", timeout=10)
        proc.terminate()
        manager.wait_for("STOPPING", "1", timeout=15)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_file_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` is clean; ExecStart points at this venv's binary, since the
    installed path (/opt/coreupdate/bin) does not exist on a test machine."""
    text = UNIT.read_text()
    lines = [f"ExecStart={AGENT} {line.split(' ', 1)[1]}" if line.startswith("ExecStart=") else line
             for line in text.splitlines()]
    unit = tmp_path / "update-agent.service"
    unit.write_text("\n".join(lines) + "\n")
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    assert "Type=notify" in text and "WatchdogSec=" in text
