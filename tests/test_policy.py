"""The policy model: parsing files and the etcd form, defaults, normalisation, examples, round trips."""

from __future__ import annotations

import json
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locksmith.errors import CorruptValueError, LocksmithError
from locksmith.policy import (
    DURATION_FIELDS,
    ON_TIMEOUT_ACTIONS,
    STRATEGIES,
    CorruptPolicyError,
    Policy,
    PolicyError,
    Problem,
    default_policy,
    load_schema,
    parse_policy_file,
    parse_policy_text,
    policy_from_json,
    to_toml,
    validate_policy_data,
)
from locksmith.windows import CronWindow, WeeklyWindow, WindowSet, parse_windows

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
EXAMPLES = sorted(POLICIES.glob("*.toml"))
KEY = "locksmith/v1/groups/web/policy"
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


# --- examples and the schema file ---------------------------------------------------------


def test_the_expected_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"default.toml", "production-weekend-nights.toml", "canary.toml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_valid(path: Path) -> None:
    policy = parse_policy_file(path)
    # The raw file also passes the schema alone, as an editor using policies/schema.json sees it.
    schema = json.loads((POLICIES / "schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(tomllib.loads(path.read_text()))
    # Every example explains itself.
    assert path.read_text().startswith("#")
    assert parse_policy_text(to_toml(policy)) == policy


def test_schema_copy_is_identical_to_the_packaged_schema() -> None:
    packaged = ROOT / "locksmith" / "policy_schema.json"
    assert (POLICIES / "schema.json").read_bytes() == packaged.read_bytes()
    assert load_schema() == json.loads(packaged.read_text())


def test_schema_is_valid_draft_2020_12() -> None:
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_production_example_windows_are_weekend_nights_in_berlin() -> None:
    policy = parse_policy_file(POLICIES / "production-weekend-nights.toml")
    assert policy.group == "prod-eu"
    ws = policy.window_set()
    at = lambda *a: datetime(*a, tzinfo=BERLIN)  # noqa: E731
    assert ws.is_open(at(2024, 6, 7, 23, 30))  # Friday night
    assert ws.is_open(at(2024, 6, 8, 4, 59))  # ... crossing midnight into Saturday
    assert not ws.is_open(at(2024, 6, 8, 5, 0))
    assert not ws.is_open(at(2024, 6, 8, 12, 0))  # Saturday noon
    assert ws.is_open(at(2024, 6, 10, 3, 0))  # Sunday's window crosses the week end into Monday
    assert not ws.is_open(at(2024, 6, 10, 4, 0))
    assert not ws.is_open(at(2024, 6, 12, 23, 30))  # Wednesday night
    # Berlin's window and New York's (other file, other group) open at different instants.
    us = parse_policy_file(POLICIES / "production-weekend-nights-us.toml")
    assert us.group == "prod-us-east"
    fri_2300_berlin = at(2024, 6, 7, 23, 0)
    assert ws.next_open(at(2024, 6, 7, 12, 0)) == fri_2300_berlin
    us_next = us.window_set().next_open(fri_2300_berlin.astimezone(NEW_YORK))
    assert us_next == datetime(2024, 6, 7, 23, 0, tzinfo=NEW_YORK)
    assert us_next - fri_2300_berlin == timedelta(hours=6)


def test_canary_example() -> None:
    policy = parse_policy_file(POLICIES / "canary.toml")
    assert (policy.group, policy.slots, policy.failure_budget) == ("canary", 1, 0)
    assert policy.cooldown == timedelta(minutes=30)
    assert policy.window_set().is_open(datetime(2024, 6, 4, 10, 0, tzinfo=BERLIN))  # Tuesday
    assert not policy.window_set().is_open(datetime(2024, 6, 7, 10, 0, tzinfo=BERLIN))  # Friday


# --- defaults -----------------------------------------------------------------------------


def test_default_policy() -> None:
    p = default_policy("web")
    assert p == Policy(group="web")  # the dataclass defaults and the schema defaults agree
    assert p.slots == 1 and p.windows == () and p.time_zone == "UTC"
    assert p.strategy == "etcd-lock" and p.on_timeout == "hold"
    assert p.reboot_timeout == timedelta(hours=1)
    assert p.failure_budget == 0 and p.cooldown == timedelta(0) and p.min_window_remaining == timedelta(0)
    assert p.paused is False and p.paused_reason is None
    assert p.window_set().always_open
    assert p.window_set().is_open(datetime(2024, 1, 1, tzinfo=UTC))
    assert parse_policy_text("format_version = 1", group="web") == p
    assert parse_policy_file(POLICIES / "default.toml", group="web") == p


def test_defaults_are_the_schema_defaults() -> None:
    props = load_schema()["properties"]
    p = default_policy(None).to_json()
    for name, spec in props.items():
        if "default" in spec:
            assert p[name] == spec["default"], name


# --- parsing ------------------------------------------------------------------------------

FULL = """\
format_version = 1
group = "web"
slots = 3
time_zone = "Europe/Berlin"
strategy = "reboot"
reboot_timeout = "1.5h"
on_timeout = "release"
failure_budget = 2
cooldown = "90s"
min_window_remaining = "10m"
paused = true
paused_reason = "waiting for the \\"big\\" migration"

[[windows]]
days = ["sat", "Sunday"]
start = "23:30"
length = "120m"
"""


def test_full_file_and_its_etcd_form() -> None:
    p = parse_policy_text(FULL)
    assert p.to_json() == {
        "format_version": 1,
        "group": "web",
        "slots": 3,
        "time_zone": "Europe/Berlin",
        "windows": [{"days": ["Sat", "Sun"], "start": "23:30", "length": "2h"}],
        "strategy": "reboot",
        "reboot_timeout": "1h30m",
        "on_timeout": "release",
        "failure_budget": 2,
        "cooldown": "1m30s",
        "min_window_remaining": "10m",
        "paused": True,
        "paused_reason": 'waiting for the "big" migration',
    }
    assert p.window_set().time_zone == "Europe/Berlin"
    assert isinstance(p.window_set(), WindowSet)
    assert p.window_set() is p.window_set()  # built once
    assert policy_from_json(p.to_json_bytes(), key=KEY) == p
    assert json.loads(p.to_json_bytes()) == p.to_json()
    assert p.to_json_bytes() == parse_policy_text(FULL).to_json_bytes()


def test_the_three_window_forms_normalise_to_one_policy() -> None:
    head = 'format_version = 1\ngroup = "web"\n'
    forms = [
        '[[windows]]\ndays = ["Sat", "Sun"]\nstart = "23:30"\nlength = "1h"\n',
        '[[windows]]\nstart = "Sun 23:30"\nlength = "60m"\n[[windows]]\nstart = "sat 23:30"\nlength = "3600s"\n',
        '[[windows]]\ncron = "30 23 * * 6,0"\nlength = "1h"\n',
        'windows = [{cron = "30 23 * * sat,sun", length = "1h"}]\n',
    ]
    policies = [parse_policy_text(head + f) for f in forms]
    assert all(p == policies[0] for p in policies)
    assert policies[0].windows == (WeeklyWindow(frozenset({5, 6}), 23, 30, timedelta(hours=1)),)
    assert len({p.to_json_bytes() for p in policies}) == 1


def test_monthly_cron_stays_cron_and_daily_start() -> None:
    p = parse_policy_text(
        'format_version = 1\n[[windows]]\ncron = "0  3 1 * *"\nlength = "2h"\n'
        '[[windows]]\nstart = "04:00"\nlength = "30m"\n'
    )
    assert p.windows == (
        WeeklyWindow(frozenset(range(7)), 4, 0, timedelta(minutes=30)),
        CronWindow("0 3 1 * *", timedelta(hours=2)),
    )
    assert p.to_json()["windows"][1] == {"cron": "0 3 1 * *", "length": "2h"}


def test_group_from_the_command_line() -> None:
    assert parse_policy_text("format_version = 1", group="db").group == "db"
    assert parse_policy_text('format_version = 1\ngroup = "db"', group="db").group == "db"
    assert parse_policy_text("format_version = 1").group is None
    with pytest.raises(PolicyError) as err:
        parse_policy_text('format_version = 1\ngroup = "db"\n', group="web", source="db.toml")
    assert err.value.problems == [
        Problem("group", "the file is for group 'db' but group 'web' was asked for", 2),
    ]


def test_policy_error_text() -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy_text("format_version = 1\nslots = 0\ncolour = 'red'\n", source="x.toml")
    exc = err.value
    assert isinstance(exc, LocksmithError)
    assert exc.source == "x.toml"
    assert str(exc) == (
        "invalid policy x.toml (2 problems): x.toml:2: slots: must be at least 1, got 0; "
        "x.toml:3: colour: unknown key 'colour' (allowed: format_version, group, slots, time_zone, windows, "
        "strategy, reboot_timeout, on_timeout, failure_budget, cooldown, min_window_remaining, paused, "
        "paused_reason)"
    )
    assert exc.describe().splitlines()[0] == "invalid policy x.toml (2 problems)"
    assert exc.describe().splitlines()[1] == "x.toml:2: slots: must be at least 1, got 0"


def test_parse_policy_file_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy_file(tmp_path / "missing.toml")
    assert "cannot read" in str(err.value) and "missing.toml" in str(err.value)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'format_version = 1\ngroup = "caf\xe9"\n')
    with pytest.raises(PolicyError) as err:
        parse_policy_file(bad)
    assert err.value.problems == [Problem("", "not UTF-8 text (invalid continuation byte at byte 31)")]


def test_validate_policy_data() -> None:
    assert validate_policy_data({"format_version": 1, "slots": 2}) == []
    assert validate_policy_data({"format_version": 1, "slots": 0}) == [Problem("slots", "must be at least 1, got 0")]


# --- the etcd form ------------------------------------------------------------------------


def test_policy_from_json_missing_keys_take_defaults() -> None:
    # What set-max writes for a group that had no policy.
    p = policy_from_json(b'{"format_version": 1, "slots": 3}', key=KEY)
    assert p == Policy(group=None, slots=3)
    assert policy_from_json({"format_version": 1, "group": "web"}, key=KEY) == default_policy("web")
    assert policy_from_json('{"format_version": 1, "reboot_timeout": "10m"}', key=KEY).reboot_timeout == timedelta(
        minutes=10
    )


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"{not json", "not JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        (b"\xff", "not JSON: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
        (b"[1, 2]", "a policy must be a table/object of keys, got a list"),
        (b'{"slots": 2}', "format_version: required key is missing (add format_version = 1)"),
        (
            b'{"format_version": 2}',
            "format_version: unsupported format version 2 (this locksmith reads format_version 1)",
        ),
        (b'{"format_version": 1, "slots": "2"}', 'slots: must be an integer, got string "2"'),
        (b'{"format_version": 1, "max": 3}', "max: unknown key 'max' (the number of concurrent reboots is slots)"),
        (b'{"format_version": 1, "group": null}', "group: must be a string, got null"),
        (b'{"format_version": 1, "cooldown": 600}', "cooldown: must be a string, got integer 600"),
        (b'{"format_version": 1, "cooldown": "-5s"}', "cooldown: negative durations are not allowed: '-5s'"),
        (
            b'{"format_version": 1, "windows": [{"start": "4", "length": "1h"}]}',
            "windows[0].start: invalid start time '4' (expected HH:MM, e.g. '04:00')",
        ),
    ],
)
def test_corrupt_stored_policy(raw: bytes, problem: str) -> None:
    with pytest.raises(CorruptValueError) as err:
        policy_from_json(raw, key=KEY)
    exc = err.value
    assert isinstance(exc, CorruptPolicyError) and isinstance(exc, PolicyError)
    assert exc.key == KEY
    assert exc.problem == problem
    assert str(exc) == f"stored value at {KEY!r} is invalid: {problem}"
    assert all(p.line is None for p in exc.problems)


# --- round trips (hypothesis) -------------------------------------------------------------

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe", "localtime"]
_durations = st.integers(min_value=0, max_value=30 * 86400).map(lambda s: timedelta(seconds=s))
_weekly = st.builds(
    WeeklyWindow,
    days=st.frozensets(st.integers(0, 6), min_size=1),
    hour=st.integers(0, 23),
    minute=st.integers(0, 59),
    length=st.integers(1, 7 * 86400).map(lambda s: timedelta(seconds=s)),
)
_cron = st.builds(
    lambda minute, hour, dom, length: CronWindow(f"{minute} {hour} {dom} * *", length),
    st.integers(0, 59),
    st.integers(0, 23),
    st.integers(1, 28),
    st.integers(60, 86400).map(lambda s: timedelta(seconds=s)),
)
# Characters TOML strings must escape are drawn often, not left to chance.
_text = st.text(
    st.one_of(st.sampled_from("\"\\\n\t\r\x7f\x00\x1f'#=[]ü€😀"), st.characters(blacklist_categories=("Cs",))),
    max_size=40,
)


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    windows = WindowSet(draw(st.lists(st.one_of(_weekly, _cron), max_size=4))).windows
    longest = max((w.length for w in windows), default=None)
    mwr = draw(_durations)
    if longest is not None and mwr >= longest:
        mwr = longest - timedelta(seconds=1)
    paused = draw(st.booleans())
    return Policy(
        group=draw(st.none() | st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")),
        slots=draw(st.integers(1, 10_000)),
        windows=windows,
        time_zone=draw(st.sampled_from(ZONES)),
        strategy=draw(st.sampled_from(["etcd-lock", "reboot", "off"])),
        reboot_timeout=draw(_durations.filter(bool)),
        on_timeout=draw(st.sampled_from(["hold", "release"])),
        failure_budget=draw(st.integers(0, 1000)),
        cooldown=draw(_durations),
        min_window_remaining=mwr,
        paused=paused,
        paused_reason=draw(st.none() | _text) if paused else None,
    )


def test_to_toml_escapes_every_character_toml_needs_escaped() -> None:
    reason = "".join(chr(c) for c in range(0x80)) + "\u2028ü€😀\ufeff"
    policy = Policy(group="web", paused=True, paused_reason=reason)
    assert parse_policy_text(to_toml(policy)) == policy


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies())
def test_round_trip_json(policy: Policy) -> None:
    wire = json.loads(json.dumps(policy.to_json()))
    assert policy_from_json(wire, key=KEY) == policy
    assert policy_from_json(policy.to_json_bytes(), key=KEY) == policy
    assert validate_policy_data(wire) == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies())
def test_round_trip_toml(policy: Policy) -> None:
    text = to_toml(policy)
    assert parse_policy_text(text) == policy
    # The TOML is also what the published schema describes.
    jsonschema.Draft202012Validator(load_schema()).validate(tomllib.loads(text))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(_weekly, _cron), max_size=4), st.sampled_from(ZONES))
def test_windows_normalise_whatever_the_order(windows: list[WeeklyWindow | CronWindow], zone: str) -> None:
    raw = [w.to_json() for w in windows]
    doc = {"format_version": 1, "time_zone": zone, "windows": raw}
    forwards = policy_from_json(doc, key=KEY)
    backwards = policy_from_json({**doc, "windows": raw[::-1]}, key=KEY)
    assert forwards == backwards
    assert forwards.window_set() == parse_windows(raw, zone)


def test_localtime_is_resolved_by_the_host_not_by_the_checker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Not/AZone")
    p = policy_from_json({"format_version": 1, "time_zone": "localtime"}, key=KEY)
    assert p.time_zone == "localtime"
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    assert p.window_set().tz == ZoneInfo("Asia/Tokyo")


def test_module_constants_match_the_schema() -> None:
    props = load_schema()["properties"]
    assert list(STRATEGIES) == props["strategy"]["enum"]
    assert list(ON_TIMEOUT_ACTIONS) == props["on_timeout"]["enum"]
    assert all(props[name].get("x-locksmith-kind") == "duration" for name in DURATION_FIELDS)
