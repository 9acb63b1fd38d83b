"""A Flatcar host's update.conf (REBOOT_STRATEGY=etcd-lock, LOCKSMITHD_ENDPOINT, LOCKSMITHD_GROUP and
locksmith's local window) drives the agent that ``build_agent`` makes from it: the coordinator
reaches etcd at those endpoints, joins that group, and holds the reboot until the host's local
window opens. The agent TOML says nothing about reboots or etcd."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import fleetrig
import pytest
from fleetrig import Fleet, Machine

from updateagent.agent import Phase
from updateagent.config import load_settings
from updateagent.strategy.coordinator import Coordinator, CoordState
from updateagent.strategy.etcd_lock import EtcdSlot

UPDATE_CONF = """\
# Written by Ignition on a Flatcar host that ran locksmithd.
GROUP=stable
REBOOT_STRATEGY=etcd-lock
LOCKSMITHD_ENDPOINT={endpoints}
LOCKSMITHD_GROUP={group}
LOCKSMITHD_REBOOT_WINDOW_START="Sat 03:00"
LOCKSMITHD_REBOOT_WINDOW_LENGTH=1h30m
"""


@pytest.fixture
async def fleet(tmp_path: Path, etcd_config, prefix: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Fleet]:
    monkeypatch.setenv("TZ", "Europe/Berlin")  # the host's local time: UTC+1 in November
    f = await Fleet(tmp_path, etcd_config, prefix).open()
    try:
        yield f
    finally:
        await f.close()


def _flatcar_machine(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> tuple[Machine, Path]:
    """A rig machine whose agent TOML has no [reboot] strategy and no [locksmith] table, and
    which reads the Flatcar update.conf (on every start, power cycles included)."""
    (m,) = fleet.add(1)
    uc = m.root / "update.conf"
    uc.write_text(UPDATE_CONF.format(endpoints=",".join(fleet.etcd_config.endpoints), group=fleet.group))
    rig_config = m.write_config

    def write_config() -> Path:
        path = rig_config()
        text = path.read_text()
        text = re.sub(r"(?ms)^\[locksmith\]\n.*?\n\n", "", text)  # endpoints and group: update.conf's
        text = re.sub(r'(?m)^strategy = "etcd-lock"\n', "", text)
        # Only the key prefix stays: each test has its own under the shared embedded etcd.
        path.write_text(text + f'\n[locksmith]\nprefix = "{fleet.prefix}"\n')
        return path

    monkeypatch.setattr(m, "write_config", write_config)
    monkeypatch.setattr(fleetrig, "load_settings",
                        lambda config, update_conf_paths, env: load_settings(config, update_conf_paths=(uc,), env=env))
    return m, uc


async def test_the_agent_built_from_a_flatcar_update_conf_uses_its_endpoints_group_and_window(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    m, uc = _flatcar_machine(fleet, monkeypatch)
    fleet.publish("2.0.0")
    await m.start()
    settings = load_settings(m.write_config(), update_conf_paths=(uc,), env={})
    assert settings.origins["reboot.strategy"] == f"{uc}: REBOOT_STRATEGY"
    assert settings.origins["locksmith.endpoints"] == f"{uc}: LOCKSMITHD_ENDPOINT"
    coordinator = m.coordinator
    assert isinstance(coordinator, Coordinator) and isinstance(coordinator.backend, EtcdSlot)
    assert coordinator.backend.settings.etcd_config().endpoints == fleet.etcd_config.endpoints
    assert coordinator.backend.group == fleet.group
    assert coordinator.options.local_window == settings.reboot.local_window is not None

    assert m.agent is not None
    m.agent.request_check()
    # Saturday 01:00 UTC is 02:00 in Berlin: the host's window (Sat 03:00 local) opens in an hour.
    await m.wait_status(lambda t: t.startswith("waiting for window: opens Sat 03:00"))
    assert m.agent.phase is Phase.UPDATED_NEED_REBOOT
    assert fleet.watch.grants(m.machine_id) == 0 and m.reboots() == 0

    fleet.clock.advance(3600)  # 02:00 UTC = 03:00 local: open
    await fleet.watch.wait(lambda: fleet.watch.releases(m.machine_id) == 1)
    await m.wait_state(CoordState.IDLE)
    assert m.reboots() == 1 and fleet.watch.grants(m.machine_id) == 1
    assert m.agent is not None and m.agent.state.current_version == "2.0.0"



@pytest.mark.parametrize(("policy_start", "policy_length", "one_open_after", "both_open_after"), [
    ("01:30", "2h", 45, 15),  # 01:45 UTC: the group's window is open, the host's (02:00 UTC) not yet
    ("02:30", "30m", 60, 30),  # 02:00 UTC: the host's window is open, the group's (02:30) not yet
])
async def test_the_host_window_and_the_group_policy_window_must_both_be_open(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, policy_start: str, policy_length: str, one_open_after: int,
    both_open_after: int,
) -> None:
    """locksmith's local window stays; the group's policy window applies on top of it.
    Host window: Sat 03:00-04:30 Berlin = 02:00-03:30 UTC; the clock starts at Sat 01:00 UTC."""
    await fleet.policy(windows=[{"days": ["Sat"], "start": policy_start, "length": policy_length}])
    m, _ = _flatcar_machine(fleet, monkeypatch)
    fleet.publish("2.0.0")
    await m.start()
    assert m.agent is not None
    m.agent.request_check()
    await m.wait_status(lambda t: t.startswith("waiting for window: opens Sat"))

    fleet.clock.advance(one_open_after * 60)  # one of the two windows is open
    await m.wait_status(lambda t: t.startswith("waiting for window: opens Sat")
                        and t.endswith(f"(in {both_open_after}m)"))
    assert fleet.watch.grants(m.machine_id) == 0 and m.reboots() == 0

    fleet.clock.advance(both_open_after * 60)  # both open
    await fleet.watch.wait(lambda: fleet.watch.releases(m.machine_id) == 1)
    assert m.reboots() == 1 and fleet.watch.grants(m.machine_id) == 1
