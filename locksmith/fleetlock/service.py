"""FleetLock's two operations on our etcd state: one request, one read and (at most) one
transaction, so any number of server replicas can answer for the same groups (docs/fleetlock.md).

pre-reboot(id, group), after one range read of ``groups/<group>/`` at revision R:

1. ``holders/<id>`` exists: 200, nothing written (the protocol's recursive lock).
2. The group has no stored policy (and the server is not told to serve any group): unknown_group.
3. Overdue holders are dealt with as for our agents: each counts once against the failure budget
   (``locksmith.budget``, incident = the holder key's revision), and with ``on_timeout =
   "release"`` its slot is freed (``Semaphore.release_overdue``); then the request starts again.
4. The policy decides: ``strategy = "off"`` refuses (reboots_off); a paused group refuses
   (paused); outside every window, or with less than ``min_window_remaining`` of it left, refuses
   (outside_window, with when it opens next). ``strategy = "reboot"`` is then granted without a
   slot (audited, nothing held).
5. The slot: free slots are ``slots`` minus the holders minus the slots in their cooldown (the
   semaphore's ``cooldown/`` keys, one per release while the policy has a cooldown, on a lease
   of the cooldown's length). Granted only if the host is within the first ``free`` places of
   the semaphore's FIFO queue (or the queue is empty); else cooldown or no_slot. The grant has
   the semaphore's compares (so our agents and FleetLock hosts share the ``max``): policy
   unchanged, no pause key, no ``holders/<id>``, no holder (and with a cooldown no cooldown key)
   created since R, and either our own queue key unchanged or no queue key created since R.
6. A host refused in 4 or 5 keeps its place in line: a queue key ``queue/<id>`` on a lease of
   its own (TTL ``queue_ttl``), created on its first refusal and kept alive by each later request.
   A host that stops asking drops out of the line when the lease expires. This is how FIFO
   fairness works under FleetLock's polling: the protocol has no "wait", so the line is held
   for the host between its polls.

steady-state(id, group): the semaphore's own ``unlock`` (audited, with the cooldown key), or the
host's queue key deleted when it has no slot (it no longer asks); else 200 with nothing written.

Every grant and release carries an audit entry in the same transaction, reason ``via fleetlock
from <address>``. A write whose reply was lost (``TxnResult.uncertain``) is recognised on the next
round's fresh read: the holder key is there (or gone), so the answer is still true.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, TypeVar

from locksmith import audit, budget
from locksmith.clock import SYSTEM_CLOCK, Clock
from locksmith.errors import CorruptValueError, EtcdError
from locksmith.etcd import Compare, Delete, Etcd, KeyValue, Put, Target, absent, mod_revision_is, unchanged_since
from locksmith.fleetlock.protocol import ClientParams, FleetLockError
from locksmith.keys import DEFAULT_PREFIX, FORMAT_VERSION, Layout
from locksmith.log import get_logger
from locksmith.policy import Policy, default_policy
from locksmith.policystore import parse_stored_policy
from locksmith.semaphore import Holder, Semaphore, Waiter, parse_holder, parse_waiter
from locksmith.windows import NEVER_CLOSES, UNBOUNDED, WindowError, format_duration

__all__ = ["Answer", "FleetLockService"]

_log = get_logger(__name__)

# Rounds of read-decide-transact before answering "contended": each lost round means another
# writer's transaction landed in between, so this only runs out under a storm of writes.
_ROUNDS = 16
DEFAULT_QUEUE_TTL = timedelta(minutes=15)
_CACHE_LIMIT = 50_000
_T = TypeVar("_T")


@dataclass(frozen=True)
class Answer:
    """A 200: what was done (for logs and metrics)."""

    result: str  # granted | held | released | not_held | dequeued | granted_no_slot


_GRANT = Answer("grant")  # _decide's "a grant may be sent"


@dataclass
class _Snapshot:
    """The group's keys as of ``revision``, parsed."""

    layout: Layout
    revision: int
    policy_kv: KeyValue | None = None
    pause_kv: KeyValue | None = None
    holders: dict[str, Holder] = field(default_factory=dict)
    holder_keys: int = 0  # holder keys, parsed or not: a corrupt one still takes a slot
    queue: list[tuple[Waiter, KeyValue]] = field(default_factory=list)  # FIFO (create_revision)
    cooling: list[KeyValue] = field(default_factory=list)  # slots in their cooldown after a release
    failures: set[str] = field(default_factory=set)
    corrupt: dict[str, str] = field(default_factory=dict)

    def place(self, node_id: str) -> tuple[int, tuple[Waiter, KeyValue] | None]:
        """0-based place of ``node_id`` in the queue (len(queue) if absent) and its entry."""
        for i, entry in enumerate(self.queue):
            if entry[0].id == node_id:
                return i, entry
        return len(self.queue), None


class FleetLockService:
    """The FleetLock semantics over one etcd connection. Holds no state between requests beyond
    caches of immutable things, so replicas are interchangeable."""

    def __init__(
        self, etcd: Etcd, *, prefix: str = DEFAULT_PREFIX, clock: Clock = SYSTEM_CLOCK,
        queue_ttl: timedelta = DEFAULT_QUEUE_TTL, any_group: bool = False, by: str | None = None,
    ) -> None:
        if queue_ttl < timedelta(seconds=1):
            raise ValueError(f"queue_ttl must be at least 1s, got {queue_ttl}")
        self.etcd = etcd
        self.prefix = prefix
        self.clock = clock
        self.queue_ttl = queue_ttl
        self.any_group = any_group
        self.by = by or f"fleetlock:{audit.actor()}"
        self._semaphores: dict[str, Semaphore] = {}
        self._grant_locks: dict[str, asyncio.Lock] = {}
        self._cache: dict[tuple[str, int], object] = {}
        self._refreshed: dict[int, float] = {}  # lease -> when this replica last kept it alive
        self._background: set[asyncio.Task[None]] = set()

    # -- the two operations ------------------------------------------------------------------

    async def pre_reboot(self, params: ClientParams, client: str) -> Answer:
        layout = Layout(params.group, self.prefix)
        lock = self._grant_locks.setdefault(params.group, asyncio.Lock())
        for attempt in range(_ROUNDS):
            snap = await self._read(layout)
            answer = await self._decide(snap, params, client)
            if answer is not _GRANT:
                if answer is None:
                    continue
                return answer
            # Grants of one group from this replica go one at a time: concurrent grants would fail
            # each other's "no holder created since R" compare. A grant that had to wait decides
            # again from a fresh read; an uncontended one uses the read it has.
            waited = lock.locked()
            async with lock:
                if waited:
                    snap = await self._read(layout)
                    answer = await self._decide(snap, params, client)
                    if answer is None:
                        continue
                    if answer is not _GRANT:
                        return answer
                if await self._grant(snap, self._policy(snap), params, client, self.clock.now()):
                    return Answer("granted")
            # Lost to another writer (another replica, an agent): spread the retries out.
            await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
        raise FleetLockError("contended", f"group {params.group!r} changed under {_ROUNDS} attempts in a row; "
                                          "ask again")

    async def _decide(self, snap: _Snapshot, params: ClientParams, client: str) -> Answer | None:
        """Answer now (held, granted without a slot), raise the refusal, None to read again, or
        ``_GRANT`` when a slot grant may be sent."""
        if params.id in snap.holders:
            return Answer("held")
        policy = self._policy(snap)
        if await self._handle_overdue(snap, policy):
            return None
        now = self.clock.now()
        refusal = self._refusal(snap, policy, now)
        if refusal is None and policy.strategy == "reboot":
            await self._grant_without_slot(snap, params, client, now)
            return Answer("granted_no_slot")
        if refusal is None:
            refusal = self._slot_refusal(snap, policy, params.id, now)
        if refusal is not None:
            if refusal.kind != "reboots_off":
                await self._keep_place(snap, params.id, client)
            raise refusal
        return _GRANT

    async def steady_state(self, params: ClientParams, client: str) -> Answer:
        layout = Layout(params.group, self.prefix)
        for _ in range(_ROUNDS):
            snap = await self._read(layout)
            if params.id in snap.holders:
                # The semaphore's own release: the cooldown key when the policy has a cooldown, and
                # a commit whose reply was lost recognised by its audit key.
                released = await self._semaphore(params.group).unlock(
                    params.id, reason=f"via fleetlock from {client}", by=self.by)
                if released:
                    _log.info("fleetlock_released", group=params.group, id=params.id, client=client)
                    return Answer("released")
                continue
            own = layout.holder(params.id)
            if own in snap.corrupt:  # "not held" would be a lie: the key is there
                raise FleetLockError("corrupt_state", f"stored value at {own!r} is invalid ({snap.corrupt[own]}); "
                                                      "an operator must fix or delete it")
            _place, entry = snap.place(params.id)
            if entry is not None:  # it asked for a slot and no longer does: its place goes
                kv = entry[1]
                await self.etcd.txn([Compare(kv.key, Target.CREATE, "==", kv.create_revision)], [Delete(kv.key)])
                return Answer("dequeued")
            if snap.policy_kv is None and not self.any_group:
                raise self._unknown_group(params.group)
            return Answer("not_held")
        raise FleetLockError("contended", f"group {params.group!r} changed under {_ROUNDS} attempts in a row; "
                                          "ask again")

    async def ready(self) -> int:
        """etcd answers a linearizable read: its revision (read under our prefix, so that a role
        limited to the prefix is enough)."""
        return await self.etcd.revision(self.prefix)

    async def close(self) -> None:
        for sem in self._semaphores.values():
            await sem.close()
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # -- reading -----------------------------------------------------------------------------

    async def _read(self, layout: Layout) -> _Snapshot:
        kvs, revision = await self.etcd.get_prefix(layout.base)
        snap = _Snapshot(layout, revision)
        for kv in sorted(kvs, key=lambda k: k.create_revision):
            rel = kv.key[len(layout.base):]
            try:
                if rel == "policy":
                    snap.policy_kv = kv
                elif rel == "pause":
                    snap.pause_kv = kv
                elif rel.startswith("holders/"):
                    snap.holder_keys += 1
                    holder_id = rel[len("holders/"):]
                    snap.holders[holder_id] = self._parsed(kv, lambda kv=kv, i=holder_id: parse_holder(kv, i))
                elif rel.startswith("queue/"):
                    waiter_id = rel[len("queue/"):]
                    snap.queue.append((self._parsed(kv, lambda kv=kv, i=waiter_id: parse_waiter(kv, i)), kv))
                elif rel.startswith("cooldown/"):
                    snap.cooling.append(kv)
                elif rel.startswith("failures/"):
                    snap.failures.add(kv.key)
            except CorruptValueError as exc:
                snap.corrupt[kv.key] = exc.problem
        return snap

    def _policy(self, snap: _Snapshot) -> Policy:
        group = snap.layout.group
        if snap.policy_kv is None:
            if not self.any_group:
                raise self._unknown_group(group)
            policy = default_policy(group)
        else:
            try:
                kv = snap.policy_kv
                policy = self._parsed(kv, lambda: parse_stored_policy(kv, group))
            except CorruptValueError as exc:
                _log.error("fleetlock_policy_invalid", group=group, key=exc.key, problem=exc.problem)
                raise FleetLockError("corrupt_state", f"the stored policy of group {group!r} is invalid "
                                                      f"({exc.problem}); an operator must fix it") from None
        if snap.corrupt:
            key = min(snap.corrupt)
            _log.error("fleetlock_state_invalid", group=group, key=key, problem=snap.corrupt[key])
            raise FleetLockError("corrupt_state", f"stored value at {key!r} is invalid ({snap.corrupt[key]}); "
                                                  "an operator must fix or delete it")
        return policy

    def _unknown_group(self, group: str) -> FleetLockError:
        return FleetLockError("unknown_group", f"group {group!r} has no policy on this server (create one "
                                               "with 'locksmithctl policy apply' or 'locksmithctl fleetlock "
                                               "import-airlock')")

    # -- deciding ----------------------------------------------------------------------------

    def _refusal(self, snap: _Snapshot, policy: Policy, now: datetime) -> FleetLockError | None:
        group = snap.layout.group
        if policy.strategy == "off":
            return FleetLockError("reboots_off", f"group {group!r} has strategy 'off': hosts do not reboot by "
                                                 "themselves")
        if snap.pause_kv is not None:
            return FleetLockError("paused", f"group {group!r} is paused{_pause_reason(snap.pause_kv)}; "
                                            "'locksmithctl resume' lets reboots continue")
        return self._window_refusal(group, policy, now)

    def _window_refusal(self, group: str, policy: Policy, now: datetime) -> FleetLockError | None:
        try:
            windows = policy.window_set()
        except WindowError as exc:  # time_zone "localtime" unresolvable on this server
            raise FleetLockError("corrupt_state", f"group {group!r}: {exc}") from None
        if windows.always_open:
            return None
        tz = windows.tz
        if not windows.is_open(now):
            opens = windows.next_open(now)
            return FleetLockError(
                "outside_window", f"group {group!r} is outside its maintenance windows; the next opens "
                                  f"{_when(opens, now, tz, policy.time_zone)}", retry_after=_seconds(opens, now))
        need = policy.min_window_remaining
        left = windows.remaining(now)
        if need and left != UNBOUNDED and left < need:
            end = windows.current_window_end(now)
            assert end is not None and end != NEVER_CLOSES
            opens = windows.next_open(end)
            return FleetLockError(
                "outside_window", f"group {group!r}: only {format_duration(_whole(left))} left in this window, "
                                  f"min_window_remaining is {format_duration(need)}; the next window opens "
                                  f"{_when(opens, now, tz, policy.time_zone)}", retry_after=_seconds(opens, now))
        return None

    def _slot_refusal(self, snap: _Snapshot, policy: Policy, node_id: str, now: datetime) -> FleetLockError | None:
        """None if ``node_id`` may take a slot now: one is free and nobody is ahead in line for it.
        A slot in its cooldown (``cooldown/`` keys, written by each release while the policy has
        a cooldown) is not free until the key's lease ends."""
        group = snap.layout.group
        slots = policy.slots
        cooling = len(snap.cooling) if policy.cooldown else 0
        free = max(0, slots - snap.holder_keys - cooling)
        place, entry = snap.place(node_id)
        if entry is None and not snap.queue and free > 0:
            return None
        if entry is not None and place < free:
            return None
        line = len(snap.queue) + (0 if entry is not None else 1)
        where = f"you are {_ordinal(place + 1)} of {line} in line"
        if free == 0 and cooling and snap.holder_keys < slots:
            ends = sorted(_cooldown_end(kv, policy.cooldown) for kv in snap.cooling)
            first = ends[max(0, snap.holder_keys + cooling - slots)]
            return FleetLockError(
                "cooldown", f"group {group!r}: {cooling} freed slot{'s are' if cooling != 1 else ' is'} in the "
                            f"{format_duration(policy.cooldown)} cooldown after a release; the next frees "
                            f"{first:%H:%M:%S} UTC (in {format_duration(_whole(max(first - now, timedelta(0))))}); "
                            f"{where}", retry_after=_seconds(first, now))
        if free == 0:
            held = ", ".join(sorted(snap.holders)[:5]) + (", ..." if len(snap.holders) > 5 else "")
            why = (f"the only slot of group {group!r} is held ({held})" if slots == 1
                   else f"all {slots} slots of group {group!r} are held ({held})")
        else:
            why = f"group {group!r} has {free} free slot{'s' if free != 1 else ''} for hosts ahead in line"
        return FleetLockError("no_slot", f"{why}; {where}")

    # -- writing -----------------------------------------------------------------------------

    async def _grant(self, snap: _Snapshot, policy: Policy, params: ClientParams, client: str,
                     now: datetime) -> bool:
        layout = snap.layout
        place, entry = snap.place(params.id)
        compares = [
            mod_revision_is(layout.policy, snap.policy_kv.mod_revision) if snap.policy_kv else absent(layout.policy),
            absent(layout.pause),
            absent(layout.holder(params.id)),
            unchanged_since(layout.holders, snap.revision),
        ]
        if policy.cooldown:
            compares.append(unchanged_since(layout.cooldown, snap.revision))
        ops: list[Put | Delete] = []
        if entry is None:
            compares.append(unchanged_since(layout.queue, snap.revision))
        else:
            compares.append(Compare(entry[1].key, Target.CREATE, "==", entry[1].create_revision))
            ops.append(Delete(entry[1].key))
        deadline = now + policy.reboot_timeout
        reason = f"via fleetlock from {client}"
        record = {"format_version": FORMAT_VERSION, "id": params.id, "since": now.isoformat(),
                  "deadline": deadline.isoformat(), "reason": reason, "by": self.by}
        ops.insert(0, Put(layout.holder(params.id), _dumps(record)))
        detail = {"via": "fleetlock", "client": client, "slots": policy.slots, "deadline": deadline.isoformat(),
                  "waited_since": entry[0].since.isoformat() if entry else None}
        ops.append(audit.entry_op(layout, "lock", params.id, reason, detail=detail, by=self.by, now=now))
        res = await self.etcd.txn(compares, ops)
        if not res.succeeded:
            return False
        self._audited(layout)
        _log.info("fleetlock_granted", group=layout.group, id=params.id, client=client, revision=res.revision,
                  place=place if entry else None)
        return True

    async def _grant_without_slot(self, snap: _Snapshot, params: ClientParams, client: str, now: datetime) -> None:
        layout = snap.layout
        _place, entry = snap.place(params.id)
        reason = f"via fleetlock from {client}"
        ops: list[Put | Delete] = [audit.entry_op(
            layout, "reboot", params.id, reason, by=self.by, now=now,
            detail={"via": "fleetlock", "client": client, "strategy": "reboot", "slot": False})]
        if entry is not None:
            ops.append(Delete(entry[1].key))
        await self.etcd.txn([], ops)
        self._audited(layout)

    async def _keep_place(self, snap: _Snapshot, node_id: str, client: str) -> None:
        """Hold the host's place in line until its next poll (see the module docstring)."""
        _place, entry = snap.place(node_id)
        ttl = int(self.queue_ttl.total_seconds())
        if entry is not None:
            kv = entry[1]
            if not kv.lease:
                return  # not ours to refresh (a lease-less queue key is an operator's doing)
            # A keep-alive is a stream round trip: one per lease per third of its TTL is plenty
            # (the key was read just now, so the lease is alive; it then has 2/3 of its TTL left).
            now = self.clock.monotonic()
            if now - self._refreshed.get(kv.lease, -ttl) < ttl / 3:
                return
            if await self.etcd.lease_keepalive_once(kv.lease) > 0:
                if len(self._refreshed) >= _CACHE_LIMIT:
                    self._refreshed.clear()
                self._refreshed[kv.lease] = now
                return
        layout = snap.layout
        value = _dumps({"format_version": FORMAT_VERSION, "id": node_id, "since": self.clock.now().isoformat(),
                        "reason": f"via fleetlock from {client}", "by": self.by})
        lease = await self.etcd.lease_grant(ttl)
        res = await self.etcd.txn([absent(layout.waiter(node_id))], [Put(layout.waiter(node_id), value, lease=lease)])
        if not res.succeeded:  # another replica queued the same host meanwhile
            self._spawn(self.etcd.lease_revoke(lease), "lease-revoke")
            return
        self._refreshed[lease] = self.clock.monotonic()

    async def _handle_overdue(self, snap: _Snapshot, policy: Policy) -> bool:
        """Count each overdue holder once against the budget and, with on_timeout = release, free
        its slot. True when something was written (the caller reads again: the budget may have
        paused the group)."""
        now = self.clock.now()
        changed = False
        for holder in snap.holders.values():
            if not holder.overdue(now):
                continue
            incident = str(holder.revision)
            failure_key = f"{snap.layout.failures}{holder.id}/overdue/{incident}"
            if failure_key not in snap.failures:
                assert holder.deadline is not None
                report = await budget.report_failure(
                    self.etcd, snap.layout.group, holder.id, "overdue",
                    f"no steady-state since {holder.since.isoformat()} (deadline {holder.deadline.isoformat()})",
                    incident=incident, policy=policy, prefix=self.prefix, by=self.by)
                _log.warning("fleetlock_holder_overdue", group=snap.layout.group, id=holder.id,
                             deadline=holder.deadline.isoformat(), on_timeout=policy.on_timeout,
                             failures=report.count, budget=report.budget, paused=report.paused)
                changed = True
            if policy.on_timeout == "release":
                sem = self._semaphore(snap.layout.group)
                if await sem.release_overdue(holder.id, holder.revision, by=self.by,
                                             reason="overdue: on_timeout = release (seen by fleetlock)"):
                    changed = True
        return changed

    # -- helpers -----------------------------------------------------------------------------

    def _parsed(self, kv: KeyValue, parse: Callable[[], _T]) -> _T:
        """``parse()`` of a stored value, once per (key, revision): a value never changes at a
        revision, and a group with hundreds of holders (or a policy checked against its schema)
        is otherwise parsed again on every request. A value that does not parse is not cached."""
        mark = (kv.key, kv.mod_revision)
        hit = self._cache.get(mark)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        value = parse()
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[mark] = value
        return value

    def _semaphore(self, group: str) -> Semaphore:
        sem = self._semaphores.get(group)
        if sem is None:
            sem = self._semaphores[group] = Semaphore(self.etcd, group, prefix=self.prefix, clock=self.clock)
        return sem

    def _audited(self, layout: Layout) -> None:
        # Pruning reads the trail: off the request's path.
        self._spawn(audit.wrote(self.etcd, layout), "audit-prune")

    def _spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except EtcdError as exc:
                _log.warning("fleetlock_background_failed", task=what, error=str(exc))

        task = asyncio.create_task(guarded(), name=f"fleetlock-{what}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _cooldown_end(kv: KeyValue, cooldown: timedelta) -> datetime:
    """When a cooldown key's slot frees: its ``released_at`` plus the cooldown (the lease may run a
    second longer). A value that does not say is taken as released at its write, i.e. now-ish."""
    with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
        at = datetime.fromisoformat(json.loads(kv.value)["released_at"])
        if at.tzinfo is not None:
            return at + cooldown
    return datetime.now(UTC) + cooldown


def _dumps(d: dict[str, Any]) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode()


def _pause_reason(kv: KeyValue) -> str:
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        d = json.loads(kv.value)
        reason = str(d.get("reason") or "")
        by = str(d.get("by") or "")
        if reason or by:
            return f" ({reason}{', ' if reason and by else ''}{'by ' + by if by else ''})"
    return ""


def _whole(d: timedelta) -> timedelta:
    return timedelta(seconds=int(d.total_seconds()))


def _seconds(t: datetime | None, now: datetime) -> int | None:
    if t is None:
        return None
    return max(1, int((t - now).total_seconds()) + 1)


def _when(t: datetime | None, now: datetime, tz: tzinfo, zone_name: str) -> str:
    if t is None:
        return "never again"
    local = t.astimezone(tz)
    return f"{local:%a %Y-%m-%d %H:%M} {zone_name} (in {format_duration(_whole(t - now))})"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
