"""Releasing an overdue holder's slot for it (issue 8): anyone may, exactly once, and never a
fresh grant of the same id. Real embedded etcd."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import UTC, datetime, timedelta

from locksmith import audit
from locksmith.etcd import Etcd, EtcdConfig, LostReply
from locksmith.keys import Layout
from locksmith.semaphore import Semaphore, read_state


class _Later:
    """A clock two hours ahead: the caller's view of a holder whose deadline has passed."""

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(hours=2)

    def monotonic(self) -> float:
        return 0.0

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def test_concurrent_overdue_releases_succeed_exactly_once(etcd: Etcd, sem: Semaphore, layout: Layout) -> None:
    h = await sem.lock("a", hold_for=timedelta(minutes=1))
    sems = [Semaphore(etcd, "g", prefix=layout.prefix, clock=_Later()) for _ in range(6)]
    try:
        results = await asyncio.gather(*(
            s.release_overdue("a", h.revision, by=f"agent-{i}", reason="past reboot_timeout")
            for i, s in enumerate(sems)
        ))
        assert sorted(results) == [False] * 5 + [True]
        assert (await read_state(etcd, "g", prefix=layout.prefix)).holders == []
        entries = [e for e in await audit.read(etcd, layout) if e.action == "release-overdue"]
        assert len(entries) == 1
        assert (entries[0].actor, entries[0].subject, entries[0].reason) == (
            f"agent-{results.index(True)}", "a", "past reboot_timeout")
        assert entries[0].detail["revision"] == h.revision
    finally:
        for s in sems:
            await s.close()


async def test_overdue_release_whose_reply_is_lost_is_still_true(
    etcd_config: EtcdConfig, etcd: Etcd, sem: Semaphore, layout: Layout
) -> None:
    h = await sem.lock("a", hold_for=timedelta(minutes=1))
    lossy = await Etcd.connect(dataclasses.replace(etcd_config, member_cooldown=0.05))
    fault = LostReply("Txn", match=lambda req: True)
    lossy.lost_replies.append(fault)
    first = Semaphore(lossy, "g", prefix=layout.prefix, clock=_Later())
    second = Semaphore(etcd, "g", prefix=layout.prefix, clock=_Later())
    try:
        assert await first.release_overdue("a", h.revision, by="agent-1", reason="overdue") is True
        assert fault.dropped == 1
        assert await second.release_overdue("a", h.revision, by="agent-2", reason="overdue") is False
        entries = [e for e in await audit.read(etcd, layout) if e.action == "release-overdue"]
        assert [e.actor for e in entries] == ["agent-1"]
    finally:
        await first.close()
        await second.close()
        await lossy.close()


async def test_a_fresh_grant_of_the_same_id_is_never_released(etcd: Etcd, sem: Semaphore, layout: Layout) -> None:
    old = await sem.lock("a", hold_for=timedelta(minutes=1))
    assert await sem.unlock("a")
    fresh = await sem.lock("a", hold_for=timedelta(minutes=1))
    late = Semaphore(etcd, "g", prefix=layout.prefix, clock=_Later())
    try:
        assert await late.release_overdue("a", old.revision, by="agent-x", reason="overdue") is False
        st = await read_state(etcd, "g", prefix=layout.prefix)
        assert [(x.id, x.revision) for x in st.holders] == [("a", fresh.revision)]
    finally:
        await late.close()


async def test_a_holder_within_its_deadline_is_not_released(etcd: Etcd, sem: Semaphore, layout: Layout) -> None:
    h = await sem.lock("a", hold_for=timedelta(hours=1))
    rev = await etcd.revision()
    assert await sem.release_overdue("a", h.revision, by="agent-x", reason="overdue") is False
    assert await etcd.revision() == rev  # nothing written
    assert await sem.release_overdue("nobody", 1, by="agent-x", reason="overdue") is False


async def test_an_overdue_release_starts_the_cooldown(etcd: Etcd, sem: Semaphore, layout: Layout) -> None:
    await etcd.put(layout.policy, json.dumps({"format_version": 1, "slots": 1, "cooldown": "1h"}).encode())
    h = await sem.lock("a", hold_for=timedelta(minutes=1))
    late = Semaphore(etcd, "g", prefix=layout.prefix, clock=_Later())
    try:
        assert await late.release_overdue("a", h.revision, by="agent-x", reason="overdue")
        st = await read_state(etcd, "g", prefix=layout.prefix)
        assert (st.holders, st.cooling_down, st.available) == ([], 1, 0)
    finally:
        await late.close()
