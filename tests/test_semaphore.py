"""The reboot semaphore against a real embedded etcd: semantics, processes that die, corrupt values."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from locksmith.embedded import EmbeddedEtcd
from locksmith.errors import (
    CorruptValueError,
    EtcdError,
    EtcdUnavailableError,
    InvalidArgumentError,
    LocksmithError,
    SlotUnavailableError,
)
from locksmith.etcd import Etcd, EtcdConfig, Event
from locksmith.keys import Layout
from locksmith.semaphore import Holder, Semaphore, _Mirror, list_groups, read_state

PROC = Path(__file__).with_name("semaphore_proc.py")


# -- helpers ------------------------------------------------------------------------------------


async def wait_event(
    etcd: Etcd, prefix: str, start_revision: int, pred: Callable[[Event], bool], within: float = 10.0
) -> Event:
    """The first event under ``prefix`` from ``start_revision`` on that satisfies ``pred``.
    Watching from a revision read before acting means the event cannot be missed."""
    async with asyncio.timeout(within):
        async for batch in etcd.watch_prefix(prefix, start_revision=start_revision):
            for ev in batch.events:
                if pred(ev):
                    return ev
    raise AssertionError("watch ended")


def put_of(key: str) -> Callable[[Event], bool]:
    return lambda ev: ev.kind == "put" and ev.kv.key == key


def delete_of(key: str) -> Callable[[Event], bool]:
    return lambda ev: ev.kind == "delete" and ev.kv.key == key


async def queued(etcd: Etcd, sem: Semaphore, holder_id: str, since: int, **kw: object) -> asyncio.Task:
    """Start sem.lock(holder_id) and return once its queue key is in etcd."""
    task = asyncio.create_task(sem.lock(holder_id, **kw))  # type: ignore[arg-type]
    await wait_event(etcd, sem.layout.queue, since + 1, put_of(sem.layout.waiter(holder_id)))
    assert not task.done()
    return task


# -- semantics ----------------------------------------------------------------------------------


async def test_default_max_is_one_and_holder_record(etcd: Etcd, sem: Semaphore, layout: Layout) -> None:
    h = await sem.lock("a", reason="kernel update", hold_for=timedelta(minutes=5))
    assert (h.id, h.reason, h.deadline - h.since) == ("a", "kernel update", timedelta(minutes=5))
    kv = await etcd.get(layout.holder("a"))
    assert kv is not None and kv.lease == 0  # survives the holder's process
    rec = json.loads(kv.value)
    assert rec["format_version"] == 1 and rec["id"] == "a" and rec["by"] == h.by and "@" in h.by
    with pytest.raises(SlotUnavailableError, match="no free slot: 1 of 1"):
        await sem.try_lock("b")
    st = await read_state(etcd, "g", prefix=sem.layout.prefix)
    assert (st.max, st.available, [x.id for x in st.holders], st.paused) == (1, 0, ["a"], False)
    assert await list_groups(etcd, prefix=sem.layout.prefix) == ["g"]


async def test_recursive_lock_writes_nothing(etcd: Etcd, sem: Semaphore) -> None:
    first = await sem.lock("a")
    rev = await etcd.revision()
    assert await sem.lock("a") == first
    assert await sem.try_lock("a") == first
    other = Semaphore(etcd, "g", prefix=sem.layout.prefix)
    assert (await other.lock("a")).revision == first.revision
    await other.close()
    assert await etcd.revision() == rev


async def test_unlock_by_non_holder_changes_nothing(etcd: Etcd, sem: Semaphore) -> None:
    await sem.lock("a")
    rev = await etcd.revision()
    assert await sem.unlock("b") is False
    assert await etcd.revision() == rev
    assert await sem.unlock("a") is True
    assert await sem.unlock("a") is False
    assert (await sem.state()).holders == []


async def test_unlock_then_lock_again_is_a_new_grant(etcd: Etcd, sem: Semaphore) -> None:
    # The mirror may still show the old holder; lock() must not return it.
    first = await sem.lock("a")
    await sem.unlock("a")
    second = await sem.lock("a")
    assert second.revision > first.revision
    assert [h.id for h in (await sem.state()).holders] == ["a"]


async def test_invalid_arguments(sem: Semaphore) -> None:
    with pytest.raises(InvalidArgumentError):
        await sem.lock("bad id")
    with pytest.raises(InvalidArgumentError):
        await sem.set_max(0)
    with pytest.raises(InvalidArgumentError):
        await sem.try_lock("a", hold_for=timedelta(0))
    for take in (sem.lock, sem.try_lock):
        with pytest.raises(InvalidArgumentError, match="hold_for"):
            await take("a", hold_for=timedelta(days=3_000_000))
    assert (await sem.state()).holders == []


async def test_waiters_are_served_in_order(etcd: Etcd, sem: Semaphore) -> None:
    await sem.lock("a")
    rev = await etcd.revision()
    tasks = []
    for i in range(4):
        other = Semaphore(etcd, "g", prefix=sem.layout.prefix)
        tasks.append((other, await queued(etcd, other, f"w{i}", rev)))
        rev = await etcd.revision()
    with pytest.raises(SlotUnavailableError, match="4 waiter"):
        await sem.try_lock("late")
    order = []
    holder = "a"
    for _, task in tasks:
        assert await sem.unlock(holder)  # any object may release any id
        holder = (await asyncio.wait_for(task, 10)).id
        order.append(holder)
    assert order == ["w0", "w1", "w2", "w3"]
    for other, _ in tasks:
        await other.close()


async def test_pause_blocks_grants_until_removed(etcd: Etcd, sem: Semaphore, layout: Layout) -> None:
    await etcd.put(layout.pause, json.dumps({"format_version": 1, "reason": "incident", "by": "ops@x",
                                             "at": "2024-01-01T00:00:00+00:00"}).encode())
    with pytest.raises(SlotUnavailableError, match="paused"):
        await sem.try_lock("a")
    rev = await etcd.revision()
    task = await queued(etcd, sem, "a", rev)
    assert (await sem.state()).paused
    await etcd.delete(layout.pause)
    assert (await asyncio.wait_for(task, 10)).id == "a"


async def test_set_max_up_admits_at_once_and_down_evicts_nobody(etcd: Etcd, sem: Semaphore) -> None:
    await sem.lock("a")
    rev = await etcd.revision()
    others = [Semaphore(etcd, "g", prefix=sem.layout.prefix) for _ in range(3)]
    tasks = {}
    for i, other in enumerate(others):
        tasks[f"w{i}"] = await queued(etcd, other, f"w{i}", rev)
        rev = await etcd.revision()

    # Up: the first two waiters are admitted by the policy change alone, the third keeps waiting.
    set_rev = await sem.set_max(3)
    b, c = await asyncio.wait_for(asyncio.gather(tasks["w0"], tasks["w1"]), 10)
    assert set_rev < b.revision and set_rev < c.revision
    st = await sem.state()
    assert sorted(h.id for h in st.holders) == ["a", "w0", "w1"] and [w.id for w in st.queue] == ["w2"]

    # Down: nobody is evicted; w2 gets a slot only once fewer than 1 remain held.
    await sem.set_max(1)
    st = await sem.state()
    assert (st.max, len(st.holders), st.available) == (1, 3, 0)
    unlock_revs = []
    for holder_id, owner in (("a", sem), ("w0", others[0]), ("w1", others[1])):
        assert await owner.unlock(holder_id)
        unlock_revs.append(await etcd.revision())
    d = await asyncio.wait_for(tasks["w2"], 10)
    assert d.revision > unlock_revs[-1]  # not granted while 2 or 1 of the old holders remained
    for other in others:
        await other.close()


async def test_set_max_keeps_other_policy_fields(etcd: Etcd, sem: Semaphore, layout: Layout) -> None:
    await etcd.put(layout.policy, json.dumps({"format_version": 1, "slots": 1, "windows": ["Thu 04:00"]}).encode())
    await sem.set_max(4)
    kv = await etcd.get(layout.policy)
    assert kv is not None and json.loads(kv.value) == {"format_version": 1, "slots": 4, "windows": ["Thu 04:00"]}
    rev = await etcd.revision()
    assert await sem.set_max(4) == rev  # already so: nothing written
    assert await etcd.revision() == rev


async def test_cancelled_lock_leaves_the_queue(etcd: Etcd, sem: Semaphore, layout: Layout) -> None:
    await sem.lock("a")
    waiting = Semaphore(etcd, "g", prefix=sem.layout.prefix, lease_ttl=60)
    rev = await etcd.revision()
    task = await queued(etcd, waiting, "w", rev)
    task.cancel()
    # Gone well before the 60 s lease could expire: only the explicit delete explains it.
    await wait_event(etcd, layout.queue, rev + 1, delete_of(layout.waiter("w")), within=5)
    await waiting.close()


async def test_close_fails_pending_locks(etcd: Etcd, sem: Semaphore) -> None:
    await sem.lock("a")
    waiting = Semaphore(etcd, "g", prefix=sem.layout.prefix)
    task = await queued(etcd, waiting, "w", await etcd.revision())
    await waiting.close()
    with pytest.raises(LocksmithError, match="closed"):
        await asyncio.wait_for(task, 5)
    assert (await sem.state()).queue == []


async def test_waiter_whose_lease_is_lost_requeues(etcd: Etcd, sem: Semaphore, layout: Layout) -> None:
    await sem.lock("a")
    waiting = Semaphore(etcd, "g", prefix=sem.layout.prefix, lease_ttl=30)
    rev = await etcd.revision()
    task = asyncio.create_task(waiting.lock("w"))
    first = await wait_event(etcd, layout.queue, rev + 1, put_of(layout.waiter("w")))
    await etcd.lease_revoke(first.kv.lease)  # as if the lease had expired
    again = await wait_event(etcd, layout.queue, first.kv.mod_revision + 1,
                             lambda ev: put_of(layout.waiter("w"))(ev) and ev.kv.version == 1)
    assert again.kv.lease not in (0, first.kv.lease)
    await sem.unlock("a")
    assert (await asyncio.wait_for(task, 10)).id == "w"
    await waiting.close()


# -- processes ----------------------------------------------------------------------------------


def _spawn(cfg: EtcdConfig, prefix: str, holder_id: str, mode: str, ttl: int = 2) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(PROC), cfg.endpoints[0], prefix, "g", holder_id, mode, "--ttl", str(ttl)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=PROC.parent.parent,
    )


async def test_sigkilled_waiter_leaves_queue_within_ttl(
    etcd: Etcd, sem: Semaphore, layout: Layout, etcd_config: EtcdConfig, prefix: str
) -> None:
    await sem.lock("a")
    rev = await etcd.revision()
    proc = _spawn(etcd_config, prefix, "victim", "wait", ttl=2)
    try:
        put = await wait_event(etcd, layout.queue, rev + 1, put_of(layout.waiter("victim")), within=30)
        assert put.kv.lease != 0
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        await wait_event(etcd, layout.queue, put.kv.mod_revision + 1, delete_of(layout.waiter("victim")), within=10)
        # TTL 2 s after the last keep-alive, plus etcd's lease-expiry check interval.
        assert time.monotonic() - killed < 2 + 2.0
    finally:
        proc.kill()
        proc.wait()
    assert (await sem.state()).queue == []
    # The dead waiter no longer holds up the line.
    await sem.unlock("a")
    assert (await sem.try_lock("next")).id == "next"


async def test_holder_slot_survives_its_process(
    etcd: Etcd, sem: Semaphore, layout: Layout, etcd_config: EtcdConfig, prefix: str
) -> None:
    await sem.lock("a")
    rev = await etcd.revision()
    proc = _spawn(etcd_config, prefix, "node1", "hold", ttl=1)
    try:
        put = await wait_event(etcd, layout.queue, rev + 1, put_of(layout.waiter("node1")), within=30)
        await sem.unlock("a")
        out, err = await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 0, err.decode()
        assert out.decode().startswith("granted ")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Prove the process's lease is gone: a key put on it is deleted (or the put is refused).
    probe = layout.base + "probe"
    try:
        probe_rev = await etcd.put(probe, b"x", lease=put.kv.lease)
        await wait_event(etcd, probe, probe_rev + 1, delete_of(probe), within=10)
    except EtcdError as exc:
        assert "lease not found" in str(exc)
    st = await sem.state()
    assert [h.id for h in st.holders] == ["node1"]
    kv = await etcd.get(layout.holder("node1"))
    assert kv is not None and kv.lease == 0


# -- corrupt values -----------------------------------------------------------------------------

BAD_VALUES = {
    "not-json": b"{nope",
    "too-deep": b"[" * 100_000,  # json raises RecursionError, not ValueError, for this
    "json-list": b"[1, 2]",
    "wrong-version": json.dumps({"format_version": 2, "id": "x", "since": "2024-01-01T00:00:00+00:00",
                                 "slots": 1}).encode(),
    "locksmith-v2": json.dumps({"semaphore": 1, "max": 1, "holders": []}).encode(),
}


def _bad_key(layout: Layout, kind: str) -> str:
    return {"holder": layout.holder("x"), "queue": layout.waiter("x"), "policy": layout.policy,
            "pause": layout.pause}[kind]


@pytest.mark.parametrize("bad", sorted(BAD_VALUES))
@pytest.mark.parametrize("kind", ["holder", "queue", "policy", "pause"])
async def test_corrupt_value_is_named_and_nothing_is_written(
    etcd: Etcd, sem: Semaphore, layout: Layout, kind: str, bad: str
) -> None:
    await sem.set_max(2)
    await sem.lock("a")
    key = _bad_key(layout, kind)
    rev = await etcd.put(key, BAD_VALUES[bad])
    fresh = Semaphore(etcd, "g", prefix=sem.layout.prefix)
    try:
        attempts = [
            ("read_state", read_state(etcd, "g", prefix=sem.layout.prefix)),
            ("lock", asyncio.wait_for(fresh.lock("b"), 10)),
            ("try_lock", fresh.try_lock("b")),
            ("unlock", fresh.unlock("a")),
            ("set_max", fresh.set_max(3)),
        ]
        for what, aw in attempts:
            with pytest.raises(CorruptValueError) as info:
                await aw
            assert info.value.key == key, what
            assert key in str(info.value)
            assert await etcd.revision() == rev, f"{what} wrote despite a corrupt {kind}"
    finally:
        await fresh.close()


async def test_field_level_problems_are_named(etcd: Etcd, sem: Semaphore, layout: Layout) -> None:
    cases = {
        layout.policy: ({"format_version": 1, "slots": "3"}, "slots"),
        layout.holder("x"): ({"format_version": 1, "id": "y", "since": "2024-01-01T00:00:00+00:00"}, "'id'"),
        layout.waiter("x"): ({"format_version": 1, "id": "x", "since": "yesterday"}, "since"),
        layout.holder("bad key"): ({"format_version": 1}, "not a valid id"),
    }
    for key, (value, word) in cases.items():
        await etcd.put(key, json.dumps(value).encode())
        with pytest.raises(CorruptValueError, match=word) as info:
            await sem.try_lock("b")
        assert info.value.key == key
        await etcd.delete(key)


async def test_waiting_lock_raises_on_corruption_and_mirror_recovers(
    etcd: Etcd, sem: Semaphore, layout: Layout
) -> None:
    await sem.lock("a")
    waiting = Semaphore(etcd, "g", prefix=sem.layout.prefix)
    task = await queued(etcd, waiting, "w", await etcd.revision())
    await etcd.put(layout.policy, b"garbage")
    with pytest.raises(CorruptValueError) as info:
        await asyncio.wait_for(task, 10)
    assert info.value.key == layout.policy
    # The mirror kept watching: once the value is fixed, the same object works again. lock()
    # checks the mirror first, so wait until it has the fix (under load it can lag the delete).
    await etcd.delete(layout.policy)
    async with asyncio.timeout(10):
        seen = await waiting.changed(0)
        while True:
            try:
                waiting.snapshot()
                break
            except CorruptValueError:
                seen = await waiting.changed(seen)
    task = await queued(etcd, waiting, "w", await etcd.revision())
    await sem.unlock("a")
    assert (await asyncio.wait_for(task, 10)).id == "w"
    await waiting.close()


# -- cost ---------------------------------------------------------------------------------------


def _rpc(metrics: dict[str, float], method: str) -> float:
    return sum(v for k, v in metrics.items()
               if k.startswith("grpc_server_handled_total{") and f'grpc_method="{method}"' in k)


@pytest.mark.parametrize("n", [5, 40])
async def test_writes_per_cycle_do_not_grow_with_waiters(
    etcd: Etcd, etcd_server: EmbeddedEtcd, prefix: str, n: int
) -> None:
    setup = Semaphore(etcd, "g", prefix=prefix)
    await setup.lock("blocker")
    sems = [Semaphore(etcd, "g", prefix=prefix) for _ in range(2)]

    async def cycle(sem: Semaphore, holder_id: str) -> None:
        await sem.lock(holder_id)
        assert await sem.unlock(holder_id)

    rev0 = await etcd.revision()
    before = etcd_server.metrics()
    tasks = [asyncio.create_task(cycle(sems[i % 2], f"w{i}")) for i in range(n)]
    seen: set[str] = set()
    async with asyncio.timeout(20):
        async for batch in etcd.watch_prefix(setup.layout.queue, start_revision=rev0 + 1):
            seen |= {e.kv.key for e in batch.events if e.kind == "put"}
            if len(seen) == n:
                break
    await setup.unlock("blocker")
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    after = etcd_server.metrics()
    # Each cycle: the queue put, the grant txn, the release txn; the blocker's release is the +1.
    assert await etcd.revision() - rev0 == 3 * n + 1
    assert _rpc(after, "Put") - _rpc(before, "Put") == n
    assert 2 * n + 1 <= _rpc(after, "Txn") - _rpc(before, "Txn") <= 2 * n + 3
    assert _rpc(after, "DeleteRange") - _rpc(before, "DeleteRange") == 0
    assert _rpc(after, "LeaseGrant") - _rpc(before, "LeaseGrant") == 2  # one per Semaphore object
    for s in [*sems, setup]:
        await s.close()


def test_overdue() -> None:
    t = datetime(2024, 1, 1, tzinfo=UTC)
    h = Holder("a", t, t + timedelta(hours=1), "", "x@y", 1)
    assert not h.overdue(t + timedelta(minutes=59)) and h.overdue(t + timedelta(hours=2))
    assert not Holder("a", t, None, "", "x@y", 1).overdue(t + timedelta(days=9))


async def test_mirror_resyncs_after_compaction() -> None:
    # Its own etcd: compaction would disturb other tests' watches on the shared one.
    with EmbeddedEtcd() as server:
        etcd = await Etcd.connect(server.config())
        try:
            sem = Semaphore(etcd, "g", prefix="c/")
            await sem.set_max(2)
            mirror = _Mirror(etcd, sem.layout)
            await mirror.start()
            assert mirror._task is not None
            mirror._task.cancel()  # the mirror falls behind ...
            await sem.lock("a")
            await sem.lock("b")
            rev = await sem.set_max(3)
            await etcd._c.kv.compact(rev)  # type: ignore[union-attr]  # ... past what etcd keeps
            mirror._task = asyncio.create_task(mirror._run())
            wake = mirror.register("c")
            await sem.try_lock("c")  # an event after the resync wakes "c" (its own holder key)
            await asyncio.wait_for(wake.wait(), 10)
            view = mirror.current()
            assert (sorted(view.holders), view.max) == (["a", "b", "c"], 3)
            await mirror.close()
            await sem.close()
        finally:
            await etcd.close()


class _DequeueBlip(Etcd):
    """A real connection on which the first read of a queue key (the cancelled waiter's clean-up)
    fails as it would during an etcd leader election or a network blip."""

    failed = 0

    async def get_prefix(self, prefix: str, *, revision: int = 0) -> tuple[list[Any], int]:
        if "/queue/" in prefix and not self.failed:
            self.failed += 1
            raise EtcdUnavailableError("etcd unreachable at test: injected blip")
        return await super().get_prefix(prefix, revision=revision)


async def test_cancelled_lock_leaves_the_queue_despite_an_etcd_blip(
    etcd_config: EtcdConfig, etcd: Etcd, sem: Semaphore, layout: Layout,
) -> None:
    # A queue key left behind is on a lease this (live) process keeps alive: it would sit at the
    # head of the line for ever and, with max 1, nobody else would ever be granted.
    await sem.lock("a")
    flaky = await _DequeueBlip.connect(etcd_config)
    waiting = Semaphore(flaky, "g", prefix=layout.prefix, lease_ttl=60)
    try:
        rev = await etcd.revision()
        task = await queued(etcd, waiting, "w", rev)
        task.cancel()
        await wait_event(etcd, layout.queue, rev + 1, delete_of(layout.waiter("w")), within=5)
        assert isinstance(flaky, _DequeueBlip) and flaky.failed == 1
    finally:
        await waiting.close()
        await flaky.close()


class _Gated(Etcd):
    """A real connection whose chosen RPC waits at a gate once, so that close() can run while a
    first lock() is inside it (a slow etcd, made certain)."""

    gate_on = ""
    entered: asyncio.Event
    gate: asyncio.Event

    async def _wait_gate(self, what: str) -> None:
        if self.gate_on == what:
            self.gate_on = ""
            self.entered.set()
            await self.gate.wait()

    async def get_prefix(self, prefix: str, *, revision: int = 0) -> tuple[list[Any], int]:
        if prefix.endswith("/groups/g/"):
            await self._wait_gate("mirror-read")
        return await super().get_prefix(prefix, revision=revision)

    async def lease_grant(self, ttl: int) -> int:
        lease_id = await super().lease_grant(ttl)
        await self._wait_gate("lease-grant")
        return lease_id


@pytest.mark.parametrize("gate_on", ["mirror-read", "lease-grant"])
async def test_close_during_a_first_lock_leaks_nothing(
    etcd_config: EtcdConfig, etcd: Etcd, sem: Semaphore, layout: Layout, gate_on: str,
) -> None:
    await sem.lock("a")
    slow = await _Gated.connect(etcd_config)
    assert isinstance(slow, _Gated)
    slow.gate_on, slow.entered, slow.gate = gate_on, asyncio.Event(), asyncio.Event()
    waiting = Semaphore(slow, "g", prefix=layout.prefix, lease_ttl=60)
    before = asyncio.all_tasks()
    try:
        task = asyncio.create_task(waiting.lock("w"))
        async with asyncio.timeout(5):
            await slow.entered.wait()
        await waiting.close()
        slow.gate.set()
        with pytest.raises(LocksmithError, match="closed"):
            await asyncio.wait_for(task, 5)
        # Nothing of the closed object lives on: no mirror watch, no lease kept alive.
        leftovers = [t.get_name() for t in asyncio.all_tasks() - before
                     if t.get_name().startswith(("lease-", "semaphore-mirror-")) and not t.done()]
        assert leftovers == []
        assert (await sem.state()).queue == []
    finally:
        await waiting.close()
        await slow.close()
