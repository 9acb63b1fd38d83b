"""Models of two other coordinators' waiting behaviour, for side-by-side runs. They are MODELS:
the documented timing of those tools, plugged into the same agent, fleet and etcd as ours, on the
same semaphore keys (so the independent watcher counts them the same way). They are not those
tools, and the report labels them so.

- ``locksmith-model`` (CoreOS locksmithd): once the update is applied, wait for the (local)
  reboot window, then try the lock; a refused attempt is retried after 10, 20, 40, 80 and 160 s,
  then every 5 minutes. Got it: reboot at once. The slot is given back as soon as the daemon
  starts after the boot, before any health check; there is no failure budget.
- ``kured-model`` (Kubernetes kured): once per period (1 h by default) a host that needs a
  reboot checks the window and tries the one lock record; got it: reboot; the lock is released
  when the daemon starts after the boot. No health gate, no budget.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from locksmith.errors import LocksmithError, SlotUnavailableError
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.log import get_logger
from locksmith.policy import Policy
from locksmith.semaphore import Semaphore
from rollout.clock import VirtualClock
from updateagent.agent import RebootRequest
from updateagent.host import Host

log = get_logger("rollout.models")

LOCKSMITH_BACKOFF = (10.0, 20.0, 40.0, 80.0, 160.0)
LOCKSMITH_STEADY = 300.0
KURED_PERIOD = 3600.0


@dataclass(frozen=True)
class ModelContext:
    etcd: EtcdConfig
    group: str
    prefix: str
    policy: Policy
    holder_id: str
    host: Host
    clock: VirtualClock
    shared: Etcd | None = None  # the fleet's connection (owned by the simulation), else one per life
    touch: Callable[[], None] | None = None  # tells the simulator's parked test that it woke


class _ModelStrategy:
    """The shared part: an etcd connection and a semaphore per agent life, a waiting task."""

    label = "model"

    def __init__(self, ctx: ModelContext) -> None:
        self.ctx = ctx
        self._etcd: Etcd | None = None
        self._sem: Semaphore | None = None
        self._task: asyncio.Task[None] | None = None
        self._sleeping = False
        self.attempts = 0

    def sim_parked(self) -> bool:
        return self._task is None or self._task.done() or self._sleeping

    async def _semaphore(self) -> Semaphore:
        if self._sem is None:
            etcd = self.ctx.shared
            if etcd is None:
                etcd = self._etcd = await Etcd.connect(self.ctx.etcd)
            self._sem = Semaphore(etcd, self.ctx.group, prefix=self.ctx.prefix, clock=self.ctx.clock)
        return self._sem

    async def _sleep(self, seconds: float) -> None:
        self._sleeping = True
        try:
            await self.ctx.clock.sleep(seconds)
        finally:
            self._sleeping = False
            if self.ctx.touch is not None:
                self.ctx.touch()

    async def _wait_for_window(self) -> None:
        windows = self.ctx.policy.window_set()
        while not windows.is_open(self.ctx.clock.now()):
            nxt = windows.next_open(self.ctx.clock.now())
            if nxt is None:
                await self._sleep(3600)
                continue
            await self._sleep(max((nxt - self.ctx.clock.now()).total_seconds(), 1.0))

    async def _try(self) -> bool:
        self.attempts += 1
        sem = await self._semaphore()
        try:
            await sem.try_lock(self.ctx.holder_id, reason=f"{self.label}: reboot",
                               hold_for=timedelta(seconds=self.ctx.policy.reboot_timeout.total_seconds()))
        except SlotUnavailableError:
            return False
        return True

    async def start(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.label, "attempts": self.attempts}

    def status_text(self) -> str:
        return f"{self.label}: {self.attempts} lock attempt(s)"

    def subscribe(self, listener: Any) -> None:
        return None

    async def daemon_started(self) -> None:
        """After the boot, before any health check: give the slot back (both tools do)."""
        with contextlib.suppress(LocksmithError):
            sem = await self._semaphore()
            await sem.unlock(self.ctx.holder_id)

    async def reboot_needed(self, request: RebootRequest) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"{self.label}-{self.ctx.holder_id}")

    async def boot_settled(self, outcome: str, version: str) -> None:
        return None

    async def _run(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._sem is not None:
            with contextlib.suppress(Exception):
                await self._sem.close()
        if self._etcd is not None:
            with contextlib.suppress(Exception):
                await self._etcd.close()


class LocksmithModel(_ModelStrategy):
    label = "locksmith-model"

    async def _run(self) -> None:
        tries = 0
        while True:
            await self._wait_for_window()
            try:
                if await self._try():
                    break
            except LocksmithError as exc:
                log.warning("model_lock_failed", model=self.label, error=str(exc))
            delay = LOCKSMITH_BACKOFF[tries] if tries < len(LOCKSMITH_BACKOFF) else LOCKSMITH_STEADY
            tries += 1
            await self._sleep(delay)
        await self.ctx.host.reboot()


class KuredModel(_ModelStrategy):
    label = "kured-model"

    def __init__(self, ctx: ModelContext, period: float = KURED_PERIOD, phase: float = 0.0) -> None:
        super().__init__(ctx)
        self.period = period
        self.phase = phase  # each host's first check falls somewhere in its first period

    async def _run(self) -> None:
        await self._sleep(self.phase)
        while True:
            if self.ctx.policy.window_set().is_open(self.ctx.clock.now()):
                try:
                    if await self._try():
                        break
                except LocksmithError as exc:
                    log.warning("model_lock_failed", model=self.label, error=str(exc))
            await self._sleep(self.period)
        await self.ctx.host.reboot()
