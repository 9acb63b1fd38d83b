"""Policies and the pause state in etcd: apply, get, list, diff, pause, resume.

Every write here is ONE transaction that also carries its audit entry, so etcd never holds a
policy or pause state that the trail does not explain (see docs/policy-store.md):

* apply:  compare policy key's mod_revision == as read (or absent)
          → put policy [+ put pause if the file says paused and the group is not] + audit entry
* pause:  (no compare) → put pause + audit entry            (an operator pause overwrites any)
* resume: compare pause key present → delete pause [+ delete failures/] + audit entry
* reset-failures: compare failures/ unchanged since read → delete failures/ + audit entry

The stored policy is ``Policy.to_json()``; its ``slots`` field is the semaphore's max, so the
semaphore's ``set-max`` rewrites that field alone (with a mod_revision compare) and the two can
never disagree. A policy's ``paused`` field is an instruction *when applying* a file; the live
pause state is only ever the pause key.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import random
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from locksmith import audit
from locksmith.errors import CorruptValueError, InvalidArgumentError, LocksmithError
from locksmith.etcd import (
    Compare,
    Delete,
    Etcd,
    Get,
    KeyValue,
    Op,
    Put,
    absent,
    mod_revision_is,
    unchanged_since,
)
from locksmith.keys import DEFAULT_PREFIX, FORMAT_VERSION, Layout
from locksmith.policy import CorruptPolicyError, Policy, Problem, default_policy, policy_from_json

__all__ = [
    "ApplyResult",
    "PauseSource",
    "PauseState",
    "PolicyConflictError",
    "StoredPolicy",
    "apply_policy",
    "canonical_json",
    "diff_policy",
    "encode_pause",
    "get_policy",
    "list_policies",
    "load_policy",
    "parse_pause",
    "parse_stored_policy",
    "pause",
    "plan_apply",
    "read_pause",
    "reset_failures",
    "resume",
    "stored_form",
]

_ATTEMPTS = 50

PauseSource = Literal["operator", "failure-budget"]
_SOURCES = ("operator", "failure-budget")


class PolicyConflictError(LocksmithError):
    """The stored policy changed between reading it and writing the new one; nothing was written."""

    def __init__(self, key: str, expected: int, actual: int) -> None:
        what = f"revision {actual}" if actual else "deleted"
        since = f"revision {expected}" if expected else "absent"
        super().__init__(
            f"policy at {key!r} changed while applying (was {since}, now {what}); nothing written, re-run"
        )
        self.key = key
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True)
class StoredPolicy:
    """A policy as stored: ``revision`` is the key's mod_revision (0 when there is no key and
    ``policy`` is the group's default)."""

    key: str
    policy: Policy
    revision: int
    version: int

    @property
    def exists(self) -> bool:
        return self.revision > 0


@dataclass(frozen=True)
class PauseState:
    reason: str
    by: str
    at: datetime | None
    source: str
    revision: int = 0
    version: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "reason": self.reason, "by": self.by, "at": self.at.isoformat() if self.at else None,
            "source": self.source, "revision": self.revision,
        }


@dataclass(frozen=True)
class ApplyResult:
    group: str
    key: str
    revision: int  # the new store revision (== the key's mod_revision); the old one when unchanged
    previous_revision: int  # 0: there was no stored policy
    changed: bool
    diff: str
    paused: bool  # this apply created the pause key
    dry_run: bool = False


async def _backoff(attempt: int) -> None:
    """Jittered, growing pause between compare-and-retry rounds, so contenders spread out."""
    await asyncio.sleep(random.uniform(0, min(0.2, 0.005 * 2 ** min(attempt, 6))))


# -- encoding ------------------------------------------------------------------------------------


def stored_form(policy: Policy) -> Policy:
    """The policy as it is stored: ``paused``/``paused_reason`` are instructions for the apply
    that carries them (they create the pause key), never stored state, so they are dropped."""
    if not policy.paused and policy.paused_reason is None:
        return policy
    return replace(policy, paused=False, paused_reason=None)


def canonical_json(policy: Policy) -> str:
    """The canonical text of a policy's stored form: sorted keys, two-space indent. Diffs
    compare these."""
    return json.dumps(stored_form(policy).to_json(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _encode_policy(policy: Policy) -> bytes:
    return stored_form(policy).to_json_bytes()


def parse_stored_policy(kv: KeyValue, group: str) -> Policy:
    """Parse the stored JSON; any problem raises CorruptValueError (a CorruptPolicyError, which
    also lists the problems) naming the key. A value without ``group`` (as ``set-max`` writes
    when no policy was stored) belongs to the group it is stored under."""
    policy = policy_from_json(kv.value, key=kv.key)
    if policy.group is None:
        return replace(policy, group=group)
    if policy.group != group:
        raise CorruptPolicyError(kv.key, [Problem("group", f"is {policy.group!r}, but the value is stored "
                                                           f"under group {group!r}")])
    return policy


def encode_pause(reason: str, by: str, source: str, at: datetime | None = None) -> bytes:
    value = {
        "format_version": FORMAT_VERSION, "reason": reason, "by": by,
        "at": (at or datetime.now(UTC)).isoformat(), "source": source,
    }
    return json.dumps(value, separators=(",", ":")).encode()


def parse_pause(kv: KeyValue) -> PauseState:
    """Parse a pause key. The key's presence alone means paused; this raises CorruptValueError
    (naming the key) only about its details, and callers still treat the group as paused."""
    try:
        d = json.loads(kv.value)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {d.get('format_version')!r}, expected {FORMAT_VERSION}")
        at = datetime.fromisoformat(d["at"]) if d.get("at") else None
        source = str(d.get("source", "operator"))
        if source not in _SOURCES:
            raise ValueError(f"source {source!r} is not one of {', '.join(_SOURCES)}")
        return PauseState(str(d.get("reason", "")), str(d.get("by", "")), at, source,
                          kv.mod_revision, kv.version)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptValueError(kv.key, str(exc)) from exc


# -- reads ---------------------------------------------------------------------------------------


async def get_policy(etcd: Etcd, group: str, *, prefix: str = DEFAULT_PREFIX) -> StoredPolicy | None:
    """The stored policy of ``group``, or None when it has none."""
    layout = Layout(group, prefix)
    kv = await etcd.get(layout.policy)
    if kv is None:
        return None
    return StoredPolicy(kv.key, parse_stored_policy(kv, group), kv.mod_revision, kv.version)


async def load_policy(etcd: Etcd, group: str, *, prefix: str = DEFAULT_PREFIX) -> StoredPolicy:
    """The stored policy, or the group's default (revision 0) when none is stored."""
    stored = await get_policy(etcd, group, prefix=prefix)
    if stored is not None:
        return stored
    return StoredPolicy(Layout(group, prefix).policy, default_policy(group), 0, 0)


async def read_pause(etcd: Etcd, group: str, *, prefix: str = DEFAULT_PREFIX) -> PauseState | None:
    kv = await etcd.get(Layout(group, prefix).pause)
    return None if kv is None else parse_pause(kv)


async def list_policies(
    etcd: Etcd, *, prefix: str = DEFAULT_PREFIX,
) -> list[tuple[str, StoredPolicy | CorruptValueError]]:
    """Every group that has a stored policy, by name, with its policy (or why it does not parse)."""
    base = Layout.groups_prefix(prefix)
    kvs, _ = await etcd.get_prefix(base)
    out: list[tuple[str, StoredPolicy | CorruptValueError]] = []
    for kv in kvs:
        rest = kv.key[len(base):]
        group, _, leaf = rest.partition("/")
        if leaf != "policy":
            continue
        try:
            out.append((group, StoredPolicy(kv.key, parse_stored_policy(kv, group), kv.mod_revision, kv.version)))
        except CorruptValueError as exc:
            out.append((group, exc))
    return out


def _diff(old: Policy | None, new: Policy, key: str, new_label: str = "new") -> str:
    a = canonical_json(old).splitlines(keepends=True) if old is not None else []
    b = canonical_json(new).splitlines(keepends=True)
    return "".join(difflib.unified_diff(a, b, f"{key} (stored)" if old else "/dev/null", new_label))


async def diff_policy(etcd: Etcd, policy: Policy, *, prefix: str = DEFAULT_PREFIX, label: str = "new") -> str:
    """Unified diff from the stored policy (canonical JSON) to ``policy``; "" when equal. A group
    without a stored policy diffs from nothing. A corrupt stored value raises CorruptValueError."""
    layout = Layout(_group_of(policy), prefix)
    stored = await get_policy(etcd, layout.group, prefix=prefix)
    return _diff(stored.policy if stored else None, policy, layout.policy, label)


def _group_of(policy: Policy) -> str:
    if policy.group is None:
        raise InvalidArgumentError("the policy names no group: give one in the file or with --group")
    return policy.group


# -- writes --------------------------------------------------------------------------------------


def _changed_fields(old: Policy | None, new: Policy) -> list[str]:
    a = stored_form(old).to_json() if old is not None else {}
    b = stored_form(new).to_json()
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


async def plan_apply(etcd: Etcd, policy: Policy, *, prefix: str = DEFAULT_PREFIX, label: str = "new") -> ApplyResult:
    """What ``apply_policy`` would do, without writing (``--dry-run``)."""
    return await apply_policy(etcd, policy, prefix=prefix, dry_run=True, label=label)


async def apply_policy(
    etcd: Etcd, policy: Policy, *, prefix: str = DEFAULT_PREFIX, by: str | None = None,
    reason: str = "", dry_run: bool = False, expect_revision: int | None = None, label: str = "new",
) -> ApplyResult:
    """Write ``policy`` (already validated: it is a Policy) for its group in one transaction.

    The transaction compares the policy key's mod_revision with the one read (or ``expect_revision``,
    e.g. the revision a diff was shown against; 0 = must be absent), so a concurrent change is
    never silently overwritten: PolicyConflictError, nothing written. A stored value that does not
    parse is replaced (that is how an operator repairs it), and the audit entry says so.
    Writing an identical policy writes nothing and returns the current revision.
    """
    layout = Layout(_group_of(policy), prefix)
    kv = await etcd.get(layout.policy)
    old: Policy | None = None
    corrupt = ""
    if kv is not None:
        try:
            old = parse_stored_policy(kv, layout.group)
        except CorruptValueError as exc:
            corrupt = exc.problem
    read_rev = kv.mod_revision if kv is not None else 0
    if expect_revision is not None and expect_revision != read_rev:
        raise PolicyConflictError(layout.policy, expect_revision, read_rev)
    diff = _diff(old, policy, layout.policy, label)
    pause_kv = await etcd.get(layout.pause) if policy.paused else None
    will_pause = bool(policy.paused and pause_kv is None)
    unchanged = old is not None and stored_form(old) == stored_form(policy) and not corrupt
    if dry_run or (unchanged and not will_pause):
        return ApplyResult(layout.group, layout.policy, read_rev, read_rev, not unchanged, diff,
                           will_pause, dry_run)

    who = by or audit.actor()
    compares: list[Compare] = [mod_revision_is(layout.policy, read_rev) if kv else absent(layout.policy)]
    ops: list[Op] = [Put(layout.policy, _encode_policy(policy))]
    if will_pause:
        compares.append(absent(layout.pause))
        why = policy.paused_reason or reason or "paused by policy file"
        ops.append(Put(layout.pause, encode_pause(why, who, "operator")))
    detail: dict[str, Any] = {"previous_revision": read_rev, "changed": _changed_fields(old, policy),
                              "slots": policy.slots, "paused": will_pause}
    if corrupt:
        detail["replaced_invalid_value"] = corrupt
    ops.append(audit.entry_op(layout, "policy-apply", layout.group, reason, detail=detail, by=who))
    res = await etcd.txn(compares, ops, [Get(layout.policy)])
    if not res.succeeded:
        now_kvs = res.results[0] if res.results else []
        actual = now_kvs[0].mod_revision if now_kvs else 0
        if actual == read_rev:  # only the pause key moved: someone paused meanwhile; retry once
            return await apply_policy(etcd, policy, prefix=prefix, by=by, reason=reason,
                                      expect_revision=expect_revision, label=label)
        raise PolicyConflictError(layout.policy, read_rev, actual)
    await audit.wrote(etcd, layout)
    return ApplyResult(layout.group, layout.policy, res.revision, read_rev, True, diff, will_pause)


async def pause(
    etcd: Etcd, group: str, reason: str = "", *, by: str | None = None, prefix: str = DEFAULT_PREFIX,
) -> PauseState:
    """Pause ``group`` (operator). Pausing a paused group records the new reason and takes the
    pause over as the operator's (an automatic pause becomes an operator one)."""
    layout = Layout(group, prefix)
    who = by or audit.actor()
    now = datetime.now(UTC)
    prev = await etcd.get(layout.pause)
    res = await etcd.txn([], [
        Put(layout.pause, encode_pause(reason, who, "operator", now)),
        audit.entry_op(layout, "pause", "operator", reason, by=who, now=now,
                       detail={"was_paused": prev is not None}),
    ])
    await audit.wrote(etcd, layout)
    return PauseState(reason, who, now, "operator", res.revision)


async def resume(
    etcd: Etcd, group: str, *, by: str | None = None, reason: str = "", reset_failures: bool = True,
    prefix: str = DEFAULT_PREFIX,
) -> bool:
    """Resume ``group``; False (nothing written) when it was not paused. By default this also
    clears the failure-budget counter in the same transaction: the operator has looked at the
    failures. ``reset_failures=False`` keeps them (the next failure then pauses again at once)."""
    layout = Layout(group, prefix)
    who = by or audit.actor()
    for attempt in range(_ATTEMPTS):
        if attempt:
            await _backoff(attempt)
        kv = await etcd.get(layout.pause)
        if kv is None:
            return False
        failures, rev = await etcd.get_prefix(layout.failures) if reset_failures else ([], 0)
        compares: list[Compare] = [mod_revision_is(layout.pause, kv.mod_revision)]
        ops: list[Op] = [Delete(layout.pause)]
        if reset_failures:
            # Exact count in the audit entry: the txn fails if a failure arrived since the read.
            compares.append(unchanged_since(layout.failures, rev))
            ops.append(Delete(layout.failures, prefix=True))
        try:
            p = parse_pause(kv)
            was: dict[str, Any] = {"source": p.source, "reason": p.reason, "by": p.by}
        except CorruptValueError as exc:
            was = {"invalid": exc.problem}
        ops.append(audit.entry_op(layout, "resume", group, reason, by=who,
                                  detail={"paused": was, "failures_cleared": len(failures)}))
        res = await etcd.txn(compares, ops)
        if res.succeeded:
            await audit.wrote(etcd, layout)
            return True
    raise LocksmithError(f"could not resume group {group!r}: its pause state kept changing")


async def reset_failures(
    etcd: Etcd, group: str, *, by: str | None = None, reason: str = "", prefix: str = DEFAULT_PREFIX,
) -> int:
    """Clear the failure-budget counter without touching the pause state; returns how many
    failures were cleared (0: nothing written)."""
    layout = Layout(group, prefix)
    for attempt in range(_ATTEMPTS):
        if attempt:
            await _backoff(attempt)
        kvs, rev = await etcd.get_prefix(layout.failures)
        if not kvs:
            return 0
        res = await etcd.txn(
            [unchanged_since(layout.failures, rev)],
            [Delete(layout.failures, prefix=True),
             audit.entry_op(layout, "reset-failures", group, reason, by=by, detail={"cleared": len(kvs)})],
        )
        if res.succeeded:
            await audit.wrote(etcd, layout)
            return int(res.results[0])
    raise LocksmithError(f"could not reset failures of group {group!r}: they kept changing")
