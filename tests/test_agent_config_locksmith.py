"""The agent's reboot settings: [reboot], [locksmith], [fleetlock], locksmithd's update.conf keys,
and ``update-agent check-config``. Invalid configs are tried through both the daemon and
check-config, as separate processes, so "no traceback" is checked on what an operator sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locksmith.keys import DEFAULT_PREFIX
from updateagent.config import AgentSettings, ConfigError, RawConfig, load_settings, validate

AGENT = str(Path(sys.executable).parent / "update-agent")

# An update.conf as a Flatcar host running locksmithd with etcd-lock has it (Ignition writes it).
FLATCAR_UPDATE_CONF = """\
GROUP=stable
REBOOT_STRATEGY=etcd-lock
LOCKSMITHD_REBOOT_WINDOW_START="Thu 04:00"
LOCKSMITHD_REBOOT_WINDOW_LENGTH=1h30m
LOCKSMITHD_ENDPOINT=https://10.0.0.1:2379,https://10.0.0.2:2379,https://10.0.0.3:2379
LOCKSMITHD_ETCD_CAFILE={pki}/ca.pem
LOCKSMITHD_ETCD_CERTFILE={pki}/client.pem
LOCKSMITHD_ETCD_KEYFILE={pki}/client-key.pem
LOCKSMITHD_GROUP=workers
"""


def _files(tmp_path: Path, toml: str, update_conf: str | None) -> tuple[Path, Path]:
    config = tmp_path / "config.toml"
    config.write_text(toml)
    uc = tmp_path / "update.conf"
    if update_conf is not None:
        uc.write_text(update_conf)
    return config, uc


def _settings(tmp_path: Path, toml: str = "", update_conf: str | None = None) -> AgentSettings:
    config, uc = _files(tmp_path, toml, update_conf)
    return load_settings(config, update_conf_paths=(uc,), env={})


def _pki(tmp_path: Path) -> Path:
    pki = tmp_path / "pki"
    pki.mkdir()
    for name in ("ca.pem", "client.pem", "client-key.pem"):
        (pki / name).write_text("-----BEGIN CERTIFICATE-----\n")
    return pki


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's local time zone (what locksmithd read its window in)."""
    monkeypatch.setenv("TZ", "Europe/Berlin")


# ------------------------------------------------------------------------------ update.conf


def test_flatcar_update_conf_is_honoured(tmp_path: Path, berlin: None) -> None:
    pki = _pki(tmp_path)
    s = _settings(tmp_path, "", FLATCAR_UPDATE_CONF.format(pki=pki))
    assert s.reboot.strategy == "etcd-lock"
    ls = s.locksmith
    assert ls.endpoints == ("https://10.0.0.1:2379", "https://10.0.0.2:2379", "https://10.0.0.3:2379")
    assert (ls.cafile, ls.certfile, ls.keyfile) == (pki / "ca.pem", pki / "client.pem", pki / "client-key.pem")
    assert ls.group == "workers" and ls.prefix == DEFAULT_PREFIX and s.group == "stable"
    etcd = ls.etcd_config()
    assert etcd.endpoints == ls.endpoints and etcd.cafile == str(pki / "ca.pem") and etcd.uses_tls
    assert etcd.certfile == str(pki / "client.pem") and etcd.keyfile == str(pki / "client-key.pem")
    assert etcd.host_ports() == ["10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:2379"]
    assert s.origins["locksmith.endpoints"] == f"{tmp_path / 'update.conf'}: LOCKSMITHD_ENDPOINT"
    assert s.origins["reboot.strategy"] == f"{tmp_path / 'update.conf'}: REBOOT_STRATEGY"


def test_update_conf_window_is_in_the_hosts_local_time(tmp_path: Path, berlin: None) -> None:
    """locksmithd read LOCKSMITHD_REBOOT_WINDOW_* in local time; it used to be silently ignored."""
    s = _settings(tmp_path, "", 'LOCKSMITHD_REBOOT_WINDOW_START="Thu 04:00"\nLOCKSMITHD_REBOOT_WINDOW_LENGTH=1h30m\n')
    window = s.reboot.local_window
    assert window is not None and window.time_zone == "localtime"
    # Thursday 26 Nov 2026, Berlin is UTC+1: the window is 03:00-04:30 UTC.
    assert not window.is_open(datetime(2026, 11, 26, 2, 59, tzinfo=UTC))
    assert window.is_open(datetime(2026, 11, 26, 3, 0, tzinfo=UTC))
    assert window.is_open(datetime(2026, 11, 26, 4, 29, tzinfo=UTC))
    assert not window.is_open(datetime(2026, 11, 26, 4, 45, tzinfo=UTC))  # would be open if read as UTC
    assert not window.is_open(datetime(2026, 11, 27, 3, 30, tzinfo=UTC))  # Friday
    assert s.origins["reboot.windows"].endswith("LOCKSMITHD_REBOOT_WINDOW_START, LOCKSMITHD_REBOOT_WINDOW_LENGTH")


def test_daily_window_and_the_older_names(tmp_path: Path, berlin: None) -> None:
    s = _settings(tmp_path, "", "REBOOT_WINDOW_START=04:00\nREBOOT_WINDOW_LENGTH=1h\n")
    window = s.reboot.local_window
    assert window is not None
    assert window.is_open(datetime(2026, 11, 28, 3, 30, tzinfo=UTC)) and window.is_open(
        datetime(2026, 11, 29, 3, 30, tzinfo=UTC))
    assert not window.is_open(datetime(2026, 11, 29, 4, 30, tzinfo=UTC))


def test_toml_wins_over_update_conf(tmp_path: Path, berlin: None) -> None:
    toml = """
[reboot]
strategy = "off"
windows = [{ days = ["Sat"], start = "02:00", length = "2h" }]
time_zone = "UTC"

[locksmith]
endpoints = ["http://127.0.0.1:2379"]
group = "canary"
"""
    s = _settings(tmp_path, toml, FLATCAR_UPDATE_CONF.format(pki="/nonexistent"))
    assert s.reboot.strategy == "off" and s.locksmith.group == "canary"
    assert s.locksmith.endpoints == ("http://127.0.0.1:2379",)
    window = s.reboot.local_window
    assert window is not None and window.time_zone == "UTC"
    assert window.is_open(datetime(2026, 11, 28, 3, 0, tzinfo=UTC))  # Saturday 03:00 UTC
    assert not window.is_open(datetime(2026, 11, 26, 3, 30, tzinfo=UTC))  # update.conf's Thursday: not used
    # The certificate paths the TOML does not set still come from update.conf (strategy off: not opened).
    assert s.locksmith.cafile == Path("/nonexistent/ca.pem")
    assert s.origins["locksmith.group"] == f"{tmp_path / 'config.toml'}: locksmith.group"


def test_locksmith_table_in_full(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    toml = f"""
[reboot]
strategy = "etcd-lock"
pre_reboot_dir = "/etc/ua/pre.d"
post_boot_dir = "/etc/ua/post.d"
hook_timeout_seconds = 120
max_session_wait_minutes = 30
reboot_required_file = "/run/test-reboot-required"

[locksmith]
endpoints = ["https://e1:2379", "https://e2:2379"]
cafile = "{pki}/ca.pem"
certfile = "{pki}/client.pem"
keyfile = "{pki}/client-key.pem"
username = "agent"
password = "s3cret"
group = "prod-eu"
prefix = "fleet/locks"
lease_ttl_seconds = 30
"""
    s = _settings(tmp_path, toml)
    ls, r = s.locksmith, s.reboot
    assert ls.endpoints == ("https://e1:2379", "https://e2:2379") and ls.group == "prod-eu"
    assert ls.prefix == "fleet/locks/" and ls.lease_ttl == 30
    assert (ls.username, ls.password) == ("agent", "s3cret") and "s3cret" not in repr(s)
    assert ls.etcd_config().username == "agent" and ls.etcd_config().password == "s3cret"
    assert (r.pre_reboot_dir, r.post_boot_dir) == (Path("/etc/ua/pre.d"), Path("/etc/ua/post.d"))
    assert (r.hook_timeout, r.max_session_wait) == (120, 1800)
    assert r.reboot_required_file == Path("/run/test-reboot-required")
    assert s.reboot_strategy == "etcd-lock"  # the old attribute still reads the strategy


def test_defaults(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    assert s.reboot.strategy == "off" and s.reboot.local_window is None
    assert s.reboot.reboot_required_file == Path("/run/reboot-required")
    assert s.locksmith.endpoints == ("http://127.0.0.1:2379",) and s.locksmith.group == "default"
    assert s.locksmith.lease_ttl == 10 and s.fleetlock.url is None


# ------------------------------------------------------------------------------ check-config


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AGENT, *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**os.environ, "TZ": "Europe/Berlin"})


def test_check_config_prints_every_setting_and_its_origin(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    config, uc = _files(tmp_path, '[locksmith]\nlease_ttl_seconds = 20\npassword = "pw"\nusername = "u"\n',
                        FLATCAR_UPDATE_CONF.format(pki=pki))
    r = _run("check-config", "--config", str(config), "--update-conf", str(uc), "--no-locksmithd-check")
    assert r.returncode == 0, r.stderr
    lines = {line.split(" = ")[0]: line for line in r.stdout.splitlines()}
    assert lines["locksmith.endpoints"].endswith(f"# {uc}: LOCKSMITHD_ENDPOINT")
    assert "https://10.0.0.1:2379, https://10.0.0.2:2379" in lines["locksmith.endpoints"]
    assert lines["locksmith.lease_ttl_seconds"].endswith(f"# {config}: locksmith.lease_ttl_seconds")
    assert lines["reboot.strategy"].split("#")[0].strip() == "reboot.strategy = etcd-lock"
    assert "Thu" in lines["reboot.windows"] and "localtime" in lines["reboot.windows"]
    assert lines["check.interval_minutes"].endswith("# default")
    assert "pw" not in lines["locksmith.password"] and "(set)" in lines["locksmith.password"]

    # Global options also work before the subcommand, and JSON parses.
    r = _run("--config", str(config), "--update-conf", str(uc), "check-config", "-o", "json", "--no-locksmithd-check")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    rows = {row["key"]: row for row in doc["settings"]}
    assert doc["valid"] is True
    assert rows["locksmith.group"] == {"key": "locksmith.group", "value": "workers",
                                       "origin": f"{uc}: LOCKSMITHD_GROUP"}
    assert rows["reboot.windows"]["value"]["windows"] == [{"days": ["Thu"], "start": "04:00", "length": "1h30m"}]


# The file, the key and why, for each: (agent TOML, update.conf or None, expected problem line(s)).
# "{config}" and "{uc}" stand for the paths; "{dir}" for the test's directory.
INVALID = [
    ('[locksmith]\nendpoints = ["etcd-1"]',
     None, "{config}: key 'locksmith.endpoints': endpoint 'etcd-1' is not http(s)://host:port or host:port"),
    ("[locksmith]\nendpoints = []",
     None, "{config}: key 'locksmith.endpoints': expected a list of etcd URLs"),
    ("[locksmith]\nlease_ttl_seconds = 0",
     None, "{config}: key 'locksmith.lease_ttl_seconds': expected whole seconds from 1 to 3600, got 0"),
    ('[locksmith]\ngroup = "prod/eu"',
     None, "{config}: key 'locksmith.group': group 'prod/eu' is invalid"),
    ('[locksmith]\nusername = "root"',
     None, "{config}: key 'locksmith.username': set without locksmith.password (etcd authentication needs both)"),
    ('[locksmith]\nprefix = "/locksmith"',
     None, "{config}: key 'locksmith.prefix': expected a key prefix like 'locksmith/v1/' (no leading '/')"),
    ('[locksmith]\nendpoint = "http://127.0.0.1:2379"',
     None, "{config}: unknown key 'locksmith.endpoint'"),
    ('[reboot]\nstrategy = "etcd"',
     None, "{config}: key 'reboot.strategy': expected one of reboot, etcd-lock, off, fleetlock, got 'etcd'"),
    ('[reboot]\nwindows = [{ start = "25:00", length = "1h" }]',
     None, "{config}: key 'reboot.windows[0].start': invalid start time '25:00'"),
    ('[reboot]\nwindows = [{ start = "04:00", length = "1h" }]\ntime_zone = "Mars/Olympus"',
     None, "{config}: key 'reboot.time_zone': unknown time zone 'Mars/Olympus'"),
    ("[reboot]\nhook_timeout_seconds = 0",
     None, "{config}: key 'reboot.hook_timeout_seconds': must be > 0, got 0"),
    ("[reboot]\nmax_session_wait_minutes = -5",
     None, "{config}: key 'reboot.max_session_wait_minutes': must be >= 0, got -5"),
    ('[reboot]\nstrategy = "fleetlock"',
     None, "{config}: key 'fleetlock.url': required when reboot.strategy = 'fleetlock'"),
    ('[fleetlock]\nurl = "fleetlock.example:8080"',
     None, "{config}: key 'fleetlock.url': expected an http:// or https:// URL, got 'fleetlock.example:8080'"),
    ('[locksmith]\ncafile = "{dir}"\n[reboot]\nstrategy = "etcd-lock"',
     None, "{config}: key 'locksmith.cafile': {dir}: cafile is not a regular file (a directory)"),
    ("", 'LOCKSMITHD_REBOOT_WINDOW_START="Thu 04:00"',
     "{uc}: key 'LOCKSMITHD_REBOOT_WINDOW_START': set without LOCKSMITHD_REBOOT_WINDOW_LENGTH"),
    ("", 'LOCKSMITHD_REBOOT_WINDOW_START="Thu 04:00"\nLOCKSMITHD_REBOOT_WINDOW_LENGTH=90',
     "{uc}: key 'LOCKSMITHD_REBOOT_WINDOW_LENGTH': invalid duration '90'"),
    ("", 'LOCKSMITHD_REBOOT_WINDOW_START="Someday 04:00"\nLOCKSMITHD_REBOOT_WINDOW_LENGTH=1h',
     "{uc}: key 'LOCKSMITHD_REBOOT_WINDOW_START': unknown day 'Someday'"),
    ("", "LOCKSMITHD_ENDPOINT=etcd.example.com",
     "{uc}: key 'LOCKSMITHD_ENDPOINT': endpoint 'etcd.example.com' is not http(s)://host:port"),
    ("", 'LOCKSMITHD_GROUP="a b"',
     "{uc}: key 'LOCKSMITHD_GROUP': group 'a b' is invalid"),
    ("", "REBOOT_STRATEGY=etcd-lock\nLOCKSMITHD_ETCD_CAFILE={dir}/missing/ca.pem",
     "{uc}: key 'LOCKSMITHD_ETCD_CAFILE': {dir}/missing/ca.pem: cafile not found"),
    ("", "LOCKSMITHD_ETCD_KEYFILE=/etc/ssl/etcd/key.pem",
     "{uc}: key 'LOCKSMITHD_ETCD_KEYFILE': set without LOCKSMITHD_ETCD_CERTFILE (a client certificate needs its key)"),
    ("", "REBOOT_STRATEGY=sometimes",
     "{uc}: key 'REBOOT_STRATEGY': expected one of reboot, etcd-lock, off, fleetlock, got 'sometimes'"),
    # Several problems: every one is reported, one line each (in no particular order).
    ('[locksmith]\nlease_ttl_seconds = 0\ngroup = ""\n[reboot]\nhook_timeout_seconds = -1',
     "LOCKSMITHD_REBOOT_WINDOW_LENGTH=1h",
     "{config}: key 'reboot.hook_timeout_seconds': must be > 0, got -1\n"
     "{uc}: key 'LOCKSMITHD_REBOOT_WINDOW_LENGTH': set without LOCKSMITHD_REBOOT_WINDOW_START\n"
     "{config}: key 'locksmith.group': expected a non-empty string, got ''\n"
     "{config}: key 'locksmith.lease_ttl_seconds': expected whole seconds from 1 to 3600, got 0"),
]
_IDS = [f"{i:02d}-" + (toml.split("\n")[-1] or uc or "")[:40] for i, (toml, uc, _) in enumerate(INVALID)]
# Through the real CLIs (two processes each): 13 of them, TOML and update.conf, single and several
# problems; all of them in-process above (the same load_settings).
_CLI = (0, 2, 4, 7, 8, 9, 12, 14, 15, 16, 18, 20, 23)


def _expected(tmp_path: Path, message: str) -> list[str]:
    config, uc = tmp_path / "config.toml", tmp_path / "update.conf"
    return message.format(config=config, uc=uc, dir=tmp_path).splitlines()


def _write_invalid(tmp_path: Path, toml: str, update_conf: str | None) -> tuple[Path, Path]:
    return _files(tmp_path, toml.replace("{dir}", str(tmp_path)),
                  None if update_conf is None else update_conf.replace("{dir}", str(tmp_path)))


@pytest.mark.parametrize(("toml", "update_conf", "message"), INVALID, ids=_IDS)
def test_invalid_config_in_process(tmp_path: Path, toml: str, update_conf: str | None, message: str) -> None:
    config, uc = _write_invalid(tmp_path, toml, update_conf)
    with pytest.raises(ConfigError) as info:
        load_settings(config, update_conf_paths=(uc,), env={})
    expected = _expected(tmp_path, message)
    assert [p for p in info.value.problems if any(p.startswith(e) for e in expected)] == list(info.value.problems)
    for line in expected:
        assert any(p.startswith(line) for p in info.value.problems), (line, info.value.problems)


@pytest.mark.parametrize("command", ["daemon", "check-config"])
@pytest.mark.parametrize(("toml", "update_conf", "message"), [INVALID[i] for i in _CLI], ids=[_IDS[i] for i in _CLI])
def test_invalid_config_is_refused_by_the_daemon_and_check_config(
    tmp_path: Path, toml: str, update_conf: str | None, message: str, command: str
) -> None:
    config, uc = _write_invalid(tmp_path, toml, update_conf)
    args = ["--config", str(config), "--update-conf", str(uc)]
    prefix = "update-agent"
    if command == "daemon":
        args += ["--once", "--no-dbus"]  # exits before anything runs
    else:
        args = ["check-config", *args, "--no-locksmithd-check"]
        prefix = "update-agent check-config"
    r = _run(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = r.stderr.splitlines()
    expected = _expected(tmp_path, message)
    assert len(lines) == len(expected), lines
    for want in expected:
        assert sum(line.startswith(f"{prefix}: {want}") for line in lines) == 1, (want, lines)


def test_check_config_json_lists_the_problems(tmp_path: Path) -> None:
    config, uc = _files(tmp_path, "[locksmith]\nlease_ttl_seconds = 0\n[reboot]\nstrategy = 1\n", None)
    r = _run("check-config", "--config", str(config), "--update-conf", str(uc), "-o", "json")
    assert r.returncode == 2
    doc = json.loads(r.stdout)
    assert doc["valid"] is False
    assert doc["problems"] == [
        f"{config}: key 'reboot.strategy': expected a non-empty string, got 1",
        f"{config}: key 'locksmith.lease_ttl_seconds': expected whole seconds from 1 to 3600, got 0",
    ]


def test_a_config_that_is_not_a_regular_file_is_refused_not_read(tmp_path: Path) -> None:
    """A FIFO would block a plain read forever; the daemon must say what it is instead."""
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    r = _run("check-config", "--config", str(fifo), "--update-conf", str(tmp_path / "none"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"update-agent check-config: {fifo}: config file is not a regular file (a FIFO)"


# ------------------------------------------------------------------------------ property


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(day=st.one_of(st.none(), st.sampled_from(_DAYS)), upper=st.booleans(), hour=st.integers(0, 23),
       minute=st.integers(0, 59), length=st.integers(1, 23 * 60), week=st.integers(0, 20))
def test_locksmith_window_means_what_locksmithd_meant(monkeypatch: pytest.MonkeyPatch, day: str | None, upper: bool,
                                                      hour: int, minute: int, length: int, week: int) -> None:
    """Any START (``[day ]H:MM``, day in any case, as locksmithd's parser took it) and LENGTH: open
    from the start, in the host's zone (no DST here: Asia/Kolkata, UTC+05:30), until start +
    length, closed a minute before and at the end."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    start = f"{hour}:{minute:02d}" if day is None else f"{day.upper() if upper else day.lower()} {hour}:{minute:02d}"
    raw = RawConfig({}, "config.toml", {"LOCKSMITHD_REBOOT_WINDOW_START": start,
                                        "LOCKSMITHD_REBOOT_WINDOW_LENGTH": f"{length // 60}h{length % 60}m"},
                    "update.conf")
    window = validate(raw, env={}).reboot.local_window
    assert window is not None
    kolkata = ZoneInfo("Asia/Kolkata")
    monday = datetime(2026, 1, 5, tzinfo=kolkata) + timedelta(weeks=week)  # a Monday
    opens = monday + timedelta(days=_DAYS.index(day) if day else week % 7, hours=hour, minutes=minute)
    assert window.is_open(opens) and window.is_open(opens + timedelta(minutes=length - 1))
    assert not window.is_open(opens + timedelta(minutes=length))
    assert not window.is_open(opens - timedelta(minutes=1))
