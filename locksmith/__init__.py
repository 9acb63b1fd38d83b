"""locksmith: cluster reboot coordination on etcd v3 (semaphore, policies, maintenance windows).

The names below load on first use, so a process that only wants ``locksmith.log`` or
``locksmith.clock`` (the update agent's apply worker, say) does not pay for the etcd client.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "CorruptValueError": "locksmith.errors",
    "EtcdAuthError": "locksmith.errors",
    "EtcdError": "locksmith.errors",
    "EtcdUnavailableError": "locksmith.errors",
    "InvalidArgumentError": "locksmith.errors",
    "LocksmithError": "locksmith.errors",
    "NotHeldError": "locksmith.errors",
    "SlotUnavailableError": "locksmith.errors",
    "Etcd": "locksmith.etcd",
    "EtcdConfig": "locksmith.etcd",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'locksmith' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
