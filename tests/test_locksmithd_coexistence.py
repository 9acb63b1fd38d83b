"""Running beside locksmithd: found through systemd's D-Bus API (a stand-in systemd on a private
bus) or its flock'ed /run/update-engine/coordinator.conf (a temp path), and refused with one
clear line unless our strategy is "off"."""

# No `from __future__ import annotations` here: dbus-fast reads the annotations at runtime.

import asyncio
import fcntl
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated

import pytest
from dbus_fast import DBusError
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method
from dbusbus import PrivateBus

from updateagent.config import RebootSettings
from updateagent.locksmithd import (
    CoordinatorConflict,
    SystemdUnits,
    coordinator_conf_holder,
    find_other_coordinator,
    refuse_beside_locksmithd,
)

AGENT = str(Path(sys.executable).parent / "update-agent")
Str = Annotated[str, DBusSignature("s")]
ObjPath = Annotated[str, DBusSignature("o")]


class _Unit(ServiceInterface):
    def __init__(self, state: str) -> None:
        super().__init__("org.freedesktop.systemd1.Unit")
        self.state = state

    @dbus_property(access=PropertyAccess.READ)
    def ActiveState(self) -> Str:
        return self.state


class _Manager(ServiceInterface):
    """systemd's Manager, as far as GetUnit goes: known units answer with their object path."""

    def __init__(self, bus: MessageBus, units: dict[str, str]) -> None:
        super().__init__("org.freedesktop.systemd1.Manager")
        self.bus = bus
        self.paths: dict[str, str] = {}
        for i, (name, state) in enumerate(units.items()):
            path = f"/org/freedesktop/systemd1/unit/u{i}"
            bus.export(path, _Unit(state))
            self.paths[name] = path

    @method()
    def GetUnit(self, name: Str) -> ObjPath:
        if name not in self.paths:
            raise DBusError("org.freedesktop.systemd1.NoSuchUnit", f"Unit {name} not loaded.")
        return self.paths[name]


class StandInSystemd:
    def __init__(self, address: str) -> None:
        self.address = address
        self.bus: MessageBus | None = None

    async def start(self, units: dict[str, str]) -> None:
        self.bus = await MessageBus(bus_address=self.address).connect()
        self.bus.export("/org/freedesktop/systemd1", _Manager(self.bus, units))
        await self.bus.request_name("org.freedesktop.systemd1")

    def stop(self) -> None:
        if self.bus is not None:
            self.bus.disconnect()


@pytest.fixture
async def systemd(bus: PrivateBus) -> AsyncIterator[StandInSystemd]:
    s = StandInSystemd(bus.address)
    yield s
    s.stop()


@pytest.fixture
def held_coordinator_conf(tmp_path: Path) -> Iterator[Path]:
    """coordinator.conf as a running locksmithd leaves it: written, and flock'ed while it runs."""
    path = tmp_path / "run" / "update-engine" / "coordinator.conf"
    path.parent.mkdir(parents=True)
    path.write_text("NAME=locksmithd\nSTRATEGY=etcd-lock\nSTATE=running")
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        yield path
    finally:
        os.close(fd)


def _reboot(tmp_path: Path, strategy: str = "etcd-lock") -> RebootSettings:
    return RebootSettings(strategy=strategy, coordinator_conf=tmp_path / "run" / "update-engine" / "coordinator.conf")  # type: ignore[arg-type]


async def test_active_locksmithd_unit_is_found(systemd: StandInSystemd, bus: PrivateBus, tmp_path: Path) -> None:
    await systemd.start({"locksmithd.service": "active"})
    other = await find_other_coordinator(_reboot(tmp_path), SystemdUnits(bus.address))
    assert other is not None and other.evidence == "locksmithd.service is active (systemd)"
    with pytest.raises(CoordinatorConflict, match=r"refusing to coordinate reboots: locksmithd\.service is active"):
        await refuse_beside_locksmithd(_reboot(tmp_path), SystemdUnits(bus.address))
    # With strategy "off" the two coexist: locksmithd reboots, the agent only applies.
    await refuse_beside_locksmithd(_reboot(tmp_path, "off"), SystemdUnits(bus.address))


@pytest.mark.parametrize("units", [{"locksmithd.service": "inactive"}, {"locksmithd.service": "failed"}, {}])
async def test_stopped_or_unknown_unit_is_no_conflict(systemd: StandInSystemd, bus: PrivateBus, tmp_path: Path,
                                                      units: dict[str, str]) -> None:
    await systemd.start(units)
    assert await find_other_coordinator(_reboot(tmp_path), SystemdUnits(bus.address)) is None


async def test_no_systemd_on_the_bus_is_not_a_conflict(bus: PrivateBus, tmp_path: Path) -> None:
    """A bus without systemd (a container) cannot tell; the file check alone decides."""
    assert await find_other_coordinator(_reboot(tmp_path), SystemdUnits(bus.address, timeout=5)) is None


def test_coordinator_conf_counts_only_while_locked(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.conf"
    assert coordinator_conf_holder(path) is None  # absent
    path.write_text("NAME=locksmithd\nSTRATEGY=etcd-lock\nSTATE=running\n")
    assert coordinator_conf_holder(path) is None  # stale: locksmithd stopped (it never deletes the file)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert coordinator_conf_holder(path) == {"NAME": "locksmithd", "STRATEGY": "etcd-lock", "STATE": "running"}
    finally:
        os.close(fd)
    assert coordinator_conf_holder(path) is None
    os.unlink(path)
    os.mkfifo(path)
    assert coordinator_conf_holder(path) is None  # not a regular file: not opened for reading


async def test_held_coordinator_conf_is_a_conflict(held_coordinator_conf: Path, tmp_path: Path) -> None:
    with pytest.raises(CoordinatorConflict) as info:
        await refuse_beside_locksmithd(_reboot(tmp_path, "reboot"), None, origin="update.conf: REBOOT_STRATEGY")
    assert str(info.value).startswith(
        f"refusing to coordinate reboots: {held_coordinator_conf} is held by a running locksmithd "
        "(STRATEGY=etcd-lock, STATE=running), and reboot.strategy = 'reboot' (update.conf: REBOOT_STRATEGY)")
    assert "systemctl mask locksmithd.service" in str(info.value)


def _config(tmp_path: Path, strategy: str) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f'[reboot]\nstrategy = "{strategy}"\ncoordinator_conf = '
                      f'"{tmp_path / "run" / "update-engine" / "coordinator.conf"}"\n')
    return config


@pytest.mark.parametrize("command", ["daemon", "check-config"])
async def test_daemon_and_check_config_refuse_beside_active_locksmithd(
    systemd: StandInSystemd, bus: PrivateBus, tmp_path: Path, command: str
) -> None:
    await systemd.start({"locksmithd.service": "active"})
    args = ["--config", str(_config(tmp_path, "etcd-lock")), "--update-conf", str(tmp_path / "none"),
            "--bus-address", bus.address]
    args = [*args, "--once"] if command == "daemon" else ["check-config", *args]
    proc = await asyncio.create_subprocess_exec(AGENT, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = err.decode().splitlines()
    assert proc.returncode == 2 and out == b"" and "Traceback" not in err.decode()
    prefix = "update-agent" if command == "daemon" else "update-agent check-config"
    problems = [line for line in lines if line.startswith(f"{prefix}: ")]
    assert len(problems) == 1, lines
    assert problems[0].startswith(f"{prefix}: refusing to coordinate reboots: locksmithd.service is active (systemd), "
                                  f"and reboot.strategy = 'etcd-lock' ({tmp_path / 'config.toml'}: reboot.strategy)")


async def test_check_config_with_strategy_off_beside_locksmithd_is_fine(
    systemd: StandInSystemd, bus: PrivateBus, tmp_path: Path, held_coordinator_conf: Path
) -> None:
    await systemd.start({"locksmithd.service": "active"})
    proc = await asyncio.create_subprocess_exec(
        AGENT, "check-config", "--config", str(_config(tmp_path, "off")), "--update-conf", str(tmp_path / "none"),
        "--bus-address", bus.address, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert "reboot.strategy = off" in out.decode()
