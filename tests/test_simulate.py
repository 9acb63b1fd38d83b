"""``locksmithctl simulate``: fleets of the real agent and coordinator on a real etcd, in virtual time.

Every run starts an embedded etcd, publishes a release with ``updatectl release``, serves it over
HTTP, gives each host its own GPT image, and checks safety from the independent watcher (etcd
watch of the holder keys, the emulated machines' power state), never from the agents' claims.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from locksmith.cli import main as locksmithctl
from locksmith.policy import Policy, parse_policy_text
from rollout.engine import Scenario, run_scenario
from rollout.report import Report, render_text

pytestmark = pytest.mark.timeout(240)

NIGHTLY = """\
format_version = 1
group = "web"
slots = 3
time_zone = "Europe/Berlin"
reboot_timeout = "30m"
failure_budget = 1
min_window_remaining = "10m"
windows = [{start = "01:00", length = "2h"}]
"""


def policy(text: str = NIGHTLY, **changes: object) -> Policy:
    from dataclasses import replace

    return replace(parse_policy_text(text), **changes)  # type: ignore[arg-type]


def reboot_instants(report: Report) -> list[tuple[str, str, float]]:
    return [(r.name, r.group, a) for r in report.rows for a, _ in r.down_intervals]


async def test_good_rollout_of_20_hosts_stays_within_slots_and_windows() -> None:
    p = policy()
    start = datetime(2026, 3, 23, 22, 0, tzinfo=UTC)
    report = await run_scenario(Scenario(hosts=20, policies=(p,), seed=3, start=start,
                                         reboot_duration=("uniform", (240.0, 420.0))))
    assert report.outcome == "complete", render_text(report)
    assert report.safe, report.violations
    assert all(r.status == "updated" for r in report.rows)
    assert 1 <= report.max_holders <= p.slots
    assert report.max_down <= p.slots
    ws = p.window_set()
    for name, _, t in reboot_instants(report):  # the watcher's verdict, checked again here
        assert ws.is_open(start + timedelta(seconds=t)), name
    assert report.ratio is not None and report.ratio < 1.2, render_text(report)
    assert report.writes_per_reboot is not None and report.writes_per_reboot < 20


async def test_berlin_and_new_york_groups_each_reboot_in_their_own_windows_across_dst() -> None:
    # Europe/Berlin springs forward on Sun 29 March 2026 at 02:00; a 02:30 start does not exist
    # that night and opens at 03:30 CEST. New York is already on EDT.
    berlin = policy(NIGHTLY.replace('"web"', '"eu"').replace('"01:00"', '"02:30"').replace('"2h"', '"1h"'),
                    slots=1, min_window_remaining=timedelta(0))
    newyork = policy(NIGHTLY.replace('"web"', '"us"').replace("Europe/Berlin", "America/New_York")
                     .replace('"2h"', '"1h"'), slots=1, min_window_remaining=timedelta(0))
    start = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
    report = await run_scenario(Scenario(hosts=8, policies=(berlin, newyork), seed=5, start=start,
                                         reboot_duration=("fixed", (1200.0,))))
    assert report.outcome == "complete", render_text(report)
    assert report.safe, report.violations
    by_group = {"eu": berlin.window_set(), "us": newyork.window_set()}
    instants = reboot_instants(report)
    assert {g for _, g, _ in instants} == {"eu", "us"}
    for name, group, t in instants:
        when = start + timedelta(seconds=t)
        assert by_group[group].is_open(when), (name, group, when)
        other = by_group["us" if group == "eu" else "eu"]
        assert not other.is_open(when), (name, group, when)  # the windows never overlap
    eu_local = sorted((start + timedelta(seconds=t)).astimezone(by_group["eu"].tz)
                      for _, g, t in instants if g == "eu")
    # Reboots on the night of the change start at 03:30 CEST (02:30 does not exist), and the
    # rollout carries on the next night at 02:30 CEST.
    assert any(t.date().isoformat() == "2026-03-29" and t.hour == 3 for t in eu_local), eu_local
    assert all(t.utcoffset() == timedelta(hours=2) for t in eu_local)


async def test_bad_release_pauses_the_group_within_its_failure_budget() -> None:
    p = policy(slots=2, failure_budget=1, windows=())
    report = await run_scenario(Scenario(hosts=12, policies=(p,), release="bad", seed=2,
                                         reboot_duration=("uniform", (120.0, 240.0))))
    group = report.groups[0]
    assert report.outcome == "paused", render_text(report)
    assert group.paused_at is not None
    assert 1 <= group.booted_new <= p.failure_budget + p.slots, render_text(report)
    assert group.updated == 0
    assert report.safe, report.violations
    assert "paused" in render_text(report)


@pytest.mark.parametrize("on_timeout", ["hold", "release"])
async def test_a_host_that_never_returns(on_timeout: str) -> None:
    p = policy(slots=1, failure_budget=1, windows=(), on_timeout=on_timeout, reboot_timeout=timedelta(minutes=20))
    report = await run_scenario(Scenario(hosts=5, policies=(p,), seed=4, faults=frozenset({"never-returns"}),
                                         reboot_duration=("fixed", (300.0,))))
    dead = [r for r in report.rows if r.status == "never returned"]
    assert len(dead) == 1
    assert report.safe, report.violations
    if on_timeout == "hold":
        assert report.outcome == "stalled", render_text(report)
        assert f"{dead[0].name} never came back and still hold(s) a slot (on_timeout = hold)" in report.stall
        assert "stalled" in render_text(report)
    else:
        assert report.outcome == "complete", render_text(report)
        assert sum(r.status == "updated" for r in report.rows) == 4


async def test_three_members_with_one_killed_mid_run_stays_safe_and_completes() -> None:
    p = policy(slots=2, windows=())
    report = await run_scenario(Scenario(hosts=10, policies=(p,), seed=6, members=3,
                                         faults=frozenset({"member-kill"}), reboot_duration=("fixed", (240.0,))))
    assert report.member_killed_at is not None
    assert report.outcome == "complete", render_text(report)
    assert report.safe, report.violations
    assert report.max_holders <= 2


async def test_the_same_seed_gives_the_same_grant_order() -> None:
    p = policy(slots=1, windows=())
    sc = Scenario(hosts=6, policies=(p,), seed=11, reboot_duration=("uniform", (120.0, 300.0)), boot_spread=1800)
    orders = []
    for _ in range(2):
        report = await run_scenario(sc)
        assert report.outcome == "complete"
        orders.append([r.name for r in sorted(report.rows, key=lambda r: r.granted or 0)])
    assert orders[0] == orders[1]


def test_cli_json_output_and_chart(tmp_path: object) -> None:
    from pathlib import Path

    out = Path(str(tmp_path)) / "rollout.svg"
    res = CliRunner().invoke(locksmithctl, ["simulate", "--hosts", "4", "--no-progress", "--output", "json",
                                            "--reboot-duration", "fixed:2m", "--chart", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["outcome"] == "complete" and doc["safe"] is True
    assert doc["hosts"] == 4 and len(doc["rows"]) == 4
    assert out.read_text().lstrip().startswith("<?xml")


def test_cli_rejects_bad_arguments() -> None:
    runner = CliRunner()
    res = runner.invoke(locksmithctl, ["simulate", "--reboot-duration", "uniform:5m"])
    assert res.exit_code == 2 and "uniform takes 2 value(s)" in res.output
    res = runner.invoke(locksmithctl, ["simulate", "--faults", "meteor"])
    assert res.exit_code == 2 and "unknown fault 'meteor'" in res.output
    res = runner.invoke(locksmithctl, ["simulate", "--faults", "member-kill"])
    assert res.exit_code == 2 and "--members 3" in res.output


def test_a_broken_semaphore_compare_makes_the_command_exit_non_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test-only fault switch: grants stop checking the holder count (the fresh read and the range
    compare), so more hosts than slots get in. Nothing on the command line can do this."""
    import locksmith.semaphore as semaphore

    async def no_busy(self: object, cooldown_s: int) -> tuple[int, list[object]]:
        return 0, []

    monkeypatch.setattr(semaphore.Semaphore, "_busy", no_busy)
    monkeypatch.setattr(semaphore._View, "available", property(lambda self: 1000))
    res = CliRunner().invoke(locksmithctl, ["simulate", "--hosts", "6", "--no-progress",
                                            "--reboot-duration", "fixed:5m"])
    assert res.exit_code == 3, res.output
    assert "SAFETY VIOLATED" in res.stdout
    assert "holders in group sim" in res.stdout  # the live watcher
    assert "semaphore:too_many_holders in group sim" in res.stdout  # locksmith.history's replay of etcd


def test_demo_module_runs_both_acts_and_exits_0(tmp_path: object) -> None:
    """``make demo`` (``python -m locksmith.demo``), on a smaller fleet: a good rollout that writes
    the chart, then a bad release that pauses its group within failure_budget + slots."""
    import subprocess
    import sys
    from pathlib import Path

    chart = Path(str(tmp_path)) / "rollout.png"
    p = subprocess.run([sys.executable, "-m", "locksmith.demo", "--hosts", "12", "--chart", str(chart)],
                       capture_output=True, text=True, timeout=200)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "good release: complete" in p.stdout
    assert "bad release: group web paused itself at" in p.stdout
    assert p.stdout.rstrip().endswith("demo: OK")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "hosts done" in p.stderr  # the progress bar
