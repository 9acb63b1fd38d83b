"""Reboot hooks (run-parts style) and the shipped kubectl drain/uncordon pair, alone and inside a
coordinated reboot; a failing post-boot hook; the wait for logged-in users."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fleetrig import Fleet, poll_until

from locksmith.budget import count_failures
from updateagent.agent import Phase
from updateagent.strategy.coordinator import CoordState
from updateagent.strategy.hooks import list_hooks, run_hooks

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples" / "hooks"


def _hook(directory: Path, name: str, body: str, *, mode: int = 0o755) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(mode)
    return path


@pytest.fixture
def kubectl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in kubectl first on PATH: appends its argv (one line per call) to a file."""
    bindir = tmp_path / "bin"
    record = tmp_path / "kubectl.argv"
    _hook(bindir, "kubectl", f'printf "%s\\n" "$*" >> {record}')
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("KUBE_NODE_NAME", "node-7")
    return record


async def test_hooks_run_in_name_order_with_the_environment_and_their_output(tmp_path: Path) -> None:
    d = tmp_path / "pre"
    out = tmp_path / "order"
    _hook(d, "20-second", f'echo "second $UPDATE_AGENT_REASON" >> {out}')
    _hook(d, "10-first", f'echo "first $UPDATE_AGENT_GROUP $UPDATE_AGENT_MACHINE_ID $UPDATE_AGENT_OLD_VERSION '
                         f'$UPDATE_AGENT_NEW_VERSION $UPDATE_AGENT_HOOK_PHASE" >> {out}; echo to-the-log')
    _hook(d, "30-not-executable", "exit 1", mode=0o644)
    _hook(d, "40-skipped.dpkg-old", "exit 1")
    _hook(d, ".hidden", "exit 1")
    assert [p.name for p in list_hooks(d)] == ["10-first", "20-second"]
    run = await run_hooks(d, "pre-reboot", {"UPDATE_AGENT_GROUP": "prod", "UPDATE_AGENT_MACHINE_ID": "m1",
                                            "UPDATE_AGENT_OLD_VERSION": "1.0", "UPDATE_AGENT_NEW_VERSION": "2.0",
                                            "UPDATE_AGENT_REASON": "update"}, per_hook=10)
    assert run.ok
    assert out.read_text() == "first prod m1 1.0 2.0 pre-reboot\nsecond update\n"
    assert run.results[0].output == "to-the-log\n"
    assert await run_hooks(tmp_path / "missing", "post-boot", {}, per_hook=1) == run.__class__("post-boot", ())


async def test_a_failing_hook_stops_the_run_and_a_hung_one_is_killed_with_its_children(tmp_path: Path) -> None:
    d = tmp_path / "pre"
    after = tmp_path / "after"
    _hook(d, "10-fails", "echo no way >&2; exit 9")
    _hook(d, "20-never", f"touch {after}")
    run = await run_hooks(d, "pre-reboot", {}, per_hook=10)
    assert not run.ok and run.failure() == "10-fails: exit 9: no way" and not after.exists()

    h = tmp_path / "hang"
    pidfile = tmp_path / "child.pid"
    _hook(h, "10-hangs", f"sleep 300 & echo $! > {pidfile}; wait")
    run = await run_hooks(h, "pre-reboot", {}, per_hook=0.5)
    assert run.failure() == "10-hangs: timed out after 0s" or run.failure().startswith("10-hangs: timed out")
    child = int(pidfile.read_text())
    await poll_until(lambda: _gone(child), within=10, every=0.02)  # reaped by init once killed


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


def _argv(record: Path) -> list[str]:
    return record.read_text().splitlines()


async def test_the_kubectl_example_pair_drains_and_uncordons(tmp_path: Path, kubectl: Path) -> None:
    env = {"UPDATE_AGENT_REASON": "update", "UPDATE_AGENT_NEW_VERSION": "2.0.0"}
    pre = await run_hooks(EXAMPLES / "pre-reboot.d", "pre-reboot", env, per_hook=10)
    assert pre.ok, pre.failure()
    assert "draining node-7: update 2.0.0" in pre.results[0].output
    post = await run_hooks(EXAMPLES / "post-boot.d", "post-boot", env, per_hook=10)
    assert post.ok, post.failure()
    assert _argv(kubectl) == [
        "drain node-7 --ignore-daemonsets --delete-emptydir-data --timeout=240s",
        "uncordon node-7",
    ]


@pytest.fixture
async def fleet(tmp_path: Path, etcd_config, prefix: str) -> AsyncIterator[Fleet]:
    f = await Fleet(tmp_path / "fleet", etcd_config, prefix).open()
    try:
        yield f
    finally:
        await f.close()


async def _applied(m) -> None:
    await m.start()
    m.agent.request_check()
    await m.wait_phase(Phase.UPDATED_NEED_REBOOT)


async def test_a_coordinated_reboot_drains_before_and_uncordons_after(fleet: Fleet, kubectl: Path) -> None:
    fleet.publish("2.0.0")
    (m,) = fleet.add(1)
    shutil.copytree(EXAMPLES / "pre-reboot.d", m.pre_dir)
    shutil.copytree(EXAMPLES / "post-boot.d", m.post_dir)
    calls_at_reboot: list[list[str]] = []
    m.reboot_hook = lambda _m: calls_at_reboot.append(_argv(kubectl))
    await _applied(m)
    assert fleet.watch is not None
    await fleet.watch.wait(lambda: fleet.watch.releases(m.machine_id) == 1)  # type: ignore[union-attr]
    assert calls_at_reboot == [["drain node-7 --ignore-daemonsets --delete-emptydir-data --timeout=240s"]]
    assert _argv(kubectl)[1:] == ["uncordon node-7"]


async def test_a_failing_post_boot_hook_counts_like_a_failed_health_check(fleet: Fleet) -> None:
    await fleet.policy(failure_budget=5, on_timeout="hold")
    fleet.publish("2.0.0")
    (m,) = fleet.add(1)
    _hook(m.post_dir, "10-app-check", "echo app not serving; exit 2")
    await _applied(m)
    await m.wait_state(CoordState.FAILED)
    assert m.reboots() == 1
    assert await count_failures(fleet.etcd, fleet.group, prefix=fleet.prefix) == 1
    # on_timeout = hold: the failed host keeps its slot, visibly.
    assert fleet.watch is not None and fleet.watch.holding() == {m.machine_id}
    text = m.coordinator.status_text()
    assert text.startswith("failed: post-boot hook failed: 10-app-check: exit 2: app not serving")
    assert text.endswith("keeping the slot (on_timeout = hold)")


async def test_logged_in_users_postpone_the_reboot_up_to_the_limit(fleet: Fleet) -> None:
    fleet.publish("2.0.0")
    (m,) = fleet.add(1)
    m.configure(reboot={"max_session_wait_minutes": 30})
    await m.start()
    assert m.logind is not None
    m.logind.sessions = [("c1", 1000, "alice", "seat0"), ("c2", 1001, "bob", "")]
    m.agent.request_check()
    await m.wait_status(lambda t: t.endswith("waiting for 2 logged-in session(s) (at most until 01:30)"))
    fleet.clock.advance(29 * 60)
    await m.wait_status(lambda t: "waiting for 2 logged-in session(s)" in t)
    assert m.reboots() == 0
    fleet.clock.advance(60)
    assert fleet.watch is not None
    await fleet.watch.wait(lambda: fleet.watch.releases(m.machine_id) == 1)  # type: ignore[union-attr]
    assert m.reboots() == 1
