"""The audit trail: a bounded history in etcd of every operation on a group.

Entries are written *inside* the transaction of the operation they record (one more put in the
same raft entry), so the trail never says something happened that did not, or misses something
that did. Keys sort by time: ``<prefix>audit/<group>/<unix-ns:020d>-<rand>``; there is no counter
key, so writers never contend on one. The trail is bounded by pruning: a writer that sees more
than ``keep + slack`` entries deletes the oldest down to ``keep`` (see ``prune``).
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from locksmith.errors import CorruptValueError, EtcdError
from locksmith.etcd import Delete, Etcd, Put
from locksmith.keys import FORMAT_VERSION, Layout
from locksmith.log import get_logger

_log = get_logger(__name__)

DEFAULT_KEEP = 1000
PRUNE_SLACK = 100


def actor() -> str:
    """Who is acting: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class AuditEntry:
    key: str
    group: str
    at: datetime
    actor: str
    action: str
    subject: str
    reason: str
    detail: dict[str, Any]
    revision: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group, "at": self.at.isoformat(), "by": self.actor, "action": self.action,
            "subject": self.subject, "reason": self.reason, "detail": self.detail, "revision": self.revision,
        }


def entry_op(
    layout: Layout, action: str, subject: str = "", reason: str = "", *,
    detail: dict[str, Any] | None = None, by: str | None = None, now: datetime | None = None,
) -> Put:
    """The put that records one operation; add it to the operation's own transaction."""
    now = now or datetime.now(UTC)
    ns = int(now.timestamp() * 1_000_000_000)
    key = f"{layout.audit}{ns:020d}-{secrets.token_hex(4)}"
    value = {
        "format_version": FORMAT_VERSION, "at": now.isoformat(), "by": by or actor(),
        "action": action, "subject": subject, "reason": reason, "detail": detail or {},
    }
    return Put(key, json.dumps(value, separators=(",", ":")).encode())


def parse_entry(group: str, key: str, raw: bytes, revision: int = 0) -> AuditEntry:
    try:
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {d.get('format_version')!r}, expected {FORMAT_VERSION}")
        at = datetime.fromisoformat(d["at"])
        if at.tzinfo is None:  # could be neither compared with --since nor sorted with the others
            raise ValueError(f"'at' has no time zone: {d['at']!r}")
        return AuditEntry(
            key=key, group=group, at=at, actor=str(d["by"]),
            action=str(d["action"]), subject=str(d.get("subject", "")), reason=str(d.get("reason", "")),
            detail=dict(d.get("detail") or {}), revision=revision,
        )
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptValueError(key, str(exc)) from exc


async def read(etcd: Etcd, layout: Layout, *, since: datetime | None = None) -> list[AuditEntry]:
    """Entries oldest first; a corrupt entry is skipped rather than hiding the rest."""
    kvs, _ = await etcd.get_prefix(layout.audit)
    out = []
    for kv in kvs:
        try:
            e = parse_entry(layout.group, kv.key, kv.value, kv.mod_revision)
        except CorruptValueError:
            continue
        if since is None or e.at >= since:
            out.append(e)
    return out


async def prune(etcd: Etcd, layout: Layout, keep: int = DEFAULT_KEEP) -> int:
    """Delete the oldest entries beyond ``keep``. Idempotent; racing pruners only delete the same
    oldest keys. Returns how many were deleted."""
    n = await etcd.count_prefix(layout.audit)
    if n <= keep + PRUNE_SLACK:
        return 0
    kvs, _ = await etcd.get_prefix(layout.audit)
    excess = len(kvs) - keep
    if excess <= 0:
        return 0
    # Delete [first, last-to-drop] in one range delete: one write however many entries go.
    last = kvs[excess - 1].key
    return await _delete_range(etcd, layout.audit, last + "\0")


async def _delete_range(etcd: Etcd, start: str, end: str) -> int:
    res = await etcd.txn([], [Delete(start, range_end=end)])
    return int(res.results[0]) if res.results else 0


class Pruner:
    """Keeps the trail bounded without a read on every operation: the first audited write of each
    group in this process checks, then every ``every``-th one. Checking on the first write matters
    for one-shot processes (each ``locksmithctl`` run writes once); the check itself is a cheap
    count-only range read, and the pruning delete is one write however many entries go. Bound:
    at most ``keep + slack + every * writers`` entries (writers = processes writing concurrently).

    A failed prune is logged and ignored: the operation it follows has already been committed.
    """

    def __init__(self, keep: int = DEFAULT_KEEP, every: int = 50) -> None:
        self.keep = keep
        self.every = every
        self._n: dict[str, int] = {}

    async def wrote(self, etcd: Etcd, layout: Layout) -> None:
        n = self._n.get(layout.audit, 0)
        self._n[layout.audit] = n + 1
        if n % self.every != 0:
            return
        try:
            deleted = await prune(etcd, layout, self.keep)
        except EtcdError as exc:
            _log.warning("audit_prune_failed", group=layout.group, error=str(exc))
            return
        if deleted:
            _log.debug("audit_pruned", group=layout.group, deleted=deleted)


# The pruner every locksmith operation in this process reports its audited writes to.
DEFAULT_PRUNER = Pruner()


async def wrote(etcd: Etcd, layout: Layout) -> None:
    """Tell the process-wide pruner that one audited operation on ``layout``'s group committed."""
    await DEFAULT_PRUNER.wrote(etcd, layout)
