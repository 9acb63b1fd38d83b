"""Agent config (TOML + update.conf), persistent state, and host facts parsing."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from updateagent.agent import Phase
from updateagent.config import AgentSettings, ConfigError, load_settings, parse_update_conf
from updateagent.errors import ChannelError, DownloadError, SignatureError
from updateagent.host import HostError, usr_partuuid_from_cmdline, version_from_os_release
from updateagent.schedule import is_transient
from updateagent.state import AgentState, PendingUpdate, StateError, StateStore


def _settings(
    tmp_path: Path, toml: str, update_conf: str | None = None, env: dict[str, str] | None = None
) -> AgentSettings:
    cfg = tmp_path / "config.toml"
    cfg.write_text(toml)
    paths: tuple[Path, ...] = ()
    if update_conf is not None:
        uc = tmp_path / "update.conf"
        uc.write_text(update_conf)
        paths = (uc,)
    return load_settings(cfg, update_conf_paths=paths, env=env or {})


FULL = """
[channel]
server = "https://updates.example.com/channels"
group = "beta"
keys = ["/etc/update-agent/keys"]
allow_downgrade = true

[disk]
path = "/dev/vda"

[state]
dir = "/var/lib/ua"

[check]
interval_minutes = 30
jitter = 0.2
retry_initial_seconds = 60
max_backoff_hours = 2

[health]
deadline_seconds = 90

[[health.check]]
command = "/usr/bin/check-app --quick"
timeout_seconds = 5

[[health.check]]
unit = "containerd.service"

[[health.check]]
url = "http://127.0.0.1:10248/healthz"
name = "kubelet"

[reboot]
strategy = "reboot"

[dbus]
address = "unix:path=/run/test-bus"
"""


def test_full_config(tmp_path: Path) -> None:
    s = _settings(tmp_path, FULL)
    assert s.manifest_url() == "https://updates.example.com/channels/beta/manifest.json"
    assert s.keys == (Path("/etc/update-agent/keys"),) and s.allow_downgrade and not s.insecure
    assert s.disk == Path("/dev/vda") and s.state_file == Path("/var/lib/ua/state.json")
    assert (s.check_interval, s.check_jitter, s.retry_initial, s.max_backoff) == (1800, 0.2, 60, 7200)
    assert [(c.kind, c.target, c.timeout) for c in s.health_checks] == [
        ("command", ("/usr/bin/check-app", "--quick"), 5.0),
        ("unit", "containerd.service", 10.0),
        ("http", "http://127.0.0.1:10248/healthz", 10.0),
    ]
    assert s.health_checks[2].label() == "kubelet" and s.health_deadline == 90
    assert s.reboot_strategy == "reboot" and s.bus_address == "unix:path=/run/test-bus"


def test_defaults(tmp_path: Path) -> None:
    s = _settings(tmp_path, "")
    assert s.server is None and s.manifest_url() is None
    assert s.check_interval == 45 * 60 and s.check_jitter == 0.1 and s.max_backoff == 4 * 3600
    assert s.bus_address is None and s.reboot_strategy == "off" and s.host_kind == "system"


def test_update_conf_fills_in_what_the_toml_does_not_say(tmp_path: Path) -> None:
    uc = """# written by ignition
GROUP=alpha
SERVER="https://nebraska.example.com/channels"
REBOOT_STRATEGY='best-effort'
LOCKSMITHD_REBOOT_WINDOW_START="Thu 04:00"
LOCKSMITHD_REBOOT_WINDOW_LENGTH=1h
"""
    s = _settings(tmp_path, '[channel]\ninsecure = true\n', uc)
    assert s.group == "alpha" and s.server == "https://nebraska.example.com/channels"
    assert s.reboot_strategy == "etcd-lock"  # locksmith's old name for it
    s = _settings(tmp_path, '[channel]\ninsecure = true\ngroup = "stable"\n[reboot]\nstrategy = "off"\n', uc)
    assert s.group == "stable" and s.reboot_strategy == "off"


@pytest.mark.parametrize(
    ("toml", "update_conf", "message"),
    [
        ('[check]\ninterval_minutes = "often"', None, "key 'check.interval_minutes': expected a number, got 'often'"),
        ("[check]\ninterval_minutes = 0", None, "key 'check.interval_minutes': must be > 0"),
        ("[check]\njitter = 1.5", None, "key 'check.jitter': must be a fraction below 1"),
        ("[chanel]\nserver = 'x'", None, "unknown key 'chanel'"),
        ("[channel]\nserver = 'ftp://x'\ninsecure = true", None, "key 'channel.server': expected an http(s)://"),
        ("[channel]\nserver = 'https://x'", None, "key 'channel.keys': no signing keys configured"),
        ("[channel]\nkeys = 'a'\nsurver = 1", None, "unknown key 'channel.surver'"),
        ("[[health.check]]\ncommand = []", None, "key 'health.check[0].command'"),
        ("[[health.check]]\nunit = 'a'\nurl = 'http://x'", None, "key 'health.check[0]': needs exactly one"),
        ("[[health.check]]\nurl = 'file:///x'", None, "key 'health.check[0].url': expected an http"),
        ("[[health.check]]\nunit = 'a'\ntimeout_seconds = -1", None, "key 'health.check[0].timeout_seconds'"),
        ("[host]\nkind = 'emulated'", None, "key 'host.boot_record': required"),
        ("[host]\nversions = { A = 1 }", None, "key 'host.versions'"),
        ("", "REBOOT_STRATEGY=sometimes", "update.conf: key 'REBOOT_STRATEGY': expected one of reboot, etcd-lock, off"),
        ("", "GROUP=a/b", "update.conf: key 'GROUP': not a single path component"),
        ("", "this is not an assignment", "update.conf:1: expected KEY=value"),
        ("[check\n", None, "invalid TOML"),
    ],
)
def test_errors_name_the_file_and_key(tmp_path: Path, toml: str, update_conf: str | None, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _settings(tmp_path, toml, update_conf)
    assert message in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml", update_conf_paths=())


def test_bus_address_from_the_environment(tmp_path: Path) -> None:
    s = _settings(tmp_path, "", env={"UPDATE_AGENT_BUS_ADDRESS": "unix:path=/tmp/x"})
    assert s.bus_address == "unix:path=/tmp/x"


_KEY = st.from_regex(r"[A-Z][A-Z0-9_]{0,15}", fullmatch=True)
_VALUE = st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=30)


@given(st.dictionaries(_KEY, _VALUE, max_size=6))
def test_update_conf_round_trip(values: dict[str, str]) -> None:
    text = "\n".join(f"{k}={shlex.quote(v)}" for k, v in values.items())
    parsed = parse_update_conf(text, "update.conf")
    assert parsed == {k: " ".join(shlex.split(shlex.quote(v))) for k, v in values.items()}


# ------------------------------------------------------------------------------- state


def test_state_round_trip_and_atomic_save(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s" / "state.json")
    assert store.load() == AgentState()
    state = AgentState(status=Phase.UPDATED_NEED_REBOOT.value, current_version="1.0.0",
                       pending=PendingUpdate("2.0.0", "B", "USR-B", "uuid", 1.0, 10, "1.0.0"),
                       slot_versions={"uuid": "2.0.0"}).deny("1.5.0", "rolled back", 2.0).record("x", 3.0, a=1)
    store.save(state)
    assert store.load() == state
    assert [p.name for p in store.path.parent.iterdir()] == ["state.json"]  # no temp files left
    assert json.loads(store.path.read_text())["format_version"] == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "invalid JSON"),
        ("[]", "expected a JSON object"),
        ('{"format_version": 7}', "unsupported format_version 7"),
        ('{"format_version": 1, "status": 5}', "key 'status': expected a string"),
        ('{"format_version": 1, "pending": {"version": "2"}}', "malformed state"),
    ],
)
def test_bad_state_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(content)
    with pytest.raises(StateError, match=message) as info:
        StateStore(path).load()
    assert str(path) in str(info.value)


def test_history_is_bounded() -> None:
    state = AgentState()
    for i in range(500):
        state = state.record("tick", float(i))
    assert len(state.history) == 200 and state.history[-1].time == 499.0


# ------------------------------------------------------------------------------- host facts


@given(st.uuids(), st.sampled_from(["mount.usr=PARTUUID=", "usr=PARTUUID=", "mount.usr=/dev/disk/by-partuuid/"]),
       st.lists(st.from_regex(r"[a-z.]{1,8}(=[a-z0-9]{1,8})?", fullmatch=True), max_size=5))
def test_usr_partuuid_from_cmdline(u: object, prefix: str, noise: list[str]) -> None:
    words = [*noise, f"{prefix}{str(u).upper()}", *noise]
    assert usr_partuuid_from_cmdline(" ".join(words)) == str(u)


def test_cmdline_without_usr_is_a_clear_error() -> None:
    with pytest.raises(HostError, match=r"/proc/cmdline: no mount\.usr=PARTUUID"):
        usr_partuuid_from_cmdline("root=/dev/sda9 quiet")
    with pytest.raises(HostError, match="'nope' is not a partition UUID"):
        usr_partuuid_from_cmdline("mount.usr=PARTUUID=nope")


def test_version_from_os_release() -> None:
    text = 'NAME="Flatcar Container Linux by Kinvolk"\nID=flatcar\nVERSION=3815.2.0\nVERSION_ID=3815.2.0\n'
    assert version_from_os_release(text) == "3815.2.0"
    assert version_from_os_release('VERSION="1.2 (x)"\n') == "1.2 (x)"
    assert version_from_os_release("ID=x\n") is None


def test_transient_classification_is_the_flag_set_where_raised() -> None:
    # The message does not matter: test_channel.py and test_install.py check where the flag is set.
    assert is_transient(ChannelError("http://x/manifest.json: HTTP 503 fetching the manifest", transient=True))
    assert not is_transient(ChannelError("http://x/manifest.json: HTTP 503 fetching the manifest"))
    assert is_transient(DownloadError("giving up after 5 retries", transient=True))
    assert not is_transient(SignatureError("manifest.json.sig: no signature matches"))
    assert not is_transient(ConnectionError("not raised by the agent: no verdict"))
