"""An overdue holder costs the fleet O(1) etcd writes (issue 8, step 8; the simulator's finding:
every waiting host reported every overdue holder, 25-88 write RPCs per reboot).

Several ``EtcdSlot`` backends (the coordinator's ``etcd-lock`` slot, one per host) follow one
group on a real etcd of this module's own, so that etcd's write counters (``/metrics``) count
only them. A host whose process is gone holds the only slot past its deadline. The hosts are
driven as their coordinators drive them: ``tend(now)`` each round, the clock moved to the
earliest time any of them asked to look again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from fleetrig import StepClock

from locksmith import audit
from locksmith.budget import list_failures
from locksmith.embedded import EmbeddedEtcd
from locksmith.etcd import Etcd
from locksmith.keys import Layout
from locksmith.policy import policy_from_json
from locksmith.policystore import apply_policy
from locksmith.semaphore import Semaphore, SemaphoreState
from updateagent.config import LocksmithSettings
from updateagent.strategy.etcd_lock import EtcdSlot

GROUP = "web"
HOSTS = 6
HOLD = timedelta(minutes=10)
WRITE_METHODS = ("Put", "DeleteRange", "Txn", "LeaseGrant", "LeaseRevoke")


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedEtcd]:
    # Not the session's etcd: a leftover of another test writing there would skew the counts.
    with EmbeddedEtcd() as s:
        yield s


def _writes(server: EmbeddedEtcd) -> int:
    """etcd's count of write RPCs it has answered (any outcome, a failed compare included)."""
    total = 0.0
    for name, value in server.metrics().items():
        if name.startswith("grpc_server_handled_total{") and any(f'grpc_method="{m}"' in name for m in WRITE_METHODS):
            total += value
    return int(total)


class Rig:
    def __init__(self, server: EmbeddedEtcd, etcd: Etcd, prefix: str) -> None:
        self.server = server
        self.etcd = etcd
        self.prefix = prefix
        self.layout = Layout(GROUP, prefix)
        self.clock = StepClock()
        self.settings = LocksmithSettings(endpoints=server.endpoints, group=GROUP, prefix=prefix)
        self.slots: list[EtcdSlot] = []
        self.waits: list[asyncio.Future[Any]] = []
        self.deadline = self.clock.now()

    async def setup(self, queued: int, **policy: Any) -> None:
        doc = {"format_version": 1, "group": GROUP, "reboot_timeout": "10m", **policy}
        await apply_policy(self.etcd, policy_from_json(doc, key="test"), prefix=self.prefix)
        gone = Semaphore(self.etcd, GROUP, prefix=self.prefix, clock=self.clock)
        holder = await gone.lock("gone-host", hold_for=HOLD)
        await gone.close()  # its process is gone; the slot (no lease) stays
        assert holder.deadline is not None
        self.deadline = holder.deadline
        for i in range(HOSTS):
            await self.open(i)
        for i in range(queued):  # one after the other: host-0 is the first waiter
            self.waits.append(asyncio.ensure_future(self.slots[i].acquire("update")))
            await self.until(lambda st, n=i + 1: len(st.queue) == n)

    async def open(self, i: int) -> EtcdSlot:
        slot = EtcdSlot(self.settings, clock=self.clock, etcd=self.etcd)
        await slot.open(f"host-{i}")
        if i < len(self.slots):
            self.slots[i] = slot
        else:
            self.slots.append(slot)
        return slot

    async def until(self, pred: Callable[[SemaphoreState], bool]) -> None:
        """Until every host's mirror of the group satisfies ``pred`` (woken by the mirrors)."""
        async with asyncio.timeout(30):
            for slot in self.slots:
                assert slot.sem is not None
                st = slot.sem.snapshot()
                while st is None or not pred(st):
                    await slot.sem.changed(st.revision if st is not None else 0)
                    st = slot.sem.snapshot()

    async def tend_all(self) -> list[datetime | None]:
        return list(await asyncio.gather(*(s.tend(self.clock.now()) for s in self.slots)))

    async def drive(self, until: datetime, rounds: int = 40) -> None:
        """Tend like the coordinators do: every host each round, then the clock to the earliest
        time one asked for (or ``until``)."""
        for _ in range(rounds):
            asked = [t for t in await self.tend_all() if t is not None]
            nxt = min([*asked, until])
            if nxt <= self.clock.now():
                if self.clock.now() >= until:
                    return
                nxt = self.clock.now() + timedelta(milliseconds=1)
            self.clock.advance((nxt - self.clock.now()).total_seconds())
        raise AssertionError(f"still asked to look again after {rounds} rounds")

    async def close(self) -> None:
        for w in self.waits:
            w.cancel()
        await asyncio.gather(*self.waits, return_exceptions=True)
        for s in self.slots:
            with contextlib.suppress(Exception):
                await s.close()

    async def trail(self, action: str) -> list[str]:
        return [e.subject for e in await audit.read(self.etcd, self.layout) if e.action == action]

    async def failures(self) -> list[tuple[str, str]]:
        return [(f.host, f.kind) for f in await list_failures(self.etcd, GROUP, prefix=self.prefix)]


@pytest.fixture
async def rig(server: EmbeddedEtcd, prefix: str) -> AsyncIterator[Rig]:
    etcd = await Etcd.connect(server.config())
    r = Rig(server, etcd, prefix)
    try:
        yield r
    finally:
        await r.close()
        await etcd.close()


async def test_a_held_overdue_slot_is_reported_by_one_host_once(rig: Rig) -> None:
    """on_timeout = hold: three hosts queue behind the overdue slot, three are idle; over an hour
    of tending, and after two agents restart, the fleet writes the failure and the pause once."""
    await rig.setup(queued=3, on_timeout="hold", failure_budget=0)
    before = _writes(rig.server)

    await rig.drive(until=rig.deadline + timedelta(hours=1))
    for i in (4, 5):  # restarted agents: a fresh process knows nothing of what it did before
        await rig.slots[i].close()
        await rig.open(i)
    await rig.drive(until=rig.deadline + timedelta(hours=2))

    writes = _writes(rig.server) - before
    assert await rig.failures() == [("gone-host", "overdue")]
    assert await rig.trail("failure") == ["gone-host"]
    assert await rig.trail("pause") == ["failure-budget"]
    # The failure's transaction and the budget's pause transaction; one spare for the audit pruner.
    assert writes <= 3, f"{writes} write RPCs for one overdue holder and {HOSTS} hosts"
    assert [await s.tend(rig.clock.now()) for s in rig.slots] == [None] * HOSTS  # nothing left to do


async def test_with_nobody_queued_one_host_reports_it_within_the_grace(rig: Rig) -> None:
    """Every host idle (no first waiter): each host's own delay picks one, within a bound."""
    await rig.setup(queued=0, on_timeout="hold", failure_budget=0)
    before = _writes(rig.server)

    await rig.drive(until=rig.deadline + timedelta(minutes=2))

    assert await rig.failures() == [("gone-host", "overdue")]
    assert await rig.trail("pause") == ["failure-budget"]
    assert _writes(rig.server) - before <= 3


async def test_a_released_overdue_slot_is_freed_once_and_costs_o1_writes(rig: Rig) -> None:
    """on_timeout = release: the first waiter reports and frees the slot, then gets it; nobody
    else writes, and the fresh grant is never freed."""
    await rig.setup(queued=3, on_timeout="release", failure_budget=5)
    before = _writes(rig.server)

    rig.clock.advance((rig.deadline - rig.clock.now()).total_seconds() + 1)
    await rig.tend_all()  # every host looks at once, just past the deadline
    await rig.until(lambda st: [h.id for h in st.holders] == ["host-0"])
    # Later looks (all hosts past their turn) find nothing overdue: host-0's grant is fresh.
    await rig.drive(until=rig.deadline + timedelta(minutes=5))

    writes = _writes(rig.server) - before
    assert await rig.trail("release-overdue") == ["gone-host"]
    assert await rig.failures() == [("gone-host", "overdue")]
    assert rig.slots[1].sem is not None
    state = rig.slots[1].sem.snapshot()
    assert state is not None and [h.id for h in state.holders] == ["host-0"]
    async with asyncio.timeout(30):
        grant = await rig.waits[0]
    assert grant.holder_id == "host-0" and not any(w.done() for w in rig.waits[1:])
    # The failure, the release and host-0's grant; one spare for the audit pruner.
    assert writes <= 4, f"{writes} write RPCs for one overdue holder and {HOSTS} hosts"
