"""Running beside locksmithd: is another coordinator rebooting this host?

locksmithd reads the same ``REBOOT_STRATEGY`` from update.conf as we do and drives reboots from
our ``com.coreos.update1`` signals. If it still runs while our agent coordinates too, the fleet
is rebooted under two locks (locksmith's etcd v2 key and our v3 semaphore) with two limits. So
before coordinating, the daemon looks for it in two independent ways:

- systemd's view: ``ActiveState`` of ``locksmithd.service`` through systemd's D-Bus API
  (``org.freedesktop.systemd1``), behind :class:`UnitStates` so tests use a stand-in on a
  private bus;
- locksmithd's own announcement: ``/run/update-engine/coordinator.conf`` (``NAME=locksmithd``,
  ``STRATEGY=``, ``STATE=``). locksmithd holds an exclusive ``flock`` on it for as long as it
  runs and never deletes it, so a file without a lock holder is stale and ignored.

Either finding is a :class:`CoordinatorConflict` when our strategy reboots the host; with
``strategy = "off"`` the two coexist (locksmithd reboots, we only apply), which is the supported
way to keep locksmithd for now (docs/migrating-from-locksmith.md).
"""

# No `from __future__ import annotations` here: dbus-fast reads the annotations at runtime.

import asyncio
import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from locksmith.files import InputFileError, read_text
from locksmith.log import get_logger
from updateagent.config import ConfigError, RebootSettings, parse_update_conf

log = get_logger("updateagent.locksmithd")

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = "org.freedesktop.systemd1.Manager"
SYSTEMD_UNIT = "org.freedesktop.systemd1.Unit"
# A unit in any of these states runs (or is about to, or is being reloaded).
RUNNING_STATES = frozenset({"active", "activating", "reloading", "refreshing"})
_DBUS_TIMEOUT = 5.0


class CoordinatorConflict(ConfigError):
    """Another reboot coordinator (locksmithd) runs on this host and our strategy would reboot it too."""


@dataclass(frozen=True)
class OtherCoordinator:
    name: str
    evidence: str  # what showed it, in words


class UnitStates(Protocol):
    async def active_state(self, unit: str) -> str | None:
        """The unit's ActiveState, or None when systemd has no such unit loaded."""
        ...


class SystemdUnits:
    """systemd's Manager.GetUnit + the unit's ActiveState property, on the system bus (or
    ``bus_address``). Every call is bounded."""

    def __init__(self, bus_address: str | None = None, *, timeout: float = _DBUS_TIMEOUT) -> None:
        self.bus_address = bus_address
        self.timeout = timeout

    async def active_state(self, unit: str) -> str | None:
        return await asyncio.wait_for(self._active_state(unit), self.timeout)

    async def _active_state(self, unit: str) -> str | None:
        from dbus_fast import BusType, Message, MessageType
        from dbus_fast.aio import MessageBus

        bus = MessageBus(bus_address=self.bus_address) if self.bus_address else MessageBus(bus_type=BusType.SYSTEM)
        await bus.connect()
        try:
            reply = await bus.call(Message(destination=SYSTEMD_BUS_NAME, path=SYSTEMD_PATH, interface=SYSTEMD_MANAGER,
                                           member="GetUnit", signature="s", body=[unit]))
            if reply is None:
                raise OSError(f"systemd: no reply to GetUnit({unit})")
            if reply.message_type == MessageType.ERROR:
                if reply.error_name == "org.freedesktop.systemd1.NoSuchUnit":
                    return None  # not loaded: neither running nor enabled to start
                raise OSError(f"systemd: GetUnit({unit}): {reply.error_name}: {reply.body[0] if reply.body else ''}")
            path = reply.body[0]
            reply = await bus.call(Message(destination=SYSTEMD_BUS_NAME, path=path,
                                           interface="org.freedesktop.DBus.Properties", member="Get",
                                           signature="ss", body=[SYSTEMD_UNIT, "ActiveState"]))
            if reply is None or reply.message_type == MessageType.ERROR:
                detail = reply.error_name if reply is not None else "no reply"
                raise OSError(f"systemd: {unit} ActiveState: {detail}")
            return str(reply.body[0].value)
        finally:
            bus.disconnect()


def coordinator_conf_holder(path: Path) -> dict[str, str] | None:
    """The content of locksmithd's coordinator.conf while a live process holds its lock; None when
    the file is absent, not a regular file, or stale (nobody holds the lock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
        else:
            return None  # we got the lock: no coordinator holds it (closing the fd drops ours)
    finally:
        os.close(fd)
    try:
        return parse_update_conf(read_text(path, max_bytes=64 * 1024, what="coordinator.conf"), str(path))
    except (InputFileError, ConfigError):
        return {"NAME": "unknown"}  # held, but unreadable: something coordinates all the same


async def find_other_coordinator(reboot: RebootSettings, units: UnitStates | None) -> OtherCoordinator | None:
    """locksmithd (or another update coordinator) running on this host, or None. ``units`` None
    skips systemd (no bus); a bus that cannot answer is logged and the file check still counts."""
    holder = await asyncio.to_thread(coordinator_conf_holder, reboot.coordinator_conf)
    if holder is not None:
        name = holder.get("NAME") or "unknown"
        details = ", ".join(f"{k}={holder[k]}" for k in ("STRATEGY", "STATE") if holder.get(k))
        return OtherCoordinator(name, f"{reboot.coordinator_conf} is held by a running {name}"
                                      + (f" ({details})" if details else ""))
    if units is not None:
        try:
            state = await units.active_state(reboot.locksmithd_unit)
        except (OSError, TimeoutError, ValueError) as exc:  # dbus-fast raises OSError/ValueError on a bad bus
            log.warning("locksmithd_check_unavailable", unit=reboot.locksmithd_unit, error=str(exc) or "timed out")
            return None
        if state in RUNNING_STATES:
            return OtherCoordinator("locksmithd", f"{reboot.locksmithd_unit} is {state} (systemd)")
    return None


def conflict_message(other: OtherCoordinator, reboot: RebootSettings, origin: str) -> str:
    return (f"refusing to coordinate reboots: {other.evidence}, and reboot.strategy = {reboot.strategy!r} "
            f"({origin}) would reboot this host too, under a second lock. Either keep {other.name}: set "
            f"[reboot] strategy = \"off\" in the agent config; or move to update-agent: "
            f"systemctl disable --now {reboot.locksmithd_unit} && systemctl mask {reboot.locksmithd_unit}. "
            "See docs/migrating-from-locksmith.md")


async def refuse_beside_locksmithd(reboot: RebootSettings, units: UnitStates | None, *,
                                   origin: str = "default") -> None:
    """Raise :class:`CoordinatorConflict` when another coordinator runs and ``reboot.strategy``
    would reboot the host as well. ``off`` never conflicts."""
    if reboot.strategy == "off":
        return
    other = await find_other_coordinator(reboot, units)
    if other is not None:
        raise CoordinatorConflict(conflict_message(other, reboot, origin))


__all__ = [
    "CoordinatorConflict", "OtherCoordinator", "SystemdUnits", "UnitStates", "coordinator_conf_holder",
    "find_other_coordinator", "refuse_beside_locksmithd",
]
