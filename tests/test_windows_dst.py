"""Maintenance windows across daylight-saving changes.

The rule under test (docs/windows.md): a start time that does not exist on a spring-forward
night opens the window later by the size of the gap (02:30 in Berlin opens at 03:30 CEST); a
start time that happens twice on a fall-back night opens the window once, at the first
occurrence; lengths are elapsed time, not wall-clock time.
"""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.cron import CronTrigger
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locksmith.windows import DAY_NAMES, NEVER_CLOSES, OPEN_HORIZON, UNBOUNDED, WindowSet, parse_windows

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(month: int, day: int, hour: int, minute: int = 0, year: int = 2026) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def daily(start: str, length: str, tz: str) -> WindowSet:
    return parse_windows([{"start": start, "length": length}], tz)


# ---------------------------------------------------------------------------------------------
# the documented rules, night by night


def test_berlin_spring_forward_nonexistent_start_opens_later_by_the_gap() -> None:
    # 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00 UTC); 02:30 does not exist.
    ws = daily("02:30", "1h", "Europe/Berlin")
    assert ws.next_open(utc(3, 29, 0)) == utc(3, 29, 1, 30)  # 03:30 CEST
    assert ws.next_open(utc(3, 29, 0)).astimezone(BERLIN).strftime("%H:%M %Z") == "03:30 CEST"
    assert not ws.is_open(utc(3, 29, 1, 29))
    assert ws.is_open(utc(3, 29, 1, 30))
    assert ws.current_window_end(utc(3, 29, 1, 30)) == utc(3, 29, 2, 30)  # 04:30 CEST: one hour
    # The days either side are ordinary.
    assert ws.next_open(utc(3, 28, 0)) == utc(3, 28, 1, 30)  # 02:30 CET
    assert ws.next_open(utc(3, 30, 0)) == utc(3, 30, 0, 30)  # 02:30 CEST


def test_berlin_start_at_the_edge_of_the_gap() -> None:
    assert daily("02:00", "1h", "Europe/Berlin").next_open(utc(3, 29, 0)) == utc(3, 29, 1)  # 03:00 CEST
    assert daily("03:00", "1h", "Europe/Berlin").next_open(utc(3, 29, 0)) == utc(3, 29, 1)
    assert daily("01:59", "1h", "Europe/Berlin").next_open(utc(3, 29, 0)) == utc(3, 29, 0, 59)


def test_nonexistent_start_can_overtake_a_real_one_and_both_count() -> None:
    # 02:45 (imaginary, opens 03:45 CEST) and 03:15 CEST: the set still opens at 03:15 and the
    # windows merge, though in wall-clock order 02:45 came first.
    ws = parse_windows([{"start": "02:45", "length": "10m"}, {"start": "03:15", "length": "30m"}], "Europe/Berlin")
    assert ws.next_open(utc(3, 29, 0)) == utc(3, 29, 1, 15)
    assert ws.current_window_end(utc(3, 29, 1, 15)) == utc(3, 29, 1, 55)


def test_new_york_spring_forward() -> None:
    # 2026-03-08: 02:00 EST jumps to 03:00 EDT (07:00 UTC).
    ws = daily("02:30", "30m", "America/New_York")
    assert ws.next_open(utc(3, 8, 0)) == utc(3, 8, 7, 30)  # 03:30 EDT
    assert ws.remaining(utc(3, 8, 7, 40)) == timedelta(minutes=20)


def test_berlin_fall_back_ambiguous_start_opens_once_at_the_first_occurrence() -> None:
    # 2026-10-25: 03:00 CEST falls back to 02:00 CET (01:00 UTC); 02:30 happens twice.
    ws = daily("02:30", "1h", "Europe/Berlin")
    assert ws.next_open(utc(10, 24, 23)) == utc(10, 25, 0, 30)  # 02:30 CEST
    assert ws.current_window_end(utc(10, 25, 0, 30)) == utc(10, 25, 1, 30)  # 02:30 CET
    assert not ws.is_open(utc(10, 25, 1, 30))
    assert ws.next_open(utc(10, 25, 1, 30)) == utc(10, 26, 1, 30)  # next day, 02:30 CET
    # APScheduler 3.x on its own would fire twice that night; the module does not follow it.
    trigger = CronTrigger(hour=2, minute=30, timezone=BERLIN)
    first = trigger.get_next_fire_time(None, utc(10, 24, 23).astimezone(BERLIN))
    second = trigger.get_next_fire_time(first, first)
    assert (first.astimezone(UTC), second.astimezone(UTC)) == (utc(10, 25, 0, 30), utc(10, 25, 1, 30))


def test_new_york_fall_back() -> None:
    # 2026-11-01: 02:00 EDT falls back to 01:00 EST (06:00 UTC); 01:30 happens twice.
    ws = daily("01:30", "15m", "America/New_York")
    assert ws.next_open(utc(11, 1, 4)) == utc(11, 1, 5, 30)  # 01:30 EDT
    assert not ws.is_open(utc(11, 1, 6, 30))  # 01:30 EST: no second opening
    assert ws.next_open(utc(11, 1, 6, 30)) == utc(11, 2, 6, 30)


def test_lengths_are_elapsed_time() -> None:
    # 4 h from Saturday 23:00 CEST ends at 02:00 CET on fall-back night: 3 h on the wall clock.
    ws = parse_windows([{"start": "Sat 23:00", "length": "4h"}], "Europe/Berlin")
    end = ws.current_window_end(utc(10, 24, 21))
    assert end == utc(10, 25, 1)
    assert end.astimezone(BERLIN).strftime("%H:%M %Z") == "02:00 CET"
    # Across spring-forward 4 h from Saturday 23:00 CET ends at 04:00 CEST: 5 h on the wall.
    ws = parse_windows([{"start": "Sat 23:00", "length": "4h"}], "Europe/Berlin")
    assert ws.current_window_end(utc(3, 28, 22)) == utc(3, 29, 2)


def test_day_long_windows_leave_an_hour_open_to_fall_back() -> None:
    # Daily 00:00 + 24h: the 25-hour fall-back day leaves 23:00-24:00 CET closed; the 23-hour
    # spring day overlaps by an hour and stays open.
    ws = daily("00:00", "24h", "Europe/Berlin")
    assert ws.current_window_end(utc(10, 1, 12)) == utc(10, 25, 22)  # Sun 23:00 CET
    assert not ws.is_open(utc(10, 25, 22, 30))
    assert ws.next_open(utc(10, 25, 22, 30)) == utc(10, 25, 23)  # Mon 00:00 CET
    assert ws.is_open(utc(3, 29, 21, 30))  # spring day, 23:30 CEST
    # The next gap is the following October: beyond OPEN_HORIZON, so reported as unbounded.
    assert ws.current_window_end(utc(3, 1, 12)) == NEVER_CLOSES
    assert ws.remaining(utc(3, 1, 12)) == UNBOUNDED


def test_windows_in_the_dst_zone_follow_wall_clock_across_the_change() -> None:
    # A weekly Monday 09:00 window keeps its local time: 07:00 UTC before, 08:00 UTC after.
    ws = parse_windows([{"start": "Mon 09:00", "length": "1h"}], "Europe/Berlin")
    assert ws.next_open(utc(10, 19, 0)) == utc(10, 19, 7)
    assert ws.next_open(utc(10, 20, 0)) == utc(10, 26, 8)


# ---------------------------------------------------------------------------------------------
# property test against a brute-force reference in DST zones

DST_ZONES = ("Europe/Berlin", "America/New_York", "Australia/Lord_Howe")
BEFORE_DAYS = 11
AFTER_DAYS = 39
MIN = 60


def _offset_min(tz: ZoneInfo, u: int) -> int:
    off = datetime.fromtimestamp(u * MIN, UTC).astimezone(tz).utcoffset()
    assert off is not None
    return int(off.total_seconds()) // MIN


@functools.cache
def transitions(zone: str) -> tuple[int, ...]:
    """UTC minutes (hour-aligned, approximate) at which the zone's offset changes in 2026."""
    tz = ZoneInfo(zone)
    start = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp()) // MIN
    out = []
    prev = _offset_min(tz, start)
    for h in range(1, 366 * 24):
        u = start + h * 60
        off = _offset_min(tz, u)
        if off != prev:
            out.append(u)
        prev = off
    assert len(out) == 2, (zone, out)
    return tuple(out)


@functools.cache
def wall_index(zone: str, anchor: int) -> tuple[int, dict[int, int], int]:
    """For the UTC minutes around ``anchor``: grid start, and each local wall-clock minute's
    first UTC minute (brute force, minute by minute), and grid length."""
    tz = ZoneInfo(zone)
    g0 = anchor - BEFORE_DAYS * 1440
    n = (BEFORE_DAYS + AFTER_DAYS) * 1440
    first: dict[int, int] = {}
    for u in range(g0, g0 + n):
        first.setdefault(u + _offset_min(tz, u), u)
    return g0, first, n


# (weekday set with 0 = Monday, hour, minute, length in minutes)
RefWindow = tuple[frozenset[int], int, int, int]


class DstReference:
    """Open/closed per UTC minute; each wall-clock start is placed by brute force: at the first
    UTC minute showing that wall time, or, when no minute shows it (a spring-forward gap), at the
    wall time read with the offset in force just before it."""

    def __init__(self, zone: str, anchor: int, windows: list[RefWindow]) -> None:
        self.g0, first, self.n = wall_index(zone, anchor)
        self.open = bytearray(b"\x01" * self.n) if not windows else bytearray(self.n)
        self.starts: list[tuple[int, int]] = []
        first_wall = min(first)
        last_wall = max(first)
        day0 = first_wall // 1440
        for day in range(day0, last_wall // 1440 + 1):
            weekday = (date(1970, 1, 1) + timedelta(days=day)).weekday()
            for days, hour, minute, length in windows:
                if weekday not in days:
                    continue
                wall = day * 1440 + hour * 60 + minute
                if not first_wall + 1440 <= wall <= last_wall - 1440:
                    continue
                if wall in first:
                    u = first[wall]
                else:
                    before = wall - 1
                    while before not in first:
                        before -= 1
                    u = wall - (before - first[before])
                s = u - self.g0
                e = min(s + length, self.n)
                if s < 0 or s >= self.n:
                    continue
                self.open[s:e] = b"\x01" * (e - s)
                self.starts.append((s, length))

    def answers(self, t_sec: int) -> tuple[bool, int | None, int, int | None]:
        """As in test_windows.Reference, with seconds counted from the grid start."""
        i = t_sec // 60
        if self.open[i]:
            j = self.open.find(0, i)
            end = None if j < 0 else j * 60
            if end is not None and end - t_sec >= OPEN_HORIZON.total_seconds():
                end = None
            return True, end, t_sec, None if end is None else end - t_sec
        j = self.open.find(1, i)
        assert j >= 0
        return False, None, j * 60, 0


@st.composite
def dst_windows(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[RefWindow]]:
    raw: list[dict[str, Any]] = []
    ref: list[RefWindow] = []
    for _ in range(draw(st.integers(0, 4))):
        days = draw(st.frozensets(st.integers(0, 6), min_size=1))
        # Starts cluster in the small hours, where the changes happen.
        hour = draw(st.one_of(st.integers(0, 4), st.integers(0, 23)))
        minute = draw(st.one_of(st.sampled_from([0, 15, 30, 45, 59]), st.integers(0, 59)))
        length = draw(st.one_of(st.integers(1, 240), st.integers(1, 7 * 1440), st.sampled_from([1440, 7 * 1440, 60])))
        if draw(st.integers(0, 3)) == 0:
            cron_days = ",".join(str((d + 1) % 7) for d in sorted(days))
            raw.append({"cron": f"{minute} {hour} * * {cron_days}", "length": f"{length}m"})
        else:
            raw.append(
                {"days": [DAY_NAMES[d] for d in days], "start": f"{hour:02d}:{minute:02d}", "length": f"{length}m"}
            )
        ref.append((days, hour, minute, length))
    return raw, ref


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), zone=st.sampled_from(DST_ZONES), which=st.integers(0, 1), sets=dst_windows())
def test_queries_match_brute_force_across_dst_changes(
    data: st.DataObject, zone: str, which: int, sets: tuple[list[dict[str, Any]], list[RefWindow]]
) -> None:
    raw, ref_windows = sets
    anchor = transitions(zone)[which]
    ws = parse_windows(raw, zone)
    ref = DstReference(zone, anchor, ref_windows)
    base = datetime.fromtimestamp(ref.g0 * MIN, UTC)
    lo, hi = (BEFORE_DAYS - 2) * 1440 * 60, (BEFORE_DAYS + 2) * 1440 * 60
    near = [
        edge * 60 + delta
        for s, length in ref.starts
        for edge in (s, s + length)
        for delta in (-1, 0, 1)
        if lo <= edge * 60 + delta < hi
    ]
    for _ in range(2):
        if near and data.draw(st.booleans(), label="at an edge"):
            t_sec = data.draw(st.sampled_from(near), label="t_sec")
        else:
            t_sec = data.draw(st.integers(lo, hi - 1), label="t_sec")
        t = base + timedelta(seconds=t_sec)
        is_open, end, nxt, rem = ref.answers(t_sec)
        assert ws.is_open(t) == is_open
        if is_open:
            assert ws.current_window_end(t) == (NEVER_CLOSES if end is None else base + timedelta(seconds=end))
            assert ws.remaining(t) == (UNBOUNDED if rem is None else timedelta(seconds=rem))
            assert ws.next_open(t) == t
        else:
            assert ws.current_window_end(t) is None
            assert ws.remaining(t) == timedelta(0)
            assert ws.next_open(t) == base + timedelta(seconds=nxt)


@pytest.mark.parametrize(
    ("zone", "which", "hour", "minute", "opens", "not_at"),
    [
        ("Europe/Berlin", 0, 2, 30, utc(3, 29, 1, 30), utc(3, 29, 0, 30)),
        ("Europe/Berlin", 1, 2, 30, utc(10, 25, 0, 30), utc(10, 25, 1, 30)),
        ("America/New_York", 0, 2, 30, utc(3, 8, 7, 30), utc(3, 8, 6, 30)),
        ("America/New_York", 1, 1, 30, utc(11, 1, 5, 30), utc(11, 1, 6, 30)),
        # Lord Howe moves by 30 minutes: back at 02:00 +11 on 5 April, forward at 02:00 +10:30
        # on 4 October.
        ("Australia/Lord_Howe", 0, 1, 45, utc(4, 4, 14, 45), utc(4, 4, 15, 15)),
        ("Australia/Lord_Howe", 1, 2, 15, utc(10, 3, 15, 45), utc(10, 3, 15, 15)),
    ],
)
def test_dst_reference_places_starts_by_the_rule(
    zone: str, which: int, hour: int, minute: int, opens: datetime, not_at: datetime
) -> None:
    """Hand-computed instants, so that agreeing with the reference means something."""
    ref = DstReference(zone, transitions(zone)[which], [(frozenset(range(7)), hour, minute, 1)])
    starts = {datetime.fromtimestamp((ref.g0 + s) * MIN, UTC) for s, _ in ref.starts}
    assert opens in starts
    assert not_at not in starts
    night = [s for s in starts if abs(s - opens) < timedelta(hours=12)]
    assert night == [opens]
    assert daily(f"{hour:02d}:{minute:02d}", "1m", zone).next_open(opens - timedelta(hours=3)) == opens
