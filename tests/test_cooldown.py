"""The policy's cooldown, enforced by the semaphore against etcd's clock (issue 8): a freed slot
is not granted again until ``cooldown`` after its release. Real embedded etcd, real lease expiry."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from test_semaphore import delete_of, put_of, wait_event

from locksmith.errors import CorruptValueError, SlotUnavailableError
from locksmith.etcd import Etcd
from locksmith.history import Recorder, ReportedGrant, check
from locksmith.keys import Layout
from locksmith.policy import parse_policy_text
from locksmith.policystore import apply_policy
from locksmith.semaphore import Semaphore, read_state


async def _policy(etcd: Etcd, layout: Layout, slots: int, cooldown: str) -> None:
    await etcd.put(layout.policy, json.dumps({"format_version": 1, "slots": slots, "cooldown": cooldown}).encode())


async def test_freed_slot_is_granted_again_only_after_the_cooldown(
    etcd: Etcd, sem: Semaphore, layout: Layout
) -> None:
    # Through the real policy store, as an operator sets it.
    policy = parse_policy_text('format_version = 1\ngroup = "g"\nslots = 1\ncooldown = "2s"\n')
    await apply_policy(etcd, policy, prefix=layout.prefix)
    rec = Recorder(etcd, "g", prefix=layout.prefix)
    await rec.start()
    a = await sem.lock("a")
    rev = await etcd.revision()
    assert await sem.unlock("a")
    released = time.monotonic()
    key = await wait_event(etcd, layout.cooldown, rev + 1, lambda ev: ev.kind == "put")
    assert key.kv.lease != 0  # it goes away by itself, on etcd's clock
    with pytest.raises(SlotUnavailableError, match="cooldown"):
        await sem.try_lock("b")
    st = await read_state(etcd, "g", prefix=layout.prefix)
    assert (st.available, st.cooling_down, st.cooldown.total_seconds()) == (0, 1, 2)
    other = Semaphore(etcd, "g", prefix=layout.prefix)
    try:
        b = await asyncio.wait_for(other.lock("b"), 15)  # waits, then is woken by the expiry
        assert time.monotonic() - released >= 2.0
        assert b.revision > key.kv.mod_revision
    finally:
        await other.close()
    # etcd's own record agrees: no grant while the freed slot cooled down.
    hist = await rec.stop()
    assert check(hist, [ReportedGrant("a", a.revision), ReportedGrant("b", b.revision)]) == []
    assert any(c.kind == "delete" and c.key.startswith("cooldown/") and c.revision < b.revision for c in hist.changes)


async def test_cooldown_holds_one_slot_of_several(etcd: Etcd, sem: Semaphore, layout: Layout) -> None:
    await _policy(etcd, layout, 2, "30s")
    await sem.lock("a")
    assert await sem.unlock("a")
    assert (await sem.try_lock("b")).id == "b"  # one slot cooling, one free
    with pytest.raises(SlotUnavailableError, match="1 of 2 held, 1 freed slot"):
        await sem.try_lock("c")
    # A waiter is not admitted by a release while the other slot still cools down.
    rev = await etcd.revision()
    task = asyncio.create_task(sem.lock("c"))
    await wait_event(etcd, layout.queue, rev + 1, put_of(layout.waiter("c")))
    assert await sem.unlock("b")
    st = await read_state(etcd, "g", prefix=layout.prefix)
    assert (st.holders, [w.id for w in st.queue], st.cooling_down) == ([], ["c"], 2)
    assert not task.done()
    rev = await etcd.revision()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_event(etcd, layout.queue, rev + 1, delete_of(layout.waiter("c")))


async def test_no_cooldown_writes_nothing_more(etcd: Etcd, sem: Semaphore, layout: Layout) -> None:
    await _policy(etcd, layout, 1, "0s")
    rev = await etcd.revision()
    await sem.lock("a")
    assert await sem.unlock("a")
    assert await etcd.revision() == rev + 2  # the grant and the release transactions, as before
    assert (await etcd.get_prefix(layout.cooldown))[0] == []
    assert (await sem.try_lock("b")).id == "b"


async def test_lowering_the_cooldown_frees_cooling_slots(etcd: Etcd, sem: Semaphore, layout: Layout) -> None:
    # The cooldown in force at grant time decides: set to 0s, the cooling keys no longer count.
    await _policy(etcd, layout, 1, "1h")
    await sem.lock("a")
    assert await sem.unlock("a")
    with pytest.raises(SlotUnavailableError, match="cooldown"):
        await sem.try_lock("b")
    await _policy(etcd, layout, 1, "0s")
    assert (await sem.try_lock("b")).id == "b"


async def test_corrupt_cooldown_is_named(etcd: Etcd, sem: Semaphore, layout: Layout) -> None:
    await _policy(etcd, layout, 1, "soon")
    with pytest.raises(CorruptValueError, match="cooldown") as info:
        await sem.try_lock("a")
    assert info.value.key == layout.policy
