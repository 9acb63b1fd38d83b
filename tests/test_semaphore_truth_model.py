"""Every answer is true, whatever replies are lost (issue 7, defect 3), as a state machine on a
real etcd (hypothesis): try_lock / lock / unlock / release_overdue / set_max / pause against a
reference model, any transaction's reply lost after it commits, and etcd's own history checked at
the end by locksmith.history."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from locksmith.errors import SlotUnavailableError
from locksmith.etcd import Etcd, EtcdConfig, LostReply
from locksmith.history import Recorder, ReportedGrant, check
from locksmith.semaphore import Holder, Semaphore

IDS = st.sampled_from(["a", "b", "c"])
_config: EtcdConfig | None = None
# Replies lost, and machines run, over the whole test: every run must really have lost some.
_dropped = [0]
_runs = [0]


class _Later:
    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(hours=2)

    def monotonic(self) -> float:
        return 0.0

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class TruthMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert _config is not None
        self.loop = asyncio.new_event_loop()
        # A member whose reply was lost is passed over only briefly: the adapter retries at once.
        self.etcd = self.run(Etcd.connect(dataclasses.replace(_config, member_cooldown=0.02)))
        prefix = f"truth-{secrets.token_hex(4)}/"
        self.sem = Semaphore(self.etcd, "g", prefix=prefix)
        self.late = Semaphore(self.etcd, "g", prefix=prefix, clock=_Later())
        self.recorder = Recorder(self.etcd, "g", prefix=prefix)
        self.run(self.recorder.start())
        self.holders: dict[str, Holder] = {}
        self.reported: list[ReportedGrant] = []
        self.max = 1
        self.paused = False
        self.dropped = 0

    def run(self, aw: Any) -> Any:
        return self.loop.run_until_complete(aw)

    def lose(self, lose: bool) -> LostReply | None:
        if not lose:
            return None
        fault = LostReply("Txn", count=1)
        self.etcd.lost_replies.append(fault)
        return fault

    def done(self, fault: LostReply | None) -> None:
        if fault is not None:
            self.etcd.lost_replies.remove(fault)
            self.dropped += fault.dropped
            _dropped[0] += fault.dropped

    def teardown(self) -> None:
        try:
            history = self.run(self.recorder.stop())
            assert check(history, self.reported) == []
        finally:
            self.run(self.sem.close())
            self.run(self.late.close())
            self.run(self.etcd.close())
            self.loop.close()

    def granted(self, h: Holder) -> None:
        kv = self.run(self.etcd.get(self.sem.layout.holder(h.id)))
        assert kv is not None and kv.mod_revision == h.revision, f"{h} returned, key is {kv}"
        self.holders[h.id] = h
        self.reported.append(ReportedGrant(h.id, h.revision))

    @initialize(holder_id=IDS)
    def grant_with_its_reply_lost(self, holder_id: str) -> None:
        """Every run starts with a grant whose reply is lost after it committed: the random ``lose``
        flags alone left some runs (and, about 2 runs of 3, the whole test) with few or no losses.
        A fresh group has a free slot, so try_lock's first transaction is the grant itself."""
        self.try_lock(holder_id, lose=True)
        assert self.dropped == 1, "the grant's reply was not lost: the fault injection did not fire"
        _runs[0] += 1

    @rule(holder_id=IDS, lose=st.booleans())
    def try_lock(self, holder_id: str, lose: bool) -> None:
        expect = holder_id in self.holders or (not self.paused and len(self.holders) < self.max)
        fault = self.lose(lose)
        try:
            h = self.run(self.sem.try_lock(holder_id, hold_for=timedelta(minutes=1)))
        except SlotUnavailableError:
            assert not expect
            return
        finally:
            self.done(fault)
        assert expect and h.id == holder_id
        self.granted(h)

    @rule(holder_id=IDS, lose=st.booleans())
    def lock_when_free(self, holder_id: str, lose: bool) -> None:
        if holder_id not in self.holders and (self.paused or len(self.holders) >= self.max):
            return  # would wait: try_lock covers the refusal
        fault = self.lose(lose)
        try:
            h = self.run(asyncio.wait_for(self.sem.lock(holder_id, hold_for=timedelta(minutes=1)), 20))
        finally:
            self.done(fault)
        self.granted(h)

    @rule(holder_id=IDS, lose=st.booleans())
    def unlock(self, holder_id: str, lose: bool) -> None:
        fault = self.lose(lose)
        try:
            assert self.run(self.sem.unlock(holder_id)) is (holder_id in self.holders)
        finally:
            self.done(fault)
        self.holders.pop(holder_id, None)

    @rule(holder_id=IDS, lose=st.booleans(), stale=st.booleans())
    def release_overdue(self, holder_id: str, lose: bool, stale: bool) -> None:
        held = self.holders.get(holder_id)
        revision = held.revision if held is not None else 1
        if stale:
            revision -= 1  # never the grant in place
        fault = self.lose(lose)
        try:
            ok = self.run(self.late.release_overdue(holder_id, revision, by="model", reason="overdue"))
        finally:
            self.done(fault)
        assert ok is (held is not None and not stale)
        if ok:
            del self.holders[holder_id]

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
        assert {h.id: h.revision for h in state.holders} == {k: h.revision for k, h in self.holders.items()}
        assert state.queue == []


def test_every_answer_is_true_with_lost_replies(etcd_config: EtcdConfig) -> None:
    global _config
    _config = etcd_config
    _dropped[0] = _runs[0] = 0
    run_state_machine_as_test(
        TruthMachine,
        settings=settings(max_examples=12, stateful_step_count=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )
    # Each run lost its first grant's reply (checked in the run); more come from the rules' flags.
    assert _runs[0] >= 1 and _dropped[0] >= _runs[0], (_runs[0], _dropped[0])
