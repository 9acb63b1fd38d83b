"""try_lock / unlock / set_max / pause against a reference model, on a real etcd (hypothesis)."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from locksmith.errors import SlotUnavailableError
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.semaphore import Semaphore

IDS = st.sampled_from(["a", "b", "c", "d"])
_config: EtcdConfig | None = None


class SemaphoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert _config is not None
        self.loop = asyncio.new_event_loop()
        self.etcd = self.run(Etcd.connect(_config))
        self.sem = Semaphore(self.etcd, "g", prefix=f"m-{secrets.token_hex(4)}/")
        self.holders: set[str] = set()
        self.max = 1
        self.paused = False

    def run(self, aw: Any) -> Any:
        return self.loop.run_until_complete(aw)

    def teardown(self) -> None:
        self.run(self.sem.close())
        self.run(self.etcd.close())
        self.loop.close()

    @rule(holder_id=IDS)
    def try_lock(self, holder_id: str) -> None:
        before = self.run(self.etcd.revision())
        expect = holder_id in self.holders or (not self.paused and len(self.holders) < self.max)
        try:
            held = self.run(self.sem.try_lock(holder_id))
        except SlotUnavailableError:
            assert not expect, f"refused {holder_id} with holders {self.holders}, max {self.max}"
            assert self.run(self.etcd.revision()) == before
            return
        assert expect, f"granted {holder_id} with holders {self.holders}, max {self.max}, paused {self.paused}"
        assert held.id == holder_id
        if holder_id in self.holders:
            assert self.run(self.etcd.revision()) == before  # recursive: no write
        self.holders.add(holder_id)

    @rule(holder_id=IDS)
    def unlock(self, holder_id: str) -> None:
        before = self.run(self.etcd.revision())
        assert self.run(self.sem.unlock(holder_id)) is (holder_id in self.holders)
        if holder_id not in self.holders:
            assert self.run(self.etcd.revision()) == before
        self.holders.discard(holder_id)

    @rule(n=st.integers(1, 3))
    def set_max(self, n: int) -> None:
        self.run(self.sem.set_max(n))
        self.max = n

    @rule(on=st.booleans())
    def pause(self, on: bool) -> None:
        key = self.sem.layout.pause
        if on:
            self.run(self.etcd.put(key, json.dumps({"format_version": 1, "reason": "test"}).encode()))
        else:
            self.run(self.etcd.delete(key))
        self.paused = on

    @invariant()
    def matches_model(self) -> None:
        state = self.run(self.sem.state())
        assert {h.id for h in state.holders} == self.holders
        assert (state.max, state.paused, state.queue) == (self.max, self.paused, [])
        assert state.available == max(0, self.max - len(self.holders))


def test_semaphore_against_model(etcd_config: EtcdConfig) -> None:
    global _config
    _config = etcd_config
    run_state_machine_as_test(
        SemaphoreMachine,
        settings=settings(max_examples=15, stateful_step_count=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )
