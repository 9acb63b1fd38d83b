"""Following a group's semaphore without queueing: ``Semaphore.follow() / snapshot() /
changed(since)``, read from the watch-driven mirror (real embedded etcd). The etcd-lock strategy
uses it for the group's numbers, overdue holders and the queue position in its status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fleetrig import StepClock
from test_semaphore import put_of, wait_event

from locksmith.embedded import EmbeddedEtcd
from locksmith.errors import CorruptValueError, LocksmithError
from locksmith.etcd import Etcd
from locksmith.keys import Layout
from locksmith.semaphore import Semaphore, read_state
from updateagent.config import LocksmithSettings
from updateagent.strategy.etcd_lock import EtcdSlot


@pytest.fixture
async def follower(etcd: Etcd, layout: Layout) -> AsyncIterator[Semaphore]:
    s = Semaphore(etcd, "g", prefix=layout.prefix)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def other(etcd: Etcd, layout: Layout) -> AsyncIterator[Semaphore]:
    """Another host's Semaphore (its own mirror and lease)."""
    s = Semaphore(etcd, "g", prefix=layout.prefix)
    try:
        yield s
    finally:
        await s.close()


async def test_a_follower_sees_the_group_change_without_joining_it(
        etcd: Etcd, layout: Layout, follower: Semaphore, other: Semaphore) -> None:
    assert follower.snapshot() is None  # not followed yet
    await follower.follow()
    st = follower.snapshot()
    assert st is not None and (st.holders, st.queue, st.max) == ([], [], 1)
    wait = asyncio.create_task(follower.changed(st.revision))
    await asyncio.sleep(0)
    assert not wait.done()  # nothing changed yet
    h = await other.lock("a")
    revision = await asyncio.wait_for(wait, 10)
    assert revision >= h.revision
    st = follower.snapshot()
    assert st is not None and st.revision == revision and [x.id for x in st.holders] == ["a"]
    assert st.available == 0
    # A second waiter joins the line: the follower sees it, and only it (no key, no lease of its own).
    b = asyncio.create_task(other.lock("b"))
    while not (st := follower.snapshot()) or not st.queue:
        await asyncio.wait_for(follower.changed(st.revision if st else 0), 10)
    fresh = await read_state(etcd, "g", prefix=layout.prefix)
    assert [w.id for w in st.queue] == [w.id for w in fresh.queue] == ["b"]
    assert [x.id for x in fresh.holders] == ["a"]
    await other.unlock("a")
    assert (await asyncio.wait_for(b, 10)).id == "b"


async def test_changed_answers_at_once_when_the_mirror_is_already_past(
        etcd: Etcd, layout: Layout, follower: Semaphore, other: Semaphore) -> None:
    await follower.follow()
    st0 = follower.snapshot()
    assert st0 is not None
    since = await etcd.revision()
    await other.lock("a")
    await wait_event(etcd, layout.holders, since + 1, put_of(layout.holder("a")))
    reached = await asyncio.wait_for(follower.changed(st0.revision), 10)
    # The change happened before this call: nothing is waited for, nothing missed.
    async with asyncio.timeout(1):
        assert await follower.changed(st0.revision) == reached


async def test_changed_starts_following_and_ends_with_close(follower: Semaphore, other: Semaphore) -> None:
    revision = await follower.changed(0)  # starts the mirror: the group's revision at once
    assert revision > 0 and follower.snapshot() is not None
    pending = asyncio.create_task(follower.changed(revision))
    await asyncio.sleep(0)
    await follower.close()
    with pytest.raises(LocksmithError, match="closed"):
        await asyncio.wait_for(pending, 10)
    assert follower.snapshot() is None
    with pytest.raises(LocksmithError, match="closed"):
        await follower.changed(0)


async def test_a_corrupt_value_is_reported_and_still_followed(
        etcd: Etcd, layout: Layout, follower: Semaphore) -> None:
    await follower.follow()
    st = follower.snapshot()
    assert st is not None
    await etcd.put(layout.holder("x"), b"not json")
    revision = await asyncio.wait_for(follower.changed(st.revision), 10)
    with pytest.raises(CorruptValueError, match="holders/x"):
        follower.snapshot()
    # Its revision is given all the same, so a follower waits for the fix, not in a loop.
    await etcd.delete(layout.holder("x"))
    fixed = await asyncio.wait_for(follower.changed(revision), 10)
    st = follower.snapshot()
    assert st is not None and fixed > revision and st.holders == []


async def test_a_queued_etcd_slot_wakes_when_the_line_ahead_moves(
        etcd: Etcd, layout: Layout, other: Semaphore) -> None:
    """The coordinator's status shows the queue as it moves: a waiter ahead leaving wakes
    ``wait_changed`` of a queued host although its own turn has not come (the slot is held),
    here with no rate limit on those refreshes."""
    await other.lock("holder")
    since = await etcd.revision()
    ahead = asyncio.create_task(other.lock("ahead"))
    await wait_event(etcd, layout.queue, since + 1, put_of(layout.waiter("ahead")))
    slot = EtcdSlot(LocksmithSettings(group="g", prefix=layout.prefix), etcd=etcd)
    slot.position_refresh = 0.0
    await slot.open("me")
    try:
        acquire = asyncio.create_task(slot.acquire("test"))
        await asyncio.sleep(0)  # acquire() has begun: the slot is queueing
        while (q := slot.queue()) is None or q.length < 2:
            await asyncio.wait_for(slot.wait_changed(), 10)
        assert (q.position, q.length, q.holders) == (2, 2, 1)
        woken = asyncio.create_task(slot.wait_changed())
        await asyncio.sleep(0)
        assert not woken.done()
        ahead.cancel()  # the waiter ahead leaves the line; the slot stays held
        await asyncio.wait_for(woken, 10)
        while (q := slot.queue()) is not None and q.length > 1:
            await asyncio.wait_for(slot.wait_changed(), 10)
        assert q is not None and (q.position, q.length, q.holders) == (1, 1, 1)
        assert not acquire.done()
        acquire.cancel()
        with pytest.raises(asyncio.CancelledError):
            await acquire
    finally:
        await slot.close()
    with pytest.raises(asyncio.CancelledError):
        await ahead


async def test_moves_of_the_line_wake_a_queued_etcd_slot_at_most_every_position_refresh(
        etcd: Etcd, layout: Layout, other: Semaphore, follower: Semaphore) -> None:
    """A line of a thousand hosts moves all the time: a queued host's coordinator is woken for
    its place in the line at most once per ``position_refresh`` (the read is always current)."""
    await other.lock("holder")
    since = await etcd.revision()
    ahead = [asyncio.create_task(other.lock(f"ahead{i}")) for i in range(2)]
    for i in range(2):
        await wait_event(etcd, layout.queue, since + 1, put_of(layout.waiter(f"ahead{i}")))
    clock = StepClock()
    slot = EtcdSlot(LocksmithSettings(group="g", prefix=layout.prefix), etcd=etcd, clock=clock)
    slot.position_refresh = 60.0
    await slot.open("me")
    await follower.follow()
    try:
        acquire = asyncio.create_task(slot.acquire("test"))
        await asyncio.sleep(0)
        while (q := slot.queue()) is None or q.length < 3:
            await asyncio.wait_for(slot.wait_changed(), 10)
        assert (q.position, q.length) == (3, 3)
        await slot.tend(clock.now())  # as the coordinator does before each wait: the holder is seen
        woken = asyncio.create_task(slot.wait_changed())
        st = follower.snapshot()
        assert st is not None
        ahead[0].cancel()  # the line moves within the minute: no wake yet
        while (st := follower.snapshot()) is not None and len(st.queue) > 2:
            await asyncio.wait_for(follower.changed(st.revision), 10)
        for _ in range(5):
            await asyncio.sleep(0)
        assert not woken.done()
        q = slot.queue()
        assert q is not None and (q.position, q.length) == (2, 2)  # but a read is current
        clock.advance(61)  # the deferred refresh comes due
        await asyncio.wait_for(woken, 10)
        acquire.cancel()
        with pytest.raises(asyncio.CancelledError):
            await acquire
    finally:
        await slot.close()
    for t in ahead:
        t.cancel()
    await asyncio.gather(*ahead, return_exceptions=True)


async def test_closing_one_semaphore_ends_only_its_own_lock_calls(
        etcd: Etcd, layout: Layout, other: Semaphore) -> None:
    """Two Semaphores on one client share the group's mirror; each still ends on its own close:
    the other's waiter keeps its place and is granted."""
    a = Semaphore(etcd, "g", prefix=layout.prefix)
    b = Semaphore(etcd, "g", prefix=layout.prefix)
    try:
        await other.lock("holder")  # the one slot (no policy: max 1)
        since = await etcd.revision()
        waits_a = asyncio.create_task(a.lock("x"))
        await wait_event(etcd, layout.queue, since + 1, put_of(layout.waiter("x")))
        waits_b = asyncio.create_task(b.lock("y"))
        await wait_event(etcd, layout.queue, since + 1, put_of(layout.waiter("y")))
        await a.close()
        with pytest.raises(LocksmithError, match="closed"):
            await asyncio.wait_for(waits_a, 10)
        assert not waits_b.done()
        assert await other.unlock("holder")
        granted = await asyncio.wait_for(waits_b, 10)
        assert granted.id == "y"
        st = await read_state(etcd, "g", prefix=layout.prefix)
        assert [h.id for h in st.holders] == ["y"] and st.queue == []  # x left the line on close
    finally:
        await a.close()
        await b.close()


TXNS = 'grpc_server_handled_total{grpc_code="OK",grpc_method="Txn",grpc_service="etcdserverpb.KV",grpc_type="unary"}'


async def test_a_herd_in_one_process_sends_no_more_fast_path_grants_than_free_slots(
        etcd_server: EmbeddedEtcd, etcd: Etcd, layout: Layout, other: Semaphore) -> None:
    """Twenty lock() calls at once on an idle group with 2 slots (a FleetLock server, a simulated
    fleet): a few grant transactions per free slot, not one per caller of which all but the
    winners must fail (21 transactions, 19 failed, before)."""
    await other.set_max(2)
    since = await etcd.revision()
    before = etcd_server.metrics().get(TXNS, 0.0)
    waits = [asyncio.create_task(other.lock(f"h{i}")) for i in range(20)]
    try:
        seen = since
        while True:  # until both slots are taken and the rest wait in line, as the watch shows it
            st = other.snapshot()
            if st is not None and len(st.holders) == 2 and len(st.queue) == 18:
                break
            seen = await asyncio.wait_for(other.changed(seen), 10)
        st = await read_state(etcd, "g", prefix=layout.prefix)
        assert len(st.holders) == 2 and len(st.queue) == 18
        # Per free slot at most: one fast-path try, one grant from the line, one lost race.
        assert etcd_server.metrics().get(TXNS, 0.0) - before <= 3 * 2
    finally:
        for t in waits:
            t.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
