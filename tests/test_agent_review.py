"""Regression tests for the second review of the update agent (each failed before its fix):
kill between the GPT mark and the state save, errors during the after-boot verification, a
restart while a reboot is awaited, an unknown version on the deny list, ``updatectl check``
during the boot health check, and two small input/leak defects."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from agentrig import ManualClock, Rig
from dbusbus import PrivateBus
from gptimg import cgpt_attr, cgpt_set, gptprio_bits

from updateagent.agent import Phase
from updateagent.channel import parse_manifest
from updateagent.config import ConfigError, RawConfig, validate
from updateagent.daemon import build_agent
from updateagent.dbus import AgentService
from updateagent.errors import UpdateAgentError
from updateagent.install import InstallTarget, install
from updateagent.slots import Slot, SlotName, SlotTable

UPDATECTL = str(Path(sys.executable).parent / "updatectl")


class KilledAroundMark(SlotTable):
    """The real slot table; ``mark_new`` also photographs the state file just before or just
    after its GPT write: what a SIGKILL (or power cut) at that instant would leave on disk."""

    def __init__(self, disk: str, state_file: Path, when: str) -> None:
        super().__init__(disk)
        self.state_file = state_file
        self.when = when
        self.snapshot: bytes | None = None

    def mark_new(self, slot: SlotName | Slot) -> tuple[Slot, Slot]:
        if self.when == "before":
            self.snapshot = self.state_file.read_bytes()
        result = super().mark_new(slot)
        if self.when == "after":
            self.snapshot = self.state_file.read_bytes()
        return result


async def _apply_and_kill(rig: Rig, when: str) -> None:
    """Apply 2.0.0, then put the state file back as the kill around the GPT mark left it."""
    rig.publish("2.0.0")
    settings = rig.settings()
    agent = build_agent(settings, host=rig.host())
    slots = KilledAroundMark(str(rig.disk.path), settings.state_file, when)
    agent.slots = slots
    await agent.start()
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT
    assert slots.snapshot is not None
    settings.state_file.write_bytes(slots.snapshot)


# ------------------------------------------------------------------------------- 1: kill around the mark


async def test_kill_after_the_mark_then_reboot_knows_the_new_version(rig: Rig) -> None:
    await _apply_and_kill(rig, "after")
    assert cgpt_attr(rig.disk, 4) == gptprio_bits(2, 1, False)  # the mark is on disk
    assert rig.boot().label == "USR-B"
    first = rig.agent()
    await first.start()
    await first.tick()  # the after-boot logic, then the agent restarts during the health checks
    assert first.phase is Phase.BOOT_HEALTH_CHECK
    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled() is Phase.IDLE
    assert agent.state.last_boot_outcome == "success"
    assert agent.state.current_version == "2.0.0" and agent.state.booted_version == "2.0.0"
    assert cgpt_attr(rig.disk, 4) == gptprio_bits(2, 0, True)


async def test_kill_after_the_mark_then_restart_waits_for_the_reboot(rig: Rig) -> None:
    await _apply_and_kill(rig, "after")
    agent = rig.agent()  # same boot
    await agent.start()
    assert await agent.run_until_settled() is Phase.UPDATED_NEED_REBOOT
    assert agent.state.pending is not None and agent.state.pending.version == "2.0.0"
    assert agent.status().new_version == "2.0.0"
    assert cgpt_attr(rig.disk, 4) == gptprio_bits(2, 1, False)
    assert rig.boot().label == "USR-B"
    again = rig.agent()
    await again.start()
    assert await again.run_until_settled() is Phase.IDLE
    assert again.state.current_version == "2.0.0" and again.state.last_boot_outcome == "success"


@pytest.mark.parametrize("restart", ["same_boot", "reboot"])
async def test_kill_before_the_mark_discards_the_pending_update(rig: Rig, restart: str) -> None:
    """The pending record is saved but the slot was never marked: not a rollback, no deny entry;
    the slot stays unbootable and the next check applies the release again."""
    await _apply_and_kill(rig, "before")
    assert cgpt_attr(rig.disk, 4) == gptprio_bits(2, 1, False)  # the agent went on and marked it...
    cgpt_set(rig.disk.path, 4, priority=0, tries=0, successful=False)  # ...but the kill came first
    cgpt_set(rig.disk.path, 3, priority=1, tries=0, successful=True)
    if restart == "reboot":
        assert rig.boot().label == "USR-A"
    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled() is Phase.IDLE
    assert agent.state.pending is None and agent.state.deny_list == ()
    assert agent.state.current_version == "1.0.0"
    assert agent.state.last_boot_outcome != "rolled_back"
    assert "apply_interrupted" in [e.event for e in agent.state.history]
    assert cgpt_attr(rig.disk, 4) == gptprio_bits(0, 0, False)
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT
    assert agent.state.pending is not None and agent.state.pending.version == "2.0.0"


async def test_a_pending_update_that_cannot_be_saved_is_never_marked(rig: Rig) -> None:
    """Without its record on disk a marked slot would boot a version nobody knows: refuse."""
    rig.publish("2.0.0")
    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled() is Phase.IDLE
    state_file = rig.state_dir / "state.json"
    state_file.unlink()
    (state_file / "blocker").mkdir(parents=True)  # the atomic rename onto it fails (EISDIR)
    assert await agent.run_until_settled(check=True) is Phase.IDLE
    assert agent.errors == 1 and "cannot write" in agent.state.last_error
    assert agent.state.pending is None
    assert cgpt_attr(rig.disk, 4) == gptprio_bits(0, 0, False)


# ------------------------------------------------------------------------------- 2: verification retried


async def test_an_error_while_marking_good_is_retried_and_no_check_starts(rig: Rig) -> None:
    clock = ManualClock()
    rig.publish("2.0.0")
    agent = build_agent(rig.settings(), host=rig.host(), clock=clock)
    await agent.start()
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT
    assert rig.boot().label == "USR-B"

    # The health check passes, but takes the disk away on its way out: marking good fails (I/O).
    disk = Path(rig.disk.path)
    away = disk.with_name("disk.away")
    flag = rig.root / "take-disk"
    flag.touch()
    health = [{"command": ["sh", "-c", f"if [ -e {flag} ]; then rm {flag}; mv {disk} {away}; fi"]}]
    agent = build_agent(rig.settings(health=health, on_start=True), host=rig.host(), clock=clock)
    await agent.start()
    try:
        assert await agent.run_until_settled() is Phase.BOOT_HEALTH_CHECK
        assert away.exists()
        assert agent.state.last_boot_outcome != "success"
        assert "cannot open" in agent.state.last_error
        assert not agent.request_check()  # the booted slot is unconfirmed: no check may start
        assert agent.settled()  # waits for the retry time, not a busy loop
        assert await agent.run_until_settled() is Phase.BOOT_HEALTH_CHECK
    finally:
        os.replace(away, disk)
    clock.advance(3600)
    assert not agent.settled()
    assert await agent.run_until_settled() is Phase.IDLE
    assert agent.state.last_boot_outcome == "success" and agent.state.current_version == "2.0.0"
    assert cgpt_attr(rig.disk, 4) == gptprio_bits(2, 0, True)
    assert agent.state.last_error == ""


# ------------------------------------------------------------------------------- 3: resume asks again


async def test_restart_while_waiting_for_the_reboot_asks_for_it_again(rig: Rig) -> None:
    """The first agent died before its reboot request took effect (modelled by a strategy that
    only reports); the restarted one, with REBOOT_STRATEGY=reboot, must reboot the machine."""
    rig.publish("2.0.0")
    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT

    host = rig.host()
    again = build_agent(rig.settings(extra='[reboot]\nstrategy = "reboot"\n'), host=host)
    await again.start()
    assert await again.run_until_settled() is Phase.UPDATED_NEED_REBOOT
    async with asyncio.timeout(30):  # the coordinator reboots from its own task
        await host.rebooted.wait()
    assert host.reboots == 1 and host.booted().label == "USR-B"
    await again.run_until_settled()
    assert host.reboots == 1  # once per resume, not once per tick
    await again.reboot_strategy.close()


# ------------------------------------------------------------------------------- 4: no empty deny entry


async def test_an_unknown_version_failing_its_health_check_is_not_denied(rig: Rig) -> None:
    rig.publish("2.0.0")
    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT
    (rig.state_dir / "state.json").unlink()  # the record of what slot B holds is lost
    assert rig.boot().label == "USR-B"

    agent = rig.agent(health=[{"command": ["false"]}])
    await agent.start()
    assert await agent.run_until_settled() is Phase.UPDATED_NEED_REBOOT  # rollback wanted
    assert agent.state.deny_list == ()
    assert "unknown" in agent.state.last_error
    assert "deny_skipped" in [e.event for e in agent.state.history]
    assert rig.boot().label == "USR-A"

    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled() is Phase.IDLE
    assert agent.state.last_boot_outcome == "rolled_back" and agent.state.deny_list == ()
    rig.publish("3.0.0")
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT
    assert agent.state.pending is not None and agent.state.pending.version == "3.0.0"


def test_an_empty_version_in_a_saved_deny_list_is_dropped(tmp_path: Path) -> None:
    """A node already hit by the defect recovers: the empty entry would refuse every check."""
    from updateagent.state import StateStore

    path = tmp_path / "state.json"
    path.write_text(json.dumps({"format_version": 1, "deny_list": [{"version": "", "reason": "x", "time": 0},
                                                                    {"version": "2.0.0", "reason": "y", "time": 1}]}))
    assert [d.version for d in StateStore(path).load().deny_list] == ["2.0.0"]


# ------------------------------------------------------------------------------- 5: updatectl check


async def test_updatectl_check_during_the_boot_health_check_returns_at_once(rig: Rig, bus: PrivateBus) -> None:
    rig.publish("2.0.0")
    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT
    assert rig.boot().label == "USR-B"

    flag = rig.root / "health-may-end"
    health = [{"command": ["sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.05; done; exit 1"],
               "timeout_seconds": 120}]
    agent = rig.agent(health=health)
    await agent.start()
    service = AgentService(agent, bus.address)
    await service.start()
    checking = asyncio.Event()
    agent.subscribe(lambda s: checking.set() if s.phase is Phase.BOOT_HEALTH_CHECK else None)
    runner = asyncio.create_task(agent.run())
    try:
        await asyncio.wait_for(checking.wait(), 10)
        proc = await asyncio.create_subprocess_exec(
            UPDATECTL, "check", "--timeout", "15", "--bus-address", bus.address,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1, (out, err)
        assert "verifying the booted slot" in err.decode(), err
        assert "Traceback" not in err.decode()
        assert agent.phase is Phase.BOOT_HEALTH_CHECK
    finally:
        flag.touch()
        reboot = asyncio.Event()
        agent.subscribe(lambda s: reboot.set() if s.phase is Phase.UPDATED_NEED_REBOOT else None)
        await asyncio.wait_for(reboot.wait(), 30)
        agent.stop()
        await asyncio.wait_for(runner, 10)
        await service.stop()
    assert agent.state.last_boot_outcome == "health_check_failed"


async def test_updatectl_check_accepted_while_starting_returns_when_a_rollback_makes_it_moot(
        rig: Rig, bus: PrivateBus) -> None:
    """Accepted before the after-boot logic ran; the boot then fails its health check and the
    agent waits for the rollback reboot: the check will never come, updatectl must say so."""
    rig.publish("2.0.0")
    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT
    assert rig.boot().label == "USR-B"

    agent = rig.agent(health=[{"command": ["false"]}])
    await agent.start()
    assert agent.phase is Phase.STARTING
    accepted = asyncio.Event()
    original = agent.request_check

    def request_check() -> bool:
        ok = original()
        accepted.set()
        return ok

    agent.request_check = request_check  # type: ignore[method-assign]
    service = AgentService(agent, bus.address)
    await service.start()
    runner: asyncio.Task[None] | None = None
    try:
        proc = await asyncio.create_subprocess_exec(
            UPDATECTL, "check", "--timeout", "20", "-o", "json", "--bus-address", bus.address,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await asyncio.wait_for(accepted.wait(), 20)
        runner = asyncio.create_task(agent.run())
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1, (out, err)
        doc = json.loads(out)
        assert doc["result"] == "not_started", doc
        assert doc["status"]["current_operation"] == "UPDATE_STATUS_UPDATED_NEED_REBOOT"
        assert "failed its health check" in doc["error"]
    finally:
        agent.stop()
        if runner is not None:
            await asyncio.wait_for(runner, 10)
        await service.stop()


# ------------------------------------------------------------------------------- 6: small ones


_MANIFEST = {
    "format_version": 1, "version": "2.0.0", "payload": "payload.img", "size": 4, "compressed_size": 4,
    "sha256": "a" * 64, "compression": "none", "released": "2026-11-27T03:00:00Z",
}


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_install_target_that_cannot_seek_is_a_clear_error_without_a_leak(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that the installer's open for writing does not block
    try:
        before = _open_fds()
        with pytest.raises(UpdateAgentError, match=f"{fifo}: cannot seek"):
            install(parse_manifest(json.dumps(_MANIFEST).encode()), str(tmp_path / "manifest.json"),
                    InstallTarget(fifo, 0, 1024))
        assert _open_fds() == before
    finally:
        os.close(reader)


@pytest.mark.parametrize("value", [1e300, 10**12])
def test_huge_health_check_timeout_is_a_config_error(value: float) -> None:
    raw = {"health": {"check": [{"url": "http://127.0.0.1:1/healthz", "timeout_seconds": value}]}}
    with pytest.raises(ConfigError, match=r"health\.check\[0\]\.timeout_seconds"):
        validate(RawConfig(raw, "/etc/update-agent/config.toml", {}, "<none>"), env={})

