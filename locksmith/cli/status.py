"""``locksmithctl status``: a group's slots, holders and waiting queue.

Gathering (``group_status``) and rendering (``render_status``) are separate so the demo, the
policy commands and tests share them. Other modules add facts without editing this one:
``register_status_extension`` adds fields to the status dict (policy revision, pause reason,
window, failure budget, ...) and ``register_text_section`` adds lines to the text form, printed
after ``Available``/``Max`` and before the holders table.

Text output starts like CoreOS locksmith's so that eyes and scripts used to it still work::

    Available: 1
    Max: 3

    MACHINE ID  SINCE                 DEADLINE  REASON
    node-01     2026-11-27T03:30:05Z  -         kernel 6.1

    Waiting: 1
    POS  MACHINE ID  SINCE                 REASON
    1    node-02     2026-11-27T03:30:09Z
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import click

from locksmith.cli import CliContext, main
from locksmith.etcd import Etcd
from locksmith.keys import DEFAULT_PREFIX, normalize_prefix
from locksmith.semaphore import SemaphoreState, list_groups, read_state

Status = dict[str, Any]
StatusExtension = Callable[[Etcd, SemaphoreState, Status], Awaitable[None]]
TextSection = Callable[[Status], list[str]]

_extensions: list[StatusExtension] = []
_sections: list[TextSection] = []


def register_status_extension(fn: StatusExtension) -> StatusExtension:
    """Have ``group_status`` call ``fn(etcd, state, status)`` to add fields to ``status``."""
    _extensions.append(fn)
    return fn


def register_text_section(fn: TextSection) -> TextSection:
    """Have ``render_status`` print ``fn(status)``'s lines after the Available/Max header."""
    _sections.append(fn)
    return fn


def format_time(t: datetime | None) -> str:
    if t is None:
        return "-"
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat()


def state_to_status(state: SemaphoreState, *, now: datetime | None = None) -> Status:
    """The JSON-ready status of one semaphore state (no etcd access)."""
    now = now or datetime.now(UTC)
    return {
        "group": state.group,
        "max": state.max,
        "available": state.available,
        "paused": state.paused,
        "revision": state.revision,
        "holders": [
            {
                "id": h.id, "since": _iso(h.since), "deadline": _iso(h.deadline), "reason": h.reason,
                "by": h.by, "overdue": h.overdue(now),
            }
            for h in state.holders
        ],
        "queue": [
            {"position": i, "id": w.id, "since": _iso(w.since), "reason": w.reason, "by": w.by}
            for i, w in enumerate(state.queue, 1)
        ],
    }


async def group_status(
    etcd: Etcd, group: str = "default", prefix: str = DEFAULT_PREFIX, *, now: datetime | None = None,
) -> Status:
    """Everything ``status`` shows about one group, as a JSON-ready dict, read at one revision
    (``status["revision"]``), plus ``status["prefix"]`` for extensions. Registered extensions
    add their fields."""
    state = await read_state(etcd, group, prefix=prefix)
    status = state_to_status(state, now=now)
    status["prefix"] = normalize_prefix(prefix)
    for ext in _extensions:
        await ext(etcd, state, status)
    return status


async def all_status(etcd: Etcd, prefix: str = DEFAULT_PREFIX) -> list[Status]:
    return [await group_status(etcd, g, prefix) for g in await list_groups(etcd, prefix=prefix)]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns separated by two spaces; the last column is not padded (no trailing blanks)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    out = []
    for r in [header, *rows]:
        cells = [c.ljust(w) for c, w in zip(r, widths, strict=False)] + [r[-1]]
        out.append("  ".join(cells).rstrip())
    return out


def _when(iso: str | None) -> str:
    return format_time(datetime.fromisoformat(iso)) if iso else "-"


def render_status(status: Status, *, max_queue: int | None = None) -> str:
    """The text form of one group's status. ``max_queue`` shortens a long waiting queue."""
    lines = [f"Available: {status['available']}", f"Max: {status['max']}"]
    for section in _sections:
        lines += section(status)
    if status.get("paused") and not any(ln.startswith("Paused:") for ln in lines):
        lines.append("Paused: yes")
    lines.append("")
    rows = []
    for h in status["holders"]:
        deadline = _when(h["deadline"]) + (" OVERDUE" if h.get("overdue") else "")
        rows.append([h["id"], _when(h["since"]), deadline, h["reason"]])
    lines += _table(["MACHINE ID", "SINCE", "DEADLINE", "REASON"], rows)
    queue = status["queue"]
    if queue:
        shown = queue if max_queue is None else queue[:max_queue]
        lines += ["", f"Waiting: {len(queue)}"]
        lines += _table(
            ["POS", "MACHINE ID", "SINCE", "REASON"],
            [[str(w["position"]), w["id"], _when(w["since"]), w["reason"]] for w in shown],
        )
        if len(shown) < len(queue):
            lines.append(f"... and {len(queue) - len(shown)} more")
    else:
        lines += ["", "Waiting: 0"]
    return "\n".join(lines)


def render_all(statuses: Sequence[Status]) -> str:
    if not statuses:
        return "No groups."
    return "\n\n".join(f"Group: {s['group']}\n{render_status(s)}" for s in statuses)


@main.command()
@click.option("--all", "all_groups", is_flag=True, help="Every group under the prefix, not only --group.")
@click.pass_obj
def status(obj: CliContext, all_groups: bool) -> None:
    """Show slots, holders and the waiting queue (of --group, or of every group with --all)."""
    if all_groups:
        statuses = obj.run(lambda etcd: all_status(etcd, obj.prefix))
        obj.emit({"groups": statuses}, lambda: render_all(statuses))
    else:
        st = obj.run(lambda etcd: group_status(etcd, obj.group, obj.prefix))
        obj.emit(st, lambda: render_status(st))
