"""``reboot``: reboot as soon as the update is ready, without a queue.

The coordinator runs with :class:`LocalSlot`, a slot that is always free and needs no lock
service, so the host's own window (when set), the pre-reboot and post-boot hooks and the wait for
logged-in users still apply. There is no group: no pause, no cooldown, no failure budget.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from locksmith.clock import SYSTEM_CLOCK, Clock
from locksmith.windows import WindowSet
from updateagent.strategy import RebootRequest, StatusListener
from updateagent.strategy.coordinator import Gate, Grant, QueueInfo


class LocalSlot:
    kind = "reboot"

    def __init__(self, local_window: WindowSet | None = None, *, clock: Clock = SYSTEM_CLOCK) -> None:
        # The host's window is applied by the coordinator (CoordinatorOptions.local_window).
        del local_window
        self.clock = clock
        self._held: Grant | None = None
        self._never = asyncio.Event()

    async def open(self, holder_id: str) -> None:
        self._id = holder_id or "local"

    async def close(self) -> None:
        return None

    def gate(self) -> Gate:
        return Gate(group="", on_timeout="release")

    async def wait_changed(self) -> None:
        await self._never.wait()

    async def acquire(self, reason: str) -> Grant:
        self._held = Grant(getattr(self, "_id", "local"), self.clock.now(), 0)
        return self._held

    async def held(self) -> Grant | None:
        # Nothing outside this process can take a local slot away: after a restart it is "held"
        # again, which is what the coordinator's record says.
        return self._held or Grant(getattr(self, "_id", "local"), self.clock.now(), 0)

    async def release(self) -> bool:
        held, self._held = self._held, None
        return held is not None

    async def report_failure(self, kind: str, detail: str, incident: str) -> str:
        return "no failure budget without a group (strategy reboot)"

    def queue(self) -> QueueInfo | None:
        return None

    async def tend(self, now: datetime) -> datetime | None:
        return None

    def group_metrics(self) -> dict[str, float]:
        return {}


class ImmediateRebootStrategy:
    """Reboot inside ``reboot_needed`` itself, with no window, hook or wait: a failure is the
    caller's (the agent records it). For tools and tests; the daemon's ``reboot`` strategy is the
    coordinator with :class:`LocalSlot`."""

    def __init__(self, host: Any) -> None:
        from updateagent.strategy.off import ReportOnlyStrategy

        self.host = host
        self._report = ReportOnlyStrategy()

    async def start(self) -> None:
        return None

    async def reboot_needed(self, request: RebootRequest) -> None:
        await self._report.reboot_needed(request)
        await self.host.reboot()

    async def boot_settled(self, outcome: str, version: str) -> None:
        await self._report.boot_settled(outcome, version)

    async def close(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {**self._report.describe(), "strategy": "reboot-now"}

    def status_text(self) -> str:
        return self._report.status_text()

    def subscribe(self, listener: StatusListener) -> None:
        self._report.subscribe(listener)
