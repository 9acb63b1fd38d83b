"""End to end on one machine: a real channel over HTTP, a real GPT image, the emulated bootloader.

Release 2.0.0 is published with build_release; the agent applies it into USR-B; cgpt sees the
bits; the emulated bootloader boots B; the restarted agent runs its health checks and either
marks B good or rolls back to A and denies 2.0.0 for good.
"""

from __future__ import annotations

from agentrig import Rig
from gptimg import cgpt_attr, gptprio_bits, sgdisk_verify

from updateagent.agent import Phase

USR_A, USR_B = 3, 4


async def _apply_release_2(rig: Rig, **settings: object) -> None:
    rig.publish("2.0.0")
    agent = rig.agent(**settings)
    await agent.start()
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT, agent.state.last_error
    # New slot: successful 0, tries 1, highest priority; the old slot stays good below it.
    assert cgpt_attr(rig.disk, USR_B) == gptprio_bits(2, 1, False)
    assert cgpt_attr(rig.disk, USR_A) == gptprio_bits(1, 0, True)
    assert rig.slot_digest("B", len(rig.images["2.0.0"])) == _sha(rig.images["2.0.0"])
    sgdisk_verify(rig.disk)


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


async def test_update_boots_and_is_marked_good(rig: Rig) -> None:
    await _apply_release_2(rig)

    record = rig.boot()  # the reboot
    assert record.slot == "B"
    assert cgpt_attr(rig.disk, USR_B) == gptprio_bits(2, 0, False)  # the bootloader spent the try

    agent = rig.agent()  # the agent starting after the reboot
    await agent.start()
    assert await agent.run_until_settled() is Phase.IDLE
    assert cgpt_attr(rig.disk, USR_B) == gptprio_bits(2, 0, True)
    assert cgpt_attr(rig.disk, USR_A) == gptprio_bits(1, 0, True)
    assert agent.state.current_version == "2.0.0"
    assert agent.state.last_boot_outcome == "success"
    assert agent.state.pending is None
    outcome = [e for e in agent.state.history if e.event == "boot_outcome"][-1]
    assert outcome.details["outcome"] == "success" and outcome.details["how"] == "health_checks"
    sgdisk_verify(rig.disk)

    # Later boots keep booting B without spending tries.
    assert rig.boot().slot == "B"
    assert cgpt_attr(rig.disk, USR_B) == gptprio_bits(2, 0, True)


async def test_failing_health_check_rolls_back_and_denies_the_version(rig: Rig) -> None:
    await _apply_release_2(rig)
    assert rig.boot().slot == "B"

    failing = [{"command": ["sh", "-c", "echo service down; exit 3"], "name": "app"}]
    agent = rig.agent(health=failing)
    await agent.start()
    # The agent marks B bad and asks for a reboot back into A.
    assert await agent.run_until_settled() is Phase.UPDATED_NEED_REBOOT
    assert agent.state.last_boot_outcome == "health_check_failed"
    assert "app: exit 3: service down" in agent.state.last_error
    assert agent.state.denied("2.0.0")
    assert agent.state.pending is not None and agent.state.pending.kind == "rollback"
    assert cgpt_attr(rig.disk, USR_B) == gptprio_bits(0, 0, False)
    assert cgpt_attr(rig.disk, USR_A) == gptprio_bits(1, 0, True)

    assert rig.boot().slot == "A"
    agent = rig.agent(health=failing)
    await agent.start()
    seen: list[str] = []
    agent.subscribe(lambda s: seen.append(s.current_operation))
    assert await agent.run_until_settled() is Phase.IDLE
    assert "UPDATE_STATUS_REPORTING_ERROR_EVENT" in seen
    assert agent.state.last_boot_outcome == "rolled_back"
    assert agent.state.current_version == "1.0.0"
    assert [d.version for d in agent.state.deny_list] == ["2.0.0"]

    # The channel still offers 2.0.0: a check refuses it without downloading anything.
    before = len(rig.server.requests_for(rig.payload_path("2.0.0")))
    manifests = len(rig.server.requests_for("/stable/manifest.json"))
    assert await agent.run_until_settled(check=True) is Phase.IDLE
    assert len(rig.server.requests_for("/stable/manifest.json")) == manifests + 1
    assert len(rig.server.requests_for(rig.payload_path("2.0.0"))) == before
    assert agent.state.history[-1].event == "update_refused"
    assert cgpt_attr(rig.disk, USR_B) == gptprio_bits(0, 0, False)
    sgdisk_verify(rig.disk)

    # A fixed release is taken again.
    rig.publish("2.0.1")
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT
    assert agent.state.new_version == "2.0.1"


async def test_new_slot_that_never_reports_is_rolled_back(rig: Rig) -> None:
    """The new slot boots but the agent never runs (hang, crash): its try is spent, A boots again."""
    await _apply_release_2(rig)
    assert rig.boot().slot == "B"  # ... and nothing marks it
    assert rig.boot().slot == "A"  # tries exhausted: the bootloader falls back

    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled() is Phase.IDLE
    assert agent.state.last_boot_outcome == "rolled_back"
    assert agent.state.denied("2.0.0")
    assert "2.0.0 did not boot" in agent.state.last_error
    assert cgpt_attr(rig.disk, USR_B) == gptprio_bits(0, 0, False)
    assert agent.state.current_version == "1.0.0"

    before = len(rig.server.requests_for(rig.payload_path("2.0.0")))
    assert await agent.run_until_settled(check=True) is Phase.IDLE
    assert len(rig.server.requests_for(rig.payload_path("2.0.0"))) == before


async def test_state_survives_agent_restart(rig: Rig) -> None:
    await _apply_release_2(rig)
    again = rig.agent()  # same boot: the daemon restarted, the machine did not
    await again.start()
    assert await again.run_until_settled() is Phase.UPDATED_NEED_REBOOT
    assert again.status().as_tuple()[2:] == ("UPDATE_STATUS_UPDATED_NEED_REBOOT", "2.0.0", 3 * 1024 * 1024)
    # No after-boot logic ran again and no check happens while the update waits.
    assert [e.event for e in again.state.history].count("booted") == 1
    assert again.request_check() is False
