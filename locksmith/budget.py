"""The failure budget and the automatic pause, kept in etcd so every host of the group sees them.

A policy's ``failure_budget = N`` tolerates N failed hosts: the group keeps rolling while at most
N failures are recorded, and the report that makes the count N + 1 (or any later one, if the
group is running again without the count having been reset) pauses the group. ``0`` means the
first failure pauses it.

Each failure is its own key, ``failures/<host>/<kind>/<incident>``, written with a put (no
counter key, so 50 hosts reporting at once never contend and no increment is lost); the count is
a count-only range read of ``failures/``. The incident defaults to a fresh unique id; pass a
stable one (e.g. the overdue holder's revision) to make a repeated report of the same incident
count once. The automatic pause is one transaction guarded by "pause key absent", so however
many reporters see the budget spent at once, exactly one pauses, with one audit entry; an
existing operator pause is never overwritten.

``locksmithctl resume`` clears the counter in the pause-deleting transaction (``--keep-failures``
keeps it); ``locksmithctl reset-failures`` clears it alone. See docs/policy-store.md.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from locksmith import audit
from locksmith.errors import CorruptValueError, InvalidArgumentError
from locksmith.etcd import Compare, Etcd, Get, Put, Target, absent
from locksmith.keys import DEFAULT_PREFIX, FORMAT_VERSION, Layout, check_id
from locksmith.log import get_logger
from locksmith.policy import Policy
from locksmith.policystore import encode_pause, load_policy

__all__ = ["Failure", "FailureKind", "FailureReport", "count_failures", "failure_recorded", "list_failures",
           "report_failure"]

_log = get_logger(__name__)

FailureKind = Literal["unhealthy", "overdue"]
_KINDS = ("unhealthy", "overdue")


@dataclass(frozen=True)
class FailureReport:
    count: int  # failures recorded for the group after this report
    budget: int | None  # None: the policy could not be read, so no pause decision was taken
    recorded: bool  # False: the same incident was already recorded
    paused: bool  # this report paused the group


@dataclass(frozen=True)
class Failure:
    key: str
    host: str
    kind: str
    detail: str
    at: datetime | None
    by: str

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "kind": self.kind, "detail": self.detail,
                "at": self.at.isoformat() if self.at else None, "by": self.by}


def _failure_key(layout: Layout, host_id: str, kind: str, incident: str | None) -> str:
    if incident is None:
        incident = f"{datetime.now(UTC).timestamp() * 1e9:020.0f}-{secrets.token_hex(4)}"
    elif "/" in incident or not incident:
        raise InvalidArgumentError(f"failure incident {incident!r} must be non-empty and contain no '/'")
    return f"{layout.failures}{host_id}/{kind}/{incident}"


async def report_failure(
    etcd: Etcd, group: str, host_id: str, kind: FailureKind, detail: str = "", *,
    incident: str | None = None, policy: Policy | None = None, prefix: str = DEFAULT_PREFIX,
    by: str | None = None,
) -> FailureReport:
    """Record one failed host and pause the group if that spends the budget.

    ``policy`` is the caller's current policy (e.g. a PolicyReader's); without it the stored one
    is read. If the stored policy does not parse, the failure is still recorded and the pause
    decision is left to the next report that can read it (the count is durable, and the rule is
    "count > budget", so nothing is lost by deferring).
    """
    if kind not in _KINDS:
        raise InvalidArgumentError(f"failure kind {kind!r} is not one of {', '.join(_KINDS)}")
    layout = Layout(group, prefix)
    check_id(host_id)
    who = by or audit.actor()
    now = datetime.now(UTC)
    key = _failure_key(layout, host_id, kind, incident)
    value = json.dumps({"format_version": FORMAT_VERSION, "host": host_id, "kind": kind, "detail": detail,
                        "at": now.isoformat(), "by": who}, separators=(",", ":")).encode()
    res = await etcd.txn([absent(key)], [
        Put(key, value),
        audit.entry_op(layout, "failure", host_id, detail, by=who, now=now, detail={"kind": kind}),
    ], [Get(key)])
    if res.succeeded:
        await audit.wrote(etcd, layout)
        created = res.revision
    else:
        existing = res.results[0] if res.results else []
        created = existing[0].create_revision if existing else 0
    count = await etcd.count_prefix(layout.failures)

    if policy is None:
        try:
            policy = (await load_policy(etcd, group, prefix=prefix)).policy
        except CorruptValueError as exc:
            _log.error("failure_budget_policy_unreadable", group=group, key=exc.key, problem=exc.problem,
                       failures=count)
            return FailureReport(count, None, res.succeeded, False)
    budget = policy.failure_budget
    if count <= budget:
        return FailureReport(count, budget, res.succeeded, False)

    why = (f"failure budget spent: {count} failed host(s), budget {budget} "
           f"(last: {host_id} {kind}{': ' + detail if detail else ''})")
    # The count is a read that may be stale by the time the pause is sent: if a resume or a
    # reset-failures cleared the failures meanwhile (our own key with them), the operator has dealt
    # with what we counted, and pausing now would undo their resume. Our key still being the one we
    # wrote proves no clear happened since.
    paused = await etcd.txn([absent(layout.pause), Compare(key, Target.CREATE, "==", created)], [
        Put(layout.pause, encode_pause(why, who, "failure-budget", now)),
        audit.entry_op(layout, "pause", "failure-budget", why, by=who, now=now,
                       detail={"source": "failure-budget", "failures": count, "budget": budget,
                               "host": host_id, "kind": kind}),
    ])
    if paused.succeeded:
        await audit.wrote(etcd, layout)
        _log.warning("group_paused_by_failure_budget", group=group, failures=count, budget=budget,
                     host=host_id, kind=kind)
    return FailureReport(count, budget, res.succeeded, paused.succeeded)


async def failure_recorded(etcd: Etcd, group: str, host_id: str, kind: FailureKind, incident: str, *,
                           prefix: str = DEFAULT_PREFIX) -> bool:
    """Whether that incident is recorded already: one read, so that of the many hosts that may
    report a shared incident (an overdue holder) only one spends a transaction on it."""
    check_id(host_id)
    return await etcd.get(_failure_key(Layout(group, prefix), host_id, kind, incident)) is not None


async def count_failures(etcd: Etcd, group: str, *, prefix: str = DEFAULT_PREFIX) -> int:
    return await etcd.count_prefix(Layout(group, prefix).failures)


async def list_failures(etcd: Etcd, group: str, *, prefix: str = DEFAULT_PREFIX) -> list[Failure]:
    """The recorded failures, oldest first; a value that does not parse is listed with its key's
    host and kind and the problem as its detail, rather than hidden."""
    layout = Layout(group, prefix)
    kvs, _ = await etcd.get_prefix(layout.failures)
    out: list[Failure] = []
    for kv in kvs:
        host, _, rest = kv.key[len(layout.failures):].partition("/")
        kind = rest.partition("/")[0]
        try:
            d = json.loads(kv.value)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            at = datetime.fromisoformat(d["at"]) if d.get("at") else None
            if at is not None and at.tzinfo is None:  # would break the sort against aware times
                raise ValueError(f"'at' has no time zone: {d['at']!r}")
            out.append(Failure(kv.key, str(d.get("host", host)), str(d.get("kind", kind)),
                               str(d.get("detail", "")), at, str(d.get("by", ""))))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            out.append(Failure(kv.key, host, kind, f"(invalid value: {exc})", None, ""))
    out.sort(key=lambda f: f.at or datetime.min.replace(tzinfo=UTC))
    return out
