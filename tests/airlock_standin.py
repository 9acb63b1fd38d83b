"""A stand-in for airlock (github.com/coreos/airlock), the reference FleetLock server, for testing
our ``fleetlock`` client against a server that is not ours. It keeps airlock's semantics
(shared/REFERENCE.md §4 and airlock's internal/server, internal/lock):

- one etcd key per group, ``com.coreos.airlock/groups/<group>/v1/semaphore`` (here under the
  test's prefix), ``{"total_slots": N, "holders": [ids]}``, created on first use, every change a
  transaction comparing the key's version;
- ``fleet-lock-protocol`` must be exactly ``true``; id and group must be non-empty; a group not in
  its config is ``400 unknown_group``;
- pre-reboot: a holder gets 200 with nothing written; a full semaphore is ``500 failed_lock``
  ("all N semaphore slots currently locked"), as is a lost compare ("conflict ... aborting");
- steady-state: always writes the semaphore back (airlock's UnlockIfHeld does), 200 whether or
  not the id held a slot;
- errors are written with Go's ``http.Error``: the JSON body as text/plain with a newline.

Every request is recorded (endpoint, id, status) for the tests to judge by.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from locksmith.etcd import Etcd, Put, version_is


@dataclass
class Call:
    endpoint: str
    id: str
    status: int
    kind: str = ""


@dataclass
class AirlockStandin:
    etcd: Etcd
    groups: dict[str, int]
    prefix: str = ""
    calls: list[Call] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    url: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self, pred: Callable[[], bool]) -> None:
        """Until ``pred()`` holds after some request (bound it with asyncio.timeout)."""
        while not pred():
            self.changed.clear()
            await self.changed.wait()

    def key(self, group: str) -> str:
        return f"{self.prefix}com.coreos.airlock/groups/{group}/v1/semaphore"

    async def semaphore(self, group: str) -> dict[str, Any]:
        kv = await self.etcd.get(self.key(group))
        return json.loads(kv.value) if kv is not None else {}

    async def start(self) -> AirlockStandin:
        app = web.Application()
        app.router.add_post("/v1/pre-reboot", self._pre_reboot)
        app.router.add_post("/v1/steady-state", self._steady_state)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- airlock's handlers --------------------------------------------------------------------

    async def _identity(self, request: web.Request) -> tuple[str, str]:
        if request.headers.get("fleet-lock-protocol") != "true":
            raise _Error(400, "invalid_client_identity",
                         "failed to validate client identity: wrong 'fleet-lock-protocol' header")
        try:
            doc = json.loads(await request.read())
            params = doc["client_params"]
            group, node_id = str(params.get("group") or ""), str(params.get("id") or "")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _Error(400, "invalid_client_identity", f"failed to validate client identity: {exc}") from None
        if not group:
            raise _Error(400, "invalid_client_identity", "failed to validate client identity: empty client group")
        if not node_id:
            raise _Error(400, "invalid_client_identity", "failed to validate client identity: empty client ID")
        if group not in self.groups:
            raise _Error(400, "unknown_group", f'unknown group "{group}"')
        return group, node_id

    async def _load(self, group: str) -> tuple[dict[str, Any], int]:
        key = self.key(group)
        # ensureInit: create the semaphore when the key does not exist yet
        init = json.dumps({"total_slots": self.groups[group], "holders": []}).encode()
        await self.etcd.txn([version_is(key, 0)], [Put(key, init)])
        kv = await self.etcd.get(key)
        assert kv is not None
        return json.loads(kv.value), kv.version

    async def _set(self, group: str, sem: dict[str, Any], version: int) -> None:
        res = await self.etcd.txn([version_is(self.key(group), version)],
                                  [Put(self.key(group), json.dumps(sem).encode())])
        if not res.succeeded:
            raise _Error(500, "failed_lock", "conflict on semaphore detected, aborting")

    async def _handle(self, request: web.Request, endpoint: str) -> web.Response:
        node_id = ""
        try:
            group, node_id = await self._identity(request)
            sem, version = await self._load(group)
            holders: list[str] = sem.get("holders") or []
            if endpoint == "pre-reboot":
                if node_id not in holders:
                    if len(holders) >= sem["total_slots"]:
                        raise _Error(500, "failed_lock", f"all {sem['total_slots']} semaphore slots currently locked")
                    sem["holders"] = sorted([*holders, node_id])
                    await self._set(group, sem, version)
            else:
                sem["holders"] = [h for h in holders if h != node_id]
                await self._set(group, sem, version)
        except _Error as err:
            self.calls.append(Call(endpoint, node_id, err.status, err.kind))
            self.changed.set()
            body = json.dumps({"kind": err.kind, "value": err.value}) + "\n"
            return web.Response(status=err.status, text=body, content_type="text/plain")
        self.calls.append(Call(endpoint, node_id, 200))
        self.changed.set()
        return web.Response(status=200)

    async def _pre_reboot(self, request: web.Request) -> web.Response:
        return await self._handle(request, "pre-reboot")

    async def _steady_state(self, request: web.Request) -> web.Response:
        return await self._handle(request, "steady-state")


class _Error(Exception):
    def __init__(self, status: int, kind: str, value: str) -> None:
        super().__init__(value)
        self.status = status
        self.kind = kind
        self.value = value
