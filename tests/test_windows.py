"""Maintenance windows: parsers, canonical form, queries, and a brute-force property check.

The property test compares every query with a minute-by-minute reference over zones without
daylight saving (UTC and fixed offsets); tests/test_windows_dst.py covers DST zones.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.cron import CronTrigger
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locksmith.errors import InvalidArgumentError
from locksmith.windows import (
    DAY_NAMES,
    NEVER_CLOSES,
    OPEN_HORIZON,
    UNBOUNDED,
    CronWindow,
    DurationError,
    WeeklyWindow,
    WindowError,
    WindowSet,
    format_duration,
    parse_duration,
    parse_windows,
    resolve_time_zone,
)

MON = datetime(2026, 6, 1, tzinfo=UTC)  # a Monday
H = timedelta(hours=1)
M = timedelta(minutes=1)


def at(day: int, hour: int, minute: int = 0, second: int = 0, tz: Any = UTC) -> datetime:
    """Day 0 is Monday 2026-06-01, in ``tz``."""
    return datetime(2026, 6, 1, hour, minute, second, tzinfo=tz) + timedelta(days=day)


# ---------------------------------------------------------------------------------------------
# durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("90m", timedelta(minutes=90)),
        ("1.5h", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("1h0m0s", H),
        ("0", timedelta(0)),
        ("0s", timedelta(0)),
        ("+5m", timedelta(minutes=5)),
        (".5s", timedelta(milliseconds=500)),
        ("1.s", timedelta(seconds=1)),
        ("300ms", timedelta(milliseconds=300)),
        ("2us", timedelta(microseconds=2)),
        ("2µs", timedelta(microseconds=2)),
        ("2μs", timedelta(microseconds=2)),
        ("1000ns", timedelta(microseconds=1)),
        ("168h", timedelta(days=7)),
        (" 1h ", H),
        (3600, H),
        (0, timedelta(0)),
    ],
)
def test_parse_duration_accepts_go_syntax_and_int_seconds(text: object, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "empty duration"),
        ("30", "missing unit"),
        ("1d", "unknown unit 'd'"),
        ("1h30", "missing unit"),
        ("h", "expected a number"),
        ("1..5h", "unexpected '.'"),
        ("-1h", "negative"),
        (-5, "negative"),
        ("1ns", "finer than a microsecond"),
        ("1.5ns", "finer than a nanosecond"),
        ("3000000h", "too large"),
        (1.5, "got float"),
        (True, "got True"),
        (None, "got NoneType"),
        ("1 h", "unexpected ' '"),
    ],
)
def test_parse_duration_rejects_with_a_located_message(value: object, fragment: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(value, where="policy.timeout")
    assert str(info.value).startswith("policy.timeout: ")
    assert fragment in str(info.value)
    assert info.value.where == "policy.timeout"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(minutes=90), "1h30m"),
        (timedelta(hours=2), "2h"),
        (timedelta(seconds=45), "45s"),
        (timedelta(days=7), "168h"),
        (timedelta(hours=1, seconds=1), "1h1s"),
        (timedelta(milliseconds=1500), "1.5s"),
        (timedelta(microseconds=1), "0.000001s"),
        (-timedelta(minutes=5), "-5m"),
    ],
)
def test_format_duration(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


@given(st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=100_000)))
def test_format_then_parse_round_trips(value: timedelta) -> None:
    assert parse_duration(format_duration(value)) == value


# ---------------------------------------------------------------------------------------------
# parsing windows


def test_the_three_forms_normalise_to_one_canonical_set() -> None:
    a = parse_windows([{"days": ["Sat", "Sun"], "start": "23:30", "length": "1h"}], "Europe/Berlin")
    b = parse_windows(
        [{"start": "Sat 23:30", "length": "60m"}, {"start": "sunday 23:30", "length": 3600}], "Europe/Berlin"
    )
    c = parse_windows([{"cron": "30 23 * * 6,0", "length": "1h0m0s"}], "Europe/Berlin")
    d = parse_windows([{"cron": "30 23 * * sat,7", "length": "1h"}], "Europe/Berlin")
    expected = {
        "time_zone": "Europe/Berlin",
        "windows": [{"days": ["Sat", "Sun"], "start": "23:30", "length": "1h"}],
    }
    for ws in (a, b, c, d):
        assert ws.to_json() == expected
    assert a == b == c == d
    assert len({a, b, c, d}) == 1


def test_locksmith_daily_and_weekly_starts() -> None:
    ws = parse_windows([{"start": "04:00", "length": "1h30m"}, {"start": "Thu 4:00", "length": "15m"}])
    assert ws.to_json()["windows"] == [
        {"days": ["Thu"], "start": "04:00", "length": "15m"},
        {"days": list(DAY_NAMES), "start": "04:00", "length": "1h30m"},
    ]


def test_days_spellings() -> None:
    for days in ("daily", "all", "*", ["daily"], ["Mon", "tue", "WEDNESDAY", "thu", "Fri", "sat", "Sun", "mon"]):
        ws = parse_windows([{"days": days, "start": "01:00", "length": "1h"}])
        assert ws.windows == (WeeklyWindow(frozenset(range(7)), 1, 0, H),)
    assert parse_windows([{"days": "Sat", "start": "01:00", "length": "1h"}]).windows[0].days == {5}


def test_cron_that_needs_the_calendar_stays_cron() -> None:
    ws = parse_windows([{"cron": "0  4 1 * *", "length": "2h"}, {"cron": "0 4 * 1-3 mon", "length": "1h"}])
    assert ws.to_json()["windows"] == [
        {"cron": "0 4 * 1-3 mon", "length": "1h"},
        {"cron": "0 4 1 * *", "length": "2h"},
    ]
    assert isinstance(ws.windows[0], CronWindow)


def test_cron_with_several_hours_and_minutes_expands_into_weekly_windows() -> None:
    ws = parse_windows([{"cron": "0,30 2,14 * * 1-5", "length": "30m"}])
    assert [w["start"] for w in ws.to_json()["windows"]] == ["02:00", "02:30", "14:00", "14:30"]
    assert {tuple(w["days"]) for w in ws.to_json()["windows"]} == {("Mon", "Tue", "Wed", "Thu", "Fri")}


def test_apscheduler_from_crontab_numbers_weekdays_from_monday_so_we_translate() -> None:
    # The reason the module parses cron itself: APScheduler 3.x's from_crontab reads weekday 0
    # as Monday, standard cron as Sunday.
    trigger = CronTrigger.from_crontab("0 4 * * 0", timezone=UTC)
    assert trigger.get_next_fire_time(None, MON).weekday() == 0  # Monday: the 3.x quirk
    for sunday in ("0", "7", "sun", "SUN"):
        ws = parse_windows([{"cron": f"0 4 * * {sunday}", "length": "1h"}])
        assert ws.windows[0].days == {6}
        assert ws.next_open(MON) == at(6, 4)
    assert parse_windows([{"cron": "0 4 * * 1", "length": "1h"}]).windows[0].days == {0}
    assert parse_windows([{"cron": "0 4 * * 5-7", "length": "1h"}]).windows[0].days == {4, 5, 6}
    assert parse_windows([{"cron": "0 4 * * */2", "length": "1h"}]).windows[0].days == {6, 1, 3, 5}


def test_cron_day_of_month_or_day_of_week_like_standard_cron() -> None:
    # Both day fields restricted: a match of either is enough (13th of the month OR a Friday).
    ws = parse_windows([{"cron": "0 4 13 * fri", "length": "1h"}])
    t = datetime(2026, 6, 1, tzinfo=UTC)
    opens = []
    for _ in range(6):
        t = ws.next_open(t + timedelta(hours=2))
        opens.append(t.date().isoformat())
    assert opens == ["2026-06-05", "2026-06-12", "2026-06-13", "2026-06-19", "2026-06-26", "2026-07-03"]
    # One of them '*': both must hold (every other day of month that is also a Monday).
    ws = parse_windows([{"cron": "0 4 */10 * mon", "length": "1h"}])
    assert ws.next_open(datetime(2026, 6, 1, tzinfo=UTC)) == datetime(2026, 6, 1, 4, tzinfo=UTC)
    assert ws.next_open(datetime(2026, 6, 1, 6, tzinfo=UTC)) == datetime(2026, 8, 31, 4, tzinfo=UTC)


def test_sparse_cron_next_open_is_found_without_scanning() -> None:
    ws = parse_windows([{"cron": "0 0 29 2 *", "length": "1h"}])
    started = time.perf_counter()
    assert ws.next_open(datetime(2026, 6, 1, tzinfo=UTC)) == datetime(2028, 2, 29, tzinfo=UTC)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("raw", "where", "fragment"),
    [
        ([{"days": ["Sat", "Sunnday"], "start": "01:00", "length": "1h"}], "windows[0].days[1]", "unknown day"),
        ([{"days": [], "start": "01:00", "length": "1h"}], "windows[0].days", "empty"),
        ([{"days": 5, "start": "01:00", "length": "1h"}], "windows[0].days", "list of day names"),
        ([{"start": "25:00", "length": "1h"}], "windows[0].start", "hours run 00-23"),
        ([{"start": "04:60", "length": "1h"}], "windows[0].start", "minutes 00-59"),
        ([{"start": "4", "length": "1h"}], "windows[0].start", "expected HH:MM"),
        ([{"start": "Thx 04:00", "length": "1h"}], "windows[0].start", "unknown day 'Thx'"),
        ([{"days": ["Mon"], "start": "Thu 04:00", "length": "1h"}], "windows[0].start", "also given"),
        ([{"start": 400, "length": "1h"}], "windows[0].start", "must be a string"),
        ([{"start": "04:00", "length": "0s"}], "windows[0].length", "must be positive"),
        ([{"start": "04:00", "length": 0}], "windows[0].length", "must be positive"),
        ([{"start": "04:00", "length": "-1h"}], "windows[0].length", "negative"),
        ([{"start": "04:00", "length": "168h1s"}], "windows[0].length", "longer than 7 days"),
        ([{"start": "04:00", "length": "1.5s"}], "windows[0].length", "whole number of seconds"),
        ([{"start": "04:00", "length": "1hh"}], "windows[0].length", "unknown unit"),
        ([{"start": "04:00"}], "windows[0]", "missing 'length'"),
        ([{"length": "1h"}], "windows[0]", "missing 'start'"),
        ([{"start": "04:00", "length": "1h", "lenght": "2h"}], "windows[0]", "unknown key 'lenght'"),
        ([{"cron": "0 4 * * *", "start": "04:00", "length": "1h"}], "windows[0]", "cannot be combined"),
        (["04:00"], "windows[0]", "must be an object"),
        ({"start": "04:00"}, "windows", "expected a list"),
        ([{"cron": "0 4 * *", "length": "1h"}], "windows[0].cron", "expected 5 fields"),
        ([{"cron": "60 4 * * *", "length": "1h"}], "windows[0].cron", "minute field: 60 is out of range"),
        ([{"cron": "0 24 * * *", "length": "1h"}], "windows[0].cron", "hour field: 24"),
        ([{"cron": "0 4 0 * *", "length": "1h"}], "windows[0].cron", "day-of-month field: 0"),
        ([{"cron": "0 4 * 13 *", "length": "1h"}], "windows[0].cron", "month field: 13"),
        ([{"cron": "0 4 * * 8", "length": "1h"}], "windows[0].cron", "day-of-week field: 8"),
        ([{"cron": "0 4 * * fry", "length": "1h"}], "windows[0].cron", "'fry' is not a number"),
        ([{"cron": "0 4 * * 5-1", "length": "1h"}], "windows[0].cron", "runs backwards"),
        ([{"cron": "0 4/2 * * *", "length": "1h"}], "windows[0].cron", "a step needs a range"),
        ([{"cron": "0 */0 * * *", "length": "1h"}], "windows[0].cron", "step must be at least 1"),
        ([{"cron": "0 4 ? * *", "length": "1h"}], "windows[0].cron", "cannot parse '?'"),
        ([{"cron": "@weekly", "length": "1h"}], "windows[0].cron", "macros"),
        ([{"cron": "*/5 * * * *", "length": "1h"}], "windows[0].cron", "288 times a day"),
        ([{"cron": "0 0 31 4,6 *", "length": "1h"}], "windows[0].cron", "never matches"),
        ([{"cron": 5, "length": "1h"}], "windows[0].cron", "must be a string"),
    ],
)
def test_parse_windows_errors_name_the_input(raw: object, where: str, fragment: str) -> None:
    good = {"start": "01:00", "length": "1h"}
    raw = [good, good, *raw] if isinstance(raw, list) else raw
    where = where.replace("windows[0]", "windows[2]")
    with pytest.raises(WindowError) as info:
        parse_windows(raw, "UTC")
    assert info.value.where == where, str(info.value)
    assert fragment in info.value.problem, str(info.value)
    assert str(info.value) == f"{where}: {info.value.problem}"
    assert isinstance(info.value, InvalidArgumentError)


def test_time_zone_errors() -> None:
    for bad in ("Mars/Olympus", "", "../../etc/passwd", "/etc/localtime", 5):
        with pytest.raises(WindowError) as info:
            parse_windows([], bad, tz_where="policy.time_zone")  # type: ignore[arg-type]
        assert info.value.where == "policy.time_zone"
    assert parse_windows([], None).time_zone == "UTC"


def test_localtime_follows_tz(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    ws = parse_windows([{"start": "04:00", "length": "1h"}], "localtime")
    assert ws.to_json()["time_zone"] == "localtime"
    assert ws.next_open(MON) == datetime(2026, 6, 2, 4, tzinfo=ZoneInfo("Asia/Tokyo"))  # MON is 09:00 there
    monkeypatch.setenv("TZ", "Nowhere/Atall")
    with pytest.raises(WindowError, match="localtime: TZ='Nowhere/Atall'"):
        resolve_time_zone("localtime")
    monkeypatch.setenv("TZ", "UTC")
    assert resolve_time_zone("localtime") is UTC


def test_json_round_trip_and_from_json_errors() -> None:
    ws = parse_windows(
        [
            {"cron": "15 3 1,15 * *", "length": "45m"},
            {"days": ["Sun", "Sat"], "start": "23:30", "length": "1h"},
            {"start": "Thu 04:00", "length": "1h30m"},
        ],
        "America/New_York",
    )
    doc = ws.to_json()
    assert doc == {
        "time_zone": "America/New_York",
        "windows": [
            {"days": ["Thu"], "start": "04:00", "length": "1h30m"},
            {"days": ["Sat", "Sun"], "start": "23:30", "length": "1h"},
            {"cron": "15 3 1,15 * *", "length": "45m"},
        ],
    }
    assert WindowSet.from_json(doc) == ws
    assert WindowSet.from_json(doc).to_json() == doc
    with pytest.raises(WindowError) as info:
        WindowSet.from_json({"time_zone": "UTC", "windows": [{"start": "xx", "length": "1h"}]}, where="policy")
    assert info.value.where == "policy.windows[0].start"
    with pytest.raises(WindowError, match="unknown key 'tz'"):
        WindowSet.from_json({"tz": "UTC", "windows": []})
    with pytest.raises(WindowError) as info:
        WindowSet.from_json({"time_zone": "Nope/Nope", "windows": []}, where="policy")
    assert info.value.where == "policy.time_zone"


# ---------------------------------------------------------------------------------------------
# queries


def test_empty_set_is_always_open() -> None:
    ws = parse_windows([])
    t = at(2, 13, 7)
    assert ws.always_open
    assert ws.is_open(t)
    assert ws.next_open(t) == t
    assert ws.current_window_end(t) == NEVER_CLOSES
    assert ws.remaining(t) == UNBOUNDED == timedelta.max


def test_window_crossing_midnight_and_the_end_of_the_week() -> None:
    ws = parse_windows([{"days": ["Sun"], "start": "23:00", "length": "3h"}])
    assert not ws.is_open(at(6, 22, 59, 59))
    assert ws.next_open(at(6, 22, 59, 59)) == at(6, 23)
    assert ws.is_open(at(6, 23))
    assert ws.is_open(at(7, 1, 59, 59))  # Monday of the next week
    assert not ws.is_open(at(7, 2))
    assert ws.current_window_end(at(7, 0, 30)) == at(7, 2)
    assert ws.remaining(at(7, 0, 30)) == timedelta(minutes=90)
    assert ws.remaining(at(7, 2)) == timedelta(0)
    assert ws.current_window_end(at(7, 2)) is None
    assert ws.next_open(at(7, 2)) == at(13, 23)


def test_overlapping_and_abutting_windows_merge() -> None:
    ws = parse_windows(
        [
            {"start": "Mon 01:00", "length": "2h"},  # 01:00-03:00
            {"start": "Mon 02:00", "length": "2h"},  # overlaps: to 04:00
            {"start": "Mon 04:00", "length": "30m"},  # abuts: to 04:30
            {"start": "Mon 04:31", "length": "1h"},  # a one-minute gap
        ]
    )
    assert ws.current_window_end(at(0, 1, 15)) == at(0, 4, 30)
    assert ws.remaining(at(0, 1)) == timedelta(hours=3, minutes=30)
    assert not ws.is_open(at(0, 4, 30))
    assert ws.next_open(at(0, 4, 30)) == at(0, 4, 31)
    assert ws.current_window_end(at(0, 4, 31)) == at(0, 5, 31)


def test_windows_covering_everything_report_unbounded() -> None:
    ws = parse_windows([{"start": "00:00", "length": "24h"}])
    t = at(3, 12)
    assert ws.is_open(t)
    assert ws.current_window_end(t) == NEVER_CLOSES
    assert ws.remaining(t) == UNBOUNDED
    # All but one hour a week is an ordinary, bounded span.
    ws = parse_windows([{"days": ["Mon"], "start": "01:00", "length": f"{7 * 24 - 1}h"}])
    assert ws.current_window_end(at(3, 12)) == at(7, 0)
    assert not ws.is_open(at(7, 0, 30))


def test_span_of_exactly_the_horizon_ends_there() -> None:
    # Windows on days 1..35 of a month, each a day long: a 35-day span from the 1st. It is not
    # running at t + OPEN_HORIZON, so it is bounded (issue 11, case 8: `<=`, not `<`).
    ws = parse_windows([{"cron": "0 0 1-31 1 *", "length": "24h"}, {"cron": "0 0 1-4 2 *", "length": "24h"}])
    assert ws.current_window_end(datetime(2027, 1, 1, tzinfo=UTC)) == datetime(2027, 2, 5, tzinfo=UTC)
    assert ws.current_window_end(datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) is None
    assert ws.current_window_end(datetime(2027, 1, 1, 0, 0, 1, tzinfo=UTC)) == datetime(2027, 2, 5, tzinfo=UTC)
    assert datetime(2027, 2, 5, tzinfo=UTC) - datetime(2027, 1, 1, tzinfo=UTC) == OPEN_HORIZON


def test_answers_are_in_the_callers_tzinfo_and_naive_times_raise() -> None:
    ws = parse_windows([{"start": "Tue 10:00", "length": "1h"}], "Asia/Kolkata")
    tokyo = ZoneInfo("Asia/Tokyo")
    t = at(1, 9, tz=ZoneInfo("Asia/Kolkata")).astimezone(tokyo)
    opens = ws.next_open(t)
    assert opens is not None and opens.tzinfo is tokyo
    assert opens == at(1, 10, tz=ZoneInfo("Asia/Kolkata"))
    end = ws.current_window_end(opens)
    assert end is not None and end.tzinfo is tokyo and end - opens == H
    for query in (ws.is_open, ws.current_window_end, ws.next_open, ws.remaining):
        with pytest.raises(InvalidArgumentError, match="timezone-aware"):
            query(datetime(2026, 6, 1, 10))


def test_queries_are_cheap() -> None:
    ws = parse_windows(
        [
            {"days": "daily", "start": "00:00", "length": "12h"},
            {"days": "daily", "start": "12:00", "length": "12h"},
            {"cron": "0,30 */2 * * *", "length": "1h"},
        ],
        "Europe/Berlin",
    )
    started = time.perf_counter()
    for i in range(20):
        ws.remaining(MON + timedelta(hours=7 * i))
    per_query = (time.perf_counter() - started) / 20
    assert per_query < 0.25, per_query


# ---------------------------------------------------------------------------------------------
# property test against a brute-force reference (zones without DST)

FIXED_ZONES = ("UTC", "Etc/GMT-5", "Etc/GMT+3", "Asia/Kolkata", "Asia/Kathmandu", "Etc/GMT-14")
DAY = 1440
BEFORE = 8  # days of reference grid before the base Monday
GRID_DAYS = BEFORE + 7 + 36 + 8

# (weekday set with 0 = Monday, hour, minute, length in minutes)
RefWindow = tuple[frozenset[int], int, int, int]


class Reference:
    """Open/closed per wall-clock minute over a grid starting BEFORE days before a Monday.

    In a fixed-offset zone wall-clock minutes and instants differ by a constant, so the grid is
    exact; queries scan it minute by minute (bytearray.find scans in C)."""

    def __init__(self, windows: list[RefWindow]) -> None:
        n = GRID_DAYS * DAY
        self.open = bytearray(b"\x01" * n) if not windows else bytearray(n)
        for days, hour, minute, length in windows:
            for d in range(-BEFORE, GRID_DAYS - BEFORE):
                if d % 7 in days:
                    s = (d + BEFORE) * DAY + hour * 60 + minute
                    e = min(s + length, n)
                    self.open[s:e] = b"\x01" * (e - s)

    def answers(self, t_sec: int) -> tuple[bool, int | None, int | None, int | None]:
        """(is_open, end, next_open, remaining) in seconds from the base; None for unbounded
        end/remaining, or for end/remaining when closed."""
        g = BEFORE * DAY * 60
        i = (g + t_sec) // 60
        if self.open[i]:
            j = self.open.find(0, i)
            end = None if j < 0 else j * 60 - g
            if end is not None and end - t_sec >= OPEN_HORIZON.total_seconds():
                end = None
            return True, end, t_sec, None if end is None else end - t_sec
        j = self.open.find(1, i)
        assert j >= 0
        return False, None, j * 60 - g, 0


@st.composite
def lengths(draw: st.DrawFn) -> int:
    return draw(
        st.one_of(
            st.integers(1, 180),
            st.integers(1, 7 * DAY),
            st.sampled_from([DAY, 7 * DAY, 7 * DAY - 1, 2 * DAY, 12 * 60]),
        )
    )


def _render_length(draw: st.DrawFn, minutes: int) -> object:
    style = draw(st.integers(0, 2))
    if style == 0:
        return f"{minutes}m"
    if style == 1:
        return format_duration(timedelta(minutes=minutes))
    return minutes * 60


@st.composite
def weekly_windows(draw: st.DrawFn) -> tuple[dict[str, Any], list[RefWindow]]:
    days = draw(st.frozensets(st.integers(0, 6), min_size=1))
    hour, minute = draw(st.integers(0, 23)), draw(st.integers(0, 59))
    length = draw(lengths())
    start = f"{hour:02d}:{minute:02d}" if draw(st.booleans()) else f"{hour}:{minute:02d}"
    raw: dict[str, Any] = {"length": _render_length(draw, length)}
    style = draw(st.integers(0, 2))
    if style == 1 and len(days) == 7:
        raw["start"] = start
    elif style == 2 and len(days) == 1:
        (day,) = days
        raw["start"] = f"{draw(st.sampled_from([DAY_NAMES[day], DAY_NAMES[day].upper()]))} {start}"
    else:
        names = [DAY_NAMES[d] if draw(st.booleans()) else DAY_NAMES[d].lower() for d in sorted(days)]
        raw["days"] = draw(st.permutations(names))
        raw["start"] = start
    return raw, [(days, hour, minute, length)]


CRON_DOW_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


@st.composite
def cron_windows(draw: st.DrawFn) -> tuple[dict[str, Any], list[RefWindow]]:
    minutes = draw(st.lists(st.integers(0, 59), min_size=1, max_size=3, unique=True))
    hours = draw(st.lists(st.integers(0, 23), min_size=1, max_size=3, unique=True))
    cron_days = draw(st.lists(st.integers(0, 7), min_size=1, max_size=4, unique=True))
    rendered = [CRON_DOW_NAMES[d % 7] if d < 7 and draw(st.booleans()) else str(d) for d in cron_days]
    dow = "*" if draw(st.integers(0, 5)) == 0 else ",".join(rendered)
    weekdays = frozenset(range(7)) if dow == "*" else frozenset((d - 1) % 7 for d in cron_days)
    length = draw(lengths())
    expr = f"{','.join(map(str, minutes))} {','.join(map(str, hours))} * * {dow}"
    raw = {"cron": expr, "length": _render_length(draw, length)}
    return raw, [(weekdays, h, m, length) for h in hours for m in minutes]


@st.composite
def window_sets(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[RefWindow]]:
    items = draw(st.lists(st.one_of(weekly_windows(), weekly_windows(), cron_windows()), max_size=4))
    raw = [r for r, _ in items]
    ref = [w for _, ws in items for w in ws]
    if ref and draw(st.booleans()):
        # A sibling with the same start and length on other days: normalisation merges the two.
        _days, hour, minute, length = draw(st.sampled_from(ref))
        days = draw(st.frozensets(st.integers(0, 6), min_size=1))
        raw.append(
            {"days": [DAY_NAMES[d] for d in sorted(days)], "start": f"{hour:02d}:{minute:02d}", "length": length * 60}
        )
        ref.append((days, hour, minute, length))
    return raw, ref


@st.composite
def query_offsets(draw: st.DrawFn, ref: list[RefWindow]) -> int:
    """Seconds after the base Monday, within one week; often right at a window edge."""
    if ref and draw(st.booleans()):
        days, hour, minute, length = draw(st.sampled_from(ref))
        day = draw(st.sampled_from(sorted(days)))
        edge = (day * DAY + hour * 60 + minute + draw(st.sampled_from([0, length]))) * 60
        return (edge + draw(st.sampled_from([-1, 0, 0, 1]))) % (7 * DAY * 60)
    return draw(st.integers(0, 7 * DAY * 60 - 1))


def check_against_reference(ws: WindowSet, ref: Reference, base: datetime, t_sec: int) -> None:
    t = base + timedelta(seconds=t_sec)
    is_open, end, nxt, rem = ref.answers(t_sec)
    assert ws.is_open(t) == is_open
    if is_open:
        expected_end = NEVER_CLOSES if end is None else base + timedelta(seconds=end)
        assert ws.current_window_end(t) == expected_end
        assert ws.remaining(t) == (UNBOUNDED if rem is None else timedelta(seconds=rem))
        assert ws.next_open(t) == t
    else:
        assert ws.current_window_end(t) is None
        assert ws.remaining(t) == timedelta(0)
        assert nxt is not None
        assert ws.next_open(t) == base + timedelta(seconds=nxt)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), zone=st.sampled_from(FIXED_ZONES), sets=window_sets())
def test_queries_match_brute_force_in_fixed_offset_zones(
    data: st.DataObject, zone: str, sets: tuple[list[dict[str, Any]], list[RefWindow]]
) -> None:
    raw, ref_windows = sets
    ws = parse_windows(raw, zone)
    ref = Reference(ref_windows)
    tz = resolve_time_zone(zone)
    base = datetime(2026, 6, 1, tzinfo=tz)  # Monday 00:00 local
    for _ in range(2):
        t_sec = data.draw(query_offsets(ref_windows), label="t_sec")
        check_against_reference(ws, ref, base, t_sec)
    # The canonical form is a fixed point and means the same thing.
    again = WindowSet.from_json(ws.to_json())
    assert again == ws and again.to_json() == ws.to_json()


def test_reference_self_check() -> None:
    """The reference itself, on a hand-computed case, so that agreement means something."""
    ref = Reference([(frozenset({6}), 23, 0, 180)])  # Sun 23:00 + 3h
    sun_23 = (6 * DAY + 23 * 60) * 60
    assert ref.answers(sun_23 - 1) == (False, None, sun_23, 0)
    assert ref.answers(sun_23) == (True, sun_23 + 3 * 3600, sun_23, 3 * 3600)
    assert ref.answers(30) == (True, 2 * 3600, 30, 2 * 3600 - 30)  # the previous week's window
    assert Reference([]).answers(5) == (True, None, 5, None)
    assert Reference([(frozenset(range(7)), 0, 0, DAY)]).answers(5)[1] is None
