"""The independent history checker (issue 7): it catches each kind of violation in a history made
to break it, finds none in histories that keep the rules (hypothesis), and records a real run."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from locksmith import history
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.history import Change, History, Recorder, ReportedGrant, Violation, check
from locksmith.keys import Layout
from locksmith.semaphore import Semaphore


class Builder:
    """A synthetic history, one transaction (revision) at a time."""

    def __init__(self, slots: int = 1, cooldown: str = "0s") -> None:
        self.rev = 1
        self.changes: list[Change] = []
        self.created: dict[str, int] = {}
        self.policy(slots, cooldown)

    def txn(self, *ops: tuple[str, str] | tuple[str, str, int]) -> int:
        self.rev += 1
        for op in ops:
            kind, key = op[0], op[1]
            lease = op[2] if len(op) > 2 else 0
            if kind == "put":
                self.created.setdefault(key, self.rev)
                value = b'{"format_version":1}'
                if key == "policy":
                    value = self._policy
                self.changes.append(Change(self.rev, "put", key, value, self.created[key], lease))
            else:
                self.created.pop(key, None)
                self.changes.append(Change(self.rev, "delete", key))
        return self.rev

    def policy(self, slots: int, cooldown: str = "0s") -> int:
        self._policy = json.dumps({"format_version": 1, "slots": slots, "cooldown": cooldown}).encode()
        return self.txn(("put", "policy"))

    # the semaphore's own transactions
    def enqueue(self, w: str) -> int:
        return self.txn(("put", f"queue/{w}", 7))

    def fast_grant(self, h: str) -> int:
        return self.txn(("put", f"holders/{h}"))

    def queued_grant(self, w: str) -> int:
        return self.txn(("put", f"holders/{w}"), ("delete", f"queue/{w}"))

    def release(self, h: str, cooldown_key: str = "") -> int:
        ops: list[tuple[str, str] | tuple[str, str, int]] = [("delete", f"holders/{h}")]
        if cooldown_key:
            ops.append(("put", f"cooldown/{cooldown_key}", 9))
        return self.txn(*ops)

    def history(self) -> History:
        return History("g", 1, self.rev, [], list(self.changes))


def kinds(violations: list[Violation]) -> list[str]:
    return [v.kind for v in violations]


# -- each kind of violation, caught ---------------------------------------------------------------


def test_a_clean_history_has_no_violations() -> None:
    b = Builder(slots=1)
    a = b.fast_grant("a")
    b.enqueue("w1")
    b.enqueue("w2")
    b.release("a")
    w1 = b.queued_grant("w1")
    b.release("w1")
    w2 = b.queued_grant("w2")
    reported = [ReportedGrant("a", a), ReportedGrant("w1", w1), ReportedGrant("w2", w2)]
    assert check(b.history(), reported) == []


def test_too_many_holders() -> None:
    b = Builder(slots=1)
    b.fast_grant("a")
    r = b.fast_grant("b")
    v = check(b.history())
    assert kinds(v) == ["too_many_holders"] and v[0].revision == r and "2 holders, max 1" in v[0].description


def test_holders_granted_before_a_max_decrease_may_drain() -> None:
    b = Builder(slots=2)
    b.fast_grant("a")
    b.fast_grant("b")
    b.policy(1)  # lowered: a and b stay, that is allowed
    b.enqueue("w")
    b.release("a")
    assert check(b.history()) == []
    r = b.queued_grant("w")  # but granting while 1 of the old holders remains is not
    assert kinds(check(b.history())) == ["too_many_holders", "fifo"]
    assert check(b.history())[0].revision == r


def test_grant_while_paused() -> None:
    b = Builder(slots=2)
    b.txn(("put", "pause"))
    r = b.fast_grant("a")
    v = check(b.history())
    assert kinds(v) == ["grant_while_paused"] and v[0].revision == r
    b.txn(("delete", "pause"))
    b.fast_grant("b")
    assert len(check(b.history())) == 1


def test_fifo_order_of_queue_entry() -> None:
    b = Builder(slots=1)
    b.fast_grant("a")
    b.enqueue("w1")
    b.enqueue("w2")
    b.release("a")
    r = b.queued_grant("w2")  # overtakes w1
    v = check(b.history())
    assert kinds(v) == ["fifo"] and v[0].revision == r and "'w2'" in v[0].description and "w1" in v[0].description


def test_fifo_counts_slots_not_positions() -> None:
    # With 2 free slots the second waiter may be served before the first (counting semaphore).
    b = Builder(slots=2)
    b.fast_grant("a")
    b.fast_grant("b")
    b.enqueue("w1")
    b.enqueue("w2")
    b.release("a")
    b.release("b")
    b.queued_grant("w2")
    assert check(b.history()) == []


def test_fast_path_while_queued() -> None:
    b = Builder(slots=2)
    b.fast_grant("a")
    b.enqueue("w")  # queued (e.g. paused a moment ago, or set-max), line not empty
    r = b.fast_grant("x")
    v = check(b.history())
    assert kinds(v) == ["fast_path_while_queued"] and v[0].revision == r


def test_holder_on_a_lease() -> None:
    b = Builder(slots=1)
    r = b.txn(("put", "holders/a", 0x1234))
    v = check(b.history())
    assert kinds(v) == ["holder_lease"] and v[0].revision == r and "1234" in v[0].description


def test_holder_rewritten() -> None:
    b = Builder(slots=1)
    b.fast_grant("a")
    r = b.txn(("put", "holders/a"))
    assert kinds(check(b.history())) == ["holder_rewritten"] and check(b.history())[0].revision == r


def test_phantom_grant() -> None:
    b = Builder(slots=1)
    a = b.fast_grant("a")
    other_group_rev = a + 1000
    v = check(b.history(), [ReportedGrant("a", a), ReportedGrant("b", a), ReportedGrant("a", other_group_rev)])
    assert kinds(v) == ["phantom_grant", "phantom_grant"]
    assert [x.revision for x in v] == [a, other_group_rev]


def test_cooldown() -> None:
    b = Builder(slots=2, cooldown="5m")
    b.fast_grant("a")
    b.release("a", cooldown_key="a.1")
    b.fast_grant("b")  # 1 holder + 1 cooling = 2: allowed
    b.release("b", cooldown_key="b.1")
    r = b.fast_grant("c")  # 1 holder + 2 cooling > 2
    v = check(b.history())
    assert kinds(v) == ["cooldown"] and v[0].revision == r
    b.txn(("delete", "cooldown/a.1"))  # the lease expired
    b.txn(("delete", "holders/c"))
    b.fast_grant("d")
    assert kinds(check(b.history())) == ["cooldown"]


def test_every_kind_is_tested() -> None:
    tested = {"too_many_holders", "grant_while_paused", "fifo", "fast_path_while_queued", "holder_lease",
              "holder_rewritten", "phantom_grant", "cooldown"}
    assert tested == set(history.KINDS)


# -- no false alarms: histories a correct semaphore can produce ----------------------------------


@st.composite
def correct_histories(draw: st.DrawFn) -> tuple[History, list[ReportedGrant]]:
    """A model semaphore that keeps every rule, driven by random operations."""
    slots = draw(st.integers(1, 3))
    b = Builder(slots=slots)
    holders: list[str] = []
    queue: list[str] = []
    reported: list[ReportedGrant] = []
    paused = False
    n = 0
    for op in draw(st.lists(st.sampled_from(["arrive", "arrive", "grant", "release", "release", "max", "pause",
                                             "leave"]), max_size=40)):
        free = slots - len(holders)
        if op == "arrive":
            n += 1
            name = f"h{n}"
            if not queue and free > 0 and not paused:
                reported.append(ReportedGrant(name, b.fast_grant(name)))
                holders.append(name)
            else:
                b.enqueue(name)
                queue.append(name)
        elif op == "grant" and queue and free > 0 and not paused:
            # Any of the first `free` waiters may win the race.
            w = queue[draw(st.integers(0, min(free, len(queue)) - 1))]
            queue.remove(w)
            reported.append(ReportedGrant(w, b.queued_grant(w)))
            holders.append(w)
        elif op == "release" and holders:
            h = holders.pop(draw(st.integers(0, len(holders) - 1)))
            b.release(h)
        elif op == "max":
            slots = draw(st.integers(1, 3))
            b.policy(slots)
        elif op == "pause":
            paused = not paused
            b.txn(("put" if paused else "delete", "pause"))
        elif op == "leave" and queue:
            w = queue.pop(draw(st.integers(0, len(queue) - 1)))
            b.txn(("delete", f"queue/{w}"))  # cancelled, or its lease expired
    return b.history(), reported


@settings(max_examples=300, deadline=None)
@given(correct_histories())
def test_no_false_alarms(case: tuple[History, list[ReportedGrant]]) -> None:
    h, reported = case
    assert check(h, reported) == []


@settings(max_examples=200, deadline=None)
@given(correct_histories())
def test_an_extra_grant_over_max_is_always_caught(case: tuple[History, list[ReportedGrant]]) -> None:
    h, _ = case
    # Fill the group to its max at the end, then one more: the last must be flagged.
    state_holders: set[str] = set()
    slots = 1
    for c in h.changes:
        if c.key.startswith("holders/"):
            (state_holders.add if c.kind == "put" else state_holders.discard)(c.key[8:])
        if c.key == "policy":
            slots = json.loads(c.value)["slots"]
    rev = h.end_revision
    extra = []
    for i in range(max(1, slots - len(state_holders) + 1)):
        rev += 1
        extra.append(Change(rev, "put", f"holders/x{i}", b"{}", rev))
    h.changes += extra
    assert rev in [v.revision for v in check(h) if v.kind == "too_many_holders"]


# -- a real record --------------------------------------------------------------------------------


@pytest.fixture
async def sems(etcd: Etcd, prefix: str) -> AsyncIterator[list[Semaphore]]:
    out = [Semaphore(etcd, "g", prefix=prefix) for _ in range(3)]
    try:
        yield out
    finally:
        for s in out:
            await s.close()


async def test_records_a_real_run_and_catches_a_real_violation(etcd: Etcd, prefix: str, sems: list[Semaphore]) -> None:
    layout = Layout("g", prefix)
    await sems[0].set_max(2)
    rec = Recorder(etcd, "g", prefix=prefix)
    await rec.start()
    reported: list[ReportedGrant] = []

    async def contender(sem: Semaphore, name: str) -> None:
        for _ in range(5):
            h = await sem.lock(name)
            reported.append(ReportedGrant(h.id, h.revision))
            await asyncio.sleep(0)
            assert await sem.unlock(name)

    await asyncio.wait_for(asyncio.gather(*(contender(s, f"c{i}") for i, s in enumerate(sems))), 60)
    hist = await rec.stop()
    assert check(hist, reported) == []
    assert len([c for c in hist.changes if c.kind == "put" and c.key.startswith("holders/")]) == 15

    # A holder key written behind the semaphore's back, while paused and on a lease.
    rec = Recorder(etcd, "g", prefix=prefix)
    await rec.start()
    await etcd.put(layout.pause, json.dumps({"format_version": 1, "reason": "", "by": "x", "at": "x"}).encode())
    lease = await etcd.lease_grant(60)
    rev = await etcd.put(layout.holder("intruder"), b'{"format_version":1}', lease=lease)
    hist = await rec.stop()
    v = check(hist, [ReportedGrant("ghost", rev)])
    assert sorted(kinds(v)) == ["grant_while_paused", "holder_lease", "phantom_grant"]
    assert all(x.revision == rev for x in v)
    await etcd.lease_revoke(lease)


async def test_several_groups_on_a_connection_of_its_own(etcd_config: EtcdConfig, etcd: Etcd, prefix: str) -> None:
    s1, s2 = Semaphore(etcd, "g1", prefix=prefix), Semaphore(etcd, "g2", prefix=prefix)
    try:
        rec = await history.start_recording(etcd_config, ["g1", "g2"], prefix=prefix)
        a = await s1.lock("a")
        b = await s2.lock("a")
        v = await history.stop_and_check(rec, [("g1", "a", a.revision), ("g2", "a", b.revision),
                                               ("g1", "a", b.revision), ("g3", "a", 1)])
        assert [(x.group, x.kind, x.revision) for x in v] == [
            ("g3", "phantom_grant", 1), ("g1", "phantom_grant", b.revision)]
        assert str(v[1]).startswith(f"g1 r{b.revision} phantom_grant:")
    finally:
        await s1.close()
        await s2.close()
