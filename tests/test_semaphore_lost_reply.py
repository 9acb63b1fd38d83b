"""The semaphore when etcd's answer does not reach it (issue 7, defects 1, 2, 3, 5 and the
cancelled lock of issue 8): every answer lock()/unlock() give is true, and nothing is left behind.

A lost reply is made with the adapter's test-only switch (``Etcd.lost_replies``): the transaction
really commits on the real embedded etcd, then the call sees UNAVAILABLE and the adapter's own
retry runs, as when the member that forwarded the request dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from test_semaphore import delete_of, put_of, queued, wait_event

from locksmith import audit, semaphore
from locksmith.errors import EtcdUnavailableError
from locksmith.etcd import Etcd, EtcdConfig, Event, KeyValue, LostReply, WatchBatch
from locksmith.keys import Layout
from locksmith.semaphore import Semaphore, read_state


def _puts(request: Any) -> list[str]:
    return [op.request_put.key.decode() for op in request.success if op.HasField("request_put")]


def _deletes(request: Any) -> list[str]:
    return [op.request_delete_range.key.decode() for op in request.success if op.HasField("request_delete_range")]


@contextlib.contextmanager
def lost_reply(etcd: Etcd, match: Callable[[Any], bool], *, every_attempt: bool = False) -> Iterator[LostReply]:
    """Lose the reply of the first transaction attempt ``match``es (it commits, then the call sees
    UNAVAILABLE and the adapter retries); with ``every_attempt`` every attempt of the call, so it
    fails with its outcome unknown."""
    fault = LostReply("Txn", count=1_000_000 if every_attempt else 1, match=match)
    etcd.lost_replies.append(fault)
    try:
        yield fault
    finally:
        etcd.lost_replies.remove(fault)


def grant_of(layout: Layout, holder_id: str) -> Callable[[Any], bool]:
    return lambda req: layout.holder(holder_id) in _puts(req)


def release_of(layout: Layout, holder_id: str) -> Callable[[Any], bool]:
    return lambda req: layout.holder(holder_id) in _deletes(req)


@pytest.fixture
async def client(etcd_config: EtcdConfig) -> AsyncIterator[Etcd]:
    """The connection the faults are put on. A member whose reply was lost is passed over only
    briefly, so that with one member the adapter retries within the call (the "first reply
    lost" cases) and a call whose every reply is lost gives up in 2 s."""
    c = await Etcd.connect(dataclasses.replace(etcd_config, member_cooldown=0.05, timeout=2.0))
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def sem(client: Etcd, prefix: str) -> AsyncIterator[Semaphore]:
    s = Semaphore(client, "g", prefix=prefix)
    try:
        yield s
    finally:
        await s.close()


async def _holder_rev(etcd: Etcd, layout: Layout, holder_id: str) -> int:
    kv = await etcd.get(layout.holder(holder_id))
    assert kv is not None, f"{holder_id} holds no key"
    return kv.mod_revision


# -- defect 1: a lost reply on a fast-path grant ------------------------------------------------


async def test_lost_reply_on_fast_path_grant_returns_the_grant(etcd: Etcd, sem: Semaphore, layout: Layout) -> None:
    # Before: the retry failed "holders/a absent" on our own commit, lock() enqueued behind itself
    # and waited for ever while holding the only slot.
    with lost_reply(sem.etcd, grant_of(layout, "a")) as lost:
        h = await asyncio.wait_for(sem.lock("a"), 10)
    assert lost.dropped == 1 and h.revision == await _holder_rev(etcd, layout, "a")
    st = await read_state(etcd, "g", prefix=layout.prefix)
    assert [x.id for x in st.holders] == ["a"]
    assert await sem.unlock("a") is True
    assert (await asyncio.wait_for(sem.lock("b"), 10)).id == "b"  # the group is not deadlocked


async def test_lost_reply_on_fast_path_every_retry_fails(etcd: Etcd, sem: Semaphore, layout: Layout) -> None:
    # Every attempt's reply is lost: etcd3aio gives up, the outcome is unknown, a read-back tells.
    with lost_reply(sem.etcd, grant_of(layout, "a"), every_attempt=True) as lost:
        h = await asyncio.wait_for(sem.lock("a"), 30)
    assert lost.dropped >= 1 and h.revision == await _holder_rev(etcd, layout, "a")
    assert (await read_state(etcd, "g", prefix=layout.prefix)).queue == []


# -- a lost reply on a grant from the queue -----------------------------------------------------


@pytest.mark.parametrize("every_attempt", [False, True])
async def test_lost_reply_on_queued_grant(etcd: Etcd, sem: Semaphore, layout: Layout, every_attempt: bool) -> None:
    await sem.lock("a")
    other = Semaphore(sem.etcd, "g", prefix=layout.prefix)
    try:
        task = await queued(etcd, other, "w", await etcd.revision())
        with lost_reply(other.etcd, grant_of(layout, "w"), every_attempt=every_attempt) as lost:
            assert await sem.unlock("a")
            h = await asyncio.wait_for(task, 30)
        assert lost.dropped >= 1 and h.id == "w" and h.revision == await _holder_rev(etcd, layout, "w")
        st = await read_state(etcd, "g", prefix=layout.prefix)
        assert ([x.id for x in st.holders], st.queue) == (["w"], [])
    finally:
        await other.close()


# -- defect 3: unlock after a lost reply says what happened ---------------------------------------


@pytest.mark.parametrize("every_attempt", [False, True])
async def test_lost_reply_on_unlock_reports_the_release(
    etcd: Etcd, sem: Semaphore, layout: Layout, every_attempt: bool
) -> None:
    # Before: the retry failed its compare on our own delete and unlock() answered False ("does
    # not hold a slot"), or raised EtcdUnavailableError, although the slot was released.
    await sem.lock("a")
    with lost_reply(sem.etcd, release_of(layout, "a"), every_attempt=every_attempt) as lost:
        assert await asyncio.wait_for(sem.unlock("a"), 30) is True
    assert lost.dropped >= 1 and await etcd.get(layout.holder("a")) is None
    assert await sem.unlock("a") is False  # and a second unlock is told the truth too
    entries = [e for e in await audit.read(etcd, layout) if e.action == "unlock"]
    assert len(entries) == 1


# -- defect 2: lock() returns only a holder it read fresh or wrote ------------------------------


class _LeakyStream(Etcd):
    """A real connection whose watch delivers more than the range asked for: every group's
    events, as a stream that mixes up its watches would. The semaphore must not take another
    group's grant of the same id for its own."""

    async def watch_prefix(self, prefix: str, *, start_revision: int, max_backoff: float = 5.0
                           ) -> AsyncIterator[WatchBatch]:
        wider = prefix.rsplit("/", 2)[0] + "/" if prefix.endswith("/groups/g1/") else prefix
        async for batch in super().watch_prefix(wider, start_revision=start_revision, max_backoff=max_backoff):
            yield batch


async def test_lock_never_returns_another_groups_grant(etcd_config: EtcdConfig, etcd: Etcd, prefix: str) -> None:
    # The phantom of the issue: Holder(revision=<another group's grant>) returned without a grant
    # of ours, and unlock() then finding nothing.
    g1, g2 = Layout("g1", prefix), Layout("g2", prefix)
    leaky = await _LeakyStream.connect(etcd_config)
    s1 = Semaphore(leaky, "g1", prefix=prefix)
    s2, s2b = Semaphore(etcd, "g2", prefix=prefix), Semaphore(etcd, "g2", prefix=prefix)
    try:
        await s1.lock("a")
        await s2.lock("a")
        rev = await etcd.revision()
        waiting_g1 = await queued(etcd, s1, "b", rev)
        waiting_g2 = await queued(etcd, s2b, "b", await etcd.revision())
        assert await s2.unlock("a")
        g2_grant = await asyncio.wait_for(waiting_g2, 10)  # g2's b: holder put + queue delete
        # g1's mirror gets g2's grant before g1's release (one ordered stream), so a lock() that
        # took it for its own has returned it by the time g1's own grant could happen.
        assert await s1.unlock("a")
        mine = await asyncio.wait_for(waiting_g1, 10)
        assert mine.revision == await _holder_rev(etcd, g1, "b") != g2_grant.revision
        assert await _holder_rev(etcd, g2, "b") == g2_grant.revision
    finally:
        for s in (s1, s2, s2b):
            await s.close()
        await leaky.close()


class _ForgedStream(Etcd):
    """A real connection whose watch, once it has delivered ``queue/b``'s put, also delivers a
    grant of ``b`` that never happened (holder put + queue delete), as a stream replaying a stale
    or misrouted batch would."""

    async def watch_prefix(self, prefix: str, *, start_revision: int, max_backoff: float = 5.0
                           ) -> AsyncIterator[WatchBatch]:
        forged = False
        async for batch in super().watch_prefix(prefix, start_revision=start_revision, max_backoff=max_backoff):
            yield batch
            for ev in batch.events:
                if not forged and ev.kind == "put" and ev.kv.key == prefix + "queue/b":
                    forged = True
                    record = json.dumps({"format_version": 1, "id": "b", "since": "2024-01-01T00:00:00+00:00",
                                         "deadline": None, "reason": "", "by": "ghost"}).encode()
                    rev = ev.kv.mod_revision
                    yield WatchBatch(rev, [
                        Event("put", KeyValue(prefix + "holders/b", record, rev, rev, 1)),
                        Event("delete", KeyValue(prefix + "queue/b", b"", 0, rev, 0)),
                    ])


async def test_lock_never_returns_a_holder_only_its_mirror_shows(
    etcd_config: EtcdConfig, etcd: Etcd, sem: Semaphore, layout: Layout
) -> None:
    await sem.lock("a")
    forged = await _ForgedStream.connect(etcd_config)
    waiting = Semaphore(forged, "g", prefix=layout.prefix)
    waiting.mirror_check_every = 1.0  # the self-check repairs the mirror within seconds
    try:
        task = await queued(etcd, waiting, "b", await etcd.revision())
        assert await sem.unlock("a")
        h = await asyncio.wait_for(task, 20)
        assert h.by != "ghost" and h.revision == await _holder_rev(etcd, layout, "b")
    finally:
        await waiting.close()
        await forged.close()


# -- defect 5: a waiter whose lease expired re-queues, even when its watch has stalled ----------


class _StalledStream(Etcd):
    """A real connection whose watches deliver nothing after they are created: a frozen member."""

    async def watch_prefix(self, prefix: str, *, start_revision: int, max_backoff: float = 5.0
                           ) -> AsyncIterator[WatchBatch]:
        yield WatchBatch(start_revision - 1, [], created=True)
        await asyncio.Future()


async def test_waiter_whose_lease_expired_requeues_though_its_watch_stalled(
    etcd_config: EtcdConfig, etcd: Etcd, sem: Semaphore, layout: Layout
) -> None:
    # Before: the waiter logged lease_expired and waited for ever for its mirror to show its key
    # gone; it was in no queue and never served.
    await sem.lock("a")
    frozen = await _StalledStream.connect(etcd_config)
    waiting = Semaphore(frozen, "g", prefix=layout.prefix, lease_ttl=3)
    waiting.mirror_check_every = 1.0
    try:
        rev = await etcd.revision()
        task = asyncio.create_task(waiting.lock("w"))
        first = await wait_event(etcd, layout.queue, rev + 1, put_of(layout.waiter("w")))
        await etcd.lease_revoke(first.kv.lease)  # as if the lease had expired
        again = await wait_event(etcd, layout.queue, first.kv.mod_revision + 1,
                                 lambda ev: put_of(layout.waiter("w"))(ev) and ev.kv.version == 1, within=15)
        assert again.kv.lease not in (0, first.kv.lease)
        assert await sem.unlock("a")
        assert (await asyncio.wait_for(task, 20)).id == "w"  # served without a working watch
    finally:
        await waiting.close()
        await frozen.close()


# -- issue 8: a lock() cancelled while its grant commits leaves no slot behind -------------------


async def test_lock_cancelled_as_its_grant_commits_releases_the_slot(
    etcd: Etcd, sem: Semaphore, layout: Layout
) -> None:
    await sem.lock("a")
    other = Semaphore(etcd, "g", prefix=layout.prefix, lease_ttl=60)
    task = await queued(etcd, other, "w", await etcd.revision())
    committed: list[bool] = []

    def cancel_on_commit(request: Any) -> bool:
        # Called once the attempt's reply is in: the grant has committed.
        if grant_of(layout, "w")(request) and not committed:
            committed.append(True)
            task.cancel()  # the window closed just as the grant committed
        return False

    fault = LostReply("Txn", match=cancel_on_commit)
    try:
        rev = await etcd.revision()
        other.etcd.lost_replies.append(fault)
        await sem.unlock("a")
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert committed, "the grant never committed"
        # The grant that nobody will use is released, and the trail says so.
        await wait_event(etcd, layout.holders, rev + 1, delete_of(layout.holder("w")), within=10)
        st = await read_state(etcd, "g", prefix=layout.prefix)
        assert (st.holders, st.queue) == ([], [])
        entries = [e for e in await audit.read(etcd, layout) if e.subject == "w"]
        assert [e.action for e in entries] == ["lock", "unlock"] and entries[1].detail.get("unreturned")
    finally:
        if fault in etcd.lost_replies:
            etcd.lost_replies.remove(fault)
        await other.close()


async def test_lock_again_right_after_a_cancel_gets_a_slot_it_really_has(
    etcd: Etcd, sem: Semaphore, layout: Layout
) -> None:
    # The cancelled call's clean-up releases the grant nobody was given; a new lock() of the same
    # id must not return that grant as its own just before it goes.
    await sem.lock("a")
    other = Semaphore(etcd, "g", prefix=layout.prefix, lease_ttl=60)
    task = await queued(etcd, other, "w", await etcd.revision())
    cancelled: list[bool] = []

    def cancel_on_commit(request: Any) -> bool:
        if grant_of(layout, "w")(request) and not cancelled:
            cancelled.append(True)
            task.cancel()
        return False

    fault = LostReply("Txn", match=cancel_on_commit)
    other.etcd.lost_replies.append(fault)
    try:
        await sem.unlock("a")
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        again = await asyncio.wait_for(other.lock("w"), 10)
        assert again.revision == await _holder_rev(etcd, layout, "w")
        assert await other.unlock("w") is True
    finally:
        other.etcd.lost_replies.remove(fault)
        await other.close()


def _unreadable_holder_key(sem: Semaphore, holder_id: str) -> list[bool]:
    """Make ``get`` of the holder key fail (the read-back after an unknown outcome) until the
    returned flag is cleared; every other read works."""
    fail = [True]
    client = sem.etcd
    real_get = client.get

    async def get(key: str) -> Any:
        if fail[0] and key == sem.layout.holder(holder_id):
            raise EtcdUnavailableError("etcd unreachable at test: injected")
        return await real_get(key)

    client.get = get  # type: ignore[method-assign]
    return fail


async def test_lock_that_raises_after_an_unknown_outcome_holds_nothing(
    etcd: Etcd, sem: Semaphore, layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every reply lost *and* the read-back unanswered, with no outage tolerated: lock() cannot
    # know, so it raises, and the grant that did commit is released once etcd answers.
    monkeypatch.setattr(semaphore, "_READ_BACK_DELAYS", (0.05, 0.05), raising=False)
    sem.outage_tolerance = 0
    fail = _unreadable_holder_key(sem, "a")
    rev = await etcd.revision()
    with lost_reply(sem.etcd, grant_of(layout, "a"), every_attempt=True):
        with pytest.raises(EtcdUnavailableError, match="outcome unknown"):
            await asyncio.wait_for(sem.lock("a"), 30)
    fail[0] = False
    await wait_event(etcd, layout.holders, rev + 1, delete_of(layout.holder("a")), within=15)
    assert (await read_state(etcd, "g", prefix=layout.prefix)).holders == []
    entries = [e for e in await audit.read(etcd, layout) if e.subject == "a"]
    assert [e.action for e in entries] == ["lock", "unlock"]
    assert entries[1].detail["unreturned"] is True


async def test_lock_rides_out_an_unknown_outcome_and_returns_its_grant(
    etcd: Etcd, sem: Semaphore, layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same, with the default outage tolerance: lock() keeps waiting and recognises its grant
    # (its own nonce) by the next fresh read, instead of giving up its place.
    monkeypatch.setattr(semaphore, "_READ_BACK_DELAYS", (0.05, 0.05), raising=False)
    _unreadable_holder_key(sem, "a")
    with lost_reply(sem.etcd, grant_of(layout, "a"), every_attempt=True):
        h = await asyncio.wait_for(sem.lock("a"), 30)
    assert h.revision == await _holder_rev(etcd, layout, "a")
    st = await read_state(etcd, "g", prefix=layout.prefix)
    assert ([x.id for x in st.holders], st.queue) == (["a"], [])
