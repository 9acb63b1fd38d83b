"""The etcd wrapper against a real embedded etcd: transactions, range compares, watches, leases, errors."""

from __future__ import annotations

import asyncio

import pytest

from locksmith.embedded import EmbeddedEtcd
from locksmith.errors import EtcdUnavailableError, InvalidArgumentError
from locksmith.etcd import Delete, Etcd, EtcdConfig, Get, Put, absent, unchanged_since


async def test_range_compare_detects_additions_not_deletions(etcd: Etcd, prefix: str) -> None:
    rev = await etcd.put(f"{prefix}s/a", b"1")
    await etcd.put(f"{prefix}s/b", b"1")
    # A key added after `rev` makes the range compare fail.
    res = await etcd.txn([unchanged_since(f"{prefix}s/", rev)], [Put(f"{prefix}x", b"1")])
    assert not res.succeeded
    rev2 = await etcd.revision()
    await etcd.delete(f"{prefix}s/b")
    # A deletion since `rev2` does not.
    res = await etcd.txn([unchanged_since(f"{prefix}s/", rev2), absent(f"{prefix}x")],
                         [Put(f"{prefix}x", b"1"), Get(f"{prefix}s/", prefix=True), Delete(f"{prefix}s/a")])
    assert res.succeeded
    assert [kv.key for kv in res.results[1]] == [f"{prefix}s/a"]
    assert res.results[2] == 1


async def test_watch_from_revision_misses_nothing(etcd: Etcd, prefix: str) -> None:
    _, rev = await etcd.get_prefix(prefix)
    for i in range(5):
        await etcd.put(f"{prefix}k{i}", str(i).encode())
    seen: list[str] = []
    async for batch in etcd.watch_prefix(prefix, start_revision=rev + 1):
        seen += [e.kv.key for e in batch.events]
        if len(seen) == 5:
            break
    assert seen == [f"{prefix}k{i}" for i in range(5)]


async def test_leased_key_disappears_after_revoke(etcd: Etcd, prefix: str) -> None:
    lease = await etcd.lease_grant(5)
    await etcd.put(f"{prefix}l", b"x", lease=lease)
    assert await etcd.get(f"{prefix}l") is not None
    await etcd.lease_revoke(lease)
    assert await etcd.get(f"{prefix}l") is None


async def test_unreachable_endpoint_names_it() -> None:
    etcd = await Etcd.connect(EtcdConfig(endpoints=("http://127.0.0.1:9",), timeout=2))
    try:
        with pytest.raises(EtcdUnavailableError, match=r"127\.0\.0\.1:9"):
            await etcd.get("x")
    finally:
        await etcd.close()


def test_bad_endpoint_is_an_argument_error() -> None:
    with pytest.raises(InvalidArgumentError, match="ftp://x"):
        EtcdConfig(endpoints=("ftp://x",)).host_ports()


async def test_three_member_cluster_survives_one_member_down() -> None:
    with EmbeddedEtcd(members=3) as cluster:
        etcd = await Etcd.connect(cluster.config())
        try:
            await etcd.put("k", b"1")
            cluster.members[0].kill()
            # Quorum is two of three: once the survivors agree on a leader (an election if the
            # killed member led), writes go on through them.
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                try:
                    await etcd.put("k", b"2")
                    break
                except EtcdUnavailableError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
            for _ in range(3):
                await etcd.put("k", b"2")
            assert (await etcd.get("k")).value == b"2"  # type: ignore[union-attr]
        finally:
            await etcd.close()
            await asyncio.sleep(0)


async def test_watch_resumes_after_its_member_restarts_without_losing_events() -> None:
    with EmbeddedEtcd(members=3) as cluster:
        watcher = await Etcd.connect(EtcdConfig(endpoints=(cluster.members[0].client_url,)))
        writer = await Etcd.connect(EtcdConfig(endpoints=(cluster.members[1].client_url,
                                                          cluster.members[2].client_url)))
        try:
            rev = await writer.put("w/0", b"0")
            seen: list[str] = []
            created = asyncio.Event()
            done = asyncio.Event()

            async def watch() -> None:
                async for batch in watcher.watch_prefix("w/", start_revision=rev + 1):
                    created.set()
                    seen.extend(e.kv.key for e in batch.events)
                    if len(seen) >= 20:
                        done.set()
                        return

            task = asyncio.create_task(watch())
            await asyncio.wait_for(created.wait(), 10)
            for i in range(1, 6):
                await writer.put(f"w/{i}", b"x")
            cluster.members[0].kill()
            # Written while the watcher's only member is down: delivered after it comes back.
            for i in range(6, 21):
                while True:
                    try:
                        await writer.put(f"w/{i}", b"x")
                        break
                    except EtcdUnavailableError:
                        continue  # an election among the two survivors
            cluster.restart_member(0)
            await asyncio.wait_for(done.wait(), 30)
            await task
            assert seen == [f"w/{i}" for i in range(1, 21)]
        finally:
            await watcher.close()
            await writer.close()
