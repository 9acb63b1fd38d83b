"""Invalid policy files: each is refused with every problem named, by key path and line."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from locksmith.policy import PolicyError, Problem, parse_policy_text


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    problems: list[tuple[int | None, str, str]]  # (line, path, message)


HEAD = 'format_version = 1\ngroup = "web"\n'  # lines 1-2 of most cases

CASES = [
    Case("slots-zero", HEAD + "slots = 0\n", [(3, "slots", "must be at least 1, got 0")]),
    Case("slots-negative", HEAD + "slots = -2\n", [(3, "slots", "must be at least 1, got -2")]),
    Case("slots-string", HEAD + 'slots = "2"\n', [(3, "slots", 'must be an integer, got string "2"')]),
    Case("slots-float", HEAD + "slots = 2.0\n", [(3, "slots", "must be an integer, got float 2.0")]),
    Case("slots-bool", HEAD + "slots = true\n", [(3, "slots", "must be an integer, got boolean true")]),
    Case(
        "unknown-key",
        HEAD + "slot = 2\n",
        [(3, "slot", "unknown key 'slot' (did you mean 'slots'?)")],
    ),
    Case(
        "unknown-table",
        HEAD + "[extra]\nx = 1\n",
        [
            (
                3,
                "extra",
                "unknown key 'extra' (allowed: format_version, group, slots, time_zone, windows, "
                "strategy, reboot_timeout, on_timeout, failure_budget, cooldown, min_window_remaining, paused, "
                "paused_reason)",
            )
        ],
    ),
    Case(
        "missing-format-version",
        'group = "web"\nslots = 2\n',
        [(None, "format_version", "required key is missing (add format_version = 1)")],
    ),
    Case(
        "wrong-format-version",
        'format_version = 2\ngroup = "web"\n',
        [(1, "format_version", "unsupported format version 2 (this locksmith reads format_version 1)")],
    ),
    Case(
        "format-version-string",
        'format_version = "1"\n',
        [(1, "format_version", 'must be an integer, got string "1"')],
    ),
    Case(
        "bad-group-name",
        'format_version = 1\ngroup = "web/prod"\n',
        [
            (
                2,
                "group",
                "invalid group name 'web/prod': use 1-63 letters, digits, '.', '_' or '-', starting alphanumeric",
            )
        ],
    ),
    Case(
        "bad-time-zone",
        HEAD + 'time_zone = "Mars/Olympus_Mons"\n',
        [(3, "time_zone", "unknown time zone 'Mars/Olympus_Mons' (use an IANA name like 'Europe/Berlin')")],
    ),
    Case(
        "time-zone-path-escape",
        HEAD + 'time_zone = "../../etc/passwd"\n',
        [(3, "time_zone", "unknown time zone '../../etc/passwd'")],
    ),
    Case(
        "bad-strategy",
        HEAD + 'strategy = "yolo"\n',
        [(3, "strategy", "must be one of 'etcd-lock', 'reboot', 'off', got 'yolo'")],
    ),
    Case(
        "best-effort-strategy",
        HEAD + 'strategy = "best-effort"\n',
        [
            (
                3,
                "strategy",
                "must be one of 'etcd-lock', 'reboot', 'off', got 'best-effort' (best-effort is gone: use etcd-lock)",
            )
        ],
    ),
    Case(
        "bad-on-timeout",
        HEAD + 'on_timeout = "reboot-again"\n',
        [(3, "on_timeout", "must be one of 'hold', 'release', got 'reboot-again'")],
    ),
    Case(
        "failure-budget-negative",
        HEAD + "failure_budget = -1\n",
        [(3, "failure_budget", "must be at least 0, got -1")],
    ),
    Case(
        "negative-duration",
        HEAD + 'cooldown = "-5m"\n',
        [(3, "cooldown", "negative durations are not allowed: '-5m'")],
    ),
    Case(
        "duration-without-unit",
        HEAD + 'reboot_timeout = "30"\n',
        [(3, "reboot_timeout", "invalid duration '30': missing unit (use h, m, s, ms, us or ns)")],
    ),
    Case(
        "duration-as-integer",
        HEAD + "reboot_timeout = 1800\n",
        [(3, "reboot_timeout", "must be a string, got integer 1800")],
    ),
    Case(
        "duration-bad-unit",
        HEAD + 'min_window_remaining = "5d"\n',
        [(3, "min_window_remaining", "invalid duration '5d': unknown unit 'd' (use h, m, s, ms, us or ns)")],
    ),
    Case(
        "duration-sub-second",
        HEAD + 'cooldown = "1.5s"\n',
        [(3, "cooldown", "'1.5s' must be a whole number of seconds")],
    ),
    Case(
        "zero-reboot-timeout",
        HEAD + 'reboot_timeout = "0s"\n',
        [(3, "reboot_timeout", "must be more than zero, got '0s'")],
    ),
    Case(
        "paused-not-boolean",
        HEAD + 'paused = "yes"\n',
        [(3, "paused", 'must be a boolean (true or false), got string "yes"')],
    ),
    Case(
        "paused-reason-without-paused",
        HEAD + 'paused_reason = "disk firmware"\n',
        [(3, "paused_reason", "is only allowed with paused = true")],
    ),
    Case(
        "windows-not-a-list",
        HEAD + 'windows = "Sat 04:00"\n',
        [(3, "windows", 'must be a list, got string "Sat 04:00"')],
    ),
    Case(
        "empty-days",
        HEAD + '\n[[windows]]\ndays = []\nstart = "04:00"\nlength = "1h"\n',
        [(5, "windows[0].days", "must not be empty (list day names, or write 'daily')")],
    ),
    Case(
        "unknown-day",
        HEAD + '\n[[windows]]\ndays = ["Sat", "Caturday"]\nstart = "04:00"\nlength = "1h"\n',
        [(5, "windows[0].days[1]", "unknown day 'Caturday' (use Mon, Tue, Wed, Thu, Fri, Sat, Sun or 'daily')")],
    ),
    Case(
        "start-25-00",
        HEAD + '\n[[windows]]\nstart = "25:00"\nlength = "1h"\n',
        [(5, "windows[0].start", "invalid start time '25:00': hours run 00-23 and minutes 00-59")],
    ),
    Case(
        "start-unquoted-toml-time",
        HEAD + "\n[[windows]]\nstart = 04:00:00\nlength = '1h'\n",
        [(5, "windows[0].start", "must be a string, got time 04:00:00 (quote it)")],
    ),
    Case(
        "start-without-colon",
        HEAD + '\n[[windows]]\nstart = "Thu 4am"\nlength = "1h"\n',
        [(5, "windows[0].start", "invalid start time 'Thu 4am' (expected HH:MM, e.g. '04:00')")],
    ),
    Case(
        "zero-length",
        HEAD + '\n[[windows]]\nstart = "04:00"\nlength = "0s"\n',
        [(6, "windows[0].length", "window length must be positive, got 0s")],
    ),
    Case(
        "length-over-a-week",
        HEAD + '\n[[windows]]\nstart = "04:00"\nlength = "169h"\n',
        [
            (
                6,
                "windows[0].length",
                "window length 169h is longer than 7 days (168h); a 7-day window already "
                "covers the whole week (an empty window list means always open)",
            )
        ],
    ),
    Case(
        "missing-length",
        HEAD + '\n[[windows]]\nstart = "04:00"\n',
        [(4, "windows[0]", "missing 'length' (a duration like '1h30m')")],
    ),
    Case(
        "day-twice",
        HEAD + '\n[[windows]]\ndays = ["Mon"]\nstart = "Thu 04:00"\nlength = "1h"\n',
        [(6, "windows[0].start", "start 'Thu 04:00' names a day and 'days' is also given; use one of them")],
    ),
    Case(
        "zincati-keys",
        HEAD + '\n[[windows]]\ndays = ["Sat"]\nstart_time = "23:30"\nlength_minutes = 60\n',
        [
            (
                6,
                "windows[0].start_time",
                "unknown key 'start_time' (Zincati's start_time is written start = \"HH:MM\" here)",
            ),
            (
                7,
                "windows[0].length_minutes",
                "unknown key 'length_minutes' (Zincati's length_minutes is written length = \"<N>m\" here)",
            ),
        ],
    ),
    Case(
        "malformed-cron-fields",
        HEAD + '\n[[windows]]\ncron = "30 23 * *"\nlength = "1h"\n',
        [
            (
                5,
                "windows[0].cron",
                "expected 5 fields (minute hour day-of-month month day-of-week), got 4 in '30 23 * *'",
            )
        ],
    ),
    Case(
        "malformed-cron-range",
        HEAD + '\n[[windows]]\ncron = "61 23 * * *"\nlength = "1h"\n',
        [(5, "windows[0].cron", "minute field: 61 is out of range 0-59")],
    ),
    Case(
        "cron-never-matches",
        HEAD + '\n[[windows]]\ncron = "0 4 30 2 *"\nlength = "1h"\n',
        [(5, "windows[0].cron", "'0 4 30 2 *' never matches a date (no such day in those months)")],
    ),
    Case(
        "cron-with-start",
        HEAD + '\n[[windows]]\ncron = "0 4 * * *"\nstart = "04:00"\nlength = "1h"\n',
        [(4, "windows[0]", "'cron' and 'start' cannot be combined; use one form")],
    ),
    Case(
        "min-window-remaining-too-long",
        HEAD + 'min_window_remaining = "1h"\n\n[[windows]]\nstart = "04:00"\nlength = "1h"\n',
        [(3, "min_window_remaining", "1h is not shorter than the longest window (1h): no reboot could ever start")],
    ),
    Case(
        "inline-window-bad",
        HEAD + 'windows = [{start = "04:00", length = "1h"}, {start = "4:60", length = "1h"}]\n',
        [(3, "windows[1].start", "invalid start time '4:60': hours run 00-23 and minutes 00-59")],
    ),
    Case(
        "group-conflicts-with-the-command-line",
        'format_version = 1\n\n# for the database hosts\ngroup = "db"\n',
        [(4, "group", "the file is for group 'db' but group 'web' was asked for")],
    ),
    # TOML syntax errors: tomllib stops at the first; the line (and key, when there is one) is named.
    Case(
        "duplicate-key",
        HEAD + "slots = 2\nfailure_budget = 1\nslots = 3\n",
        [(5, "slots", "TOML syntax error: duplicate key (a key may be set only once) (column 10)")],
    ),
    Case(
        "duplicate-key-in-window",
        HEAD + '\n[[windows]]\nstart = "04:00"\nlength = "1h"\nlength = "2h"\n',
        [(7, "windows[0].length", "TOML syntax error: duplicate key (a key may be set only once) (column 14)")],
    ),
    Case(
        "missing-value",
        HEAD + "slots =\nfailure_budget = 1\n",
        [(3, "slots", "TOML syntax error: Invalid value (column 8)")],
    ),
    Case(
        "unterminated-string",
        HEAD + 'time_zone = "UTC\n',
        [(3, "time_zone", "TOML syntax error: Illegal character '\\n' (column 17)")],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_invalid_policy(case: Case) -> None:
    group = "web" if case.id == "group-conflicts-with-the-command-line" else None
    with pytest.raises(PolicyError) as err:
        parse_policy_text(case.text, source=f"{case.id}.toml", group=group)
    got = [(p.line, p.path, p.message) for p in err.value.problems]
    assert got == case.problems
    # The one-line form names the file, and the line when known, for every problem.
    for line, path, message in case.problems:
        where = f"{case.id}.toml:{line}: " if line is not None else ""
        assert f"{where}{path}: {message}" in str(err.value)


def test_there_are_at_least_25_cases() -> None:
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


def test_every_problem_is_reported_at_once() -> None:
    text = """\
format_version = 1
group = "web"
slots = 0
strategy = "sometimes"
time_zone = "Nowhere/Land"
reboot_timeout = "-1h"
failure_budget = -3
surprise = true

[[windows]]
days = ["Mon"]
start = "24:00"
length = "1h"

[[windows]]
cron = "* * * *"
length = "1h"

[[windows]]
start = "04:00"
length = "1h"
colour = "blue"
"""
    with pytest.raises(PolicyError) as err:
        parse_policy_text(text, source="many.toml")
    assert err.value.problems == [
        Problem("slots", "must be at least 1, got 0", 3),
        Problem("strategy", "must be one of 'etcd-lock', 'reboot', 'off', got 'sometimes'", 4),
        Problem("time_zone", "unknown time zone 'Nowhere/Land' (use an IANA name like 'Europe/Berlin')", 5),
        Problem("reboot_timeout", "negative durations are not allowed: '-1h'", 6),
        Problem("failure_budget", "must be at least 0, got -3", 7),
        Problem(
            "surprise",
            "unknown key 'surprise' (allowed: format_version, group, slots, time_zone, windows, "
            "strategy, reboot_timeout, on_timeout, failure_budget, cooldown, min_window_remaining, paused, "
            "paused_reason)",
            8,
        ),
        Problem("windows[0].start", "invalid start time '24:00': hours run 00-23 and minutes 00-59", 12),
        Problem(
            "windows[1].cron", "expected 5 fields (minute hour day-of-month month day-of-week), got 4 in '* * * *'", 16
        ),
        Problem("windows[2].colour", "unknown key 'colour' (allowed: days, start, length, cron)", 22),
    ]
    lines = err.value.describe().splitlines()
    assert lines[0] == "invalid policy many.toml (9 problems)"
    assert lines[1] == "many.toml:3: slots: must be at least 1, got 0"
    assert len(lines) == 10


def test_multiline_values_do_not_confuse_line_numbers() -> None:
    text = '''\
format_version = 1
group = "web"
paused = true
paused_reason = """
slots = 5
[[windows]]
"""
windows = [
  { start = "04:00", length = "1h" },
  { start = "05:00", length = "0s" },
]
slots = 0
'''
    with pytest.raises(PolicyError) as err:
        parse_policy_text(text)
    # An inline window has no line of its own: the problem points at the windows key.
    assert err.value.problems == [
        Problem("windows[1].length", "window length must be positive, got 0s", 8),
        Problem("slots", "must be at least 1, got 0", 12),
    ]
