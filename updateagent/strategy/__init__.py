"""Reboot strategies: what happens between "an update is applied" and "the node runs it".

The agent calls two things and nothing else: ``reboot_needed(RebootRequest)`` when it enters
``UPDATED_NEED_REBOOT`` (again after a restart within the same boot) and ``boot_settled(outcome,
version)`` when its after-boot logic is done. ``start()`` and ``close()`` bracket an agent's life
(the daemon calls ``close()``). Strategies (Zincati keeps the same split):

- ``off`` (:mod:`.off`): report only; never reboot.
- ``reboot`` (:mod:`.immediate`): the coordinator with a local "slot" that is always free: hooks,
  logged-in users and the host's own window apply, no queue.
- ``etcd-lock`` (:mod:`.etcd_lock`): the coordinator with the group's etcd semaphore and policy.

The coordinator (:mod:`.coordinator`) is the common flow; a slot backend
(:class:`.coordinator.SlotBackend`) is the only part that differs per lock service, so a FleetLock
backend plugs in beside the etcd one. See docs/coordinator.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from locksmith.clock import SYSTEM_CLOCK, Clock
from locksmith.log import get_logger

if TYPE_CHECKING:
    from locksmith.etcd import Etcd
    from updateagent.config import AgentSettings
    from updateagent.host import Host

__all__ = ["RebootRequest", "RebootStrategy", "StatusListener", "build_reboot_strategy", "first_of", "tell"]


@dataclass(frozen=True)
class RebootRequest:
    reason: str  # "update" | "rollback" | "reboot-required"
    version: str  # the version the next boot should run ("" when nothing changes: reboot-required)
    slot: str


StatusListener = Callable[[str], None]


class RebootStrategy(Protocol):
    """The hook the reboot coordinator plugs into. Called by the agent; never blocks it for long."""

    async def start(self) -> None:
        """The agent loaded its state. A coordinator resumes what it persisted (in the background)."""
        ...

    async def reboot_needed(self, request: RebootRequest) -> None: ...

    async def boot_settled(self, outcome: str, version: str) -> None:
        """After-boot logic finished with ``outcome`` (see ``AgentState.last_boot_outcome``)."""
        ...

    async def close(self) -> None: ...

    def describe(self) -> dict[str, Any]:
        """The strategy's status as one JSON-able document (D-Bus, updatectl, metrics)."""
        ...

    def status_text(self) -> str:
        """One line a person reads ("queued: 3rd of 7 in group prod"); sd_notify STATUS=."""
        ...

    def subscribe(self, listener: StatusListener) -> None:
        """Call ``listener(status_text)`` whenever the status text may have changed."""
        ...


def coordinator_state_path(state_dir: Path) -> Path:
    return state_dir / "coordinator.json"


def build_reboot_strategy(settings: AgentSettings, host: Host, *, clock: Clock = SYSTEM_CLOCK,
                          etcd: Etcd | None = None) -> RebootStrategy:
    """The strategy the settings name, wired with ``host`` and ``clock`` (the simulator passes a
    virtual one). Nothing connects here: a coordinator reaches etcd from its own task, on its own
    connection unless ``etcd`` is given (an open client the caller owns and closes: the simulator
    runs many hosts on a few connections; each host still has its own lease and keys)."""
    strategy = settings.reboot.strategy
    if strategy == "off":
        from updateagent.strategy.off import ReportOnlyStrategy

        return ReportOnlyStrategy()
    from updateagent.strategy.coordinator import Coordinator, CoordinatorOptions

    options = CoordinatorOptions.from_settings(settings)
    if strategy == "reboot":
        from updateagent.strategy.immediate import LocalSlot

        backend: Any = LocalSlot(clock=clock)
    elif strategy == "etcd-lock":
        from updateagent.strategy.etcd_lock import EtcdSlot

        backend = EtcdSlot(settings.locksmith, local_window=settings.reboot.local_window, clock=clock, etcd=etcd)
    elif strategy == "fleetlock":
        try:
            from updateagent.strategy.fleetlock import build_fleetlock_backend  # type: ignore[attr-defined]
        except ImportError:
            from updateagent.config import ConfigError

            raise ConfigError("reboot strategy 'fleetlock' is not in this version") from None
        backend = build_fleetlock_backend(settings, clock=clock)
    else:  # config validation refuses other names
        raise ValueError(f"unknown reboot strategy {strategy!r}")
    return Coordinator(backend, host, options, state_path=coordinator_state_path(settings.state_dir), clock=clock)


def tell(listeners: Iterable[StatusListener], text: str) -> None:
    """Hand a status line to every listener: one that raises is logged, and the rest still hear it."""
    for listener in list(listeners):
        try:
            listener(text)
        except Exception as exc:
            get_logger("updateagent.strategy").error("status_listener_failed", error=str(exc))


async def first_of(waits: set[asyncio.Future[Any]]) -> None:
    """Wait until one of ``waits`` is done, then cancel and reap the rest, so no task is left
    pending for the garbage collector to complain about."""
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
