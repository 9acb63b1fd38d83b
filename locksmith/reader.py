"""A live view of one group's policy and pause state, followed through an etcd watch.

The reader does a range read at revision R, then watches from R + 1, so it misses no change; when
etcd has compacted past the watch's revision (or the connection drops), it reads again and
watches again. It watches the range ``groups/<group>/p`` (exactly the ``pause`` and ``policy``
keys; holders and the queue never wake it).

A stored policy that does not parse (written by something other than locksmithctl) never
replaces the last good one: the reader keeps it, exposes the problem as ``.error`` and logs ONE
error event per distinct bad value (not one per watch event or re-read). Before any good value
was seen it uses the group's default policy. The pause key's mere presence means paused, even if
its value does not parse (``.pause_error`` then says why). Nothing the reader reads makes it
crash; etcd outages are retried with backoff.

    async with PolicyReader(etcd, "web") as reader:    # start() + wait_ready()
        gen = reader.generation
        ...
        async with asyncio.timeout(5):
            await reader.changed(gen)   # returns once policy/pause/error differ from `gen`
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from locksmith.errors import CorruptValueError, EtcdError, WatchCompactedError
from locksmith.etcd import Etcd, KeyValue
from locksmith.keys import DEFAULT_PREFIX, Layout
from locksmith.log import get_logger
from locksmith.policy import Policy, default_policy
from locksmith.policystore import PauseState, parse_pause, parse_stored_policy

__all__ = ["PolicyReader", "ReaderState"]

_log = get_logger(__name__)


@dataclass(frozen=True)
class ReaderState:
    """One consistent snapshot of what the reader knows."""

    group: str
    policy: Policy
    policy_revision: int  # mod_revision of the good policy in use; 0 = default (no good value yet)
    paused: bool
    pause: PauseState | None
    error: str | None
    pause_error: str | None
    revision: int  # store revision the reader has caught up to
    generation: int


class PolicyReader:
    """Follows ``group``'s policy and pause key. Attributes are always safe to read."""

    def __init__(self, etcd: Etcd, group: str = "default", *, prefix: str = DEFAULT_PREFIX,
                 retry_delay: float = 0.5, max_retry_delay: float = 10.0) -> None:
        self.etcd = etcd
        self.layout = Layout(group, prefix)
        self.group = group
        self.policy: Policy = default_policy(group)
        self.policy_revision = 0
        self.paused = False
        self.pause: PauseState | None = None
        self.error: str | None = None
        self.pause_error: str | None = None
        self.revision = 0
        self.generation = 0
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._watch_prefix = self.layout.base + "p"
        self._logged_bad: set[tuple[str, bytes]] = set()
        self._cond = asyncio.Condition()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start following in a background task (idempotent); see ``wait_ready``."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"policy-reader-{self.group}")

    async def wait_ready(self) -> None:
        """Wait for the first complete read (bound it with ``asyncio.timeout``: while etcd is
        unreachable the reader keeps retrying and serves the default policy)."""
        await self._ready.wait()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> PolicyReader:
        self.start()
        await self.wait_ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        """The background task is alive (it only ends through ``stop()``)."""
        return self._task is not None and not self._task.done()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def state(self) -> ReaderState:
        return ReaderState(self.group, self.policy, self.policy_revision, self.paused, self.pause,
                           self.error, self.pause_error, self.revision, self.generation)

    # -- waiting -------------------------------------------------------------------------------

    async def changed(self, since: int | None = None) -> int:
        """Wait until ``generation`` exceeds ``since`` (default: the generation now) and return
        the new generation. Take ``since`` *before* causing the change so none is missed; bound
        the wait with ``asyncio.timeout``."""
        base = self.generation if since is None else since
        await self._wait_for(lambda: self.generation > base)
        return self.generation

    async def wait_revision(self, revision: int) -> None:
        """Wait until the reader has applied every change up to store ``revision`` (use the
        revision returned by a write to the policy or pause key)."""
        await self._wait_for(lambda: self.revision >= revision)

    async def _wait_for(self, pred: Callable[[], bool]) -> None:
        async with self._cond:
            await self._cond.wait_for(pred)

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self._retry_delay
        while True:
            try:
                kvs, rev = await self.etcd.get_prefix(self._watch_prefix)
                await self._snapshot(kvs, rev)
                delay = self._retry_delay
                # Policy changes are rare and nobody blocks on this stream: no progress probes
                # (a dead or frozen member is still found by the channel's keepalive).
                async for batch in self.etcd.watch_prefix(self._watch_prefix, start_revision=rev + 1,
                                                          urgent=lambda: False):
                    if not batch.events:
                        continue
                    changed = False
                    for ev in batch.events:
                        changed |= self._apply(ev.kv.key, None if ev.kind == "delete" else ev.kv)
                    # The last applied event's revision, not the header's: etcd sets the header
                    # (of the watch-created response, and of catch-up batches) to the current
                    # revision before it has sent the events up to it, so the header would let
                    # wait_revision() return before the write it waits for is applied.
                    await self._publish(changed, batch.events[-1].kv.mod_revision)
            except asyncio.CancelledError:
                raise
            except WatchCompactedError as exc:
                _log.info("policy_reader_rewatch", group=self.group, reason=str(exc))
                continue
            except EtcdError as exc:
                _log.warning("policy_reader_etcd_error", group=self.group, error=str(exc), retry_in=delay)
            except Exception as exc:  # never let a surprise kill the daemon that owns this reader
                _log.exception("policy_reader_unexpected_error", group=self.group, error=repr(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_retry_delay)

    async def _snapshot(self, kvs: list[KeyValue], rev: int) -> None:
        by_key = {kv.key: kv for kv in kvs}
        changed = self._apply(self.layout.policy, by_key.get(self.layout.policy))
        changed |= self._apply(self.layout.pause, by_key.get(self.layout.pause))
        await self._publish(changed, rev)
        self._ready.set()

    async def _publish(self, changed: bool, revision: int) -> None:
        async with self._cond:
            if changed:
                self.generation += 1
            self.revision = max(self.revision, revision)
            self._cond.notify_all()

    def _apply(self, key: str, kv: KeyValue | None) -> bool:
        """Fold one key's current value into the state; True if anything visible changed."""
        if key == self.layout.policy:
            return self._apply_policy(kv)
        if key == self.layout.pause:
            return self._apply_pause(kv)
        return False

    def _apply_policy(self, kv: KeyValue | None) -> bool:
        before = (self.policy, self.policy_revision, self.error)
        if kv is None:
            self._forget_bad(self.layout.policy)
            self.policy, self.policy_revision, self.error = default_policy(self.group), 0, None
        else:
            try:
                policy = parse_stored_policy(kv, self.group)
            except CorruptValueError as exc:
                self.error = str(exc)
                self._log_bad(kv, exc, keeping=self.policy_revision)
            else:
                self._forget_bad(kv.key)
                self.policy, self.policy_revision, self.error = policy, kv.mod_revision, None
        return before != (self.policy, self.policy_revision, self.error)

    def _apply_pause(self, kv: KeyValue | None) -> bool:
        before = (self.paused, self.pause, self.pause_error)
        if kv is None:
            self._forget_bad(self.layout.pause)
            self.paused, self.pause, self.pause_error = False, None, None
        else:
            self.paused = True
            try:
                self.pause, self.pause_error = parse_pause(kv), None
                self._forget_bad(kv.key)
            except CorruptValueError as exc:
                self.pause, self.pause_error = None, str(exc)
                self._log_bad(kv, exc, keeping=None)
        return before != (self.paused, self.pause, self.pause_error)

    def _log_bad(self, kv: KeyValue, exc: CorruptValueError, *, keeping: int | None) -> None:
        mark = (kv.key, hashlib.sha256(kv.value).digest())
        if mark in self._logged_bad:
            return
        self._logged_bad.add(mark)
        if keeping is None:
            _log.error("pause_value_invalid", group=self.group, key=kv.key, problem=exc.problem,
                       revision=kv.mod_revision, treated_as="paused")
        else:
            _log.error("policy_value_invalid", group=self.group, key=kv.key, problem=exc.problem,
                       revision=kv.mod_revision,
                       keeping=f"revision {keeping}" if keeping else "the default policy")

    def _forget_bad(self, key: str) -> None:
        self._logged_bad = {m for m in self._logged_bad if m[0] != key}
