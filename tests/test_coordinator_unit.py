"""The coordinator's pure parts: when a reboot may start (host and group windows together, with
``min_window_remaining``), the status words, and its record on disk."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fleetrig import StepClock, poll_until
from hypothesis import given, settings
from hypothesis import strategies as st

from locksmith.windows import parse_windows
from updateagent.host import EmulatedHost
from updateagent.strategy import RebootRequest
from updateagent.strategy.coordinator import (
    Coordinator,
    CoordinatorOptions,
    CoordState,
    Record,
    _human,
    _ordinal,
    _window_check,
    next_opening,
)
from updateagent.strategy.immediate import LocalSlot

SAT_0100 = datetime(2026, 11, 28, 1, 0, tzinfo=UTC)
DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


def test_ordinals_and_durations_read_as_words() -> None:
    assert [_ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st", "111th"]
    assert [_human(timedelta(seconds=s)) for s in (0, 59, 60, 3 * 3600 + 12 * 60, 7 * 86400 - 60)] == [
        "0s", "59s", "1m", "3h12m", "6d23h"]


def test_both_windows_must_be_open_with_enough_left() -> None:
    group = parse_windows([{"start": "02:00", "length": "2h"}], "UTC")
    # The host's locksmith window, in Berlin time (UTC+1 in November): 03:30-04:30 local.
    host = parse_windows([{"start": "03:30", "length": "1h"}], "Europe/Berlin")
    opens = next_opening(SAT_0100, [group, host], timedelta(minutes=15))
    assert opens == datetime(2026, 11, 28, 2, 30, tzinfo=UTC)
    ok, until = _window_check(opens, [group, host], timedelta(minutes=15))
    assert ok and until == datetime(2026, 11, 28, 3, 15, tzinfo=UTC)
    assert not _window_check(until, [group, host], timedelta(minutes=15))[0]
    assert next_opening(SAT_0100, [], timedelta(0)) == SAT_0100  # no windows: always open


quarter_hours = st.integers(0, 95).map(lambda q: f"{q // 4:02d}:{q % 4 * 15:02d}")
lengths = st.integers(1, 16).map(lambda q: f"{q * 15}m")
window = st.fixed_dictionaries({"days": st.lists(st.sampled_from(DAYS), min_size=1, max_size=3, unique=True),
                                "start": quarter_hours, "length": lengths})


@settings(max_examples=40, deadline=None)
@given(group=st.lists(window, min_size=1, max_size=2), host=st.lists(window, max_size=2),
       min_q=st.integers(0, 3), offset_q=st.integers(0, 7 * 96))
def test_next_opening_is_the_first_quarter_hour_that_works(group: list[dict[str, object]],
                                                          host: list[dict[str, object]], min_q: int,
                                                          offset_q: int) -> None:
    sets = [parse_windows(group, "UTC")] + ([parse_windows(host, "UTC")] if host else [])
    min_remaining = timedelta(minutes=15 * min_q)
    now = SAT_0100 + timedelta(minutes=15 * offset_q)
    found = next_opening(now, sets, min_remaining)
    # Every window edge is on a quarter hour, so checking those instants is exhaustive.
    t = now
    while t < now + timedelta(days=15) and not _window_check(t, sets, min_remaining)[0]:
        t += timedelta(minutes=15)
    expected = t if _window_check(t, sets, min_remaining)[0] else None
    assert found == expected


def test_record_round_trips_and_a_corrupt_file_starts_over(tmp_path: Path) -> None:
    rec = Record(state=CoordState.QUEUED, since="2026-11-28T01:00:00+00:00", cause="window open",
                 request={"reason": "update", "version": "2.0.0", "slot": "B"})
    assert Record.from_json(json.loads(json.dumps(rec.to_json()))) == rec
    with pytest.raises(ValueError):
        Record.from_json({"format_version": 2})
    with pytest.raises(ValueError):
        Record.from_json({"format_version": 1, "state": "dancing"})


class _Host(EmulatedHost):
    """An emulated host whose reboot only counts (these tests have no disk)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp / "disk.img", tmp / "boot.json")
        self.calls = 0

    def booted(self):  # type: ignore[no-untyped-def]
        from updateagent.host import BootInfo

        return BootInfo(partuuid="0" * 8 + "-0000-0000-0000-" + "0" * 12, boot_id="boot-1")

    async def reboot(self) -> None:
        self.calls += 1


async def test_a_corrupt_coordinator_file_is_reported_and_the_coordinator_starts_idle(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.json"
    path.write_text('{"format_version": 1, "state": "rebooting", "since": 12')
    c = Coordinator(LocalSlot(), _Host(tmp_path), CoordinatorOptions(reboot_required_file=None), state_path=path)
    await c.start()
    try:
        assert c.state is CoordState.IDLE and c.status_text() == "idle: no reboot needed"
    finally:
        await c.close()


async def test_the_reboot_strategy_waits_for_the_hosts_window(tmp_path: Path) -> None:
    """strategy ``reboot`` with a host window: no queue, but never outside the window."""
    clock = StepClock(SAT_0100)
    host = _Host(tmp_path)
    window = parse_windows([{"start": "Sun 03:00", "length": "1h"}], "Europe/Berlin")
    c = Coordinator(LocalSlot(clock=clock), host, CoordinatorOptions(local_window=window, reboot_required_file=None),
                    state_path=tmp_path / "coordinator.json", clock=clock)
    await c.start()
    try:
        await c.reboot_needed(RebootRequest("update", "2.0.0", "B"))
        await _until(lambda: c.status_text() == "waiting for window: opens Sun 03:00 Europe/Berlin (in 1d1h)")
        saved = json.loads((tmp_path / "coordinator.json").read_text())
        assert saved["state"] == "waiting_for_window" and saved["request"]["version"] == "2.0.0"
        clock.set(datetime(2026, 11, 29, 1, 59, tzinfo=UTC))  # 02:59 in Berlin
        await _until(lambda: c.status_text().startswith("waiting for window: opens Sun 03:00"))
        assert host.calls == 0
        clock.advance(60)
        await _until(lambda: host.calls == 1)
        assert c.state is CoordState.REBOOTING and c.describe()["strategy"] == "reboot"
    finally:
        await c.close()


async def _until(pred) -> None:  # type: ignore[no-untyped-def]
    await poll_until(pred, within=10, every=0.005)


# ------------------------------------------------------------------------------- the machine, at random

action = st.one_of(
    st.tuples(st.just("request"), st.sampled_from(["2.0.0", "3.0.0"])),
    st.tuples(st.just("advance"), st.integers(1, 600)),
    st.tuples(st.just("restart"), st.just(0)),
    st.tuples(st.just("boot"), st.sampled_from(["success", "rolled_back", "health_check_failed"])),
)


@settings(max_examples=60, deadline=None)
@given(windows=st.lists(window, min_size=1, max_size=2), program=st.lists(action, max_size=25))
def test_random_requests_restarts_and_boots_never_reboot_outside_the_window(
        tmp_path_factory: pytest.TempPathFactory, windows: list[dict[str, object]],
        program: list[tuple[str, object]]) -> None:
    """Whatever happens in whatever order (agent restarts, boots with any verdict, time passing),
    a reboot starts only inside the host's window, and never twice for one request."""
    tmp = tmp_path_factory.mktemp("sm")
    asyncio.run(_run_program(tmp, parse_windows(windows, "UTC"), program))


async def _run_program(tmp: Path, ws: object, program: list[tuple[str, object]]) -> None:
    clock = StepClock(SAT_0100)
    host = _Host(tmp)
    boot = [1]
    reboot_times: list[datetime] = []
    requests = 0

    since_boot = [0]

    async def counting_reboot() -> None:
        reboot_times.append(clock.now())
        host.calls += 1
        since_boot[0] += 1

    host.reboot = counting_reboot  # type: ignore[method-assign]
    host.booted = lambda: _boot_info(boot[0])  # type: ignore[method-assign]
    options = CoordinatorOptions(local_window=ws, reboot_required_file=None)  # type: ignore[arg-type]

    def make() -> Coordinator:
        return Coordinator(LocalSlot(clock=clock), host, options, state_path=tmp / "coordinator.json", clock=clock)

    async def settle() -> None:
        for _ in range(60):
            await asyncio.sleep(0)

    c = make()
    await c.start()
    try:
        for kind, arg in program:
            if kind == "request":
                requests += 1
                await c.reboot_needed(RebootRequest("update", str(arg), "B"))
            elif kind == "advance":
                clock.advance(int(arg) * 60)  # type: ignore[call-overload]
            elif kind == "restart" and not since_boot[0]:  # after a Reboot call the machine goes down
                await c.close()
                c = make()
                await c.start()
            elif kind == "boot" and host.calls and c.state is CoordState.REBOOTING:
                await c.close()
                boot[0] += 1
                since_boot[0] = 0
                c = make()
                await c.start()
                assert c.state is CoordState.AFTER_BOOT
                if arg == "health_check_failed":
                    await c.reboot_needed(RebootRequest("rollback", "1.0.0", "A"))
                else:
                    await c.boot_settled(str(arg), "2.0.0")
            await settle()
            for t in reboot_times:
                assert ws.is_open(t), f"rebooted at {t} outside the window"  # type: ignore[attr-defined]
            # One Reboot call per boot, however often the agent repeats its request.
            assert since_boot[0] <= 1
            assert host.calls <= requests + sum(1 for k, a in program if a == "health_check_failed")
    finally:
        await c.close()


def _boot_info(n: int):  # type: ignore[no-untyped-def]
    from updateagent.host import BootInfo

    return BootInfo(partuuid="0" * 8 + "-0000-0000-0000-" + "0" * 12, boot_id=f"boot-{n}")
