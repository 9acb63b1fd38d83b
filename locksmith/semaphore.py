"""The etcd v3 reboot semaphore: at most ``max`` holders per group, waiters served first come,
first served. docs/semaphore.md has the key layout, every transaction and why it is safe.

In short: a holder is one key ``holders/<id>`` with no lease (a slot survives its holder's reboot);
a waiter is one key ``queue/<id>`` on a lease its process keeps alive (a dead waiter leaves the
queue within the TTL), ranked by create_revision. Each ``Semaphore`` object keeps one watch-driven
mirror of its group; waiters sleep on it and only a waiter that the mirror shows among the first
``available`` ones sends a grant transaction. Every write is a transaction whose compares make it
safe whatever the mirror believed, so at no revision are there more than ``max`` holders.

Every write recognises its own earlier commit when its reply is lost: a grant carries a nonce in
the holder record, a release its audit entry's key, and a transaction whose compare fails reads
those back in its failure branch (free: same round trip). Only when the outcome is unknown (the
call failed) is there an extra read. So what ``lock``, ``unlock`` and ``release_overdue`` answer is
true, and a ``lock()`` that does not return (cancelled, failed) releases any grant it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import islice
from typing import Any

from locksmith import audit
from locksmith.clock import SYSTEM_CLOCK, Clock
from locksmith.errors import (
    CorruptValueError,
    EtcdError,
    EtcdUnavailableError,
    InvalidArgumentError,
    LocksmithError,
    SlotUnavailableError,
    WatchCompactedError,
)
from locksmith.etcd import (
    Compare,
    Delete,
    Etcd,
    Event,
    Get,
    KeyValue,
    Lease,
    Put,
    Target,
    TxnResult,
    absent,
    mod_revision_is,
    unchanged_since,
)
from locksmith.keys import DEFAULT_PREFIX, FORMAT_VERSION, Layout, check_id
from locksmith.log import get_logger
from locksmith.policy import max_slots
from locksmith.windows import DurationError, parse_duration

_log = get_logger(__name__)

DEFAULT_MAX = 1
DEFAULT_HOLD = timedelta(hours=1)
# try_lock re-reads after a lost race (someone else's write landed between its read and its txn);
# a race is not "no slot", but the CLI must not loop for ever either.
_TRY_ATTEMPTS = 5
# After a write whose outcome is unknown, how long to keep trying to read it back before giving up.
_READ_BACK_DELAYS = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
# How often a mirror with local waiters compares itself with a fresh read: a watch that stalls
# (a frozen member) or misses an event must cost seconds of fairness, never a waiter for ever.
MIRROR_CHECK_EVERY = 10.0
# A cooldown key's lease outlives the cooldown by this much: its TTL starts at the lease grant,
# just before the release commits, and the cooldown is promised from the release on.
_COOLDOWN_MARGIN = 1


# -- public values ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    id: str
    since: datetime
    deadline: datetime | None
    reason: str
    by: str
    revision: int  # the holder key's mod_revision (= its create_revision: holders are never rewritten)

    def overdue(self, now: datetime) -> bool:
        return self.deadline is not None and now > self.deadline


@dataclass(frozen=True)
class Waiter:
    id: str
    since: datetime
    reason: str
    by: str
    revision: int  # the queue key's create_revision: the waiter's place in line


@dataclass(frozen=True)
class SemaphoreState:
    group: str
    max: int
    holders: list[Holder]
    queue: list[Waiter]  # FIFO order
    paused: bool
    revision: int
    cooldown: timedelta = timedelta(0)  # the policy's cooldown
    cooling_down: int = 0  # freed slots still in their cooldown (counted only while cooldown > 0)

    @property
    def available(self) -> int:
        return max(0, self.max - len(self.holders) - self.cooling_down)


# -- parsing ------------------------------------------------------------------------------------


def _load(key: str, raw: bytes) -> dict[str, Any]:
    try:
        d = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError includes UnicodeDecodeError
        raise CorruptValueError(key, f"not JSON ({exc})") from exc
    if not isinstance(d, dict):
        raise CorruptValueError(key, f"expected a JSON object, found a JSON {type(d).__name__}")
    if "format_version" not in d:
        fields = ", ".join(sorted(d)[:6]) or "none"
        raise CorruptValueError(
            key, f"no format_version (fields: {fields}); not a locksmith v{FORMAT_VERSION} record"
        )
    if d["format_version"] != FORMAT_VERSION:
        raise CorruptValueError(key, f"format_version {d['format_version']!r}, expected {FORMAT_VERSION}")
    return d


def _str(key: str, d: dict[str, Any], name: str) -> str:
    v = d.get(name, "")
    if not isinstance(v, str):
        raise CorruptValueError(key, f"field {name!r} is {type(v).__name__}, expected a string")
    return v


def _time(key: str, d: dict[str, Any], name: str, *, optional: bool = False) -> datetime | None:
    v = d.get(name)
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise CorruptValueError(key, f"field {name!r} is missing or not a timestamp string")
    try:
        t = datetime.fromisoformat(v)
    except ValueError as exc:
        raise CorruptValueError(key, f"field {name!r} is not an ISO 8601 timestamp: {v!r}") from exc
    if t.tzinfo is None:
        raise CorruptValueError(key, f"field {name!r} has no time zone: {v!r}")
    return t


def _record_id(key: str, d: dict[str, Any], holder_id: str) -> None:
    if d.get("id") != holder_id:
        raise CorruptValueError(key, f"field 'id' is {d.get('id')!r}, expected {holder_id!r} (the key's name)")


def _key_id(key: str, holder_id: str) -> None:
    try:
        check_id(holder_id)
    except InvalidArgumentError as exc:
        raise CorruptValueError(key, f"key name is not a valid id: {exc}") from exc


def _record(kv: KeyValue, holder_id: str) -> tuple[dict[str, Any], datetime]:
    """The fields every holder and waiter record shares, checked: the id and when it began."""
    _key_id(kv.key, holder_id)
    d = _load(kv.key, kv.value)
    _record_id(kv.key, d, holder_id)
    since = _time(kv.key, d, "since")
    assert since is not None
    return d, since


def parse_holder(kv: KeyValue, holder_id: str) -> Holder:
    d, since = _record(kv, holder_id)
    return Holder(
        id=holder_id, since=since, deadline=_time(kv.key, d, "deadline", optional=True),
        reason=_str(kv.key, d, "reason"), by=_str(kv.key, d, "by"), revision=kv.mod_revision,
    )


def parse_waiter(kv: KeyValue, holder_id: str) -> Waiter:
    d, since = _record(kv, holder_id)
    return Waiter(id=holder_id, since=since, reason=_str(kv.key, d, "reason"), by=_str(kv.key, d, "by"),
                  revision=kv.create_revision)


def parse_policy(kv: KeyValue) -> tuple[dict[str, Any], int]:
    """The policy document and the semaphore's max from it (``slots``; DEFAULT_MAX if unset)."""
    d = _load(kv.key, kv.value)
    slots = d.get("slots", DEFAULT_MAX)
    # 0 is accepted (no new grants) so that a policy tool may use it; set_max itself wants >= 1.
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 0:
        raise CorruptValueError(kv.key, f"field 'slots' is {slots!r}, expected an integer >= 0")
    return d, slots


def parse_cooldown(key: str, doc: dict[str, Any]) -> int:
    """The policy's cooldown in whole seconds (rounded up; 0 when unset)."""
    try:
        cooldown = parse_duration(doc.get("cooldown", "0s"), where="cooldown")
    except DurationError as exc:
        raise CorruptValueError(key, f"field {exc}") from exc
    return math.ceil(cooldown.total_seconds())


def parse_pause(kv: KeyValue) -> None:
    _load(kv.key, kv.value)


def _nonce(kv: KeyValue) -> str:
    """The nonce a holder record was written with ("" if none or the value does not parse)."""
    try:
        d = json.loads(kv.value)
    except (ValueError, RecursionError):
        return ""
    v = d.get("nonce", "") if isinstance(d, dict) else ""
    return v if isinstance(v, str) else ""


def _dumps(d: dict[str, Any]) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode()


# -- the parsed view of one group ---------------------------------------------------------------


class _View:
    """The semaphore's keys of one group, parsed, exactly as of ``revision``. Values that do not
    parse are kept in ``corrupt`` (key -> problem) so that a later fix or delete clears them."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._reset()

    def _reset(self) -> None:
        self.revision = 0
        self.policy_rev = 0  # mod_revision of the policy key; 0 = absent
        self.policy_doc: dict[str, Any] = {}
        self.max = DEFAULT_MAX
        self.cooldown_s = 0  # the policy's cooldown, whole seconds
        self.pause_rev = 0
        self.holders: dict[str, Holder] = {}
        self.queue: dict[str, Waiter] = {}  # kept in create_revision (FIFO) order
        self.cooling: dict[str, int] = {}  # cooldown key -> mod_revision
        self.corrupt: dict[str, str] = {}

    # -- building ---------------------------------------------------------------------------------

    def load(self, kvs: Iterable[KeyValue], revision: int) -> None:
        self._reset()
        for kv in sorted(kvs, key=lambda k: k.create_revision):
            self.put(kv)
        self.revision = revision

    def _kind(self, key: str) -> tuple[str, str]:
        if not key.startswith(self.layout.base):
            return "", ""  # never read another group's key as ours, whatever a stream delivers
        rel = key[len(self.layout.base):]
        if rel in ("policy", "pause"):
            return rel, ""
        for kind in ("holders/", "queue/", "cooldown/"):
            if rel.startswith(kind):
                return kind, rel[len(kind):]
        return "", ""  # failures/ and anything else under the group is not the semaphore's

    def put(self, kv: KeyValue) -> str:
        kind, holder_id = self._kind(kv.key)
        try:
            if kind == "policy":
                self.policy_rev = kv.mod_revision
                self.policy_doc, self.max = parse_policy(kv)
                self.cooldown_s = parse_cooldown(kv.key, self.policy_doc)
            elif kind == "pause":
                self.pause_rev = kv.mod_revision
                parse_pause(kv)
            elif kind == "holders/":
                self.holders.pop(holder_id, None)
                self.holders[holder_id] = parse_holder(kv, holder_id)
            elif kind == "queue/":
                self._enqueue(parse_waiter(kv, holder_id))
            elif kind == "cooldown/":
                self.cooling[kv.key] = kv.mod_revision  # only counted; the value is informational
                return ""
            else:
                return ""
        except CorruptValueError as exc:
            self.corrupt[kv.key] = exc.problem
            if kind == "queue/":
                self.queue.pop(holder_id, None)
            return holder_id
        self.corrupt.pop(kv.key, None)
        return holder_id

    def _enqueue(self, w: Waiter) -> None:
        old = self.queue.get(w.id)
        if old is not None and old.revision == w.revision:
            self.queue[w.id] = w  # a re-put keeps its place
            return
        self.queue.pop(w.id, None)
        if not self.queue or next(reversed(self.queue.values())).revision < w.revision:
            self.queue[w.id] = w  # the usual case: a new key is the newest
            return
        self.queue[w.id] = w
        self.queue = dict(sorted(self.queue.items(), key=lambda item: item[1].revision))

    def delete(self, key: str) -> str:
        kind, holder_id = self._kind(key)
        self.corrupt.pop(key, None)
        if kind == "policy":
            self.policy_rev, self.policy_doc, self.max, self.cooldown_s = 0, {}, DEFAULT_MAX, 0
        elif kind == "pause":
            self.pause_rev = 0
        elif kind == "holders/":
            self.holders.pop(holder_id, None)
        elif kind == "queue/":
            self.queue.pop(holder_id, None)
        elif kind == "cooldown/":
            self.cooling.pop(key, None)
            return ""
        return holder_id

    # -- reading ----------------------------------------------------------------------------------

    def check(self) -> None:
        if self.corrupt:
            key = min(self.corrupt)
            raise CorruptValueError(key, self.corrupt[key])

    @property
    def paused(self) -> bool:
        return self.pause_rev != 0

    @property
    def cooling_down(self) -> int:
        return len(self.cooling) if self.cooldown_s > 0 else 0

    @property
    def available(self) -> int:
        return max(0, self.max - len(self.holders) - self.cooling_down)

    def signature(self) -> tuple[object, ...]:
        """What the semaphore's keys are, without the revision: two views with equal signatures
        would make every waiter decide the same."""
        return (self.policy_rev, self.pause_rev, tuple(sorted((h.id, h.revision) for h in self.holders.values())),
                tuple(sorted((w.id, w.revision) for w in self.queue.values())), tuple(sorted(self.cooling)),
                tuple(sorted(self.corrupt)))

    def first(self, n: int) -> Iterable[str]:
        return islice(self.queue, n)

    def eligible(self, holder_id: str) -> bool:
        """Among the first ``available`` waiters and not paused: this waiter may try its grant."""
        return not self.paused and holder_id in self.first(self.available)

    def fast_path_open(self) -> bool:
        return not self.paused and not self.queue and self.available > 0

    def policy_compare(self) -> Compare:
        if self.policy_rev:
            return mod_revision_is(self.layout.policy, self.policy_rev)
        return absent(self.layout.policy)

    def state(self) -> SemaphoreState:
        self.check()
        return SemaphoreState(
            group=self.layout.group, max=self.max,
            holders=sorted(self.holders.values(), key=lambda h: (h.revision, h.id)),
            queue=list(self.queue.values()), paused=self.paused, revision=self.revision,
            cooldown=timedelta(seconds=self.cooldown_s), cooling_down=self.cooling_down,
        )


async def _read(etcd: Etcd, layout: Layout) -> _View:
    kvs, revision = await etcd.get_prefix(layout.base)
    view = _View(layout)
    view.load(kvs, revision)
    return view


# -- the mirror ---------------------------------------------------------------------------------


class _Mirror:
    """One watch-driven copy of a group's semaphore keys, shared by every lock() of one Semaphore.

    Its ``view`` is exact as of ``view.revision``: the revision of the last applied event (not the
    watch header's, which etcd may set past events it has not sent yet). After each batch it wakes
    only the local waiters the batch concerns: those whose own keys changed and those now eligible
    (or all of them when a value is corrupt), so a process with many waiters does O(free slots)
    work per event, not O(waiters).
    """

    def __init__(self, etcd: Etcd, layout: Layout, *, check_every: float = MIRROR_CHECK_EVERY) -> None:
        self.etcd = etcd
        self.layout = layout
        self.view = _View(layout)
        self.closed = False
        self.check_every = check_every
        self._local: dict[str, list[asyncio.Event]] = {}
        self._moved = asyncio.Event()  # set, and replaced, whenever the view moves on (followers)
        self._task: asyncio.Task[None] | None = None
        self._checker: asyncio.Task[None] | None = None
        self._last_event = 0.0  # loop time of the last applied batch (or check)
        self.users = 0  # Semaphores attached (see _attach)
        self.fast_inflight = 0  # fast-path grants in flight through this mirror (see Semaphore.lock)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._state: SemaphoreState | None = None  # view.state(), built once per move (_advanced drops it)
        self.listeners: list[Callable[[], None]] = []

    async def start(self) -> None:
        """The first read happens in the caller, so that an unreachable etcd is the caller's error."""
        self.view = await _read(self.etcd, self.layout)
        self._task = asyncio.create_task(self._run(), name=f"semaphore-mirror-{self.layout.group}")
        self._checker = asyncio.create_task(self._check_loop(), name=f"semaphore-mirror-check-{self.layout.group}")

    async def close(self) -> None:
        self.closed = True
        for task in (self._task, self._checker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._wake_all()
        self._advanced()

    def current(self) -> _View:
        if self.closed:
            raise LocksmithError(f"semaphore for group {self.layout.group!r} was closed")
        self.view.check()
        return self.view

    def state(self) -> SemaphoreState:
        """``view.state()``, built once per move of the view: every follower of a shared mirror
        reads the same snapshot (treat it as read-only)."""
        if self._state is None:
            self._state = self.view.state()  # raises while a value is corrupt: nothing cached
        return self._state

    def register(self, holder_id: str) -> asyncio.Event:
        ev = asyncio.Event()
        self._local.setdefault(holder_id, []).append(ev)
        return ev

    def unregister(self, holder_id: str, ev: asyncio.Event) -> None:
        evs = self._local.get(holder_id, [])
        with contextlib.suppress(ValueError):
            evs.remove(ev)
        if not evs:
            self._local.pop(holder_id, None)

    def _wake(self, ids: Iterable[str]) -> None:
        for holder_id in ids:
            for ev in self._local.get(holder_id, ()):
                ev.set()

    def _wake_all(self) -> None:
        self._wake(list(self._local))

    def _advanced(self) -> None:
        """The view moved on (events applied, a fresh read taken) or the mirror closed."""
        self._state = None
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()
        for listener in list(self.listeners):
            try:
                listener()
            except Exception as exc:  # one follower's bug must not stop the mirror
                _log.error("semaphore_listener_failed", group=self.layout.group, error=str(exc))

    async def changed(self, since: int) -> int:
        while self.view.revision <= since and not self.closed:
            await self._moved.wait()
        if self.closed:
            raise LocksmithError(f"semaphore for group {self.layout.group!r} was closed")
        return self.view.revision

    async def _run(self) -> None:
        backoff = 0.1
        resync = False
        while True:
            try:
                if resync:
                    self.view = await _read(self.etcd, self.layout)
                    self._wake_all()
                    self._advanced()
                    resync = False
                # Only a mirror with local waiters probes a quiet stream: an idle follower costs
                # etcd nothing but the stream (the channel's keepalive still finds a dead member).
                async for batch in self.etcd.watch_prefix(self.layout.base, start_revision=self.view.revision + 1,
                                                          urgent=lambda: bool(self._local)):
                    if batch.events:
                        self._apply(batch.events)
                    backoff = 0.1
                raise EtcdError("watch stream ended")
            except asyncio.CancelledError:
                raise
            except WatchCompactedError:
                _log.info("semaphore_mirror_resync", group=self.layout.group, reason="compacted")
                resync = True
            except Exception as exc:  # the mirror must outlive any failure: log, back off, go on
                _log.warning("semaphore_mirror_error", group=self.layout.group, error=str(exc),
                             error_type=type(exc).__name__, retry_in=backoff)
                # Re-reading is always correct; re-watching from our revision would be too, but after
                # an unexpected error (not just a dropped stream) a fresh read is the safe choice.
                resync = not isinstance(exc, EtcdError)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _check_loop(self) -> None:
        """While local waiters wait and no event has come for ``check_every`` seconds (longer in a
        long line, so that a fleet of idle waiters does not read a big group too often), compare
        the mirror with a fresh read; if they still differ a moment later (not just the watch's
        latency), take the read. A watch that stalls or missed an event then costs seconds of
        fairness, not a waiter for ever."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.check_every)
            quiet = self.check_every * max(1.0, len(self.view.queue) / 50)
            if not self._local or loop.time() - self._last_event < quiet:
                continue
            self._last_event = loop.time()
            try:
                fresh = await _read(self.etcd, self.layout)
                if fresh.revision <= self.view.revision or fresh.signature() == self.view.signature():
                    continue
                await asyncio.sleep(1.0)
                if self.view.revision >= fresh.revision or fresh.signature() == self.view.signature():
                    continue
                fresh = await _read(self.etcd, self.layout)
            except Exception as exc:  # the mirror's own loop reports etcd trouble; try again later
                _log.debug("semaphore_mirror_check_failed", group=self.layout.group, error=str(exc))
                continue
            if fresh.revision > self.view.revision and fresh.signature() != self.view.signature():
                _log.warning("semaphore_mirror_stale", group=self.layout.group,
                             mirror_revision=self.view.revision, read_revision=fresh.revision)
                # The watch goes on from where it was; _apply skips what this read already holds.
                self.view = fresh
                self._wake_all()
                self._advanced()

    def _apply(self, events: list[Event]) -> None:
        view = self.view
        touched: list[str] = []
        seen = view.revision
        self._last_event = asyncio.get_running_loop().time()
        for ev in events:
            if ev.kv.mod_revision <= seen:
                continue  # already in a fresh read that replaced the view
            holder_id = view.put(ev.kv) if ev.kind == "put" else view.delete(ev.kv.key)
            if holder_id:
                touched.append(holder_id)
            view.revision = max(view.revision, ev.kv.mod_revision)
        if view.revision > seen:
            self._advanced()
        if view.corrupt:
            self._wake_all()
            return
        self._wake(touched)
        if not view.paused:
            self._wake(view.first(view.available))


# Semaphores on the same Etcd client share one mirror per group: a process that runs many agents
# (the simulator) then decodes each event once, not once per agent. A daemon has one of each.
_MIRRORS: weakref.WeakKeyDictionary[Etcd, dict[str, _Mirror]] = weakref.WeakKeyDictionary()


async def _attach(etcd: Etcd, layout: Layout, check_every: float) -> _Mirror:
    mirrors = _MIRRORS.setdefault(etcd, {})
    mirror = mirrors.get(layout.base)
    if mirror is None or mirror.closed:
        mirror = mirrors[layout.base] = _Mirror(etcd, layout, check_every=check_every)
        mirror.users += 1
        try:
            await mirror.start()
        except BaseException as exc:
            mirror.users -= 1
            mirror.closed = True
            if mirrors.get(layout.base) is mirror:
                del mirrors[layout.base]
            if not mirror.ready.done():
                mirror.ready.set_exception(exc if isinstance(exc, Exception) else LocksmithError("start cancelled"))
                mirror.ready.exception()  # retrieved: nobody else may be waiting
            raise
        mirror.ready.set_result(None)
        return mirror
    mirror.users += 1
    try:
        await asyncio.shield(mirror.ready)
    except BaseException:
        mirror.users -= 1
        raise
    return mirror


async def _detach(mirror: _Mirror) -> None:
    mirror.users -= 1
    if mirror.users > 0:
        return
    mirrors = _MIRRORS.get(mirror.etcd, {})
    if mirrors.get(mirror.layout.base) is mirror:
        del mirrors[mirror.layout.base]
    await mirror.close()


# -- the semaphore ------------------------------------------------------------------------------


async def read_state(etcd: Etcd, group: str = "default", *, prefix: str = DEFAULT_PREFIX) -> SemaphoreState:
    """The group's semaphore as of now (one linearizable range read)."""
    return (await _read(etcd, Layout(group, prefix))).state()


async def list_groups(etcd: Etcd, *, prefix: str = DEFAULT_PREFIX) -> list[str]:
    base = Layout.groups_prefix(prefix)
    kvs, _ = await etcd.get_prefix(base)
    return sorted({kv.key[len(base):].split("/", 1)[0] for kv in kvs} - {""})


@dataclass
class _Attempt:
    """What one lock()/try_lock() call has written or may have: the nonce of each grant it sent (so
    that it recognises its own commit whose reply was lost), the grant transaction still in flight
    (a cancelled call must learn its outcome) and whether it sent a queue put."""

    nonces: set[str] = field(default_factory=set)
    inflight: asyncio.Task[TxnResult] | None = None
    queued: bool = False
    queue_key_gone: bool = False  # a queued grant of ours committed, deleting the queue key with it


class Semaphore:
    """The reboot semaphore of one group. One object per process (or per connection) is enough:
    any number of concurrent ``lock()`` calls share its mirror and its lease."""

    def __init__(
        self, etcd: Etcd, group: str = "default", *, prefix: str = DEFAULT_PREFIX, lease_ttl: int = 10,
        clock: Clock = SYSTEM_CLOCK, outage_tolerance: float = 30.0,
    ) -> None:
        """``outage_tolerance``: how long a waiting lock() keeps waiting while etcd does not answer
        (it then raises EtcdUnavailableError); 0 = raise at the first failed call."""
        if lease_ttl < 1:
            raise InvalidArgumentError(f"lease_ttl must be at least 1 second, got {lease_ttl}")
        self.etcd = etcd
        self.layout = Layout(group, prefix)
        self.group = group
        self.lease_ttl = lease_ttl
        self.clock = clock
        self.mirror_check_every = MIRROR_CHECK_EVERY
        self.outage_tolerance = outage_tolerance
        self._by = audit.actor()
        self._mirror: _Mirror | None = None
        self._mirror_lock = asyncio.Lock()
        self._lease: Lease | None = None
        self._lease_lock = asyncio.Lock()
        self._lease_guards: set[asyncio.Task[None]] = set()
        self._pruner = audit.Pruner()
        self._background: set[asyncio.Task[None]] = set()
        self._abandoning: dict[str, asyncio.Task[None]] = {}  # id -> clean-up of a lock() that gave up
        self._closed = False
        self._closing = asyncio.Event()
        self._listener_stops: list[Callable[[], None]] = []
        self._wakes: set[asyncio.Event] = set()  # of this object's waiting lock() calls

    # -- public API ---------------------------------------------------------------------------------

    async def lock(self, holder_id: str, *, reason: str = "", hold_for: timedelta | None = None) -> Holder:
        """Wait for a slot (FIFO) and take it. A holder locking again gets its slot back, unwritten.

        Returns only a holder key read fresh or written by this call. If it raises or is cancelled
        it holds nothing: its queue key is deleted and a grant of its own that committed anyway
        (reply lost, cancelled in flight) is released in the background."""
        check_id(holder_id)
        hold = _hold(hold_for, self.clock.now())
        mirror = await self._ensure_mirror()
        mirror.current()
        await self._after_abandon(holder_id)
        held, checked_at = await self._read_holder(holder_id)
        if held is not None:
            return held
        wake = mirror.register(holder_id)
        self._wakes.add(wake)
        att = _Attempt()
        enqueued_at = 0  # revision of our queue put; 0 = not queued
        lease: Lease | None = None  # the lease our queue key is on
        tried_at = 0  # mirror revision of our last failed grant: don't retry until the mirror moves
        fast_tried = False
        granted: Holder | None = None
        loop = asyncio.get_running_loop()
        failing_since: float | None = None  # when etcd stopped answering this call
        just_failed = False
        delay = 0.1
        try:
            while True:
                if not just_failed:
                    failing_since, delay = None, 0.1
                just_failed = False
                wake.clear()
                if self._closed:  # the mirror may live on for other Semaphores on this client
                    raise LocksmithError(f"semaphore for group {self.group!r} was closed")
                view = mirror.current()
                try:
                    if holder_id in view.holders and view.revision > checked_at:
                        # The mirror says we hold: a grant of ours whose reply was lost and whose read-back
                        # missed a late commit, or the same id granted through another Semaphore. Only a
                        # fresh read is returned; the mirror may be stale.
                        checked_at = view.revision
                        granted, _ = await self._read_holder(holder_id)
                        if granted is not None:
                            return granted
                    if not enqueued_at:
                        # No more fast-path grants in flight from this process than free slots:
                        # the rest would only lose the race (a FleetLock server, a simulated fleet).
                        if not fast_tried and view.fast_path_open() and mirror.fast_inflight < view.available:
                            fast_tried = True
                            mirror.fast_inflight += 1
                            try:
                                granted = await self._grant(view, holder_id, reason, hold, queued=None, att=att)
                            finally:
                                mirror.fast_inflight -= 1
                            if granted is not None:
                                return granted
                            continue
                        att.queued = True
                        enqueued_at, lease = await self._enqueue(holder_id, reason)
                        continue
                    if lease is not None and lease.lost.is_set():
                        # etcd deleted our queue key with the lease; the mirror may not show it yet (a
                        # stalled watch), but waiting for it could be for ever.
                        _log.warning("semaphore_requeue", group=self.group, id=holder_id, cause="lease_lost")
                        enqueued_at, lease = await self._enqueue(holder_id, reason, lease_suspect=True)
                        continue
                    if view.revision < enqueued_at:
                        await wake.wait()
                        continue
                    me = view.queue.get(holder_id)
                    if me is None:
                        # Our key is gone: the lease expired (or someone deleted it). Join again, at the end.
                        _log.warning("semaphore_requeue", group=self.group, id=holder_id, cause="queue_key_gone")
                        enqueued_at, lease = await self._enqueue(holder_id, reason, lease_suspect=True)
                        continue
                    if view.revision > tried_at and view.eligible(holder_id):
                        tried_at = view.revision
                        granted = await self._grant(view, holder_id, reason, hold, queued=me, att=att)
                        if granted is not None:
                            return granted
                        continue
                    await wake.wait()
                except EtcdUnavailableError as exc:
                    # A waiting lock() rides out an etcd outage (an election, quorum lost for a
                    # while): raising would give up its place in the line. Its queue key is on a
                    # lease etcd renews when a leader is back; an unknown grant outcome is
                    # resolved by the next read of its own holder key (its nonce).
                    just_failed = True
                    tried_at = checked_at = 0  # try again after the backoff, moved or not
                    failing_since = failing_since if failing_since is not None else loop.time()
                    if loop.time() - failing_since >= self.outage_tolerance:
                        raise
                    _log.warning("semaphore_wait_etcd_unavailable", group=self.group, id=holder_id,
                                 error=str(exc), retry_in=delay)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._closing.wait()
                    delay = min(delay * 2, 5.0)
        finally:
            mirror.unregister(holder_id, wake)
            self._wakes.discard(wake)
            if granted is None:
                if att.queued or att.nonces:
                    self._spawn_abandon(holder_id, att)
            elif att.queued and not att.queue_key_gone:
                # Granted through a path that left our queue key (a lost reply, another Semaphore).
                self._spawn(self._dequeue(holder_id), "dequeue")

    async def try_lock(self, holder_id: str, *, reason: str = "", hold_for: timedelta | None = None) -> Holder:
        """Take a slot now or raise SlotUnavailableError; never waits and never jumps the queue."""
        check_id(holder_id)
        hold = _hold(hold_for, self.clock.now())
        await self._after_abandon(holder_id)
        att = _Attempt()
        granted: Holder | None = None
        try:
            for _ in range(_TRY_ATTEMPTS):
                view = await _read(self.etcd, self.layout)
                view.check()
                if holder_id in view.holders:
                    granted = view.holders[holder_id]
                    return granted
                if view.paused:
                    raise SlotUnavailableError(f"group {self.group!r} is paused")
                if view.queue:
                    raise SlotUnavailableError(
                        f"group {self.group!r} has {len(view.queue)} waiter(s) queued; try_lock does not jump the queue"
                    )
                if view.available <= 0:
                    cooling = (f", {view.cooling_down} freed slot(s) in their cooldown of {view.cooldown_s}s"
                               if view.cooling_down else "")
                    raise SlotUnavailableError(
                        f"group {self.group!r} has no free slot: {len(view.holders)} of {view.max} held{cooling}"
                    )
                granted = await self._grant(view, holder_id, reason, hold, queued=None, att=att, fresh=True)
                if granted is not None:
                    return granted
            raise SlotUnavailableError(f"group {self.group!r} is contended: lost {_TRY_ATTEMPTS} races for a slot")
        finally:
            if granted is None and att.nonces:
                self._spawn_abandon(holder_id, att)

    async def unlock(self, holder_id: str, *, reason: str = "", by: str | None = None) -> bool:
        """Release the slot. False (and nothing written) if ``holder_id`` holds none. True exactly
        when this call's transaction deleted the holder key, even if its reply was lost; raises
        EtcdUnavailableError only when etcd could not tell either way. ``reason`` and ``by`` go
        into the audit entry (the FleetLock server names the client there)."""
        check_id(holder_id)
        return await self._release(holder_id, None, action="unlock", reason=reason, by=by or self._by)

    async def release_overdue(self, holder_id: str, revision: int, *, by: str, reason: str) -> bool:
        """Release ``holder_id``'s slot for it, because it is past its deadline. Only the grant at
        ``revision`` (``Holder.revision``) is released, never a fresh one, and only if it is overdue
        by this object's clock. Concurrent callers (any process): exactly one gets True. The audit
        entry (action ``release-overdue``) names ``by`` and ``reason``."""
        check_id(holder_id)
        if not by:
            raise InvalidArgumentError("release_overdue needs 'by': who releases the overdue slot")
        return await self._release(holder_id, revision, action="release-overdue", reason=reason, by=by)

    async def set_max(self, n: int) -> int:
        """Set the group's max (the policy's ``slots``), keeping every other policy field. Lowering
        evicts nobody; raising admits waiters at once. Returns the revision of the write."""
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_slots():
            raise InvalidArgumentError(f"max must be an integer from 1 to {max_slots()}, got {n!r}")
        while True:
            view = await _read(self.etcd, self.layout)
            view.check()
            if view.policy_rev and view.max == n:
                return view.revision
            doc = dict(view.policy_doc) if view.policy_rev else {"format_version": FORMAT_VERSION}
            doc["slots"] = n
            res = await self.etcd.txn(
                [view.policy_compare()],
                [Put(self.layout.policy, _dumps(doc)),
                 self._audit("set-max", "", "", {"from": view.max, "to": n})],
            )
            if res.succeeded:
                self._audited()
                return res.revision

    async def state(self) -> SemaphoreState:
        return await read_state(self.etcd, self.group, prefix=self.layout.prefix)

    async def follow(self) -> None:
        """Follow the group without queueing: start this object's watch-driven mirror (one range
        read, then one watch: the one ``lock()`` uses too), which :meth:`snapshot` and
        :meth:`changed` read. Raises if etcd cannot be read."""
        await self._ensure_mirror()

    def snapshot(self) -> SemaphoreState | None:
        """The group as the mirror has it, exact as of its ``revision`` (the last event the watch
        delivered), without an etcd call. None before :meth:`follow` or ``lock()`` started the
        mirror, and after ``close()``. Raises CorruptValueError while a value is corrupt."""
        mirror = self._mirror
        if mirror is None or mirror.closed or self._closed:
            return None
        return mirror.state()

    async def changed(self, since: int) -> int:
        """Wait until the mirror has moved past revision ``since`` (a snapshot's ``revision``, or
        what the last call returned) and return its revision: at once if it already has, so no
        change between a snapshot and this call is missed. Starts following if needed; raises
        LocksmithError once the Semaphore is closed."""
        mirror = await self._ensure_mirror()
        if mirror.view.revision > since:
            return mirror.view.revision
        moved = asyncio.ensure_future(mirror.changed(since))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({moved, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not moved.done():
                moved.cancel()
            await asyncio.gather(moved, closing, return_exceptions=True)
        if self._closed:
            raise LocksmithError(f"semaphore for group {self.group!r} was closed")
        return moved.result()

    def on_change(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` (synchronously, in the event loop; it must be quick and must not
        raise) each time the mirror moves on; returns the function that stops it. For followers
        that want to decide cheaply whether a change concerns them, instead of waking a task on
        every change of a long line. Starts nothing: call after :meth:`follow`."""
        mirror = self._mirror
        if mirror is None or self._closed:
            raise LocksmithError(f"semaphore for group {self.group!r} is not following (call follow() first)")
        mirror.listeners.append(listener)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                mirror.listeners.remove(listener)

        self._listener_stops.append(stop)
        return stop

    async def close(self) -> None:
        """Stop the mirror, leave every queue this object joined (revoking its lease) and finish
        background clean-ups. Pending lock() calls raise LocksmithError."""
        self._closed = True
        self._closing.set()
        for stop in self._listener_stops:
            stop()
        self._wake_own()  # they see it closed (the mirror may live on for other Semaphores)
        if self._mirror is not None:
            mirror, self._mirror = self._mirror, None
            await _detach(mirror)
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        for guard in list(self._lease_guards):
            guard.cancel()
        if self._lease is not None:
            await self._lease.revoke()
            self._lease = None

    async def __aenter__(self) -> Semaphore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals ----------------------------------------------------------------------------------

    async def _ensure_mirror(self) -> _Mirror:
        if self._closed:
            raise LocksmithError(f"semaphore for group {self.group!r} was closed")
        async with self._mirror_lock:
            if self._mirror is None:
                mirror = await _attach(self.etcd, self.layout, self.mirror_check_every)
                if self._closed:  # close() ran during the first read: it could not detach this mirror
                    await _detach(mirror)
                    raise LocksmithError(f"semaphore for group {self.group!r} was closed")
                self._mirror = mirror
            return self._mirror

    async def _ensure_lease(self, *, replace: Lease | None = None) -> Lease:
        async with self._lease_lock:
            if self._closed:
                raise LocksmithError(f"semaphore for group {self.group!r} was closed")
            lease = self._lease
            if lease is None or lease.lost.is_set() or lease is replace:
                if lease is not None:
                    self._spawn(lease.revoke(), "lease-revoke")
                lease = await Lease.grant(self.etcd, self.lease_ttl)
                if self._closed:  # close() ran during the grant and could not revoke this lease
                    await lease.revoke()
                    raise LocksmithError(f"semaphore for group {self.group!r} was closed")
                self._lease = lease
                guard = asyncio.create_task(self._guard_lease(lease), name=f"semaphore-lease-guard-{self.group}")
                self._lease_guards.add(guard)
                guard.add_done_callback(self._lease_guards.discard)
            return lease

    async def _guard_lease(self, lease: Lease) -> None:
        # A lost lease took our queue keys with it: wake the waiters so they re-queue at once.
        await lease.lost.wait()
        self._wake_own()

    def _wake_own(self) -> None:
        """Wake this object's waiting lock() calls (not those of other Semaphores on the mirror)."""
        for wake in self._wakes:
            wake.set()

    async def holder(self, holder_id: str) -> Holder | None:
        """A fresh read of ``holder_id``'s grant in this group (one key, however long the line)."""
        check_id(holder_id)
        held, _ = await self._read_holder(holder_id)
        return held

    async def _read_holder(self, holder_id: str) -> tuple[Holder | None, int]:
        """A fresh read of our own holder key (the mirror may lag a release we just made), and the
        revision of the read."""
        key = self.layout.holder(holder_id)
        kvs, revision = await self.etcd.get_prefix(key)
        for kv in kvs:
            if kv.key == key:
                return parse_holder(kv, holder_id), revision
        return None, revision

    async def _enqueue(self, holder_id: str, reason: str, *, lease_suspect: bool = False) -> tuple[int, Lease]:
        value = _dumps({
            "format_version": FORMAT_VERSION, "id": holder_id, "since": self.clock.now().isoformat(),
            "reason": reason, "by": self._by,
        })
        lease = await self._ensure_lease()
        if lease_suspect and await self.etcd.lease_keepalive_once(lease.id) <= 0:
            lease = await self._ensure_lease(replace=lease)
        try:
            return await self.etcd.put(self.layout.waiter(holder_id), value, lease=lease.id), lease
        except EtcdError as exc:
            # The lease died before its keep-alive task noticed: take a new one, once.
            if "lease not found" not in str(exc):
                raise
            lease = await self._ensure_lease(replace=lease)
            return await self.etcd.put(self.layout.waiter(holder_id), value, lease=lease.id), lease

    async def _retry_until_closed(
        self, what: str, holder_id: str, step: Callable[[], Awaitable[None]], *, report_give_up: bool = True,
    ) -> None:
        """Run ``step()`` until it succeeds; etcd errors are retried with backoff (0.1 s to 5 s)
        until close(), after which one failure ends it (reported at error level if asked)."""
        delay = 0.1
        while True:
            try:
                await step()
                return
            except EtcdError as exc:
                if self._closed:
                    if report_give_up:
                        _log.error(f"semaphore_{what}_gave_up", group=self.group, id=holder_id, error=str(exc))
                    return
                _log.warning(f"semaphore_{what}_retry", group=self.group, id=holder_id, error=str(exc),
                             retry_in=delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._closing.wait()
            delay = min(delay * 2, 5.0)

    async def _dequeue(self, holder_id: str) -> None:
        # Retried until done: a queue key left behind is on a lease this process keeps alive, so it
        # would hold its place at the head of the line for as long as the process lives. close()
        # ends the retries (its lease revoke removes the key).
        if self._closed:
            return
        await self._retry_until_closed("dequeue", holder_id, lambda: self._dequeue_once(holder_id),
                                       report_give_up=False)

    async def _dequeue_once(self, holder_id: str) -> None:
        lease = self._lease
        if lease is None:
            return
        key = self.layout.waiter(holder_id)
        # Only our own key: a later lock() of the same id elsewhere must keep its place.
        kvs, _ = await self.etcd.get_prefix(key)
        for kv in kvs:
            if kv.key == key and kv.lease == lease.id:
                await self.etcd.txn([Compare(key, Target.CREATE, "==", kv.create_revision)], [Delete(key)])

    async def _abandon(self, holder_id: str, att: _Attempt) -> None:
        """A lock() that will not return a holder: leave the line first (so that a grant still in
        flight fails its queue compare), then learn how that grant ended, then release any grant
        of this call's own (its nonce) that committed. Retried until done or close()."""
        queued = att.queued and not self._closed  # after close() the lease revoke removes the key

        async def step() -> None:
            nonlocal queued
            if queued:
                await self._dequeue_once(holder_id)
                queued = False
            if att.inflight is not None:
                with contextlib.suppress(Exception):
                    await att.inflight  # bounded by the etcd call's own timeout
                att.inflight = None
            if att.nonces:
                await self._release_unreturned(holder_id, att.nonces)

        await self._retry_until_closed("abandon", holder_id, step, report_give_up=bool(att.nonces))

    def _spawn_abandon(self, holder_id: str, att: _Attempt) -> None:
        task = self._spawn(self._abandon(holder_id, att), "abandon")
        self._abandoning[holder_id] = task
        task.add_done_callback(lambda t: self._abandoning.pop(holder_id, None) if self._abandoning.get(
            holder_id) is t else None)

    async def _after_abandon(self, holder_id: str) -> None:
        # A new lock() of an id whose last lock() gave up waits for that clean-up: otherwise it
        # could return, as its own, the very grant the clean-up is about to release.
        pending = self._abandoning.get(holder_id)
        if pending is not None:
            await asyncio.shield(pending)  # the task itself never raises (guarded)

    async def _release_unreturned(self, holder_id: str, nonces: set[str]) -> None:
        key = self.layout.holder(holder_id)
        kv = await self.etcd.get(key)
        if kv is None or _nonce(kv) not in nonces:
            return  # nothing of ours committed (or it is already released)
        res = await self.etcd.txn(
            [mod_revision_is(key, kv.mod_revision)],
            [Delete(key), self._audit("unlock", holder_id, "lock() did not return this grant (cancelled or failed)",
                                      {"held_since": _since(kv), "unreturned": True})],
        )
        if res.succeeded:
            self._audited()
            _log.warning("semaphore_unreturned_grant_released", group=self.group, id=holder_id,
                         revision=kv.mod_revision)

    async def _read_back(self, what: str, read: Callable[[], Awaitable[Any]]) -> Any:
        """``read()`` after a write whose outcome is unknown, retried for a few seconds; raises
        EtcdUnavailableError naming ``what`` if etcd never answers."""
        last: EtcdError | None = None
        for delay in (0.0, *_READ_BACK_DELAYS):
            if delay:
                await asyncio.sleep(delay)
            try:
                return await read()
            except EtcdUnavailableError as exc:
                last = exc
        raise EtcdUnavailableError(f"{what}: outcome unknown, etcd did not answer the read-back: {last}")

    async def _busy(self, cooldown_s: int) -> tuple[int, list[Compare]]:
        """Holders (and, with a cooldown, slots cooling down) from a fresh read, and the compares
        that keep that count true until the grant commits."""
        if cooldown_s <= 0:
            kvs, rev = await self.etcd.get_prefix(self.layout.holders)
            return len(kvs), [unchanged_since(self.layout.holders, rev)]
        (held, hrev), (cooling, crev) = await asyncio.gather(
            self.etcd.get_prefix(self.layout.holders), self.etcd.get_prefix(self.layout.cooldown))
        return len(held) + len(cooling), [unchanged_since(self.layout.holders, hrev),
                                          unchanged_since(self.layout.cooldown, crev)]

    async def _grant(
        self, view: _View, holder_id: str, reason: str, hold: timedelta, *, queued: Waiter | None,
        att: _Attempt, fresh: bool = False,
    ) -> Holder | None:
        """One grant transaction; None if a compare failed (the caller re-evaluates). ``fresh``:
        ``view`` is a fresh read of the whole group (try_lock), so it counts the holders itself."""
        # Everything taken from the view is captured before the first await: the mirror moves on.
        key = self.layout.holder(holder_id)
        compares = [view.policy_compare(), absent(self.layout.pause), absent(key)]
        slots, cooldown_s, view_rev = view.max, view.cooldown_s, view.revision
        if queued is None:
            compares.append(unchanged_since(self.layout.queue, view_rev))
        else:
            compares.append(Compare(self.layout.waiter(holder_id), Target.CREATE, "==", queued.revision))
        if fresh:
            compares.append(unchanged_since(self.layout.holders, view_rev))
            if cooldown_s > 0:
                compares.append(unchanged_since(self.layout.cooldown, view_rev))
        else:
            # Count from a fresh read rather than from the mirror, so that safety rests on this
            # read and the compares alone, never on the watch having delivered every event.
            if queued is None:
                # The fast path: a host of a herd (a fleet that got the release at once) whose
                # mirror has not seen the line form yet joins it instead of a grant bound to fail.
                (busy, busy_compares), waiting = await asyncio.gather(
                    self._busy(cooldown_s), self.etcd.count_prefix(self.layout.queue))
                if waiting:
                    return None
            else:
                busy, busy_compares = await self._busy(cooldown_s)
            if busy >= slots:
                return None
            compares += busy_compares
        now = self.clock.now()
        deadline = now + hold
        nonce = secrets.token_hex(8)
        record = {
            "format_version": FORMAT_VERSION, "id": holder_id, "since": now.isoformat(),
            "deadline": deadline.isoformat(), "reason": reason, "by": self._by, "nonce": nonce,
        }
        ops: list[Put | Delete] = [Put(key, _dumps(record))]
        if queued is not None:
            ops.append(Delete(self.layout.waiter(holder_id)))
        detail = {"slots": slots, "deadline": deadline.isoformat(),
                  "waited_since": queued.since.isoformat() if queued else None}
        ops.append(self._audit("lock", holder_id, reason, detail, now))
        att.nonces.add(nonce)
        # The failure branch reads our holder key back: after a lost reply etcd3aio's retry fails
        # the "absent" compare on our own commit, and this is how we recognise it (no extra RPC).
        task = asyncio.ensure_future(self.etcd.txn(compares, ops, [Get(key)]))
        att.inflight = task
        try:
            res = await asyncio.shield(task)  # cancelled: the task runs on and _abandon awaits it
        except EtcdUnavailableError:
            att.inflight = None
            kv = await self._read_back(f"grant of {holder_id!r} in group {self.group!r}",
                                       lambda: self.etcd.get(key))
            return self._held(kv, holder_id, att, "read-back")
        att.inflight = None
        if res.succeeded:
            self._audited()
            att.queue_key_gone = queued is not None
            return Holder(id=holder_id, since=now, deadline=deadline, reason=reason, by=self._by,
                          revision=res.revision)
        kvs = res.results[0] if res.results else []
        return self._held(kvs[0] if kvs else None, holder_id, att, "failure-branch")

    def _held(self, kv: KeyValue | None, holder_id: str, att: _Attempt, how: str) -> Holder | None:
        """Our holder key as just read: a commit of this call whose reply was lost (our nonce), the
        same id granted elsewhere (a recursive lock), or None."""
        if kv is None:
            return None
        holder = parse_holder(kv, holder_id)
        if _nonce(kv) in att.nonces:
            self._audited()
            _log.info("semaphore_lost_reply_recognised", group=self.group, id=holder_id,
                      revision=kv.mod_revision, via=how)
        return holder

    async def _release(self, holder_id: str, revision: int | None, *, action: str, reason: str, by: str) -> bool:
        """Delete ``holder_id``'s key (only the grant at ``revision`` if given, and then only once
        it is overdue). Each attempt's audit key identifies it: a failed compare reads them all
        back in its failure branch, so a commit whose reply was lost is still reported True."""
        key = self.layout.holder(holder_id)
        ours: list[str] = []  # audit keys of our attempts

        async def committed() -> bool:
            found = await asyncio.gather(*(self.etcd.get(k) for k in ours))
            return any(kv is not None for kv in found)

        while True:
            view = await _read(self.etcd, self.layout)
            view.check()
            held = view.holders.get(holder_id)
            if held is None or (revision is not None and held.revision != revision):
                # Gone or replaced: by one of our attempts whose outcome was unknown, or by another.
                return bool(ours) and await committed()
            if revision is not None and not held.overdue(self.clock.now()):
                _log.info("semaphore_not_overdue", group=self.group, id=holder_id, deadline=str(held.deadline))
                return False
            ops: list[Put | Delete] = [Delete(key)]
            cooldown_lease = 0
            if view.cooldown_s > 0:
                cooldown_lease = await self.etcd.lease_grant(view.cooldown_s + _COOLDOWN_MARGIN)
                ops.append(Put(f"{self.layout.cooldown}{holder_id}.{secrets.token_hex(4)}", _dumps({
                    "format_version": FORMAT_VERSION, "id": holder_id, "released_at": self.clock.now().isoformat(),
                    "cooldown_s": view.cooldown_s,
                }), lease=cooldown_lease))
            entry = audit.entry_op(self.layout, action, holder_id, reason, by=by, now=self.clock.now(), detail={
                "held_since": held.since.isoformat(), "revision": held.revision,
                "deadline": held.deadline.isoformat() if held.deadline else None, "cooldown_s": view.cooldown_s,
            })
            ops.append(entry)
            ours.append(entry.key)
            try:
                res = await self.etcd.txn([mod_revision_is(key, held.revision)], ops, [Get(k) for k in ours])
            except EtcdUnavailableError:
                if await self._read_back(f"{action} of {holder_id!r} in group {self.group!r}", committed):
                    self._audited()
                    return True
                continue  # not committed (yet): read again; a late commit shows in the failure branch
            if res.succeeded or any(res.results):
                self._audited()
                return True
            if cooldown_lease:
                self._spawn(self.etcd.lease_revoke(cooldown_lease), "lease-revoke")

    def _audit(self, action: str, subject: str, reason: str, detail: dict[str, Any],
               now: datetime | None = None) -> Put:
        return audit.entry_op(self.layout, action, subject, reason, detail=detail, by=self._by,
                              now=now or self.clock.now())

    def _audited(self) -> None:
        # Pruning reads the trail: do it off the caller's path so it never delays a hand-off.
        self._spawn(self._pruner.wrote(self.etcd, self.layout), "audit-prune")

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None]:
        async def guarded() -> None:
            try:
                await coro
            except Exception as exc:  # best effort: log, never raise into nowhere
                _log.warning("semaphore_background_failed", group=self.group, task=what, error=str(exc))

        task = asyncio.create_task(guarded(), name=f"semaphore-{what}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


def _since(kv: KeyValue) -> str | None:
    try:
        v = json.loads(kv.value).get("since")
    except (ValueError, RecursionError, AttributeError):
        return None
    return v if isinstance(v, str) else None


def _hold(hold_for: timedelta | None, now: datetime) -> timedelta:
    if hold_for is None:
        return DEFAULT_HOLD
    if hold_for <= timedelta(0):
        raise InvalidArgumentError(f"hold_for must be positive, got {hold_for}")
    try:
        now + hold_for  # the deadline is computed at grant time: fail here, before anything is written
    except OverflowError:
        raise InvalidArgumentError(f"hold_for {hold_for} puts the deadline past year 9999") from None
    return hold_for
