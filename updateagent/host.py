"""The host, behind a small interface: who we are, what booted, and how to reboot.

``SystemHost`` reads the kernel command line (``mount.usr=PARTUUID=…`` or ``usr=…``), an
os-release style version file and the kernel's boot id, and reboots through logind.
``EmulatedHost`` reads the emulated bootloader's boot record and "reboots" by running the
emulated bootloader again, so the daemon, the tests and the simulator run the same agent code.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from locksmith.files import InputFileError, read_text
from locksmith.log import get_logger
from updateagent.errors import UpdateAgentError

log = get_logger("updateagent.host")

_PARTUUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class HostError(UpdateAgentError):
    """The host cannot tell what booted, or cannot reboot."""


@dataclass(frozen=True)
class BootInfo:
    """What is running now. ``version`` is None when the host cannot tell (the agent then uses
    the version it recorded for that partition when it installed it)."""

    partuuid: str  # lowercase
    boot_id: str
    version: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class Session:
    """A logged-in session as logind's ``ListSessions`` gives it."""

    id: str
    uid: int
    user: str
    seat: str


class Host(Protocol):
    def machine_id(self) -> str: ...

    def booted(self) -> BootInfo: ...

    async def reboot(self) -> None: ...

    async def sessions(self) -> list[Session]:
        """The logged-in sessions (logind ``ListSessions``); the coordinator postpones for them."""
        ...


_LOGIND_TIMEOUT = 25.0  # D-Bus' own default reply timeout


async def _logind_call(bus_address: str | None, member: str, signature: str = "", body: list[object] | None = None
                       ) -> list[object]:
    """One call to ``org.freedesktop.login1.Manager``; HostError when logind refuses or is silent."""
    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio import MessageBus

    bus = MessageBus(bus_address=bus_address) if bus_address else MessageBus(bus_type=BusType.SYSTEM)
    try:
        async with asyncio.timeout(_LOGIND_TIMEOUT):
            await bus.connect()
            reply = await bus.call(Message(
                destination="org.freedesktop.login1", path="/org/freedesktop/login1",
                interface="org.freedesktop.login1.Manager", member=member, signature=signature, body=body or [],
            ))
    except TimeoutError:
        raise HostError(f"logind did not answer {member} within {_LOGIND_TIMEOUT:g}s") from None
    except Exception as exc:  # dbus-fast raises its own errors as well as OSError
        raise HostError(f"cannot reach logind for {member}: {exc}") from None
    finally:
        bus.disconnect()
    if reply is None or reply.message_type == MessageType.ERROR:
        detail = reply.body[0] if reply is not None and reply.body else "no reply"
        name = reply.error_name if reply is not None else "?"
        raise HostError(f"logind refused {member}: {name}: {detail}")
    return list(reply.body)


async def logind_reboot(bus_address: str | None) -> None:
    await _logind_call(bus_address, "Reboot", "b", [False])
    log.info("reboot_requested", via="logind")


async def logind_sessions(bus_address: str | None) -> list[Session]:
    body = await _logind_call(bus_address, "ListSessions")
    rows = body[0] if body else []
    out = []
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, list | tuple) and len(row) >= 4:
            out.append(Session(str(row[0]), int(row[1]), str(row[2]), str(row[3])))
    return out


def usr_partuuid_from_cmdline(cmdline: str, source: str = "/proc/cmdline") -> str:
    """The PARTUUID of /usr named on a kernel command line. The last occurrence wins, as in the kernel."""
    found: str | None = None
    for word in shlex.split(cmdline):
        key, sep, value = word.partition("=")
        if not sep or key not in ("mount.usr", "usr"):
            continue
        for prefix in ("PARTUUID=", "/dev/disk/by-partuuid/"):
            if value.startswith(prefix):
                found = value[len(prefix) :]
    if found is None:
        raise HostError(f"{source}: no mount.usr=PARTUUID=… or usr=PARTUUID=… on the kernel command line")
    if not _PARTUUID_RE.match(found):
        raise HostError(f"{source}: {found!r} is not a partition UUID")
    return found.lower()


def version_from_os_release(text: str) -> str | None:
    """VERSION_ID (or VERSION) from os-release syntax, unquoted."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            try:
                parts = shlex.split(value)
            except ValueError:
                continue
            values[key] = parts[0] if parts else ""
    return values.get("VERSION_ID") or values.get("VERSION") or None


def _read_machine_id(path: Path) -> str | None:
    try:
        text = read_text(path, max_bytes=4096, what="machine id file").strip()
    except InputFileError:
        return None
    return text or None


class SystemHost:
    def __init__(
        self,
        *,
        cmdline: Path = Path("/proc/cmdline"),
        os_release: Path = Path("/usr/lib/os-release"),
        machine_id_file: Path = Path("/etc/machine-id"),
        boot_id_file: Path = Path("/proc/sys/kernel/random/boot_id"),
        bus_address: str | None = None,
    ) -> None:
        self.cmdline = cmdline
        self.os_release = os_release
        self.machine_id_file = machine_id_file
        self.boot_id_file = boot_id_file
        self.bus_address = bus_address

    def machine_id(self) -> str:
        value = _read_machine_id(self.machine_id_file)
        if value is None:
            raise HostError(f"{self.machine_id_file}: missing or empty; cannot identify this machine")
        return value

    def booted(self) -> BootInfo:
        try:
            cmdline = read_text(self.cmdline, max_bytes=64 * 1024, what="kernel command line")
        except InputFileError as exc:
            raise HostError(f"{self.cmdline}: cannot read: {exc.problem}") from None
        partuuid = usr_partuuid_from_cmdline(cmdline, str(self.cmdline))
        try:
            version = version_from_os_release(read_text(self.os_release, max_bytes=64 * 1024, what="os-release"))
        except InputFileError:
            version = None
        try:
            boot_id = read_text(self.boot_id_file, max_bytes=4096, what="boot id").strip()
        except InputFileError as exc:
            raise HostError(f"{self.boot_id_file}: cannot read: {exc.problem}") from None
        return BootInfo(partuuid=partuuid, boot_id=boot_id, version=version)

    async def reboot(self) -> None:
        await logind_reboot(self.bus_address)

    async def sessions(self) -> list[Session]:
        return await logind_sessions(self.bus_address)


class EmulatedHost:
    """A machine made of a disk image and the emulated bootloader's boot record."""

    def __init__(self, disk: Path, boot_record: Path, *, machine_id_file: Path | None = None,
                 logind: bool = False, bus_address: str | None = None) -> None:
        self.disk = disk
        self.boot_record = boot_record
        self.machine_id_file = machine_id_file
        # logind: reboot and list sessions through logind on ``bus_address`` (a stand-in logind
        # power-cycles the machine), as SystemHost does; else power-cycle in-process.
        self.logind = logind
        self.bus_address = bus_address
        self.reboots = 0
        self.rebooted = asyncio.Event()

    def machine_id(self) -> str:
        if self.machine_id_file is not None:
            value = _read_machine_id(self.machine_id_file)
            if value is not None:
                return value
        return hashlib.sha256(str(self.disk.resolve()).encode()).hexdigest()[:32]

    def booted(self) -> BootInfo:
        """From the boot record; ``read_boot_record`` validates every field (BootRecordError)."""
        from updateagent.bootloader import read_boot_record

        record = read_boot_record(self.boot_record)
        return BootInfo(partuuid=record.partuuid, boot_id=record.boot_id, label=record.label or None)

    def power_cycle(self) -> None:
        """Run the emulated bootloader once: what a reboot does to the disk and the boot record."""
        from updateagent.bootloader import EmulatedBootloader

        EmulatedBootloader(self.disk, self.boot_record).boot()
        self.reboots += 1

    async def reboot(self) -> None:
        if self.logind:
            await logind_reboot(self.bus_address)
            return
        await asyncio.to_thread(self.power_cycle)
        log.info("reboot_emulated", disk=str(self.disk), reboots=self.reboots)
        self.rebooted.set()

    async def sessions(self) -> list[Session]:
        return await logind_sessions(self.bus_address) if self.logind else []
