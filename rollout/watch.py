"""The independent watcher: what the report's safety numbers come from.

It trusts no agent. Slot holders come from its own etcd watch of each group's keys (one
connection, one watch per group, counted per revision: the events of one transaction happen at
once); hosts down come from the emulated machines' power state (the hardware, not the agent's
claim). From those it keeps the maximum number of holders per group at any revision, hosts down
over time, every grant and release with its real and virtual time (hand-off latency), when each
group was paused, and every reboot that started outside its group's window.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from locksmith.errors import LocksmithError
from locksmith.etcd import Etcd
from locksmith.keys import Layout
from locksmith.log import get_logger
from locksmith.policy import Policy
from rollout.clock import VirtualClock

log = get_logger("rollout.watch")


@dataclass
class GroupView:
    group: str
    policy: Policy
    layout: Layout
    holders: set[str] = field(default_factory=set)
    queue: set[str] = field(default_factory=set)
    cooling: set[str] = field(default_factory=set)
    paused: bool = False
    max_holders: int = 0
    grants: list[tuple[float, float, str, int]] = field(default_factory=list)  # (virtual, real, id, revision)
    releases: list[tuple[float, float, str]] = field(default_factory=list)
    paused_at: float | None = None
    pause_events: list[tuple[float, bool]] = field(default_factory=list)
    handoffs_real: list[float] = field(default_factory=list)
    handoffs_virtual: list[float] = field(default_factory=list)
    _pending: deque[tuple[float, float]] = field(default_factory=deque)
    holder_series: list[tuple[float, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Violation:
    kind: str  # "holders" | "outside_window" | "bad_release_boots"
    group: str
    at: float  # virtual seconds
    detail: str


class Watcher:
    def __init__(self, etcd: Etcd, groups: dict[str, Policy], prefix: str, clock: VirtualClock) -> None:
        self.etcd = etcd
        self.clock = clock
        self.groups = {g: GroupView(g, p, Layout(g, prefix)) for g, p in groups.items()}
        self.down: set[str] = set()
        self.down_by_group: dict[str, set[str]] = {g: set() for g in groups}
        self.max_down = 0
        self.max_down_by_group: dict[str, int] = dict.fromkeys(groups, 0)
        self.down_series: list[tuple[float, int]] = [(0.0, 0)]
        self.violations: list[Violation] = []
        self.last_event_real = time.monotonic()
        self.last_progress = 0.0  # virtual time of the last grant, release or power change
        self.revision = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()

    # -- etcd ------------------------------------------------------------------------------------

    async def start(self) -> None:
        for view in self.groups.values():
            kvs, rev = await self.etcd.get_prefix(view.layout.base)
            for kv in kvs:
                self._apply(view, "put", kv.key, kv.mod_revision)
            self._tasks.append(asyncio.create_task(self._follow(view, rev + 1), name=f"watch-{view.group}"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _follow(self, view: GroupView, start: int) -> None:
        while True:
            try:
                async for batch in self.etcd.watch_prefix(view.layout.base, start_revision=start):
                    for rev, events in itertools.groupby(batch.events, key=lambda e: e.kv.mod_revision):
                        for ev in events:
                            self._apply(view, ev.kind, ev.kv.key, rev)
                        view.max_holders = max(view.max_holders, len(view.holders))
                        self._check_holders(view, rev)
                        start = rev + 1
                        self.revision = max(self.revision, rev)
                    if batch.events:
                        self.last_event_real = time.monotonic()
            except asyncio.CancelledError:
                raise
            except LocksmithError as exc:  # compaction or a broken stream: re-read and follow again
                log.warning("watcher_restart", group=view.group, error=str(exc))
                await asyncio.sleep(0.1)
                kvs, rev = await self.etcd.get_prefix(view.layout.base)
                keys = {kv.key for kv in kvs}
                for hid in list(view.holders):
                    if view.layout.holder(hid) not in keys:
                        self._apply(view, "delete", view.layout.holder(hid), rev)
                for kv in kvs:
                    self._apply(view, "put", kv.key, kv.mod_revision)
                start = rev + 1

    def _apply(self, view: GroupView, kind: str, key: str, rev: int) -> None:
        vt, rt = self.clock.elapsed(), time.monotonic()
        lay = view.layout
        if key.startswith(lay.holders):
            hid = key.removeprefix(lay.holders)
            if kind == "put" and hid not in view.holders:
                view.holders.add(hid)
                view.grants.append((vt, rt, hid, rev))
                if view._pending:
                    v0, r0 = view._pending.popleft()
                    view.handoffs_virtual.append(vt - v0)
                    view.handoffs_real.append(rt - r0)
                self.last_progress = vt
            elif kind == "delete" and hid in view.holders:
                view.holders.discard(hid)
                view.releases.append((vt, rt, hid))
                if view.queue and not view.paused:
                    view._pending.append((vt, rt))
                self.last_progress = vt
            view.holder_series.append((vt, len(view.holders)))
        elif key.startswith(lay.queue):
            hid = key.removeprefix(lay.queue)
            (view.queue.discard if kind == "delete" else view.queue.add)(hid)
            if kind == "delete" and not view.queue:
                view._pending.clear()  # nobody waits: a free slot is not a hand-off
        elif key.startswith(getattr(lay, "cooldown", lay.base + "cooldown/")):
            (view.cooling.discard if kind == "delete" else view.cooling.add)(key)
        elif key == lay.pause:
            paused = kind == "put"
            if paused != view.paused:
                view.paused = paused
                view.pause_events.append((vt, paused))
                if paused and view.paused_at is None:
                    view.paused_at = vt
                if paused:
                    view._pending.clear()

    def _check_holders(self, view: GroupView, rev: int) -> None:
        if len(view.holders) > view.policy.slots:
            self.violations.append(Violation(
                "holders", view.group, self.clock.elapsed(),
                f"{len(view.holders)} holders at revision {rev}, slots {view.policy.slots}: "
                f"{', '.join(sorted(view.holders))}"))

    def free_slots(self, group: str) -> int:
        view = self.groups[group]
        return 0 if view.paused else view.policy.slots - len(view.holders) - len(view.cooling)

    def cooling(self, group: str) -> bool:
        """A freed slot is in its cooldown: an etcd lease (real time) ends it, so no jump now."""
        return bool(self.groups[group].cooling)

    # -- the machines -----------------------------------------------------------------------------

    def power(self, host_id: str, group: str, power: str) -> None:
        vt = self.clock.elapsed()
        self.last_progress = vt
        if power == "down":
            view = self.groups[group]
            windows = view.policy.window_set()
            if not windows.is_open(self.clock.now()):
                self.violations.append(Violation(
                    "outside_window", group, vt,
                    f"{host_id} went down at {self.clock.now().astimezone(windows.tz):%a %Y-%m-%d %H:%M:%S %Z}, "
                    f"outside the windows of group {group}"))
            self.down.add(host_id)
            self.down_by_group[group].add(host_id)
        elif power == "up":
            self.down.discard(host_id)
            self.down_by_group[group].discard(host_id)
        # "dead" stays down
        self.max_down = max(self.max_down, len(self.down))
        self.max_down_by_group[group] = max(self.max_down_by_group[group], len(self.down_by_group[group]))
        self.down_series.append((vt, len(self.down)))

    def summary(self) -> dict[str, Any]:
        return {g: {"max_holders": v.max_holders, "grants": len(v.grants), "paused_at": v.paused_at}
                for g, v in self.groups.items()}
