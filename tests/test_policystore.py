"""Policies and the pause state in a real etcd: apply/get/diff/dry-run, conflicts, pause key,
corrupt values, set-max's minimal value, pause/resume transactions."""

from __future__ import annotations

import json

import pytest

from locksmith import audit
from locksmith.errors import CorruptValueError, InvalidArgumentError
from locksmith.etcd import Etcd
from locksmith.keys import Layout
from locksmith.policy import parse_policy_text
from locksmith.policystore import (
    PolicyConflictError,
    apply_policy,
    canonical_json,
    diff_policy,
    get_policy,
    list_policies,
    load_policy,
    pause,
    plan_apply,
    read_pause,
    reset_failures,
    resume,
)

POLICY = """
format_version = 1
group = "web"
slots = 2
time_zone = "Europe/Berlin"
failure_budget = 1
reboot_timeout = "30m"

[[windows]]
days = ["Sat", "Sun"]
start = "02:00"
length = "3h"
"""


async def test_apply_get_diff_dry_run_round_trip(etcd: Etcd, prefix: str) -> None:
    policy = parse_policy_text(POLICY)
    layout = Layout("web", prefix)

    rev0 = await etcd.revision()
    plan = await plan_apply(etcd, policy, prefix=prefix)
    assert plan.dry_run and plan.changed and plan.previous_revision == 0
    assert '+  "slots": 2,' in plan.diff
    assert await etcd.get(layout.policy) is None
    assert await etcd.revision() == rev0  # the dry run wrote nothing

    res = await apply_policy(etcd, policy, prefix=prefix, reason="first")
    kv = await etcd.get(layout.policy)
    assert kv is not None and res.revision == kv.mod_revision and res.changed
    stored = await get_policy(etcd, "web", prefix=prefix)
    assert stored is not None and stored.policy == policy and stored.revision == res.revision
    assert json.loads(kv.value)["slots"] == 2  # the field the semaphore reads as its max

    assert await diff_policy(etcd, policy, prefix=prefix) == ""
    again = await apply_policy(etcd, policy, prefix=prefix)
    assert not again.changed and again.revision == res.revision
    assert await etcd.revision() == res.revision  # an identical apply writes nothing

    changed = parse_policy_text(POLICY.replace("slots = 2", "slots = 4"))
    diff = await diff_policy(etcd, changed, prefix=prefix)
    assert '-  "slots": 2,' in diff and '+  "slots": 4,' in diff
    body = diff.splitlines()[2:]
    assert [ln for ln in body if ln[:1] in "+-"] == ['-  "slots": 2,', '+  "slots": 4,']
    res2 = await apply_policy(etcd, changed, prefix=prefix)
    assert res2.revision > res.revision and res2.previous_revision == res.revision

    entries = await audit.read(etcd, layout)
    assert [e.action for e in entries] == ["policy-apply", "policy-apply"]
    assert entries[0].reason == "first" and entries[0].actor == audit.actor()
    assert entries[1].detail["changed"] == ["slots"]
    # The audit entry is part of the apply's own transaction.
    assert entries[1].revision == res2.revision


async def test_apply_compares_the_revision_it_read(etcd: Etcd, prefix: str) -> None:
    policy = parse_policy_text(POLICY)
    res = await apply_policy(etcd, policy, prefix=prefix)
    other = parse_policy_text(POLICY.replace("slots = 2", "slots = 3"))
    with pytest.raises(PolicyConflictError, match="changed while applying"):
        await apply_policy(etcd, other, prefix=prefix, expect_revision=res.revision - 1)
    with pytest.raises(PolicyConflictError):
        await apply_policy(etcd, other, prefix=prefix, expect_revision=0)
    stored = await get_policy(etcd, "web", prefix=prefix)
    assert stored is not None and stored.policy.slots == 2
    ok = await apply_policy(etcd, other, prefix=prefix, expect_revision=res.revision)
    assert ok.changed


async def test_paused_file_creates_pause_key_in_same_txn(etcd: Etcd, prefix: str) -> None:
    layout = Layout("web", prefix)
    paused = parse_policy_text('paused = true\npaused_reason = "freeze"\n' + POLICY)
    res = await apply_policy(etcd, paused, prefix=prefix)
    assert res.paused
    pkv = await etcd.get(layout.pause)
    assert pkv is not None and pkv.mod_revision == res.revision
    ps = await read_pause(etcd, "web", prefix=prefix)
    assert ps is not None and ps.reason == "freeze" and ps.source == "operator"
    # The stored policy never carries the pause state: that is the pause key alone.
    stored = await get_policy(etcd, "web", prefix=prefix)
    assert stored is not None and not stored.policy.paused and stored.policy.paused_reason is None
    assert '"paused": false' in canonical_json(paused)

    # paused = false (or absent) leaves the live pause state alone.
    unpaused = parse_policy_text(POLICY.replace("slots = 2", "slots = 5"))
    await apply_policy(etcd, unpaused, prefix=prefix)
    assert (await etcd.get(layout.pause)) == pkv
    # Applying a paused file to a paused group does not touch the pause key either.
    again = await apply_policy(etcd, paused, prefix=prefix)
    assert not again.paused and (await etcd.get(layout.pause)) == pkv


async def test_corrupt_stored_value_names_the_key_and_apply_repairs_it(etcd: Etcd, prefix: str) -> None:
    layout = Layout("web", prefix)
    await etcd.put(layout.policy, b'{"format_version": 1, "slots": "many"}')
    with pytest.raises(CorruptValueError) as ei:
        await get_policy(etcd, "web", prefix=prefix)
    assert layout.policy in str(ei.value) and "slots" in str(ei.value)
    with pytest.raises(CorruptValueError):
        await diff_policy(etcd, parse_policy_text(POLICY), prefix=prefix)
    await etcd.put(layout.policy, b"not json")
    with pytest.raises(CorruptValueError, match="not JSON"):
        await load_policy(etcd, "web", prefix=prefix)
    listed = dict(await list_policies(etcd, prefix=prefix))
    assert isinstance(listed["web"], CorruptValueError)

    res = await apply_policy(etcd, parse_policy_text(POLICY), prefix=prefix)
    assert res.changed
    assert (await get_policy(etcd, "web", prefix=prefix)) is not None
    entry = (await audit.read(etcd, layout))[-1]
    assert "not JSON" in entry.detail["replaced_invalid_value"]


async def test_value_of_another_group_is_corrupt(etcd: Etcd, prefix: str) -> None:
    await apply_policy(etcd, parse_policy_text(POLICY), prefix=prefix)
    kv = await etcd.get(Layout("web", prefix).policy)
    assert kv is not None
    await etcd.put(Layout("db", prefix).policy, kv.value)
    with pytest.raises(CorruptValueError, match="stored under group 'db'"):
        await get_policy(etcd, "db", prefix=prefix)


async def test_minimal_value_as_set_max_writes_it(etcd: Etcd, prefix: str) -> None:
    await etcd.put(Layout("db", prefix).policy, b'{"format_version":1,"slots":3}')
    sp = await load_policy(etcd, "db", prefix=prefix)
    assert sp.policy.group == "db" and sp.policy.slots == 3 and sp.exists
    defaults = await load_policy(etcd, "none", prefix=prefix)
    assert not defaults.exists and defaults.policy.slots == 1 and defaults.revision == 0


async def test_list_policies(etcd: Etcd, prefix: str) -> None:
    await apply_policy(etcd, parse_policy_text(POLICY), prefix=prefix)
    await apply_policy(etcd, parse_policy_text(POLICY.replace('"web"', '"db"')), prefix=prefix)
    await etcd.put(Layout("other", prefix).pause, b"{}")  # a group without a policy is not listed
    groups = [g for g, _ in await list_policies(etcd, prefix=prefix)]
    assert groups == ["db", "web"]


async def test_pause_and_resume_are_single_audited_txns(etcd: Etcd, prefix: str) -> None:
    layout = Layout("web", prefix)
    st = await pause(etcd, "web", "kernel regression", by="alice@ops")
    assert st.source == "operator"
    st = await pause(etcd, "web", "kernel regression", by="alice@ops", prefix=prefix)
    pkv = await etcd.get(layout.pause)
    assert pkv is not None and pkv.mod_revision == st.revision
    ps = await read_pause(etcd, "web", prefix=prefix)
    assert ps is not None and ps.reason == "kernel regression" and ps.by == "alice@ops"

    await etcd.put(layout.failures + "h1/unhealthy/x", b"{}")
    before = await etcd.revision()
    assert await resume(etcd, "web", by="bob@ops", reason="fixed", prefix=prefix)
    assert await etcd.get(layout.pause) is None
    assert await etcd.count_prefix(layout.failures) == 0
    assert await etcd.revision() == before + 1  # one transaction
    assert not await resume(etcd, "web", prefix=prefix)
    assert await etcd.revision() == before + 1  # not paused: nothing written

    entries = await audit.read(etcd, layout)
    assert [(e.action, e.actor) for e in entries] == [("pause", "alice@ops"), ("resume", "bob@ops")]
    assert entries[1].detail["failures_cleared"] == 1 and entries[1].reason == "fixed"
    assert entries[1].detail["paused"]["reason"] == "kernel regression"


async def test_resume_keep_failures_and_reset_failures(etcd: Etcd, prefix: str) -> None:
    layout = Layout("web", prefix)
    await pause(etcd, "web", "x", prefix=prefix)
    for i in range(3):
        await etcd.put(f"{layout.failures}h{i}/overdue/1", b"{}")
    assert await resume(etcd, "web", reset_failures=False, prefix=prefix)
    assert await etcd.count_prefix(layout.failures) == 3
    assert await reset_failures(etcd, "web", reason="looked", prefix=prefix) == 3
    assert await etcd.count_prefix(layout.failures) == 0
    assert await reset_failures(etcd, "web", prefix=prefix) == 0
    assert [e.action for e in await audit.read(etcd, layout)] == ["pause", "resume", "reset-failures"]


async def test_paused_flag_alone_is_not_a_policy_change(etcd: Etcd, prefix: str) -> None:
    plain = parse_policy_text(POLICY)
    res = await apply_policy(etcd, plain, prefix=prefix)
    await pause(etcd, "web", "already", prefix=prefix)
    rev = await etcd.revision()
    paused = parse_policy_text('paused = true\npaused_reason = "freeze"\n' + POLICY)
    again = await apply_policy(etcd, paused, prefix=prefix)
    assert not again.changed and not again.paused and again.revision == res.revision
    assert await etcd.revision() == rev  # same stored form, group already paused: nothing written
    assert await diff_policy(etcd, paused, prefix=prefix) == ""
    nogroup = parse_policy_text("format_version = 1\n")
    with pytest.raises(InvalidArgumentError, match="names no group"):
        await apply_policy(etcd, nogroup, prefix=prefix)
