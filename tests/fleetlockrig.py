"""Helpers for the FleetLock tests: a real server on 127.0.0.1 over the embedded etcd, a client
that speaks the protocol over real HTTP, policies, and an independent holder recorder."""

from __future__ import annotations

import asyncio
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


async def keys(etcd: Etcd, prefix: str, group: str) -> dict[str, bytes]:
    kvs, _ = await etcd.get_prefix(Layout(group, prefix).base)
    return {kv.key[len(Layout(group, prefix).base):]: kv.value for kv in kvs}


class HolderRecorder:
    """An independent view of ``holders/``: a plain etcd watch of the group from a known revision,
    counting the holder keys after every revision's events. Not the semaphore's mirror, not the
    server's read. ``sync()`` writes a key the semaphore ignores and waits for its event, so every
    earlier revision has been seen."""

    def __init__(self, etcd: Etcd, layout: Layout) -> None:
        self.etcd = etcd
        self.layout = layout
        self.max_seen = 0
        self.grants: list[str] = []
        self.violations: list[tuple[int, list[str]]] = []
        self.revision = 0
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self, limit: int) -> None:
        kvs, rev = await self.etcd.get_prefix(self.layout.holders)
        holders = {kv.key for kv in kvs}
        self.revision = rev
        self.max_seen = len(holders)

        async def run() -> None:
            async for batch in self.etcd.watch_prefix(self.layout.base, start_revision=rev + 1):
                by_rev: dict[int, list[Any]] = {}
                for ev in batch.events:
                    by_rev.setdefault(ev.kv.mod_revision, []).append(ev)
                for r in sorted(by_rev):
                    self.revision = r
                    for ev in by_rev[r]:
                        if not ev.kv.key.startswith(self.layout.holders):
                            continue
                        if ev.kind == "put":
                            if ev.kv.key not in holders:
                                self.grants.append(ev.kv.key[len(self.layout.holders):])
                            holders.add(ev.kv.key)
                        else:
                            holders.discard(ev.kv.key)
                    self.max_seen = max(self.max_seen, len(holders))
                    if len(holders) > limit:
                        self.violations.append((r, sorted(holders)))
                    self.revision = r
                self._changed.set()

        self._task = asyncio.create_task(run())

    async def sync(self) -> None:
        """Wait until the recorder has seen every revision up to now (bound it with asyncio.timeout)."""
        revision = await self.etcd.put(self.layout.base + "recorder-sync", b"{}")
        while self.revision < revision:
            self._changed.clear()
            await self._changed.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
