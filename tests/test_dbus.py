"""The agent on a real dbus-daemon (private bus): update_engine's interface and ours.

Clients are independent implementations where possible: dbus-send, gdbus and dbus-monitor
from the D-Bus and GLib projects, plus our own dbus-fast client.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agentrig import Rig
from dbus_fast import Message
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusBool
from dbus_fast.service import ServiceInterface, method
from dbusbus import PrivateBus
from gptimg import cgpt_attr, gptprio_bits

from updateagent.agent import Agent, Phase
from updateagent.dbus import AGENT_INTERFACE, MANAGER_INTERFACE, AgentClient, AgentClientError, AgentService
from updateagent.host import HostError, SystemHost

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "systemd" / "com.coreos.update1.conf"
DEST = ["--dest=com.coreos.update1", "/com/coreos/update1"]


@dataclass
class Served:
    rig: Rig
    bus: PrivateBus
    agent: Agent
    service: AgentService
    task: asyncio.Task[None]


async def _serve(rig: Rig, bus: PrivateBus, **settings: object) -> Served:
    agent = rig.agent(**settings)
    await agent.start()
    service = AgentService(agent, bus.address)
    await service.start()
    ready = asyncio.Event()
    agent.subscribe(lambda s: ready.set() if agent.settled() else None)
    task = asyncio.create_task(agent.run())
    await asyncio.wait_for(ready.wait(), 10)
    return Served(rig, bus, agent, service, task)


async def _stop(served: Served) -> None:
    served.agent.stop()
    await asyncio.wait_for(served.task, 10)
    await served.service.stop()


@pytest.fixture
async def served(rig: Rig, bus: PrivateBus) -> AsyncIterator[Served]:
    s = await _serve(rig, bus)
    try:
        yield s
    finally:
        await _stop(s)


async def _run(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _parse_dbus_send(out: str) -> list[object]:
    values: list[object] = []
    for line in out.splitlines()[1:]:
        kind, _, value = line.strip().partition(" ")
        if kind in ("int64", "uint32", "int32"):
            values.append(int(value))
        elif kind == "double":
            values.append(float(value))
        elif kind == "string":
            values.append(json.loads(value))
        elif kind == "boolean":
            values.append(value == "true")
    return values


async def test_get_status_with_dbus_send_and_gdbus(served: Served) -> None:
    rc, out, err = await _run("dbus-send", f"--bus={served.bus.address}", "--print-reply", *DEST,
                              f"{MANAGER_INTERFACE}.GetStatus")
    assert rc == 0, err
    assert _parse_dbus_send(out) == [0, 0.0, "UPDATE_STATUS_IDLE", "", 0]
    assert re.search(r"^\s+int64 0\n\s+double 0\n\s+string \"UPDATE_STATUS_IDLE\"", out, re.MULTILINE)

    rc, out, err = await _run("gdbus", "call", "--address", served.bus.address, "-d", "com.coreos.update1",
                              "-o", "/com/coreos/update1", "-m", f"{MANAGER_INTERFACE}.GetStatus")
    assert rc == 0, err
    assert out.strip() == "(int64 0, 0.0, 'UPDATE_STATUS_IDLE', '', int64 0)"

    rc, out, err = await _run("gdbus", "introspect", "--address", served.bus.address, "-d", "com.coreos.update1",
                              "-o", "/com/coreos/update1")
    assert rc == 0, err
    for text in ("AttemptUpdate();", "ResetStatus();", f"interface {AGENT_INTERFACE}", "MarkGood(out s"):
        assert text in out, text
    compact = re.sub(r"\s+", " ", out)
    assert ("GetStatus(out x last_checked_time, out d progress, out s current_operation, out s new_version, "
            "out x new_size);") in compact
    assert "StatusUpdate(x last_checked_time, d progress, s current_operation, s new_version, x new_size);" in compact


async def test_status_update_signals_during_a_check(served: Served) -> None:
    rig = served.rig
    rig.publish("2.0.0")
    monitor = await asyncio.create_subprocess_exec(
        "dbus-monitor", "--address", served.bus.address,
        f"type='signal',interface='{MANAGER_INTERFACE}',member='StatusUpdate'",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert monitor.stdout is not None
        # dbus-monitor announces itself (NameAcquired/NameLost) once its match rules are in place.
        while "NameLost" not in (await asyncio.wait_for(monitor.stdout.readline(), 10)).decode():
            pass
        async with AgentClient(served.bus.address) as client:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            received: list[tuple[int, float, str, str, int]] = []

            def on_status(st: tuple[int, float, str, str, int]) -> None:
                received.append(st)
                if st[2] == "UPDATE_STATUS_UPDATED_NEED_REBOOT" and not done.done():
                    done.set_result(None)

            await client.subscribe(on_status)
            await client.attempt_update()
            await asyncio.wait_for(done, 30)
            assert await client.get_status() == received[-1]

        ops = [r[2] for r in received]
        order = ["UPDATE_STATUS_CHECKING_FOR_UPDATE", "UPDATE_STATUS_UPDATE_AVAILABLE", "UPDATE_STATUS_DOWNLOADING",
                 "UPDATE_STATUS_VERIFYING", "UPDATE_STATUS_FINALIZING", "UPDATE_STATUS_UPDATED_NEED_REBOOT"]
        assert [op for i, op in enumerate(ops) if i == 0 or ops[i - 1] != op] == order
        downloading = [r[1] for r in received if r[2] == "UPDATE_STATUS_DOWNLOADING"]
        assert downloading == sorted(downloading) and downloading[-1] == 1.0
        final = received[-1]
        assert final[0] > 0 and final[3] == "2.0.0" and final[4] == len(rig.images["2.0.0"])

        # dbus-monitor saw the same signals, with update_engine's signature.
        text = ""
        while "UPDATE_STATUS_UPDATED_NEED_REBOOT" not in text:
            text += (await asyncio.wait_for(monitor.stdout.readline(), 10)).decode()
        assert "member=StatusUpdate" in text and "UPDATE_STATUS_DOWNLOADING" in text
        assert re.search(r"int64 \d+\s+double [\d.]+\s+string \"UPDATE_STATUS_", text)
    finally:
        monitor.terminate()
        await monitor.wait()


async def test_agent_interface(served: Served) -> None:
    rig = served.rig
    rig.publish("2.0.0")
    async with AgentClient(served.bus.address) as client:
        slots = await client.slots()
        assert [(s["name"], s["booted"], s["priority"], s["successful"]) for s in slots] == [
            ("A", True, 1, True), ("B", False, 0, False)]
        assert await client.deny_list() == []
        details = await client.details()
        assert details["booted_slot"] == "A" and details["current_version"] == "1.0.0"
        assert details["last_boot_outcome"] == "normal"

        # Check is AttemptUpdate that answers whether it was accepted; wait for the apply.
        done = asyncio.get_running_loop().create_future()
        await client.subscribe(lambda st: done.done() or st[2] != "UPDATE_STATUS_UPDATED_NEED_REBOOT"
                               or done.set_result(None))
        assert await client.check() is True
        await asyncio.wait_for(done, 30)
        assert await client.check() is False  # waits for its reboot: nothing more to check

        history = await client.history(0)
        assert [e["event"] for e in history][-2:] == ["update_available", "update_applied"]
        assert len(await client.history(1)) == 1

        rc, out, err = await _run("gdbus", "call", "--address", served.bus.address, "-d", "com.coreos.update1",
                                  "-o", "/com/coreos/update1", "-m", "org.freedesktop.DBus.Properties.Get",
                                  AGENT_INTERFACE, "Phase")
        assert rc == 0, err
        assert "UPDATE_STATUS_UPDATED_NEED_REBOOT" in out

        # The booted slot A is already good: MarkGood says which slot, changes nothing.
        assert await client.mark_good() == "A"
        assert cgpt_attr(rig.disk, 4) == gptprio_bits(2, 1, False)

        # ResetStatus reverts the applied update: B is never booted.
        await client.reset_status()
        assert (await client.get_status())[2:4] == ("UPDATE_STATUS_IDLE", "")
        assert cgpt_attr(rig.disk, 4) == gptprio_bits(0, 0, False)
        assert cgpt_attr(rig.disk, 3) == gptprio_bits(1, 0, True)


async def test_properties_changed_follows_the_agent(served: Served) -> None:
    listener = await MessageBus(bus_address=served.bus.address).connect()
    changes: asyncio.Queue[dict[str, object]] = asyncio.Queue()

    def on_message(msg: Message) -> None:
        if msg.member == "PropertiesChanged" and msg.path == "/com/coreos/update1" and msg.body[0] == AGENT_INTERFACE:
            changes.put_nowait({name: variant.value for name, variant in msg.body[1].items()})

    try:
        listener.add_message_handler(on_message)
        await listener.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                    interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                                    body=["type='signal',interface='org.freedesktop.DBus.Properties'"]))
        served.rig.publish("2.0.0")
        assert served.agent.request_check()
        changed: dict[str, object] = {}
        while changed.get("Phase") != "UPDATE_STATUS_UPDATED_NEED_REBOOT":
            changed = await asyncio.wait_for(changes.get(), 30)
        assert changed == {"Phase": "UPDATE_STATUS_UPDATED_NEED_REBOOT", "CurrentVersion": "1.0.0",
                           "BootedVersion": "1.0.0", "BootedSlot": "A", "LastBootOutcome": "normal",
                           "LastError": ""}
    finally:
        listener.disconnect()


async def test_errors_carry_a_name_and_detail(rig: Rig, bus: PrivateBus) -> None:
    rig.publish("2.0.0")
    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT
    rig.boot()
    s = await _serve(rig, bus, health=[{"command": ["false"], "name": "app"}])
    try:
        assert s.agent.state.last_boot_outcome == "health_check_failed"
        async with AgentClient(bus.address) as client:
            with pytest.raises(AgentClientError, match=r"io\.coreupdate\.Agent1\.Error\.Busy: .*rollback"):
                await client.mark_good()
            with pytest.raises(AgentClientError, match=r"Error\.Busy"):
                await client.reset_status()
            assert await client.deny_list() == ["2.0.0"]
            details = await client.details()
            assert "app: exit 1" in details["last_error"]
            assert details["pending"]["kind"] == "rollback"
    finally:
        await _stop(s)


async def test_client_reports_a_missing_agent(bus: PrivateBus) -> None:
    async with AgentClient(bus.address) as client:
        with pytest.raises(AgentClientError, match="not running"):
            await client.get_status()


@pytest.fixture
def system_like_bus() -> Iterator[PrivateBus]:
    """System-bus defaults plus our policy fragment, reachable by an unprivileged user."""
    directory = Path(tempfile.mkdtemp(prefix="bus-", dir="/tmp"))
    directory.chmod(0o755)  # pytest's tmp dirs are 0700: the unprivileged client could not reach the socket
    try:
        with PrivateBus(directory, includes=(POLICY,), open_policy=False) as bus:
            yield bus
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_policy_fragment_on_a_system_like_bus(rig: Rig, system_like_bus: PrivateBus) -> None:
    """Our policy file in a bus with system-bus defaults: root owns the name; nobody may only read."""
    bus = system_like_bus
    s = await _serve(rig, bus)
    try:
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        send = [*nobody, "dbus-send", f"--bus={bus.address}", "--print-reply", *DEST]
        rc, out, err = await _run(*send, f"{MANAGER_INTERFACE}.GetStatus")
        assert rc == 0, err
        assert _parse_dbus_send(out)[2] == "UPDATE_STATUS_IDLE"
        rc, out, err = await _run(*send, f"{AGENT_INTERFACE}.GetSlots")
        assert rc == 0, err
        rc, out, err = await _run(*send, f"{AGENT_INTERFACE}.MarkGood")
        assert rc != 0 and "AccessDenied" in err, (out, err)
        rc, out, err = await _run(*nobody, "gdbus", "call", "--address", bus.address, "-d", "org.freedesktop.DBus",
                                  "-o", "/org/freedesktop/DBus", "-m", "org.freedesktop.DBus.RequestName",
                                  "com.coreos.update1", "0")
        assert rc != 0 and "AccessDenied" in err, (out, err)
        # root may call everything
        async with AgentClient(bus.address) as client:
            assert await client.mark_good() == "A"
    finally:
        await _stop(s)


class _Logind(ServiceInterface):
    """Stands in for systemd-logind on the private bus: records Reboot calls."""

    def __init__(self) -> None:
        super().__init__("org.freedesktop.login1.Manager")
        self.calls: list[bool] = []

    # No return annotation: under postponed annotations dbus-fast would read "None" as a type.
    @method()
    def Reboot(self, interactive: DBusBool):  # type: ignore[no-untyped-def]
        self.calls.append(interactive)


async def test_system_host_reboots_through_logind(bus: PrivateBus, tmp_path: Path) -> None:
    logind_bus = await MessageBus(bus_address=bus.address).connect()
    try:
        logind = _Logind()
        logind_bus.export("/org/freedesktop/login1", logind)
        await logind_bus.request_name("org.freedesktop.login1")
        host = SystemHost(bus_address=bus.address, cmdline=tmp_path / "cmdline")
        await host.reboot()
        assert logind.calls == [False]  # not interactive: no polkit prompt from a daemon
    finally:
        logind_bus.disconnect()
    with pytest.raises(HostError, match=r"logind refused Reboot: org\.freedesktop\.DBus\.Error\.ServiceUnknown"):
        await host.reboot()  # logind is gone


def test_system_host_reads_cmdline_os_release_and_boot_id(tmp_path: Path) -> None:
    (tmp_path / "cmdline").write_text("BOOT_IMAGE=/vmlinuz mount.usr=PARTUUID=7130C94A-213A-4E5A-8E26-6CCE9662F132 "
                                      "rootflags=rw mount.usrflags=ro\n")
    (tmp_path / "os-release").write_text('NAME="Flatcar Container Linux"\nVERSION_ID=3815.2.0\n')
    (tmp_path / "boot_id").write_text("5c4e3c44-5a8d-4f3e-9a6c-5b0e2b1a9c01\n")
    (tmp_path / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    host = SystemHost(cmdline=tmp_path / "cmdline", os_release=tmp_path / "os-release",
                      boot_id_file=tmp_path / "boot_id", machine_id_file=tmp_path / "machine-id")
    info = host.booted()
    assert info.partuuid == "7130c94a-213a-4e5a-8e26-6cce9662f132"
    assert info.version == "3815.2.0" and info.boot_id == "5c4e3c44-5a8d-4f3e-9a6c-5b0e2b1a9c01"
    assert host.machine_id() == "0123456789abcdef0123456789abcdef"
    with pytest.raises(HostError, match="machine-id-missing: missing or empty"):
        SystemHost(machine_id_file=tmp_path / "machine-id-missing").machine_id()
