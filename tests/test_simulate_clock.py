"""The simulator's virtual clock and its argument parsers (no etcd needed)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from locksmith.errors import InvalidArgumentError
from rollout.cli import parse_distribution
from rollout.clock import Pacer, VirtualClock

START = datetime(2026, 3, 23, 12, 0, tzinfo=UTC)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(min_value=1.0, max_value=7 * 86400.0), min_size=1, max_size=12),
       st.sets(st.integers(min_value=0, max_value=11)))
def test_jumps_fire_sleepers_in_order_never_early(delays: list[float], cancelled: set[int]) -> None:
    async def scenario() -> list[tuple[float, float]]:
        clock = VirtualClock(START, rate=1.0)
        fired: list[tuple[float, float]] = []

        async def sleeper(d: float) -> None:
            await clock.sleep(d)
            fired.append((d, clock.elapsed()))

        tasks = [asyncio.ensure_future(sleeper(d)) for d in delays]
        await asyncio.sleep(0)
        for i in cancelled:
            if i < len(tasks):
                tasks[i].cancel()
        await asyncio.sleep(0)
        while (deadline := clock.next_deadline()) is not None:
            before = clock.elapsed()
            assert clock.jump_to(deadline) >= 0 and clock.elapsed() >= before  # never backwards
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks, return_exceptions=True)
        return fired

    fired = asyncio.run(scenario())
    live = sorted(d for i, d in enumerate(delays) if i not in cancelled)
    assert sorted(d for d, _ in fired) == live  # every live sleeper fired, no cancelled one
    for d, at in fired:
        assert at >= d - 1e-6  # never early
    assert [d for d, _ in fired] == sorted(d for d, _ in fired)  # in deadline order


async def test_time_flows_at_the_rate_and_the_pacer_jumps_only_when_parked() -> None:
    clock = VirtualClock(START, rate=100.0)
    parked = [False]
    pacer = asyncio.ensure_future(Pacer(clock, lambda: parked[0], settle=0.005, poll=0.001).run())
    try:
        sleeper = asyncio.ensure_future(clock.sleep(3600.0))
        await asyncio.sleep(0.05)
        assert not sleeper.done() and clock.jumps == 0
        assert 2.0 < clock.elapsed() < 3600.0  # flowing at 100 virtual s per real s
        parked[0] = True
        await asyncio.wait_for(sleeper, 20)  # the jump fires it long before 36 real seconds
        assert clock.jumps >= 1
        assert clock.jumped > 3000.0  # most of the hour was skipped, not waited for
        assert clock.elapsed() >= 3600.0
    finally:
        pacer.cancel()


async def test_with_activity_the_pacer_looks_at_the_fleet_once_per_change() -> None:
    """The parked test looks at every host: while nothing happens it is not repeated during the
    settle period (50 polls here); after a change it is, and a fleet that is busy again is not
    jumped over."""
    clock = VirtualClock(START, rate=1.0)
    parked, activity, looks = [True], [0], [0]

    def look() -> bool:
        looks[0] += 1
        return parked[0]

    async def sleeper() -> int:
        await clock.sleep(3600.0)
        return looks[0]  # runs before the pacer's next poll: the looks that led to the jump

    pacer = asyncio.ensure_future(Pacer(clock, look, settle=0.05, poll=0.001,
                                        activity=lambda: (activity[0], clock.fired)).run())
    try:
        looks_before_jump = await asyncio.wait_for(sleeper(), 20)
        assert clock.jumps == 1 and looks_before_jump == 1
        parked[0] = False
        activity[0] += 1  # a host woke up: the pacer must look again and see it busy
        second = asyncio.ensure_future(sleeper())
        await asyncio.sleep(0.2)  # a window in which no jump may happen (4 settle periods), not a sync
        assert not second.done() and clock.jumps == 1
        parked[0] = True
        activity[0] += 1
        await asyncio.wait_for(second, 20)
        assert clock.jumps == 2
    finally:
        pacer.cancel()


def test_cancelled_sleepers_do_not_pile_up() -> None:
    async def scenario() -> int:
        clock = VirtualClock(START, rate=1.0)
        for _ in range(5000):
            t = asyncio.ensure_future(clock.sleep(3600.0))
            await asyncio.sleep(0)
            t.cancel()
            await asyncio.sleep(0)
        return len(clock._heap)

    assert asyncio.run(scenario()) <= 2100


@pytest.mark.parametrize(("text", "expected"), [
    ("4m", ("fixed", (240.0,))),
    ("fixed:90s", ("fixed", (90.0,))),
    ("uniform:3m,5m", ("uniform", (180.0, 300.0))),
    ("normal:4m,30s", ("normal", (240.0, 30.0))),
    ("lognormal:4m,0.3", ("lognormal", (240.0, 0.3))),
])
def test_reboot_duration_distributions(text: str, expected: tuple[str, tuple[float, ...]]) -> None:
    assert parse_distribution(text) == expected


@pytest.mark.parametrize(("text", "problem"), [
    ("uniform:5m", "uniform takes 2 value(s)"),
    ("uniform:5m,3m", "min <= max"),
    ("fixed:0s", "must be positive"),
    ("lognormal:4m,wide", "sigma 'wide' is not a number"),
    ("soon", "--reboot-duration"),
])
def test_bad_reboot_durations_are_refused_with_the_reason(text: str, problem: str) -> None:
    with pytest.raises(InvalidArgumentError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_distribution(text)
