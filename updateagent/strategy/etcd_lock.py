"""``etcd-lock``: the coordinator's slot is the group's etcd semaphore (``locksmith.semaphore``).

- The policy and the pause key are followed live with ``locksmith.reader.PolicyReader``: a change
  while the coordinator waits takes effect at once (``wait_changed`` returns).
- A slot is ``Semaphore.lock(machine id)``, held for the policy's ``reboot_timeout``; the
  semaphore refuses grants while paused and while a freed slot cools down (``cooldown``).
- The group's numbers (holders, queue, slots, paused) come from the semaphore's watch-driven
  mirror: no polling of etcd.
- Failures go to ``locksmith.budget.report_failure`` with a stable incident id, so a repeated
  report of the same failed boot (an agent restart) counts once.
- Overdue holders of other hosts: while this host waits for its window or queues, it looks at the
  holders' deadlines (the granting host's clock wrote them; this host's clock reads them). An
  overdue holder is reported once (incident = its holder key's revision, whoever reports it) and,
  with ``on_timeout = "release"``, released through a transaction that compares that revision, so
  of all the hosts that try exactly one succeeds and a fresh grant of the same host is never freed.
- One host deals with an overdue grant, not every host that sees it (the whole fleet follows the
  group): the first waiter in the queue just after the deadline; any other host only after
  ``OVERDUE_GRACE`` plus a delay of its own (a hash of host and grant, within ``OVERDUE_SPREAD``),
  and then only if a read shows the failure not yet recorded (a released holder is gone from the
  mirror). Each host tries a grant at most once per process. So an overdue grant costs the fleet
  O(1) writes, and a dead or foreign queue head (``locksmithctl lock --wait``) delays its handling
  by at most ``OVERDUE_GRACE + OVERDUE_SPREAD``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import zlib
from datetime import datetime, timedelta

from locksmith import audit
from locksmith.budget import count_failures, failure_recorded, report_failure
from locksmith.clock import SYSTEM_CLOCK, Clock
from locksmith.errors import CorruptValueError, LocksmithError
from locksmith.etcd import Etcd
from locksmith.log import get_logger
from locksmith.reader import PolicyReader
from locksmith.semaphore import Holder, Semaphore, SemaphoreState
from locksmith.windows import WindowSet
from updateagent.config import LocksmithSettings
from updateagent.strategy import first_of
from updateagent.strategy.coordinator import Gate, Grant, QueueInfo

log = get_logger("updateagent.etcd_lock")

CONNECT_TIMEOUT = 30.0
LEAVE_TIMEOUT = 10.0
# Who deals with an overdue grant (see the module doc): the queue's first waiter just after the
# deadline, any other host after the grace plus its own share of the spread.
OVERDUE_GRACE = timedelta(seconds=30)
OVERDUE_SPREAD = timedelta(seconds=60)
_JUST_AFTER = timedelta(milliseconds=1)  # overdue means past the deadline, not at it
POSITION_REFRESH = 5.0


class EtcdSlot:
    kind = "etcd-lock"

    def __init__(self, settings: LocksmithSettings, *, local_window: WindowSet | None = None,
                 clock: Clock = SYSTEM_CLOCK, etcd: Etcd | None = None) -> None:
        del local_window  # the coordinator applies the host's window (CoordinatorOptions.local_window)
        self.settings = settings
        self.clock = clock
        self.group = settings.group
        self.etcd: Etcd | None = etcd
        self._own_etcd = etcd is None
        self.reader: PolicyReader | None = None
        self.sem: Semaphore | None = None
        self.holder_id = ""
        self.failures = 0  # the group's failure count, as of this host's last report or start
        self._released_overdue: set[int] = set()
        self._reported_overdue: set[int] = set()
        self._acquiring = False
        # What the last tend() looked at, so that a change of the group wakes the coordinator only
        # when it brings an earlier overdue turn (see _on_group_moved).
        self._tended: set[int] = set()
        self._next_tend: datetime | None = None
        self._was_head = False
        self._poke: asyncio.Event | None = None  # set while the coordinator waits in wait_changed
        self._position: int | None = None  # queue position at the last status refresh
        self._refreshed_at = float("-inf")
        # While queued, a move of the line refreshes the coordinator's status at most this often
        # (clock seconds; a read of the status is always current). Each refresh is a tick of the
        # coordinator: a line of a thousand hosts moving would otherwise wake them all each time.
        self.position_refresh = POSITION_REFRESH
        self._deferred: asyncio.Future[None] | None = None

    # ----------------------------------------------------------------------- life

    async def open(self, holder_id: str) -> None:
        self.holder_id = holder_id
        if self.etcd is None:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                self.etcd = await Etcd.connect(self.settings.etcd_config())
        try:
            reader = PolicyReader(self.etcd, self.group, prefix=self.settings.prefix)
            reader.start()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await reader.wait_ready()
            except BaseException:
                await reader.stop()
                raise
            self.reader = reader
            self.sem = Semaphore(self.etcd, self.group, prefix=self.settings.prefix,
                                 lease_ttl=self.settings.lease_ttl, clock=self.clock)
            # Follow the group without queueing: its numbers and overdue holders are known at once.
            await self.sem.follow()
            self.sem.on_change(self._on_group_moved)
            with contextlib.suppress(Exception):
                self.failures = await count_failures(self.etcd, self.group, prefix=self.settings.prefix)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._deferred is not None:
            self._deferred.cancel()
        if self.reader is not None:
            await self.reader.stop()
            self.reader = None
        if self.sem is not None:
            with contextlib.suppress(Exception):
                await self.sem.close()
            self.sem = None
        if self.etcd is not None and self._own_etcd:
            with contextlib.suppress(Exception):
                await self.etcd.close()
            self.etcd = None

    # ----------------------------------------------------------------------- the gate

    def gate(self) -> Gate:
        reader = self.reader
        if reader is None:
            return Gate(group=self.group, ready=False, problem="not connected to etcd")
        policy = reader.policy
        pause_reason = reader.pause.reason if reader.pause is not None else ""
        windows = policy.window_set() if policy.windows else None
        return Gate(group=self.group, windows=windows, min_window_remaining=policy.min_window_remaining,
                    paused=reader.paused, pause_reason=pause_reason or "", on_timeout=policy.on_timeout,
                    cooldown_until=None, ready=True, problem=reader.error or "")

    async def wait_changed(self) -> None:
        """The policy or pause changed, or the group changed in a way that concerns this host: a
        holder whose overdue turn comes before the coordinator's next wake, this host reaching
        the head of the queue, its place in the line (at most every ``position_refresh``), a
        corrupt value, the semaphore closing."""
        if self.reader is None:
            await asyncio.Event().wait()
        assert self.reader is not None
        poke = self._poke = asyncio.Event()
        try:
            await first_of({asyncio.ensure_future(self.reader.changed()), asyncio.ensure_future(poke.wait())})
        finally:
            if self._poke is poke:
                self._poke = None

    def _on_group_moved(self) -> None:
        """The semaphore's mirror moved on (called synchronously for every change of the group,
        on every host of a simulated fleet: keep it O(holders))."""
        poke = self._poke
        if poke is None or poke.is_set() or self.sem is None:
            return
        try:
            st = self.sem.snapshot()
        except CorruptValueError:
            poke.set()
            return
        if st is None:
            poke.set()
            return
        head = self._is_head(st)
        if head != self._was_head:  # the head's turn comes first: every holder's turn moved
            self._was_head = head
            self._tended = set()
        nxt = self._next_tend
        for h in st.holders:
            if h.deadline is None or h.id == self.holder_id or h.revision in self._tended:
                continue
            if nxt is None or self._overdue_turn(h, st) < nxt:
                poke.set()
                return
            self._tended.add(h.revision)  # its turn comes after the next wake: it is seen then
        if not self._acquiring or self._deferred is not None or self.position_refresh == math.inf:
            return
        if self._place(st) == self._position:
            return
        wait = self._refreshed_at + self.position_refresh - self.clock.monotonic()
        if wait <= 0:
            poke.set()
        else:
            self._deferred = asyncio.ensure_future(self._poke_later(wait))

    async def _poke_later(self, seconds: float) -> None:
        try:
            await self.clock.sleep(seconds)
            if self._poke is not None:
                self._poke.set()
        finally:
            self._deferred = None

    # ----------------------------------------------------------------------- the slot

    async def acquire(self, reason: str) -> Grant:
        assert self.sem is not None and self.reader is not None
        hold = self.reader.policy.reboot_timeout
        self._acquiring = True
        try:
            holder = await self.sem.lock(self.holder_id, reason=reason, hold_for=hold)
        except asyncio.CancelledError:
            # The semaphore deletes our queue key in the background: see it gone before saying
            # we left (bounded: a dead etcd must not hold up the coordinator).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LEAVE_TIMEOUT):
                    await self._left_queue()
            raise
        finally:
            self._acquiring = False
        return _grant(holder)

    async def _left_queue(self) -> None:
        assert self.sem is not None
        while (st := self._mirror()) is not None and any(w.id == self.holder_id for w in st.queue):
            try:
                await self.sem.changed(st.revision)
            except LocksmithError:  # closed: there is no line to watch any more
                return

    async def held(self) -> Grant | None:
        assert self.sem is not None
        held = await self.sem.holder(self.holder_id)
        return _grant(held) if held is not None else None

    async def release(self) -> bool:
        assert self.sem is not None
        return await self.sem.unlock(self.holder_id)

    async def report_failure(self, kind: str, detail: str, incident: str) -> str:
        assert self.etcd is not None and self.reader is not None
        report = await report_failure(self.etcd, self.group, self.holder_id, "overdue" if kind == "overdue"
                                      else "unhealthy", detail, incident=incident, policy=self.reader.policy,
                                      prefix=self.settings.prefix)
        self.failures = report.count
        return (f"failure {report.count} of budget {report.budget}" + (", group paused" if report.paused else "")
                + ("" if report.recorded else " (already recorded)"))

    # ----------------------------------------------------------------------- the group

    def _mirror(self) -> SemaphoreState | None:
        """The group from the semaphore's mirror (no etcd call); None when not open or corrupt."""
        if self.sem is None:
            return None
        try:
            st = self.sem.snapshot()
        except CorruptValueError:
            return None
        return st

    def queue(self) -> QueueInfo | None:
        st = self._mirror()
        if st is None:
            return None
        pos = self._place(st)
        self._position, self._refreshed_at = pos, self.clock.monotonic()
        return QueueInfo(position=pos, length=len(st.queue), holders=len(st.holders), slots=st.max, paused=st.paused)

    def _place(self, st: SemaphoreState) -> int | None:
        """This host's place in the line (1 = next), or None when it is not in it."""
        for i, w in enumerate(st.queue, 1):
            if w.id == self.holder_id:
                return i
        return None

    def _is_head(self, st: SemaphoreState) -> bool:
        return bool(st.queue) and st.queue[0].id == self.holder_id

    async def tend(self, now: datetime) -> datetime | None:
        """Report and (on_timeout = release) free other hosts' overdue slots when it is this
        host's turn; when to look again (None: nothing to wait for)."""
        st = self._mirror()
        if st is None or self.etcd is None or self.reader is None:
            return None
        policy = self.reader.policy
        release = policy.on_timeout == "release"
        nxt: datetime | None = None
        self._tended = {h.revision for h in st.holders}
        self._was_head = self._is_head(st)
        self._next_tend = None
        for h in st.holders:
            if h.id == self.holder_id or h.deadline is None:
                continue
            reported = h.revision in self._reported_overdue
            if reported and (not release or h.revision in self._released_overdue):
                continue
            turn = self._overdue_turn(h, st)
            if now < turn:
                nxt = turn if nxt is None else min(nxt, turn)
                continue
            if not reported:
                await self._report_overdue(h, policy.on_timeout)
            if release and h.revision not in self._released_overdue:
                self._released_overdue.add(h.revision)
                assert self.sem is not None
                # Compares the holder key's revision: of all hosts trying, one frees it, and a
                # fresh grant of the same host is never freed. It reads the group first and
                # writes only if the grant is still there.
                released = await self.sem.release_overdue(
                    h.id, h.revision, by=audit.actor(),
                    reason=f"overdue since {h.deadline.isoformat()} (on_timeout = release)")
                log.warning("overdue_holder_released" if released else "overdue_holder_release_lost",
                            holder=h.id, revision=h.revision)
        self._next_tend = nxt
        return nxt

    def _overdue_turn(self, h: Holder, st: SemaphoreState) -> datetime:
        """When this host deals with ``h`` once it is overdue (see the module doc)."""
        assert h.deadline is not None
        if self._is_head(st):
            return h.deadline + _JUST_AFTER
        share = zlib.crc32(f"{self.holder_id}/{h.id}/{h.revision}".encode()) / 2**32
        return h.deadline + _JUST_AFTER + OVERDUE_GRACE + OVERDUE_SPREAD * share

    async def _report_overdue(self, h: Holder, on_timeout: str) -> None:
        assert self.etcd is not None and self.reader is not None and h.deadline is not None
        incident = f"rev-{h.revision}"
        if await failure_recorded(self.etcd, self.group, h.id, "overdue", incident, prefix=self.settings.prefix):
            self._reported_overdue.add(h.revision)
            log.debug("overdue_holder_already_reported", holder=h.id, revision=h.revision)
            return
        detail = f"{h.id} held its slot past its deadline {h.deadline.isoformat()}"
        report = await report_failure(self.etcd, self.group, h.id, "overdue", detail, incident=incident,
                                      policy=self.reader.policy, prefix=self.settings.prefix)
        self._reported_overdue.add(h.revision)
        self.failures = report.count
        log.warning("overdue_holder", holder=h.id, deadline=h.deadline.isoformat(), on_timeout=on_timeout,
                    recorded=report.recorded)

    def group_metrics(self) -> dict[str, float]:
        st = self._mirror()
        if st is None:
            return {}
        return {"holders": float(len(st.holders)), "queue_length": float(len(st.queue)), "slots": float(st.max),
                "paused": 1.0 if st.paused else 0.0, "failures": float(self.failures)}


def _grant(h: Holder) -> Grant:
    return Grant(holder_id=h.id, since=h.since, revision=h.revision, deadline=h.deadline)
