"""Virtual time for the simulator: a ``locksmith.clock.Clock`` that flows at a fixed rate while the
fleet works and jumps to the next timer when the whole fleet is parked.

A fixed time scale alone makes every real millisecond of etcd and agent work cost ``scale``
virtual milliseconds, and it spends the same real time on a closed window's night as on a busy
hour. Here virtual time has two parts:

- it *flows* at ``rate`` virtual seconds per real second, always: real latencies (etcd round
  trips, a hand-off, the agent's download and health checks) cost ``rate`` × their real duration,
  and the report shows that sum (``flowed``);
- it *jumps* to the earliest pending ``sleep`` deadline when the ``Pacer`` sees every host parked
  (waiting on this clock or on another host, nothing in flight) for a settle period: a closed
  window, a reboot's down time or a cooldown cost no real time at all (``jumped``).

So the simulated timeline is that of a discrete-event simulation, except that real work is never
free: a design whose hand-off takes 50 ms pays 50 ms × rate per hand-off in the makespan.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from datetime import datetime, timedelta


class VirtualClock:
    """``now()`` = ``start`` + elapsed virtual seconds. One per simulation, one event loop."""

    def __init__(self, start: datetime, *, rate: float = 20.0) -> None:
        if start.utcoffset() is None:
            raise ValueError("the virtual start time must be timezone-aware")
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.start = start
        self.rate = rate
        self._base_virtual = 0.0
        self._base_real = time.monotonic()
        self.jumped = 0.0  # virtual seconds skipped by jumps
        self.jumps = 0
        self._heap: list[list[object]] = []  # [deadline, seq, future]
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._dead = 0
        self.fired = 0  # sleepers woken so far (a sign of activity for the Pacer)

    # -- Clock ---------------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Virtual seconds since ``start``."""
        return self._base_virtual + (time.monotonic() - self._base_real) * self.rate

    def now(self) -> datetime:
        return self.start + timedelta(seconds=self.elapsed())

    def monotonic(self) -> float:
        return self.elapsed()

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._heap, [self.elapsed() + seconds, next(self._seq), fut])
        self._arm()
        try:
            await fut
        finally:
            if not fut.done():
                # A cancelled sleeper stays in the heap, skipped when it comes up. Waits that are
                # cut short all the time (a coordinator woken by every change in its group) would
                # pile up: drop them all once they are most of the heap.
                fut.cancel()
                self._dead += 1
                if self._dead > 1024 and self._dead * 2 > len(self._heap):
                    self._heap = [e for e in self._heap if not e[2].done()]  # type: ignore[union-attr]
                    heapq.heapify(self._heap)
                    self._dead = 0

    # -- the simulator's side ------------------------------------------------------------------

    def restart(self) -> None:
        """Virtual time 0 is now (before any sleeper exists)."""
        self._base_virtual = 0.0
        self._base_real = time.monotonic()

    @property
    def flowed(self) -> float:
        """Virtual seconds that passed at ``rate`` (real time spent working × rate)."""
        return self.elapsed() - self.jumped

    def next_deadline(self) -> float | None:
        """The earliest pending sleep's deadline (virtual elapsed seconds), or None."""
        while self._heap and self._heap[0][2].done():  # type: ignore[union-attr]
            heapq.heappop(self._heap)
        return float(self._heap[0][0]) if self._heap else None  # type: ignore[arg-type]

    def last_deadline_before(self, bound: float) -> float:
        """The latest pending deadline that is at most ``bound`` (a jump there fires every timer
        up to it, each at most ``quantum`` late, in one go)."""
        best = None
        heap = self._heap
        todo = [0]
        while todo:  # only the part of the heap at most ``bound``: a child is never before its parent
            i = todo.pop()
            if i >= len(heap) or float(heap[i][0]) > bound:  # type: ignore[arg-type]
                continue
            deadline, _, fut = heap[i]
            if not fut.done():  # type: ignore[union-attr]
                best = float(deadline) if best is None else max(best, float(deadline))  # type: ignore[arg-type]
            todo += (2 * i + 1, 2 * i + 2)
        return best if best is not None else bound

    def sleepers(self) -> int:
        return sum(1 for e in self._heap if not e[2].done())  # type: ignore[union-attr]

    def jump_to(self, elapsed: float) -> float:
        """Move virtual time forward to ``elapsed`` (never back); returns the seconds skipped."""
        current = self.elapsed()
        if elapsed <= current:
            return 0.0
        self._base_virtual = elapsed
        self._base_real = time.monotonic()
        skipped = elapsed - current
        self.jumped += skipped
        self.jumps += 1
        self._fire()
        return skipped

    def _arm(self) -> None:
        deadline = self.next_deadline()
        if deadline is None or (deadline >= self._timer_at and self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = deadline
        self._timer = loop.call_later(max(deadline - self.elapsed(), 0.0) / self.rate, self._fire)

    def _fire(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = float("inf")
        now = self.elapsed() + 1e-9
        while self._heap and (self._heap[0][2].done() or float(self._heap[0][0]) <= now):  # type: ignore
            _, _, fut = heapq.heappop(self._heap)
            if not fut.done():  # type: ignore[union-attr]
                fut.set_result(None)  # type: ignore[union-attr]
                self.fired += 1
        if self._heap:
            self._arm()


class Pacer:
    """Jumps the clock when the fleet is parked.

    ``parked()`` is the simulator's judgement that no host can make progress before a timer
    fires: every host is powered down, waiting for a window, a cooldown, a retry or its next
    check, or queued behind a full (or paused) group, and etcd has been quiet. It must hold for
    ``settle`` real seconds in a row, so a host that a timer has just woken is seen busy before
    the next jump. Timers less than ``quantum`` virtual seconds after the earliest one fire in the
    same jump (each at most ``quantum`` late): periodic re-checks of many hosts then cost one
    jump, not one each. ``limit`` (virtual elapsed seconds) bounds the jumps: the run's horizon.

    ``activity()`` (optional) is a value that changes whenever anything in the fleet happens (a
    host's event, an etcd event, a timer firing). ``parked()`` looks at every host; with it, the
    settle period needs one look, not one per poll: as long as the value stays the same, the
    fleet is as it was when last seen parked. ``verdict`` is the last judgement.
    """

    def __init__(self, clock: VirtualClock, parked: Callable[[], bool], *, settle: float = 0.004,
                 poll: float = 0.001, limit: float | None = None, quantum: float = 0.0,
                 activity: Callable[[], object] | None = None) -> None:
        self.clock = clock
        self.parked = parked
        self.settle = settle
        self.poll = poll
        self.limit = limit
        self.quantum = quantum
        self.activity = activity
        self.verdict = False

    async def run(self) -> None:
        quiet_since: float | None = None
        mark: object = None
        while True:
            await asyncio.sleep(self.poll)
            if quiet_since is not None and self.activity is not None and self.activity() == mark:
                if time.monotonic() - quiet_since < self.settle:
                    continue
            else:
                mark = self.activity() if self.activity is not None else None
                self.verdict = self.parked()
                if not self.verdict:
                    quiet_since = None
                    continue
                real = time.monotonic()
                if quiet_since is None or self.activity is not None:
                    quiet_since = real  # (with activity: seen parked after the latest change)
                    continue
                if real - quiet_since < self.settle:
                    continue
            deadline = self.clock.next_deadline()
            if deadline is None:
                continue
            deadline = self.clock.last_deadline_before(deadline + self.quantum)
            if self.limit is not None:
                deadline = min(deadline, self.limit)
            self.verdict = False
            self.clock.jump_to(deadline)
            quiet_since = None
