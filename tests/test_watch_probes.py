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
