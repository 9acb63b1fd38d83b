"""Agent configuration: files → raw mapping → validated, immutable settings.

Config flows one way. ``read_raw`` parses the agent's TOML file and the locksmith-style
``update.conf`` into plain mappings; ``validate`` turns them into :class:`AgentSettings` or
raises :class:`ConfigError` naming the file and the key. Nothing else reads config files.
"""

from __future__ import annotations

import ipaddress
import math
import os
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from updateagent.errors import UpdateAgentError

DEFAULT_CONFIG_PATH = Path("/etc/update-agent/config.toml")
# Flatcar reads /etc first; /etc/coreos is the older CoreOS location.
UPDATE_CONF_PATHS = (Path("/etc/flatcar/update.conf"), Path("/etc/coreos/update.conf"))
REBOOT_STRATEGIES = ("reboot", "etcd-lock", "off")
# Loopback by default: the node's exporter (or a local Prometheus agent) scrapes it; exposing it
# beyond the host is an explicit choice.
DEFAULT_METRICS_LISTEN = ("127.0.0.1", 9657)
# Upper bound of the check schedule's delays (a leap year). Far larger values used to pass and then
# overflow the agent's date arithmetic at run time, killing the daemon.
_MAX_DELAY = 366 * 24 * 3600.0

HealthKind = Literal["command", "unit", "http"]
HostKind = Literal["system", "emulated"]


class ConfigError(UpdateAgentError):
    """A config file that cannot be read or holds a value that cannot be used."""


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
class AgentSettings:
    server: str | None = None
    keys: tuple[Path, ...] = ()
    insecure: bool = False
    allow_downgrade: bool = False
    group: str = "stable"
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
    reboot_strategy: str = "off"
    bus_address: str | None = None  # None: the system bus
    host_kind: HostKind = "system"
    boot_record: Path | None = None
    machine_id_file: Path | None = None  # None: /etc/machine-id (system host) or derived from the disk (emulated)
    os_release: Path = Path("/usr/lib/os-release")
    cmdline: Path = Path("/proc/cmdline")
    host_versions: dict[str, str] = field(default_factory=dict)  # slot name/label/partuuid -> version
    metrics_listen: tuple[str, int] | None = DEFAULT_METRICS_LISTEN  # None: no metrics endpoint
    sources: tuple[str, ...] = field(default=(), compare=False)

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
    """What the files said, before any validation. ``origin`` maps top-level sections to files."""

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


def read_raw(
    config_path: Path | None = None,
    update_conf_paths: tuple[Path, ...] | None = None,
) -> RawConfig:
    """Read the files. A missing agent config is an error only when a path was given explicitly."""
    toml: Mapping[str, Any] = {}
    toml_source = "<defaults>"
    path = config_path if config_path is not None else DEFAULT_CONFIG_PATH
    if path.exists() or config_path is not None:
        try:
            toml = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        toml_source = str(path)
    update_conf: dict[str, str] = {}
    update_source = "<none>"
    for candidate in UPDATE_CONF_PATHS if update_conf_paths is None else update_conf_paths:
        if candidate.exists():
            try:
                text = candidate.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{candidate}: cannot read: {exc}") from None
            update_conf = parse_update_conf(text, str(candidate))
            update_source = str(candidate)
            break
    return RawConfig(toml, toml_source, update_conf, update_source)


class _Reader:
    """Typed access to one TOML table, with errors that name the file and the dotted key."""

    def __init__(self, table: Mapping[str, Any], source: str, prefix: str, known: set[str]) -> None:
        self.table = table
        self.source = source
        self.prefix = prefix
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key {self._key(unknown[0])!r}")

    def _key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: key {self._key(key)!r}: {problem}")

    def has(self, key: str) -> bool:
        return key in self.table

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.table.get(key, default)
        if value is not None and (not isinstance(value, str) or not value):
            raise self.fail(key, f"expected a non-empty string, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0, strict: bool = False,
               maximum: float | None = None) -> float:
        value = self.table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail(key, f"expected a number, got {value!r}")
        if value < minimum or (strict and value == minimum):
            relation = ">" if strict else ">="
            raise self.fail(key, f"must be {relation} {minimum:g}, got {value!r}")
        if maximum is not None and value > maximum:
            raise self.fail(key, f"must be <= {maximum:g}, got {value!r}")
        return float(value)

    def path(self, key: str, default: Path | None = None) -> Path | None:
        value = self.string(key)
        return Path(value) if value is not None else default

    def table_at(self, key: str, known: set[str]) -> _Reader:
        value = self.table.get(key, {})
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected a table, got {value!r}")
        return _Reader(value, self.source, f"{self._key(key)}.", known)


def _health_checks(reader: _Reader) -> tuple[HealthCheckSpec, ...]:
    entries = reader.table.get("check", [])
    if not isinstance(entries, list):
        raise reader.fail("check", "expected an array of tables ([[health.check]])")
    specs: list[HealthCheckSpec] = []
    for index, entry in enumerate(entries):
        prefix = f"{reader.prefix}check[{index}]."
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{reader.source}: key {prefix[:-1]!r}: expected a table, got {entry!r}")
        item = _Reader(entry, reader.source, prefix, {"command", "unit", "url", "timeout_seconds", "name"})
        kinds = [k for k in ("command", "unit", "url") if item.has(k)]
        if len(kinds) != 1:
            raise ConfigError(
                f"{reader.source}: key {prefix[:-1]!r}: needs exactly one of command, unit, url; "
                f"got {kinds or 'none'}"
            )
        kind = kinds[0]
        # Bounded: a socket timeout beyond time_t raises OverflowError in the running daemon.
        timeout = item.number("timeout_seconds", 10.0, strict=True, maximum=_MAX_DELAY)
        name = item.string("name", "") if item.has("name") else ""
        target: tuple[str, ...] | str
        if kind == "command":
            argv = entry["command"]
            if isinstance(argv, str):
                try:
                    argv = shlex.split(argv)
                except ValueError as exc:  # "No closing quotation"
                    raise item.fail("command", f"{exc}: {argv!r}") from None
            if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv):
                raise item.fail("command", f"expected a command line or a list of strings, got {argv!r}")
            target = tuple(argv)
            specs.append(HealthCheckSpec("command", target, timeout, name or ""))
        elif kind == "unit":
            target = item.string("unit") or ""
            specs.append(HealthCheckSpec("unit", target, timeout, name or ""))
        else:
            url = item.string("url") or ""
            if not url.startswith(("http://", "https://")):
                raise item.fail("url", f"expected an http:// or https:// URL, got {url!r}")
            specs.append(HealthCheckSpec("http", url, timeout, name or ""))
    return tuple(specs)


def _metrics_listen(reader: _Reader) -> tuple[str, int] | None:
    if not reader.boolean("enabled", True):
        return None
    value = reader.table.get("listen", "{}:{}".format(*DEFAULT_METRICS_LISTEN))
    if not isinstance(value, str):
        raise reader.fail("listen", f"expected a \"host:port\" string (or \"\" to disable), got {value!r}")
    if not value:
        return None
    try:
        return parse_listen(value)
    except ValueError as exc:
        raise reader.fail("listen", str(exc)) from None


def validate(raw: RawConfig, *, env: Mapping[str, str] | None = None) -> AgentSettings:
    """Turn raw file contents into settings. Precedence: agent TOML, then update.conf, then defaults."""
    env = os.environ if env is None else env
    top = _Reader(raw.toml, raw.toml_source, "", {"channel", "disk", "state", "check", "health", "dbus", "host",
                                                   "reboot", "metrics"})
    channel = top.table_at("channel", {"server", "keys", "insecure", "allow_downgrade", "group"})
    disk = top.table_at("disk", {"path"})
    state = top.table_at("state", {"dir"})
    check = top.table_at(
        "check", {"interval_minutes", "jitter", "retry_initial_seconds", "max_backoff_hours", "on_start"}
    )
    health = top.table_at("health", {"check", "deadline_seconds", "retry_interval_seconds"})
    dbus = top.table_at("dbus", {"address"})
    host = top.table_at("host", {"kind", "boot_record", "machine_id_file", "os_release", "cmdline", "versions"})
    reboot = top.table_at("reboot", {"strategy"})
    metrics = top.table_at("metrics", {"listen", "enabled"})

    uc = raw.update_conf
    uc_source = raw.update_conf_source

    url = channel.string("server") or (uc.get("SERVER") or None)
    keys_value = channel.table.get("keys", [])
    if isinstance(keys_value, str):
        keys_value = [keys_value]
    if not isinstance(keys_value, list) or not all(isinstance(k, str) and k for k in keys_value):
        raise channel.fail("keys", f"expected a list of key file paths, got {keys_value!r}")
    insecure = channel.boolean("insecure", False)
    if url is not None and not url.startswith(("http://", "https://")):
        where = "channel.server" if channel.has("server") else "SERVER"
        source = raw.toml_source if channel.has("server") else uc_source
        raise ConfigError(f"{source}: key {where!r}: expected an http(s):// URL, got {url!r}")
    if url is not None and not keys_value and not insecure:
        raise channel.fail("keys", "no signing keys configured; set channel.keys or channel.insecure = true")

    group = channel.string("group") or uc.get("GROUP") or "stable"
    if "/" in group.strip("/") or group in (".", ".."):
        where = ("channel.group", raw.toml_source) if channel.has("group") else ("GROUP", uc_source)
        raise ConfigError(f"{where[1]}: key {where[0]!r}: not a single path component: {group!r}")
    group = group.strip("/")

    strategy = reboot.string("strategy") or uc.get("REBOOT_STRATEGY") or "off"
    if strategy == "best-effort":  # locksmith's historic name; it meant etcd-lock when etcd is reachable
        strategy = "etcd-lock"
    if strategy not in REBOOT_STRATEGIES:
        where = ("reboot.strategy", raw.toml_source) if reboot.has("strategy") else ("REBOOT_STRATEGY", uc_source)
        raise ConfigError(f"{where[1]}: key {where[0]!r}: expected one of {', '.join(REBOOT_STRATEGIES)}, "
                          f"got {strategy!r}")

    host_kind = host.string("kind", "system")
    if host_kind not in ("system", "emulated"):
        raise host.fail("kind", f"expected 'system' or 'emulated', got {host_kind!r}")
    boot_record = host.path("boot_record")
    if host_kind == "emulated" and boot_record is None:
        raise host.fail("boot_record", "required when host.kind = 'emulated'")

    versions = host.table.get("versions", {})
    if not isinstance(versions, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in versions.items()
    ):
        raise host.fail("versions", f"expected a table of slot = \"version\" strings, got {versions!r}")

    address = dbus.string("address", "system")
    bus_address = env.get("UPDATE_AGENT_BUS_ADDRESS") or (None if address == "system" else address)

    jitter = check.number("jitter", 0.10)
    if jitter >= 1:
        raise check.fail("jitter", f"must be a fraction below 1, got {jitter!r}")

    defaults = AgentSettings()
    return AgentSettings(
        server=url,
        keys=tuple(Path(k) for k in keys_value),
        insecure=insecure,
        allow_downgrade=channel.boolean("allow_downgrade", False),
        group=group,
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
        reboot_strategy=strategy,
        bus_address=bus_address,
        host_kind=host_kind,  # type: ignore[arg-type]
        boot_record=boot_record,
        machine_id_file=host.path("machine_id_file"),
        os_release=host.path("os_release", defaults.os_release) or defaults.os_release,
        cmdline=host.path("cmdline", defaults.cmdline) or defaults.cmdline,
        host_versions=dict(versions),
        metrics_listen=_metrics_listen(metrics),
        sources=(raw.toml_source, uc_source),
    )


def load_settings(
    config_path: Path | None = None,
    *,
    update_conf_paths: tuple[Path, ...] | None = None,
    env: Mapping[str, str] | None = None,
) -> AgentSettings:
    """Read and validate in one step: what the daemon calls."""
    return validate(read_raw(config_path, update_conf_paths), env=env)
