"""The update agent: an explicit state machine driven by one ``tick`` function.

Every phase has one handler; ``tick`` runs the handler of the current phase once, and every
phase change goes through ``_transition``, which logs it, persists it and tells subscribers
(the D-Bus layer turns that into ``StatusUpdate``). The phases are update_engine's status
strings plus two of our own for the after-boot logic (see docs/agent.md):

    STARTING ──► BOOT_HEALTH_CHECK ──► IDLE ◄───────────────────────────────┐
        │               │              │                                   │
        │               └─► UPDATED_NEED_REBOOT (rollback wanted)          │
        └──► IDLE / UPDATED_NEED_REBOOT (restart within the same boot)      │
    IDLE ─► CHECKING_FOR_UPDATE ─► UPDATE_AVAILABLE ─► DOWNLOADING ─► VERIFYING ─► FINALIZING
                 │    (no update) ─► IDLE                                          │
                 └─► REPORTING_ERROR_EVENT ─► IDLE                                 ▼
                                                                  UPDATED_NEED_REBOOT

The clock, the host, the disk and the update source are parameters, so the daemon, the tests
and the simulator run this same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from locksmith.clock import SYSTEM_CLOCK, Clock
from locksmith.log import get_logger
from updateagent import gpt
from updateagent.errors import PayloadError, PolicyRefused, UpdateAgentError
from updateagent.health import HealthChecker, HealthReport
from updateagent.host import BootInfo, Host
from updateagent.schedule import Schedule, is_transient
from updateagent.slots import Slot, SlotRefused, SlotTable, slots_from_table
from updateagent.source import UpdateOffer, UpdateSource
from updateagent.state import AgentState, PendingUpdate, StateStore
from updateagent.strategy import RebootRequest, RebootStrategy
from updateagent.strategy.immediate import ImmediateRebootStrategy  # noqa: F401  (moved; importable here too)
from updateagent.strategy.off import ReportOnlyStrategy

if TYPE_CHECKING:
    # The installer (requests, urllib3, zstandard: ~6 MiB resident) loads only when an update is
    # downloaded; an idle agent never needs it.
    from updateagent.install import Progress

log = get_logger("updateagent.agent")
_T = TypeVar("_T")

_VERIFY_CHUNK = 1024 * 1024
# After-boot verification that failed unexpectedly (an I/O error marking the slot, say) is retried
# from this delay, doubling, up to the cap: until it completes, the booted slot stays unconfirmed.
VERIFY_RETRY_INITIAL = 5.0
VERIFY_RETRY_MAX = 300.0


class Phase(StrEnum):
    STARTING = "AGENT_STARTING"
    BOOT_HEALTH_CHECK = "AGENT_BOOT_HEALTH_CHECK"
    IDLE = "UPDATE_STATUS_IDLE"
    CHECKING_FOR_UPDATE = "UPDATE_STATUS_CHECKING_FOR_UPDATE"
    UPDATE_AVAILABLE = "UPDATE_STATUS_UPDATE_AVAILABLE"
    DOWNLOADING = "UPDATE_STATUS_DOWNLOADING"
    VERIFYING = "UPDATE_STATUS_VERIFYING"
    FINALIZING = "UPDATE_STATUS_FINALIZING"
    UPDATED_NEED_REBOOT = "UPDATE_STATUS_UPDATED_NEED_REBOOT"
    REPORTING_ERROR_EVENT = "UPDATE_STATUS_REPORTING_ERROR_EVENT"

    @property
    def operation(self) -> str:
        """The update_engine status string; our internal after-boot phases look idle to its clients."""
        return self.value if self.value.startswith("UPDATE_STATUS_") else Phase.IDLE.value


UPDATE_ENGINE_STATUSES = tuple(p.value for p in Phase if p.value.startswith("UPDATE_STATUS_"))
_APPLYING = (Phase.UPDATE_AVAILABLE, Phase.DOWNLOADING, Phase.VERIFYING, Phase.FINALIZING)
_WAITING = (Phase.IDLE, Phase.UPDATED_NEED_REBOOT)


class AgentBusy(UpdateAgentError):
    """The request cannot be served in the agent's current phase."""


class AgentStateError(UpdateAgentError):
    """The agent cannot do what was asked with what it knows (no disk, unknown booted slot)."""


# --------------------------------------------------------------------------- status


@dataclass(frozen=True)
class StatusSnapshot:
    """update_engine's five values, plus our phase."""

    last_checked_time: int
    progress: float
    new_version: str
    new_size: int
    phase: Phase

    @property
    def current_operation(self) -> str:
        return self.phase.operation

    def as_tuple(self) -> tuple[int, float, str, str, int]:
        return (self.last_checked_time, self.progress, self.current_operation, self.new_version, self.new_size)


@dataclass(frozen=True)
class AgentEvent:
    """A structured event: logged, kept in the history and sent to subscribers."""

    time: float
    event: str
    details: dict[str, Any]


# --------------------------------------------------------------------------- the agent

StatusListener = Callable[[StatusSnapshot], None]
EventListener = Callable[[AgentEvent], None]


class Agent:
    def __init__(
        self,
        *,
        store: StateStore,
        host: Host,
        slots: SlotTable | None,
        source: UpdateSource | None,
        health: HealthChecker | None = None,
        clock: Clock = SYSTEM_CLOCK,
        schedule: Schedule | None = None,
        reboot_strategy: RebootStrategy | None = None,
        allow_downgrade: bool = False,
        check_on_start: bool = True,
        initial_versions: Mapping[str, str] | None = None,
    ) -> None:
        self.store = store
        self.host = host
        self.slots = slots
        self.source = source
        self.health = health or HealthChecker(())
        self.clock = clock
        self.schedule = schedule or Schedule()
        self.reboot_strategy: RebootStrategy = reboot_strategy or ReportOnlyStrategy()
        self.allow_downgrade = allow_downgrade
        self.check_on_start = check_on_start
        self.initial_versions = dict(initial_versions or {})

        self.phase = Phase.STARTING
        self.state = AgentState()
        self.progress = 0.0
        self.boot: BootInfo | None = None
        self.next_check: datetime | None = None
        self.failures = 0
        self.errors = 0  # error reports since this agent object started
        self.downloaded_bytes = 0  # compressed payload bytes received since this agent object started (metrics)
        self._check_requested = False
        self._offer: UpdateOffer | None = None
        self._target: Slot | None = None
        self._wake = asyncio.Event()
        self._status_listeners: list[StatusListener] = []
        self._event_listeners: list[EventListener] = []
        self._health_task: asyncio.Task[HealthReport] | None = None
        self._manual_good = False
        self._stopping = False
        self._verify_failures = 0
        self._verify_retry_at: datetime | None = None
        self._handlers: dict[Phase, Callable[[], Awaitable[None]]] = {
            Phase.STARTING: self._tick_starting,
            Phase.BOOT_HEALTH_CHECK: self._tick_boot_health_check,
            Phase.IDLE: self._tick_idle,
            Phase.CHECKING_FOR_UPDATE: self._tick_checking,
            Phase.UPDATE_AVAILABLE: self._tick_update_available,
            Phase.DOWNLOADING: self._tick_downloading,
            Phase.VERIFYING: self._tick_verifying,
            Phase.FINALIZING: self._tick_finalizing,
            Phase.UPDATED_NEED_REBOOT: self._tick_need_reboot,
            Phase.REPORTING_ERROR_EVENT: self._tick_reporting_error,
        }

    # ----------------------------------------------------------------------- public API

    def subscribe(self, on_status: StatusListener | None = None, on_event: EventListener | None = None) -> None:
        if on_status is not None:
            self._status_listeners.append(on_status)
        if on_event is not None:
            self._event_listeners.append(on_event)

    def status(self) -> StatusSnapshot:
        s = self.state
        # update_engine reports the download as complete from verification until the reboot.
        done = self.phase in (Phase.VERIFYING, Phase.FINALIZING, Phase.UPDATED_NEED_REBOOT)
        return StatusSnapshot(s.last_checked_time, 1.0 if done else self.progress, s.new_version, s.new_size,
                              self.phase)

    def request_check(self) -> bool:
        """AttemptUpdate: check now. Ignored (False) while an update is applied or waits for a reboot,
        and while the booted slot is being verified (no check may start before it is confirmed)."""
        if self.phase not in (Phase.IDLE, Phase.STARTING, Phase.REPORTING_ERROR_EVENT):
            log.info("check_request_ignored", phase=self.phase.value)
            return False
        self._check_requested = True
        self._wake.set()
        return True

    async def reset_status(self) -> None:
        """ResetStatus: leave an error report, or revert an applied update that waits for its reboot."""
        if self.phase in (Phase.IDLE, Phase.REPORTING_ERROR_EVENT):
            self._enter_idle(reason="reset")
            return
        if self.phase is Phase.UPDATED_NEED_REBOOT:
            pending = self.state.pending
            if pending is not None and pending.kind == "rollback":
                raise AgentBusy("a rollback is waiting for its reboot; it cannot be reset")
            if pending is not None and self.slots is not None:
                await asyncio.to_thread(self.slots.mark_bad, pending.slot)  # type: ignore[arg-type]
            self.state = replace(self.state, pending=None, new_version="", new_size=0)
            self._event("update_reverted", version=pending.version if pending else "")
            # After an agent restart no check is scheduled while the reboot waits: schedule one.
            self._enter_idle(reason="reset")
            return
        raise AgentBusy(f"cannot reset while {self.phase.value}")

    async def mark_good(self) -> str:
        """MarkGood: declare the booted slot good now, skipping (or cutting short) the health checks."""
        if self.phase in _APPLYING or self.phase is Phase.CHECKING_FOR_UPDATE:
            raise AgentBusy(f"cannot mark good while {self.phase.value}")
        slot, _ = self._booted_slot()
        if self.state.pending is not None and self.state.pending.kind == "rollback":
            raise AgentBusy("this slot failed its health check and a rollback waits for a reboot")
        if self.phase is Phase.BOOT_HEALTH_CHECK:
            self._manual_good = True
            if self._health_task is not None:
                self._health_task.cancel()
            self._wake.set()
            return slot.name
        if not slot.successful:
            assert self.slots is not None
            await asyncio.to_thread(self.slots.mark_good, slot.name)
            self._event("slot_marked_good", slot=slot.name, how="manual")
        return slot.name

    def slot_table(self) -> list[dict[str, Any]]:
        """Both slots with their GPT bits, which one booted and the version we know for each."""
        if self.slots is None:
            return []
        booted = self.boot.partuuid if self.boot else None
        rows = []
        for slot in self.slots.read():
            row = asdict(slot)
            row["booted"] = slot.partuuid == booted
            row["bootable"] = slot.bootable
            row["version"] = self._version_of(slot)
            rows.append(row)
        return rows

    def details(self) -> dict[str, Any]:
        """Everything our own D-Bus interface exposes, as one JSON-able document."""
        s = self.state
        booted = self.boot
        return {
            "format_version": 1,
            "phase": self.phase.value,
            "status": self.status().as_tuple(),
            "current_version": s.current_version,
            "booted_version": s.booted_version,
            "booted_slot": s.booted_slot,
            "booted_partuuid": booted.partuuid if booted else "",
            "boot_id": booted.boot_id if booted else "",
            "pending": asdict(s.pending) if s.pending else None,
            "last_boot_outcome": s.last_boot_outcome,
            "last_error": s.last_error,
            "deny_list": [asdict(d) for d in s.deny_list],
            "next_check": self.next_check.isoformat() if self.next_check else None,
            "failures": self.failures,
        }

    def history(self, limit: int = 0) -> list[dict[str, Any]]:
        entries = self.state.history[-limit:] if limit > 0 else self.state.history
        return [asdict(e) for e in entries]

    def stop(self) -> None:
        self._stopping = True
        if self._health_task is not None:
            self._health_task.cancel()
        self._wake.set()

    # ----------------------------------------------------------------------- driving

    async def start(self) -> None:
        """Load the persisted state; the next tick runs the after-boot logic."""
        self.state = await asyncio.to_thread(self.store.load_or_reset, self._now())
        self.phase = Phase.STARTING
        log.info("agent_start", saved_status=self.state.status, current_version=self.state.current_version)
        start = getattr(self.reboot_strategy, "start", None)  # a test's own strategy may have none
        try:
            if start is not None:
                await start()  # resumes a coordinated reboot in its own task
        except Exception as exc:
            log.error("reboot_strategy_failed", hook="start", error=str(exc))

    async def tick(self) -> None:
        """Run the current phase's handler once. Unexpected errors become an error report."""
        phase = self.phase
        try:
            await self._handlers[phase]()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if phase is Phase.REPORTING_ERROR_EVENT:
                raise
            self._fail(exc, phase)

    def settled(self) -> bool:
        """True when the agent waits for time or a request (nothing to do right now)."""
        if self.phase is Phase.BOOT_HEALTH_CHECK:
            return self._verify_waiting()
        if self.phase not in _WAITING:
            return False
        if self.phase is Phase.IDLE and (self._check_requested or self._check_due()):
            return False
        return True

    async def run_until_settled(self, *, check: bool = False, max_ticks: int = 1000) -> Phase:
        """Tick until settled. With ``check``, one check (and apply) is requested first."""
        if check:
            self._check_requested = True
        for _ in range(max_ticks):
            if self.phase is not Phase.STARTING and self.settled():
                return self.phase
            await self.tick()
        raise AgentStateError(f"agent did not settle within {max_ticks} ticks (phase {self.phase.value})")

    async def run(self) -> None:
        """The daemon loop: tick; when settled, sleep until the next check or a request."""
        while not self._stopping:
            await self.tick()
            if self._stopping:
                break
            if self.settled():
                await self._wait()

    async def _wait(self) -> None:
        self._wake.clear()
        if not self.settled():
            return
        delay: float | None = None
        if self.phase is Phase.IDLE and self.next_check is not None:
            delay = max((self.next_check - self.clock.now()).total_seconds(), 0.0)
        elif self.phase is Phase.BOOT_HEALTH_CHECK and self._verify_retry_at is not None:
            delay = max((self._verify_retry_at - self.clock.now()).total_seconds(), 0.0)
        waiter = asyncio.ensure_future(self._wake.wait())
        tasks: set[asyncio.Future[Any]] = {waiter}
        if delay is not None:
            tasks.add(asyncio.ensure_future(self.clock.sleep(delay)))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)

    # ----------------------------------------------------------------------- handlers

    async def _tick_starting(self) -> None:
        saved = self.state
        table = await self._repair_gpt() if self.slots is not None else None
        try:
            boot = await asyncio.to_thread(self.host.booted)
        except UpdateAgentError as exc:
            self._fail(exc, Phase.STARTING)
            return
        self.boot = boot
        slots = slots_from_table(table) if table is not None else ()
        slot = _by_partuuid(slots, boot.partuuid)
        version = self._boot_version(boot, slot)
        state = replace(saved, booted_version=version, booted_slot=slot.name if slot else "")
        if slot is not None and version:
            state = replace(state, slot_versions={**state.slot_versions, slot.partuuid: version})
        self.state = state

        if boot.boot_id == saved.boot_id:
            await self._resume_same_boot(saved, slots)
            return

        self.state = replace(self.state, boot_id=boot.boot_id)
        self._event("booted", slot=slot.name if slot else "", partuuid=boot.partuuid, version=version,
                    boot_id=boot.boot_id)
        pending = saved.pending
        if slot is None:
            self.state = replace(self.state, current_version=version or saved.current_version)
            self._fail(AgentStateError(f"booted partition {boot.partuuid} is neither slot of "
                                       f"{self.slots.disk if self.slots else 'the (unconfigured) disk'}"),
                       Phase.STARTING)
            return
        if pending is not None and pending.kind == "update" and pending.partuuid != boot.partuuid:
            failed = next(s for s in slots if s is not slot)
            if pending.marked or failed.priority > 0:
                await self._rolled_back(pending, slot, failed, version, reason="new slot did not boot")
                return
            # Killed before the GPT mark: the bootloader was never offered the new slot.
            self._discard_unmarked(pending)
            pending = None
        if pending is not None and pending.kind == "update":
            # It booted, so it was marked (a restart during the checks must not take it for unmarked).
            self.state = replace(self.state, pending=replace(pending, marked=True))
            self._transition(Phase.BOOT_HEALTH_CHECK, version=pending.version, slot=slot.name)
            return
        if pending is not None and pending.kind == "rollback":
            await self._rollback_completed(pending, slot, version)
            return
        if not slot.successful:
            # A slot booted on its last tries that we did not install: same treatment as our own.
            self._transition(Phase.BOOT_HEALTH_CHECK, version=version, slot=slot.name)
            return
        self.state = replace(self.state, current_version=version, last_boot_outcome="normal")
        self._event("boot_outcome", outcome="normal", slot=slot.name, version=version)
        await self._settle_boot("normal", version)
        self._enter_idle(first=True)

    async def _repair_gpt(self) -> gpt.GptTable:
        """A power cut during a GPT write leaves one copy stale or torn (never both): rewrite it
        from the good one, so that the next writer and every tool see two valid copies again.
        Returns the table as it is on disk now."""
        assert self.slots is not None
        table = await asyncio.to_thread(gpt.read_gpt, self.slots.disk)
        if table.in_sync:
            return table
        repaired = await asyncio.to_thread(gpt.repair_gpt, self.slots.disk)
        self._event("gpt_repaired", disk=self.slots.disk, source=table.source,
                    primary_problem=table.primary_problem, backup_problem=table.backup_problem)
        return repaired

    async def _resume_same_boot(self, saved: AgentState, slots: Iterable[Slot]) -> None:
        """The agent restarted but the machine did not: pick up where the saved status says."""
        status = saved.status
        pending = saved.pending
        log.info("agent_restarted_same_boot", saved_status=status)
        if pending is not None and not pending.marked:
            # Killed between saving the pending update and saving that its slot was marked: the
            # GPT tells which. The image was verified before the record was saved.
            target = _by_partuuid(slots, pending.partuuid)
            if target is not None and target.priority > 0 and target.tries > 0 and not target.successful:
                self.state = replace(self.state, pending=replace(pending, marked=True),
                                     new_version=pending.version, new_size=pending.size)
                self._event("update_applied", version=pending.version, slot=pending.slot,
                            partuuid=pending.partuuid, resumed=True)
                status = Phase.UPDATED_NEED_REBOOT.value
                pending = self.state.pending
            else:
                self._discard_unmarked(pending)
                self._enter_idle(first=True)
                return
        if status == Phase.UPDATED_NEED_REBOOT.value and pending is not None:
            self.state = replace(self.state, new_version=self.state.new_version or pending.version)
            self._transition(Phase.UPDATED_NEED_REBOOT, resumed=True)
            # The previous agent may have died before its request took effect (or the strategy
            # reboots at once): ask again. Strategies treat a repeated request as the same one.
            await self._request_reboot(RebootRequest(pending.kind, pending.version, pending.slot))
            return
        if status == Phase.BOOT_HEALTH_CHECK.value:
            self._transition(Phase.BOOT_HEALTH_CHECK, resumed=True)
            return
        if status in {p.value for p in (*_APPLYING, Phase.CHECKING_FOR_UPDATE)}:
            # A slot that was being written stays unbootable (marked before its first write); start over.
            self._event("apply_interrupted", status=status, version=saved.new_version)
            self.state = replace(self.state, new_version="", new_size=0)
        self._enter_idle(first=True)

    def _verify_waiting(self) -> bool:
        """In BOOT_HEALTH_CHECK: a failed verification waits for its retry time (or MarkGood)."""
        return (self._verify_retry_at is not None and not self._manual_good
                and self.clock.now() < self._verify_retry_at)

    async def _tick_boot_health_check(self) -> None:
        """Verify the booted slot. An unexpected failure (an I/O error marking the slot, say) is
        retried with backoff rather than sent to IDLE: the slot would never be marked good, the
        next reboot would roll back, and checks would run on an unconfirmed slot meanwhile."""
        if self._verify_waiting():
            return
        self._verify_retry_at = None
        try:
            await self._verify_boot()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._verify_failed(exc)
            return
        self._verify_failures = 0

    def _verify_failed(self, exc: Exception) -> None:
        detail = str(exc) or type(exc).__name__
        self._verify_failures += 1
        delay = min(VERIFY_RETRY_INITIAL * 2.0 ** min(self._verify_failures - 1, 32), VERIFY_RETRY_MAX)
        self._verify_retry_at = self.clock.now() + timedelta(seconds=delay)
        self.errors += 1
        if not isinstance(exc, UpdateAgentError):
            log.exception("unexpected_error", phase=self.phase.value, error=detail)
        log.warning("boot_verification_retry", failures=self._verify_failures, retry_in=delay, error=detail)
        self.state = replace(self.state, last_error=f"verifying the booted slot failed: {detail} "
                                                    f"(retrying in {delay:g}s)")
        self._event("error", phase=self.phase.value, kind=type(exc).__name__, detail=detail,
                    retry_in=delay)
        self._persist()
        self._notify()

    async def _verify_boot(self) -> None:
        slot, other = self._booted_slot()
        pending = self.state.pending
        version = pending.version if pending is not None and pending.kind == "update" else self.state.booted_version
        report: HealthReport | None = None
        if not self._manual_good and not slot.successful:
            self._health_task = asyncio.ensure_future(self.health.run())
            try:
                report = await self._health_task
            except asyncio.CancelledError:
                if not self._manual_good or self._stopping:
                    raise
            finally:
                self._health_task = None
        if report is not None and not report.ok:
            await self._health_failed(slot, other, version, report)
            return
        how = "manual" if self._manual_good else ("health_checks" if report is not None else "already_good")
        if not slot.successful:
            assert self.slots is not None
            await asyncio.to_thread(self.slots.mark_good, slot.name)
        self._manual_good = False  # only now: a retry after a failed mark must still honour MarkGood
        self.state = replace(
            self.state, current_version=version, booted_version=version, pending=None, new_version="",
            new_size=0, last_boot_outcome="success", last_error="",
            slot_versions={**self.state.slot_versions, slot.partuuid: version} if version else
            self.state.slot_versions,
        )
        self._event("boot_outcome", outcome="success", slot=slot.name, version=version, how=how,
                    checks=[asdict(r) for r in report.results] if report else [])
        await self._settle_boot("success", version)
        self._enter_idle(first=True)

    async def _health_failed(self, slot: Slot, other: Slot, version: str, report: HealthReport) -> None:
        assert self.slots is not None
        now = self._now()
        previous = self._version_of(other)
        detail = report.summary()
        try:
            await asyncio.to_thread(self.slots.mark_bad, slot.name)
        except SlotRefused as exc:
            # The other slot is not bootable either: stay on this one rather than brick the machine.
            self._deny(version, f"health check failed: {detail}", now)
            self.state = replace(self.state, last_boot_outcome="health_check_failed",
                                 last_error=f"health check failed ({detail}); cannot roll back: {exc}")
            self._event("boot_outcome", outcome="health_check_failed", slot=slot.name, version=version,
                        detail=detail, rollback="impossible", error=str(exc))
            self._transition(Phase.REPORTING_ERROR_EVENT, error=str(exc))
            return
        self._deny(version, f"health check failed: {detail}", now)
        error = f"version {version} failed its health check: {detail}" if version else (
            f"the booted version (unknown) failed its health check: {detail}; not put on the deny list")
        self.state = replace(
            self.state,
            pending=PendingUpdate(version=previous, slot=other.name, label=other.label, partuuid=other.partuuid,
                                  installed_at=now, previous_version=version, kind="rollback"),
            new_version=previous, new_size=0, last_boot_outcome="health_check_failed",
            last_error=error,
        )
        self._event("boot_outcome", outcome="health_check_failed", slot=slot.name, version=version,
                    detail=detail, checks=[asdict(r) for r in report.results], rollback_to=other.name)
        self._transition(Phase.UPDATED_NEED_REBOOT, reason="rollback", version=previous)
        await self._request_reboot(RebootRequest("rollback", previous, other.name))

    async def _rolled_back(self, pending: PendingUpdate, slot: Slot, failed: Slot, version: str, reason: str) -> None:
        """The old slot booted although the new one was expected: never try that version again."""
        self._deny(pending.version, f"rolled back: {reason}", self._now())
        if failed.priority > 0 and slot.bootable:
            assert self.slots is not None
            await asyncio.to_thread(self.slots.mark_bad, failed.name)
        await self._report_rollback(slot, version, pending.version, reason,
                                    f"version {pending.version} did not boot; rolled back to {version} ({reason})")

    async def _rollback_completed(self, pending: PendingUpdate, slot: Slot, version: str) -> None:
        if slot.partuuid != pending.partuuid:
            self._fail(AgentStateError(f"rollback to slot {pending.slot} expected, but slot {slot.name} booted"),
                       Phase.STARTING)
            return
        if not slot.successful:
            assert self.slots is not None
            await asyncio.to_thread(self.slots.mark_good, slot.name)
        failed_version = pending.previous_version
        await self._report_rollback(slot, version, failed_version, "health check failed",
                                    f"version {failed_version} failed its health check; rolled back to {version}")

    async def _report_rollback(self, slot: Slot, version: str, failed_version: str, reason: str, error: str) -> None:
        self.state = replace(self.state, pending=None, new_version="", new_size=0, current_version=version,
                             last_boot_outcome="rolled_back", last_error=error)
        self._event("boot_outcome", outcome="rolled_back", slot=slot.name, version=version,
                    failed_version=failed_version, reason=reason)
        await self._settle_boot("rolled_back", version)
        self._transition(Phase.REPORTING_ERROR_EVENT, error=error)

    async def _tick_idle(self) -> None:
        if self._check_requested or self._check_due():
            self._check_requested = False
            # update_engine's "last checked" counts every attempt, failed ones too; set before the
            # transition so that the CHECKING signal carries it.
            self.state = replace(self.state, last_checked_time=int(self._now()))
            self._transition(Phase.CHECKING_FOR_UPDATE)

    async def _tick_checking(self) -> None:
        from updateagent.channel import NoUpdate

        if self.source is None:
            raise AgentStateError("no update channel configured (channel.server / SERVER)")
        current = self.state.current_version
        if not current:
            raise AgentStateError("the running version is unknown (no os-release VERSION_ID, no host.versions)")
        try:
            offer = await self.source.check(current, [d.version for d in self.state.deny_list],
                                            self.allow_downgrade)
        except NoUpdate as exc:
            self._event("check_done", outcome="no_update", version=current, detail=str(exc))
            self._cycle_done()
            return
        except PolicyRefused as exc:
            self._event("update_refused", detail=str(exc))
            self._cycle_done()
            return
        if self.state.denied(offer.version):  # belt and braces: the source already filters
            self._event("update_refused", version=offer.version, detail="on the deny list")
            self._cycle_done()
            return
        _, target = self._booted_slot()
        if offer.size > target.size:  # the size is signed: refuse before any write to the disk
            raise PayloadError(f"release {offer.version} does not fit: payload larger than the slot "
                               f"(image is {offer.size} bytes, slot {target.name} holds {target.size})")
        self._offer = offer
        self.state = replace(self.state, new_version=offer.version, new_size=offer.size)
        self._event("update_available", version=offer.version, size=offer.size, current_version=current)
        self._transition(Phase.UPDATE_AVAILABLE, version=offer.version)

    async def _tick_update_available(self) -> None:
        _, target = self._booted_slot()
        self._target = target
        self.progress = 0.0
        self._transition(Phase.DOWNLOADING, slot=target.name, version=self.state.new_version)

    async def _tick_downloading(self) -> None:
        assert self._offer is not None and self._target is not None and self.source is not None
        assert self.slots is not None
        target = self._target
        last = [-1.0]
        received = [0]

        def count_received(total: int) -> None:
            # Progress callbacks are queued from the installer's thread and may arrive after it
            # returned: count only what goes beyond the most seen so far.
            if total > received[0]:
                self.downloaded_bytes += total - received[0]
                received[0] = total

        def on_progress(p: Progress) -> None:
            count_received(p.downloaded)
            fraction = p.bytes / p.total if p.total else 0.0
            if fraction - last[0] >= 0.01 or fraction >= 1.0:
                last[0] = fraction
                self.progress = min(fraction, 1.0)
                self._notify()

        slots = self.slots

        def unbootable() -> None:
            # Runs in the installer's thread just before its first write: a refusal decided
            # earlier (HTTP error, wrong Content-Length) leaves the slot's bits alone, and
            # nothing boots a half-written image.
            now = slots.slot(target.name)
            if now.priority > 0 or now.tries > 0 or now.successful:
                slots.mark_bad(target.name)

        from updateagent.install import InstallTarget

        result = await self.source.install(
            self._offer, InstallTarget(slots.disk, target.offset, target.size, unbootable), on_progress
        )
        count_received(result.downloaded)
        self.progress = 1.0
        self._transition(Phase.VERIFYING, bytes=result.bytes_written)

    async def _tick_verifying(self) -> None:
        """Read the slot back: what the bootloader will load must be what was signed."""
        assert self._offer is not None and self._target is not None and self.slots is not None
        digest = await asyncio.to_thread(_hash_range, self.slots.disk, self._target.offset, self._offer.size)
        if digest != self._offer.sha256:
            raise PayloadError(f"{self.slots.disk}: slot {self._target.name} reads back sha256 {digest}, "
                               f"the manifest says {self._offer.sha256}")
        self._transition(Phase.FINALIZING, sha256=digest)

    async def _tick_finalizing(self) -> None:
        """Save the pending update (marked=False), then mark the slot, then save marked=True.

        Whatever instant a kill comes at, the next start finds either no record and an unmarked
        slot, or a record that says which slot holds which version; an unmarked record is settled
        by looking at the GPT (see ``_resume_same_boot`` and the new-boot logic)."""
        assert self._offer is not None and self._target is not None and self.slots is not None
        target, offer = self._target, self._offer
        pending = PendingUpdate(version=offer.version, slot=target.name, label=target.label,
                                partuuid=target.partuuid, installed_at=self._now(), size=offer.size,
                                previous_version=self.state.current_version, kind="update", marked=False)
        recorded = replace(self.state, pending=pending,
                           slot_versions={**self.state.slot_versions, target.partuuid: offer.version})
        # Must be on disk before the GPT write: a failed save is an error and the slot stays unmarked.
        await asyncio.to_thread(self.store.save, recorded)
        self.state = recorded
        try:
            await asyncio.to_thread(self.slots.mark_new, target.name)
        except Exception:
            # The slot holds the verified image either way; a torn write is repaired at the next
            # start and, should the bootloader pick the slot, slot_versions still names its version.
            self.state = replace(self.state, pending=None)
            raise
        self.state = replace(self.state, pending=replace(pending, marked=True), last_error="")
        self._event("update_applied", version=offer.version, slot=target.name, partuuid=target.partuuid)
        self._offer = self._target = None
        self._reschedule(backoff=False)
        self._transition(Phase.UPDATED_NEED_REBOOT, version=offer.version)
        await self._request_reboot(RebootRequest("update", offer.version, target.name))

    async def _tick_need_reboot(self) -> None:
        """Nothing to do: the reboot strategy (or an operator) reboots the machine."""
        self._check_requested = False

    async def _tick_reporting_error(self) -> None:
        self._enter_idle()

    # ----------------------------------------------------------------------- helpers

    def _fail(self, exc: BaseException, phase: Phase) -> None:
        detail = str(exc) or type(exc).__name__
        self.errors += 1
        if not isinstance(exc, UpdateAgentError):
            log.exception("unexpected_error", phase=phase.value, error=detail)
        self._offer = self._target = None
        self.progress = 0.0
        in_cycle = phase in (*_APPLYING, Phase.CHECKING_FOR_UPDATE)
        self.state = replace(self.state, last_error=detail, new_version="" if in_cycle else self.state.new_version)
        if in_cycle:
            self._reschedule(backoff=is_transient(exc))
        self._event("error", phase=phase.value, kind=type(exc).__name__, detail=detail)
        self._transition(Phase.REPORTING_ERROR_EVENT, error=detail)

    def _deny(self, version: str, reason: str, now: float) -> None:
        """Put ``version`` on the deny list. An unknown version is reported instead: "" there would
        refuse every later check."""
        if not version:
            log.warning("deny_skipped", reason=reason)
            self._event("deny_skipped", reason=reason, detail="the version is unknown")
            return
        self.state = self.state.deny(version, reason, now)

    def _discard_unmarked(self, pending: PendingUpdate) -> None:
        """A pending update whose slot was never marked (killed before the GPT write): the slot is
        still unbootable; forget the record so the next check applies the release again."""
        self._event("apply_interrupted", status=Phase.FINALIZING.value, version=pending.version,
                    slot=pending.slot, detail="killed before the slot was marked")
        self.state = replace(self.state, pending=None, new_version="", new_size=0)

    def _reschedule(self, *, backoff: bool) -> None:
        """After a check-and-apply cycle: exponential backoff when it failed transiently (the count
        of such failures in a row grows), else the normal interval (and the count starts over)."""
        now = self.clock.now()
        if backoff:
            self.failures += 1
            delay = self.schedule.retry_after(self.failures)
            self.next_check = now + timedelta(seconds=delay)
            log.warning("check_backoff", failures=self.failures, retry_in=round(delay, 1))
        else:
            self.failures = 0
            self.next_check = self.schedule.next_check(now)

    def _cycle_done(self) -> None:
        """The check found nothing to apply: back to idle until the next scheduled check. The check
        itself worked, so an earlier error no longer describes the agent (the history keeps it)."""
        self._reschedule(backoff=False)
        self.state = replace(self.state, last_error="")
        self._enter_idle()

    def _check_due(self) -> bool:
        return self.next_check is not None and self.clock.now() >= self.next_check

    def _enter_idle(self, *, first: bool = False, **why: Any) -> None:
        if self.next_check is None:
            now = self.clock.now()
            self.next_check = now if first and self.check_on_start else self.schedule.next_check(now)
        self.progress = 0.0
        if self.state.pending is None:
            self.state = replace(self.state, new_version="", new_size=0)
        self._transition(Phase.IDLE, next_check=self.next_check.isoformat(), **why)

    async def _request_reboot(self, request: RebootRequest) -> None:
        """Tell the reboot strategy. Its failure (logind refusing, say) must not turn the applied
        update or the wanted rollback into an error: the agent would leave UPDATED_NEED_REBOOT, and
        its next check would overwrite the slot waiting to be booted. It stays, reported."""
        try:
            await self.reboot_strategy.reboot_needed(request)
        except Exception as exc:
            detail = f"reboot for {request.reason} to {request.version} failed: {exc}"
            log.error("reboot_strategy_failed", hook="reboot_needed", error=str(exc))
            self.errors += 1
            self.state = replace(self.state, last_error=detail)
            self._event("error", phase=self.phase.value, kind=type(exc).__name__, detail=detail)
            self._persist()
            self._notify()

    async def _settle_boot(self, outcome: str, version: str) -> None:
        try:
            await self.reboot_strategy.boot_settled(outcome, version)
        except Exception as exc:  # the hook must not take the agent down
            log.error("reboot_strategy_failed", hook="boot_settled", error=str(exc))

    def _transition(self, to: Phase, **why: Any) -> None:
        previous = self.phase
        self.phase = to
        self.state = replace(self.state, status=to.value)
        log.info("transition", **{"from": previous.value, "to": to.value}, **why)
        self._persist()
        self._notify()

    def _persist(self) -> None:
        try:
            self.store.save(self.state)
        except UpdateAgentError as exc:
            log.error("state_save_failed", error=str(exc))

    def _notify(self) -> None:
        _tell(self._status_listeners, self.status(), "status")

    def _event(self, name: str, **details: Any) -> None:
        now = self._now()
        self.state = self.state.record(name, now, **details)
        log.log(_event_level(name, details), name, **details)
        _tell(self._event_listeners, AgentEvent(now, name, details), "event")

    def _now(self) -> float:
        return self.clock.now().timestamp()

    def _booted_slot(self) -> tuple[Slot, Slot]:
        """(the booted slot, the other one), from one read of the GPT."""
        if self.slots is None:
            raise AgentStateError("no disk configured (disk.path)")
        if self.boot is None:
            raise AgentStateError("the booted slot is unknown")
        slots = self.slots.read()
        slot = _by_partuuid(slots, self.boot.partuuid)
        if slot is None:
            raise AgentStateError(f"booted partition {self.boot.partuuid} is neither slot of {self.slots.disk}")
        return slot, next(s for s in slots if s is not slot)

    def _boot_version(self, boot: BootInfo, slot: Slot | None) -> str:
        if boot.version:
            return boot.version
        if slot is not None:
            return self._version_of(slot)
        return ""

    def _version_of(self, slot: Slot) -> str:
        return (
            self.state.slot_versions.get(slot.partuuid)
            or self.initial_versions.get(slot.name)
            or self.initial_versions.get(slot.label)
            or self.initial_versions.get(slot.partuuid)
            or ""
        )


# Events logged above info; every other event is info. Errors at error, refusals and things that
# were cut short or repaired (and will be retried or were recovered) at warning.
_EVENT_LEVELS = {"error": logging.ERROR, "update_refused": logging.WARNING, "deny_skipped": logging.WARNING,
                 "apply_interrupted": logging.WARNING, "gpt_repaired": logging.WARNING,
                 "update_reverted": logging.WARNING}
_BAD_BOOTS = ("health_check_failed", "rolled_back")


def _event_level(name: str, details: Mapping[str, Any]) -> int:
    if name == "boot_outcome" and details.get("outcome") in _BAD_BOOTS:
        return logging.ERROR
    return _EVENT_LEVELS.get(name, logging.INFO)


def _tell(listeners: list[Callable[[Any], None]], value: Any, kind: str) -> None:
    # A subscriber's bug (the D-Bus layer, a test) must not take the agent down.
    for listener in list(listeners):
        try:
            listener(value)
        except Exception as exc:
            log.error(f"{kind}_listener_failed", error=str(exc))


def _by_partuuid(slots: Iterable[Slot], partuuid: str) -> Slot | None:
    return next((s for s in slots if s.partuuid == partuuid.lower()), None)


def _hash_range(path: str, offset: int, size: int) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        done = 0
        while done < size:
            chunk = os.pread(fd, min(_VERIFY_CHUNK, size - done), offset + done)
            if not chunk:
                break
            digest.update(chunk)
            done += len(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()
