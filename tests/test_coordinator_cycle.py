"""Full cycles of the reboot coordinator on real parts: embedded etcd, a channel built with
``updatectl release`` and served over HTTP, one private dbus-daemon per machine with a stand-in
logind whose Reboot power-cycles the machine (emulated bootloader on its GPT image).

Agents that need the clock moved run in this process on a StepClock (``build_agent``, as the
simulator wires them); the others run as their own ``update-agent`` processes. Every verdict comes
from an independent etcd watch of the holder keys, the audit trail and logind's record.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from fleetrig import Fleet, poll_until

from locksmith import audit
from updateagent.agent import Phase
from updateagent.strategy.coordinator import CoordState, QueueInfo


@pytest.fixture
async def fleet(tmp_path: Path, etcd_config, prefix: str) -> AsyncIterator[Fleet]:
    f = await Fleet(tmp_path, etcd_config, prefix).open()
    try:
        yield f
    finally:
        await f.close()


async def _settled(machine, phase: Phase = Phase.IDLE) -> None:
    await machine.wait_phase(phase)


async def test_one_host_updates_reboots_and_releases(fleet: Fleet) -> None:
    fleet.publish("2.0.0")
    (m,) = fleet.add(1)
    await m.start()
    assert m.agent is not None
    m.agent.request_check()
    await fleet.watch.wait(lambda: fleet.watch.releases(m.machine_id) == 1)
    await m.wait_state(CoordState.IDLE)
    assert m.reboots() == 1
    assert m.agent.state.current_version == "2.0.0"
    assert m.agent.state.last_boot_outcome == "success"
    assert fleet.watch.grants(m.machine_id) == 1 and fleet.watch.max_concurrent() == 1
    trail = [(e.action, e.subject) for e in await audit.read(fleet.etcd, fleet.layout)]
    assert ("lock", m.machine_id) in trail and ("unlock", m.machine_id) in trail


async def _update_waits(m, fleet: Fleet) -> None:
    """Start the machine's agent and have it apply 2.0.0 (published by the caller)."""
    await m.start()
    assert m.agent is not None
    m.agent.request_check()
    await _settled(m, Phase.UPDATED_NEED_REBOOT)


async def _group(fleet: Fleet):
    from locksmith.semaphore import read_state

    return await read_state(fleet.etcd, fleet.group, prefix=fleet.prefix)


async def test_a_closed_window_holds_the_reboot_and_a_closing_one_empties_the_queue(fleet: Fleet) -> None:
    from locksmith.semaphore import Semaphore

    await fleet.policy(windows=[{"days": ["Sat"], "start": "02:00", "length": "1h"}], min_window_remaining="10m")
    fleet.publish("2.0.0")
    a, b = fleet.add(2)
    await _update_waits(a, fleet)
    await a.wait_status(lambda t: t == "waiting for window: opens Sat 02:00 UTC (in 1h00m)")
    assert (await _group(fleet)).queue == [] and fleet.watch.events == []

    fleet.clock.advance(3600)  # 02:00: open
    await fleet.watch.wait(lambda: fleet.watch.releases(a.machine_id) == 1)
    assert a.reboots() == 1

    # b queues behind a holder that does not come back; the window closes (min_window_remaining
    # before its end): b leaves the queue and waits for next Saturday.
    async with Semaphore(fleet.etcd, fleet.group, prefix=fleet.prefix, clock=fleet.clock) as other:
        await other.lock("stuck-host", hold_for=timedelta(hours=5))
        await _update_waits(b, fleet)
        await b.wait_status(lambda t: t == "queued: 1st of 1 in group prod")
        st = await _group(fleet)
        assert [w.id for w in st.queue] == [b.machine_id]
        fleet.clock.advance(51 * 60)  # 02:51: 9m left, under min_window_remaining
        await b.wait_status(lambda t: t == "waiting for window: opens Sat 02:00 UTC (in 6d23h)")
        # Leaving is a delete of the queue key, sent before the state changed.
        assert (await _group(fleet)).queue == []
        await other.unlock("stuck-host")
    assert b.reboots() == 0 and fleet.watch.grants(b.machine_id) == 0


async def test_a_pause_while_queued_holds_the_grant_until_resume(fleet: Fleet) -> None:
    from locksmith.policystore import pause, resume
    from locksmith.semaphore import Semaphore

    fleet.publish("2.0.0")
    (m,) = fleet.add(1)
    async with Semaphore(fleet.etcd, fleet.group, prefix=fleet.prefix) as other:
        await other.lock("other-host")
        await _update_waits(m, fleet)
        await m.wait_state(CoordState.QUEUED)
        await pause(fleet.etcd, fleet.group, "hold everything", prefix=fleet.prefix)
        await other.unlock("other-host")
    # The slot is free but the group is paused: the host's own mirror sees both, and waits.
    # Two watches see the pause: the semaphore mirror (queue(), the metrics) and the policy reader
    # (the status line). Under load one may be behind the other, so wait for both, and for the whole
    # group view the metrics are checked against.
    await poll_until(lambda: m.coordinator.backend.queue() == QueueInfo(position=1, length=1, holders=0, slots=1,
                                                                       paused=True)
                     and m.coordinator.status_text() == "queued: group prod paused")
    assert m.coordinator.state is CoordState.QUEUED
    # The metrics say the same, the group's numbers from the semaphore mirror.
    from prometheus_client import generate_latest

    from updateagent.metrics import AgentMetrics

    assert m.agent is not None
    text = generate_latest(AgentMetrics(m.agent).registry).decode()
    expected = ('update_agent_coordinator_state{state="queued"} 1.0', 'update_agent_group{what="paused"} 1.0',
                'update_agent_group{what="queue_length"} 1.0', 'update_agent_group{what="holders"} 0.0',
                'update_agent_group{what="slots"} 1.0',
                'update_agent_coordinator_wait_seconds_total{for="window"} 0.0',
                'update_agent_coordinator_reboots_total{reason="update"} 0.0')
    missing = [line for line in expected if line not in text]
    ours = [line for line in text.splitlines() if line.startswith(("update_agent_group", "update_agent_coordinator"))]
    assert missing == [], ours
    assert fleet.watch.grants(m.machine_id) == 0 and m.reboots() == 0
    await resume(fleet.etcd, fleet.group, prefix=fleet.prefix)
    await fleet.watch.wait(lambda: fleet.watch.releases(m.machine_id) == 1)
    assert m.reboots() == 1


async def test_a_failed_health_check_rolls_back_spends_the_budget_and_stops_the_group(fleet: Fleet) -> None:
    from locksmith.budget import count_failures
    from locksmith.policystore import read_pause

    await fleet.policy(failure_budget=0, on_timeout="release")
    fleet.publish("2.0.0")
    bad, good = fleet.add(2)
    bad.configure(health=[{"command": ["sh", "-c", "exit 3"], "name": "app"}])
    await _update_waits(bad, fleet)
    # Reboot into 2.0.0, health check fails, rollback reboot under the same slot, back on 1.0.0.
    await fleet.watch.wait(lambda: fleet.watch.releases(bad.machine_id) == 1)
    await bad.wait_state(CoordState.IDLE)
    assert bad.reboots() == 2 and fleet.watch.grants(bad.machine_id) == 1
    assert bad.agent is not None and bad.agent.state.current_version == "1.0.0"
    assert bad.agent.state.last_boot_outcome == "rolled_back"
    assert await count_failures(fleet.etcd, fleet.group, prefix=fleet.prefix) == 1
    paused = await read_pause(fleet.etcd, fleet.group, prefix=fleet.prefix)
    assert paused is not None and paused.source == "failure-budget"

    await _update_waits(good, fleet)
    await good.wait_state(CoordState.QUEUED)
    await poll_until(lambda: (q := good.coordinator.backend.queue()) is not None and q.position == 1)
    assert good.reboots() == 0 and fleet.watch.grants(good.machine_id) == 0


async def test_a_failing_pre_reboot_hook_gives_the_slot_back(fleet: Fleet) -> None:
    fleet.publish("2.0.0")
    (m,) = fleet.add(1)
    m.pre_dir.mkdir()
    hook = m.pre_dir / "10-drain"
    hook.write_text("#!/bin/sh\necho cannot drain >&2\nexit 4\n")
    hook.chmod(0o755)
    await _update_waits(m, fleet)
    await m.wait_state(CoordState.FAILED)
    await fleet.watch.wait(lambda: fleet.watch.releases(m.machine_id) == 1)
    assert m.reboots() == 0 and fleet.watch.grants(m.machine_id) == 1
    assert "pre-reboot hook failed: 10-drain: exit 4: cannot drain" in m.coordinator.status_text()
    assert (await _group(fleet)).holders == []


async def test_reboot_required_file_leads_to_one_coordinated_reboot(fleet: Fleet) -> None:
    (m,) = fleet.add(1)
    await m.start()
    await _settled(m, Phase.IDLE)
    m.reboot_required.write_text("*** System restart required ***\n")
    fleet.clock.advance(61)
    await fleet.watch.wait(lambda: fleet.watch.releases(m.machine_id) == 1)
    await m.wait_state(CoordState.IDLE)
    assert m.reboots() == 1 and fleet.watch.grants(m.machine_id) == 1
    assert m.agent is not None and m.agent.state.last_boot_outcome == "normal"
    fleet.clock.advance(61)  # the file is gone with the reboot: nothing more
    assert m.reboots() == 1


async def test_strategy_off_never_reboots(fleet: Fleet) -> None:
    fleet.strategy = "off"
    fleet.publish("2.0.0")
    (m,) = fleet.add(1)
    m.reboot_required.write_text("")
    await _update_waits(m, fleet)
    fleet.clock.advance(3600)
    assert m.agent is not None and m.agent.phase is Phase.UPDATED_NEED_REBOOT
    assert m.agent.reboot_strategy.describe()["state"] == "off"
    assert m.reboots() == 0 and fleet.watch.events == []


async def test_an_overdue_holder_is_released_once_by_another_agent(fleet: Fleet) -> None:
    from locksmith.budget import list_failures
    from locksmith.semaphore import Semaphore

    await fleet.policy(on_timeout="release", reboot_timeout="10m", failure_budget=3)
    fleet.publish("2.0.0")
    a, b = fleet.add(2)
    dead = Semaphore(fleet.etcd, fleet.group, prefix=fleet.prefix, clock=fleet.clock)
    await dead.lock("dead-host", hold_for=timedelta(minutes=10))
    await dead.close()  # the holder's process is gone; its slot (no lease) stays
    await _update_waits(a, fleet)
    await _update_waits(b, fleet)
    await a.wait_state(CoordState.QUEUED)
    await b.wait_state(CoordState.QUEUED)
    fleet.clock.advance(11 * 60)
    await fleet.watch.wait(lambda: fleet.watch.releases(a.machine_id) == 1 and fleet.watch.releases(b.machine_id) == 1)
    trail = await audit.read(fleet.etcd, fleet.layout)
    assert [e.subject for e in trail if e.action == "release-overdue"] == ["dead-host"]
    assert fleet.watch.releases("dead-host") == 1
    failures = await list_failures(fleet.etcd, fleet.group, prefix=fleet.prefix)
    assert [(f.host, f.kind) for f in failures] == [("dead-host", "overdue")]
    assert fleet.watch.max_concurrent() == 1
