"""Stateful property test: random sequences of releases, checks, reboots with passing or failing
health checks, and reboots where the agent never ran, on one emulated machine.

After every step: no payload was downloaded twice (a failed version is never applied again),
both GPT copies are valid, the bootloader finds a bootable slot, the running version is never a
denied one, a pending update is never a denied version, and every bootable slot the agent
believes holds version V holds exactly V's image.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from pathlib import Path

from agentrig import Rig
from gptimg import MiB, sgdisk_verify
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from updateagent import gpt
from updateagent.agent import Agent, Phase
from updateagent.bootloader import choose_partition, read_boot_record
from updateagent.checker import in_thread

IMAGE = 1 * MiB


class AgentMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="agent-machine-"))
        self.rig = Rig(self.tmp / "m", slot_size=4 * MiB)
        self.released = 0
        self.digests: dict[str, str] = {}
        self.agent: Agent | None = None
        self._settle(check=False, healthy=True)
        # Slot A holds the factory image: whatever bytes are there now.
        self.digests["1.0.0"] = self.rig.slot_digest("A", IMAGE)
        self.release()  # start with an update on offer: shorter paths to the interesting states

    def teardown(self) -> None:
        self.rig.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _settle(self, *, check: bool, healthy: bool) -> Phase:
        health = [{"command": ["true"] if healthy else ["false"]}]

        async def go() -> Phase:
            # A new agent object every step: restarts within a boot must be harmless too.
            # Checks in a thread (as the simulator runs them): this explores the agent's state
            # machine, and a process per check would double its time; tests/test_checker.py
            # holds the two ways to the same results.
            self.agent = self.rig.agent(health=health, run_check=in_thread)
            await self.agent.start()
            return await self.agent.run_until_settled(check=check)

        return asyncio.run(go())

    def _offer_taken(self) -> bool:
        """The latest release is running, applied, or refused: publishing another one is worth it."""
        state = self.agent.state if self.agent is not None else None
        if state is None:
            return True
        latest = f"2.{self.released}.0"
        pending = state.pending.version if state.pending is not None else ""
        return latest in (state.current_version, pending) or state.denied(latest)

    @precondition(lambda self: self._offer_taken())
    @rule()
    def release(self) -> None:
        self.released += 1
        version = f"2.{self.released}.0"
        self.rig.publish(version, size=IMAGE)
        self.digests[version] = hashlib.sha256(self.rig.images[version]).hexdigest()

    @rule()
    def check(self) -> None:
        phase = self._settle(check=True, healthy=True)
        assert phase in (Phase.IDLE, Phase.UPDATED_NEED_REBOOT)
        assert self.agent is not None
        assert self.agent.errors == 0, self.agent.state.last_error

    @rule(healthy=st.booleans())
    def reboot(self, healthy: bool) -> None:
        self.rig.boot()
        self._settle(check=False, healthy=healthy)
        assert self.agent is not None
        pending = self.agent.state.pending
        if pending is not None and pending.kind == "rollback":
            # The agent asked to go back to the good slot; the reboot manager obliges.
            self.rig.boot()
            assert self._settle(check=False, healthy=healthy) is Phase.IDLE
            assert self.agent.state.last_boot_outcome == "rolled_back"

    @rule()
    def reboot_without_agent(self) -> None:
        """The node boots, hangs or crashes before the agent runs, and is power cycled."""
        self.rig.boot()

    @invariant()
    def disk_is_consistent_and_bootable(self) -> None:
        sgdisk_verify(self.rig.disk)
        assert choose_partition(gpt.read_gpt(self.rig.disk.path).partitions) is not None

    @invariant()
    def no_version_is_downloaded_twice(self) -> None:
        """Nothing here interrupts an apply or resets one, so a second download of the same
        payload can only mean a version that failed (health check or no boot) was applied again."""
        gets: dict[str, int] = {}
        for request in self.rig.server.requests:
            if request.method == "GET" and "/payload-" in request.path:
                gets[request.path] = gets.get(request.path, 0) + 1
        assert all(n == 1 for n in gets.values()), gets

    @invariant()
    def versions_and_contents_agree(self) -> None:
        agent = self.agent
        assert agent is not None
        state = agent.state
        denied = {d.version for d in state.deny_list}
        assert state.current_version and state.current_version not in denied
        if state.pending is not None and state.pending.kind == "update":
            assert state.pending.version not in denied
        for slot in self.rig.slots().read():
            version = state.slot_versions.get(slot.partuuid)
            if version and slot.bootable:
                assert self.rig.slot_digest(slot.name, IMAGE) == self.digests[version], (slot, version)
        record = read_boot_record(self.rig.record)
        booted = next(s for s in self.rig.slots().read() if s.partuuid == record.partuuid)
        assert state.slot_versions.get(booted.partuuid, "1.0.0") in self.digests


AgentMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=10, deadline=None)
TestAgentMachine = AgentMachine.TestCase
