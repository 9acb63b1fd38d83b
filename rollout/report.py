"""The simulation report: per-host timelines, aggregates, safety verdict; text and JSON forms.

Definitions (docs/simulation.md has them with examples):

- **makespan**: virtual time from the first host's "update applied, reboot needed" (t0) until the
  last host finished (healthy on the new version, or rolled back) and had its slot released.
  None when the run did not complete.
- **mean reboot cycle** (c): the mean of the hosts' measured down times (power off to power on).
- **ideal makespan** of a group with F hosts and N slots, from t0: ceil(F/N) rounds of length c, each
  started as soon as the previous one ended if the group's window is open then (with
  ``min_window_remaining`` left), else at the next such opening. So: ceil(F/N) × c plus the
  closed-window time in between. The fleet's ideal is the largest group's.
- **ratio** = makespan / ideal makespan.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from locksmith.policy import Policy


@dataclass(frozen=True)
class HostRow:
    name: str
    group: str
    machine_id: str
    status: str
    applied: float | None
    granted: float | None
    down: float | None
    up: float | None
    healthy: float | None
    failed: float | None
    released: float | None
    reboots: int
    booted_new: bool
    agent_kills: int = 0
    flaky: bool = False
    waiting_window: float | None = None
    queued: float | None = None
    down_intervals: list[tuple[float, float | None]] = field(default_factory=list)
    queued_intervals: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class GroupReport:
    group: str
    hosts: int
    slots: int
    failure_budget: int
    on_timeout: str
    time_zone: str
    max_holders: int
    max_down: int
    updated: int
    rolled_back: int
    booted_new: int
    paused_at: float | None
    makespan: float | None
    ideal: float
    windows_always_open: bool


@dataclass
class Report:
    label: str
    coordinator: str
    release: str
    seed: int
    hosts: int
    outcome: str  # complete | paused | stalled | horizon
    start: datetime
    rate: float
    makespan: float | None
    ideal: float
    cycle: float
    virtual_total: float
    virtual_flowed: float  # virtual seconds that real work (etcd, agents) cost at the rate
    virtual_jumped: float
    jumps: int
    real_seconds: float
    max_holders: int
    max_down: int
    reboots: int
    etcd_writes: float
    handoff_real: dict[str, float | None]
    handoff_virtual: dict[str, float | None]
    groups: list[GroupReport]
    rows: list[HostRow]
    violations: list[dict[str, Any]]
    stall: str
    member_killed_at: float | None
    down_series: list[tuple[float, int]]
    window_spans: dict[str, list[tuple[float, float]]]
    slot_limit: int
    faults: list[str]

    @property
    def ratio(self) -> float | None:
        return self.makespan / self.ideal if self.makespan is not None and self.ideal > 0 else None

    @property
    def writes_per_reboot(self) -> float | None:
        return self.etcd_writes / self.reboots if self.reboots else None

    @property
    def safe(self) -> bool:
        return not self.violations

    @property
    def is_model(self) -> bool:
        return self.coordinator != "ours"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["start"] = self.start.isoformat()
        d["ratio"] = self.ratio
        d["writes_per_reboot"] = self.writes_per_reboot
        d["safe"] = self.safe
        d["coordinator_label"] = coordinator_label(self.coordinator)
        return d


def coordinator_label(name: str) -> str:
    return {"ours": "ours (etcd-lock)", "locksmith-model": "locksmith (MODEL)",
            "kured-model": "kured (MODEL)"}.get(name, name)


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def ideal_makespan(policy: Policy, hosts: int, cycle: float, start: datetime) -> float:
    """ceil(F/N) back-to-back rounds of ``cycle``, each started in an open window (see module doc)."""
    if hosts <= 0 or cycle <= 0:
        return 0.0
    rounds = math.ceil(hosts / max(policy.slots, 1))
    ws = policy.window_set()
    t = start
    for _ in range(rounds):
        if not ws.always_open:
            t = _next_start(ws, t, policy.min_window_remaining)
        t += timedelta(seconds=cycle)
    return (t - start).total_seconds()


def _next_start(ws: Any, t: datetime, min_remaining: timedelta) -> datetime:
    for _ in range(400):
        if ws.is_open(t):
            end = ws.current_window_end(t)
            if end is None or end - t > min_remaining or min_remaining.total_seconds() == 0:
                return t
            t = end + timedelta(seconds=1)
        nxt = ws.next_open(t)
        if nxt is None:
            return t
        t = nxt
    return t


def window_spans(policy: Policy, start: datetime, horizon: float) -> list[tuple[float, float]]:
    """Open spans of the policy's windows as (from, to) virtual seconds within [0, horizon]."""
    ws = policy.window_set()
    if ws.always_open:
        return [(0.0, horizon)]
    spans: list[tuple[float, float]] = []
    t = start
    end_at = start + timedelta(seconds=horizon)
    for _ in range(1000):
        if t >= end_at:
            break
        if ws.is_open(t):
            end = ws.current_window_end(t) or end_at
            spans.append(((t - start).total_seconds(), (min(end, end_at) - start).total_seconds()))
            t = end + timedelta(seconds=1)
            continue
        nxt = ws.next_open(t)
        if nxt is None:
            break
        t = nxt
    return spans


def build_report(*, scenario: Any, policies: dict[str, Policy], rows: list[HostRow], watcher: Any, clock: Any,
                 outcome: str, writes: float, real_seconds: float, member_killed_at: float | None,
                 events: list[tuple[float, str, str]], mean_reboot: float, history: Any = ()) -> Report:
    downs = [r.up - r.down for r in rows if r.down is not None and r.up is not None]
    cycle = sum(downs) / len(downs) if downs else mean_reboot
    finished = [max(t for t in (r.released, r.healthy, r.failed) if t is not None)
                for r in rows if r.status in ("updated", "rolled back")
                and any(t is not None for t in (r.released, r.healthy, r.failed))]
    applied = [r.applied for r in rows if r.applied is not None]
    t0 = min(applied) if applied else 0.0  # the rollout starts when the first host needs its reboot
    makespan = max(finished) - t0 if outcome == "complete" and finished else None
    violations = [asdict(v) for v in watcher.violations]
    # locksmith.history's verdict on etcd's record of the groups' keys (FIFO, pause, cooldown, ...).
    violations += [{"kind": f"semaphore:{v.kind}", "group": v.group, "at": None,
                    "detail": f"revision {v.revision}: {v.description}"} for v in history]
    groups: list[GroupReport] = []
    for g, policy in policies.items():
        grows = [r for r in rows if r.group == g]
        view = watcher.groups[g]
        booted_new = sum(r.booted_new for r in grows)
        g_finished = [max(t for t in (r.released, r.healthy, r.failed) if t is not None)
                      for r in grows if r.status in ("updated", "rolled back")
                      and any(t is not None for t in (r.released, r.healthy, r.failed))]
        if scenario.release == "bad" and booted_new > policy.failure_budget + policy.slots:
            violations.append({"kind": "bad_release_boots", "group": g, "at": clock.elapsed(),
                               "detail": f"{booted_new} hosts booted the bad release; failure_budget "
                                         f"{policy.failure_budget} + slots {policy.slots} = "
                                         f"{policy.failure_budget + policy.slots}"})
        groups.append(GroupReport(
            group=g, hosts=len(grows), slots=policy.slots, failure_budget=policy.failure_budget,
            on_timeout=policy.on_timeout, time_zone=policy.time_zone, max_holders=view.max_holders,
            max_down=watcher.max_down_by_group[g], updated=sum(r.status == "updated" for r in grows),
            rolled_back=sum(r.status == "rolled back" for r in grows), booted_new=booted_new,
            paused_at=view.paused_at,
            makespan=max(g_finished) - t0 if outcome == "complete" and g_finished else None,
            ideal=ideal_makespan(policy, len(grows), cycle, scenario.start + timedelta(seconds=t0)),
            windows_always_open=policy.window_set().always_open,
        ))
    handoff_r = [x for v in watcher.groups.values() for x in v.handoffs_real]
    handoff_v = [x for v in watcher.groups.values() for x in v.handoffs_virtual]
    stall = ""
    if outcome != "complete":
        stall = _stall_reason(outcome, rows, watcher)
    horizon = max(clock.elapsed() * 1.03 + 900.0, 3600.0)  # the chart shows a margin past the end
    return Report(
        label=scenario.label, coordinator=scenario.coordinator, release=scenario.release, seed=scenario.seed,
        hosts=len(rows), outcome=outcome, start=scenario.start, rate=scenario.rate, makespan=makespan,
        ideal=max((gr.ideal for gr in groups), default=0.0), cycle=cycle, virtual_total=clock.elapsed(),
        virtual_flowed=clock.flowed, virtual_jumped=clock.jumped, jumps=clock.jumps, real_seconds=real_seconds,
        max_holders=max((v.max_holders for v in watcher.groups.values()), default=0), max_down=watcher.max_down,
        reboots=sum(r.reboots for r in rows), etcd_writes=writes,
        handoff_real={"p50": _pct(handoff_r, 50), "p99": _pct(handoff_r, 99), "count": float(len(handoff_r))},
        handoff_virtual={"p50": _pct(handoff_v, 50), "p99": _pct(handoff_v, 99), "count": float(len(handoff_v))},
        groups=groups, rows=rows, violations=violations, stall=stall, member_killed_at=member_killed_at,
        down_series=list(watcher.down_series),
        window_spans={g: window_spans(p, scenario.start, horizon) for g, p in policies.items()},
        slot_limit=sum(p.slots for p in policies.values()), faults=sorted(scenario.faults),
    )


def _stall_reason(outcome: str, rows: list[HostRow], watcher: Any) -> str:
    parts: list[str] = []
    for g, view in watcher.groups.items():
        if view.paused:
            parts.append(f"group {g} paused at {fmt_t(view.paused_at)} (failure budget spent)")
        dead = [r.name for r in rows if r.group == g and r.status == "never returned" and r.machine_id in view.holders]
        if dead:
            parts.append(f"group {g}: {', '.join(dead)} never came back and still hold(s) a slot "
                         f"(on_timeout = {view.policy.on_timeout})")
    pending = [r.name for r in rows if r.status == "pending"]
    if pending:
        parts.append(f"{len(pending)} host(s) still waiting")
    what = {"paused": "stopped: every remaining host is in a paused group", "stalled": "stalled",
            "horizon": "reached the horizon"}.get(outcome, outcome)
    return what + (": " + "; ".join(parts) if parts else "")


# --------------------------------------------------------------------------- text


def fmt_t(seconds: float | None) -> str:
    """Virtual seconds since the start as +[Nd]HH:MM:SS."""
    if seconds is None:
        return "-"
    s = round(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"+{d}d{h:02d}:{m:02d}" if d else f"+{h:02d}:{m:02d}:{s:02d}")


def fmt_d(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.2f}h"


def render_text(report: Report, *, max_rows: int = 60) -> str:
    r = report
    L: list[str] = []
    title = f"rollout simulation: {r.hosts} hosts, coordinator {coordinator_label(r.coordinator)}, " \
            f"release {r.release}, seed {r.seed}"
    L += [title, "=" * len(title)]
    verdict = "SAFE" if r.safe else "SAFETY VIOLATED"
    L.append(f"outcome     {r.outcome}{(' — ' + r.stall) if r.stall else ''}")
    L.append(f"verdict     {verdict}: max holders {r.max_holders} (slots {r.slot_limit} in all), max hosts down "
             f"{r.max_down}, reboots outside a window "
             f"{sum(v['kind'] == 'outside_window' for v in r.violations)}")
    ratio = f"{r.ratio:.3f}" if r.ratio is not None else "-"
    L.append(f"makespan    {fmt_d(r.makespan)}  ideal {fmt_d(r.ideal)}  ratio {ratio}  "
             f"(mean reboot cycle {fmt_d(r.cycle)})")
    L.append(f"time        virtual {fmt_d(r.virtual_total)} = {fmt_d(r.virtual_jumped)} skipped while parked "
             f"({r.jumps} jumps) + {fmt_d(r.virtual_flowed)} real work × {r.rate:g}; real {r.real_seconds:.1f}s")
    wpr = f"{r.writes_per_reboot:.1f}" if r.writes_per_reboot is not None else "-"
    L.append(f"etcd        {r.etcd_writes:.0f} write RPCs for {r.reboots} reboots = {wpr} per reboot "
             f"(etcd /metrics)")
    hr, hv = r.handoff_real, r.handoff_virtual
    L.append(f"hand-off    p50 {fmt_d(hr['p50'])} / p99 {fmt_d(hr['p99'])} real, "
             f"p50 {fmt_d(hv['p50'])} / p99 {fmt_d(hv['p99'])} virtual ({int(hr['count'] or 0)} hand-offs)")
    if r.member_killed_at is not None:
        L.append(f"faults      etcd member killed at {fmt_t(r.member_killed_at)}")
    elif r.faults:
        L.append(f"faults      {', '.join(r.faults)}")
    L.append("")
    L.append(f"{'group':<14} {'tz':<18} {'hosts':>5} {'slots':>5} {'budget':>6} {'maxhold':>7} {'maxdown':>7} "
             f"{'updated':>7} {'rolledbk':>8} {'booted new':>10} {'paused at':>10} {'makespan':>9} {'ideal':>8}")
    for g in r.groups:
        L.append(f"{g.group:<14} {g.time_zone:<18} {g.hosts:>5} {g.slots:>5} {g.failure_budget:>6} "
                 f"{g.max_holders:>7} {g.max_down:>7} {g.updated:>7} {g.rolled_back:>8} {g.booted_new:>10} "
                 f"{fmt_t(g.paused_at):>10} {fmt_d(g.makespan):>9} {fmt_d(g.ideal):>8}")
    if r.violations:
        L += ["", "SAFETY VIOLATIONS:"]
        L += [f"  {v['kind']} in group {v['group']}" + (f" at {fmt_t(v['at'])}" if v["at"] is not None else "")
              + f": {v['detail']}" for v in r.violations[:20]]
    L.append("")
    L.append(f"{'host':<6} {'group':<12} {'applied':>10} {'win wait':>9} {'queue':>9} {'granted':>10} "
             f"{'down':>10} {'up':>10} {'healthy':>10} {'released':>10}  status")
    shown = r.rows if len(r.rows) <= max_rows else r.rows[: max_rows // 2]
    for h in shown:
        win = (h.queued - h.waiting_window) if h.queued is not None and h.waiting_window is not None else None
        queue = (h.granted - h.queued) if h.granted is not None and h.queued is not None else None
        status = h.status + (f" (agent killed ×{h.agent_kills})" if h.agent_kills else "") + \
            (" [flaky]" if h.flaky else "")
        L.append(f"{h.name:<6} {h.group:<12} {fmt_t(h.applied):>10} {fmt_d(win):>9} {fmt_d(queue):>9} "
                 f"{fmt_t(h.granted):>10} {fmt_t(h.down):>10} {fmt_t(h.up):>10} "
                 f"{fmt_t(h.healthy if h.healthy is not None else h.failed):>10} {fmt_t(h.released):>10}  {status}")
    if len(shown) < len(r.rows):
        L.append(f"... {len(r.rows) - len(shown)} more hosts (--output json has all)")
    if r.is_model:
        L += ["", f"NOTE: {coordinator_label(r.coordinator)} is a model of that tool's documented waiting behaviour "
                  f"on our semaphore, not the tool itself."]
    return "\n".join(L)


def render_compare(reports: list[Report]) -> str:
    L = ["coordinator comparison (same fleet, same seed; models are models)", ""]
    L.append(f"{'coordinator':<20} {'outcome':<9} {'makespan':>9} {'ideal':>8} {'ratio':>6} {'max hold':>8} "
             f"{'max down':>8} {'booted new':>10} {'safe':>5} {'writes/reboot':>13} {'real':>7}")
    for r in reports:
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else "-"
        wpr = f"{r.writes_per_reboot:.1f}" if r.writes_per_reboot is not None else "-"
        L.append(f"{coordinator_label(r.coordinator):<20} {r.outcome:<9} {fmt_d(r.makespan):>9} {fmt_d(r.ideal):>8} "
                 f"{ratio:>6} {r.max_holders:>8} {r.max_down:>8} {sum(g.booted_new for g in r.groups):>10} "
                 f"{'yes' if r.safe else 'NO':>5} {wpr:>13} {r.real_seconds:>6.1f}s")
    return "\n".join(L)
