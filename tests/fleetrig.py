"""Test helper: a fleet of emulated machines whose reboots the coordinator drives.

Every machine has its own GPT disk image and boot record, its own private dbus-daemon with a
stand-in logind on it (tests/logind_standin.py), and its own state directory; all share one
channel (published with ``updatectl release build``, served by tests/httpserver.py) and one
etcd group under the test's key prefix. An agent runs either in this process (``build_agent``
with a :class:`StepClock`, for tests that move time) or as its own ``update-agent`` process.
logind's ``Reboot`` power-cycles the machine: stop the agent, run the emulated bootloader on its
disk, start the agent again. :class:`HolderWatch` records the group's holder keys from an etcd
watch of its own, so tests judge by etcd and by logind's record, never by the agents' logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agentrig import _toml_value
from dbusbus import PrivateBus
from gptimg import MiB, make_disk
from httpserver import FileServer
from logind_standin import LogindStandin

from locksmith.etcd import Etcd, EtcdConfig
from locksmith.keys import Layout
from updateagent.agent import Agent, Phase
from updateagent.bootloader import EmulatedBootloader
from updateagent.checker import in_thread
from updateagent.config import load_settings
from updateagent.daemon import build_agent
from updateagent.release import keygen
from updateagent.strategy.coordinator import Coordinator, CoordState

VENV_BIN = Path(sys.executable).parent
NOW = datetime(2026, 11, 28, 1, 0, tzinfo=UTC)  # a Saturday


class StepClock:
    """A virtual clock: ``sleep`` returns once the test has advanced the clock far enough."""

    def __init__(self, now: datetime = NOW) -> None:
        self.current = now
        self._moved = asyncio.Event()

    def now(self) -> datetime:
        return self.current

    def monotonic(self) -> float:
        return self.current.timestamp()

    def sleep(self, seconds: float) -> Coroutine[Any, Any, None]:
        # The end is fixed when sleep() is called, not when the coroutine first runs: the test may
        # advance the clock in between, and a sleep must not then last longer than asked.
        return self._until(self.current + timedelta(seconds=max(seconds, 0.0)))

    async def _until(self, target: datetime) -> None:
        while self.current < target:
            await self._moved.wait()
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    def set(self, when: datetime) -> None:
        self.advance((when - self.current).total_seconds())


@dataclass
class HolderEvent:
    revision: int
    kind: str  # "put" | "delete"
    holder: str


@dataclass
class HolderWatch:
    """An independent watch of the group's holder keys, from the revision the test started at."""

    etcd: Etcd
    layout: Layout
    events: list[HolderEvent] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def start(self) -> HolderWatch:
        _, rev = await self.etcd.get_prefix(self.layout.holders)
        self._task = asyncio.create_task(self._run(rev + 1))
        return self

    async def _run(self, start: int) -> None:
        async for batch in self.etcd.watch_prefix(self.layout.holders, start_revision=start):
            for ev in batch.events:
                self.events.append(HolderEvent(ev.kv.mod_revision, ev.kind, ev.kv.key[len(self.layout.holders):]))
            self.changed.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def max_concurrent(self) -> int:
        held: set[str] = set()
        most = 0
        for ev in self.events:
            if ev.kind == "put":
                held.add(ev.holder)
            else:
                held.discard(ev.holder)
            most = max(most, len(held))
        return most

    def grants(self, holder: str) -> int:
        return sum(1 for ev in self.events if ev.kind == "put" and ev.holder == holder)

    def releases(self, holder: str) -> int:
        return sum(1 for ev in self.events if ev.kind == "delete" and ev.holder == holder)

    def holding(self) -> set[str]:
        held: set[str] = set()
        for ev in self.events:
            (held.add if ev.kind == "put" else held.discard)(ev.holder)
        return held

    async def wait(self, pred: Callable[[], bool], within: float = 60) -> None:
        async with asyncio.timeout(within):
            while not pred():
                self.changed.clear()
                if pred():
                    return
                await self.changed.wait()


class Machine:
    def __init__(self, fleet: Fleet, name: str, *, process: bool) -> None:
        self.fleet = fleet
        self.name = name
        self.process = process
        self.root = fleet.root / name
        self.root.mkdir(parents=True)
        self.disk = make_disk(self.root / "disk.img", slot_size=8 * MiB)
        self.record = self.root / "boot.json"
        self.state_dir = self.root / "state"
        self.pre_dir = self.root / "pre-reboot.d"
        self.post_dir = self.root / "post-boot.d"
        self.reboot_required = self.root / "run" / "reboot-required"
        self.reboot_required.parent.mkdir()
        self.log_path = self.root / "agent.log"
        self.bus = PrivateBus(self.root / "bus")
        self.logind: LogindStandin | None = None
        self.agent: Agent | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._runner: asyncio.Task[None] | None = None
        self.boots = 0
        self.reboot_hook: Callable[[Machine], Any] | None = None  # runs inside logind's Reboot, before the cycle
        self.overrides: dict[str, Any] = {}
        self.changed = asyncio.Event()  # an in-process agent's or coordinator's status changed
        self.env: dict[str, str] = {}  # extra environment of the agent process
        self.boot()

    # ---------------------------------------------------------------- machine

    def boot(self) -> None:
        EmulatedBootloader(self.disk.path, self.record).boot()
        self.boots += 1

    @property
    def machine_id(self) -> str:
        import hashlib

        return hashlib.sha256(str(self.disk.path.resolve()).encode()).hexdigest()[:32]

    def coordinator_record(self) -> dict[str, Any]:
        path = self.state_dir / "coordinator.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def agent_state(self) -> dict[str, Any]:
        path = self.state_dir / "state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def configure(self, **over: Any) -> None:
        """Config overrides (tables of keys; ``health`` a list of checks) for the next starts."""
        self.overrides = over

    def write_config(self) -> Path:
        over = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.overrides.items()}
        f = self.fleet
        reboot = {"strategy": f.strategy, "pre_reboot_dir": str(self.pre_dir), "post_boot_dir": str(self.post_dir),
                  "hook_timeout_seconds": 20, "reboot_required_file": str(self.reboot_required),
                  "coordinator_conf": str(self.root / "no-coordinator.conf"),
                  **over.pop("reboot", {})}
        health = over.pop("health", [{"command": ["true"]}])
        tables: dict[str, dict[str, Any]] = {
            "channel": {"server": f.server.base_url, "group": "stable", "keys": [str(f.keys.public_path)]},
            "disk": {"path": str(self.disk.path)},
            "state": {"dir": str(self.state_dir)},
            "host": {"kind": "emulated", "boot_record": str(self.record), "versions": {"A": "1.0.0"},
                     "reboot_via": "logind"},
            "dbus": {"address": self.bus.address},
            "check": {"on_start": self.process, "retry_initial_seconds": 300},
            "health": {"deadline_seconds": 0, "retry_interval_seconds": 0.1},
            "reboot": reboot,
            "locksmith": {"endpoints": list(f.etcd_config.endpoints), "group": f.group, "prefix": f.prefix,
                          "lease_ttl_seconds": 5},
            "metrics": {"enabled": False},
        }
        for key, value in over.items():
            tables.setdefault(key, {}).update(value)
        lines: list[str] = []
        for name, table in tables.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
            lines.append("")
        for spec in health:
            lines += ["[[health.check]]", *(f"{k} = {_toml_value(v)}" for k, v in spec.items()), ""]
        path = self.root / "config.toml"
        path.write_text("\n".join(lines))
        return path

    # ---------------------------------------------------------------- agent

    async def start(self) -> None:
        if self.logind is None:
            self.bus.start()
            self.logind = await LogindStandin(self.bus.address, self.power_cycle).start()
        config = self.write_config()
        if self.process:
            env = {**os.environ, "UPDATE_AGENT_BUS_ADDRESS": self.bus.address, "PYTHONUNBUFFERED": "1", **self.env}
            env.pop("NOTIFY_SOCKET", None)
            self.proc = await asyncio.to_thread(self._spawn, config, env)
            return
        settings = load_settings(config, update_conf_paths=(), env={})
        self.agent = build_agent(settings, clock=self.fleet.clock, run_check=in_thread)  # as the simulator
        self.agent.subscribe(lambda _s: self.changed.set(), lambda _e: self.changed.set())
        self.agent.reboot_strategy.subscribe(lambda _t: self.changed.set())
        self.changed.set()
        await self.agent.start()
        self._runner = asyncio.create_task(self.agent.run())

    def _spawn(self, config: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                [str(VENV_BIN / "update-agent"), "--config", str(config), "--update-conf", "/nonexistent",
                 "--log-level", "INFO"], stdout=log, stderr=log, env=env, stdin=subprocess.DEVNULL)

    async def stop(self) -> None:
        if self.proc is not None:
            proc, self.proc = self.proc, None
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 30)
            return
        if self.agent is not None:
            agent, self.agent = self.agent, None
            agent.stop()
            if self._runner is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(self._runner, 10)
            await agent.reboot_strategy.close()

    def kill(self) -> None:
        """SIGKILL the agent process: no clean-up of any kind."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    async def power_cycle(self) -> None:
        if self.reboot_hook is not None:
            await _maybe_await(self.reboot_hook(self))
        await self.stop()
        self.reboot_required.unlink(missing_ok=True)  # /run is a tmpfs
        self.boot()
        await self.start()

    async def close(self) -> None:
        await self.stop()
        if self.logind is not None:
            await self.logind.stop()
            self.logind = None
        self.bus.stop()

    @property
    def coordinator(self) -> Coordinator:
        assert self.agent is not None and isinstance(self.agent.reboot_strategy, Coordinator)
        return self.agent.reboot_strategy

    async def wait_for(self, pred: Callable[[Agent], bool], within: float = 60) -> None:
        """In-process agents: until ``pred(agent)`` holds, re-checked at every status change of the
        agent or its coordinator (across power cycles, which replace the agent)."""
        async with asyncio.timeout(within):
            while True:
                self.changed.clear()
                if self.agent is not None and pred(self.agent):
                    return
                await self.changed.wait()

    async def wait_state(self, state: CoordState, within: float = 60) -> None:
        await self.wait_for(lambda a: isinstance(a.reboot_strategy, Coordinator) and a.reboot_strategy.state is state,
                            within)

    async def wait_status(self, pred: Callable[[str], bool], within: float = 60) -> None:
        await self.wait_for(lambda a: pred(a.reboot_strategy.status_text()), within)

    async def wait_phase(self, phase: Phase, within: float = 60) -> None:
        await self.wait_for(lambda a: a.phase is phase, within)

    def reboots(self) -> int:
        return len(self.logind.calls) if self.logind else 0


async def poll_until(pred: Callable[[], Any], within: float = 60, every: float = 0.05) -> None:
    """Until ``await pred()`` (or ``pred()``) is true. Only for what sends no event: another
    process's files (no inotify here) and etcd state no watch of ours follows."""
    async with asyncio.timeout(within):
        while True:
            value = pred()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return
            await asyncio.sleep(every)


async def _maybe_await(value: Any) -> None:
    if asyncio.iscoroutine(value):
        await value


class Fleet:
    def __init__(self, root: Path, etcd_config: EtcdConfig, prefix: str, *, group: str = "prod",
                 strategy: str = "etcd-lock") -> None:
        self.root = root
        self.etcd_config = etcd_config
        self.prefix = prefix
        self.group = group
        self.strategy = strategy
        self.layout = Layout(group, prefix)
        self.clock = StepClock()
        self.keys = keygen(root / "keys")
        self.www = root / "www"
        (self.www / "stable").mkdir(parents=True)
        self.server = FileServer(self.www).start()
        self.machines: list[Machine] = []
        self.etcd: Etcd | None = None
        self.watch: HolderWatch | None = None

    async def open(self) -> Fleet:
        self.etcd = await Etcd.connect(self.etcd_config)
        self.watch = await HolderWatch(self.etcd, self.layout).start()
        return self

    def add(self, n: int = 1, *, process: bool = False) -> list[Machine]:
        new = [Machine(self, f"m{len(self.machines) + i}", process=process) for i in range(n)]
        self.machines += new
        return new

    def publish(self, version: str, size: int = 1 * MiB) -> None:
        """A release, built with the CLI operators use."""
        image = self.root / f"image-{version}.img"
        image.write_bytes(os.urandom(size // 2) + bytes(size - size // 2))
        subprocess.run([str(VENV_BIN / "updatectl"), "release", "build", str(image), "--channel-dir",
                        str(self.www / "stable"), "--version", version, "--key", str(self.keys.private_path)],
                       check=True, capture_output=True)

    async def policy(self, **fields: Any) -> None:
        """Store the group's policy (the etcd form) as ``locksmithctl policy apply`` would."""
        from locksmith.policy import policy_from_json
        from locksmith.policystore import apply_policy

        assert self.etcd is not None
        doc = {"format_version": 1, "group": self.group, **fields}
        await apply_policy(self.etcd, policy_from_json(doc, key="test"), prefix=self.prefix)

    async def close(self) -> None:
        for m in self.machines:
            with contextlib.suppress(Exception):
                await m.close()
        if self.watch is not None:
            await self.watch.stop()
        if self.etcd is not None:
            await self.etcd.close()
        self.server.stop()
