"""The agent's state machine through its public interface, on a real GPT image and HTTP channel."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest
from agentrig import NOW, ManualClock, Rig
from gptimg import cgpt_attr, gptprio_bits, make_disk
from hypothesis import given, settings
from hypothesis import strategies as st

from updateagent.agent import Agent, Phase, StatusSnapshot
from updateagent.bootloader import EmulatedBootloader
from updateagent.daemon import build_agent
from updateagent.schedule import Schedule
from updateagent.source import ChannelSource

# ------------------------------------------------------------------------------- schedule


@settings(max_examples=200, deadline=None)
@given(interval=st.floats(60, 24 * 3600), jitter=st.floats(0, 0.5), offset=st.integers(0, 10**8))
def test_next_check_stays_within_the_jitter(interval: float, jitter: float, offset: int) -> None:
    now = NOW + timedelta(seconds=offset)
    delay = (Schedule(interval, jitter).next_check(now) - now).total_seconds()
    assert interval * (1 - jitter) - 1e-3 <= delay <= interval * (1 + jitter) + 1e-3


def test_next_check_spreads_both_ways() -> None:
    delays = [(Schedule().next_check(NOW) - NOW).total_seconds() for _ in range(400)]
    assert min(delays) < 45 * 60 * 0.95 and max(delays) > 45 * 60 * 1.05


@settings(max_examples=200)
@given(failures=st.integers(1, 60))
def test_backoff_doubles_and_caps_at_four_hours(failures: int) -> None:
    s = Schedule(retry_initial=300, jitter=0.1, max_backoff=4 * 3600)
    delay = s.retry_after(failures)
    expected = min(300 * 2 ** (failures - 1), 4 * 3600)
    assert expected * 0.9 - 1e-6 <= delay <= min(expected * 1.1, 4 * 3600) + 1e-6


# ------------------------------------------------------------------------------- checks


INTERVAL = 45 * 60


def _delay(agent: Agent, clock: ManualClock) -> float:
    """Seconds until the agent's next scheduled check."""
    assert agent.next_check is not None
    return (agent.next_check - clock.now()).total_seconds()


async def test_transient_errors_back_off_and_permanent_ones_do_not(rig: Rig) -> None:
    clock = ManualClock()
    rig.publish("1.0.0")
    agent = build_agent(rig.settings(retry_initial_seconds=3600), host=rig.host(), clock=clock)
    await agent.start()
    assert await agent.run_until_settled() is Phase.IDLE

    def delay() -> float:
        return _delay(agent, clock)

    rig.server.add_fault("/stable/manifest.json", "status", value=503)
    expected = [3600, 7200, 14400, 14400]  # doubling, capped at 4 h
    for n, base in enumerate(expected, start=1):
        assert await agent.run_until_settled(check=True) is Phase.IDLE
        assert agent.failures == n
        assert base * 0.9 <= delay() <= min(base * 1.1, 14400)
        assert "HTTP 503" in agent.state.last_error

    # A scheduled check fires by itself once the clock reaches it.
    clock.advance(delay() + 1)
    assert not agent.settled()
    rig.server.clear_faults()
    assert await agent.run_until_settled() is Phase.IDLE
    assert agent.failures == 0 and 45 * 60 * 0.9 <= delay() <= 45 * 60 * 1.1
    assert agent.state.last_checked_time == int(clock.now().timestamp())

    # A bad signature is not going to fix itself by retrying soon: normal schedule.
    (rig.channel_root / "stable" / "manifest.json.sig").write_text("AAAA\n")
    assert await agent.run_until_settled(check=True) is Phase.IDLE
    assert agent.failures == 0 and delay() >= 45 * 60 * 0.9
    assert "signature" in agent.state.last_error

    # A 4xx will not go away by itself either: after a run of 503s, a 404 is back to normal.
    rig.publish("1.0.0")
    rig.server.add_fault("/stable/manifest.json", "status", value=503, times=2)
    rig.server.add_fault("/stable/manifest.json", "status", value=404)
    for _ in range(2):
        await agent.run_until_settled(check=True)
    assert agent.failures == 2
    assert await agent.run_until_settled(check=True) is Phase.IDLE
    assert "HTTP 404" in agent.state.last_error
    assert agent.failures == 0 and INTERVAL * 0.9 <= delay() <= INTERVAL * 1.1


async def test_payload_server_errors_back_off_across_checks(rig: Rig) -> None:
    """The check succeeds every time, the download fails with 503: the backoff still grows."""
    clock = ManualClock()
    rig.publish("2.0.0")
    settings_ = rig.settings(retry_initial_seconds=3600)
    agent = build_agent(settings_, host=rig.host(), clock=clock)
    manifest_url = settings_.manifest_url()
    assert manifest_url is not None
    # The installer's own quick retries, shortened: the agent's backoff is what is under test.
    agent.source = ChannelSource(manifest_url, settings_.keys, max_retries=1, backoff=0.01)
    await agent.start()
    assert await agent.run_until_settled() is Phase.IDLE
    payload = rig.payload_path("2.0.0")
    rig.server.add_fault(payload, "status", value=503)
    for n, base in enumerate([3600, 7200], start=1):
        assert await agent.run_until_settled(check=True) is Phase.IDLE
        assert "HTTP 503" in agent.state.last_error
        assert agent.failures == n and base * 0.9 <= _delay(agent, clock) <= base * 1.1
    assert cgpt_attr(rig.disk, 4) == gptprio_bits(0, 0, False)  # never marked

    rig.server.clear_faults()
    rig.server.add_fault(payload, "status", value=404)
    assert await agent.run_until_settled(check=True) is Phase.IDLE
    assert "HTTP 404 fetching the payload" in agent.state.last_error
    assert agent.failures == 0 and INTERVAL * 0.9 <= _delay(agent, clock) <= INTERVAL * 1.1

    rig.server.clear_faults()
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT
    assert agent.failures == 0


async def test_a_check_that_cannot_start_waits_for_the_next_interval(rig: Rig) -> None:
    """No channel configured: the error is reported once per interval, not in a tight loop."""
    clock = ManualClock()
    agent = build_agent(dataclasses.replace(rig.settings(on_start=True), server=None), host=rig.host(),
                        clock=clock)
    await agent.start()
    assert await agent.run_until_settled() is Phase.IDLE
    assert "no update channel configured" in agent.state.last_error
    assert agent.errors == 1 and INTERVAL * 0.9 <= _delay(agent, clock) <= INTERVAL * 1.1


async def test_connection_refused_backs_off(rig: Rig) -> None:
    clock = ManualClock()
    settings_ = dataclasses.replace(rig.settings(), server="http://127.0.0.1:9")
    agent = build_agent(settings_, host=rig.host(), clock=clock)
    await agent.start()
    events: list[str] = []
    agent.subscribe(on_event=lambda e: events.append(e.event))
    seen: list[str] = []
    agent.subscribe(lambda s: seen.append(s.current_operation))
    assert await agent.run_until_settled(check=True) is Phase.IDLE
    assert agent.failures == 1 and "cannot connect" in agent.state.last_error
    assert seen[-3:] == ["UPDATE_STATUS_CHECKING_FOR_UPDATE", "UPDATE_STATUS_REPORTING_ERROR_EVENT",
                         "UPDATE_STATUS_IDLE"]
    assert events[-1] == "error"


async def test_downgrade_is_refused_unless_allowed(rig: Rig) -> None:
    rig.publish("0.9.0")
    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled(check=True) is Phase.IDLE
    assert agent.state.history[-1].event == "update_refused"
    assert "downgrade refused" in agent.state.history[-1].details["detail"]
    assert rig.server.requests_for(rig.payload_path("0.9.0")) == []

    allowed = build_agent(dataclasses.replace(rig.settings(), allow_downgrade=True), host=rig.host())
    await allowed.start()
    assert await allowed.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT
    assert allowed.state.new_version == "0.9.0"


async def test_interrupted_apply_is_cleaned_up_on_restart(rig: Rig) -> None:
    rig.publish("2.0.0")
    agent = rig.agent()
    await agent.start()
    await agent.run_until_settled()
    runner = asyncio.ensure_future(agent.run_until_settled(check=True))

    def cut(s: StatusSnapshot) -> None:
        if s.phase is Phase.DOWNLOADING:
            runner.cancel()  # lands in the middle of the download

    agent.subscribe(cut)
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert cgpt_attr(rig.disk, 4) == gptprio_bits(0, 0, False)

    again = rig.agent()  # same boot
    await again.start()
    assert await again.run_until_settled() is Phase.IDLE
    assert "apply_interrupted" in [e.event for e in again.state.history]
    assert again.state.new_version == ""
    assert await again.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT
    assert cgpt_attr(rig.disk, 4) == gptprio_bits(2, 1, False)


async def test_mark_good_cuts_a_slow_health_check_short(rig: Rig) -> None:
    rig.publish("2.0.0")
    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT
    rig.boot()

    slow = [{"command": ["sleep", "60"], "timeout_seconds": 120}]
    agent = rig.agent(health=slow)
    await agent.start()
    checking = asyncio.Event()
    agent.subscribe(lambda s: checking.set() if s.phase is Phase.BOOT_HEALTH_CHECK else None)
    runner = asyncio.create_task(agent.run())
    await asyncio.wait_for(checking.wait(), 10)
    assert agent.status().current_operation == "UPDATE_STATUS_IDLE"  # update_engine's view of our phase
    assert await agent.mark_good() == "B"
    idle = asyncio.Event()
    agent.subscribe(lambda s: idle.set() if s.phase is Phase.IDLE else None)
    await asyncio.wait_for(idle.wait(), 10)
    agent.stop()
    await asyncio.wait_for(runner, 10)
    assert agent.state.last_boot_outcome == "success"
    assert agent.state.history[-1].details["how"] == "manual"
    assert cgpt_attr(rig.disk, 4) == gptprio_bits(2, 0, True)


async def test_reboot_strategy_reboot_power_cycles_the_emulated_host(rig: Rig) -> None:
    rig.publish("2.0.0")
    host = rig.host()
    agent = build_agent(rig.settings(extra='[reboot]\nstrategy = "reboot"\n'), host=host)
    await agent.start()
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT
    # The coordinator reboots from its own task (docs/coordinator.md), right after the request.
    async with asyncio.timeout(30):
        await host.rebooted.wait()
    assert host.reboots == 1
    assert host.booted().label == "USR-B"
    await agent.reboot_strategy.close()


async def test_booted_partition_not_on_the_disk_is_reported(rig: Rig, tmp_path: Path) -> None:
    foreign = make_disk(tmp_path / "other.img", slot_size=rig.slot_size)  # same layout, its own GUIDs
    EmulatedBootloader(foreign, rig.record).boot()  # the machine booted from another disk
    agent: Agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled() is Phase.IDLE
    assert "is neither slot of" in agent.state.last_error
    assert agent.errors == 1
    assert await agent.run_until_settled(check=True) is Phase.IDLE  # no crash, a clear error again
    assert agent.errors == 2


async def test_corrupt_state_file_is_moved_aside(rig: Rig) -> None:
    rig.state_dir.mkdir(parents=True)
    (rig.state_dir / "state.json").write_text("{not json")
    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled() is Phase.IDLE
    assert agent.state.history[0].event == "state_reset"
    assert list(rig.state_dir.glob("state.json.corrupt-*"))
