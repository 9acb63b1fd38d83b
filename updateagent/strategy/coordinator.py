"""The reboot coordinator: one explicit state machine from "a reboot is needed" to "slot released".

::

    IDLE ─► WAITING_FOR_WINDOW ─► QUEUED ─► HOLDING ─► PRE_REBOOT_HOOKS ─► WAITING_FOR_USERS ─► REBOOTING
      ▲            ▲  ▲              │         │  │            │                  │                 │ (boot)
      │            │  └──────────────┘         │  └─ rollback ─┼──────────────────┼──────────────► REBOOTING
      │            │   window closed: leave    │               │ hook failed      │ window closed    ▼
      │            └── the queue; a re-check ──┴───────────────┴─► (give the slot back) ◄──────── AFTER_BOOT
      │                fails: give the slot back                   FAILED ─ retry ─► WAITING       │ verdict +
      └──────────────────────── RELEASING ◄────────── healthy ─────────────────────────────────────┘ post-boot hooks
                                   ▲  unhealthy: report to the budget; rollback reboots under the same
                                   └─ slot; then on_timeout = release: RELEASING, hold: FAILED keeping it

One ``tick`` runs the current state's handler; every state change goes through ``_transition``,
which logs it with its cause, persists the record (``coordinator.json`` in the agent's state
directory) and tells subscribers. Handlers return when to tick again; in between the loop sleeps
on the injected clock, on a request from the agent, on the slot backend's news and on a pending
grant. Everything that differs between lock services is behind :class:`SlotBackend` (the etcd
semaphore now, FleetLock later); windows, hooks, logged-in users, the health verdict and the
failure semantics are here, once. docs/coordinator.md explains each state and the crash safety.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from locksmith.clock import SYSTEM_CLOCK, Clock
from locksmith.log import get_logger
from locksmith.windows import NEVER_CLOSES, WindowSet
from updateagent._atomic import write_atomic
from updateagent.host import Host
from updateagent.strategy import RebootRequest, StatusListener, first_of, tell
from updateagent.strategy.hooks import run_hooks

if TYPE_CHECKING:
    from updateagent.config import AgentSettings

log = get_logger("updateagent.coordinator")

FORMAT_VERSION = 1
_RETRY_INITIAL = 1.0
_RETRY_MAX = 60.0


class CoordState(StrEnum):
    IDLE = "idle"
    WAITING_FOR_WINDOW = "waiting_for_window"
    QUEUED = "queued"
    HOLDING = "holding"
    PRE_REBOOT_HOOKS = "pre_reboot_hooks"
    WAITING_FOR_USERS = "waiting_for_users"
    REBOOTING = "rebooting"
    AFTER_BOOT = "after_boot"
    RELEASING = "releasing"
    FAILED = "failed"


COORDINATOR_STATES = tuple(s.value for s in CoordState)
# States in which this host holds (or may hold) its slot.
_HOLDING = (CoordState.HOLDING, CoordState.PRE_REBOOT_HOOKS, CoordState.WAITING_FOR_USERS, CoordState.REBOOTING,
            CoordState.AFTER_BOOT, CoordState.RELEASING)


# --------------------------------------------------------------------------- the backend seam


@dataclass(frozen=True)
class Gate:
    """What the lock service says about the group now. ``ready`` is False until the backend has
    read it once (etcd down at start, say); the coordinator then waits and never reboots."""

    group: str
    windows: WindowSet | None = None  # the group's windows; None: always open
    min_window_remaining: timedelta = timedelta(0)
    paused: bool = False
    pause_reason: str = ""
    cooldown_until: datetime | None = None  # no grant (and no reboot start) before this
    on_timeout: str = "release"  # what happens to the slot of a failed or overdue holder
    ready: bool = True
    problem: str = ""


@dataclass(frozen=True)
class Grant:
    holder_id: str
    since: datetime
    revision: int  # the lock service's identity of this grant (etcd: the holder key's revision)
    deadline: datetime | None = None


@dataclass(frozen=True)
class QueueInfo:
    position: int | None  # 1-based place of this host in the queue; None: not queued
    length: int
    holders: int
    slots: int
    paused: bool


class SlotBackend(Protocol):
    """The lock service behind the coordinator. All calls may raise (the coordinator retries with
    backoff on its clock); ``acquire`` is cancelled when the window closes and must then leave the
    queue and grant nothing (a grant that races the cancel is found by ``held`` and released)."""

    kind: str

    async def open(self, holder_id: str) -> None: ...

    async def close(self) -> None: ...

    def gate(self) -> Gate: ...

    async def wait_changed(self) -> None:
        """Return when the gate or the queue may have changed (a spurious return is fine)."""
        ...

    async def acquire(self, reason: str) -> Grant: ...

    async def held(self) -> Grant | None:
        """A fresh read: the slot this host holds, if any."""
        ...

    async def release(self) -> bool: ...

    async def report_failure(self, kind: str, detail: str, incident: str) -> str:
        """Count a failure against the group's budget; returns a line for the log."""
        ...

    def queue(self) -> QueueInfo | None: ...

    async def tend(self, now: datetime) -> datetime | None:
        """Deal with other hosts' overdue slots; return when to look again (None: no deadline)."""
        ...

    def group_metrics(self) -> dict[str, float]: ...


# --------------------------------------------------------------------------- options and record


@dataclass(frozen=True)
class CoordinatorOptions:
    local_window: WindowSet | None = None
    pre_reboot_dir: Path = Path("/etc/update-agent/pre-reboot.d")
    post_boot_dir: Path = Path("/etc/update-agent/post-boot.d")
    hook_timeout: float = 300.0
    max_session_wait: float = 3600.0
    reboot_required_file: Path | None = Path("/run/reboot-required")
    reboot_required_poll: float = 60.0
    session_poll: float = 60.0
    # Safety-net re-checks while waiting for a window / queued (real changes arrive by watch and
    # exact deadlines); the simulator lengthens them so idle hosts cost no jumps.
    window_poll: float = 60.0
    queue_poll: float = 30.0
    retry_after_failure: float = 600.0  # a failed pre-reboot hook or reboot call: try again after this
    group: str = ""
    # Crash-point tests only (env UPDATE_AGENT_TEST_HOLD_IN): stop in this state, once it is
    # persisted, so that a test can SIGKILL the agent exactly there.
    hold_in: str = ""

    @classmethod
    def from_settings(cls, settings: AgentSettings) -> CoordinatorOptions:
        r = settings.reboot
        group = settings.locksmith.group if settings.reboot.strategy == "etcd-lock" else getattr(
            getattr(settings, "fleetlock", None), "group", settings.group)
        return cls(local_window=r.local_window, pre_reboot_dir=r.pre_reboot_dir, post_boot_dir=r.post_boot_dir,
                   hook_timeout=r.hook_timeout, max_session_wait=r.max_session_wait,
                   reboot_required_file=r.reboot_required_file, group=group,
                   hold_in=os.environ.get("UPDATE_AGENT_TEST_HOLD_IN", ""))


@dataclass(frozen=True)
class Record:
    """What survives an agent restart and a reboot (``coordinator.json``)."""

    state: CoordState = CoordState.IDLE
    since: str = ""  # ISO time of the last transition (the coordinator's clock)
    cause: str = ""
    boot_id: str = ""  # the boot the last transition happened in
    request: dict[str, str] | None = None
    grant: dict[str, Any] | None = None
    pre_hooks_ran: bool = False
    verdict: str = ""  # the agent's after-boot outcome ("health_check_failed" for a rollback request)
    rollback: bool = False
    failure_reported: bool = False
    keeps_slot: bool = False  # FAILED with on_timeout = hold
    retry_at: str = ""
    users_since: str = ""
    last_reboot_at: str = ""
    next_request: dict[str, str] | None = None  # a new update applied while this episode finishes

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self), "state": self.state.value}

    @classmethod
    def from_json(cls, data: Any) -> Record:
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            raise ValueError("not a coordinator record of format_version 1")
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["state"] = CoordState(fields.get("state", "idle"))
        return cls(**fields)


@dataclass
class Counters:
    """Since this coordinator object started (Prometheus counters start over with the process)."""

    window_wait_seconds: float = 0.0
    slot_wait_seconds: float = 0.0
    reboots: dict[str, int] = field(default_factory=dict)
    failures_reported: int = 0
    transitions: int = 0


# --------------------------------------------------------------------------- windows


def _window_check(now: datetime, sets: list[WindowSet], min_remaining: timedelta) -> tuple[bool, datetime | None]:
    """(open with at least ``min_remaining`` left in every set, when that stops being true)."""
    ends: list[datetime] = []
    for ws in sets:
        if not ws.is_open(now):
            return False, None
        end = ws.current_window_end(now)
        if end is not None and end != NEVER_CLOSES:
            ends.append(end)
    if not ends:
        return True, None
    until = min(ends) - min_remaining
    return now < until, until


def next_opening(now: datetime, sets: list[WindowSet], min_remaining: timedelta) -> datetime | None:
    """The first instant from ``now`` at which every set is open with ``min_remaining`` left."""
    t = now
    for _ in range(64):
        ok, until = _window_check(t, sets, min_remaining)
        if ok:
            return t
        if until is not None:  # open everywhere but too close to an end: look past that end
            t = until + min_remaining + timedelta(seconds=1)
            continue
        starts = [ws.next_open(t) for ws in sets]
        if any(s is None for s in starts):
            return None
        t = max(s for s in starts if s is not None)
    return None


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _human(delta: timedelta) -> str:
    seconds = max(int(delta.total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


def _parse_time(text: str) -> datetime | None:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- the coordinator


class Coordinator:
    """A :class:`updateagent.strategy.RebootStrategy` over a :class:`SlotBackend`."""

    def __init__(self, backend: SlotBackend, host: Host, options: CoordinatorOptions | None = None, *,
                 state_path: Path, clock: Clock = SYSTEM_CLOCK) -> None:
        self.backend = backend
        self.host = host
        self.options = options or CoordinatorOptions()
        self.state_path = state_path
        self.clock = clock
        self.rec = Record()
        self.counters = Counters()
        self.last_error = ""
        self._boot_id = ""
        self._holder_id = ""
        self._listeners: list[StatusListener] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._acquire: asyncio.Task[Grant] | None = None
        self._backend_open = False
        self._backend_failures = 0
        self._idle_failures = 0
        self._next_open: datetime | None = None
        self._users = 0
        self._closing = False
        self._handlers: dict[CoordState, Callable[[], Any]] = {
            CoordState.IDLE: self._tick_idle,
            CoordState.WAITING_FOR_WINDOW: self._tick_waiting_for_window,
            CoordState.QUEUED: self._tick_queued,
            CoordState.HOLDING: self._tick_holding,
            CoordState.PRE_REBOOT_HOOKS: self._tick_pre_reboot_hooks,
            CoordState.WAITING_FOR_USERS: self._tick_waiting_for_users,
            CoordState.REBOOTING: self._tick_rebooting,
            CoordState.AFTER_BOOT: self._tick_after_boot,
            CoordState.RELEASING: self._tick_releasing,
            CoordState.FAILED: self._tick_failed,
        }

    # ----------------------------------------------------------------------- RebootStrategy

    @property
    def state(self) -> CoordState:
        return self.rec.state

    async def start(self) -> None:
        """Load the record, settle what a restart or a reboot means for it, start the loop."""
        if self._task is not None:
            return
        self.rec = await asyncio.to_thread(self._load)
        try:
            self._boot_id = (await asyncio.to_thread(self.host.booted)).boot_id
            self._holder_id = await asyncio.to_thread(self.host.machine_id)
        except Exception as exc:
            log.error("coordinator_host_unknown", error=str(exc))
        self._resume()
        # A backend that acts on every agent start (FleetLock's steady-state, as Zincati sends it)
        # learns whether this host is inside an episode that holds its slot.
        on_start = getattr(self.backend, "agent_started", None)
        if on_start is not None:
            on_start(self._holder_id, self.rec.state in _HOLDING or self.rec.keeps_slot)
        self._task = asyncio.create_task(self._run(), name="reboot-coordinator")

    async def reboot_needed(self, request: RebootRequest) -> None:
        await self.start()
        req = {"reason": request.reason, "version": request.version, "slot": request.slot}
        state = self.rec.state
        if state is CoordState.AFTER_BOOT and request.reason == "rollback":
            # The booted version failed its health checks: the agent wants the old slot back.
            self.rec = replace(self.rec, verdict="health_check_failed", request=req)
            self._persist()
            self._wake.set()
            return
        if state in (CoordState.IDLE, CoordState.FAILED) and not self.rec.keeps_slot:
            self.rec = replace(self.rec, request=req, pre_hooks_ran=False, rollback=False, verdict="",
                               failure_reported=False, retry_at="")
            self._transition(CoordState.WAITING_FOR_WINDOW, f"reboot needed: {_describe_request(req)}")
            return
        if state is CoordState.FAILED and self.rec.keeps_slot:
            self.rec = replace(self.rec, request=req, keeps_slot=False, rollback=False, verdict="",
                               failure_reported=False, pre_hooks_ran=False)
            self._transition(CoordState.HOLDING, f"reboot needed while keeping a failed slot: {_describe_request(req)}")
            return
        if state in (CoordState.AFTER_BOOT, CoordState.RELEASING) and request.reason != "rollback":
            # The next update, applied right after this boot: it starts once this slot is released.
            self.rec = replace(self.rec, next_request=req)
            self._persist()
            return
        # Already on its way: the same request again (an agent restart), or a newer version.
        if self.rec.request != req:
            self.rec = replace(self.rec, request=req)
            self._persist()
        self._wake.set()

    async def boot_settled(self, outcome: str, version: str) -> None:
        await self.start()
        if self.rec.state is CoordState.AFTER_BOOT:
            if self.rec.verdict != outcome:
                self.rec = replace(self.rec, verdict=outcome)
                self._persist()
            log.info("coordinator_verdict", outcome=outcome, version=version)
            self._wake.set()

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        for task in (self._task, self._acquire):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._acquire = None
        with contextlib.suppress(Exception):
            await self.backend.close()

    def subscribe(self, listener: StatusListener) -> None:
        self._listeners.append(listener)

    # ----------------------------------------------------------------------- status

    def status_text(self) -> str:
        rec, now = self.rec, self.clock.now()
        gate = self._gate()
        group = gate.group or self.options.group or "-"
        state = rec.state
        if not gate.ready and state in (CoordState.WAITING_FOR_WINDOW, CoordState.QUEUED):
            return f"{state.value.replace('_', ' ')}: lock service not reachable ({gate.problem or 'connecting'})"
        if state is CoordState.IDLE:
            return "idle: no reboot needed"
        if state is CoordState.WAITING_FOR_WINDOW:
            if gate.paused:
                return f"waiting for window: group {group} paused"
            opens = self._next_open or next_opening(now, self._sets(gate), gate.min_window_remaining)
            if opens is None:
                return "waiting for window: no window opens again"
            tz = self._display_tz(gate)
            when = opens.astimezone(tz)
            return f"waiting for window: opens {when:%a %H:%M} {_tz_name(tz, when)} (in {_human(opens - now)})"
        if state is CoordState.QUEUED:
            q = self.backend.queue()
            if gate.paused:
                return f"queued: group {group} paused"
            if gate.cooldown_until is not None and gate.cooldown_until > now:
                return f"queued: cooldown in group {group} until {gate.cooldown_until:%H:%M:%S}"
            if q is not None and q.position is not None:
                return f"queued: {_ordinal(q.position)} of {q.length} in group {group}"
            return f"queued in group {group}"
        grant = rec.grant or {}
        since = _parse_time(str(grant.get("since", "")))
        holding = f"holding slot since {since.astimezone(self._display_tz(gate)):%H:%M:%S}" if since else "holding slot"
        if state is CoordState.HOLDING:
            return f"{holding}, checking window, pause and cooldown"
        if state is CoordState.PRE_REBOOT_HOOKS:
            return f"{holding}, running pre-reboot hooks"
        if state is CoordState.WAITING_FOR_USERS:
            limit = _parse_time(rec.users_since)
            end = limit + timedelta(seconds=self.options.max_session_wait) if limit else None
            until = f" (at most until {end:%H:%M})" if end else ""
            return f"{holding}, waiting for {self._users} logged-in session(s){until}"
        if state is CoordState.REBOOTING:
            return f"{holding}, rebooting" + (" to roll back" if rec.rollback else "")
        if state is CoordState.AFTER_BOOT:
            if not rec.verdict:
                return f"{holding}, after boot: waiting for the health verdict"
            return f"{holding}, after boot: {rec.verdict}"
        if state is CoordState.RELEASING:
            return "releasing slot"
        retry = _parse_time(rec.retry_at)
        keeps = ", keeping the slot (on_timeout = hold)" if rec.keeps_slot else ""
        again = f"; retry at {retry:%H:%M:%S}" if retry and not rec.keeps_slot else ""
        return f"failed: {rec.cause}{keeps}{again}"

    def describe(self) -> dict[str, Any]:
        gate = self._gate()
        q = self.backend.queue()
        return {
            "format_version": 1,
            "strategy": self.backend.kind,
            "state": self.rec.state.value,
            "status": self.status_text(),
            "since": self.rec.since,
            "cause": self.rec.cause,
            "group": gate.group or self.options.group,
            "holder_id": self._holder_id,
            "request": self.rec.request,
            "grant": self.rec.grant,
            "verdict": self.rec.verdict,
            "rollback": self.rec.rollback,
            "next_window": self._next_open.isoformat() if self._next_open else None,
            "queue": asdict(q) if q is not None else None,
            "paused": gate.paused,
            "last_error": self.last_error,
        }

    def metrics(self) -> dict[str, Any]:
        """Numbers for updateagent.metrics: the state, the counters, the group from the mirror."""
        c = self.counters
        try:
            group = self.backend.group_metrics()
        except Exception:  # read from another thread while the loop mutates it: skip this scrape
            group = {}
        return {"state": self.rec.state.value, "window_wait_seconds": c.window_wait_seconds,
                "slot_wait_seconds": c.slot_wait_seconds, "reboots": dict(c.reboots),
                "failures_reported": c.failures_reported, "group": group}

    def _display_tz(self, gate: Gate) -> tzinfo:
        if gate.windows is not None and not gate.windows.always_open:
            return gate.windows.tz
        if self.options.local_window is not None:
            return self.options.local_window.tz
        return UTC

    # ----------------------------------------------------------------------- the loop

    def _resume(self) -> None:
        """What a restart (same boot) or a reboot (new boot) means for the saved state."""
        rec, state = self.rec, self.rec.state
        new_boot = bool(self._boot_id) and bool(rec.boot_id) and rec.boot_id != self._boot_id
        if new_boot and state in (CoordState.HOLDING, CoordState.PRE_REBOOT_HOOKS, CoordState.WAITING_FOR_USERS,
                                  CoordState.REBOOTING):
            self._transition(CoordState.AFTER_BOOT, "booted" if state is CoordState.REBOOTING
                             else f"booted (the machine rebooted while {state.value})")
        elif new_boot and state in (CoordState.WAITING_FOR_WINDOW, CoordState.QUEUED):
            # Something else rebooted the machine meanwhile; the agent asks again if still needed.
            self.rec = replace(self.rec, request=None)
            self._transition(CoordState.IDLE, f"the machine rebooted while {state.value}")
        elif not new_boot and state in (CoordState.PRE_REBOOT_HOOKS, CoordState.WAITING_FOR_USERS,
                                        CoordState.REBOOTING):
            # The agent restarted before the reboot happened: check everything again.
            self._transition(CoordState.HOLDING, f"agent restarted while {state.value}")
        elif state is not CoordState.IDLE:
            log.info("coordinator_resume", state=state.value, cause=rec.cause)

    async def _run(self) -> None:
        while not self._closing:
            state = self.rec.state
            if state.value == self.options.hold_in:
                log.warning("coordinator_held_for_test", state=state.value)
                await asyncio.Event().wait()
            try:
                wake_at = await self._handlers[state]()
                self._backend_failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._backend_failures += 1
                delay = min(_RETRY_INITIAL * 2 ** min(self._backend_failures - 1, 16), _RETRY_MAX)
                self.last_error = f"{state.value}: {exc}"
                log.error("coordinator_error", state=state.value, error=str(exc) or type(exc).__name__,
                          error_type=type(exc).__name__, retry_in=delay)
                self._tell()
                wake_at = self.clock.now() + timedelta(seconds=delay)
            if self._closing:
                break
            if self.rec.state is not state:
                continue
            await self._wait(wake_at)

    async def tick(self) -> None:
        """Run the current state's handler once (tests and the simulator drive it step by step)."""
        await self._handlers[self.rec.state]()

    async def _wait(self, until: datetime | None) -> None:
        self._wake.clear()
        waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(self._wake.wait())}
        if self._backend_open:
            waits.add(asyncio.ensure_future(self.backend.wait_changed()))
        if self._acquire is not None:
            waits.add(asyncio.ensure_future(asyncio.shield(self._acquire)))
        if until is not None:
            waits.add(asyncio.ensure_future(self.clock.sleep(max((until - self.clock.now()).total_seconds(), 0.0))))
        await first_of(waits)

    async def _ensure_backend(self) -> bool:
        if self._backend_open:
            return True
        await self.backend.open(self._holder_id)
        self._backend_open = True
        log.info("coordinator_backend_open", backend=self.backend.kind, group=self._gate().group)
        return True

    def _gate(self) -> Gate:
        try:
            return self.backend.gate()
        except Exception as exc:
            return Gate(group=self.options.group, ready=False, problem=str(exc))

    def _sets(self, gate: Gate) -> list[WindowSet]:
        return [ws for ws in (gate.windows, self.options.local_window) if ws is not None]

    # ----------------------------------------------------------------------- handlers

    async def _tick_idle(self) -> datetime | None:
        now = self.clock.now()
        if self._reboot_required():
            self.rec = replace(self.rec, request={"reason": "reboot-required", "version": "", "slot": ""},
                               pre_hooks_ran=False, rollback=False, verdict="", failure_reported=False)
            self._transition(CoordState.WAITING_FOR_WINDOW, f"{self.options.reboot_required_file} exists")
            return None
        poll = now + timedelta(seconds=self.options.reboot_required_poll) \
            if self.options.reboot_required_file is not None else None
        # Idle hosts follow the group too (a watch, no polling): its numbers for the metrics, and
        # any host may deal with an overdue holder. etcd being down must not stop the file check.
        try:
            await self._ensure_backend()
            tend_at = await self.backend.tend(now)
        except Exception as exc:
            self._idle_failures += 1
            delay = min(_RETRY_INITIAL * 2 ** min(self._idle_failures - 1, 16), _RETRY_MAX)
            log.warning("coordinator_backend_unavailable", backend=self.backend.kind, error=str(exc), retry_in=delay)
            return _earliest(poll, now + timedelta(seconds=delay))
        self._idle_failures = 0
        return _earliest(poll, tend_at)

    def _reboot_required(self) -> bool:
        path = self.options.reboot_required_file
        if path is None:
            return False
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return False
        last = _parse_time(self.rec.last_reboot_at)
        # A file older than our own last reboot was handled by it (a real /run is emptied by the
        # reboot; this guards a /run that is not a tmpfs).
        return last is None or mtime > last.timestamp()

    async def _tick_waiting_for_window(self) -> datetime | None:
        await self._ensure_backend()
        now = self.clock.now()
        gate = self.backend.gate()
        tend_at = await self.backend.tend(now)
        if not gate.ready:
            return _earliest(tend_at, now + timedelta(seconds=5))
        sets = self._sets(gate)
        self._next_open = next_opening(now, sets, gate.min_window_remaining)
        if self._next_open is not None and self._next_open <= now:
            self._count_wait("window")
            self._transition(CoordState.QUEUED, "window open")
            return None
        self._tell()
        return _earliest(tend_at, self._next_open, now + timedelta(seconds=self.options.window_poll))

    async def _tick_queued(self) -> datetime | None:
        await self._ensure_backend()
        now = self.clock.now()
        gate = self.backend.gate()
        tend_at = await self.backend.tend(now)
        ok, until = _window_check(now, self._sets(gate), gate.min_window_remaining)
        if gate.ready and not ok:
            await self._leave_queue()
            self._count_wait("slot")
            self._transition(CoordState.WAITING_FOR_WINDOW, "the window closed before the grant: left the queue")
            return None
        task = self._acquire
        if task is None:
            self._acquire = task = asyncio.ensure_future(self.backend.acquire(self._lock_reason()))
        if task.done():
            self._acquire = None
            grant = task.result()  # an error is retried by the loop with backoff
            self._count_wait("slot")
            self.rec = replace(self.rec, grant=_grant_json(grant))
            self._transition(CoordState.HOLDING, f"slot granted (revision {grant.revision})")
            return None
        self._tell()
        return _earliest(tend_at, until, now + timedelta(seconds=self.options.queue_poll))

    async def _tick_holding(self) -> datetime | None:
        await self._ensure_backend()
        grant = await self.backend.held()
        if grant is None:
            # Released under us (an overdue release by another host, an operator's unlock).
            self.rec = replace(self.rec, grant=None)
            self._transition(CoordState.WAITING_FOR_WINDOW, "the slot is not ours any more")
            return None
        self.rec = replace(self.rec, grant=_grant_json(grant))
        now = self.clock.now()
        gate = self.backend.gate()
        if self.rec.rollback:
            # A failed boot goes back under the slot it holds: pause and cooldown (our own failure
            # may have caused them) do not apply, the window does.
            if not _window_check(now, self._sets(gate), timedelta(0))[0]:
                self._next_open = next_opening(now, self._sets(gate), timedelta(0))
                self._tell()
                return _earliest(self._next_open, now + timedelta(minutes=1))
            self._transition(CoordState.REBOOTING, "rollback: window open")
            return None
        problem = self._recheck(now, gate)
        if problem:
            await self._give_back(problem)
            return None
        self._transition(CoordState.PRE_REBOOT_HOOKS, "window open, group running, cooldown passed")
        return None

    def _recheck(self, now: datetime, gate: Gate) -> str:
        if not gate.ready:
            return f"the group's policy cannot be read ({gate.problem})"
        if gate.paused:
            return f"group {gate.group} is paused" + (f" ({gate.pause_reason})" if gate.pause_reason else "")
        ok, _ = _window_check(now, self._sets(gate), gate.min_window_remaining)
        if not ok:
            return "the window is closed or closes too soon (min_window_remaining)"
        if gate.cooldown_until is not None and gate.cooldown_until > now:
            return f"cooldown until {gate.cooldown_until.isoformat()}"
        return ""

    async def _tick_pre_reboot_hooks(self) -> datetime | None:
        self.rec = replace(self.rec, pre_hooks_ran=True)
        self._persist()
        run = await run_hooks(self.options.pre_reboot_dir, "pre-reboot", self._hook_env(),
                              per_hook=self.options.hook_timeout)
        if not run.ok:
            await self._give_back(f"pre-reboot hook failed: {run.failure()}", failed=True)
            return None
        self.rec = replace(self.rec, users_since=self.clock.now().isoformat())
        self._transition(CoordState.WAITING_FOR_USERS, f"pre-reboot hooks passed ({len(run.results)})")
        return None

    async def _tick_waiting_for_users(self) -> datetime | None:
        now = self.clock.now()
        gate = self.backend.gate()
        problem = self._recheck(now, gate)
        if problem:  # the last look before the reboot: never outside a window
            await self._give_back(problem)
            return None
        list_sessions = getattr(self.host, "sessions", None)  # a simulator's host may not have logind
        try:
            sessions = await list_sessions() if list_sessions is not None else []
        except Exception as exc:  # logind trouble must not stall the rollout: reboot goes through it too
            log.warning("sessions_unknown", error=str(exc))
            sessions = []
        self._users = len(sessions)
        since = _parse_time(self.rec.users_since) or now
        limit = since + timedelta(seconds=self.options.max_session_wait)
        if sessions and now < limit:
            log.info("reboot_postponed_for_users", sessions=[s.user for s in sessions], until=limit.isoformat())
            self._tell()
            return min(limit, now + timedelta(seconds=self.options.session_poll))
        cause = ("no logged-in sessions" if not sessions
                 else f"{len(sessions)} session(s) still logged in; limit reached")
        self._transition(CoordState.REBOOTING, cause)
        return None

    async def _tick_rebooting(self) -> datetime | None:
        if self.rec.last_reboot_at and self.rec.boot_id == self._boot_id and self.rec.cause == "reboot requested":
            return None  # asked already in this boot; the machine is going down
        reason = (self.rec.request or {}).get("reason", "update")
        reason = "rollback" if self.rec.rollback else reason
        now = self.clock.now()
        self.rec = replace(self.rec, last_reboot_at=now.isoformat())
        self._transition(CoordState.REBOOTING, "reboot requested")
        self.counters.reboots[reason] = self.counters.reboots.get(reason, 0) + 1
        log.info("coordinator_reboot", reason=reason, version=(self.rec.request or {}).get("version", ""))
        try:
            await self.host.reboot()
        except Exception as exc:
            self.counters.reboots[reason] -= 1
            await self._give_back(f"reboot failed: {exc}", failed=True)
        return None

    async def _tick_after_boot(self) -> datetime | None:
        verdict = self.rec.verdict
        if not verdict:
            return None  # the agent calls boot_settled (or reboot_needed for a rollback)
        await self._ensure_backend()
        if verdict == "health_check_failed":
            await self._report("unhealthy", "health check failed after the reboot")
            self.rec = replace(self.rec, rollback=True, verdict="")
            self._transition(CoordState.HOLDING, "health check failed: rolling back under the same slot")
            return None
        if verdict == "rolled_back" or self.rec.rollback:
            await self._report("unhealthy", "the new version did not stay booted (rolled back)")
            self._finish_failed("rolled back")
            return None
        run = await run_hooks(self.options.post_boot_dir, "post-boot", self._hook_env(),
                              per_hook=self.options.hook_timeout)
        if not run.ok:
            await self._report("unhealthy", f"post-boot hook failed: {run.failure()}")
            self._finish_failed(f"post-boot hook failed: {run.failure()}")
            return None
        self._transition(CoordState.RELEASING, f"healthy ({verdict}), post-boot hooks passed ({len(run.results)})")
        return None

    async def _tick_releasing(self) -> datetime | None:
        await self._ensure_backend()
        released = await self.backend.release()
        nxt = self.rec.next_request
        self.rec = replace(self.rec, grant=None, request=nxt, next_request=None, keeps_slot=False, rollback=False,
                           verdict="", failure_reported=False, pre_hooks_ran=False)
        cause = "slot released" if released else "no slot held (released already)"
        if nxt is not None:
            self._transition(CoordState.WAITING_FOR_WINDOW, f"{cause}; next: {_describe_request(nxt)}")
        else:
            self._transition(CoordState.IDLE, cause)
        return None

    async def _tick_failed(self) -> datetime | None:
        now = self.clock.now()
        if self.rec.keeps_slot:
            await self._ensure_backend()
            if await self.backend.held() is None:
                self.rec = replace(self.rec, keeps_slot=False, grant=None, request=None)
                self._transition(CoordState.IDLE, "the kept slot was released (by an operator)")
                return None
            return now + timedelta(minutes=1)
        retry = _parse_time(self.rec.retry_at)
        if self.rec.request is None:
            return None
        if retry is None or now >= retry:
            self.rec = replace(self.rec, pre_hooks_ran=False, retry_at="")
            self._transition(CoordState.WAITING_FOR_WINDOW, "retrying after a failed attempt")
            return None
        return retry

    # ----------------------------------------------------------------------- helpers

    async def _leave_queue(self) -> None:
        task, self._acquire = self._acquire, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # A grant may have landed as we cancelled: never keep a slot we are not going to use.
        if await self.backend.held() is not None:
            await self.backend.release()
            log.warning("coordinator_grant_returned", cause="granted while leaving the queue")

    async def _give_back(self, cause: str, *, failed: bool = False) -> None:
        """Abort this attempt: undo the pre-reboot hooks (the post-boot ones, e.g. uncordon), give
        the slot back, then wait again (or, after a failure, retry later)."""
        if self.rec.pre_hooks_ran:
            run = await run_hooks(self.options.post_boot_dir, "post-boot", self._hook_env(),
                                  per_hook=self.options.hook_timeout)
            if not run.ok:
                log.error("abort_hooks_failed", failure=run.failure())
        await self.backend.release()
        self.rec = replace(self.rec, grant=None, pre_hooks_ran=False)
        if failed:
            self.last_error = cause
            retry = self.clock.now() + timedelta(seconds=self.options.retry_after_failure)
            self.rec = replace(self.rec, retry_at=retry.isoformat())
            self._transition(CoordState.FAILED, f"{cause}; slot given back")
        else:
            self._transition(CoordState.WAITING_FOR_WINDOW, f"{cause}; slot given back")

    async def _report(self, kind: str, detail: str) -> None:
        if self.rec.failure_reported:
            return
        grant = self.rec.grant or {}
        incident = f"rev-{grant.get('revision') or 0}-boot-{self.rec.boot_id or self._boot_id}"
        line = await self.backend.report_failure(kind, detail, incident)
        self.counters.failures_reported += 1
        self.last_error = detail
        self.rec = replace(self.rec, failure_reported=True)
        self._persist()
        log.warning("coordinator_failure_reported", kind=kind, detail=detail, result=line)

    def _finish_failed(self, cause: str) -> None:
        """After a failure was reported: release or keep the slot as the group's on_timeout says."""
        if self._gate().on_timeout == "hold":
            self.rec = replace(self.rec, keeps_slot=True, request=None)
            self._transition(CoordState.FAILED, cause)
        else:
            self._transition(CoordState.RELEASING, f"{cause}; on_timeout = release")

    def _count_wait(self, what: str) -> None:
        since = _parse_time(self.rec.since)
        if since is None:
            return
        seconds = max((self.clock.now() - since).total_seconds(), 0.0)
        if what == "window":
            self.counters.window_wait_seconds += seconds
        else:
            self.counters.slot_wait_seconds += seconds

    def _lock_reason(self) -> str:
        return _describe_request(self.rec.request or {})

    def _hook_env(self) -> dict[str, str]:
        req = self.rec.request or {}
        gate = self._gate()
        return {
            "UPDATE_AGENT_GROUP": gate.group or self.options.group,
            "UPDATE_AGENT_MACHINE_ID": self._holder_id,
            "UPDATE_AGENT_REASON": "rollback" if self.rec.rollback else req.get("reason", ""),
            "UPDATE_AGENT_NEW_VERSION": req.get("version", ""),
            "UPDATE_AGENT_OLD_VERSION": req.get("old_version", ""),
            "UPDATE_AGENT_STRATEGY": self.backend.kind,
        }

    def _transition(self, to: CoordState, cause: str) -> None:
        previous = self.rec.state
        now = self.clock.now()
        self.rec = replace(self.rec, state=to, since=now.isoformat(), cause=cause,
                           boot_id=self._boot_id or self.rec.boot_id)
        if to is not CoordState.WAITING_FOR_WINDOW:
            self._next_open = None
        self.counters.transitions += 1
        log.info("coordinator_transition", **{"from": previous.value, "to": to.value}, cause=cause)
        self._persist()
        self._tell()
        self._wake.set()

    def _persist(self) -> None:
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.state_path, json.dumps(self.rec.to_json(), indent=1).encode())
        except OSError as exc:
            log.error("coordinator_state_save_failed", path=str(self.state_path), error=str(exc))

    def _load(self) -> Record:
        from locksmith.files import InputFileError, read_text

        if not os.path.lexists(self.state_path):
            return Record()
        try:
            text = read_text(self.state_path, what="coordinator state")
        except InputFileError as exc:
            log.error("coordinator_state_unreadable", path=str(self.state_path), error=str(exc))
            return Record()
        try:
            return Record.from_json(json.loads(text))
        except (ValueError, TypeError) as exc:
            log.error("coordinator_state_corrupt", path=str(self.state_path), error=str(exc))
            return Record()

    def _tell(self) -> None:
        tell(self._listeners, self.status_text())


def _describe_request(req: dict[str, str]) -> str:
    reason = req.get("reason", "")
    version = req.get("version", "")
    return f"{reason} to {version}" if version else reason


def _grant_json(grant: Grant) -> dict[str, Any]:
    return {"holder_id": grant.holder_id, "since": grant.since.isoformat(), "revision": grant.revision,
            "deadline": grant.deadline.isoformat() if grant.deadline else None}


def _earliest(*times: datetime | None) -> datetime | None:
    present = [t for t in times if t is not None and t != NEVER_CLOSES]
    return min(present) if present else None


def _tz_name(tz: tzinfo, when: datetime) -> str:
    key = getattr(tz, "key", None)
    return key if isinstance(key, str) else (when.tzname() or "UTC")
