"""The coordinator with each agent as its own ``update-agent`` process: three hosts sharing one
slot, ``updatectl status``, and SIGKILL in every coordinator state.

Verdicts come from outside the agents: the group's etcd history (``locksmith.history``'s recorder
and checker, plus the fleet rig's holder watch) and each machine's stand-in logind record. A
crash-point test stops the agent in a state with ``UPDATE_AGENT_TEST_HOLD_IN`` (the coordinator
parks there once the state is persisted), SIGKILLs it, and restarts it without the variable:
the cycle must complete with exactly one reboot, one grant and one release.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fleetrig import VENV_BIN, Fleet, Machine, poll_until

from locksmith import history
from locksmith.semaphore import Semaphore, read_state


@pytest.fixture
async def fleet(tmp_path: Path, etcd_config, prefix: str) -> AsyncIterator[Fleet]:
    f = await Fleet(tmp_path, etcd_config, prefix).open()
    f.recorder = history.Recorder(f.etcd, f.group, prefix=prefix)  # type: ignore[attr-defined]
    await f.recorder.start()  # type: ignore[attr-defined]
    try:
        yield f
    finally:
        await f.close()


async def _history_clean(fleet: Fleet) -> None:
    recorded = await fleet.recorder.stop()  # type: ignore[attr-defined]
    assert history.check(recorded) == []


def _log_entry(path: Path, event: str, fields: dict[str, Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items()):
            return entry  # type: ignore[no-any-return]
    return None


async def _logged(m: Machine, event: str, **fields: Any) -> None:
    """Until the machine's agent processes (any of its boots) logged ``event`` with ``fields``."""
    await poll_until(lambda: _log_entry(m.log_path, event, fields) is not None)


def _done(fleet: Fleet, m: Machine) -> bool:
    w = fleet.watch
    assert w is not None
    return w.releases(m.machine_id) >= 1


async def _completed(fleet: Fleet, m: Machine) -> None:
    """The cycle finished: the slot was released, the agent runs 2.0.0 and its coordinator idles."""
    assert fleet.watch is not None
    await fleet.watch.wait(lambda: _done(fleet, m), within=90)
    await poll_until(lambda: m.coordinator_record().get("state") == "idle")
    assert m.agent_state().get("current_version") == "2.0.0"
    assert m.reboots() == 1, [c.at for c in m.logind.calls]  # type: ignore[union-attr]
    assert fleet.watch.grants(m.machine_id) == 1 and fleet.watch.releases(m.machine_id) == 1
    assert fleet.watch.holding() == set()
    assert (await read_state(fleet.etcd, fleet.group, prefix=fleet.prefix)).queue == []


# ------------------------------------------------------------------------------- fleets


async def test_three_hosts_with_one_slot_never_reboot_together(fleet: Fleet) -> None:
    fleet.publish("2.0.0")
    machines = fleet.add(3, process=True)
    assert fleet.watch is not None
    seen: dict[str, set[str]] = {}

    def at_reboot(m: Machine) -> None:
        seen[m.name] = set(fleet.watch.holding())  # type: ignore[union-attr]

    for m in machines:
        m.reboot_hook = at_reboot
    await asyncio.gather(*(m.start() for m in machines))
    await fleet.watch.wait(lambda: all(_done(fleet, m) for m in machines), within=120)
    for m in machines:
        assert m.reboots() == 1
        assert seen[m.name] == {m.machine_id}  # at logind's Reboot it alone held a slot
    assert fleet.watch.max_concurrent() == 1
    await _history_clean(fleet)

    # updatectl shows the coordinator, in text and JSON, options after the subcommand.
    m = machines[0]
    await poll_until(lambda: m.coordinator_record().get("state") == "idle")
    env = {"UPDATECTL_BUS_ADDRESS": m.bus.address, "PATH": str(VENV_BIN)}
    out = await asyncio.to_thread(subprocess.run, [str(VENV_BIN / "updatectl"), "status", "--output", "json"],
                                  capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)["coordinator"]
    assert doc["state"] == "idle" and doc["strategy"] == "etcd-lock" and doc["group"] == "prod"
    assert doc["status"] == "idle: no reboot needed"
    text = (await asyncio.to_thread(subprocess.run, [str(VENV_BIN / "updatectl"), "status"], capture_output=True,
                                    text=True, env=env, timeout=30)).stdout
    assert "Reboot:           idle: no reboot needed" in text
    assert "Coordinator:      idle (etcd-lock, group prod)" in text


# ------------------------------------------------------------------------------- crash points


@pytest.mark.parametrize("state", ["waiting_for_window", "holding", "pre_reboot_hooks", "waiting_for_users",
                                   "rebooting"])
async def test_sigkill_before_the_reboot(fleet: Fleet, state: str) -> None:
    fleet.publish("2.0.0")
    (m,) = fleet.add(1, process=True)
    m.env = {"UPDATE_AGENT_TEST_HOLD_IN": state}
    await m.start()
    await _logged(m, "coordinator_held_for_test", state=state)
    m.kill()
    assert m.coordinator_record()["state"] == state
    assert m.reboots() == 0
    m.env = {}
    await m.start()
    await _completed(fleet, m)
    await _history_clean(fleet)


async def test_sigkill_while_queued(fleet: Fleet) -> None:
    fleet.publish("2.0.0")
    (m,) = fleet.add(1, process=True)
    async with Semaphore(fleet.etcd, fleet.group, prefix=fleet.prefix) as blocker:
        await blocker.lock("blocker")
        await m.start()

        async def queued() -> bool:
            st = await read_state(fleet.etcd, fleet.group, prefix=fleet.prefix)
            return [w.id for w in st.queue] == [m.machine_id]

        await poll_until(queued)
        m.kill()  # its queue key stays until its lease runs out
        assert m.coordinator_record()["state"] == "queued"
        await m.start()
        await _logged(m, "coordinator_resume", state="queued")
        await blocker.unlock("blocker")
        await _completed(fleet, m)
    await _history_clean(fleet)


async def test_sigkill_inside_loginds_reboot(fleet: Fleet) -> None:
    """Killed in ``rebooting`` after the call reached logind: the reboot happens once."""
    fleet.publish("2.0.0")
    (m,) = fleet.add(1, process=True)
    m.reboot_hook = lambda machine: machine.kill()
    await m.start()
    await _completed(fleet, m)
    await _history_clean(fleet)


@pytest.mark.parametrize("state", ["after_boot", "releasing"])
async def test_sigkill_after_the_boot(fleet: Fleet, state: str) -> None:
    fleet.publish("2.0.0")
    (m,) = fleet.add(1, process=True)

    def hold_after_boot(machine: Machine) -> None:
        machine.env = {"UPDATE_AGENT_TEST_HOLD_IN": state}

    m.reboot_hook = hold_after_boot
    await m.start()
    await _logged(m, "coordinator_held_for_test", state=state)
    m.kill()
    assert m.coordinator_record()["state"] == state
    m.env = {}
    m.reboot_hook = None
    started = time.monotonic()
    await m.start()
    await _completed(fleet, m)
    assert time.monotonic() - started < 60
    await _history_clean(fleet)


async def test_sigkill_while_failed(fleet: Fleet) -> None:
    """A pre-reboot hook failed (slot given back); killed there. After the operator fixed the hook,
    the restarted agent asks again (it resumes UPDATED_NEED_REBOOT) and the cycle completes."""
    fleet.publish("2.0.0")
    (m,) = fleet.add(1, process=True)
    m.pre_dir.mkdir()
    hook = m.pre_dir / "10-drain"
    hook.write_text("#!/bin/sh\necho cannot drain >&2\nexit 4\n")
    hook.chmod(0o755)
    m.env = {"UPDATE_AGENT_TEST_HOLD_IN": "failed"}
    await m.start()
    await _logged(m, "coordinator_held_for_test", state="failed")
    m.kill()
    assert m.coordinator_record()["state"] == "failed" and m.reboots() == 0
    assert fleet.watch is not None and fleet.watch.holding() == set()  # given back before the kill
    hook.write_text("#!/bin/sh\necho drained\n")
    m.env = {}
    await m.start()
    await fleet.watch.wait(lambda: fleet.watch.releases(m.machine_id) == 2, within=90)  # type: ignore[union-attr]
    await poll_until(lambda: m.coordinator_record().get("state") == "idle")
    assert m.reboots() == 1 and fleet.watch.grants(m.machine_id) == 2  # the failed attempt's, and this one
    assert m.agent_state().get("current_version") == "2.0.0"
    await _history_clean(fleet)
