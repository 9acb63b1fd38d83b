"""A simulated host: the production agent (``updateagent.daemon.build_agent``) on its own disk
image, with an emulated power cycle.

``SimMachine`` is an ``EmulatedHost`` whose ``reboot()`` does what pressing reset does to a real
machine: the running agent is gone, the machine is down for a drawn reboot duration (virtual
time), then the emulated bootloader picks a slot (GRUB gptprio on the host's GPT) and a fresh
agent starts. The power state it reports is the emulated hardware's, not any agent's claim: the
independent watcher counts hosts down from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from locksmith.log import get_logger
from rollout.clock import VirtualClock
from updateagent.bootloader import read_boot_record
from updateagent.host import EmulatedHost

log = get_logger("rollout.fleet")

Power = Literal["off", "up", "down", "dead"]


class PowerObserver(Protocol):
    def power_changed(self, host: SimHost, power: Power) -> None: ...

    def host_event(self, host: SimHost, name: str, **details: Any) -> None: ...

    def touch(self) -> None:
        """Anything else happened on a host (the simulator's parked test looks again)."""


class SimMachine(EmulatedHost):
    """An EmulatedHost whose reboot is a request to the host's power loop."""

    def __init__(self, disk: Path, boot_record: Path, machine_id_file: Path) -> None:
        super().__init__(disk, boot_record, machine_id_file=machine_id_file)
        self.reset_pressed = asyncio.Event()

    async def reboot(self) -> None:
        # logind's Reboot returns before the machine goes down; the power loop takes it down.
        self.reset_pressed.set()
        await asyncio.sleep(0)


def _toml_char(c: str) -> str:
    """``c`` inside a TOML basic string: a credential may hold any character."""
    if c in '"\\':
        return "\\" + c
    return c if c.isprintable() or ord(c) > 0xFFFF else f"\\u{ord(c):04x}"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def render_toml(tables: dict[str, dict[str, Any]], arrays: dict[str, list[dict[str, Any]]]) -> str:
    lines: list[str] = []
    for name, keys in tables.items():
        lines += [f"[{name}]", *(f"{k} = {toml_value(v)}" for k, v in keys.items()), ""]
    for name, entries in arrays.items():
        for entry in entries:
            lines += [f"[[{name}]]", *(f"{k} = {toml_value(v)}" for k, v in entry.items()), ""]
    return "\n".join(lines)


@dataclass
class Timeline:
    """What happened to one host, in virtual seconds since the start (None: did not happen)."""

    applied: float | None = None        # the update is in slot B, reboot needed
    waiting_window: float | None = None  # first time the coordinator waited for a window
    queued: float | None = None          # first time it queued for a slot
    granted: float | None = None         # holder key created (watcher)
    down: float | None = None            # power off (first reboot)
    up: float | None = None              # power on after the first reboot
    healthy: float | None = None         # agent's verdict: the new slot is good
    failed: float | None = None          # health check failed / rolled back
    released: float | None = None        # holder key deleted (watcher)
    reboots: int = 0
    failed_settled: bool = False         # the agent reported the rollback done (boot_outcome rolled_back)
    booted_new: bool = False             # the bootloader ever picked the new slot
    events: list[tuple[float, str]] = field(default_factory=list)


StrategyFactory = Callable[["SimHost"], Any]


class SimHost:
    """One machine of the fleet. ``run()`` is its life: boots, agents, power cycles."""

    def __init__(
        self, *, index: int, name: str, machine_id: str, group: str, root: Path, config: Path,
        clock: VirtualClock, observer: PowerObserver, reboot_duration: Callable[[], float],
        make_strategy: StrategyFactory | None, never_returns: bool = False,
    ) -> None:
        self.index = index
        self.name = name
        self.machine_id = machine_id
        self.group = group
        self.root = root
        self.config = config
        self.clock = clock
        self.observer = observer
        self.reboot_duration = reboot_duration
        self.make_strategy = make_strategy
        self.never_returns = never_returns
        self.machine = SimMachine(root / "disk.img", root / "boot.json", root / "machine-id")
        self.power: Power = "up"
        self.agent: Any = None
        self.strategy: Any = None
        self.timeline = Timeline()
        self.kill_requested = asyncio.Event()
        self.agent_kills = 0
        self._settings: Any = None
        self.kured_phase = 0.0
        self.boot_delay = 0.0
        self._booting = True  # powering on: the bootloader runs, the agent is not started yet
        self.coordinator_state = ""

    @property
    def booting(self) -> bool:
        return self._booting

    @booting.setter
    def booting(self, value: bool) -> None:
        self._booting = value
        self.observer.touch()

    # -- facts from the emulated hardware --------------------------------------------------------

    def booted_slot(self) -> str | None:
        try:
            return read_boot_record(self.machine.boot_record).slot
        except Exception:
            return None

    def parked(self) -> bool:
        """True when nothing on this host happens before a timer fires or another host moves."""
        if self.booting:
            return False
        if self.power != "up":
            return True
        agent = self.agent
        if agent is None or not agent.settled():
            return False
        parked = getattr(self.strategy, "sim_parked", None)
        return True if parked is None else bool(parked())

    # -- life --------------------------------------------------------------------------------------

    def settings(self) -> Any:
        if self._settings is None:
            from updateagent.config import load_settings

            self._settings = load_settings(self.config, update_conf_paths=(), env={})
        return self._settings

    async def run(self) -> None:
        from updateagent.checker import in_thread
        from updateagent.daemon import build_agent

        if self.boot_delay > 0:  # the fleet does not come up at one instant
            self.power = "off"
            self.booting = False
            await self.clock.sleep(self.boot_delay)
            self.booting = True
            self.power = "up"
        await asyncio.to_thread(self.machine.power_cycle)  # power on: slot A
        while True:
            strategy = self.make_strategy(self) if self.make_strategy is not None else None
            agent = build_agent(self.settings(), host=self.machine, clock=self.clock, reboot_strategy=strategy,
                                run_check=in_thread)  # a process per check is no way to run 1,000 hosts
            self.agent = agent
            self.strategy = strategy if strategy is not None else agent.reboot_strategy
            agent.subscribe(on_status=lambda _status: self.observer.touch(), on_event=self._on_agent_event)
            self.booting = False
            subscribe = getattr(self.strategy, "subscribe", None)
            if subscribe is not None and hasattr(self.strategy, "state"):
                subscribe(self._on_coordinator_status)
            started = getattr(self.strategy, "daemon_started", None)
            if started is not None:
                await started()
            await agent.start()
            runner = asyncio.ensure_future(agent.run())
            reset = asyncio.ensure_future(self.machine.reset_pressed.wait())
            kill = asyncio.ensure_future(self.kill_requested.wait())
            try:
                await asyncio.wait({runner, reset, kill}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                killed = kill.done()
                rebooting = reset.done()
                for t in (reset, kill):
                    t.cancel()
                agent.stop()
                if killed and not rebooting:
                    runner.cancel()  # SIGKILL: no orderly end of the tick
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(runner, 10)
                await self._close_strategy()
                self.agent = None
            if runner.done() and not runner.cancelled() and runner.exception() is not None:
                self.event("agent_crashed", error=str(runner.exception()))
                raise runner.exception()  # type: ignore[misc]
            if killed and not rebooting:
                self.kill_requested.clear()
                self.agent_kills += 1
                self.event("agent_killed")
                continue  # systemd restarts it within the same boot
            self.machine.reset_pressed.clear()
            self._power("down")
            if self.never_returns:
                self._power("dead")
                return
            await self.clock.sleep(self.reboot_duration())
            # Powering on: from here the host works in real time (the bootloader, then the agent).
            self.booting = True
            await asyncio.to_thread(self.machine.power_cycle)
            if self.booted_slot() == "B":
                self.timeline.booted_new = True
            self._power("up")

    async def _close_strategy(self) -> None:
        for name in ("aclose", "close"):
            closer = getattr(self.strategy, name, None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    result = closer()
                    if asyncio.iscoroutine(result):
                        await asyncio.wait_for(result, 10)
                break
        self.strategy = None

    def _power(self, power: Power) -> None:
        self.power = power
        now = self.clock.elapsed()
        tl = self.timeline
        if power == "down":
            tl.reboots += 1
            if tl.down is None:
                tl.down = now
        elif power == "up" and tl.down is not None and tl.up is None:
            tl.up = now
        self.observer.power_changed(self, power)

    def event(self, name: str, **details: Any) -> None:
        self.timeline.events.append((self.clock.elapsed(), name))
        self.observer.host_event(self, name, **details)

    def _on_coordinator_status(self, text: str) -> None:
        self.observer.touch()
        state = getattr(getattr(self.strategy, "state", None), "value", "")
        tl = self.timeline
        if state == "waiting_for_window" and tl.waiting_window is None:
            tl.waiting_window = self.clock.elapsed()
        elif state == "queued" and tl.queued is None:
            tl.queued = self.clock.elapsed()
        if state != self.coordinator_state:
            self.coordinator_state = state
            self.timeline.events.append((self.clock.elapsed(), f"coordinator:{state}"))

    def _on_agent_event(self, ev: Any) -> None:
        now = self.clock.elapsed()
        tl = self.timeline
        if ev.event == "update_applied" and tl.applied is None:
            tl.applied = now
        elif ev.event == "boot_outcome":
            outcome = ev.details.get("outcome")
            if outcome == "success" and self.booted_slot() == "B" and tl.healthy is None:
                tl.healthy = now
            elif outcome in ("health_check_failed", "rolled_back") and tl.failed is None:
                tl.failed = now
            if outcome == "rolled_back":
                tl.failed_settled = True
        self.observer.host_event(self, ev.event, **ev.details)


def draw_durations(spec: tuple[str, tuple[float, ...]], rng: random.Random) -> Callable[[], float]:
    """A sampler for a reboot-duration distribution (see ``parse_distribution``)."""
    kind, args = spec
    if kind == "fixed":
        return lambda: args[0]
    if kind == "uniform":
        return lambda: rng.uniform(args[0], args[1])
    if kind == "normal":
        return lambda: max(args[0] * 0.1, rng.gauss(args[0], args[1]))
    if kind == "lognormal":
        import math

        return lambda: args[0] * math.exp(rng.gauss(0.0, args[1]))
    raise ValueError(f"unknown distribution {kind!r}")
