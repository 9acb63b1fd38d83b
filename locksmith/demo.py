"""``python -m locksmith.demo`` (``make demo``): a simulated fleet updates itself, twice.

On one embedded etcd, with the real agent and coordinator on every host (see docs/simulation.md):

1. 50 hosts, ``slots = 3``, a nightly window in Europe/Berlin, release 2.0.0 good: the rollout in
   compressed time, its report, and ``rollout.png`` (a Gantt chart with the windows shaded and the
   hosts down against the slot limit);
2. the same fleet with a bad 2.0.0 (its health check fails on every host): the group pauses
   itself once its failure budget is spent, and no more than ``failure_budget + slots`` hosts
   ever boot the bad release.

Exit 0 when both runs were safe and the bad release stopped itself in time.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import click

from locksmith.errors import LocksmithError

POLICY = """\
format_version = 1
group = "web"
slots = 3
time_zone = "Europe/Berlin"
reboot_timeout = "30m"
failure_budget = 2
min_window_remaining = "10m"

# Every night, 01:00 to 03:00 Berlin time.
[[windows]]
start = "01:00"
length = "2h"
"""


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--hosts", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--chart", type=click.Path(dir_okay=False, path_type=Path), default=Path("rollout.png"),
              show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
def main(hosts: int, chart: Path, seed: int) -> None:
    """A 50-host rollout in compressed time, then a bad release that stops itself."""
    from locksmith.embedded import EmbeddedEtcd
    from locksmith.log import configure
    from locksmith.policy import parse_policy_text
    from rollout.chart import ChartError, draw_chart
    from rollout.engine import Scenario, simulate
    from rollout.report import fmt_t, render_text

    configure("CRITICAL")  # the 50 agents log every reboot and failure; the report says it
    policy = parse_policy_text(POLICY, source="demo policy")
    out = click.echo
    try:
        with EmbeddedEtcd() as etcd:
            base = Scenario(hosts=hosts, policies=(policy,), reboot_duration=("uniform", (300.0, 600.0)),
                            seed=seed, endpoints=etcd.endpoints, start=datetime(2026, 3, 23, 21, 0, tzinfo=UTC))
            out(f"== 1. release 2.0.0 (good) to {hosts} hosts: 3 slots, a nightly window 01:00-03:00 Berlin ==\n")
            out(POLICY)
            good = simulate(replace(base, label="good "), progress=sys.stderr)
            out(render_text(good, max_rows=12))
            draw_chart(good, chart)
            out(f"\nchart: {chart}\n")
            out("== 2. the same fleet, a bad 2.0.0: its health check fails on every host ==\n")
            bad = simulate(replace(base, release="bad", label="bad  "), progress=sys.stderr)
            out(render_text(bad, max_rows=8))
    except (LocksmithError, ChartError, OSError) as exc:
        click.echo(f"demo: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("demo: interrupted", err=True)
        sys.exit(130)
    group = bad.groups[0]
    limit = group.failure_budget + group.slots
    stopped = group.paused_at is not None and group.booted_new <= limit
    out("")
    out(f"good release: {good.outcome}, makespan {good.makespan and good.makespan / 3600:.1f}h virtual "
        f"(ideal {good.ideal / 3600:.1f}h, ratio {good.ratio or 0:.3f}) in {good.real_seconds:.0f}s real; "
        f"max {good.max_holders} holders and {good.max_down} hosts down for {group.slots} slots")
    out(f"bad release: group {group.group} paused itself at {fmt_t(group.paused_at)} after "
        f"{group.rolled_back} failed hosts; {group.booted_new} hosts booted it "
        f"(at most failure_budget {group.failure_budget} + slots {group.slots} = {limit})")
    ok = good.safe and bad.safe and good.outcome == "complete" and stopped
    out("demo: OK" if ok else "demo: FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
