"""The failure budget in a real etcd: threshold, exactly-once automatic pause under 50 concurrent
reporters, incident de-duplication, operator pause precedence, resume clearing the count."""

from __future__ import annotations

import asyncio

import pytest

from locksmith import audit
from locksmith.budget import FailureReport, count_failures, list_failures, report_failure
from locksmith.errors import InvalidArgumentError
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.keys import Layout
from locksmith.policy import parse_policy_text
from locksmith.policystore import apply_policy, pause, read_pause, resume


async def _policy(etcd: Etcd, prefix: str, group: str, budget: int) -> None:
    text = f'format_version = 1\ngroup = "{group}"\nfailure_budget = {budget}\n'
    await apply_policy(etcd, parse_policy_text(text), prefix=prefix)


def _auto_pauses(entries: list[audit.AuditEntry]) -> list[audit.AuditEntry]:
    return [e for e in entries if e.action == "pause" and e.detail.get("source") == "failure-budget"]


async def test_budget_n_tolerates_n_failures(etcd: Etcd, prefix: str) -> None:
    await _policy(etcd, prefix, "web", 2)
    r1 = await report_failure(etcd, "web", "h1", "unhealthy", "kubelet down", prefix=prefix)
    r2 = await report_failure(etcd, "web", "h2", "overdue", prefix=prefix)
    assert (r1.count, r1.paused, r2.count, r2.paused) == (1, False, 2, False)
    assert await read_pause(etcd, "web", prefix=prefix) is None
    r3 = await report_failure(etcd, "web", "h3", "unhealthy", "boot loop", prefix=prefix)
    assert r3.count == 3 and r3.budget == 2 and r3.paused
    ps = await read_pause(etcd, "web", prefix=prefix)
    assert ps is not None and ps.source == "failure-budget"
    assert "3 failed host(s), budget 2" in ps.reason and "h3 unhealthy: boot loop" in ps.reason
    # Further failures are counted but do not pause again.
    r4 = await report_failure(etcd, "web", "h4", "unhealthy", prefix=prefix)
    assert r4.count == 4 and not r4.paused
    assert [f.host for f in await list_failures(etcd, "web", prefix=prefix)] == ["h1", "h2", "h3", "h4"]
    entries = await audit.read(etcd, Layout("web", prefix))
    assert len(_auto_pauses(entries)) == 1
    assert [e.subject for e in entries if e.action == "failure"] == ["h1", "h2", "h3", "h4"]


async def test_budget_zero_pauses_on_first_failure_and_default_policy_applies(etcd: Etcd, prefix: str) -> None:
    # No policy stored: the default budget (0) applies.
    r = await report_failure(etcd, "db", "h1", "overdue", prefix=prefix)
    assert r.budget == 0 and r.paused


async def test_fifty_concurrent_reporters_lose_nothing_and_pause_once(etcd_config: EtcdConfig, prefix: str) -> None:
    clients = [await Etcd.connect(etcd_config) for _ in range(10)]
    try:
        await _policy(clients[0], prefix, "web", 10)
        start = asyncio.Event()

        async def reporter(i: int) -> FailureReport:
            await start.wait()
            return await report_failure(clients[i % len(clients)], "web", f"host-{i:02d}", "unhealthy", f"#{i}",
                                 prefix=prefix)

        tasks = [asyncio.create_task(reporter(i)) for i in range(50)]
        start.set()
        reports = await asyncio.gather(*tasks)
        # Many reporters saw the budget spent and raced for the pause; exactly one won.
        assert sum(r.count > 10 for r in reports) >= 2
        assert sum(r.paused for r in reports) == 1
        etcd = clients[0]
        layout = Layout("web", prefix)
        assert await count_failures(etcd, "web", prefix=prefix) == 50
        pkv = await etcd.get(layout.pause)
        assert pkv is not None and pkv.version == 1  # written once, never overwritten
        entries = await audit.read(etcd, layout)
        assert len(_auto_pauses(entries)) == 1
        assert len([e for e in entries if e.action == "failure"]) == 50
    finally:
        for c in clients:
            await c.close()


async def test_same_incident_counts_once(etcd: Etcd, prefix: str) -> None:
    await _policy(etcd, prefix, "web", 5)
    a = await report_failure(etcd, "web", "h1", "overdue", incident="rev-42", prefix=prefix)
    b = await report_failure(etcd, "web", "h1", "overdue", incident="rev-42", prefix=prefix)
    assert a.recorded and not b.recorded and b.count == 1
    with pytest.raises(InvalidArgumentError):
        await report_failure(etcd, "web", "h1", "overdue", incident="a/b", prefix=prefix)
    with pytest.raises(InvalidArgumentError):
        await report_failure(etcd, "web", "h1", "exploded", prefix=prefix)  # type: ignore[arg-type]


async def test_operator_pause_is_never_overwritten(etcd: Etcd, prefix: str) -> None:
    await pause(etcd, "web", "change freeze", by="alice@ops", prefix=prefix)
    r = await report_failure(etcd, "web", "h1", "unhealthy", prefix=prefix)
    assert r.count == 1 and not r.paused
    ps = await read_pause(etcd, "web", prefix=prefix)
    assert ps is not None and ps.source == "operator" and ps.reason == "change freeze"


async def test_resume_clears_count_keep_failures_repauses(etcd: Etcd, prefix: str) -> None:
    await _policy(etcd, prefix, "web", 1)
    await report_failure(etcd, "web", "h1", "unhealthy", prefix=prefix)
    assert (await report_failure(etcd, "web", "h2", "unhealthy", prefix=prefix)).paused
    assert await resume(etcd, "web", reset_failures=False, prefix=prefix)
    # The count was kept above the budget, so the next failure pauses again at once.
    again = await report_failure(etcd, "web", "h3", "unhealthy", prefix=prefix)
    assert again.count == 3 and again.paused
    assert await resume(etcd, "web", prefix=prefix)
    assert await count_failures(etcd, "web", prefix=prefix) == 0
    fresh = await report_failure(etcd, "web", "h4", "unhealthy", prefix=prefix)
    assert fresh.count == 1 and not fresh.paused


async def test_unreadable_policy_records_but_defers_the_decision(etcd: Etcd, prefix: str) -> None:
    layout = Layout("web", prefix)
    await etcd.put(layout.policy, b'{"format_version": 7}')
    r = await report_failure(etcd, "web", "h1", "unhealthy", prefix=prefix)
    assert r.recorded and r.count == 1 and r.budget is None and not r.paused
    assert await etcd.get(layout.pause) is None
    # Once the policy is readable again the next report takes the (durable) count into account.
    await apply_policy(etcd, parse_policy_text('format_version = 1\ngroup = "web"\nfailure_budget = 1\n'),
                       prefix=prefix)
    assert (await report_failure(etcd, "web", "h2", "unhealthy", prefix=prefix)).paused


class _ResumeAfterCount(Etcd):
    """Runs an operator's ``resume`` right after a reporter has counted the failures, before it
    sends its automatic-pause transaction: the interleaving of two real clients, made certain."""

    group = "web"
    prefix = ""
    fired = False

    async def count_prefix(self, prefix: str) -> int:
        n = await super().count_prefix(prefix)
        if prefix.endswith("/failures/") and not self.fired:
            self.fired = True
            assert await resume(self, self.group, prefix=self.prefix)
        return n


async def test_resume_between_count_and_auto_pause_is_not_undone(etcd_config: EtcdConfig, etcd: Etcd,
                                                                 prefix: str) -> None:
    await _policy(etcd, prefix, "web", 0)
    assert (await report_failure(etcd, "web", "h1", "unhealthy", prefix=prefix)).paused
    racer = await _ResumeAfterCount.connect(etcd_config)
    racer.prefix = prefix
    try:
        # h2 counts 2 failures while the group is paused; the operator then resumes, clearing both.
        # h2's stale count must not pause the group again: the failures it saw are dealt with.
        r = await report_failure(racer, "web", "h2", "unhealthy", prefix=prefix)
    finally:
        await racer.close()
    assert racer.fired and r.recorded and not r.paused
    assert await read_pause(etcd, "web", prefix=prefix) is None
    assert await count_failures(etcd, "web", prefix=prefix) == 0
    assert len(_auto_pauses(await audit.read(etcd, Layout("web", prefix)))) == 1
    # A failure reported after the resume still pauses at once (budget 0).
    assert (await report_failure(etcd, "web", "h3", "unhealthy", prefix=prefix)).paused


async def test_list_failures_reports_a_value_without_time_zone(etcd: Etcd, prefix: str) -> None:
    layout = Layout("web", prefix)
    await report_failure(etcd, "web", "h1", "unhealthy", "disk", prefix=prefix)
    await etcd.put(layout.failures + "h2/overdue/x", b'{"format_version": 1, "at": "2026-01-01T00:00:00"}')
    failures = {f.host: f for f in await list_failures(etcd, "web", prefix=prefix)}
    assert failures["h1"].detail == "disk"
    assert "invalid value" in failures["h2"].detail and "time zone" in failures["h2"].detail
