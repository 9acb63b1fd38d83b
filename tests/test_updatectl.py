"""updatectl against a real agent daemon (separate process) on a private dbus-daemon."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentrig import Rig, wait_for_log
from dbusbus import PrivateBus
from gptimg import cgpt_attr, gptprio_bits

BIN = Path(sys.executable).parent
UPDATECTL = str(BIN / "updatectl")
AGENT = str(BIN / "update-agent")


class Daemon:
    def __init__(self, config: Path, bus: PrivateBus, log: Path, update_conf: Path = Path("/nonexistent")) -> None:
        self.log_path = log
        self.log = log.open("w+")
        self.proc = subprocess.Popen([AGENT, "--config", str(config), "--update-conf", str(update_conf),
                                      "--bus-address", bus.address], stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_for("dbus_ready")

    def wait_for(self, event: str, **fields: object) -> dict[str, object]:
        """Block until the daemon logs ``event`` (with these field values); return that log entry."""
        return wait_for_log(self.proc, self.log_path, event, timeout=60, **fields)

    def stop(self) -> int:
        self.proc.terminate()
        code = self.proc.wait(timeout=15)
        self.log.close()
        return code


@pytest.fixture
def daemon(rig: Rig, bus: PrivateBus, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(rig.write_config(), bus, tmp_path / "agent.log")
    try:
        yield d
    finally:
        assert d.stop() == 0


def ctl(bus: PrivateBus, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UPDATECTL_BUS_ADDRESS": bus.address}
    return subprocess.run([UPDATECTL, *args], capture_output=True, text=True, env=env, timeout=60)


def test_status_slots_history(daemon: Daemon, bus: PrivateBus) -> None:
    r = ctl(bus, "status")
    assert r.returncode == 0, r.stderr
    assert "State:            UPDATE_STATUS_IDLE" in r.stdout
    assert "Current version:  1.0.0" in r.stdout
    assert "Last check:       never" in r.stdout
    lines = r.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("SLOT"))
    assert lines[header].split() == ["SLOT", "LABEL", "PART", "PRIORITY", "TRIES", "SUCCESSFUL", "BOOTED",
                                     "VERSION", "PARTUUID"]
    assert lines[header + 1].split()[:8] == ["A", "USR-A", "3", "1", "0", "1", "*", "1.0.0"]
    assert lines[header + 2].split()[:7] == ["B", "USR-B", "4", "0", "0", "0", "-"]

    doc = json.loads(ctl(bus, "status", "-o", "json").stdout)
    assert doc["status"] == {"last_checked_time": 0, "progress": 0.0, "current_operation": "UPDATE_STATUS_IDLE",
                             "new_version": "", "new_size": 0}
    assert doc["details"]["booted_slot"] == "A"
    slots = json.loads(ctl(bus, "slots", "--output", "json").stdout)
    assert [s["name"] for s in slots] == ["A", "B"] and slots[0]["booted"] is True

    history = json.loads(ctl(bus, "history", "-o", "json").stdout)
    assert [e["event"] for e in history] == ["booted", "boot_outcome"]
    text = ctl(bus, "history").stdout
    assert "boot_outcome" in text and "outcome=normal" in text


def test_check_applies_and_reports(daemon: Daemon, bus: PrivateBus, rig: Rig) -> None:
    rig.publish("1.0.0")  # what the machine runs
    r = ctl(bus, "check")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["checking for update", "idle", "no update available"]

    rig.publish("2.0.0")
    r = ctl(bus, "check", "-o", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["result"] == "update_applied"
    assert doc["status"]["new_version"] == "2.0.0" and doc["status"]["progress"] == 1.0
    assert doc["operations"][0] == "UPDATE_STATUS_CHECKING_FOR_UPDATE"
    assert "UPDATE_STATUS_DOWNLOADING" in doc["operations"]
    assert cgpt_attr(rig.disk, 4) == gptprio_bits(2, 1, False)

    r = ctl(bus, "check")  # an update waits for its reboot: nothing to check, not an error
    assert r.returncode == 0 and "already applied" in r.stdout

    r = ctl(bus, "reset", "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["current_operation"] == "UPDATE_STATUS_IDLE"
    assert cgpt_attr(rig.disk, 4) == gptprio_bits(0, 0, False)

    r = ctl(bus, "mark-good")
    assert r.returncode == 0 and r.stdout.strip() == "slot A marked good"


def test_check_shows_a_progress_bar_on_a_terminal(daemon: Daemon, bus: PrivateBus, rig: Rig) -> None:
    rig.publish("2.0.0", size=6 * 1024 * 1024)
    main, child = pty.openpty()
    env = {**os.environ, "UPDATECTL_BUS_ADDRESS": bus.address, "COLUMNS": "100"}
    proc = subprocess.Popen([UPDATECTL, "check"], stdout=child, stderr=child, env=env)
    os.close(child)
    out = b""
    while True:
        ready, _, _ = select.select([main], [], [], 30)
        assert ready, f"no output from updatectl: {out!r}"
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert proc.wait(timeout=30) == 0
    text = out.decode(errors="replace")
    assert "applying 2.0.0" in text and "100%" in text
    assert "update 2.0.0 applied; reboot to use it" in text


def test_errors_are_one_line_with_exit_status(bus: PrivateBus, rig: Rig, tmp_path: Path) -> None:
    r = ctl(bus, "status")  # no agent on the bus
    assert r.returncode == 1
    assert r.stderr.strip() == "updatectl: the update agent is not running (com.coreos.update1 is not on the bus)"
    assert "Traceback" not in r.stderr

    r = subprocess.run([UPDATECTL, "status", "--bus-address", "unix:path=/nonexistent/socket"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stderr.startswith("updatectl: cannot connect to unix:path=/nonexistent/socket")
    assert len(r.stderr.strip().splitlines()) == 1

    r = ctl(bus, "status", "--output", "yaml")
    assert r.returncode == 2

    # The channel is down: `check` fails with the reason, and the daemon keeps running.
    d = Daemon(rig.write_config(), bus, tmp_path / "agent2.log")
    try:
        rig.server.add_fault("/stable/manifest.json", "status", value=503)
        r = ctl(bus, "check")
        assert r.returncode == 1
        assert r.stderr.startswith("updatectl: check failed: ") and "HTTP 503" in r.stderr
        assert ctl(bus, "status").returncode == 0
    finally:
        assert d.stop() == 0


def test_daemon_with_reboot_strategy_reboots_the_emulated_machine(bus: PrivateBus, rig: Rig,
                                                                  tmp_path: Path) -> None:
    """REBOOT_STRATEGY=reboot on an emulated host: apply, power cycle, restart, health check, good."""
    (tmp_path / "update.conf").write_text("REBOOT_STRATEGY=reboot\n")
    config = rig.write_config()
    d = Daemon(config, bus, tmp_path / "agent.log", update_conf=tmp_path / "update.conf")
    try:
        rig.publish("2.0.0")
        r = ctl(bus, "check", "-o", "json")
        assert r.returncode == 0 and json.loads(r.stdout)["result"] == "update_applied", r.stderr
        entry = d.wait_for("boot_outcome", outcome="success")
        assert entry["slot"] == "B" and entry["version"] == "2.0.0"
        # The restarted agent serves on the bus before its after-boot logic runs: no wait needed.
        doc = json.loads(ctl(bus, "status", "-o", "json").stdout)
        assert doc["details"]["current_version"] == "2.0.0" and doc["details"]["booted_slot"] == "B"
        assert cgpt_attr(rig.disk, 4) == gptprio_bits(2, 0, True)
    finally:
        assert d.stop() == 0


def test_daemon_rejects_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[check]\ninterval_minutes = "often"\n')
    r = subprocess.run([AGENT, "--config", str(config), "--update-conf", "/nonexistent"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"update-agent: {config}: key 'check.interval_minutes': "
                                "expected a number, got 'often'")
