"""locksmith: cluster reboot coordination on etcd v3 (semaphore, policies, maintenance windows)."""

from locksmith.errors import (
    CorruptValueError,
    EtcdAuthError,
    EtcdError,
    EtcdUnavailableError,
    InvalidArgumentError,
    LocksmithError,
    NotHeldError,
    SlotUnavailableError,
)
from locksmith.etcd import Etcd, EtcdConfig

__all__ = [
    "CorruptValueError",
    "Etcd",
    "EtcdAuthError",
    "EtcdConfig",
    "EtcdError",
    "EtcdUnavailableError",
    "InvalidArgumentError",
    "LocksmithError",
    "NotHeldError",
    "SlotUnavailableError",
]
