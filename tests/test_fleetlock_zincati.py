"""Zincati-shaped clients against two server replicas (separate `locksmithctl fleetlock serve`
processes, the same etcd), each request sent to either replica as a load balancer would. Zincati's
sequence (zincati src/update_agent): steady-state at start until accepted; with an update staged,
pre-reboot on every tick until granted; finalize and reboot; steady-state after the boot until
accepted. An independent watch of the group's holder keys checks the limit at every revision."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from fleetlockrig import HolderRecorder, apply, pre_reboot, steady_state

from locksmith import audit
from locksmith.embedded import EmbeddedEtcd, _free_ports
from locksmith.etcd import Etcd
from locksmith.keys import Layout

LOCKSMITHCTL = str(Path(sys.executable).with_name("locksmithctl"))
GROUP = "workers"
CLIENTS = 20
SLOTS = 2


@contextlib.contextmanager
def replica(etcd_server: EmbeddedEtcd, prefix: str) -> Iterator[str]:
    """One `locksmithctl fleetlock serve` process; yields its base URL once it listens."""
    port = _free_ports(1)[0]
    proc = subprocess.Popen(
        [LOCKSMITHCTL, "--endpoint", etcd_server.endpoints[0], "--prefix", prefix, "fleetlock", "serve",
         "--listen", f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # ends when the process exits: no hang on a failed start
            seen.append(line)
            if "fleetlock_listening" in line:
                break
        else:
            pytest.fail(f"replica did not start: {''.join(seen)[-2000:]}")
        # Keep draining its log so that a full pipe never blocks it.
        stream = proc.stderr
        threading.Thread(target=lambda: stream.read(), daemon=True).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ZincatiClient:
    """Zincati's FleetLock sequence with its timings compressed: ticks of ``tick`` seconds plus
    0-10 % jitter, as its refresh_delay adds."""

    def __init__(self, node_id: str, bases: list[str], session: aiohttp.ClientSession, *, tick: float = 0.02,
                 reboot: float = 0.05) -> None:
        self.id = node_id
        self.bases = bases
        self.session = session
        self.tick = tick
        self.reboot_time = reboot
        self.log: list[tuple[str, int, str | None]] = []
        self.polls = 0

    def _base(self) -> str:
        return random.choice(self.bases)  # the load balancer

    async def _sleep(self) -> None:
        await asyncio.sleep(self.tick * (1 + random.uniform(0, 0.1)))

    async def _until_ok(self, op: str) -> None:
        send = steady_state if op == "steady-state" else pre_reboot
        while True:
            reply = await send(self.session, self._base(), self.id, GROUP)
            self.log.append((op, reply.status, reply.kind))
            if reply.status == 200:
                return
            assert reply.status == 409 and reply.kind in ("no_slot", "cooldown"), (self.id, op, reply)
            self.polls += 1
            await self._sleep()

    async def run(self) -> None:
        await self._until_ok("steady-state")  # initialization: free any slot held before
        await self._sleep()  # update found and staged
        await self._until_ok("pre-reboot")
        await asyncio.sleep(self.reboot_time)  # finalize, reboot, boot
        await self._until_ok("steady-state")


async def test_twenty_zincati_clients_two_replicas_two_slots(etcd_server: EmbeddedEtcd, etcd: Etcd,
                                                             prefix: str) -> None:
    await apply(etcd, prefix, GROUP, f"slots = {SLOTS}")
    layout = Layout(GROUP, prefix)
    recorder = HolderRecorder(etcd, layout)
    await recorder.start(limit=SLOTS)
    try:
        with replica(etcd_server, prefix) as a, replica(etcd_server, prefix) as b:
            async with aiohttp.ClientSession() as session:
                clients = [ZincatiClient(f"node-{i:02d}", [a, b], session) for i in range(CLIENTS)]
                async with asyncio.timeout(240):
                    await asyncio.gather(*(c.run() for c in clients))
        async with asyncio.timeout(30):
            await recorder.sync()
    finally:
        await recorder.stop()
    assert recorder.violations == []
    assert recorder.max_seen == SLOTS  # the two slots were used at once, never more
    assert sorted(recorder.grants) == sorted(c.id for c in clients)  # each client exactly one grant
    kvs, _ = await etcd.get_prefix(layout.base)
    left = sorted(kv.key[len(layout.base):] for kv in kvs)
    assert [k for k in left if k.startswith(("holders/", "queue/"))] == []
    entries = await audit.read(etcd, layout)
    assert sorted(e.subject for e in entries if e.action == "lock") == sorted(c.id for c in clients)
    assert sorted(e.subject for e in entries if e.action == "unlock") == sorted(c.id for c in clients)
    assert all(e.reason == "via fleetlock from 127.0.0.1" for e in entries if e.action in ("lock", "unlock"))
    waited = [c for c in clients if c.polls]
    assert len(waited) >= CLIENTS - SLOTS  # the contention was real
    print(json.dumps({"polls": sum(c.polls for c in clients), "grants": len(recorder.grants)}))
