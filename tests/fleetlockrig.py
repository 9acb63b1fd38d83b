"""Helpers for the FleetLock tests: a real server on 127.0.0.1 over the embedded etcd, a client
that speaks the protocol over real HTTP, and policies."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from locksmith.clock import SYSTEM_CLOCK, Clock
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.fleetlock.config import ServerSettings
from locksmith.fleetlock.server import FleetLockServer
from locksmith.keys import Layout
from locksmith.policy import parse_policy_text
from locksmith.policystore import apply_policy

HEADERS = {"fleet-lock-protocol": "true"}


def body(node_id: str, group: str) -> bytes:
    # Zincati sends its body pretty-printed, without a Content-Type.
    return json.dumps({"client_params": {"id": node_id, "group": group}}, indent=2).encode()


@dataclass
class Reply:
    status: int
    doc: Any
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str | None:
        return self.doc.get("kind") if isinstance(self.doc, dict) else None


async def call(session: aiohttp.ClientSession, url: str, *, method: str = "POST", data: bytes = b"",
               headers: dict[str, str] | None = None) -> Reply:
    async with session.request(method, url, data=data, headers=HEADERS if headers is None else headers,
                               timeout=aiohttp.ClientTimeout(total=30)) as r:
        text = await r.text()
        try:
            doc = json.loads(text) if text else None
        except ValueError:
            doc = text
        return Reply(r.status, doc, dict(r.headers))


async def pre_reboot(session: aiohttp.ClientSession, base: str, node_id: str, group: str) -> Reply:
    return await call(session, f"{base}/v1/pre-reboot", data=body(node_id, group))


async def steady_state(session: aiohttp.ClientSession, base: str, node_id: str, group: str) -> Reply:
    return await call(session, f"{base}/v1/steady-state", data=body(node_id, group))


async def apply(etcd: Etcd, prefix: str, group: str, toml: str = "") -> None:
    await apply_policy(etcd, parse_policy_text(f'format_version = 1\ngroup = "{group}"\n{toml}'), prefix=prefix)


def settings(etcd_config: EtcdConfig, prefix: str, **overrides: Any) -> ServerSettings:
    return replace(ServerSettings(address="127.0.0.1", port=0, etcd=etcd_config, prefix=prefix), **overrides)


@contextlib.asynccontextmanager
async def running(etcd_config: EtcdConfig, prefix: str, *, clock: Clock = SYSTEM_CLOCK,
                  **overrides: Any) -> AsyncIterator[FleetLockServer]:
    server = FleetLockServer(settings(etcd_config, prefix, **overrides), clock=clock)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        await _revoke_places(etcd_config, prefix)


async def _revoke_places(etcd_config: EtcdConfig, prefix: str) -> None:
    """End the leases of the places in line the server gave out under ``prefix``: left alone, they
    would expire (deleting their keys, moving etcd's revision) during some later test that checks
    the revision does not move."""
    with contextlib.suppress(Exception):
        etcd = await Etcd.connect(etcd_config)
        try:
            kvs, _ = await etcd.get_prefix(prefix)
            for lease in {kv.lease for kv in kvs if kv.lease}:
                await etcd.lease_revoke(lease)
        finally:
            await etcd.close()


async def keys(etcd: Etcd, prefix: str, group: str) -> dict[str, bytes]:
    kvs, _ = await etcd.get_prefix(Layout(group, prefix).base)
    return {kv.key[len(Layout(group, prefix).base):]: kv.value for kv in kvs}


@dataclass
class Changes:
    """What changed under a test's prefix between two reads: keys put (with their mod revision)
    and keys deleted. The server writes nothing outside the prefix, so this is its every write,
    whatever other tests sharing the etcd do meanwhile (a global revision would count those)."""

    put: dict[str, int]
    deleted: set[str]

    @property
    def none(self) -> bool:
        return not self.put and not self.deleted

    @property
    def revisions(self) -> set[int]:
        return set(self.put.values())

    def keys(self, under: str = "") -> set[str]:
        return {k for k in self.put if k.startswith(under)}


async def snapshot(etcd: Etcd, prefix: str) -> dict[str, int]:
    kvs, _ = await etcd.get_prefix(prefix)
    return {kv.key[len(prefix):]: kv.mod_revision for kv in kvs}


async def changes(etcd: Etcd, prefix: str, before: dict[str, int]) -> Changes:
    after = await snapshot(etcd, prefix)
    return Changes({k: r for k, r in after.items() if before.get(k) != r}, set(before) - set(after))
