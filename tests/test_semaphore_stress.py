"""200 contenders on 10 connections, 2,000 lock/unlock cycles, max 3, checked revision by revision
by an independent watcher: never more than 3 holders, and every grant is FIFO."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from locksmith.etcd import Etcd, EtcdConfig, Event
from locksmith.keys import Layout
from locksmith.semaphore import Semaphore

OBJECTS = 10
PER_OBJECT = 20
CYCLES = 10  # per contender: 200 x 10 = 2,000 cycles
MAX = 3


async def _record(etcd: Etcd, base: str, start: int, end_key: str) -> list[Event]:
    events: list[Event] = []
    async for batch in etcd.watch_prefix(base, start_revision=start):
        for ev in batch.events:
            if ev.kv.key == end_key:
                return events
            events.append(ev)
    raise AssertionError("watch ended")


def _check(events: list[Event], layout: Layout) -> tuple[int, int]:
    """Replay the watcher's events revision by revision. Returns (grants, highest holder count)."""
    holders: set[str] = set()
    queue: dict[str, int] = {}  # id -> create_revision
    grants = peak = 0
    by_rev: dict[int, list[Event]] = {}
    for ev in events:
        by_rev.setdefault(ev.kv.mod_revision, []).append(ev)
    for rev in sorted(by_rev):
        evs = by_rev[rev]
        for ev in evs:
            if ev.kind == "put" and ev.kv.key.startswith(layout.holders):
                who = ev.kv.key[len(layout.holders):]
                assert who not in holders, f"{who} granted twice at revision {rev}"
                available = MAX - len(holders)
                mine = queue.get(who, rev)  # not queued: the fast path, which needs an empty queue
                ahead = sum(1 for w, c in queue.items() if c < mine and w != who)
                assert ahead < available, (
                    f"grant of {who} at revision {rev} not FIFO: {ahead} waiter(s) ahead still queued, "
                    f"{available} slot(s) were free"
                )
                grants += 1
        for ev in evs:
            key = ev.kv.key
            if key.startswith(layout.holders):
                who = key[len(layout.holders):]
                if ev.kind == "put":
                    holders.add(who)
                else:
                    holders.discard(who)
            elif key.startswith(layout.queue):
                who = key[len(layout.queue):]
                if ev.kind == "put":
                    queue.setdefault(who, ev.kv.create_revision)
                else:
                    queue.pop(who, None)
        assert len(holders) <= MAX, f"{len(holders)} holders at revision {rev}: {sorted(holders)}"
        peak = max(peak, len(holders))
    return grants, peak


async def test_two_hundred_contenders_never_exceed_max_and_stay_fifo(
    etcd: Etcd, etcd_config: EtcdConfig, prefix: str
) -> None:
    layout = Layout("g", prefix)
    setup = Semaphore(etcd, "g", prefix=prefix)
    start = await setup.set_max(MAX)
    await setup.close()
    end_key = layout.base + "zz-test-end"  # not a semaphore key: the mirrors ignore it
    watcher_conn = await Etcd.connect(etcd_config)
    watcher = asyncio.create_task(_record(watcher_conn, layout.base, start + 1, end_key))

    conns = [await Etcd.connect(etcd_config) for _ in range(OBJECTS)]
    sems = [Semaphore(c, "g", prefix=prefix) for c in conns]
    held_now = 0
    peak_local = 0
    done = Counter[str]()

    async def contender(sem: Semaphore, holder_id: str) -> None:
        nonlocal held_now, peak_local
        for _ in range(CYCLES):
            await sem.lock(holder_id)
            held_now += 1
            peak_local = max(peak_local, held_now)
            # Hold briefly (simulated work, not synchronisation): long enough that a queue builds up
            # and slots free one at a time, which is where an unfair grant would show.
            await asyncio.sleep(random.uniform(0, 0.01))
            held_now -= 1
            assert await sem.unlock(holder_id)
            done[holder_id] += 1

    try:
        async with asyncio.timeout(120):
            await asyncio.gather(*(
                contender(sem, f"n{i}-{j}") for i, sem in enumerate(sems) for j in range(PER_OBJECT)
            ))
            await etcd.put(end_key, b"")
            events = await watcher
    finally:
        watcher.cancel()
        for s in sems:
            await s.close()
        for c in conns:
            await c.close()
        await watcher_conn.close()

    assert sum(done.values()) == OBJECTS * PER_OBJECT * CYCLES
    grants, peak = _check(events, layout)
    assert grants == OBJECTS * PER_OBJECT * CYCLES
    assert peak == MAX  # the semaphore was really contended
    assert peak_local <= MAX
