"""The FleetLock server's config file: airlock's TOML, read as airlock reads it, plus our keys.

airlock's sections and keys keep airlock's meaning, so an airlock config file starts this server
unchanged (docs/fleetlock.md has the full table):

    [service]  address (default "0.0.0.0"), port (9090), tls (false)
    [status]   enabled (false), address, port, tls: a second listener for /metrics and /-/ready
    [etcd3]    endpoints, transaction_timeout_ms (3000), client_cert_pub_path, client_cert_key_path
    [lock]     default_group_name ("default"), default_slots (1), [[lock.groups]] name, slots
               (a group without slots gets default_slots)

Ours, all optional:

    [service]  tls_cert_file, tls_key_file (needed with tls = true), client_ca_file (mTLS: only
               clients with a certificate from this CA get an answer), token_file (a shared
               token: ``Authorization: Bearer <token>``, or the password of HTTP Basic auth),
               trust_forwarded_for (false; true: the client address is X-Forwarded-For's last entry),
               base_path ("/": the protocol under "/fleet_lock/" for base_url ".../fleet_lock/")
    [etcd3]    ca_file, username, password_file, prefix ("locksmith/v1/")
    [fleetlock] max_body_bytes (4096), request_timeout ("10s"), queue_ttl ("15m"),
               any_group (false: only groups with a stored policy are served)

``[lock]`` is where airlock keeps its slots. Here slots live in each group's policy in etcd; the
server creates the missing policies from ``[lock]`` at start (never overwriting one), and
``locksmithctl fleetlock import-airlock FILE`` writes them on purpose (see :func:`lock_groups`).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from locksmith.errors import InvalidArgumentError, LocksmithError
from locksmith.etcd import EtcdConfig
from locksmith.files import InputFileError, read_text
from locksmith.keys import DEFAULT_PREFIX, check_group
from locksmith.windows import DurationError, parse_duration

__all__ = ["ConfigError", "ServerSettings", "load_settings", "lock_groups", "parse_settings", "read_token"]

MAX_CONFIG_BYTES = 256 * 1024
_MAX_PORT = 65535


class ConfigError(LocksmithError):
    """A config file that cannot be used; the message names the file, the key and the problem."""

    def __init__(self, source: str, where: str, problem: str) -> None:
        super().__init__(f"{source}: {where}: {problem}" if where else f"{source}: {problem}")
        self.source = source
        self.where = where
        self.problem = problem


@dataclass(frozen=True)
class ServerSettings:
    address: str = "0.0.0.0"
    port: int = 9090
    tls: bool = False
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    client_ca_file: str | None = None
    token_file: str | None = None
    trust_forwarded_for: bool = False
    base_path: str = "/"  # the protocol's paths are <base_path>v1/pre-reboot and <base_path>v1/steady-state
    status_enabled: bool = False
    status_address: str = "127.0.0.1"
    status_port: int = 2222
    status_tls: bool = False
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    etcd_from_file: bool = False  # [etcd3] endpoints given: they win over the CLI's defaults
    prefix: str = DEFAULT_PREFIX
    max_body_bytes: int = 4096
    request_timeout: timedelta = timedelta(seconds=10)
    queue_ttl: timedelta = timedelta(minutes=15)
    any_group: bool = False
    groups: dict[str, int] = field(default_factory=dict)  # from [lock]; empty without a [lock] table


_SECTIONS: dict[str, tuple[str, ...]] = {
    "service": ("address", "port", "tls", "tls_cert_file", "tls_key_file", "client_ca_file", "token_file",
                "trust_forwarded_for", "base_path"),
    "status": ("enabled", "address", "port", "tls"),
    "etcd3": ("endpoints", "transaction_timeout_ms", "client_cert_pub_path", "client_cert_key_path", "ca_file",
              "username", "password_file", "prefix"),
    "lock": ("default_group_name", "default_slots", "groups"),
    "fleetlock": ("max_body_bytes", "request_timeout", "queue_ttl", "any_group"),
}


def load_settings(path: str) -> ServerSettings:
    try:
        text = read_text(path, max_bytes=MAX_CONFIG_BYTES, what="FleetLock server config")
    except InputFileError as exc:
        raise ConfigError(path, "", exc.problem) from None
    return parse_settings(text, source=path)


def parse_settings(text: str, *, source: str = "<text>") -> ServerSettings:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"TOML syntax error: {exc}") from None
    except (RecursionError, ValueError) as exc:
        raise ConfigError(source, "", f"TOML syntax error: {exc}") from None
    r = _Reader(source)
    for name in doc:
        if name not in _SECTIONS:
            raise ConfigError(source, name, f"unknown section (allowed: {', '.join(_SECTIONS)})")
    sections = {name: r.table(doc, name) for name in _SECTIONS}
    for name, keys in _SECTIONS.items():
        for key in sections[name]:
            if key not in keys:
                raise ConfigError(source, f"{name}.{key}", f"unknown key (allowed: {', '.join(keys)})")

    svc, st, etc, fl = sections["service"], sections["status"], sections["etcd3"], sections["fleetlock"]
    tls = r.boolean(svc, "service.tls", False)
    cert = r.string(svc, "service.tls_cert_file", None)
    key = r.string(svc, "service.tls_key_file", None)
    if tls and (cert is None or key is None):
        raise ConfigError(source, "service.tls", "tls = true needs tls_cert_file and tls_key_file")
    if not tls and (cert or key):
        raise ConfigError(source, "service.tls_cert_file", "a certificate is given but tls = false")
    client_ca = r.string(svc, "service.client_ca_file", None)
    if client_ca and not tls:
        raise ConfigError(source, "service.client_ca_file", "client certificates need tls = true")
    status_tls = r.boolean(st, "status.tls", False)
    if status_tls and not tls:
        raise ConfigError(source, "status.tls", "the status listener uses the service's certificate: set "
                                                "service.tls = true with tls_cert_file and tls_key_file")

    endpoints = r.string_list(etc, "etcd3.endpoints")
    timeout_ms = r.integer(etc, "etcd3.transaction_timeout_ms", 3000, minimum=1)
    password_file = r.string(etc, "etcd3.password_file", None)
    password = None
    if password_file is not None:
        try:
            password = read_text(password_file, max_bytes=4096, what="etcd password file").strip()
        except InputFileError as exc:
            raise ConfigError(source, "etcd3.password_file", str(exc)) from None
    username = r.string(etc, "etcd3.username", None)
    if (username is None) != (password is None):
        raise ConfigError(source, "etcd3.username", "username and password_file go together")
    etcd = EtcdConfig(
        endpoints=tuple(endpoints) if endpoints else EtcdConfig().endpoints,
        cafile=r.string(etc, "etcd3.ca_file", None),
        certfile=r.string(etc, "etcd3.client_cert_pub_path", None),
        keyfile=r.string(etc, "etcd3.client_cert_key_path", None),
        username=username, password=password, timeout=max(timeout_ms / 1000, 0.1),
    )
    try:
        etcd.host_ports()
    except InvalidArgumentError as exc:
        raise ConfigError(source, "etcd3.endpoints", str(exc)) from None
    if (etcd.certfile is None) != (etcd.keyfile is None):
        raise ConfigError(source, "etcd3.client_cert_pub_path", "client_cert_pub_path and client_cert_key_path "
                                                                "go together")

    base_path = r.string(svc, "service.base_path", "/") or "/"
    if not re.match(r"^/([A-Za-z0-9._~-]+/)*$", base_path + ("" if base_path.endswith("/") else "/")):
        raise ConfigError(source, "service.base_path", f"{base_path!r} is not a URL path like '/' or '/fleet_lock/'")
    base_path = base_path if base_path.endswith("/") else base_path + "/"
    prefix = r.string(etc, "etcd3.prefix", DEFAULT_PREFIX) or ""
    if not prefix:
        raise ConfigError(source, "etcd3.prefix", "must not be empty")
    return ServerSettings(
        address=r.string(svc, "service.address", "0.0.0.0") or "0.0.0.0",
        port=r.integer(svc, "service.port", 9090, minimum=0, maximum=_MAX_PORT),
        tls=tls, tls_cert_file=cert, tls_key_file=key, client_ca_file=client_ca,
        token_file=r.string(svc, "service.token_file", None),
        trust_forwarded_for=r.boolean(svc, "service.trust_forwarded_for", False), base_path=base_path,
        status_enabled=r.boolean(st, "status.enabled", False),
        status_address=r.string(st, "status.address", "127.0.0.1") or "127.0.0.1",
        status_port=r.integer(st, "status.port", 2222, minimum=0, maximum=_MAX_PORT),
        status_tls=status_tls,
        etcd=etcd, etcd_from_file=bool(endpoints), prefix=prefix,
        max_body_bytes=r.integer(fl, "fleetlock.max_body_bytes", 4096, minimum=64, maximum=1 << 20),
        request_timeout=r.duration(fl, "fleetlock.request_timeout", timedelta(seconds=10)),
        queue_ttl=r.duration(fl, "fleetlock.queue_ttl", timedelta(minutes=15)),
        any_group=r.boolean(fl, "fleetlock.any_group", False),
        groups=lock_groups(doc, source=source),
    )


def lock_groups(doc: dict[str, Any], *, source: str = "<text>") -> dict[str, int]:
    """airlock's ``[lock]`` as {group: slots}, exactly as airlock merges it: each
    ``[[lock.groups]]`` entry gets its ``slots`` or ``default_slots``, then the default group is
    set to ``default_slots`` (so it wins over a same-named entry). Empty without ``[lock]``."""
    r = _Reader(source)
    lock = r.table(doc, "lock")
    if "lock" not in doc:
        return {}
    name = r.string(lock, "lock.default_group_name", "default") or ""
    default_slots = r.integer(lock, "lock.default_slots", 1, minimum=0)
    out: dict[str, int] = {}
    entries = lock.get("groups", [])
    if not isinstance(entries, list):
        raise ConfigError(source, "lock.groups", "must be an array of tables ([[lock.groups]])")
    for i, entry in enumerate(entries):
        where = f"lock.groups[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(source, where, "must be a table with name and slots")
        for k in entry:
            if k not in ("name", "slots"):
                raise ConfigError(source, f"{where}.{k}", "unknown key (allowed: name, slots)")
        group = r.string(entry, f"{where}.name", None)
        if group is None:
            raise ConfigError(source, f"{where}.name", "required")
        out[_group(group, f"{where}.name", source)] = r.integer(entry, f"{where}.slots", default_slots, minimum=0)
    out[_group(name, "lock.default_group_name", source)] = default_slots
    for group, slots in out.items():
        if slots < 1:
            raise ConfigError(source, "lock", f"group {group!r} has 0 slots: a policy needs slots >= 1 (to stop a "
                                              "group's reboots, import it with 1 slot and 'locksmithctl pause' it)")
        if slots > 10000:
            raise ConfigError(source, "lock", f"group {group!r} has {slots} slots: at most 10000")
    return out


def _group(name: str, where: str, source: str) -> str:
    if not re.match(r"^[a-zA-Z0-9.-]+$", name):
        raise ConfigError(source, where, f"group {name!r} does not match FleetLock's ^[a-zA-Z0-9.-]+$")
    try:
        return check_group(name)
    except InvalidArgumentError as exc:
        raise ConfigError(source, where, str(exc)) from None


class _Reader:
    """Typed access to TOML values, with errors naming the file and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def table(self, doc: dict[str, Any], name: str) -> dict[str, Any]:
        v = doc.get(name, {})
        if not isinstance(v, dict):
            raise ConfigError(self.source, name, "must be a table")
        return v

    def _get(self, t: dict[str, Any], where: str) -> Any:
        return t.get(where.rsplit(".", 1)[-1])

    def string(self, t: dict[str, Any], where: str, default: str | None) -> str | None:
        v = self._get(t, where)
        if v is None:
            return default
        if not isinstance(v, str):
            raise ConfigError(self.source, where, f"must be a string, got {_type(v)}")
        return v

    def boolean(self, t: dict[str, Any], where: str, default: bool) -> bool:
        v = self._get(t, where)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ConfigError(self.source, where, f"must be true or false, got {_type(v)}")
        return v

    def integer(self, t: dict[str, Any], where: str, default: int, *, minimum: int = 0,
                maximum: int | None = None) -> int:
        v = self._get(t, where)
        if v is None:
            return default
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(self.source, where, f"must be an integer, got {_type(v)}")
        if v < minimum or (maximum is not None and v > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise ConfigError(self.source, where, f"must be {bound}, got {v}")
        return v

    def string_list(self, t: dict[str, Any], where: str) -> list[str]:
        v = self._get(t, where)
        if v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(self.source, where, "must be a list of strings")
        return list(v)

    def duration(self, t: dict[str, Any], where: str, default: timedelta) -> timedelta:
        v = self._get(t, where)
        if v is None:
            return default
        try:
            d = parse_duration(v, where=where)
        except DurationError as exc:
            raise ConfigError(self.source, where, exc.problem) from None
        if d < timedelta(seconds=1):
            raise ConfigError(self.source, where, f"must be at least 1s, got {v!r}")
        return d


def _type(v: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


def read_token(path: str) -> str:
    """The shared token from ``token_file`` (surrounding whitespace dropped; must not be empty)."""
    try:
        token = read_text(path, max_bytes=4096, what="token file").strip()
    except InputFileError as exc:
        raise ConfigError(path, "", exc.problem) from None
    if not token:
        raise ConfigError(path, "", "token file is empty")
    if any(c.isspace() for c in token):
        raise ConfigError(path, "", "token must be one word (no spaces)")
    return token

