"""PolicyReader against a real etcd: change latency, invalid values kept out (one error event per
bad value), the pause key, and re-reading after compaction."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from structlog.testing import capture_logs

from locksmith.etcd import Etcd, EtcdConfig, KeyValue
from locksmith.keys import Layout
from locksmith.policy import parse_policy_text
from locksmith.policystore import apply_policy, pause, resume
from locksmith.reader import PolicyReader


def _policy(slots: int, group: str = "web") -> Any:
    return parse_policy_text(f'format_version = 1\ngroup = "{group}"\nslots = {slots}\nfailure_budget = 2\n')


async def test_reader_sees_a_change_within_one_second(etcd: Etcd, prefix: str) -> None:
    first = await apply_policy(etcd, _policy(2), prefix=prefix)
    async with PolicyReader(etcd, "web", prefix=prefix) as reader:
        assert reader.policy.slots == 2 and reader.policy_revision == first.revision and reader.error is None
        latencies = []
        for n in range(3, 23):
            gen = reader.generation
            t0 = time.monotonic()
            res = await apply_policy(etcd, _policy(n), prefix=prefix)
            async with asyncio.timeout(10):
                await reader.changed(gen)
            latencies.append(time.monotonic() - t0)
            assert reader.policy.slots == n and reader.policy_revision == res.revision
        assert max(latencies) < 1.0
        print(f"policy change -> reader: p50 {statistics.median(latencies) * 1000:.1f} ms, "
              f"max {max(latencies) * 1000:.1f} ms")


async def test_invalid_value_keeps_last_good_policy_and_logs_once(etcd: Etcd, prefix: str) -> None:
    layout = Layout("web", prefix)
    good = await apply_policy(etcd, _policy(3), prefix=prefix)
    bad = b'{"format_version": 1, "group": "web", "slots": "lots"}'
    with capture_logs() as logs:
        async with PolicyReader(etcd, "web", prefix=prefix) as reader:
            gen = reader.generation
            await etcd.put(layout.policy, bad)
            async with asyncio.timeout(10):
                await reader.changed(gen)
            assert reader.policy.slots == 3 and reader.policy_revision == good.revision
            assert reader.error is not None and layout.policy in reader.error and "slots" in reader.error

            # An event storm of the same bad value, interleaved with pause traffic: still one event.
            for i in range(20):
                await etcd.put(layout.policy, bad)
                if i % 5 == 0:
                    await pause(etcd, "web", f"storm {i}", prefix=prefix)
            last = await etcd.put(layout.policy, bad)
            async with asyncio.timeout(10):
                await reader.wait_revision(last)
            errors = [e for e in logs if e["event"] == "policy_value_invalid"]
            assert len(errors) == 1
            assert errors[0]["key"] == layout.policy and "slots" in errors[0]["problem"]
            assert errors[0]["log_level"] == "error"

            # A different bad value is a new problem: one more event.
            last = await etcd.put(layout.policy, b"{not json")
            async with asyncio.timeout(10):
                await reader.wait_revision(last)
            assert "not JSON" in (reader.error or "")
            assert len([e for e in logs if e["event"] == "policy_value_invalid"]) == 2
            assert reader.policy.slots == 3

            fixed = await apply_policy(etcd, _policy(4), prefix=prefix)
            async with asyncio.timeout(10):
                await reader.wait_revision(fixed.revision)
            assert reader.error is None and reader.policy.slots == 4

            # The same bad value after a good one is logged again (it is a new bad write).
            last = await etcd.put(layout.policy, bad)
            async with asyncio.timeout(10):
                await reader.wait_revision(last)
            assert len([e for e in logs if e["event"] == "policy_value_invalid"]) == 3

            # No stored policy at all: the defaults, no error.
            gen = reader.generation
            await etcd.delete(layout.policy)
            async with asyncio.timeout(10):
                await reader.changed(gen)
            assert reader.policy.slots == 1 and reader.policy_revision == 0 and reader.error is None
            assert reader.running


async def test_bad_value_at_start_serves_defaults_with_error(etcd: Etcd, prefix: str) -> None:
    layout = Layout("web", prefix)
    await etcd.put(layout.policy, b"[1, 2]")
    async with PolicyReader(etcd, "web", prefix=prefix) as reader:
        assert reader.policy.slots == 1 and reader.policy_revision == 0
        assert reader.error is not None and layout.policy in reader.error


async def test_reader_follows_the_pause_key(etcd: Etcd, prefix: str) -> None:
    layout = Layout("web", prefix)
    async with PolicyReader(etcd, "web", prefix=prefix) as reader:
        assert not reader.paused
        gen = reader.generation
        await pause(etcd, "web", "investigating", by="alice@ops", prefix=prefix)
        async with asyncio.timeout(10):
            await reader.changed(gen)
        assert reader.paused and reader.pause is not None and reader.pause.reason == "investigating"

        rev = await etcd.put(layout.pause, b"garbage")  # presence alone means paused
        async with asyncio.timeout(10):
            await reader.wait_revision(rev)
        assert reader.paused and reader.pause is None and layout.pause in (reader.pause_error or "")

        gen = reader.generation
        assert await resume(etcd, "web", prefix=prefix)
        async with asyncio.timeout(10):
            await reader.changed(gen)
        assert not reader.paused and reader.pause_error is None

        # Holders and queue keys are outside the watched range: they never wake the reader.
        gen = reader.generation
        await etcd.put(layout.holders + "h1", b"{}")
        rev = await etcd.put(layout.policy, _policy(5).to_json_bytes())
        async with asyncio.timeout(10):
            await reader.wait_revision(rev)
        assert reader.generation == gen + 1


class _CompactingEtcd(Etcd):
    """A real connection that, on its first range read, lets the world move on and compacts etcd
    before the reader can start its watch: the watch from R + 1 then hits a compacted revision."""

    armed = True
    layout: Layout

    async def get_prefix(self, prefix: str, *, revision: int = 0) -> tuple[list[KeyValue], int]:
        kvs, rev = await super().get_prefix(prefix, revision=revision)
        if self.armed:
            self.armed = False
            await self.put(self.layout.policy, _policy(7).to_json_bytes())
            now = await self.put(self.layout.policy, _policy(8).to_json_bytes())
            kv = self._c.kv
            assert kv is not None
            await kv.compact(now)
        return kvs, rev


async def test_reader_rereads_after_compaction(etcd_config: EtcdConfig, prefix: str) -> None:
    client = await _CompactingEtcd.connect(etcd_config)
    try:
        assert isinstance(client, _CompactingEtcd)
        client.layout = Layout("web", prefix)
        await apply_policy(client, _policy(6), prefix=prefix)
        with capture_logs() as logs:
            reader = PolicyReader(client, "web", prefix=prefix, retry_delay=0.05)
            reader.start()
            try:
                # Bounds for a loaded 2-core machine; the waits end on the reader's own events.
                async with asyncio.timeout(30):
                    while reader.policy.slots != 8:
                        await reader.changed(reader.generation)
                seen = [(e["event"], e.get("reason") or e.get("error")) for e in logs]
                assert any(e == "policy_reader_rewatch" for e, _ in seen), seen
                assert reader.running
                gen = reader.generation
                await apply_policy(client, _policy(9), prefix=prefix)
                async with asyncio.timeout(30):
                    await reader.changed(gen)
                assert reader.policy.slots == 9
            finally:
                await reader.stop()
    finally:
        await client.close()


class _WriteAfterRead(Etcd):
    """A real connection that, right after the reader's first range read, writes a new policy
    (another client's write landing between the read at R and the watch from R + 1)."""

    armed = True
    layout: Layout
    written = 0

    async def get_prefix(self, prefix: str, *, revision: int = 0) -> tuple[list[KeyValue], int]:
        kvs, rev = await super().get_prefix(prefix, revision=revision)
        if self.armed:
            self.armed = False
            self.written = await self.put(self.layout.policy, _policy(4).to_json_bytes())
        return kvs, rev


async def test_wait_revision_returns_only_once_the_write_is_applied(etcd_config: EtcdConfig, prefix: str) -> None:
    # etcd answers the watch creation with a header at the current revision before it has sent
    # the events between the start revision and now: that header must not count as caught up.
    client = await _WriteAfterRead.connect(etcd_config)
    try:
        assert isinstance(client, _WriteAfterRead)
        client.layout = Layout("web", prefix)
        await apply_policy(client, _policy(3), prefix=prefix)
        async with PolicyReader(client, "web", prefix=prefix) as reader:
            assert client.written
            async with asyncio.timeout(10):
                await reader.wait_revision(client.written)
            assert reader.policy.slots == 4 and reader.policy_revision == client.written
    finally:
        await client.close()


async def test_too_deeply_nested_values_are_reported_not_fatal(etcd: Etcd, prefix: str) -> None:
    layout = Layout("web", prefix)
    await etcd.put(layout.policy, b"[" * 100_000)  # json raises RecursionError for this
    await etcd.put(layout.pause, b"{" * 100_000)
    reader = PolicyReader(etcd, "web", prefix=prefix)
    reader.start()
    try:
        async with asyncio.timeout(30):  # before the fix the reader retried for ever, never ready
            await reader.wait_ready()
        assert reader.policy.slots == 1 and reader.error is not None and layout.policy in reader.error
        assert reader.paused and reader.pause_error is not None
    finally:
        await reader.stop()
