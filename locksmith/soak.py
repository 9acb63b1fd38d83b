"""The semaphore under etcd faults: contender processes, a fault injector for a 3-member embedded
cluster, and the soak that runs them under a random fault schedule (``make soak``).

    python -m locksmith.soak [--duration 600] [--processes 4] [--per-process 5] [--seed N]

Each contender process runs a few contenders, each with every endpoint of the cluster. A
contender loops: ``lock()``, hold a moment, ``unlock()``, think a moment, and reports each step as
one JSON line on stdout (times from CLOCK_MONOTONIC, comparable across processes on Linux). The
driver injects one fault at a time (SIGKILL or SIGSTOP of the leader or a follower, quorum loss,
compaction with defragmentation, set-max down and up, pause and resume), restores it, and at the
end runs a quiet tail with no faults. Independently, ``locksmith.history`` records etcd's own
watch of every group's keys and checks the invariants at every revision, and every grant a
contender reported against a holder key created for it.

The report: operations done, faults injected, violations (must be 0), stuck waiters (must be 0)
and the longest wait after the last fault. The exit status is 1 when it is not clean.
tests/test_faults.py uses the same pieces, one fault per test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from locksmith import history
from locksmith.embedded import EmbeddedEtcd
from locksmith.errors import LocksmithError
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.log import configure, get_logger
from locksmith.policystore import pause, resume
from locksmith.semaphore import Semaphore

_log = get_logger(__name__)

PREFIX = "soak/"
# The lines a process's stderr must never contain: the asyncio noise of streams not cleaned up.
NOISE = ("Task was destroyed but it is pending", "asynchronous generator is already running",
         "Task exception was never retrieved", "Traceback (most recent call last)")


# -- the contender process ----------------------------------------------------------------------


def _emit(**fields: Any) -> None:
    fields["t"] = time.monotonic()
    sys.stdout.write(json.dumps(fields, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _contender(sem: Any, group: str, cid: str, hold: float, think: float, rng: random.Random) -> None:
    while True:
        _emit(e="want", g=group, id=cid)
        try:
            h = await sem.lock(cid, reason="soak")
        except LocksmithError as exc:
            _emit(e="error", g=group, id=cid, op="lock", err=str(exc)[:300])
            await asyncio.sleep(0.2)
            continue
        _emit(e="grant", g=group, id=cid, rev=h.revision)
        await asyncio.sleep(rng.uniform(0, hold))
        while True:
            try:
                ok = await sem.unlock(cid)
            except LocksmithError as exc:
                _emit(e="error", g=group, id=cid, op="unlock", err=str(exc)[:300])
                await asyncio.sleep(0.2)
                continue
            _emit(e="release", g=group, id=cid, ok=ok)
            break
        await asyncio.sleep(rng.uniform(0, think))


async def _contender_main(args: argparse.Namespace) -> None:
    etcd = await Etcd.connect(EtcdConfig(endpoints=tuple(args.endpoints.split(","))))
    sems: dict[str, Semaphore] = {}
    tasks = []
    rng = random.Random(args.seed)
    for spec in args.contenders.split(","):
        group, cid = spec.split(":")
        if group not in sems:
            sems[group] = Semaphore(etcd, group, prefix=args.prefix, lease_ttl=args.ttl)
        tasks.append(asyncio.create_task(_contender(sems[group], group, cid, args.hold, args.think,
                                                    random.Random(rng.random()))))
    _emit(e="ready")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    # Stop taking slots; what is held stays held, as for a node that goes away.
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for sem in sems.values():
        with contextlib.suppress(LocksmithError):
            await sem.close()
    await etcd.close()
    _emit(e="exit")


# -- the driver's side of the contenders --------------------------------------------------------


@dataclass
class Contender:
    group: str
    id: str
    wanting_since: float | None = None  # a lock() in progress since then
    holding: bool = False
    grants: list[tuple[int, float]] = field(default_factory=list)  # (holder revision, when)
    waits: list[tuple[float, float]] = field(default_factory=list)  # (wanted at, granted at)
    releases: int = 0
    untrue_releases: int = 0  # unlock() said "not held" right after lock() said held
    errors: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.group}:{self.id}"


class Contenders:
    """Contender processes and what they reported."""

    def __init__(self, endpoints: tuple[str, ...], specs: list[list[tuple[str, str]]], *, prefix: str = PREFIX,
                 hold: float = 0.05, think: float = 0.05, ttl: int = 3, seed: int = 0,
                 log_dir: str | None = None) -> None:
        self.endpoints = endpoints
        self.specs = specs
        self.prefix = prefix
        self.hold, self.think, self.ttl, self.seed = hold, think, ttl, seed
        self.log_dir = log_dir
        self.by_key: dict[str, Contender] = {
            f"{g}:{i}": Contender(g, i) for spec in specs for g, i in spec
        }
        self.procs: list[asyncio.subprocess.Process] = []
        self.stderr_paths: list[str] = []
        self._readers: list[asyncio.Task[None]] = []
        self._progress = asyncio.Condition()
        self.ops = 0

    async def start(self) -> None:
        ready = []
        for n, spec in enumerate(self.specs):
            fd, err_path = tempfile.mkstemp(prefix=f"soak-contender-{n}-", suffix=".err", dir=self.log_dir)
            self.stderr_paths.append(err_path)
            with os.fdopen(fd, "wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "locksmith.soak", "contender", "--endpoints", ",".join(self.endpoints),
                    "--prefix", self.prefix, "--contenders", ",".join(f"{g}:{i}" for g, i in spec),
                    "--hold", str(self.hold), "--think", str(self.think), "--ttl", str(self.ttl),
                    "--seed", str(self.seed * 1000 + n),
                    stdout=asyncio.subprocess.PIPE, stderr=err, stdin=asyncio.subprocess.DEVNULL,
                )
            self.procs.append(proc)
            ev = asyncio.Event()
            ready.append(ev)
            self._readers.append(asyncio.create_task(self._read(proc, ev)))
        async with asyncio.timeout(60):
            for ev in ready:
                await ev.wait()

    async def _read(self, proc: asyncio.subprocess.Process, ready: asyncio.Event) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            try:
                m = json.loads(line)
            except ValueError:
                continue
            if m["e"] == "ready":
                ready.set()
                continue
            c = self.by_key.get(f"{m.get('g')}:{m.get('id')}")
            if c is None:
                continue
            if m["e"] == "want":
                c.wanting_since = m["t"]
            elif m["e"] == "grant":
                if c.wanting_since is not None:
                    c.waits.append((c.wanting_since, m["t"]))
                c.wanting_since = None
                c.holding = True
                c.grants.append((int(m["rev"]), m["t"]))
                self.ops += 1
            elif m["e"] == "release":
                c.releases += 1
                if not m["ok"] and c.holding:
                    c.untrue_releases += 1
                c.holding = False
                self.ops += 1
            elif m["e"] == "error":
                c.errors.append(f"{m['op']}: {m['err']}")
            async with self._progress:
                self._progress.notify_all()

    def grants_since(self, t: float) -> dict[str, int]:
        return {k: sum(1 for _, gt in c.grants if gt >= t) for k, c in self.by_key.items()}

    async def wait_all_granted_since(self, t: float, within: float, *, times: int = 1) -> None:
        """Every contender reports ``times`` grants after monotonic time ``t``, within ``within``
        seconds; else AssertionError naming the ones that did not."""
        try:
            async with asyncio.timeout(within):
                async with self._progress:
                    await self._progress.wait_for(lambda: min(self.grants_since(t).values()) >= times)
        except TimeoutError:
            late = {k: n for k, n in self.grants_since(t).items() if n < times}
            raise AssertionError(
                f"{len(late)} contender(s) not granted {times}x within {within}s: "
                + ", ".join(f"{k} ({self.by_key[k].errors[-1:] or 'no error'})" for k in sorted(late))
            ) from None

    async def wait_ops(self, n: int, within: float) -> None:
        start = self.ops
        async with asyncio.timeout(within):
            async with self._progress:
                await self._progress.wait_for(lambda: self.ops >= start + n)

    def reported_grants(self) -> list[tuple[str, str, int]]:
        return [(c.group, c.id, rev) for c in self.by_key.values() for rev, _ in c.grants]

    async def stop(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                async with asyncio.timeout(15):
                    await p.wait()
            except TimeoutError:
                p.kill()
                await p.wait()
        for r in self._readers:
            with contextlib.suppress(asyncio.CancelledError):
                await r

    def noise(self) -> list[str]:
        """Lines of the contenders' stderr that show tasks or streams left behind."""
        out = []
        for path in self.stderr_paths:
            with contextlib.suppress(OSError), open(path, errors="replace") as f:
                out += [ln.rstrip() for ln in f if any(n in ln for n in NOISE)]
        return out

    def cleanup(self) -> None:
        for path in self.stderr_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)


def layout_specs(processes: int, per_process: int, groups: list[str]) -> list[list[tuple[str, str]]]:
    """Contenders spread over ``processes`` processes, groups assigned round-robin."""
    specs: list[list[tuple[str, str]]] = []
    n = 0
    for p in range(processes):
        spec = []
        for _ in range(per_process):
            spec.append((groups[n % len(groups)], f"c{p:02d}-{n:03d}"))
            n += 1
        specs.append(spec)
    return specs


# -- faults -------------------------------------------------------------------------------------


class Faults:
    """Faults on an EmbeddedEtcd cluster of 3, each with its restore. Blocking calls (process
    signals and /metrics reads) run in a thread so the event loop keeps reading contenders."""

    def __init__(self, cluster: EmbeddedEtcd, etcd: Etcd, prefix: str = PREFIX) -> None:
        self.cluster = cluster
        self.etcd = etcd
        self.prefix = prefix
        self.injected: list[tuple[str, float, float]] = []  # (name, start, end) in monotonic time
        # What went wrong with the cluster itself (a member that exited, a fault that could not be
        # applied): reported, and repaired so the run goes on.
        self.anomalies: list[str] = []

    async def _t(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def leader(self) -> int:
        return int(await self._t(self.cluster.wait_leader))

    async def follower(self) -> int:
        lead = await self.leader()
        return random.choice([i for i in range(len(self.cluster.members)) if i != lead])

    async def run(self, name: str, inject: Callable[[], Awaitable[None]], restore: Callable[[], Awaitable[None]],
                  duration: float) -> None:
        start = time.monotonic()
        _log.info("fault_start", fault=name, duration=duration)
        await inject()
        await asyncio.sleep(duration)
        for attempt in range(10):  # a group left paused would look like stuck waiters
            try:
                await restore()
                break
            except LocksmithError as exc:
                self.anomalies.append(f"restoring {name} failed (attempt {attempt + 1}): {str(exc)[:300]}")
                await asyncio.sleep(1)
        await self.repair()
        self.injected.append((name, start, time.monotonic()))
        _log.info("fault_end", fault=name)

    async def repair(self) -> None:
        """Every member running, none frozen, all healthy; a member found dead is reported with
        the end of its log, then restarted with its data."""
        for i, m in enumerate(self.cluster.members):
            if m.paused:
                await self._t(m.resume)
            if not m.running:
                code = m.proc.returncode if m.proc is not None else "killed"
                self.anomalies.append(f"member {m.name} had exited ({code}): {m.tail_log(8)}")
                await self._t(self.cluster.restart_member, i)
        await self._t(self.cluster.wait_healthy)

    async def kill_restart(self, index: int, duration: float, name: str) -> None:
        m = self.cluster.members[index]
        await self.run(name, lambda: self._t(m.kill), lambda: self._t(self.cluster.restart_member, index), duration)

    async def stop_cont(self, index: int, duration: float, name: str) -> None:
        m = self.cluster.members[index]
        await self.run(name, lambda: self._t(m.pause), lambda: self._t(m.resume), duration)

    async def kill_leader(self, duration: float) -> None:
        await self.kill_restart(await self.leader(), duration, "sigkill-leader")

    async def kill_follower(self, duration: float) -> None:
        await self.kill_restart(await self.follower(), duration, "sigkill-follower")

    async def stop_leader(self, duration: float) -> None:
        await self.stop_cont(await self.leader(), duration, "sigstop-leader")

    async def stop_follower(self, duration: float) -> None:
        await self.stop_cont(await self.follower(), duration, "sigstop-follower")

    async def quorum_loss(self, duration: float) -> None:
        lead = await self.leader()
        others = [i for i in range(len(self.cluster.members)) if i != lead]
        ms = [self.cluster.members[i] for i in others]

        async def inject() -> None:
            for m in ms:
                await self._t(m.pause)

        async def restore() -> None:
            for m in ms:
                await self._t(m.resume)

        await self.run("quorum-loss", inject, restore, duration)

    async def compact_defrag(self, duration: float = 0.0) -> None:
        async def inject() -> None:
            rev = await self.etcd.revision()
            await self._t(self.cluster.etcdctl, "compact", str(rev), "--physical")
            await self._t(self.cluster.etcdctl, "defrag", "--cluster")

        async def nothing() -> None:
            return None

        await self.run("compact-defrag", inject, nothing, duration)

    async def set_max_down_up(self, groups: list[str], maxes: dict[str, int], duration: float) -> None:
        async def set_all(delta: int) -> None:
            for g in groups:
                async with Semaphore(self.etcd, g, prefix=self.prefix) as sem:
                    await sem.set_max(max(1, maxes[g] + delta))

        await self.run("set-max-down-up", lambda: set_all(-1), lambda: set_all(0), duration)

    async def pause_resume(self, groups: list[str], duration: float) -> None:
        async def inject() -> None:
            for g in groups:
                await pause(self.etcd, g, "soak", prefix=self.prefix)

        async def restore() -> None:
            for g in groups:
                await resume(self.etcd, g, prefix=self.prefix, reason="soak")

        await self.run("pause-resume", inject, restore, duration)


# -- the history check (locksmith.history) ------------------------------------------------------


class History:
    """etcd's own record of the groups' keys, taken by ``locksmith.history``'s recorder, and its
    checker's verdict. Thin: the recording and every invariant live in locksmith.history."""

    def __init__(self, config: EtcdConfig, groups: list[str], prefix: str = PREFIX) -> None:
        self.config = config
        self.groups = groups
        self.prefix = prefix
        self._impl: history.Recording | None = None

    async def start(self, start_revision: int) -> None:
        self._impl = await history.start_recording(self.config, self.groups, prefix=self.prefix,
                                                   start_revision=start_revision)

    async def check(self, reported: list[tuple[str, str, int]]) -> list[str]:
        """Every violation, as ``<group> r<revision> <kind>: <description>``."""
        assert self._impl is not None, "History.check() before start()"
        return [str(v) for v in await history.stop_and_check(self._impl, reported)]


# -- the soak -----------------------------------------------------------------------------------


@dataclass
class Report:
    duration: float
    contenders: int
    operations: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    untrue_answers: int = 0
    longest_wait_after_last_fault: float = 0.0
    noise: list[str] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)  # the cluster's, not the semaphore's

    @property
    def clean(self) -> bool:
        return not (self.violations or self.stuck or self.untrue_answers or self.noise)

    def render(self) -> str:
        lines = [
            f"soak: {self.duration:.0f}s, {self.contenders} contenders",
            f"operations done:      {self.operations} (grants + releases)",
            f"faults injected:      {sum(self.faults.values())} ("
            + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) + ")",
            f"violations:           {len(self.violations)} (phantom grants: "
            f"{sum(1 for v in self.violations if ' phantom_grant: ' in v)})",
            *(f"  {v}" for v in self.violations[:20]),
            f"stuck waiters:        {len(self.stuck)}",
            *(f"  {s}" for s in self.stuck[:20]),
            f"untrue unlock answers: {self.untrue_answers}",
            f"asyncio noise lines:  {len(self.noise)}",
            *(f"  {s}" for s in self.noise[:5]),
            f"longest wait after the last fault: {self.longest_wait_after_last_fault:.2f}s",
            f"cluster anomalies (etcd's, repaired; not the semaphore's): {len(self.anomalies)}",
            *(f"  {a}" for a in self.anomalies[:10]),
            "result: " + ("CLEAN" if self.clean else "NOT CLEAN"),
        ]
        return "\n".join(lines)


FAULTS = ("sigkill-leader", "sigkill-follower", "sigstop-leader", "sigstop-follower", "quorum-loss",
          "compact-defrag", "set-max-down-up", "pause-resume")


async def run_soak(duration: float, *, processes: int = 4, per_process: int = 5, groups: int = 3,
                   seed: int | None = None, tail: float | None = None, stuck_after: float = 30.0,
                   out: Callable[[str], None] | None = None) -> Report:
    out = out or (lambda line: print(line, flush=True))
    seed = seed if seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    names = [f"g{i}" for i in range(groups)]
    maxes = {g: 1 + i % 3 for i, g in enumerate(names)}
    tail = tail if tail is not None else max(10.0, min(60.0, duration * 0.15))
    specs = layout_specs(processes, per_process, names)
    report = Report(duration, processes * per_process)
    out(f"soak: seed {seed}, {duration:.0f}s, {processes}x{per_process} contenders in groups "
        + ", ".join(f"{g} (max {m})" for g, m in maxes.items()) + f", quiet tail {tail:.0f}s")
    with EmbeddedEtcd(members=3) as cluster:
        etcd = await Etcd.connect(cluster.config())
        start_rev = 0
        for g in names:
            async with Semaphore(etcd, g, prefix=PREFIX) as sem:
                start_rev = max(start_rev, await sem.set_max(maxes[g]))
        history = History(cluster.config(), names)
        await history.start(start_rev)
        pool = Contenders(cluster.endpoints, specs, seed=seed)
        faults = Faults(cluster, etcd)
        t0 = time.monotonic()
        try:
            await pool.start()
            end_faults = t0 + duration - tail
            while time.monotonic() < end_faults - 5:
                await asyncio.sleep(rng.uniform(1.0, 4.0))
                left = end_faults - time.monotonic()
                if left < 3:
                    break
                kind = rng.choice(FAULTS)
                d = 0.0 if kind == "compact-defrag" else min(rng.uniform(1.0, 12.0), max(1.0, left - 2))
                out(f"  t={time.monotonic() - t0:6.1f}s fault {kind}" + (f" for {d:.1f}s" if d else "")
                    + f" (ops so far {pool.ops})")
                try:
                    await _inject(faults, kind, d, names, maxes)
                except Exception as exc:  # a fault the cluster could not take: report, repair, go on
                    faults.anomalies.append(f"fault {kind} failed: {str(exc)[:500]}")
                    await faults.repair()
            last_fault_end = max((e for _, _, e in faults.injected), default=t0)
            await asyncio.sleep(max(0.0, t0 + duration - time.monotonic()))
            end = time.monotonic()
            for m in cluster.members:
                if not m.running:
                    faults.anomalies.append(f"member {m.name} exited during the quiet tail: {m.tail_log(8)}")
        finally:
            await pool.stop()
        report.violations = await history.check(pool.reported_grants())
        await etcd.close()
    report.operations = pool.ops
    for name, _, _ in faults.injected:
        report.faults[name] = report.faults.get(name, 0) + 1
    _liveness(pool, report, last_fault_end, end, stuck_after)
    report.noise = pool.noise()
    report.anomalies = faults.anomalies
    if report.clean:
        pool.cleanup()
    else:
        out("contenders' stderr kept in: " + " ".join(pool.stderr_paths))
    return report


async def _inject(faults: Faults, kind: str, d: float, names: list[str], maxes: dict[str, int]) -> None:
    if kind == "sigkill-leader":
        await faults.kill_leader(d)
    elif kind == "sigkill-follower":
        await faults.kill_follower(d)
    elif kind == "sigstop-leader":
        await faults.stop_leader(d)
    elif kind == "sigstop-follower":
        await faults.stop_follower(d)
    elif kind == "quorum-loss":
        await faults.quorum_loss(d)
    elif kind == "compact-defrag":
        await faults.compact_defrag()
    elif kind == "set-max-down-up":
        await faults.set_max_down_up(names, maxes, d)
    elif kind == "pause-resume":
        await faults.pause_resume(names, d)


def _liveness(pool: Contenders, report: Report, last_fault_end: float, end: float, stuck_after: float) -> None:
    """Stuck: a contender with a lock() open for more than ``stuck_after`` at the end, or none
    granted after the last fault. The longest wait after the last fault: from when a lock() began
    (or the last fault ended, if later) to its grant."""
    longest = 0.0
    for c in pool.by_key.values():
        report.untrue_answers += c.untrue_releases
        for wanted, granted in c.waits:
            if granted >= last_fault_end:
                longest = max(longest, granted - max(wanted, last_fault_end))
        if c.wanting_since is not None:
            open_for = end - max(c.wanting_since, last_fault_end)
            longest = max(longest, open_for)
            if open_for > stuck_after:
                report.stuck.append(f"{c.key}: lock() open for {open_for:.1f}s after the last fault; "
                                    f"last error: {c.errors[-1] if c.errors else 'none'}")
                continue
        if not any(t >= last_fault_end for _, t in c.grants):
            report.stuck.append(f"{c.key}: no grant after the last fault")
    report.longest_wait_after_last_fault = longest


# -- entry point --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    c = sub.add_parser("contender", help=argparse.SUPPRESS)
    c.add_argument("--endpoints", required=True)
    c.add_argument("--prefix", default=PREFIX)
    c.add_argument("--contenders", required=True, help="group:id,group:id,...")
    c.add_argument("--hold", type=float, default=0.05)
    c.add_argument("--think", type=float, default=0.05)
    c.add_argument("--ttl", type=int, default=3)
    c.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration", type=float, default=float(os.environ.get("SOAK_DURATION", 600)),
                   help="seconds (default 600, or $SOAK_DURATION)")
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--per-process", type=int, default=5)
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tail", type=float, default=None, help="quiet seconds at the end (default 15%% of the run)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "contender":
        configure("WARNING", stream=sys.stderr)
        asyncio.run(_contender_main(args))
        return
    configure("INFO" if args.verbose else "WARNING", stream=sys.stderr)
    report = asyncio.run(run_soak(args.duration, processes=args.processes, per_process=args.per_process,
                                  groups=args.groups, seed=args.seed, tail=args.tail))
    print(report.render())
    sys.exit(0 if report.clean else 1)


if __name__ == "__main__":
    main()
