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
from fleetlockrig import apply, pre_reboot, steady_state

from locksmith import audit
from locksmith.embedded import EmbeddedEtcd, _free_ports
from locksmith.etcd import Etcd
from locksmith.history import History, Recorder, check
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


class Round:
    """What the clients of one test share: they find the update together (a barrier after their
    start-up steady-state, as a fleet polling one channel does), and a reboot lasts until every
    client has had its first pre-reboot answer, so that the contention is certain, not a matter
    of timing."""

    def __init__(self, n: int) -> None:
        self.staged = asyncio.Barrier(n)
        self.n = n
        self.first_answers = 0
        self.all_asked = asyncio.Event()

    def answered(self) -> None:
        self.first_answers += 1
        if self.first_answers == self.n:
            self.all_asked.set()


class ZincatiClient:
    """Zincati's FleetLock sequence with its timings compressed: ticks of ``tick`` seconds plus
    0-10 % jitter, as its refresh_delay adds."""

    def __init__(self, node_id: str, bases: list[str], session: aiohttp.ClientSession, rnd: Round, *,
                 tick: float = 0.02, reboot: float = 0.02) -> None:
        self.id = node_id
        self.bases = bases
        self.session = session
        self.round = rnd
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
        first = True
        while True:
            reply = await send(self.session, self._base(), self.id, GROUP)
            self.log.append((op, reply.status, reply.kind))
            if first and op == "pre-reboot":
                self.round.answered()
            first = False
            if reply.status == 200:
                return
            assert reply.status == 409 and reply.kind in ("no_slot", "cooldown"), (self.id, op, reply)
            self.polls += 1
            await self._sleep()

    async def run(self) -> None:
        await self._until_ok("steady-state")  # initialization: free any slot held before
        await self.round.staged.wait()  # update found and staged
        await self._until_ok("pre-reboot")
        await self.round.all_asked.wait()  # finalize, reboot, boot ...
        await asyncio.sleep(self.reboot_time)
        await self._until_ok("steady-state")


def _max_holders(history: History) -> tuple[int, list[str]]:
    """The most holder keys at any revision, and every holder key created, from etcd's record."""
    held = {c.key for c in history.initial if c.key.startswith("holders/")}
    most, created = len(held), []
    for c in history.changes:
        if not c.key.startswith("holders/"):
            continue
        if c.kind == "put":
            created.append(c.key[len("holders/"):])
            held.add(c.key)
        else:
            held.discard(c.key)
        most = max(most, len(held))
    return most, created


async def test_twenty_zincati_clients_two_replicas_two_slots(etcd_server: EmbeddedEtcd, etcd: Etcd,
                                                             prefix: str) -> None:
    await apply(etcd, prefix, GROUP, f"slots = {SLOTS}")
    layout = Layout(GROUP, prefix)
    # An independent record: etcd's own watch history of the group (locksmith.history), replayed
    # revision by revision by the semaphore's history checker.
    recorder = Recorder(etcd, GROUP, prefix=prefix)
    await recorder.start()
    with replica(etcd_server, prefix) as a, replica(etcd_server, prefix) as b:
        async with aiohttp.ClientSession() as session:
            rnd = Round(CLIENTS)
            clients = [ZincatiClient(f"node-{i:02d}", [a, b], session, rnd) for i in range(CLIENTS)]
            async with asyncio.timeout(240):
                await asyncio.gather(*(c.run() for c in clients))
    history = await recorder.stop()
    # at most 2 holders at every revision, no grant while paused, FIFO among the queued, no
    # grant past the line, holder keys without a lease, never rewritten
    assert check(history) == []
    most, created = _max_holders(history)
    assert most == SLOTS  # the two slots were used at once, never more
    assert sorted(created) == sorted(c.id for c in clients)  # each client exactly one grant
    kvs, _ = await etcd.get_prefix(layout.base)
    left = sorted(kv.key[len(layout.base):] for kv in kvs)
    assert [k for k in left if k.startswith(("holders/", "queue/"))] == []
    entries = await audit.read(etcd, layout)
    assert sorted(e.subject for e in entries if e.action == "lock") == sorted(c.id for c in clients)
    assert sorted(e.subject for e in entries if e.action == "unlock") == sorted(c.id for c in clients)
    assert all(e.reason == "via fleetlock from 127.0.0.1" for e in entries if e.action in ("lock", "unlock"))
    assert sum(1 for c in clients if c.polls) >= CLIENTS - SLOTS  # the contention was real
    queued = sum(1 for c in history.changes if c.key.startswith("queue/") and c.kind == "put")
    print(json.dumps({"polls": sum(c.polls for c in clients), "grants": len(created), "queued": queued}))
