"""locksmith's typed exception hierarchy. Each error names the problem and where it is."""

from __future__ import annotations


class LocksmithError(Exception):
    """Base of every error locksmith raises on purpose."""


class EtcdError(LocksmithError):
    """etcd could not do what was asked."""


class EtcdUnavailableError(EtcdError):
    """No endpoint answered (connection refused, timeout, TLS handshake failure)."""


class EtcdAuthError(EtcdError):
    """etcd refused the credentials or the permission."""


class WatchCompactedError(EtcdError):
    """A watch asked for a revision that etcd has compacted away: re-read, then re-watch."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch start revision was compacted (compact revision {compact_revision})")
        self.compact_revision = compact_revision


class CorruptValueError(LocksmithError):
    """A stored value that does not parse or has the wrong format version. Nothing was written."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"stored value at {key!r} is invalid: {problem}")
        self.key = key
        self.problem = problem


class SlotUnavailableError(LocksmithError):
    """A non-waiting lock found no free slot (or the group is paused)."""


class NotHeldError(LocksmithError):
    """An unlock for an id that holds no slot."""


class InvalidArgumentError(LocksmithError):
    """A caller passed a value that cannot be used (empty id, max < 0, bad group name)."""
