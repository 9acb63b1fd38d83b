"""One simulated rollout, start to report: etcd, the channel, the fleet, the clock, the watcher.

``run_scenario(scenario)`` (async) or ``simulate(scenario)`` returns a :class:`rollout.report.Report`.
Nothing of the agent or the coordinator is re-implemented: every host is
``updateagent.daemon.build_agent`` with the settings a real host would have (its TOML file goes
through ``updateagent.config.load_settings``), and the coordinator is the one those settings name.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import shutil
import signal
import ssl
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from locksmith.embedded import EmbeddedEtcd
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.history import Recording, start_recording, stop_and_check, stop_recording
from locksmith.log import get_logger
from locksmith.policy import Policy
from locksmith.policystore import apply_policy
from rollout import channel, disk
from rollout.clock import Pacer, VirtualClock
from rollout.fleet import SimHost, draw_durations, render_toml
from rollout.models import KuredModel, LocksmithModel, ModelContext
from rollout.report import HostRow, Report, build_report
from rollout.watch import Watcher

log = get_logger("rollout.engine")

COORDINATORS = ("ours", "locksmith-model", "kured-model")
RELEASES = ("good", "bad", "flaky")
FAULTS = ("member-kill", "agent-kill", "never-returns")
DEFAULT_START = datetime(2026, 3, 23, 12, 0, tzinfo=UTC)  # a Monday noon UTC
SAFETY_POLL = 3600.0  # virtual seconds between the coordinator's safety-net re-checks
WRITE_METHODS = ("Put", "DeleteRange", "Txn", "LeaseGrant", "LeaseRevoke")


@dataclass(frozen=True)
class Scenario:
    """Everything that defines a run. The same scenario and seed give the same decisions."""

    hosts: int = 20
    policies: tuple[Policy, ...] = ()
    release: str = "good"
    flaky_fraction: float = 0.25
    reboot_duration: tuple[str, tuple[float, ...]] = ("uniform", (180.0, 300.0))
    faults: frozenset[str] = frozenset()
    seed: int = 1
    members: int = 1
    endpoints: tuple[str, ...] = ()
    # An existing etcd with its TLS files and credentials; wins over ``endpoints``. Every client
    # the run makes (hosts' agents, watcher, recorder, models, metrics reader) uses all of it.
    etcd: EtcdConfig | None = field(default=None, repr=False)  # it may hold a password
    coordinator: str = "ours"
    rate: float = 10.0
    start: datetime = DEFAULT_START
    horizon: float = 14 * 86400.0
    check_interval_minutes: float = 240.0
    kured_period: float = 3600.0
    boot_spread: float = 60.0  # virtual seconds: hosts power on at seeded instants within this span
    quantum: float = 1.0  # virtual seconds: timers this close together fire in one jump
    settle: float = 0.004
    workdir: Path | None = None
    label: str = ""


def default_policy() -> Policy:
    return Policy(group="sim", slots=3, failure_budget=1, reboot_timeout=timedelta(minutes=30))


class Progress:
    """A one-line bar on stderr: hosts done, virtual time, real time. Redrawn in place on a TTY."""

    def __init__(self, out: TextIO | None, total: int, clock: VirtualClock, label: str) -> None:
        self.out = out
        self.total = total
        self.clock = clock
        self.label = label
        self.t0 = time.monotonic()
        self.tty = bool(out is not None and out.isatty())
        self._last = 0.0

    def show(self, done: int, final: bool = False) -> None:
        if self.out is None:
            return
        now = time.monotonic()
        if not final and now - self._last < (0.2 if self.tty else 5.0):
            return
        self._last = now
        width = 24
        filled = int(width * done / max(self.total, 1))
        vt = self.clock.now()
        line = (f"{self.label}[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} hosts done  "
                f"virtual {vt:%a %d %b %H:%M} UTC (+{_span(self.clock.elapsed())})  real {now - self.t0:5.1f}s")
        self.out.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        if final and self.tty:
            self.out.write("\n")
        self.out.flush()


def _span(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m = s // 60
    return f"{d}d{h:02d}h{m:02d}m" if d else f"{h}h{m:02d}m"


def _metrics_tls(cfg: EtcdConfig) -> ssl.SSLContext | None:
    """The TLS context for an existing etcd's /metrics (served on its client URLs): its CA, and our
    client certificate when etcd asks for one. None when it cannot be built: then no numbers."""
    try:
        ctx = ssl.create_default_context(cafile=cfg.cafile)
        if cfg.certfile:
            ctx.load_cert_chain(cfg.certfile, cfg.keyfile)
    except (OSError, ValueError):
        return None
    return ctx


def _etcd_writes(urls: list[str], tls: ssl.SSLContext | None = None) -> float:
    """Write RPCs etcd handled, summed over the members that answer /metrics."""
    total = 0.0
    for url in urls:
        try:
            with urllib.request.urlopen(f"{url}/metrics", timeout=5,
                                        context=tls if url.startswith("https:") else None) as r:
                text = r.read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("grpc_server_handled_total{") and any(
                    f'grpc_method="{m}"' in line for m in WRITE_METHODS):
                with contextlib.suppress(ValueError):
                    total += float(line.rpartition(" ")[2])
    return total


class Simulation:
    def __init__(self, scenario: Scenario, *, progress: TextIO | None = None) -> None:
        sc = scenario
        if sc.coordinator not in COORDINATORS:
            raise ValueError(f"unknown coordinator {sc.coordinator!r}")
        if sc.release not in RELEASES:
            raise ValueError(f"unknown release {sc.release!r}")
        self.sc = sc
        self.policies = sc.policies or (default_policy(),)
        self.rng = random.Random(sc.seed)
        self.progress_out = progress
        self.prefix = f"locksmith-sim/{sc.seed}-{sc.coordinator}-{int(time.time() * 1000) % 10**9}/"
        self.clock = VirtualClock(sc.start, rate=sc.rate)
        self.hosts: list[SimHost] = []
        self.watcher: Watcher | None = None
        self.server: EmbeddedEtcd | None = None
        self.events: list[tuple[float, str, str]] = []  # (virtual, host, event)
        self.member_killed_at: float | None = None
        self._downs = 0
        self._finished = False
        self._blocker: SimHost | None = None
        self._fleet_etcd: Etcd | None = None
        self._activity = 0
        self._pacer: Pacer | None = None
        self._by_name: dict[str, SimHost] = {}
        self._flaky: set[str] = set()
        self._live: list[SimHost] = []
        self._third_rebooted = asyncio.Event()

    # -- PowerObserver -------------------------------------------------------------------------------

    def touch(self) -> None:
        """Something happened on a host (see ``Pacer.activity``)."""
        self._activity += 1

    def _activity_mark(self) -> object:
        assert self.watcher is not None
        return (self._activity, self.clock.fired, self.watcher.last_event_real)

    def power_changed(self, host: SimHost, power: str) -> None:
        assert self.watcher is not None
        self.touch()
        if power == "down":
            self._downs += 1
            if self._downs >= max(1, len(self.hosts) // 3):
                self._third_rebooted.set()
        self.watcher.power(host.name, host.group, power)
        self.events.append((self.clock.elapsed(), host.name, f"power_{power}"))

    def host_event(self, host: SimHost, name: str, **details: Any) -> None:
        self.touch()
        if name in ("update_applied", "boot_outcome", "agent_killed", "error"):
            self.events.append((self.clock.elapsed(), host.name, name))

    # -- wiring ---------------------------------------------------------------------------------------

    def _external(self) -> EtcdConfig | None:
        if self.sc.etcd is not None:
            return self.sc.etcd
        return EtcdConfig(endpoints=self.sc.endpoints) if self.sc.endpoints else None

    def _etcd_config(self) -> EtcdConfig:
        external = self._external()
        if external is not None:
            return external
        assert self.server is not None
        return self.server.config()

    def _etcd_writes(self) -> float:
        external = self._external()
        if external is None:
            assert self.server is not None
            return _etcd_writes([m.http_url for m in self.server.members if m.running])
        urls = [e if "://" in e else f"http://{e}" for e in external.endpoints]
        return _etcd_writes(urls, _metrics_tls(external) if any(u.startswith("https:") for u in urls) else None)

    def _stored_policy(self, policy: Policy) -> Policy:
        """What goes to etcd. A cooldown is an etcd lease (etcd's clock, real seconds), so the
        simulator stores cooldown / rate: while a slot cools down the fleet is never parked, time
        flows at ``rate`` and the cooldown lasts its virtual length."""
        if policy.cooldown.total_seconds() <= 0:
            return policy
        real = max(1, math.ceil(policy.cooldown.total_seconds() / self.sc.rate))
        return replace(policy, cooldown=timedelta(seconds=real))

    def _write_host(self, root: Path, name: str, machine_id: str, group: str, base_url: str, pubkey: Path,
                    template: Path) -> Path:
        root.mkdir(parents=True)
        (root / "state").mkdir()
        disk.clone(template, root / "disk.img")
        (root / "machine-id").write_text(machine_id + "\n")
        strategy = "etcd-lock" if self.sc.coordinator == "ours" else "off"
        tables: dict[str, dict[str, Any]] = {
            "channel": {"server": base_url, "group": channel.CHANNEL_GROUP, "keys": [str(pubkey)]},
            "disk": {"path": str(root / "disk.img")},
            "state": {"dir": str(root / "state")},
            "host": {"kind": "emulated", "boot_record": str(root / "boot.json"),
                     "machine_id_file": str(root / "machine-id"), "versions": {"A": channel.OLD_VERSION}},
            "check": {"on_start": True, "interval_minutes": self.sc.check_interval_minutes, "jitter": 0.1,
                      "retry_initial_seconds": 60},
            "health": {"deadline_seconds": 0, "retry_interval_seconds": 0.1},
            "metrics": {"enabled": False},
            "reboot": {"strategy": strategy, "pre_reboot_dir": str(root / "pre-reboot.d"),
                       "post_boot_dir": str(root / "post-boot.d"),
                       "reboot_required_file": str(root / "reboot-required")},
        }
        if strategy == "etcd-lock":
            cfg = self._etcd_config()
            tables["locksmith"] = {"endpoints": list(cfg.endpoints), "group": group, "prefix": self.prefix,
                                   **{k: str(Path(v).absolute()) for k in ("cafile", "certfile", "keyfile")
                                      if (v := getattr(cfg, k)) is not None},
                                   **{k: v for k in ("username", "password") if (v := getattr(cfg, k)) is not None}}
        arrays = {"health.check": [{"url": f"{base_url}/health/{name}"}]}
        path = root / "config.toml"
        path.touch(mode=0o600)  # before the text: it may hold the etcd password (kept with --workdir)
        path.write_text(render_toml(tables, arrays))
        return path

    def _verdict(self, name: str) -> bool:
        host = self._by_name.get(name)
        if host is None or host.booted_slot() != "B":
            return True
        if self.sc.release == "bad":
            return False
        if self.sc.release == "flaky":
            return name not in self._flaky
        return True

    def _strategy_factory(self) -> Callable[[SimHost], Any] | None:
        if self.sc.coordinator == "ours":
            from updateagent.strategy import build_reboot_strategy

            def ours(host: SimHost) -> Any:
                strategy = build_reboot_strategy(host.settings(), host.machine, clock=self.clock,
                                                 etcd=self._fleet_etcd)
                # Nothing in the simulation writes /run/reboot-required: no need to poll for it.
                options = getattr(strategy, "options", None)
                if options is not None and hasattr(options, "reboot_required_file"):
                    changes: dict[str, Any] = {"reboot_required_file": None}
                    # The coordinator's safety-net re-checks (every minute while waiting for a
                    # window, 30 s while queued) would wake every host once a virtual minute;
                    # what they guard against arrives by watch and exact deadlines anyway.
                    for name in ("window_poll", "queue_poll"):
                        if hasattr(options, name):
                            changes[name] = SAFETY_POLL
                    strategy.options = replace(options, **changes)
                # Likewise the status's place in the line (read live by the report anyway).
                backend = getattr(strategy, "backend", None)
                if backend is not None and hasattr(backend, "position_refresh"):
                    backend.position_refresh = math.inf
                return strategy

            return ours
        cfg = self._etcd_config()
        by_group = {p.group: p for p in self.policies}

        def model(host: SimHost) -> Any:
            ctx = ModelContext(cfg, host.group, self.prefix, by_group[host.group], host.machine_id, host.machine,
                               self.clock, shared=self._fleet_etcd, touch=self.touch)
            if self.sc.coordinator == "locksmith-model":
                return LocksmithModel(ctx)
            return KuredModel(ctx, period=self.sc.kured_period, phase=host.kured_phase)

        return model

    # -- the parked test ------------------------------------------------------------------------------

    def _strategy_parked(self, host: SimHost) -> bool:
        """The coordinator waits on a timer or on other hosts, and the watcher has already seen
        what it last wrote (so no write of it is still on its way to the other hosts)."""
        strategy = host.strategy
        parked = getattr(strategy, "sim_parked", None)
        if parked is not None:
            return bool(parked())
        state = getattr(strategy, "state", None)
        if state is None:
            return True
        assert self.watcher is not None
        view = self.watcher.groups[host.group]
        holds = host.machine_id in view.holders
        queued = host.machine_id in view.queue
        value = getattr(state, "value", str(state))
        if value in ("idle", "waiting_for_window"):
            return not holds and not queued
        if value == "failed":
            return holds == bool(getattr(getattr(strategy, "rec", None), "keeps_slot", False)) and not queued
        if value == "queued":
            return queued and not holds and self.watcher.free_slots(host.group) <= 0
        return False

    def _parked(self) -> bool:
        assert self.watcher is not None
        if self._finished:
            return False  # nothing left to wait for: do not run time on
        if time.monotonic() - self.watcher.last_event_real < self.sc.settle:
            return False
        for group in self.watcher.groups:
            if self.watcher.cooling(group):
                return False
        # The host that was busy last time is likely busy still: look at it first.
        blocker = self._blocker
        if blocker is not None and not self._host_parked(blocker):
            return False
        for h in self._live:
            if not self._host_parked(h):
                self._blocker = h
                return False
        self._blocker = None
        if all(self.host_done(h) for h in self.hosts):
            self._finished = True  # the rollout is over: no jump past its end
            return False
        return True

    def _host_parked(self, h: SimHost) -> bool:
        return h.parked() and (h.power != "up" or self._strategy_parked(h))

    # -- outcome per host -------------------------------------------------------------------------

    def host_done(self, host: SimHost) -> bool:
        assert self.watcher is not None
        if host.power == "dead":
            return True
        if host.power != "up":
            return False
        tl = host.timeline
        if tl.failed is not None and tl.reboots >= 2 and host.booted_slot() == "A":
            # Rolled back; with on_timeout = hold it keeps its slot on purpose.
            view = self.watcher.groups[host.group]
            return tl.failed_settled and (view.policy.on_timeout == "hold" or host.machine_id not in view.holders)
        if host.machine_id in self.watcher.groups[host.group].holders:
            return False
        return tl.healthy is not None

    def _blocked(self, host: SimHost) -> bool:
        assert self.watcher is not None
        return self.watcher.groups[host.group].paused and host.power == "up" and \
            host.machine_id not in self.watcher.groups[host.group].holders

    # -- the run ------------------------------------------------------------------------------------

    async def run(self) -> Report:
        sc = self.sc
        own_dir = sc.workdir is None
        # The hosts' disks and state files: in memory when /dev/shm is there. The agents fsync
        # every state change, as they must; on a real disk that would cost the fleet real time.
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        root = Path(tempfile.mkdtemp(prefix="locksmith-sim-", dir=base)) if own_dir else sc.workdir
        assert root is not None
        root.mkdir(parents=True, exist_ok=True)
        server: channel.ChannelServer | None = None
        tasks: list[asyncio.Task[Any]] = []
        etcd: Etcd | None = None
        recording: Recording | None = None
        t_real0 = time.monotonic()
        try:
            if self._external() is None:
                self.server = await asyncio.to_thread(EmbeddedEtcd(sc.members).start)
            # etcd first: a wrong CA, certificate or password fails before the release is built.
            etcd = await Etcd.connect(self._etcd_config())
            # The hosts' connection, apart from the watcher's: hosts share it (and with it one
            # watch of their group), each with its own lease, keys and policy reader.
            self._fleet_etcd = await Etcd.connect(self._etcd_config())
            pubkey = await asyncio.to_thread(channel.publish_release, root)
            server = channel.ChannelServer(root / "www", self._verdict).start()
            template = await asyncio.to_thread(disk.make_template, root / "template.img")
            for p in self.policies:
                await apply_policy(etcd, self._stored_policy(p), prefix=self.prefix,
                                   reason="simulation")
            groups = {p.group or "sim": p for p in self.policies}
            self.watcher = Watcher(etcd, groups, self.prefix, self.clock)
            await self.watcher.start()
            # etcd's own history of the groups' keys, checked afterwards against every rule of the
            # semaphore (locksmith.history): holders vs max, FIFO, pause, cooldown, holder leases.
            recording = await start_recording(self._etcd_config(), list(groups), prefix=self.prefix)
            durations = draw_durations(sc.reboot_duration, self.rng)
            names = [f"h{i:03d}" for i in range(sc.hosts)]
            group_names = list(groups)
            never = self.rng.choice(names) if "never-returns" in sc.faults else None
            self._flaky = set(self.rng.sample(names, k=max(1, round(sc.flaky_fraction * sc.hosts)))) \
                if sc.release == "flaky" else set()
            factory = self._strategy_factory()
            for i, name in enumerate(names):
                group = group_names[i % len(group_names)]
                mid = f"5117{i:028x}"
                cfg = await asyncio.to_thread(self._write_host, root / name, name, mid, group, server.base_url,
                                              pubkey, template)
                host = SimHost(index=i, name=name, machine_id=mid, group=group, root=root / name, config=cfg,
                               clock=self.clock, observer=self, reboot_duration=durations,
                               make_strategy=factory, never_returns=name == never)
                host.kured_phase = self.rng.uniform(0, sc.kured_period)
                host.boot_delay = self.rng.uniform(0, sc.boot_spread) if sc.boot_spread > 0 else 0.0
                self.hosts.append(host)
                self._by_name[name] = host
            self._live = self.hosts
            writes_before = await asyncio.to_thread(self._etcd_writes)
            # The agents' check jitter draws from the random module: seed it too.
            random.seed(sc.seed)
            self.clock.restart()  # virtual time starts now, at the scenario's start
            pacer = self._pacer = Pacer(self.clock, self._parked, settle=sc.settle, limit=sc.horizon,
                                        quantum=sc.quantum, activity=self._activity_mark)
            label = f"{sc.label} " if sc.label else ""
            bar = Progress(self.progress_out, sc.hosts, self.clock, label)
            host_tasks = [asyncio.create_task(h.run(), name=f"host-{h.name}") for h in self.hosts]
            tasks += host_tasks
            tasks.append(asyncio.create_task(pacer.run(), name="pacer"))
            if "member-kill" in sc.faults:
                tasks.append(asyncio.create_task(self._kill_member(), name="member-kill"))
            if "agent-kill" in sc.faults:
                tasks.append(asyncio.create_task(self._kill_agents(), name="agent-kill"))
            outcome = await self._wait_end(bar, host_tasks)
            bar.show(sum(self.host_done(h) for h in self.hosts), final=True)
            real = time.monotonic() - t_real0
            writes_after = await asyncio.to_thread(self._etcd_writes)
            rec, recording = recording, None
            history = await stop_and_check(rec)
            rows = [self._row(h) for h in self.hosts]
            return build_report(
                scenario=sc, policies=groups, rows=rows, watcher=self.watcher, clock=self.clock, outcome=outcome,
                writes=writes_after - writes_before, real_seconds=real, member_killed_at=self.member_killed_at,
                events=self.events, mean_reboot=_mean_draw(sc.reboot_duration), history=history,
            )
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(t, 15)
            for h in self.hosts:
                with contextlib.suppress(Exception):
                    await h._close_strategy()
            if self._fleet_etcd is not None:
                with contextlib.suppress(Exception):
                    await self._fleet_etcd.close()
                self._fleet_etcd = None
            if recording is not None:
                with contextlib.suppress(Exception):
                    await stop_recording(recording, within=5)
            if self.watcher is not None:
                await self.watcher.stop()
            if etcd is not None:
                with contextlib.suppress(Exception):
                    await etcd.close()
            if server is not None:
                server.stop()
            if self.server is not None:
                await asyncio.to_thread(self.server.stop)
            if own_dir:
                shutil.rmtree(root, ignore_errors=True)

    async def _wait_end(self, bar: Progress, host_tasks: list[asyncio.Task[Any]]) -> str:
        assert self.watcher is not None
        stall_after = self._stall_after()
        while True:
            await asyncio.sleep(0.05)
            for t in host_tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            done = sum(self.host_done(h) for h in self.hosts)
            bar.show(done)
            if done == len(self.hosts):
                self._finished = True
                return "complete"
            # The pacer's last look at every host (taking another here would double the cost).
            parked = self._pacer.verdict if self._pacer is not None else self._parked()
            if parked and all(self.host_done(h) or self._blocked(h) for h in self.hosts):
                return "paused"
            elapsed = self.clock.elapsed()
            if elapsed >= self.sc.horizon:
                return "horizon"
            if parked and elapsed - self.watcher.last_progress > stall_after:
                return "stalled"

    def _stall_after(self) -> float:
        longest_gap = 0.0
        for p in self.policies:
            ws = p.window_set()
            if ws.always_open:
                continue
            t = self.sc.start
            for _ in range(30):
                end = ws.current_window_end(t) if ws.is_open(t) else t
                if end is None:
                    break
                nxt = ws.next_open(end + timedelta(seconds=1))
                if nxt is None:
                    break
                longest_gap = max(longest_gap, (nxt - end).total_seconds())
                t = nxt
        timeout = max(p.reboot_timeout.total_seconds() for p in self.policies)
        return 2 * timeout + longest_gap + 3600

    async def _kill_member(self) -> None:
        """Kill one etcd member (the leader) once a third of the hosts went down for their reboot."""
        if self.server is None or len(self.server.members) < 2:
            log.warning("fault_skipped", fault="member-kill", why="needs an embedded cluster of 3 (--members 3)")
            return
        await self._third_rebooted.wait()
        victim = self.server.members[-1]
        for i, m in enumerate(self.server.members):
            with contextlib.suppress(Exception):
                if (await asyncio.to_thread(self.server.metrics, i)).get("etcd_server_is_leader") == 1.0:
                    victim = m  # the leader: the harder case
        await asyncio.to_thread(victim.kill)
        self.member_killed_at = self.clock.elapsed()
        log.warning("fault_member_killed", member=victim.name)

    async def _kill_agents(self) -> None:
        """SIGKILL-like: now and then cancel a random live agent mid-state; it restarts in the same boot."""
        rng = random.Random(self.sc.seed + 7)
        kills = max(2, len(self.hosts) // 5)
        for _ in range(kills):
            await asyncio.sleep(rng.uniform(0.05, 0.4))
            up = [h for h in self.hosts if h.power == "up" and h.agent is not None and not self.host_done(h)]
            if up:
                rng.choice(up).kill_requested.set()

    def _row(self, h: SimHost) -> HostRow:
        assert self.watcher is not None
        view = self.watcher.groups[h.group]
        grants = [g for g in view.grants if g[2] == h.machine_id]
        releases = [r for r in view.releases if r[2] == h.machine_id]
        tl = h.timeline
        status = "updated" if tl.healthy is not None else (
            "rolled back" if tl.failed is not None else (
                "never returned" if h.power == "dead" else (
                    "blocked (paused)" if view.paused else "pending")))
        return HostRow(
            name=h.name, group=h.group, machine_id=h.machine_id, status=status, applied=tl.applied,
            granted=grants[0][0] if grants else None, down=tl.down, up=tl.up, healthy=tl.healthy,
            failed=tl.failed, released=releases[-1][0] if releases else None, reboots=tl.reboots,
            booted_new=tl.booted_new, agent_kills=h.agent_kills, flaky=h.name in self._flaky,
            waiting_window=tl.waiting_window, queued=tl.queued,
            down_intervals=_intervals(self.events, h.name),
            queued_intervals=_state_intervals(h.timeline.events, "coordinator:queued", self.clock.elapsed()),
        )


def _intervals(events: list[tuple[float, str, str]], name: str) -> list[tuple[float, float | None]]:
    out: list[tuple[float, float | None]] = []
    for t, host, ev in events:
        if host != name:
            continue
        if ev == "power_down":
            out.append((t, None))
        elif ev == "power_up" and out and out[-1][1] is None:
            out[-1] = (out[-1][0], t)
    return out


def _state_intervals(events: list[tuple[float, str]], state: str, end: float) -> list[tuple[float, float]]:
    """Spans a host's coordinator spent in ``state`` (from its status transitions)."""
    out: list[tuple[float, float]] = []
    since: float | None = None
    for t, ev in events:
        if ev == state and since is None:
            since = t
        elif ev.startswith("coordinator:") and ev != state and since is not None:
            out.append((since, t))
            since = None
    if since is not None:
        out.append((since, end))
    return out


def _mean_draw(spec: tuple[str, tuple[float, ...]]) -> float:
    kind, a = spec
    if kind == "fixed":
        return a[0]
    if kind == "uniform":
        return (a[0] + a[1]) / 2
    if kind == "normal":
        return a[0]
    if kind == "lognormal":
        return a[0] * math.exp(a[1] ** 2 / 2)
    raise ValueError(kind)


class Interrupted(Exception):
    """SIGTERM stopped the run (after cleaning up its etcd, server and files)."""


def simulate(scenario: Scenario, *, progress: TextIO | None = sys.stderr) -> Report:
    """Run one scenario in a fresh event loop. SIGTERM cancels it cleanly (raises Interrupted)."""

    async def main() -> Report:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await Simulation(scenario, progress=progress).run()
        except asyncio.CancelledError:
            raise Interrupted("terminated") from None
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGTERM)

    return asyncio.run(main())


async def run_scenario(scenario: Scenario, *, progress: TextIO | None = None) -> Report:
    return await Simulation(scenario, progress=progress).run()


__all__ = ["COORDINATORS", "FAULTS", "RELEASES", "Scenario", "Simulation", "run_scenario", "simulate"]
