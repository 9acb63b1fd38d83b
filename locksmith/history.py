"""An independent check of a group's semaphore, from etcd's own record of its keys.

The semaphore's promises are about keys, so they can be checked from outside, without trusting
any client: record etcd's watch history of ``groups/<group>/`` (``Recorder``), then replay it
revision by revision (``check``). Nothing here uses the semaphore's mirror or its decisions; the
rules are the ones docs/semaphore.md states. At every revision that creates a holder key:

- ``too_many_holders``: more holder keys than the ``max`` in force (holders granted before ``max``
  was lowered may drain: only grants are judged);
- ``cooldown``: with a cooldown in force, holders + live cooldown keys more than ``max``;
- ``grant_while_paused``: the pause key existed;
- ``fifo``: a waiter granted from the queue had ``available`` or more waiters ahead of it (the
  counting-semaphore FIFO of docs/semaphore.md: fewer than ``available`` at r-1);
- ``fast_path_while_queued``: a grant that took no queue key while someone was queued;
- ``holder_lease``: a holder key on a lease (a slot must survive its holder's reboot);
- ``holder_rewritten``: a put on a holder key that already existed (holders are never rewritten).

And for what contenders report (``ReportedGrant``, e.g. each ``Holder`` that ``lock()`` returned):

- ``phantom_grant``: no holder key was created for that id at that revision.

    rec = Recorder(etcd, "default")
    await rec.start()
    ...run contenders, collecting ReportedGrant(holder.id, holder.revision)...
    history = await rec.stop()
    assert check(history, reported) == []
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from locksmith.errors import LocksmithError, WatchCompactedError
from locksmith.etcd import Etcd, EtcdConfig, KeyValue
from locksmith.keys import DEFAULT_PREFIX, Layout
from locksmith.log import get_logger
from locksmith.windows import DurationError, parse_duration

_log = get_logger(__name__)

TOO_MANY_HOLDERS = "too_many_holders"
COOLDOWN = "cooldown"
GRANT_WHILE_PAUSED = "grant_while_paused"
FIFO = "fifo"
FAST_PATH_WHILE_QUEUED = "fast_path_while_queued"
HOLDER_LEASE = "holder_lease"
HOLDER_REWRITTEN = "holder_rewritten"
PHANTOM_GRANT = "phantom_grant"
KINDS = (TOO_MANY_HOLDERS, COOLDOWN, GRANT_WHILE_PAUSED, FIFO, FAST_PATH_WHILE_QUEUED, HOLDER_LEASE,
         HOLDER_REWRITTEN, PHANTOM_GRANT)

_MARK = "history-mark/"  # under the group; no semaphore, policy or budget code reads it


@dataclass(frozen=True)
class Violation:
    kind: str  # one of KINDS
    revision: int
    description: str
    group: str = ""

    def __str__(self) -> str:
        return f"{self.group + ' ' if self.group else ''}r{self.revision} {self.kind}: {self.description}"


@dataclass(frozen=True)
class Change:
    """One key of the group changed at ``revision``. ``key`` is relative to the group
    (``holders/a``, ``queue/b``, ``policy``, ``pause``, ``cooldown/x``)."""

    revision: int
    kind: Literal["put", "delete"]
    key: str
    value: bytes = b""
    create_revision: int = 0
    lease: int = 0


@dataclass(frozen=True)
class ReportedGrant:
    """A grant as a contender reported it: ``lock()`` returned ``Holder(id, revision=...)``."""

    id: str
    revision: int


@dataclass
class History:
    """The group's keys at ``start_revision - 1`` (as puts) and every change after, up to
    ``end_revision``, in revision order. ``resyncs`` lists revisions at which the record had to be
    re-read because etcd had compacted what the watch still needed: between the revision before
    and that one, changes are missing (the checker starts again from the read state)."""

    group: str
    start_revision: int
    end_revision: int
    initial: list[Change] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    resyncs: dict[int, list[Change]] = field(default_factory=dict)


# -- recording ----------------------------------------------------------------------------------


def _change(layout: Layout, kind: Literal["put", "delete"], kv: KeyValue, revision: int | None = None) -> Change:
    return Change(revision if revision is not None else kv.mod_revision, kind, kv.key[len(layout.base):],
                  kv.value, kv.create_revision, kv.lease)


class Recorder:
    """Records etcd's watch history of one group's keys, from ``start()`` to ``stop()``."""

    def __init__(self, etcd: Etcd, group: str, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.etcd = etcd
        self.layout = Layout(group, prefix)
        self._history: History | None = None
        self._task: asyncio.Task[None] | None = None
        self._seen = 0  # revision of the last change received
        self._moved = asyncio.Event()
        self._failed: BaseException | None = None

    async def start(self, start_revision: int | None = None) -> int:
        """Begin at ``start_revision`` (etcd must still have it), or now. Returns the start."""
        base = self.layout.base
        if start_revision is None:
            kvs, rev = await self.etcd.get_prefix(base)
            start_revision = rev + 1
        elif start_revision > 1:
            kvs, _ = await self.etcd.get_prefix(base, revision=start_revision - 1)
        else:
            kvs = []  # revision 0 would mean "now" to etcd
        h = History(self.layout.group, start_revision, start_revision - 1)
        h.initial = [_change(self.layout, "put", kv) for kv in sorted(kvs, key=lambda k: k.create_revision)]
        self._history = h
        self._seen = start_revision - 1
        self._task = asyncio.create_task(self._run(start_revision), name=f"history-{self.layout.group}")
        return start_revision

    async def _run(self, start_revision: int) -> None:
        h = self._history
        assert h is not None
        base = self.layout.base
        next_rev = start_revision
        try:
            while True:
                try:
                    async for batch in self.etcd.watch_prefix(base, start_revision=next_rev):
                        for ev in batch.events:
                            h.changes.append(_change(self.layout, ev.kind, ev.kv))
                            self._seen = ev.kv.mod_revision
                        if batch.events:
                            next_rev = self._seen + 1
                            self._moved.set()
                except WatchCompactedError:
                    kvs, rev = await self.etcd.get_prefix(base)
                    _log.warning("history_gap", group=self.layout.group, missing_from=next_rev, resync_at=rev)
                    h.resyncs[rev] = [_change(self.layout, "put", kv) for kv in kvs]
                    self._seen = rev
                    next_rev = rev + 1
                    self._moved.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._failed = exc
            self._moved.set()

    async def stop(self, *, within: float = 30.0) -> History:
        """Everything up to now: writes a marker key under the group and waits until the watch
        has delivered it, so no change before it is missing; then stops watching."""
        h = self._history
        if h is None or self._task is None:
            raise LocksmithError("Recorder.stop() before start()")
        mark = f"{self.layout.base}{_MARK}{secrets.token_hex(6)}"
        try:
            mark_rev = await self.etcd.put(mark, b"")
            async with asyncio.timeout(within):
                while self._seen < mark_rev:
                    if self._failed is not None:
                        raise LocksmithError(f"history recorder for {self.layout.group!r} failed: {self._failed}")
                    self._moved.clear()
                    await self._moved.wait()
        except TimeoutError:
            raise LocksmithError(
                f"history recorder for {self.layout.group!r}: the watch did not reach revision {mark_rev} in {within}s"
            ) from None
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            with contextlib.suppress(Exception):
                await self.etcd.delete(mark)
        h.changes = [c for c in h.changes if c.revision < mark_rev]
        h.end_revision = mark_rev - 1
        return h


async def read_history(etcd: Etcd, group: str, start_revision: int, *, prefix: str = DEFAULT_PREFIX,
                       within: float = 60.0) -> History:
    """The group's history from ``start_revision`` (not yet compacted) up to now, after the fact."""
    rec = Recorder(etcd, group, prefix=prefix)
    await rec.start(start_revision)
    return await rec.stop(within=within)


@dataclass
class Recording:
    """Several groups recorded over one connection of its own (``start_recording``)."""

    etcd: Etcd
    recorders: dict[str, Recorder]


async def start_recording(config: EtcdConfig, groups: Iterable[str], *, prefix: str = DEFAULT_PREFIX,
                          start_revision: int | None = None) -> Recording:
    """Record ``groups`` from ``start_revision`` (or now) on a connection of the recorder's own,
    so that a contender's faults never touch it."""
    etcd = await Etcd.connect(config)
    rec = Recording(etcd, {})
    try:
        for g in groups:
            rec.recorders[g] = Recorder(etcd, g, prefix=prefix)
            await rec.recorders[g].start(start_revision)
    except BaseException:
        await stop_recording(rec)
        raise
    return rec


async def stop_recording(rec: Recording, *, within: float = 60.0) -> dict[str, History]:
    try:
        return {g: await r.stop(within=within) for g, r in rec.recorders.items() if r._task is not None}
    finally:
        await rec.etcd.close()


async def stop_and_check(rec: Recording, reported: Iterable[tuple[str, str, int]] = (), *,
                         within: float = 60.0) -> list[Violation]:
    """Stop recording and check every group; ``reported`` holds (group, id, revision) of each grant
    the contenders were given. A report for a group that was not recorded is a violation too."""
    histories = await stop_recording(rec, within=within)
    by_group: dict[str, list[ReportedGrant]] = {g: [] for g in histories}
    out: list[Violation] = []
    for group, holder_id, revision in reported:
        if group not in by_group:
            out.append(Violation(PHANTOM_GRANT, revision, f"{holder_id!r} reported a grant in group {group!r}, "
                                 "which was not recorded", group))
            continue
        by_group[group].append(ReportedGrant(holder_id, revision))
    for group, h in histories.items():
        out += check(h, by_group[group])
        if h.resyncs:
            _log.warning("history_incomplete", group=group, resyncs=sorted(h.resyncs))
    return sorted(out, key=lambda v: (v.revision, v.group))


# -- checking -----------------------------------------------------------------------------------


@dataclass
class _State:
    max: int = 1
    cooldown_s: float = 0.0
    paused: bool = False
    holders: dict[str, int] = field(default_factory=dict)  # id -> create revision
    queue: dict[str, int] = field(default_factory=dict)  # id -> create revision (its place)
    cooling: set[str] = field(default_factory=set)

    def copy(self) -> _State:
        return _State(self.max, self.cooldown_s, self.paused, dict(self.holders), dict(self.queue), set(self.cooling))

    def busy(self) -> int:
        return len(self.holders) + (len(self.cooling) if self.cooldown_s > 0 else 0)


def _policy(value: bytes) -> tuple[int, float]:
    """``slots`` and ``cooldown`` (seconds) of a policy value; the defaults where unreadable (the
    semaphore grants nothing under a corrupt policy, so the defaults judge nothing it did)."""
    try:
        d = json.loads(value)
    except (ValueError, RecursionError):
        return 1, 0.0
    if not isinstance(d, dict):
        return 1, 0.0
    slots = d.get("slots", 1)
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 0:
        slots = 1
    try:
        cooldown = parse_duration(d.get("cooldown", "0s"), where="cooldown").total_seconds()
    except DurationError:
        cooldown = 0.0
    return slots, cooldown


def _apply(s: _State, c: Change) -> None:
    k = c.key
    if k == "policy":
        s.max, s.cooldown_s = _policy(c.value) if c.kind == "put" else (1, 0.0)
    elif k == "pause":
        s.paused = c.kind == "put"
    elif k.startswith("holders/"):
        if c.kind == "put":
            s.holders.setdefault(k[len("holders/"):], c.create_revision or c.revision)
        else:
            s.holders.pop(k[len("holders/"):], None)
    elif k.startswith("queue/"):
        if c.kind == "put":
            s.queue.setdefault(k[len("queue/"):], c.create_revision or c.revision)
        else:
            s.queue.pop(k[len("queue/"):], None)
    elif k.startswith("cooldown/"):
        if c.kind == "put":
            s.cooling.add(k)
        else:
            s.cooling.discard(k)


def _by_revision(changes: Iterable[Change]) -> list[tuple[int, list[Change]]]:
    out: list[tuple[int, list[Change]]] = []
    for c in sorted(changes, key=lambda c: c.revision):  # stable: keeps the order within a revision
        if out and out[-1][0] == c.revision:
            out[-1][1].append(c)
        else:
            out.append((c.revision, [c]))
    return out


def check(history: History, reported: Iterable[ReportedGrant] = ()) -> list[Violation]:
    """Every violation in ``history`` (and of the ``reported`` grants), in revision order."""
    state = _State()
    for c in history.initial:
        _apply(state, c)
    out: list[Violation] = []
    created: set[tuple[str, int]] = set()
    resyncs = dict(history.resyncs)
    for rev, changes in _by_revision(history.changes):
        for at in sorted(r for r in resyncs if r < rev):
            state = _State()
            for c in resyncs.pop(at):
                _apply(state, c)
        before = state.copy()
        for c in changes:
            _apply(state, c)
        for c in changes:
            if c.kind != "put" or not c.key.startswith("holders/"):
                continue
            holder_id = c.key[len("holders/"):]
            if c.lease:
                out.append(Violation(HOLDER_LEASE, rev, f"holder key {holder_id!r} is on lease {c.lease:x}"))
            if holder_id in before.holders:
                out.append(Violation(HOLDER_REWRITTEN, rev, f"holder key {holder_id!r} was rewritten "
                                     f"(created at r{before.holders[holder_id]})"))
                continue
            created.add((holder_id, rev))
            out += _judge_grant(holder_id, rev, before, state, changes)
    for g in reported:
        if (g.id, g.revision) not in created:
            where = ("before the record began" if g.revision < history.start_revision else
                     "after the record ended" if g.revision > history.end_revision else "at that revision")
            out.append(Violation(PHANTOM_GRANT, g.revision,
                                 f"{g.id!r} reported a grant at r{g.revision}, but no holder key was "
                                 f"created for it {where}"))
    return sorted((dataclasses.replace(v, group=history.group) for v in out), key=lambda v: v.revision)


def _judge_grant(holder_id: str, rev: int, before: _State, after: _State, changes: list[Change]) -> list[Violation]:
    out = []
    if before.paused:
        out.append(Violation(GRANT_WHILE_PAUSED, rev, f"{holder_id!r} granted while the group was paused"))
    if len(after.holders) > after.max:
        out.append(Violation(TOO_MANY_HOLDERS, rev, f"{holder_id!r} granted: {len(after.holders)} holders, "
                             f"max {after.max} ({', '.join(sorted(after.holders))})"))
    elif after.cooldown_s > 0 and after.busy() > after.max:
        out.append(Violation(COOLDOWN, rev, f"{holder_id!r} granted: {len(after.holders)} holders + "
                             f"{len(after.cooling)} slot(s) cooling down > max {after.max}"))
    from_queue = holder_id in before.queue and any(
        c.kind == "delete" and c.key == f"queue/{holder_id}" for c in changes)
    if from_queue:
        place = before.queue[holder_id]
        ahead = sorted(w for w, r in before.queue.items() if r < place)
        available = max(0, before.max - before.busy())
        if len(ahead) >= available:
            out.append(Violation(FIFO, rev, f"{holder_id!r} (queued r{place}) granted with {len(ahead)} waiter(s) "
                                 f"ahead ({', '.join(ahead[:5])}) and {available} slot(s) available"))
    elif before.queue:
        out.append(Violation(FAST_PATH_WHILE_QUEUED, rev, f"{holder_id!r} granted without queueing while "
                             f"{len(before.queue)} waiter(s) were queued"))
    return out
