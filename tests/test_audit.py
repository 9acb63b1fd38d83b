"""The audit trail in a real etcd: every operation writes its entry in its own transaction, and the
trail stays bounded through the operations' own pruning (library and one-shot CLI processes)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from locksmith import audit
from locksmith.budget import report_failure
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.keys import Layout
from locksmith.policy import parse_policy_text
from locksmith.policystore import apply_policy, pause, reset_failures, resume
from locksmith.semaphore import Semaphore

LOCKSMITHCTL = str(Path(sys.executable).with_name("locksmithctl"))


async def test_every_operation_is_recorded_with_who_when_what_why(etcd: Etcd, prefix: str) -> None:
    layout = Layout("web", prefix)
    t0 = datetime.now(UTC) - timedelta(seconds=1)
    policy = parse_policy_text('format_version = 1\ngroup = "web"\nslots = 2\nfailure_budget = 5\n')
    applied = await apply_policy(etcd, policy, prefix=prefix, reason="initial rollout policy")
    await pause(etcd, "web", "bad kernel", prefix=prefix)
    await resume(etcd, "web", reason="kernel pulled", prefix=prefix)
    await report_failure(etcd, "web", "node-9", "unhealthy", "kubelet down", prefix=prefix)
    await reset_failures(etcd, "web", reason="node-9 repaired", prefix=prefix)
    sem = Semaphore(etcd, "web", prefix=prefix)
    try:
        await sem.lock("node-1", reason="update 1.2.3")
        await sem.unlock("node-1")
        max_rev = await sem.set_max(3)
    finally:
        await sem.close()

    entries = await audit.read(etcd, layout)
    assert [(e.action, e.subject) for e in entries] == [
        ("policy-apply", "web"), ("pause", "operator"), ("resume", "web"), ("failure", "node-9"),
        ("reset-failures", "web"), ("lock", "node-1"), ("unlock", "node-1"), ("set-max", ""),
    ]
    assert [e.reason for e in entries[:6]] == [
        "initial rollout policy", "bad kernel", "kernel pulled", "kubelet down", "node-9 repaired", "update 1.2.3",
    ]
    assert all(e.actor == audit.actor() and "@" in e.actor for e in entries)
    assert all(t0 <= e.at <= datetime.now(UTC) for e in entries)
    assert entries == sorted(entries, key=lambda e: e.at)
    # Each entry was written by its operation's own transaction.
    assert entries[0].revision == applied.revision
    assert entries[-1].revision == max_rev and entries[-1].detail == {"from": 2, "to": 3}
    # since= filters by time.
    assert await audit.read(etcd, layout, since=datetime.now(UTC) + timedelta(seconds=5)) == []


async def test_trail_stays_bounded_over_5000_operations(etcd: Etcd, prefix: str) -> None:
    layout = Layout("web", prefix)
    concurrency = 25
    ops = 5000
    sem = asyncio.Semaphore(concurrency)
    peak = 0

    # Two real operations that never contend with each other (no compare to lose), so the run
    # is quick: operator pauses and failure reports (the budget is high enough never to pause).
    await apply_policy(etcd, parse_policy_text('format_version = 1\ngroup = "web"\nfailure_budget = 9999\n'),
                       prefix=prefix)

    async def one(i: int) -> None:
        async with sem:
            if i % 2:
                await pause(etcd, "web", f"op {i}", prefix=prefix)
            else:
                await report_failure(etcd, "web", f"node-{i % 50}", "unhealthy", f"op {i}", prefix=prefix,
                                     policy=policy)

    async def watch_peak(stop: asyncio.Event) -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, await etcd.count_prefix(layout.audit))
            await asyncio.sleep(0.05)

    policy = parse_policy_text('format_version = 1\ngroup = "web"\nfailure_budget = 9999\n')
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_peak(stop))
    await asyncio.gather(*(one(i) for i in range(ops)))
    stop.set()
    await watcher
    n = await etcd.count_prefix(layout.audit)
    pruner = audit.DEFAULT_PRUNER
    # A check reads the count while up to `concurrency` writes are in flight (they land after the
    # read), and as many again land while the prune itself runs: two `concurrency` terms.
    bound = pruner.keep + audit.PRUNE_SLACK + pruner.every + 2 * concurrency
    # Without pruning there would be 5001 entries.
    print(f"audit trail after {ops} operations: {n} entries (peak seen {peak}, bound {bound})")
    assert n <= bound and peak <= bound, (n, peak, bound)
    assert n >= pruner.keep - concurrency  # pruning keeps the newest `keep`, it does not wipe
    entries = await audit.read(etcd, layout)
    newest = max(int(e.reason.split()[1]) for e in entries)
    assert newest >= ops - 2 * concurrency  # the kept entries are the latest ones


def test_one_shot_cli_process_prunes(etcd_config: EtcdConfig, prefix: str) -> None:
    layout = Layout("web", prefix)

    async def fill() -> int:
        async with await Etcd.connect(etcd_config) as etcd:
            base = datetime.now(UTC) - timedelta(days=1)
            for batch in range(13):
                await etcd.txn([], [
                    audit.entry_op(layout, "pause", "operator", f"old {batch * 100 + i}",
                                   now=base + timedelta(seconds=batch * 100 + i))
                    for i in range(100)
                ])
            return await etcd.count_prefix(layout.audit)

    assert asyncio.run(fill()) == 1300
    p = subprocess.run([LOCKSMITHCTL, "--endpoint", etcd_config.endpoints[0], "--prefix", prefix,
                        "pause", "web", "--reason", "one-shot"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr

    async def check() -> list[audit.AuditEntry]:
        async with await Etcd.connect(etcd_config) as etcd:
            return await audit.read(etcd, layout)

    entries = asyncio.run(check())
    assert len(entries) == audit.DEFAULT_KEEP
    assert entries[-1].reason == "one-shot" and entries[0].reason == "old 301"


async def test_corrupt_entry_is_skipped_not_fatal(etcd: Etcd, prefix: str) -> None:
    layout = Layout("web", prefix)
    await pause(etcd, "web", "a", prefix=prefix)
    await etcd.put(layout.audit + "00000000000000000001-bad", b"garbage")
    assert [e.reason for e in await audit.read(etcd, layout)] == ["a"]
