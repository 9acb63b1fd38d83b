"""``updatectl status|check|slots|mark-good|history|reset``: talk to the running agent over D-Bus."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from updateagent.cli import main
from updateagent.cli._common import emit, emit_json, fail_cleanly, inherited, output_option

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_bus = click.option(
    "--bus-address", default=None, metavar="ADDRESS", callback=inherited("bus_address"),
    help="D-Bus address of the agent's bus (default: the system bus; env UPDATECTL_BUS_ADDRESS).",
)


def _agent_command(name: str) -> Callable[[F], click.Command]:
    """An ``updatectl`` subcommand that talks to the agent: ``--bus-address``, ``--output`` and
    one-line errors."""

    def decorate(fn: F) -> click.Command:
        return main.command(name)(_bus(output_option(fail_cleanly("updatectl")(fn))))

    return decorate


_DONE = ("UPDATE_STATUS_IDLE", "UPDATE_STATUS_UPDATED_NEED_REBOOT", "UPDATE_STATUS_REPORTING_ERROR_EVENT")
# Our after-boot phases (update_engine clients see them as IDLE): no check starts until they end.
_VERIFYING = ("AGENT_STARTING", "AGENT_BOOT_HEALTH_CHECK")


def _run(bus_address: str | None, body: Callable[[Any], Awaitable[T]]) -> T:
    from updateagent.dbus import AgentClient

    async def go() -> T:
        async with AgentClient(bus_address) as client:
            return await body(client)

    return asyncio.run(go())


def _when(stamp: int | float | None) -> str:
    if not stamp:
        return "never"
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _status_doc(status: tuple[int, float, str, str, int]) -> dict[str, Any]:
    return {
        "last_checked_time": status[0],
        "progress": status[1],
        "current_operation": status[2],
        "new_version": status[3],
        "new_size": status[4],
    }


def _slot_lines(slots: list[dict[str, Any]]) -> list[str]:
    header = ("SLOT", "LABEL", "PART", "PRIORITY", "TRIES", "SUCCESSFUL", "BOOTED", "VERSION", "PARTUUID")
    rows = [header] + [
        (
            s["name"], s["label"], str(s["partition"]), str(s["priority"]), str(s["tries"]),
            str(int(s["successful"])), "*" if s["booted"] else "", s.get("version") or "-", s["partuuid"],
        )
        for s in slots
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


@_agent_command("status")
def status_cmd(bus_address: str | None, output: str) -> None:
    """The agent's state, versions, last check, progress and the slot table."""

    async def body(client: Any) -> dict[str, Any]:
        return {
            "status": _status_doc(await client.get_status()),
            "details": await client.details(),
            "slots": await client.slots(),
            "coordinator": await client.coordinator(),
        }

    doc = _run(bus_address, body)
    emit(output, doc, _status_text(doc))


def _status_text(doc: dict[str, Any]) -> str:
    st, d = doc["status"], doc["details"]
    pending = d.get("pending")
    lines = [
        f"State:            {st['current_operation']}" + (f" ({d['phase']})" if d["phase"] != st["current_operation"]
                                                          else ""),
        f"Current version:  {d['current_version'] or 'unknown'}",
        f"Booted:           slot {d['booted_slot'] or '?'}, version {d['booted_version'] or 'unknown'}",
        f"Last check:       {_when(st['last_checked_time'])}",
        f"Progress:         {st['progress'] * 100:.0f}%",
        f"New version:      {st['new_version'] or '-'}" + (f" ({st['new_size']} bytes)" if st["new_size"] else ""),
        f"Pending:          {pending['kind']} to {pending['version']} in slot {pending['slot']}" if pending
        else "Pending:          -",
        f"Last boot:        {d['last_boot_outcome'] or '-'}",
        f"Last error:       {d['last_error'] or '-'}",
        f"Deny list:        {', '.join(e['version'] for e in d['deny_list']) or '-'}",
        *_coordinator_lines(doc.get("coordinator")),
        "",
        *_slot_lines(doc["slots"]),
    ]
    return "\n".join(lines)


def _coordinator_lines(c: dict[str, Any] | None) -> list[str]:
    if not c:
        return []
    group = f", group {c['group']}" if c.get("group") else ""
    return [f"Reboot:           {c.get('status', '-')}",
            f"Coordinator:      {c.get('state', '-')} ({c.get('strategy', '-')}{group}) since {c.get('since') or '-'}"]


@_agent_command("slots")
def slots_cmd(bus_address: str | None, output: str) -> None:
    """The A/B slot table with its GPT priority/tries/successful bits."""
    slots = _run(bus_address, lambda c: c.slots())
    emit(output, slots, "\n".join(_slot_lines(slots)))


@_agent_command("history")
@click.option("--limit", "-n", type=click.IntRange(min=0, max=2**32 - 1), default=20, show_default=True,
              help="How many of the latest events (0: all).")
def history_cmd(limit: int, bus_address: str | None, output: str) -> None:
    """The agent's recent events (boots, checks, applies, rollbacks, errors)."""
    entries = _run(bus_address, lambda c: c.history(limit))
    lines = []
    for e in entries:
        details = " ".join(f"{k}={v}" for k, v in e["details"].items() if k != "checks")
        lines.append(f"{_when(e['time'])}  {e['event']:<18} {details}".rstrip())
    emit(output, entries, "\n".join(lines))


@_agent_command("mark-good")
def mark_good_cmd(bus_address: str | None, output: str) -> None:
    """Declare the booted slot good now (skips the remaining health checks)."""
    slot = _run(bus_address, lambda c: c.mark_good())
    emit(output, {"slot": slot, "marked_good": True}, f"slot {slot} marked good")


@_agent_command("reset")
def reset_cmd(bus_address: str | None, output: str) -> None:
    """ResetStatus: clear an error, or revert an applied update that waits for its reboot."""

    async def body(client: Any) -> tuple[int, float, str, str, int]:
        await client.reset_status()
        status: tuple[int, float, str, str, int] = await client.get_status()
        return status

    status = _run(bus_address, body)
    emit(output, _status_doc(status), f"status: {status[2]}")


@_agent_command("check")
@click.option("--timeout", type=click.FloatRange(min=1), default=3600, show_default=True,
              help="Seconds to wait for the check (and apply) to finish.")
def check_cmd(timeout: float, bus_address: str | None, output: str) -> None:
    """Check for an update now; follow the download and apply with a progress bar.

    Results (``--output json`` field ``result``): ``update_applied``, ``no_update``, ``refused``
    (the channel offers a release this node will not take: a downgrade, a denied version, one
    that needs a newer running version; ``reason`` says which; exit status 0), ``error`` and
    ``not_started`` (exit status 1)."""
    show_bar = output == "text" and sys.stdout.isatty()

    async def body(client: Any) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[int, float, str, str, int]] = loop.create_future()
        seen: list[str] = []
        refused: list[str] = []
        bar: Any = None
        shown = [0]

        def on_status(st: tuple[int, float, str, str, int]) -> None:
            nonlocal bar
            op = st[2]
            if not seen or seen[-1] != op:
                seen.append(op)
                if output == "text" and not show_bar:
                    click.echo(op.removeprefix("UPDATE_STATUS_").lower().replace("_", " "))
            if show_bar and op == "UPDATE_STATUS_DOWNLOADING":
                if bar is None:
                    bar = click.progressbar(length=1000, label=f"applying {st[3]}")
                    bar.__enter__()
                step = int(st[1] * 1000) - shown[0]
                if step > 0:
                    bar.update(step)
                    shown[0] += step
            if bar is not None and op != "UPDATE_STATUS_DOWNLOADING":
                bar.update(1000 - shown[0])
                shown[0] = 1000
                bar.__exit__(None, None, None)
                bar = None
            if "UPDATE_STATUS_CHECKING_FOR_UPDATE" in seen and op in _DONE and not done.done():
                done.set_result(st)
            elif op == "UPDATE_STATUS_UPDATED_NEED_REBOOT" and not done.done():
                # Waiting for a reboot before the check began (the boot's health check failed and
                # a rollback waits): the agent dropped the request, the check will never come.
                done.set_result(st)

        def on_event(name: str, details: dict[str, Any]) -> None:
            # Sent before the agent goes back to IDLE (signals keep their order): known by then.
            if name == "update_refused" and "UPDATE_STATUS_CHECKING_FOR_UPDATE" in seen:
                refused.append(str(details.get("detail") or "refused by policy"))

        await client.subscribe(on_status, on_event)
        accepted = await client.check()
        if not accepted:
            current = await client.get_status()
            details = await client.details()
            return {"result": "not_started", "status": _status_doc(current), "error": "",
                    "phase": details["phase"]}
        final = await asyncio.wait_for(done, timeout)
        details = await client.details()
        if "UPDATE_STATUS_CHECKING_FOR_UPDATE" not in seen:
            return {"result": "not_started", "status": _status_doc(final), "error": details["last_error"],
                    "phase": details["phase"], "operations": seen}
        result = {
            "UPDATE_STATUS_UPDATED_NEED_REBOOT": "update_applied",
            "UPDATE_STATUS_REPORTING_ERROR_EVENT": "error",
        }.get(final[2], "refused" if refused else "no_update")
        doc = {"result": result, "status": _status_doc(final), "error": details["last_error"] if result == "error"
               else "", "operations": seen}
        if result == "refused":
            doc["reason"] = refused[-1]
        return doc

    try:
        doc = _run(bus_address, body)
    except TimeoutError:
        raise TimeoutError(f"the check did not finish within {timeout:g}s") from None
    if output == "json":
        emit_json(doc)
    elif doc["result"] == "not_started":
        op = doc["status"]["current_operation"]
        if doc.get("error") and op == "UPDATE_STATUS_UPDATED_NEED_REBOOT":
            click.echo(f"updatectl: no check was made: {doc['error']}; the node waits for a reboot to "
                       f"{doc['status']['new_version'] or 'its previous version'}", err=True)
        elif op == "UPDATE_STATUS_UPDATED_NEED_REBOOT":
            click.echo(f"update {doc['status']['new_version']} is already applied; reboot to use it")
        elif doc.get("phase") in _VERIFYING:
            click.echo("updatectl: the agent is verifying the booted slot (after-boot health checks); "
                       "no check starts until that is done; try again later", err=True)
        else:
            click.echo(f"updatectl: the agent is busy ({op}); try again later", err=True)
    elif doc["result"] == "update_applied":
        click.echo(f"update {doc['status']['new_version']} applied; reboot to use it")
    elif doc["result"] == "no_update":
        click.echo("no update available")
    elif doc["result"] == "refused":
        click.echo(f"update refused: {doc['reason']}")
    else:
        click.echo(f"updatectl: check failed: {doc['error']}", err=True)
    if doc["result"] == "error" or (
        doc["result"] == "not_started"
        and (doc["status"]["current_operation"] != "UPDATE_STATUS_UPDATED_NEED_REBOOT" or doc.get("error"))
    ):
        sys.exit(1)
