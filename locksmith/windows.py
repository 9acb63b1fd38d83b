"""Maintenance windows: when a node may take the reboot lock.

A policy carries a list of windows and one time zone. Each window is a set of start instants
plus an elapsed-time length. Three input forms are accepted and normalised into a canonical
one (see docs/windows.md):

* canonical ``{"days": ["Sat", "Sun"], "start": "23:30", "length": "1h"}`` (days may be
  ``"daily"``; without ``days`` the window is daily),
* locksmith's ``{"start": "Thu 04:00", "length": "1h30m"}`` (weekly) or ``"04:00"`` (daily),
* cron ``{"cron": "30 23 * * 6,0", "length": "1h"}`` (standard five fields, Sunday = 0 or 7).

The calendar arithmetic (which wall-clock minutes a window starts at) is done by APScheduler 3.x
``CronTrigger`` objects running in a DST-free "wall clock" space; each wall-clock start is then
mapped to a real instant in the policy's zone with one fixed rule (``fold=0``), which makes the
daylight-saving behaviour a single, documented choice instead of whatever the scheduler does.
"""

from __future__ import annotations

import calendar
import io
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

from locksmith.errors import InvalidArgumentError
from locksmith.files import InputFileError, read_bytes

__all__ = [
    "DAY_NAMES",
    "MAX_CRON_STARTS_PER_DAY",
    "MAX_LENGTH",
    "MAX_STARTS_PER_WEEK",
    "MAX_WINDOWS",
    "NEVER_CLOSES",
    "OPEN_HORIZON",
    "UNBOUNDED",
    "CronWindow",
    "DurationError",
    "WeeklyWindow",
    "Window",
    "WindowError",
    "WindowSet",
    "format_duration",
    "parse_duration",
    "parse_windows",
    "resolve_time_zone",
    "weekly_starts",
]

DAY_NAMES: tuple[str, ...] = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MAX_LENGTH = timedelta(days=7)
MAX_CRON_STARTS_PER_DAY = 48
# What a policy may ask the window arithmetic to do (docs/windows.md "Limits"). Query cost grows
# with the number of window starts a week, so that is bounded too: a cron window counts its daily
# starts seven times. At these caps `locksmithctl status` answers in well under a second.
MAX_WINDOWS = 100
MAX_STARTS_PER_WEEK = 1000
# A merged open span reaching this far past the query instant is reported as unbounded. For weekly
# windows in a zone without DST a span is either shorter than a week or endless, so this is exact
# there; elsewhere it keeps the queries bounded in cost.
OPEN_HORIZON = timedelta(days=35)
NEVER_CLOSES: datetime = datetime.max.replace(tzinfo=UTC)
UNBOUNDED: timedelta = timedelta.max

# Wall clock -> instant can move by a DST gap, and instant -> wall clock can step back by a
# fall-back; two days is more than any zone's transition, so enumerating wall-clock starts this
# much beyond a range never misses an instant inside it.
_MARGIN = timedelta(days=2)
_CHUNK = timedelta(days=7)
# Start instants are computed per trigger and wall-clock week and kept: a daemon asks about
# nearly the same instant over and over, and the trigger arithmetic is the expensive part.
_WEEK = timedelta(days=7)
_WEEK0 = datetime(1970, 1, 5, tzinfo=UTC)  # a Monday
_CACHE_LIMIT = 4096  # above MAX_WINDOWS triggers x the weeks one query spans, so no query thrashes it
_MIN_QUERY = datetime(1971, 1, 1, tzinfo=UTC)
_MAX_QUERY = datetime(9990, 1, 1, tzinfo=UTC)
_MAX_ZONE_FILE = 1 << 20  # the largest TZif file in tzdata is a few kB
_ZONEINFO_DIRS = ("/usr/share/zoneinfo/", "/usr/lib/zoneinfo/", "/usr/share/lib/zoneinfo/")


class WindowError(InvalidArgumentError):
    """A window, window list or time zone that cannot be used; ``where`` names the input."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


class DurationError(InvalidArgumentError):
    """A duration that does not parse; ``where`` names the input."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


# --------------------------------------------------------------------------------------------
# Go durations

_NS_PER_UNIT = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 MICRO SIGN
    "μs": 1_000,  # U+03BC GREEK SMALL LETTER MU
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
# [0-9], not \d: \d and int() also take full-width and other scripts' digits ("１h").
_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([a-zµμ]*)")
_GO_MAX_NS = 2**63 - 1


def parse_duration(value: object, *, where: str = "duration") -> timedelta:
    """Parse a Go duration (``"1h30m"``, ``"90m"``, ``"1.5h"``, ``"45s"``, ``"0"``).

    A non-negative ``int`` is taken as seconds (JSON policies may hold plain numbers); a string
    of bare digits is refused as in Go, since ``"30"`` could mean any unit. Negative durations,
    floats, parts finer than a microsecond and values beyond Go's limit (about 2562047h) are
    refused with a :class:`DurationError` naming ``where``.
    """
    if isinstance(value, bool):
        raise DurationError(where, f"expected a duration like '1h30m', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise DurationError(where, f"negative durations are not allowed: {value}")
        if value * 1_000_000_000 > _GO_MAX_NS:
            raise DurationError(where, f"duration {value}s is too large (at most 2562047h)")
        return timedelta(seconds=value)
    if not isinstance(value, str):
        raise DurationError(where, f"expected a duration like '1h30m', got {type(value).__name__} {value!r}")
    text = value.strip()
    if not text:
        raise DurationError(where, "empty duration (write e.g. '1h30m')")
    if text.startswith("-"):
        raise DurationError(where, f"negative durations are not allowed: {value!r}")
    body = text[1:] if text.startswith("+") else text
    if body == "0":
        return timedelta(0)
    if not body:
        raise DurationError(where, f"invalid duration {value!r}")
    total_ns = 0
    pos = 0
    while pos < len(body):
        m = _DURATION_PART.match(body, pos)
        assert m is not None  # every group is optional, so the pattern always matches
        whole, frac, unit = m.group(1), m.group(2), m.group(3)
        if not whole and not frac:
            raise DurationError(where, f"invalid duration {value!r}: expected a number at {body[pos:]!r}")
        if not unit:
            rest = body[m.end() :]
            problem = f"unexpected {rest[0]!r}" if rest else "missing unit (use h, m, s, ms, us or ns)"
            raise DurationError(where, f"invalid duration {value!r}: {problem}")
        if unit not in _NS_PER_UNIT:
            raise DurationError(where, f"invalid duration {value!r}: unknown unit {unit!r} (use h, m, s, ms, us or ns)")
        scale = _NS_PER_UNIT[unit]
        frac = frac or ""
        part_num = int(whole or "0") * 10 ** len(frac) + int(frac or "0")
        part_ns, rest = divmod(part_num * scale, 10 ** len(frac))
        if rest:
            raise DurationError(where, f"duration {value!r} is finer than a nanosecond")
        total_ns += part_ns
        if total_ns > _GO_MAX_NS:
            raise DurationError(where, f"duration {value!r} is too large (at most 2562047h)")
        pos = m.end()
    if total_ns % 1000:
        raise DurationError(where, f"duration {value!r} is finer than a microsecond")
    return timedelta(microseconds=total_ns // 1000)


def format_duration(value: timedelta) -> str:
    """Format like Go but without zero parts: ``1h30m``, ``45s``, ``1.5s``, ``0s``.

    The result always parses back to the same value with :func:`parse_duration` (for
    non-negative values; a negative one is written with a leading ``-``).
    """
    total_us = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    sign = "-" if total_us < 0 else ""
    total_us = abs(total_us)
    if total_us == 0:
        return "0s"
    hours, rem = divmod(total_us, 3_600_000_000)
    minutes, rem = divmod(rem, 60_000_000)
    seconds, micros = divmod(rem, 1_000_000)
    out = sign
    if hours:
        out += f"{hours}h"
    if minutes:
        out += f"{minutes}m"
    if micros:
        out += f"{seconds}.{micros:06d}".rstrip("0") + "s"
    elif seconds:
        out += f"{seconds}s"
    return out


# --------------------------------------------------------------------------------------------
# Time zones


def resolve_time_zone(name: object, *, where: str = "time_zone") -> tzinfo:
    """``"UTC"``, an IANA name, or ``"localtime"`` (this machine's zone: ``$TZ``, else
    ``/etc/localtime``, else UTC). ``None`` means UTC."""
    if name is None:
        return UTC
    if not isinstance(name, str) or not name.strip():
        raise WindowError(where, f"expected a time zone name like 'Europe/Berlin' or 'localtime', got {name!r}")
    if name == "localtime":
        return _local_zone(where)
    if name in ("UTC", "Etc/UTC", "Z"):
        return UTC
    return _zone_by_name(name, where)


def _zone_by_name(name: str, where: str) -> ZoneInfo:
    # ZoneInfo treats names as paths; refuse anything that could escape the zone database.
    if name.startswith("/") or ".." in name.split("/"):
        raise WindowError(where, f"unknown time zone {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise WindowError(where, f"unknown time zone {name!r} (use an IANA name like 'Europe/Berlin')") from None


def _local_zone(where: str) -> tzinfo:
    tz_env = os.environ.get("TZ", "").strip()
    if tz_env:
        name = tz_env.removeprefix(":")
        if name.startswith("/"):
            try:
                return ZoneInfo.from_file(io.BytesIO(read_bytes(name, max_bytes=_MAX_ZONE_FILE, what="zone file")),
                                          key=name)
            except (InputFileError, ValueError):
                raise WindowError(where, f"localtime: TZ={tz_env!r} is not a readable zone file") from None
        if name in ("UTC", "Etc/UTC"):
            return UTC
        try:
            return _zone_by_name(name, where)
        except WindowError:
            pass
        posix = _posix_zone(name)
        if posix is None:
            raise WindowError(
                where, f"localtime: TZ={tz_env!r} is neither a known time zone nor a POSIX TZ string"
            )
        return posix
    path = Path("/etc/localtime")
    if not path.exists():
        return UTC
    target = str(path.resolve())
    for prefix in _ZONEINFO_DIRS:
        if target.startswith(prefix):
            try:
                return ZoneInfo(target[len(prefix) :])
            except (ZoneInfoNotFoundError, ValueError, OSError):
                break
    try:
        return ZoneInfo.from_file(io.BytesIO(read_bytes(path, max_bytes=_MAX_ZONE_FILE, what="zone file")),
                                  key="localtime")
    except (InputFileError, ValueError):
        raise WindowError(where, "localtime: /etc/localtime is not a valid zone file") from None


def _posix_zone(spec: str) -> ZoneInfo | None:
    """A zone for a POSIX TZ string (``CET-1CEST,M3.5.0,M10.5.0/3``, ``JST-9``), or None if it is
    not one. glibc accepts these in $TZ, so hosts may run with one. zoneinfo already implements
    the rules for a TZif file's footer string; a TZif file with no transitions and ``spec`` as its
    footer is exactly that zone at every instant."""
    if not spec.isascii() or len(spec) > 128 or not any(c.isdigit() for c in spec) or "\n" in spec:
        return None
    block = b"TZif2" + bytes(15) + struct.pack(">6l", 0, 0, 0, 0, 1, 2) + struct.pack(">lBB", 0, 0, 0) + b"X\0"
    data = block + block + b"\n" + spec.encode("ascii") + b"\n"
    try:
        return ZoneInfo.from_file(io.BytesIO(data), key=spec)
    except (ValueError, OverflowError):
        return None


# --------------------------------------------------------------------------------------------
# Window forms

_DAY_LOOKUP: dict[str, int] = {}
for _i, _name in enumerate(DAY_NAMES):
    _DAY_LOOKUP[_name.lower()] = _i
    _DAY_LOOKUP[calendar.day_name[_i].lower()] = _i
_ALL_DAYS_WORDS = frozenset({"daily", "all", "*"})
_HHMM = re.compile(r"^([0-9]{1,2}):([0-9]{2})$")
_DAY_HHMM = re.compile(r"^([A-Za-z]+)\s+(\S+)$")


@dataclass(frozen=True, slots=True)
class WeeklyWindow:
    """Opens at ``hour:minute`` wall-clock time on each of ``days`` (0 = Monday) for ``length``."""

    days: frozenset[int]
    hour: int
    minute: int
    length: timedelta

    @property
    def start(self) -> str:
        return f"{self.hour:02d}:{self.minute:02d}"

    def to_json(self) -> dict[str, Any]:
        return {
            "days": [DAY_NAMES[d] for d in sorted(self.days)],
            "start": self.start,
            "length": format_duration(self.length),
        }

    def _triggers(self) -> list[CronTrigger]:
        dow = ",".join(DAY_NAMES[d].lower() for d in sorted(self.days))
        return [CronTrigger(day_of_week=dow, hour=self.hour, minute=self.minute, second=0, timezone=UTC)]


@dataclass(frozen=True, slots=True)
class CronWindow:
    """Opens at every minute a five-field cron expression matches (only kept in this form when
    it restricts day-of-month or month; otherwise it is normalised into weekly windows)."""

    expr: str
    length: timedelta

    def to_json(self) -> dict[str, Any]:
        return {"cron": self.expr, "length": format_duration(self.length)}

    def _triggers(self) -> list[CronTrigger]:
        return _parse_cron(self.expr, "cron").triggers()


Window = WeeklyWindow | CronWindow


def _parse_length(value: object, where: str) -> timedelta:
    try:
        length = parse_duration(value, where=where)
    except DurationError as exc:
        raise WindowError(exc.where, exc.problem) from None
    if length <= timedelta(0):
        raise WindowError(where, f"window length must be positive, got {format_duration(length)}")
    if length > MAX_LENGTH:
        raise WindowError(
            where,
            f"window length {format_duration(length)} is longer than 7 days (168h); "
            "a 7-day window already covers the whole week (an empty window list means always open)",
        )
    if length.microseconds:
        raise WindowError(where, f"window length {format_duration(length)} must be a whole number of seconds")
    return length


def _parse_day(value: object, where: str) -> int:
    if isinstance(value, str) and value.strip().lower() in _DAY_LOOKUP:
        return _DAY_LOOKUP[value.strip().lower()]
    raise WindowError(where, f"unknown day {value!r} (use {', '.join(DAY_NAMES)} or 'daily')")


def _parse_days(value: object, where: str) -> frozenset[int]:
    if isinstance(value, str):
        if value.strip().lower() in _ALL_DAYS_WORDS:
            return frozenset(range(7))
        return frozenset({_parse_day(value, where)})
    if isinstance(value, list | tuple):
        if not value:
            raise WindowError(where, "days is empty (list day names, or write 'daily')")
        out: set[int] = set()
        for i, item in enumerate(value):
            if isinstance(item, str) and item.strip().lower() in _ALL_DAYS_WORDS:
                out.update(range(7))
            else:
                out.add(_parse_day(item, f"{where}[{i}]"))
        return frozenset(out)
    raise WindowError(where, f"days must be a list of day names or 'daily', got {value!r}")


def _parse_hhmm(value: str, where: str, original: object) -> tuple[int, int]:
    m = _HHMM.match(value)
    if not m:
        raise WindowError(where, f"invalid start time {original!r} (expected HH:MM, e.g. '04:00')")
    hour, minute = int(m.group(1)), int(m.group(2))
    if hour > 23 or minute > 59:
        raise WindowError(where, f"invalid start time {original!r}: hours run 00-23 and minutes 00-59")
    return hour, minute


def _parse_start(value: object, where: str, *, days_given: bool) -> tuple[frozenset[int] | None, int, int]:
    if not isinstance(value, str):
        raise WindowError(where, f"start must be a string like '04:00' or 'Thu 04:00', got {value!r}")
    text = value.strip()
    m = _DAY_HHMM.match(text)
    if m:
        if days_given:
            raise WindowError(where, f"start {value!r} names a day and 'days' is also given; use one of them")
        day = _parse_day(m.group(1), where)
        hour, minute = _parse_hhmm(m.group(2), where, value)
        return frozenset({day}), hour, minute
    hour, minute = _parse_hhmm(text, where, value)
    return None, hour, minute


def _parse_window(raw: object, where: str) -> list[Window]:
    if not isinstance(raw, Mapping):
        raise WindowError(where, f"a window must be an object with start/length or cron/length, got {raw!r}")
    allowed = ("days", "start", "length", "cron")
    for key in raw:
        if key not in allowed:
            raise WindowError(where, f"unknown key {key!r} (allowed: {', '.join(allowed)})")
    if "length" not in raw:
        raise WindowError(where, "missing 'length' (a duration like '1h30m')")
    length = _parse_length(raw["length"], f"{where}.length")
    if "cron" in raw:
        for key in ("days", "start"):
            if key in raw:
                raise WindowError(where, f"'cron' and '{key}' cannot be combined; use one form")
        return _parse_cron(raw["cron"], f"{where}.cron").windows(length)
    if "start" not in raw:
        raise WindowError(where, "missing 'start' (e.g. '04:00' or 'Thu 04:00') or 'cron'")
    days = _parse_days(raw["days"], f"{where}.days") if "days" in raw else None
    start_days, hour, minute = _parse_start(raw["start"], f"{where}.start", days_given=days is not None)
    return [WeeklyWindow(days or start_days or frozenset(range(7)), hour, minute, length)]


# --------------------------------------------------------------------------------------------
# Cron


@dataclass(frozen=True)
class _CronField:
    name: str
    lo: int
    hi: int
    names: tuple[str, ...] = ()
    name_base: int = 0


_CRON_FIELDS = (
    _CronField("minute", 0, 59),
    _CronField("hour", 0, 23),
    _CronField("day-of-month", 1, 31),
    _CronField("month", 1, 12, tuple(m.lower() for m in calendar.month_abbr[1:]), 1),
    _CronField("day-of-week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat"), 0),
)
_CRON_ITEM = re.compile(r"^(?:(\*)|([0-9a-z]+)(?:-([0-9a-z]+))?)(?:/([0-9]+))?$")


def _cron_value(text: str, field: _CronField, where: str) -> int:
    if text.isascii() and text.isdigit():
        value = int(text)
    elif text in field.names:
        value = field.names.index(text) + field.name_base
    else:
        raise WindowError(where, f"{field.name} field: {text!r} is not a number or a {field.name} name")
    if not field.lo <= value <= field.hi:
        raise WindowError(where, f"{field.name} field: {value} is out of range {field.lo}-{field.hi}")
    return value


def _cron_field(text: str, field: _CronField, where: str) -> frozenset[int]:
    out: set[int] = set()
    for item in text.lower().split(","):
        m = _CRON_ITEM.match(item)
        if not m:
            raise WindowError(where, f"{field.name} field: cannot parse {item!r}")
        star, first, last, step_text = m.groups()
        step = int(step_text) if step_text else 1
        if step < 1:
            raise WindowError(where, f"{field.name} field: step must be at least 1 in {item!r}")
        if star:
            lo, hi = field.lo, field.hi
            if field.name == "day-of-week":
                hi = 6  # 7 is only an alias of Sunday; '*/2' counts from Sunday = 0
        else:
            lo = _cron_value(first, field, where)
            hi = _cron_value(last, field, where) if last else lo
            if last is None and step_text:
                raise WindowError(where, f"{field.name} field: a step needs a range or '*' (e.g. '0-59/{step}')")
            if lo > hi:
                raise WindowError(where, f"{field.name} field: range {item!r} runs backwards")
        out.update(range(lo, hi + 1, step))
    return frozenset(out)


@dataclass(frozen=True)
class _Cron:
    expr: str
    minutes: frozenset[int]
    hours: frozenset[int]
    doms: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Monday, like DAY_NAMES
    dom_star: bool  # the field starts with '*' (cron's rule for combining the two day fields)
    dow_star: bool
    weekly: bool  # day-of-month and month are plain '*': expressible as weekly windows

    def triggers(self) -> list[CronTrigger]:
        common = {
            "month": _csv(self.months),
            "hour": _csv(self.hours),
            "minute": _csv(self.minutes),
            "second": 0,
            "timezone": UTC,
        }
        dow = ",".join(DAY_NAMES[d].lower() for d in sorted(self.weekdays))
        if not self.dom_star and not self.dow_star:
            # Standard cron: when both day fields are restricted, either one matching is enough.
            return [
                CronTrigger(day=_csv(self.doms), day_of_week="*", **common),
                CronTrigger(day="*", day_of_week=dow, **common),
            ]
        return [CronTrigger(day=_csv(self.doms), day_of_week=dow, **common)]

    def windows(self, length: timedelta) -> list[Window]:
        if self.weekly:
            return [
                WeeklyWindow(self.weekdays, hour, minute, length)
                for hour in sorted(self.hours)
                for minute in sorted(self.minutes)
            ]
        return [CronWindow(self.expr, length)]


def _csv(values: Iterable[int]) -> str:
    return ",".join(str(v) for v in sorted(values))


def _parse_cron(value: object, where: str) -> _Cron:
    if not isinstance(value, str):
        raise WindowError(where, f"cron must be a string like '30 23 * * 6,0', got {value!r}")
    fields = value.split()
    if fields and fields[0].startswith("@"):
        raise WindowError(where, f"cron macros like {fields[0]!r} are not supported; write the five fields")
    if len(fields) != 5:
        raise WindowError(
            where,
            f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)} in {value!r}",
        )
    sets = [_cron_field(text, spec, where) for text, spec in zip(fields, _CRON_FIELDS, strict=True)]
    minutes, hours, doms, months, dows = sets
    weekdays = frozenset((d - 1) % 7 for d in dows)  # cron: 0 and 7 are Sunday, 1 is Monday
    starts = len(minutes) * len(hours)
    if starts > MAX_CRON_STARTS_PER_DAY:
        raise WindowError(
            where,
            f"{value!r} starts a window {starts} times a day (at most {MAX_CRON_STARTS_PER_DAY}); "
            "use fewer start times and a longer length",
        )
    cron = _Cron(
        expr=" ".join(fields),
        minutes=minutes,
        hours=hours,
        doms=doms,
        months=months,
        weekdays=weekdays,
        dom_star=fields[2].startswith("*"),
        dow_star=fields[4].startswith("*"),
        weekly=fields[2] == "*" and fields[3] == "*",
    )
    # With both day fields restricted a weekday match alone suffices; otherwise some listed day
    # must exist in some listed month (2000 is a leap year, so 29 Feb counts).
    either_day = not cron.dom_star and not cron.dow_star
    if not either_day and not any(d <= calendar.monthrange(2000, m)[1] for m in months for d in doms):
        raise WindowError(where, f"{value!r} never matches a date (no such day in those months)")
    return cron


# --------------------------------------------------------------------------------------------
# The set and its queries


def _to_wall(t: datetime, tz: tzinfo) -> datetime:
    """The wall-clock reading of instant ``t`` in ``tz``, as a DST-free datetime the triggers use."""
    return t.astimezone(tz).replace(tzinfo=UTC, fold=0)


def _to_instant(wall: datetime, tz: tzinfo) -> datetime:
    """The one instant a wall-clock start means: ``fold=0``, i.e. a time skipped by spring-forward
    uses the offset from before the change (it moves later by the gap) and a repeated time on
    fall-back night is its first occurrence."""
    return wall.replace(tzinfo=tz, fold=0).astimezone(UTC)


def _fires(trigger: CronTrigger, lo: datetime, hi: datetime) -> Iterator[datetime]:
    wall = trigger.get_next_fire_time(None, lo)
    while wall is not None and wall <= hi:
        yield wall
        wall = trigger.get_next_fire_time(None, wall + timedelta(seconds=1))


class WindowSet:
    """A policy's maintenance windows in one time zone. Empty means always open.

    Queries take timezone-aware datetimes and answer in the caller's tzinfo (the unbounded
    sentinel :data:`NEVER_CLOSES` is in UTC); naive datetimes raise ``InvalidArgumentError``.
    """

    __slots__ = ("_cache", "_max_length", "_triggers", "_tz", "_weekly", "time_zone", "windows")

    def __init__(self, windows: Iterable[Window] = (), time_zone: str = "UTC", *, tz_where: str = "time_zone"):
        self.time_zone = time_zone or "UTC"
        self._tz = resolve_time_zone(self.time_zone, where=tz_where)
        self.windows: tuple[Window, ...] = _normalise(windows)
        _check_budget(self.windows)
        # A weekly window's wall-clock starts in a week are plain arithmetic: building and asking a
        # CronTrigger costs a hundred times more, and status at MAX_WINDOWS must stay fast. So a
        # weekly window has no trigger (None) until a query needs one, and ``_weekly`` (parallel
        # to ``_triggers``) holds its (days, hour, minute).
        self._triggers: list[tuple[CronTrigger | None, timedelta]] = []
        self._weekly: list[tuple[tuple[int, ...], int, int] | None] = []
        for w in self.windows:
            if isinstance(w, WeeklyWindow):
                self._triggers.append((None, w.length))
                self._weekly.append((tuple(sorted(w.days)), w.hour, w.minute))
            else:
                for trigger in w._triggers():
                    self._triggers.append((trigger, w.length))
                    self._weekly.append(None)
        self._max_length = max((w.length for w in self.windows), default=timedelta(0))
        self._cache: dict[tuple[int, int], tuple[datetime, ...]] = {}

    # -- construction / serialisation

    @classmethod
    def from_json(cls, doc: object, *, where: str = "windows") -> WindowSet:
        """Inverse of :meth:`to_json`; any accepted window form is read, errors name ``where``."""
        if not isinstance(doc, Mapping):
            raise WindowError(where, f"expected an object with time_zone and windows, got {doc!r}")
        for key in doc:
            if key not in ("time_zone", "windows"):
                raise WindowError(where, f"unknown key {key!r} (allowed: time_zone, windows)")
        return parse_windows(
            doc.get("windows", []),
            doc.get("time_zone", "UTC"),
            where=f"{where}.windows",
            tz_where=f"{where}.time_zone",
        )

    def to_json(self) -> dict[str, Any]:
        """Canonical form: ``{"time_zone": name, "windows": [...]}``, weekly windows first (by
        start, length), each ``{"days", "start", "length"}``; then cron ones ``{"cron", "length"}``."""
        return {"time_zone": self.time_zone, "windows": [w.to_json() for w in self.windows]}

    @property
    def tz(self) -> tzinfo:
        return self._tz

    @property
    def always_open(self) -> bool:
        """True when there are no windows (a full-coverage set is not detected here)."""
        return not self.windows

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WindowSet):
            return NotImplemented
        return self.time_zone == other.time_zone and self.windows == other.windows

    def __hash__(self) -> int:
        return hash((self.time_zone, self.windows))

    def __repr__(self) -> str:
        return f"WindowSet({self.to_json()!r})"

    # -- queries

    def is_open(self, t: datetime) -> bool:
        """Whether some window covers ``t`` (a window is open on ``[start, start + length)``)."""
        t_utc = self._check(t)
        if not self._triggers:
            return True
        return any(s <= t_utc < e for s, e in self._intervals(t_utc - self._max_length, t_utc))

    def current_window_end(self, t: datetime) -> datetime | None:
        """End of the merged open span containing ``t`` (overlapping and abutting windows merge);
        ``None`` if closed at ``t``; :data:`NEVER_CLOSES` if always open or the span still
        runs at ``t + OPEN_HORIZON``."""
        end = self._span_end(self._check(t))
        if end is None or end == NEVER_CLOSES:
            return end
        return end.astimezone(t.tzinfo)

    def next_open(self, t: datetime) -> datetime | None:
        """``t`` itself if open, else the next instant a window opens. ``None`` only if no window
        ever opens again (cannot happen for a valid set before year 9990)."""
        t_utc = self._check(t)
        if not self._triggers or self.is_open(t):
            return t
        # Usually a start lies within the coming week (cached); only sparse cron windows need
        # the triggers asked directly.
        soon = [s for s, _e in self._intervals(t_utc, t_utc + _CHUNK) if s > t_utc]
        if soon:
            return soon[0].astimezone(t.tzinfo)
        best: datetime | None = None
        for index in range(len(self._triggers)):
            s = self._first_start_after(self._trigger(index), t_utc)
            if s is not None and (best is None or s < best):
                best = s
        return None if best is None else best.astimezone(t.tzinfo)

    def remaining(self, t: datetime) -> timedelta:
        """Time until the merged span containing ``t`` closes; ``timedelta(0)`` if closed;
        :data:`UNBOUNDED` (``timedelta.max``) when :meth:`current_window_end` is ``NEVER_CLOSES``."""
        t_utc = self._check(t)
        end = self._span_end(t_utc)
        if end is None:
            return timedelta(0)
        if end == NEVER_CLOSES:
            return UNBOUNDED
        return end - t_utc

    # -- internals

    def _check(self, t: datetime) -> datetime:
        if not isinstance(t, datetime):
            raise InvalidArgumentError(f"window query needs a datetime, got {type(t).__name__}")
        if t.tzinfo is None or t.utcoffset() is None:
            raise InvalidArgumentError(f"window query needs a timezone-aware datetime, got naive {t.isoformat()}")
        t_utc = t.astimezone(UTC)
        if not _MIN_QUERY <= t_utc <= _MAX_QUERY:
            raise InvalidArgumentError(f"window query instant {t.isoformat()} is outside years 1971-9989")
        return t_utc

    def _intervals(self, lo: datetime, hi: datetime) -> list[tuple[datetime, datetime]]:
        """Every window occurrence whose start instant lies in ``[lo, hi]``, sorted by start."""
        wall_lo = _to_wall(lo, self._tz) - _MARGIN
        wall_hi = _to_wall(hi, self._tz) + _MARGIN
        first_week = (wall_lo - _WEEK0) // _WEEK
        last_week = (wall_hi - _WEEK0) // _WEEK
        out: list[tuple[datetime, datetime]] = []
        for index, (_trigger, length) in enumerate(self._triggers):
            for week in range(first_week, last_week + 1):
                for start in self._week_starts(index, week):
                    if lo <= start <= hi:
                        out.append((start, start + length))
        out.sort()
        return out

    def _week_starts(self, index: int, week: int) -> tuple[datetime, ...]:
        """Start instants of trigger ``index`` whose wall-clock time falls in wall week ``week``."""
        key = (index, week)
        starts = self._cache.get(key)
        if starts is None:
            wall_lo = _WEEK0 + week * _WEEK
            wall_hi = wall_lo + _WEEK - timedelta(seconds=1)
            weekly = self._weekly[index]
            if weekly is not None:
                days, hour, minute = weekly
                walls: Iterable[datetime] = (wall_lo + timedelta(days=d, hours=hour, minutes=minute) for d in days)
            else:
                walls = _fires(self._trigger(index), wall_lo, wall_hi)
            starts = tuple(_to_instant(wall, self._tz) for wall in walls)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = starts
        return starts

    def _trigger(self, index: int) -> CronTrigger:
        trigger, length = self._triggers[index]
        if trigger is None:
            days, hour, minute = self._weekly[index]  # type: ignore[misc]
            trigger = WeeklyWindow(frozenset(days), hour, minute, length)._triggers()[0]
            self._triggers[index] = (trigger, length)
        return trigger

    def _span_end(self, t: datetime) -> datetime | None:
        if not self._triggers:
            return NEVER_CLOSES
        end = max((e for s, e in self._intervals(t - self._max_length, t) if e > t), default=None)
        if end is None:
            return None
        cap = t + OPEN_HORIZON
        scanned = t  # every start <= scanned has been merged
        # <=: a span ending exactly at the horizon closes there (it is not running at cap).
        while end <= cap:
            hi = min(max(end, scanned + _CHUNK), cap)
            for s, e in self._intervals(scanned, hi):
                if s <= scanned:
                    continue
                if s > end:
                    return end
                end = max(end, e)
            if end <= hi:
                return end
            scanned = hi
        return NEVER_CLOSES

    def _first_start_after(self, trigger: CronTrigger, t: datetime) -> datetime | None:
        wall = trigger.get_next_fire_time(None, _to_wall(t, self._tz) - _MARGIN)
        best: datetime | None = None
        best_wall: datetime | None = None
        while wall is not None:
            if best_wall is not None and wall > best_wall + _MARGIN:
                break
            start = _to_instant(wall, self._tz)
            if start > t and (best is None or start < best):
                best, best_wall = start, wall
            wall = trigger.get_next_fire_time(None, wall + timedelta(seconds=1))
        return best


def weekly_starts(windows: Iterable[Window]) -> int:
    """How many window starts a week ``windows`` have at most (a cron window counts its daily
    starts on every day of the week)."""
    total = 0
    for w in windows:
        if isinstance(w, WeeklyWindow):
            total += len(w.days)
        else:
            cron = _parse_cron(w.expr, "cron")
            total += len(cron.minutes) * len(cron.hours) * 7
    return total


def _check_budget(windows: Sequence[Window], where: str = "windows") -> None:
    starts = weekly_starts(windows)
    if starts > MAX_STARTS_PER_WEEK:
        raise WindowError(
            where,
            f"the windows start {starts} times a week (at most {MAX_STARTS_PER_WEEK}); "
            "merge them into fewer, longer windows",
        )


def _normalise(windows: Iterable[Window]) -> tuple[Window, ...]:
    """Merge weekly windows that share start and length (their days unite) and order them, so
    equal schedules written differently have one canonical form."""
    weekly: dict[tuple[int, int, timedelta], set[int]] = {}
    crons: set[CronWindow] = set()
    for w in windows:
        if isinstance(w, WeeklyWindow):
            if not w.days:
                raise WindowError("windows", "a weekly window needs at least one day")
            weekly.setdefault((w.hour, w.minute, w.length), set()).update(w.days)
        elif isinstance(w, CronWindow):
            crons.add(w)
        else:
            raise TypeError(f"not a window: {w!r}")
    out: list[Window] = [
        WeeklyWindow(frozenset(days), hour, minute, length) for (hour, minute, length), days in sorted(weekly.items())
    ]
    out.extend(sorted(crons, key=lambda c: (c.expr, c.length)))
    return tuple(out)


def parse_windows(
    raw: object,
    time_zone: object = "UTC",
    *,
    where: str = "windows",
    tz_where: str = "time_zone",
) -> WindowSet:
    """Build the canonical :class:`WindowSet` from a policy's raw ``windows`` list.

    ``raw`` is ``None`` or a list whose items are in any of the three forms; ``time_zone`` is
    ``None`` (UTC), ``"UTC"``, an IANA name or ``"localtime"``. Errors are :class:`WindowError`
    with ``where`` like ``windows[2].start`` or ``time_zone``.
    """
    if time_zone is None:
        time_zone = "UTC"
    if not isinstance(time_zone, str):
        raise WindowError(tz_where, f"expected a time zone name like 'Europe/Berlin', got {time_zone!r}")
    resolve_time_zone(time_zone, where=tz_where)
    if raw is None:
        raw = []
    if not isinstance(raw, Sequence) or isinstance(raw, str | bytes):
        raise WindowError(where, f"expected a list of windows, got {_short_repr(raw)}")
    if len(raw) > MAX_WINDOWS:
        raise WindowError(where, f"{len(raw)} windows; at most {MAX_WINDOWS} are allowed")
    parsed: list[Window] = []
    for i, item in enumerate(raw):
        parsed.extend(_parse_window(item, f"{where}[{i}]"))
    return WindowSet(parsed, time_zone, tz_where=tz_where)


def _short_repr(value: object, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: error messages quote input, never all of it."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
