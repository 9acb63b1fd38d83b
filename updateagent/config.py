"""Agent configuration: files → raw mapping → validated, immutable settings.

Config flows one way. ``read_raw`` parses the agent's TOML file and the locksmith-style
``update.conf`` into plain mappings; ``validate`` turns them into :class:`AgentSettings` or
raises :class:`ConfigError` listing every problem, each naming the file and the key. Nothing
else reads config files. ``validate`` also records where each effective value came from
(``AgentSettings.origins``), which ``update-agent check-config`` prints.

Precedence, per key: the agent TOML, then update.conf (the keys locksmithd and update_engine
read), then the built-in default. update.conf values that are empty count as unset, as they do
for locksmithd (an empty environment variable).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import shlex
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from locksmith.errors import InvalidArgumentError
from locksmith.etcd import DEFAULT_ENDPOINT, EtcdConfig
from locksmith.files import InputFileError, read_bytes, read_text
from locksmith.keys import DEFAULT_PREFIX, check_group, normalize_prefix
from locksmith.windows import WindowError, WindowSet, parse_windows
from updateagent.errors import UpdateAgentError

DEFAULT_CONFIG_PATH = Path("/etc/update-agent/config.toml")
# Flatcar reads /etc first; /etc/coreos is the older CoreOS location.
UPDATE_CONF_PATHS = (Path("/etc/flatcar/update.conf"), Path("/etc/coreos/update.conf"))
REBOOT_STRATEGIES = ("reboot", "etcd-lock", "off", "fleetlock")
# Loopback by default: the node's exporter (or a local Prometheus agent) scrapes it; exposing it
# beyond the host is an explicit choice.
DEFAULT_METRICS_LISTEN = ("127.0.0.1", 9657)
# Upper bound of the check schedule's delays (a leap year). Far larger values used to pass and then
# overflow the agent's date arithmetic at run time, killing the daemon.
_MAX_DELAY = 366 * 24 * 3600.0
# A queued host's lease: a dead waiter blocks the queue until it expires, so an hour is plenty.
_MAX_LEASE_TTL = 3600
# A config or update.conf is a few hundred bytes; anything near this is not one.
_MAX_CONFIG_BYTES = 256 * 1024
# Where locksmithd announces itself (pkg/coordinatorconf); it holds an exclusive flock on it while
# it runs.
COORDINATOR_CONF = Path("/run/update-engine/coordinator.conf")
# FleetLock's group syntax (Zincati/airlock).
_FLEETLOCK_GROUP = re.compile(r"^[a-zA-Z0-9.-]+$")

RebootStrategyName = Literal["off", "reboot", "etcd-lock", "fleetlock"]
HealthKind = Literal["command", "unit", "http"]
HostKind = Literal["system", "emulated"]


class ConfigError(UpdateAgentError):
    """A config that cannot be used. ``problems`` holds one line per problem, each naming the file
    and the key; ``str()`` is those lines joined."""

    def __init__(self, message: str = "", *, problems: Sequence[str] = ()) -> None:
        lines = tuple(problems) or (message,)
        super().__init__("\n".join(lines))
        self.problems: tuple[str, ...] = lines


@dataclass(frozen=True)
class HealthCheckSpec:
    """One after-boot health check. ``target`` is argv (command), a unit name, or a URL."""

    kind: HealthKind
    target: tuple[str, ...] | str
    timeout: float = 10.0
    name: str = ""

    def label(self) -> str:
        if self.name:
            return self.name
        if isinstance(self.target, tuple):
            return f"{self.kind}:{' '.join(self.target)}"
        return f"{self.kind}:{self.target}"


@dataclass(frozen=True)
class LocksmithSettings:
    """How the ``etcd-lock`` strategy reaches etcd and which semaphore it joins ([locksmith])."""

    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    group: str = "default"
    prefix: str = DEFAULT_PREFIX
    lease_ttl: int = 10

    def etcd_config(self) -> EtcdConfig:
        return EtcdConfig(
            endpoints=self.endpoints,
            cafile=str(self.cafile) if self.cafile is not None else None,
            certfile=str(self.certfile) if self.certfile is not None else None,
            keyfile=str(self.keyfile) if self.keyfile is not None else None,
            username=self.username,
            password=self.password,
        )


@dataclass(frozen=True)
class RebootSettings:
    """When and how this host reboots ([reboot], update.conf's REBOOT_STRATEGY and locksmith window)."""

    strategy: RebootStrategyName = "off"
    # The host's own window (locksmithd's LOCKSMITHD_REBOOT_WINDOW_*, or [reboot] windows), in the
    # host's local time unless [reboot] time_zone says otherwise. None: no local restriction. With
    # etcd-lock a reboot needs both this window and the group's policy window open.
    local_window: WindowSet | None = None
    pre_reboot_dir: Path = Path("/etc/update-agent/pre-reboot.d")
    post_boot_dir: Path = Path("/etc/update-agent/post-boot.d")
    hook_timeout: float = 300.0
    max_session_wait: float = 3600.0  # postpone while interactive users are logged in, at most this long
    reboot_required_file: Path = Path("/run/reboot-required")
    # How a locksmithd still running on the host is found (see updateagent.locksmithd).
    locksmithd_unit: str = "locksmithd.service"
    coordinator_conf: Path = COORDINATOR_CONF


@dataclass(frozen=True)
class FleetLockSettings:
    """A FleetLock server (Zincati's protocol) for the ``fleetlock`` strategy ([fleetlock])."""

    url: str | None = None
    group: str = "default"


@dataclass(frozen=True)
class AgentSettings:
    server: str | None = None
    keys: tuple[Path, ...] = ()
    insecure: bool = False
    allow_downgrade: bool = False
    group: str = "stable"
    fetch_deadline: float = 60.0  # manifest + signature, seconds (channel.deadline_seconds)
    stall_bytes: int = 64 * 1024  # payload stall rule: at least this many bytes ...
    stall_seconds: float = 60.0  # ... within this many seconds, or the connection is cut
    disk: Path | None = None
    state_dir: Path = Path("/var/lib/update-agent")
    check_interval: float = 45 * 60.0
    check_jitter: float = 0.10
    retry_initial: float = 5 * 60.0
    max_backoff: float = 4 * 3600.0
    check_on_start: bool = True
    health_checks: tuple[HealthCheckSpec, ...] = ()
    health_deadline: float = 120.0
    health_retry_interval: float = 5.0
    reboot: RebootSettings = field(default_factory=RebootSettings)
    locksmith: LocksmithSettings = field(default_factory=LocksmithSettings)
    fleetlock: FleetLockSettings = field(default_factory=FleetLockSettings)
    bus_address: str | None = None  # None: the system bus
    host_kind: HostKind = "system"
    boot_record: Path | None = None
    host_reboot_via: str = "power-cycle"  # emulated hosts: "power-cycle" in-process, or "logind"
    machine_id_file: Path | None = None  # None: /etc/machine-id (system host) or derived from the disk (emulated)
    os_release: Path = Path("/usr/lib/os-release")
    cmdline: Path = Path("/proc/cmdline")
    host_versions: dict[str, str] = field(default_factory=dict)  # slot name/label/partuuid -> version
    metrics_listen: tuple[str, int] | None = DEFAULT_METRICS_LISTEN  # None: no metrics endpoint
    sources: tuple[str, ...] = field(default=(), compare=False)
    # Config key (as in the TOML, e.g. "locksmith.endpoints") -> "<file>: <key>" it was read from;
    # keys absent here have their default.
    origins: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def reboot_strategy(self) -> str:
        """Shorthand for ``reboot.strategy`` (change it with ``replace(s, reboot=replace(s.reboot, ...))``)."""
        return self.reboot.strategy

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    def manifest_url(self) -> str | None:
        """``<server>/<group>/manifest.json``, or None when no server is configured."""
        if self.server is None:
            return None
        return f"{self.server.rstrip('/')}/{self.group}/manifest.json"


@dataclass(frozen=True)
class RawConfig:
    """What the files said, before any validation."""

    toml: Mapping[str, Any]
    toml_source: str
    update_conf: Mapping[str, str]
    update_conf_source: str


def parse_update_conf(text: str, source: str) -> dict[str, str]:
    """Parse shell-style ``KEY=value`` lines (comments, blank lines and quotes allowed)."""
    values: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        key = key.strip()
        if key.startswith("export "):
            key = key[len("export ") :].strip()
        if not sep or not key or not key.replace("_", "").isalnum():
            raise ConfigError(f"{source}:{lineno}: expected KEY=value, got {stripped!r}")
        try:
            parts = shlex.split(value, comments=True)
        except ValueError as exc:
            raise ConfigError(f"{source}:{lineno}: key {key}: {exc}") from None
        values[key] = " ".join(parts)
    return values


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6-host]:port`` → (host, port). The host is an IP address or
    ``localhost``; port 0 asks the kernel for a free one. Raises ValueError saying what is wrong."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or value.endswith("]"):
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:9657), got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 address needs brackets, e.g. [::1]:9657; got {value!r}")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"host must be an IP address or localhost, got {host!r} in {value!r}") from None
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port_text!r} in {value!r}")
    return host, int(port_text)


def _read_config_text(path: Path, what: str) -> str:
    try:
        return read_text(path, max_bytes=_MAX_CONFIG_BYTES, what=what)
    except InputFileError as exc:
        raise ConfigError(str(exc)) from None


def read_raw(
    config_path: Path | None = None,
    update_conf_paths: tuple[Path, ...] | None = None,
) -> RawConfig:
    """Read the files. A missing agent config is an error only when a path was given explicitly;
    of the update.conf candidates the first that exists is read."""
    toml: Mapping[str, Any] = {}
    toml_source = "<defaults>"
    path = config_path if config_path is not None else DEFAULT_CONFIG_PATH
    if config_path is not None or os.path.lexists(path):
        text = _read_config_text(path, "config file")
        try:
            toml = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None
        except ValueError as exc:  # an integer beyond int()'s digit limit
            raise ConfigError(f"{path}: invalid TOML: {str(exc).split(';')[0]}") from None
        toml_source = str(path)
    update_conf: dict[str, str] = {}
    update_source = "<none>"
    for candidate in UPDATE_CONF_PATHS if update_conf_paths is None else update_conf_paths:
        if os.path.lexists(candidate):
            update_conf = parse_update_conf(_read_config_text(candidate, "update.conf"), str(candidate))
            update_source = str(candidate)
            break
    return RawConfig(toml, toml_source, update_conf, update_source)


class _Problems:
    """Every problem found in one validation, and where each value came from."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.origins: dict[str, str] = {}

    def add(self, line: str) -> None:
        if line not in self.lines:
            self.lines.append(line)


class _Missing:
    pass


_MISSING: Any = _Missing()


class _Reader:
    """Typed access to one TOML table. A bad value is recorded as a problem naming the file and the
    dotted key, and the getter returns the default so that validation goes on to find the rest."""

    def __init__(self, table: Mapping[str, Any], source: str, prefix: str, known: set[str],
                 problems: _Problems) -> None:
        self.table = table
        self.source = source
        self.prefix = prefix
        self.problems = problems
        for key in sorted(set(table) - known):
            problems.add(f"{source}: unknown key {self.key(key)!r}")

    def key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def fail(self, key: str, problem: str) -> None:
        self.problems.add(f"{self.source}: key {self.key(key)!r}: {problem}")

    def has(self, key: str) -> bool:
        return key in self.table

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self.table:
            return default
        self.problems.origins[self.key(key)] = f"{self.source}: {self.key(key)}"
        return self.table[key]

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.get(key, default)
        if value is not None and (not isinstance(value, str) or not value):
            self.fail(key, f"expected a non-empty string, got {value!r}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {value!r}")
            return default
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0, strict: bool = False,
               maximum: float | None = None) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.fail(key, f"expected a number, got {value!r}")
            return default
        if value < minimum or (strict and value == minimum):
            relation = ">" if strict else ">="
            self.fail(key, f"must be {relation} {minimum:g}, got {value!r}")
            return default
        if maximum is not None and value > maximum:
            self.fail(key, f"must be <= {maximum:g}, got {value!r}")
            return default
        return float(value)

    def path(self, key: str, default: Path | None = None) -> Path | None:
        value = self.string(key)
        return Path(value) if value is not None else default

    def table_at(self, key: str, known: set[str]) -> _Reader:
        value = self.table.get(key, {})
        if not isinstance(value, Mapping):
            self.fail(key, f"expected a table, got {value!r}")
            value = {}
        return _Reader(value, self.source, f"{self.key(key)}.", known, self.problems)


class _UpdateConf:
    """update.conf values, empty ones counting as unset; reads record their origin."""

    def __init__(self, values: Mapping[str, str], source: str, problems: _Problems) -> None:
        self.values = values
        self.source = source
        self.problems = problems

    def get(self, setting: str, *names: str) -> tuple[str, str] | None:
        """The first non-empty value of ``names`` as (value, name), recorded as ``setting``'s origin."""
        for name in names:
            value = self.values.get(name, "").strip()
            if value:
                self.problems.origins[setting] = f"{self.source}: {name}"
                return value, name
        return None

    def fail(self, name: str, problem: str) -> None:
        self.problems.add(f"{self.source}: key {name!r}: {problem}")


def _health_checks(reader: _Reader) -> tuple[HealthCheckSpec, ...]:
    entries = reader.get("check", [])
    if not isinstance(entries, list):
        reader.fail("check", "expected an array of tables ([[health.check]])")
        return ()
    specs: list[HealthCheckSpec] = []
    for index, entry in enumerate(entries):
        prefix = f"{reader.prefix}check[{index}]."
        if not isinstance(entry, Mapping):
            reader.problems.add(f"{reader.source}: key {prefix[:-1]!r}: expected a table, got {entry!r}")
            continue
        item = _Reader(entry, reader.source, prefix, {"command", "unit", "url", "timeout_seconds", "name"},
                       reader.problems)
        kinds = [k for k in ("command", "unit", "url") if item.has(k)]
        if len(kinds) != 1:
            reader.problems.add(f"{reader.source}: key {prefix[:-1]!r}: needs exactly one of command, unit, url; "
                                f"got {kinds or 'none'}")
            continue
        kind = kinds[0]
        # Bounded: a socket timeout beyond time_t raises OverflowError in the running daemon.
        timeout = item.number("timeout_seconds", 10.0, strict=True, maximum=_MAX_DELAY)
        name = item.string("name", "") if item.has("name") else ""
        if kind == "command":
            argv = entry["command"]
            if isinstance(argv, str):
                try:
                    argv = shlex.split(argv)
                except ValueError as exc:  # "No closing quotation"
                    item.fail("command", f"{exc}: {argv!r}")
                    continue
            if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv):
                item.fail("command", f"expected a command line or a list of strings, got {argv!r}")
                continue
            specs.append(HealthCheckSpec("command", tuple(argv), timeout, name or ""))
        elif kind == "unit":
            unit = item.string("unit")
            if unit is not None:
                specs.append(HealthCheckSpec("unit", unit, timeout, name or ""))
        else:
            url = item.string("url") or ""
            if not url.startswith(("http://", "https://")):
                item.fail("url", f"expected an http:// or https:// URL, got {url!r}")
                continue
            specs.append(HealthCheckSpec("http", url, timeout, name or ""))
    return tuple(specs)


def _metrics_listen(reader: _Reader) -> tuple[str, int] | None:
    if not reader.boolean("enabled", True):
        return None
    value = reader.get("listen", "{}:{}".format(*DEFAULT_METRICS_LISTEN))
    if not isinstance(value, str):
        reader.fail("listen", f"expected a \"host:port\" string (or \"\" to disable), got {value!r}")
        return DEFAULT_METRICS_LISTEN
    if not value:
        return None
    try:
        return parse_listen(value)
    except ValueError as exc:
        reader.fail("listen", str(exc))
        return DEFAULT_METRICS_LISTEN


def _split_endpoints(value: str) -> list[str]:
    # locksmithd takes a comma-separated list in LOCKSMITHD_ENDPOINT (and -endpoint=a,b).
    return [part for part in re.split(r"[,\s]+", value) if part]


# [locksmith] key -> the update.conf variable locksmithd reads for it.
_UC_NAMES = {"cafile": "LOCKSMITHD_ETCD_CAFILE", "certfile": "LOCKSMITHD_ETCD_CERTFILE",
             "keyfile": "LOCKSMITHD_ETCD_KEYFILE", "username": "LOCKSMITHD_ETCD_USERNAME",
             "password": "LOCKSMITHD_ETCD_PASSWORD"}


def _locksmith(reader: _Reader, uc: _UpdateConf, strategy: str) -> LocksmithSettings:
    defaults = LocksmithSettings()

    def fail(key: str, uc_name: str | None, problem: str) -> None:
        if reader.has(key) or uc_name is None:
            reader.fail(key, problem)
        else:
            uc.fail(uc_name, problem)

    def text(key: str, *uc_names: str) -> tuple[str | None, str | None]:
        """(value, the update.conf name it came from, or None when from the TOML or unset)."""
        if reader.has(key):
            return reader.string(key), None
        found = uc.get(reader.key(key), *uc_names)
        return (found[0], found[1]) if found is not None else (None, None)

    endpoints: tuple[str, ...] = defaults.endpoints
    endpoints_from: str | None = None
    if reader.has("endpoints"):
        raw = reader.get("endpoints")
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not items or not all(isinstance(e, str) and e.strip() for e in items):
            reader.fail("endpoints", f"expected a list of etcd URLs like [\"https://10.0.0.1:2379\"], got {raw!r}")
            items = list(defaults.endpoints)
        endpoints = tuple(ep for item in items for ep in _split_endpoints(item))
    else:
        found = uc.get("locksmith.endpoints", "LOCKSMITHD_ENDPOINT")
        if found is not None:
            endpoints, endpoints_from = tuple(_split_endpoints(found[0])), found[1]
    try:
        EtcdConfig(endpoints=endpoints).host_ports()
    except InvalidArgumentError as exc:
        fail("endpoints", endpoints_from, str(exc))
        endpoints = defaults.endpoints

    def pair_needed(first: str, second: str, why: str) -> None:
        """Both or neither: name the one that is set where it was set, and the one missing."""
        (a, a_from), (b, b_from) = values[first], values[second]
        if (a is None) == (b is None):
            return
        key, came_from, missing = (first, a_from, second) if a is not None else (second, b_from, first)
        missing_name = reader.key(missing) if came_from is None else _UC_NAMES[missing]
        fail(key, came_from, f"set without {missing_name} ({why})")

    values = {key: text(key, _UC_NAMES[key]) for key in ("cafile", "certfile", "keyfile", "username", "password")}
    files: dict[str, Path | None] = {}
    for key in ("cafile", "certfile", "keyfile"):
        value, came_from = values[key]
        path = files[key] = Path(value) if value else None
        # The etcd client reads these only when it connects: a wrong path would surface as a
        # connection error hours later, in the middle of a reboot. Say it now.
        if path is not None and strategy == "etcd-lock":
            try:
                read_bytes(path, what=key)  # the cap the etcd client reads them with
            except InputFileError as exc:
                # A key readable by root only: check-config run by another user cannot tell.
                if not (exc.problem.startswith("permission denied") and os.geteuid() != 0):
                    fail(key, came_from, f"{path}: {exc.problem}")
    pair_needed("certfile", "keyfile", "a client certificate needs its key")
    pair_needed("username", "password", "etcd authentication needs both")
    username, password = values["username"][0], values["password"][0]

    group, group_from = text("group", "LOCKSMITHD_GROUP")
    group = group or defaults.group
    try:
        check_group(group)
    except InvalidArgumentError as exc:
        fail("group", group_from, str(exc))
        group = defaults.group

    prefix = reader.string("prefix", defaults.prefix) or defaults.prefix
    if prefix.startswith("/") or "//" in prefix:
        reader.fail("prefix", f"expected a key prefix like {DEFAULT_PREFIX!r} (no leading '/'), got {prefix!r}")
        prefix = defaults.prefix
    lease_ttl = reader.get("lease_ttl_seconds", defaults.lease_ttl)
    if isinstance(lease_ttl, bool) or not isinstance(lease_ttl, int) or not 1 <= lease_ttl <= _MAX_LEASE_TTL:
        reader.fail("lease_ttl_seconds", f"expected whole seconds from 1 to {_MAX_LEASE_TTL}, got {lease_ttl!r}")
        lease_ttl = defaults.lease_ttl
    return LocksmithSettings(
        endpoints=endpoints, cafile=files["cafile"], certfile=files["certfile"], keyfile=files["keyfile"],
        username=username, password=password, group=group, prefix=normalize_prefix(prefix), lease_ttl=lease_ttl,
    )


def _local_window(reader: _Reader, uc: _UpdateConf) -> WindowSet | None:
    """[reboot] windows, else locksmithd's LOCKSMITHD_REBOOT_WINDOW_START/_LENGTH (or their older
    REBOOT_WINDOW_* names), always in the host's local time as locksmithd read them."""
    if reader.has("windows") or reader.has("time_zone"):
        time_zone = reader.get("time_zone", "localtime")
        try:
            windows = parse_windows(reader.get("windows", []), time_zone, where=reader.key("windows"),
                                    tz_where=reader.key("time_zone"))
        except WindowError as exc:
            reader.problems.add(f"{reader.source}: key {exc.where!r}: {exc.problem}")
            return None
        return None if windows.always_open else windows
    start = uc.get("reboot.windows", "LOCKSMITHD_REBOOT_WINDOW_START", "REBOOT_WINDOW_START")
    length = uc.get("reboot.windows", "LOCKSMITHD_REBOOT_WINDOW_LENGTH", "REBOOT_WINDOW_LENGTH")
    if start is None and length is None:
        return None
    if start is None or length is None:
        given, missing = ((start, "LOCKSMITHD_REBOOT_WINDOW_LENGTH") if start is not None
                          else (length, "LOCKSMITHD_REBOOT_WINDOW_START"))
        assert given is not None
        uc.fail(given[1], f"set without {missing} (locksmithd needs both or neither)")
        return None
    uc.problems.origins["reboot.windows"] = f"{uc.source}: {start[1]}, {length[1]}"
    try:
        return parse_windows([{"start": start[0], "length": length[0]}], "localtime", where="window",
                             tz_where="time_zone")
    except WindowError as exc:
        name = length[1] if exc.where.endswith(".length") else start[1]
        uc.fail(name, f"{exc.problem} (locksmith's format: START like 'Thu 04:00' or '04:00', "
                      "LENGTH like '1h30m')")
        return None


def _reboot(reader: _Reader, uc: _UpdateConf) -> RebootSettings:
    defaults = RebootSettings()
    if reader.has("strategy"):
        strategy = reader.string("strategy", "off") or "off"
        where: tuple[str, str] | None = None
    else:
        found = uc.get("reboot.strategy", "REBOOT_STRATEGY")
        strategy, where = (found[0], (uc.source, found[1])) if found else ("off", None)
    if strategy == "best-effort":  # locksmith's historic name; it meant etcd-lock when etcd is reachable
        strategy = "etcd-lock"
    if strategy not in REBOOT_STRATEGIES:
        problem = f"expected one of {', '.join(REBOOT_STRATEGIES)}, got {strategy!r}"
        if where is None:
            reader.fail("strategy", problem)
        else:
            uc.fail(where[1], problem)
        strategy = "off"
    unit = reader.string("locksmithd_unit", defaults.locksmithd_unit) or defaults.locksmithd_unit
    if not unit.endswith(".service") or "/" in unit:
        reader.fail("locksmithd_unit", f"expected a unit name like 'locksmithd.service', got {unit!r}")
        unit = defaults.locksmithd_unit
    return RebootSettings(
        strategy=strategy,  # type: ignore[arg-type]
        local_window=_local_window(reader, uc),
        pre_reboot_dir=reader.path("pre_reboot_dir", defaults.pre_reboot_dir) or defaults.pre_reboot_dir,
        post_boot_dir=reader.path("post_boot_dir", defaults.post_boot_dir) or defaults.post_boot_dir,
        hook_timeout=reader.number("hook_timeout_seconds", defaults.hook_timeout, strict=True, maximum=_MAX_DELAY),
        max_session_wait=reader.number("max_session_wait_minutes", defaults.max_session_wait / 60,
                                       maximum=_MAX_DELAY / 60) * 60.0,
        reboot_required_file=reader.path("reboot_required_file", defaults.reboot_required_file)
        or defaults.reboot_required_file,
        locksmithd_unit=unit,
        coordinator_conf=reader.path("coordinator_conf", defaults.coordinator_conf) or defaults.coordinator_conf,
    )


def _fleetlock(reader: _Reader, strategy: str) -> FleetLockSettings:
    url = reader.string("url")
    if url is not None and not url.startswith(("http://", "https://")):
        reader.fail("url", f"expected an http:// or https:// URL, got {url!r}")
        url = None
    elif url is None and strategy == "fleetlock":
        reader.fail("url", "required when reboot.strategy = 'fleetlock'")
    group = reader.string("group", "default") or "default"
    if not _FLEETLOCK_GROUP.match(group):
        reader.fail("group", f"expected letters, digits, '.' or '-' (FleetLock's group syntax), got {group!r}")
        group = "default"
    return FleetLockSettings(url=url, group=group)


def validate(raw: RawConfig, *, env: Mapping[str, str] | None = None) -> AgentSettings:
    """Turn raw file contents into settings. Precedence: agent TOML, then update.conf, then defaults.
    Raises one ConfigError listing every problem found."""
    env = os.environ if env is None else env
    problems = _Problems()
    top = _Reader(raw.toml, raw.toml_source, "", {"channel", "disk", "state", "check", "health", "dbus", "host",
                                                   "reboot", "metrics", "locksmith", "fleetlock"}, problems)
    channel = top.table_at("channel", {"server", "keys", "insecure", "allow_downgrade", "group", "deadline_seconds",
                                       "stall_bytes", "stall_seconds"})
    disk = top.table_at("disk", {"path"})
    state = top.table_at("state", {"dir"})
    check = top.table_at(
        "check", {"interval_minutes", "jitter", "retry_initial_seconds", "max_backoff_hours", "on_start"}
    )
    health = top.table_at("health", {"check", "deadline_seconds", "retry_interval_seconds"})
    dbus = top.table_at("dbus", {"address"})
    host = top.table_at("host", {"kind", "boot_record", "machine_id_file", "os_release", "cmdline", "versions",
                                 "reboot_via"})
    reboot_table = top.table_at("reboot", {"strategy", "windows", "time_zone", "pre_reboot_dir", "post_boot_dir",
                                           "hook_timeout_seconds", "max_session_wait_minutes",
                                           "reboot_required_file", "locksmithd_unit", "coordinator_conf"})
    locksmith_table = top.table_at("locksmith", {"endpoints", "cafile", "certfile", "keyfile", "username",
                                                 "password", "group", "prefix", "lease_ttl_seconds"})
    fleetlock_table = top.table_at("fleetlock", {"url", "group"})
    metrics = top.table_at("metrics", {"listen", "enabled"})
    uc = _UpdateConf(raw.update_conf, raw.update_conf_source, problems)

    url = channel.string("server")
    server_where = (raw.toml_source, "channel.server")
    if url is None and (found := uc.get("channel.server", "SERVER")) is not None:
        url, server_where = found[0], (uc.source, found[1])
    keys_value = channel.get("keys", [])
    if isinstance(keys_value, str):
        keys_value = [keys_value]
    if not isinstance(keys_value, list) or not all(isinstance(k, str) and k for k in keys_value):
        channel.fail("keys", f"expected a list of key file paths, got {keys_value!r}")
        keys_value = []
    insecure = channel.boolean("insecure", False)
    if url is not None and not url.startswith(("http://", "https://")):
        problems.add(f"{server_where[0]}: key {server_where[1]!r}: expected an http(s):// URL, got {url!r}")
        url = None
    if url is not None and not keys_value and not insecure:
        channel.fail("keys", "no signing keys configured; set channel.keys or channel.insecure = true")

    group = channel.string("group")
    group_where = (raw.toml_source, "channel.group")
    if group is None and (found := uc.get("channel.group", "GROUP")) is not None:
        group, group_where = found[0], (uc.source, found[1])
    group = group or "stable"
    if "/" in group.strip("/") or group in (".", ".."):
        problems.add(f"{group_where[0]}: key {group_where[1]!r}: not a single path component: {group!r}")
        group = "stable"
    group = group.strip("/")

    reboot = _reboot(reboot_table, uc)
    locksmith = _locksmith(locksmith_table, uc, reboot.strategy)
    fleetlock = _fleetlock(fleetlock_table, reboot.strategy)

    host_kind = host.string("kind", "system")
    if host_kind not in ("system", "emulated"):
        host.fail("kind", f"expected 'system' or 'emulated', got {host_kind!r}")
        host_kind = "system"
    boot_record = host.path("boot_record")
    if host_kind == "emulated" and boot_record is None:
        host.fail("boot_record", "required when host.kind = 'emulated'")
    # An emulated machine power-cycles itself, or asks logind on dbus.address (a stand-in logind).
    host_reboot_via = host.string("reboot_via", "power-cycle") or "power-cycle"
    if host_reboot_via not in ("power-cycle", "logind"):
        host.fail("reboot_via", f"expected 'power-cycle' or 'logind', got {host_reboot_via!r}")
        host_reboot_via = "power-cycle"

    versions = host.get("versions", {})
    if not isinstance(versions, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in versions.items()
    ):
        host.fail("versions", f"expected a table of slot = \"version\" strings, got {versions!r}")
        versions = {}

    address = dbus.string("address", "system")
    bus_address = env.get("UPDATE_AGENT_BUS_ADDRESS") or (None if address == "system" else address)
    if env.get("UPDATE_AGENT_BUS_ADDRESS"):
        problems.origins["dbus.address"] = "environment: UPDATE_AGENT_BUS_ADDRESS"

    jitter = check.number("jitter", 0.10)
    if jitter >= 1:
        check.fail("jitter", f"must be a fraction below 1, got {jitter!r}")
        jitter = 0.10

    defaults = AgentSettings()
    settings = AgentSettings(
        server=url,
        keys=tuple(Path(k) for k in keys_value),
        insecure=insecure,
        allow_downgrade=channel.boolean("allow_downgrade", False),
        group=group,
        fetch_deadline=channel.number("deadline_seconds", defaults.fetch_deadline, strict=True, maximum=_MAX_DELAY),
        stall_bytes=int(channel.number("stall_bytes", defaults.stall_bytes, minimum=1, maximum=2**40)),
        stall_seconds=channel.number("stall_seconds", defaults.stall_seconds, strict=True, maximum=_MAX_DELAY),
        disk=disk.path("path"),
        state_dir=state.path("dir", defaults.state_dir) or defaults.state_dir,
        check_interval=check.number("interval_minutes", 45.0, strict=True, maximum=_MAX_DELAY / 60) * 60.0,
        check_jitter=jitter,
        retry_initial=check.number("retry_initial_seconds", 300.0, strict=True, maximum=_MAX_DELAY),
        max_backoff=check.number("max_backoff_hours", 4.0, strict=True, maximum=_MAX_DELAY / 3600) * 3600.0,
        check_on_start=check.boolean("on_start", True),
        health_checks=_health_checks(health),
        health_deadline=health.number("deadline_seconds", 120.0),
        health_retry_interval=health.number("retry_interval_seconds", 5.0, strict=True),
        reboot=reboot,
        locksmith=locksmith,
        fleetlock=fleetlock,
        bus_address=bus_address,
        host_kind=host_kind,  # type: ignore[arg-type]
        boot_record=boot_record,
        host_reboot_via=host_reboot_via,
        machine_id_file=host.path("machine_id_file"),
        os_release=host.path("os_release", defaults.os_release) or defaults.os_release,
        cmdline=host.path("cmdline", defaults.cmdline) or defaults.cmdline,
        host_versions=dict(versions),
        metrics_listen=_metrics_listen(metrics),
        sources=(raw.toml_source, raw.update_conf_source),
        origins=dict(problems.origins),
    )
    if problems.lines:
        raise ConfigError(problems=problems.lines)
    return settings


def load_settings(
    config_path: Path | None = None,
    *,
    update_conf_paths: tuple[Path, ...] | None = None,
    env: Mapping[str, str] | None = None,
) -> AgentSettings:
    """Read and validate in one step: what the daemon calls."""
    return validate(read_raw(config_path, update_conf_paths), env=env)


# ------------------------------------------------------------------------------------ check-config


def _show(value: object) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, WindowSet):
        return window_summary(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def effective_settings(settings: AgentSettings) -> list[tuple[str, object, str]]:
    """(config key, effective value, where it came from) for every setting, in file order.
    Secrets are shown as ``(set)``; where a value came from is ``default`` when no file set it."""
    s, r, ls, fl = settings, settings.reboot, settings.locksmith, settings.fleetlock
    rows: list[tuple[str, object]] = [
        ("channel.server", s.server), ("channel.group", s.group), ("channel.keys", s.keys),
        ("channel.insecure", s.insecure), ("channel.allow_downgrade", s.allow_downgrade),
        ("channel.deadline_seconds", s.fetch_deadline), ("channel.stall_bytes", s.stall_bytes),
        ("channel.stall_seconds", s.stall_seconds),
        ("disk.path", s.disk), ("state.dir", s.state_dir),
        ("check.interval_minutes", s.check_interval / 60), ("check.jitter", s.check_jitter),
        ("check.retry_initial_seconds", s.retry_initial), ("check.max_backoff_hours", s.max_backoff / 3600),
        ("check.on_start", s.check_on_start),
        ("health.deadline_seconds", s.health_deadline), ("health.retry_interval_seconds", s.health_retry_interval),
        ("health.check", [c.label() for c in s.health_checks]),
        ("reboot.strategy", r.strategy), ("reboot.windows", r.local_window),
        ("reboot.pre_reboot_dir", r.pre_reboot_dir), ("reboot.post_boot_dir", r.post_boot_dir),
        ("reboot.hook_timeout_seconds", r.hook_timeout), ("reboot.max_session_wait_minutes", r.max_session_wait / 60),
        ("reboot.reboot_required_file", r.reboot_required_file), ("reboot.locksmithd_unit", r.locksmithd_unit),
        ("reboot.coordinator_conf", r.coordinator_conf),
        ("locksmith.endpoints", ls.endpoints), ("locksmith.cafile", ls.cafile), ("locksmith.certfile", ls.certfile),
        ("locksmith.keyfile", ls.keyfile), ("locksmith.username", ls.username),
        ("locksmith.password", None if ls.password is None else "(set)"), ("locksmith.group", ls.group),
        ("locksmith.prefix", ls.prefix), ("locksmith.lease_ttl_seconds", ls.lease_ttl),
        ("fleetlock.url", fl.url), ("fleetlock.group", fl.group),
        ("dbus.address", s.bus_address or "system"), ("host.kind", s.host_kind), ("host.boot_record", s.boot_record),
        ("host.machine_id_file", s.machine_id_file), ("host.os_release", s.os_release), ("host.cmdline", s.cmdline),
        ("host.versions", s.host_versions or None),
        ("metrics.listen", None if s.metrics_listen is None else "{}:{}".format(*s.metrics_listen)),
    ]
    return [(key, value, s.origins.get(key, "default")) for key, value in rows]


def format_effective(rows: Iterable[tuple[str, object, str]]) -> str:
    shown = [(key, _show(value), origin) for key, value, origin in rows]
    width = max(len(f"{k} = {v}") for k, v, _ in shown)
    return "\n".join(f"{f'{k} = {v}':<{width}}  # {origin}" for k, v, origin in shown)


def window_summary(window: WindowSet | None) -> str:
    """A short text for logs: ``Thu 04:00 for 1h30m (localtime)``."""
    if window is None:
        return "none"
    parts = []
    for w in window.to_json()["windows"]:
        days = w.get("days")
        when = w.get("cron") or (f"{','.join(days)} {w['start']}" if days and len(days) < 7 else w.get("start"))
        parts.append(f"{when} for {w['length']}")
    return f"{'; '.join(parts)} ({window.time_zone})"


__all__ = [
    "COORDINATOR_CONF", "AgentSettings", "ConfigError", "FleetLockSettings", "HealthCheckSpec", "LocksmithSettings",
    "RawConfig", "RebootSettings", "effective_settings", "format_effective", "load_settings", "parse_listen",
    "parse_update_conf", "read_raw", "validate", "window_summary",
]
