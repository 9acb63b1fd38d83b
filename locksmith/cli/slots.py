"""``locksmithctl lock``, ``unlock`` and ``set-max``: the semaphore by hand.

As in CoreOS locksmith the id defaults to this machine's id, so an operator on a node can take or
release that node's slot without looking it up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import click

from locksmith.cli import CliContext, checked, fail, main
from locksmith.errors import InvalidArgumentError, LocksmithError
from locksmith.etcd import Etcd
from locksmith.keys import check_id
from locksmith.machineid import machine_id
from locksmith.policy import max_slots
from locksmith.semaphore import Holder, Semaphore

T = TypeVar("T")


def _holder_id(given: str | None) -> str:
    if given is None:
        try:
            return machine_id()
        except LocksmithError as exc:
            fail(str(exc))
    try:
        return check_id(given)
    except InvalidArgumentError as exc:
        raise click.BadParameter(str(exc), param_hint="ID") from exc


def _positive_duration(value: str) -> timedelta:
    # Imported here: it pulls in APScheduler, which the other commands don't need.
    from locksmith.windows import parse_duration

    d = parse_duration(value, where="--hold-for")
    if d <= timedelta(0):
        raise InvalidArgumentError("--hold-for must be longer than 0s")
    return d


def _with_semaphore(obj: CliContext, op: Callable[[Semaphore], Awaitable[T]]) -> T:
    async def go(etcd: Etcd) -> T:
        async with Semaphore(etcd, obj.group, prefix=obj.prefix) as sem:
            return await op(sem)

    return obj.run(go)


def _holder_json(h: Holder, group: str) -> dict[str, Any]:
    return {
        "group": group, "id": h.id, "since": h.since.isoformat(),
        "deadline": h.deadline.isoformat() if h.deadline else None, "reason": h.reason, "by": h.by,
        "revision": h.revision,
    }


@main.command()
@click.argument("holder_id", metavar="[ID]", required=False)
@click.option("--wait", is_flag=True, help="Wait in the group's FIFO queue for a slot instead of failing.")
@click.option("--reason", default="", help="Why the slot is taken (shown by status and kept in the audit trail).")
@click.option("--hold-for", callback=checked(_positive_duration), metavar="DURATION",
              help="Expected holding time (Go duration, e.g. 30m; default 1h); after it the holder shows as overdue.")
@click.pass_obj
def lock(obj: CliContext, holder_id: str | None, wait: bool, reason: str, hold_for: timedelta | None) -> None:
    """Take a slot for ID (default: this machine's id). Fails at once if none is free, unless --wait."""
    hid = _holder_id(holder_id)

    take = Semaphore.lock if wait else Semaphore.try_lock
    h = _with_semaphore(obj, lambda sem: take(sem, hid, reason=reason, hold_for=hold_for))
    obj.emit(_holder_json(h, obj.group), f"{h.id} holds a slot in group {obj.group}")


@main.command()
@click.argument("holder_id", metavar="[ID]", required=False)
@click.pass_obj
def unlock(obj: CliContext, holder_id: str | None) -> None:
    """Release ID's slot (default: this machine's id). Fails, writing nothing, if ID holds none."""
    hid = _holder_id(holder_id)

    if not _with_semaphore(obj, lambda sem: sem.unlock(hid)):
        fail(f"{hid} does not hold a slot in group {obj.group}")
    obj.emit({"group": obj.group, "id": hid, "unlocked": True}, f"{hid} released its slot in group {obj.group}")


@main.command("set-max")
@click.argument("n", type=click.IntRange(min=1, max=max_slots()))
@click.pass_obj
def set_max(obj: CliContext, n: int) -> None:
    """Set how many nodes of the group may hold a slot at once (the policy's "slots")."""

    rev = _with_semaphore(obj, lambda sem: sem.set_max(n))
    obj.emit({"group": obj.group, "max": n, "revision": rev}, f"Max for group {obj.group} set to {n}")
