"""The etcd key layout, in one place. See docs/semaphore.md and docs/policy-store.md.

    <prefix>groups/<group>/policy          policy JSON (slots = the semaphore's max), format_version 1
    <prefix>groups/<group>/pause           present = paused: {"format_version", "reason", "by", "at"}
    <prefix>groups/<group>/holders/<id>    one per slot holder (no lease: survives the holder's reboot)
    <prefix>groups/<group>/queue/<id>      one per waiter, on the waiting process's lease; FIFO by
                                           create_revision
    <prefix>groups/<group>/failures/...    failure-budget state (policy issue)
    <prefix>groups/<group>/cooldown/<id>.<n> one per slot cooling down after a release, on a lease
                                           whose TTL is the policy's cooldown
    <prefix>audit/<group>/<ns>-<rand>      bounded audit trail
"""

from __future__ import annotations

import re

from locksmith.errors import InvalidArgumentError

DEFAULT_PREFIX = "locksmith/v1/"
FORMAT_VERSION = 1

_GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


def check_group(group: str) -> str:
    if not _GROUP_RE.match(group):
        raise InvalidArgumentError(
            f"group {group!r} is invalid: use 1-63 letters, digits, '.', '_' or '-', starting alphanumeric"
        )
    return group


def check_id(holder_id: str) -> str:
    if not _ID_RE.match(holder_id):
        raise InvalidArgumentError(
            f"id {holder_id!r} is invalid: use 1-128 letters, digits, '.', '_', ':', '@' or '-'"
        )
    return holder_id


def normalize_prefix(prefix: str) -> str:
    return prefix if prefix.endswith("/") else prefix + "/"


class Layout:
    """Key names for one group under one prefix."""

    def __init__(self, group: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = normalize_prefix(prefix)
        self.group = check_group(group)
        self.base = f"{self.prefix}groups/{group}/"
        self.policy = self.base + "policy"
        self.pause = self.base + "pause"
        self.holders = self.base + "holders/"
        self.queue = self.base + "queue/"
        self.failures = self.base + "failures/"
        self.cooldown = self.base + "cooldown/"
        self.audit = f"{self.prefix}audit/{group}/"

    def holder(self, holder_id: str) -> str:
        return self.holders + holder_id

    def waiter(self, holder_id: str) -> str:
        return self.queue + holder_id

    @staticmethod
    def groups_prefix(prefix: str = DEFAULT_PREFIX) -> str:
        return normalize_prefix(prefix) + "groups/"
