"""locksmith.etcd's transport on a real 3-member cluster: a frozen (SIGSTOPped) member costs a call
one attempt deadline, not the call; a watch through a frozen member moves to another one; a
member without a leader refuses at once ("require leader"); a lost reply is retried elsewhere and
reported as uncertain; and a re-created watch leaves no task or stream behind (no asyncio noise).
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from locksmith.embedded import EmbeddedEtcd
from locksmith.errors import EtcdUnavailableError
from locksmith.etcd import Etcd, Put
from locksmith.soak import NOISE


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedEtcd]:
    with EmbeddedEtcd(members=3) as c:
        yield c


@pytest.fixture
async def client(cluster: EmbeddedEtcd) -> AsyncIterator[Etcd]:
    etcd = await Etcd.connect(cluster.config())
    try:
        yield etcd
    finally:
        await etcd.close()
        for m in cluster.members:  # leave the module's cluster whole for the next test
            m.resume()
        await asyncio.to_thread(cluster.wait_healthy)
        await asyncio.to_thread(cluster.wait_leader)


def _member_in_use(cluster: EmbeddedEtcd, client: Etcd) -> int:
    """The member ``client`` sends its calls to. (The old transport spread calls round-robin over
    every member and had no such notion; for the failing-first run on it: a follower.)"""
    if hasattr(client, "current_endpoint"):
        return [m.client_url for m in cluster.members].index(client.current_endpoint)
    leader = cluster.wait_leader()
    return (leader + 1) % len(cluster.members)


async def test_a_frozen_member_costs_one_attempt_deadline(cluster: EmbeddedEtcd, client: Etcd) -> None:
    # Defect 4: before, a call that reached the frozen member spent its whole deadline there
    # (etcd3aio bounds its retries by the attempt's deadline) and failed.
    await client.put("frozen/k", b"0")
    frozen = _member_in_use(cluster, client)
    cluster.members[frozen].pause()
    start = time.monotonic()
    for i in range(10):
        await client.put("frozen/k", str(i).encode())
    elapsed = time.monotonic() - start
    # One attempt deadline (2 s) for the first put, then the other members answer at once (the
    # bound leaves room for a loaded machine; the whole call's deadline is 5 s).
    assert elapsed < 7, f"10 puts took {elapsed:.1f}s"
    assert (await client.get("frozen/k")).value == b"9"  # type: ignore[union-attr]


async def test_a_watch_through_a_frozen_member_moves(cluster: EmbeddedEtcd, client: Etcd) -> None:
    # Defect 4: before, a watch through a frozen member delivered nothing until the member woke.
    rev = await client.put("wf/0", b"0")
    watched = _member_in_use(cluster, client)
    writer = await Etcd.connect(dataclasses.replace(
        cluster.config(), endpoints=tuple(m.client_url for i, m in enumerate(cluster.members) if i != watched)))
    seen: list[str] = []
    got_all = asyncio.Event()

    async def watch() -> None:
        async for batch in client.watch_prefix("wf/", start_revision=rev + 1):
            seen.extend(e.kv.key for e in batch.events)
            if len(seen) >= 5:
                got_all.set()
                return

    task = asyncio.create_task(watch())
    try:
        await writer.put("wf/1", b"x")
        cluster.members[watched].pause()
        for i in range(2, 6):
            await writer.put(f"wf/{i}", b"x")
        # Bound: the stall is noticed within a progress probe plus an attempt deadline (~3 s).
        await asyncio.wait_for(got_all.wait(), 8)
        assert seen == [f"wf/{i}" for i in range(1, 6)]  # nothing lost, nothing twice
        assert cluster.members[watched].paused  # delivered while the member was still frozen
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await writer.close()


async def test_a_member_without_a_leader_refuses_at_once(cluster: EmbeddedEtcd) -> None:
    # "require leader": with both other members frozen, the remaining one loses its leader; a
    # read through it fails saying so, instead of hanging on a member that cannot serve it.
    lone = cluster.members[0]
    etcd = await Etcd.connect(dataclasses.replace(cluster.config(), endpoints=(lone.client_url,), timeout=3.0))
    try:
        await etcd.put("nl/k", b"1")
        for m in cluster.members[1:]:
            m.pause()
        await asyncio.sleep(2.5)  # past the 1 s election timeout: the member knows it has no leader
        with pytest.raises(EtcdUnavailableError, match="no leader"):
            await etcd.get("nl/k")
    finally:
        for m in cluster.members:
            m.resume()
        await etcd.close()
        await asyncio.to_thread(cluster.wait_healthy)
        await asyncio.to_thread(cluster.wait_leader)


async def test_a_lost_reply_is_retried_elsewhere_and_reported_uncertain(client: Etcd) -> None:
    from locksmith.etcd import LostReply  # here: the failing-first run imports this file on old code

    first = await client.revision()
    fault = LostReply("Txn", count=1)
    client.lost_replies.append(fault)
    res = await client.txn([], [Put("lr/k", b"v")])
    client.lost_replies.remove(fault)
    assert fault.dropped == 1
    assert res.succeeded and res.uncertain
    kv = await client.get("lr/k")
    assert kv is not None and kv.version == 2  # committed twice: the lost one and the retry
    assert kv.mod_revision > first
    res = await client.txn([], [Put("lr/k", b"w")])
    assert res.succeeded and not res.uncertain


_NOISY = textwrap.dedent("""
    import asyncio, gc, sys
    from locksmith.embedded import EmbeddedEtcd
    from locksmith.errors import WatchCompactedError
    from locksmith.etcd import Etcd
    from locksmith.log import configure

    configure("INFO", stream=sys.stderr)

    async def main(server):
        etcd = await Etcd.connect(server.config())
        rev = await etcd.put("n/k", b"0")
        got = asyncio.Event()

        async def watch(start):
            async for batch in etcd.watch_prefix("n/", start_revision=start):
                if batch.events:
                    got.set()

        for round in range(3):
            # A watch whose stream the server ends (its member restarts), then re-created.
            got.clear()
            task = asyncio.create_task(watch(await etcd.revision() + 1))
            await etcd.put("n/k", b"1")
            await asyncio.wait_for(got.wait(), 10)
            await asyncio.to_thread(server.restart_member, 0)
            await asyncio.to_thread(server.wait_healthy)
            got.clear()
            await etcd.put("n/k", b"2")
            await asyncio.wait_for(got.wait(), 20)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            # A watch from a compacted revision, re-created.
            last = await etcd.put("n/k", b"3")
            await asyncio.to_thread(server.etcdctl, "compact", str(last))
            try:
                async for _ in etcd.watch_prefix("n/", start_revision=rev + 1):
                    pass
            except WatchCompactedError:
                pass
            gc.collect()
            await asyncio.sleep(0.2)
        await etcd.close()
        gc.collect()
        print("done")

    with EmbeddedEtcd() as server:
        asyncio.run(main(server))
""")


def test_recreated_watches_leave_no_asyncio_noise() -> None:
    # Defect 7: "Task was destroyed but it is pending!" and "aclose(): asynchronous generator is
    # already running" after each re-creation: the old stream's request task was left pending.
    p = subprocess.run([sys.executable, "-c", _NOISY], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.splitlines()[-1:] == ["done"], p.stderr[-2000:]
    noise = [ln for ln in p.stderr.splitlines() if any(n in ln for n in NOISE)]
    assert noise == [], "\n".join(noise)
