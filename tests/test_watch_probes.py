"""An idle follower costs etcd nothing but its watch streams: no progress requests.

Each agent in etcd-lock follows its group (the semaphore's mirror) and its policy (the reader).
Probing every quiet stream once a second made an idle fleet of 1,000 hosts send about 2,000
progress requests a second. Only a stream that someone is blocked on (a mirror with waiters)
probes; the rest rely on the channel's gRPC keepalive to find a dead or frozen member.

The window below is a measurement period, not a synchronisation: absence of traffic can only be
observed over time. It is several probe intervals long (attempt_timeout / 2 = 1 s by default).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator

import pytest

from locksmith.embedded import EmbeddedEtcd
from locksmith.errors import LocksmithError
from locksmith.etcd import Etcd
from locksmith.keys import Layout
from locksmith.reader import PolicyReader
from locksmith.semaphore import Semaphore

WINDOW = 3.5  # seconds: three probe intervals and a half
WATCH_MSGS = ('grpc_server_msg_received_total{grpc_method="Watch",grpc_service="etcdserverpb.Watch",'
              'grpc_type="bidi_stream"}')


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedEtcd]:
    # Its own etcd: the session's may carry other tests' leftover streams, which would be counted.
    with EmbeddedEtcd() as s:
        yield s


def _watch_messages(server: EmbeddedEtcd) -> float:
    return server.metrics().get(WATCH_MSGS, 0.0)


async def test_idle_followers_send_no_progress_requests(server: EmbeddedEtcd) -> None:
    prefix = f"t-{secrets.token_hex(4)}/"
    etcd = await Etcd.connect(server.config())
    sem = Semaphore(etcd, "idle", prefix=prefix)
    reader = PolicyReader(etcd, "idle", prefix=prefix)
    try:
        await sem.follow()
        reader.start()
        await reader.wait_ready()
        # Both watches are created and delivering once each has seen one write (the pause key is
        # under both prefixes); the window starts only then, so creations are not counted.
        rev = await etcd.put(Layout("idle", prefix).pause,
                             json.dumps({"format_version": 1, "reason": "sync"}).encode())
        async with asyncio.timeout(30):
            await reader.wait_revision(rev)
            await sem.changed(rev - 1)
        before = _watch_messages(server)
        await asyncio.sleep(WINDOW)
        sent = _watch_messages(server) - before
        assert sent == 0, f"{sent:.0f} watch messages from two idle followers in {WINDOW}s"
    finally:
        await reader.stop()
        await sem.close()
        await etcd.close()


async def test_a_mirror_with_a_waiter_still_probes_its_quiet_stream(server: EmbeddedEtcd) -> None:
    """The other side: a waiter's stream keeps the fast stall detection (the test above must not
    pass merely because probing was switched off everywhere)."""
    prefix = f"t-{secrets.token_hex(4)}/"
    etcd = await Etcd.connect(server.config())
    holder = Semaphore(etcd, "busy", prefix=prefix)
    waiter = Semaphore(etcd, "busy", prefix=prefix)
    task: asyncio.Task[object] | None = None
    try:
        await holder.lock("a")  # max 1 by default: the next one queues
        task = asyncio.create_task(waiter.lock("b"))
        while True:  # queued: the waiter's key is in its own mirror
            state = waiter.snapshot()
            if state is not None and any(w.id == "b" for w in state.queue):
                break
            await waiter.changed(state.revision if state is not None else 0)
        before = _watch_messages(server)
        await asyncio.sleep(WINDOW)
        sent = _watch_messages(server) - before
        assert sent >= 2, f"only {sent:.0f} progress requests from a waiting mirror in {WINDOW}s"
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await waiter.close()
        await holder.close()
        await etcd.close()


def _watchers(server: EmbeddedEtcd) -> float:
    return server.metrics().get("etcd_debugging_mvcc_watcher_total", 0.0)


async def _watchers_become(server: EmbeddedEtcd, n: float) -> None:
    """etcd's own gauge of its watchers reaches ``n`` (creation and cancel are asynchronous).
    Polled: another process's /metrics has no event to wait on."""
    async with asyncio.timeout(15):
        while _watchers(server) != n:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_semaphores_on_one_client_share_one_watch_of_their_group() -> None:
    """A simulator runs a thousand agents on one client: each event of their group is decoded
    once, not once per agent. Each Semaphore still ends on its own close."""
    prefix = f"t-{secrets.token_hex(4)}/"
    layout = Layout("shared", prefix)
    pause = json.dumps({"format_version": 1, "reason": "x"}).encode()
    with EmbeddedEtcd() as server:  # its own: the count of watchers must be nobody else's
        etcd = await Etcd.connect(server.config())
        other = await Etcd.connect(server.config())
        a = Semaphore(etcd, "shared", prefix=prefix)
        b = Semaphore(etcd, "shared", prefix=prefix)
        c = Semaphore(other, "shared", prefix=prefix)  # another client: a watch of its own
        try:
            for s in (a, b, c):
                await s.follow()
            # Every watch exists once each has delivered a write made after all of them started.
            rev = await etcd.put(layout.pause, pause)
            async with asyncio.timeout(15):
                for s in (a, b, c):
                    assert await s.changed(rev - 1) >= rev
            assert _watchers(server) == 2
            b_waits = asyncio.create_task(b.changed(rev))
            await a.close()  # b follows on through the same watch; a's own waits end
            assert a.snapshot() is None
            with pytest.raises(LocksmithError):
                await a.changed(0)
            assert not b_waits.done()
            await etcd.delete(layout.pause)
            rev = await etcd.revision()
            async with asyncio.timeout(15):
                assert await b_waits >= rev
            st = b.snapshot()
            assert st is not None and not st.paused
            assert _watchers(server) == 2
            await b.close()
            await _watchers_become(server, 1)
        finally:
            for s in (a, b, c):
                await s.close()
            await etcd.close()
            await other.close()
        await _watchers_become(server, 0)
