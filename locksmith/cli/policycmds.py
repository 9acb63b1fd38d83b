"""``locksmithctl policy validate|apply|get|list|diff``, ``pause``, ``resume``, ``reset-failures``
and ``log``: policies in etcd, the pause state and the audit trail. See docs/policy-store.md.

``policy get`` prints TOML by default (a file ``policy apply`` takes back); ``--format json`` or
the global ``--output json`` prints the stored JSON with its revision, ``--format toml`` the bare
TOML. ``log --since`` takes an ISO time (``2026-11-27T03:00``, naive = this machine's local time;
``2026-11-27`` = local midnight) or a duration before now (``2h``, ``90m``, ``1d12h``, optionally
followed by ``ago``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from locksmith import audit, budget
from locksmith.cli import CliContext, checked, fail, main
from locksmith.errors import CorruptValueError, InvalidArgumentError
from locksmith.etcd import Etcd
from locksmith.keys import DEFAULT_PREFIX, Layout, check_group
from locksmith.policy import Policy, PolicyError, parse_policy_file, to_toml
from locksmith.policystore import (
    ApplyResult,
    StoredPolicy,
    apply_policy,
    diff_policy,
    list_policies,
    load_policy,
    pause,
    read_pause,
    reset_failures,
    resume,
)
from locksmith.windows import WindowError

# -- helpers -------------------------------------------------------------------------------------


def _problems_json(exc: PolicyError) -> list[dict[str, Any]]:
    return [{"path": p.path, "message": p.message, "line": p.line} for p in exc.problems]


def _load_file(ctx: click.Context, path: str, group: str | None) -> Policy:
    """Parse and validate a policy file offline. On problems print every one (``FILE:LINE:
    key.path: message``) and exit 1. A file without ``group`` gets ``group``, else --group."""
    obj: CliContext = ctx.obj
    try:
        policy = parse_policy_file(Path(path), group=group or _explicit_global_group(ctx))
    except PolicyError as exc:
        if obj.json:
            obj.emit({"file": path, "valid": False, "problems": _problems_json(exc)}, "")
            raise SystemExit(1) from None
        for p in exc.problems:
            click.echo(p.format(path), err=True)
        n = len(exc.problems)
        fail(f"{path}: {n} problem{'s' if n != 1 else ''}; nothing written")
    if policy.group is None:
        policy = replace(policy, group=obj.group)
    return policy


def _group_arg(obj: CliContext, group: str | None) -> str:
    try:
        return check_group(group or obj.group)
    except InvalidArgumentError as exc:
        raise click.BadParameter(str(exc), param_hint="GROUP") from exc


def _explicit_global_group(ctx: click.Context) -> str | None:
    """The global --group, only if the user gave it (flag or environment), not its default."""
    root = ctx.find_root()
    source = root.get_parameter_source("group")
    if source in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT):
        return str(root.params["group"])
    return None


# -- policy ----------------------------------------------------------------------------------------


@main.group("policy")
def policy_cmd() -> None:
    """Validate, apply and inspect group policies stored in etcd."""


@policy_cmd.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--group", callback=checked(check_group), help="Validate as the policy of this group.")
@click.pass_context
def validate_cmd(ctx: click.Context, file: str, group: str | None) -> None:
    """Check FILE offline (no etcd): every problem with its key path and line; exit 1 if any."""
    obj: CliContext = ctx.obj
    policy = _load_file(ctx, file, group)
    obj.emit({"file": file, "valid": True, "group": policy.group, "policy": policy.to_json()},
             f"{file}: valid policy for group {policy.group}")


def _apply_text(res: ApplyResult, show_diff: bool) -> str:
    lines = []
    if show_diff and res.diff:
        lines.append(res.diff.rstrip("\n"))
    if res.dry_run:
        if not res.changed and not res.paused:
            lines.append(f"dry run: group {res.group} already has this policy (revision {res.previous_revision})")
        else:
            lines.append(f"dry run: nothing written (stored revision {res.previous_revision or 'none'})"
                         + ("; would pause the group" if res.paused else ""))
    elif not res.changed and not res.paused:
        lines.append(f"group {res.group}: policy unchanged, revision {res.revision}")
    else:
        lines.append(f"group {res.group}: policy applied, revision {res.revision}"
                     + ("; group paused" if res.paused else ""))
    return "\n".join(lines)


def _apply_json(res: ApplyResult) -> dict[str, Any]:
    return {"group": res.group, "key": res.key, "revision": res.revision, "previous_revision": res.previous_revision,
            "changed": res.changed, "paused": res.paused, "dry_run": res.dry_run, "diff": res.diff}


@policy_cmd.command("apply")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--group", callback=checked(check_group),
              help="Apply to this group (the file's `group`, if any, must agree).")
@click.option("--dry-run", is_flag=True, help="Validate and show the diff against etcd; write nothing.")
@click.option("--reason", default="", help="Why (kept in the audit trail).")
@click.option("--if-revision", type=int, default=None,
              help="Write only if the stored policy is still at this revision (0: none stored).")
@click.pass_context
def apply_cmd(ctx: click.Context, file: str, group: str | None, dry_run: bool, reason: str,
              if_revision: int | None) -> None:
    """Validate FILE, then write it in one transaction; prints the new revision."""
    obj: CliContext = ctx.obj
    policy = _load_file(ctx, file, group)
    res = obj.run(lambda etcd: apply_policy(etcd, policy, prefix=obj.prefix, reason=reason, dry_run=dry_run,
                                            expect_revision=if_revision, label=file))
    obj.emit(_apply_json(res), lambda: _apply_text(res, show_diff=dry_run))


@policy_cmd.command("diff")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--group", callback=checked(check_group), help="Compare with this group's stored policy.")
@click.option("--exit-code", is_flag=True, help="Exit 1 when they differ (as `git diff --exit-code`).")
@click.pass_context
def diff_cmd(ctx: click.Context, file: str, group: str | None, exit_code: bool) -> None:
    """Unified diff from the stored policy to FILE (canonical JSON forms)."""
    obj: CliContext = ctx.obj
    policy = _load_file(ctx, file, group)
    text = obj.run(lambda etcd: diff_policy(etcd, policy, prefix=obj.prefix, label=file))
    obj.emit({"group": policy.group, "same": not text, "diff": text},
             lambda: text.rstrip("\n") if text else f"group {policy.group}: no difference")
    if exit_code and text:
        raise SystemExit(1)


def _stored_json(sp: StoredPolicy) -> dict[str, Any]:
    return {"group": sp.policy.group, "key": sp.key, "revision": sp.revision, "stored": sp.exists,
            "policy": sp.policy.to_json()}


@policy_cmd.command("get")
@click.argument("group", required=False)
@click.option("--format", "fmt", type=click.Choice(["text", "json", "toml"]), default=None,
              help="text: TOML with a header comment (default); toml: bare TOML; json: stored JSON and "
                   "revision (also with the global --output json).")
@click.pass_obj
def get_cmd(obj: CliContext, group: str | None, fmt: str | None) -> None:
    """Show GROUP's policy (default: --group). A group with none stored shows its defaults."""
    g = _group_arg(obj, group)
    sp = obj.run(lambda etcd: load_policy(etcd, g, prefix=obj.prefix))
    fmt = fmt or ("json" if obj.json else "text")
    if fmt == "json":
        import json

        click.echo(json.dumps(_stored_json(sp), indent=2, sort_keys=True))
    elif fmt == "toml":
        click.echo(to_toml(sp.policy).rstrip("\n"))
    else:
        head = (f"# group {g}: {sp.key} at revision {sp.revision}" if sp.exists
                else f"# group {g}: no policy stored; these are the defaults")
        click.echo(head + "\n" + to_toml(sp.policy).rstrip("\n"))


@policy_cmd.command("list")
@click.pass_obj
def list_cmd(obj: CliContext) -> None:
    """Every group with a stored policy."""
    rows = obj.run(lambda etcd: list_policies(etcd, prefix=obj.prefix))
    data = []
    for g, sp in rows:
        if isinstance(sp, CorruptValueError):
            data.append({"group": g, "error": str(sp)})
        else:
            p = sp.policy
            data.append({"group": g, "revision": sp.revision, "slots": p.slots, "strategy": p.strategy,
                         "windows": len(p.windows), "failure_budget": p.failure_budget})

    def text() -> str:
        if not data:
            return "No policies."
        table = [["GROUP", "REVISION", "SLOTS", "STRATEGY", "WINDOWS", "BUDGET"]]
        for d in data:
            if "error" in d:
                table.append([d["group"], "-", "-", "INVALID", "-", d["error"]])
            else:
                table.append([d["group"], str(d["revision"]), str(d["slots"]), str(d["strategy"]),
                              str(d["windows"]) if d["windows"] else "always", str(d["failure_budget"])])
        return "\n".join(_table(table))

    obj.emit({"policies": data}, text)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([c.ljust(w) for c, w in zip(r, widths, strict=False)] + [r[-1]]).rstrip() for r in rows]


# -- pause / resume ------------------------------------------------------------------------------


@main.command("pause")
@click.argument("group", required=False)
@click.option("--reason", default="", help="Why (shown by status and kept in the audit trail).")
@click.pass_obj
def pause_cmd(obj: CliContext, group: str | None, reason: str) -> None:
    """Pause GROUP (default: --group): no host takes a new slot until `resume`."""
    g = _group_arg(obj, group)
    st = obj.run(lambda etcd: pause(etcd, g, reason, prefix=obj.prefix))
    obj.emit({"group": g, "paused": True, **st.to_json()},
             f"group {g} paused" + (f": {reason}" if reason else ""))


@main.command("resume")
@click.argument("group", required=False)
@click.option("--reason", default="", help="Why (kept in the audit trail).")
@click.option("--keep-failures", is_flag=True,
              help="Keep the failure-budget count (by default resuming clears it).")
@click.pass_obj
def resume_cmd(obj: CliContext, group: str | None, reason: str, keep_failures: bool) -> None:
    """Resume GROUP (default: --group) and clear its failure count."""
    g = _group_arg(obj, group)
    done = obj.run(lambda etcd: resume(etcd, g, reason=reason, reset_failures=not keep_failures, prefix=obj.prefix))
    obj.emit({"group": g, "resumed": done},
             f"group {g} resumed" if done else f"group {g} was not paused; nothing written")


@main.command("reset-failures")
@click.argument("group", required=False)
@click.option("--reason", default="", help="Why (kept in the audit trail).")
@click.pass_obj
def reset_failures_cmd(obj: CliContext, group: str | None, reason: str) -> None:
    """Clear GROUP's failure-budget count without resuming it."""
    g = _group_arg(obj, group)
    n = obj.run(lambda etcd: reset_failures(etcd, g, reason=reason, prefix=obj.prefix))
    obj.emit({"group": g, "cleared": n}, f"group {g}: {n} failure(s) cleared")


# -- log -------------------------------------------------------------------------------------------

_DUR_RE = re.compile(r"^\s*((?:\d+(?:\.\d+)?\s*(?:w|d|h|m|s)\s*)+)(?:ago)?\s*$", re.IGNORECASE)
_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([wdhms])", re.IGNORECASE)
_UNIT = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """An ISO time (naive = local time) or a duration before now (``2h``, ``1d12h ago``)."""
    now = now or datetime.now(UTC)
    m = _DUR_RE.match(text)
    if m:
        secs = sum(float(n) * _UNIT[u.lower()] for n, u in _PART_RE.findall(m.group(1)))
        try:
            return now - timedelta(seconds=secs)
        except OverflowError:
            raise InvalidArgumentError(f"--since {text!r} reaches back before year 1") from None
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgumentError(
            f"--since {text!r} is neither an ISO time (2026-11-27T03:00) nor a duration (2h, 30m ago)"
        ) from None
    try:
        if t.tzinfo is None:
            t = t.astimezone()  # naive: this machine's local time
        return t.astimezone(UTC)
    except (OverflowError, ValueError):
        raise InvalidArgumentError(f"--since {text!r} is out of the range of representable UTC times") from None


async def read_log(etcd: Etcd, prefix: str, group: str | None, since: datetime | None) -> list[audit.AuditEntry]:
    """Audit entries of one group, or of every group when ``group`` is None, oldest first."""
    if group is not None:
        return await audit.read(etcd, Layout(group, prefix), since=since)
    base = Layout("x", prefix).prefix + "audit/"
    kvs, _ = await etcd.get_prefix(base)
    out = []
    for kv in kvs:
        g = kv.key[len(base):].partition("/")[0]
        try:
            e = audit.parse_entry(g, kv.key, kv.value, kv.mod_revision)
        except CorruptValueError:
            continue
        if since is None or e.at >= since:
            out.append(e)
    out.sort(key=lambda e: (e.at, e.key))
    return out


def _describe(e: audit.AuditEntry) -> str:
    """What an entry did, in a few words."""
    d = e.detail
    if e.action == "policy-apply":
        if not d.get("previous_revision"):
            what = "policy-apply (new policy)"
        elif d.get("changed"):
            what = f"policy-apply (changed: {', '.join(map(str, d['changed']))})"
        else:
            what = "policy-apply"
        return what + (" + pause" if d.get("paused") else "")
    if e.action == "pause":
        return "pause (failure budget)" if e.subject == "failure-budget" else "pause"
    if e.action == "set-max" and "to" in d:
        return f"set-max {d.get('from', '?')} -> {d['to']}"
    if e.action == "failure":
        return f"failure {e.subject} {d.get('kind', '')}".rstrip()
    return e.action + (f" {e.subject}" if e.subject and e.subject != e.group else "")


@main.command("log")
@click.option("--group", callback=checked(check_group), help="Only this group (default: the global --group if given, "
                                                     "else every group).")
@click.option("--since", callback=checked(parse_since), metavar="TIME",
              help="ISO time (naive = local) or a duration before now: 2h, 90m, 1d12h ago.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the last N entries.")
@click.pass_context
def log_cmd(ctx: click.Context, group: str | None, since: datetime | None, limit: int | None) -> None:
    """The audit trail: policy changes, pause/resume, lock/unlock, set-max, failures; who, when, what, why."""
    obj: CliContext = ctx.obj
    g = group or _explicit_global_group(ctx)
    entries = obj.run(lambda etcd: read_log(etcd, obj.prefix, g, since))
    if limit is not None:
        entries = entries[-limit:]

    def text() -> str:
        if not entries:
            return "No audit entries."
        rows = [["TIME", "GROUP", "BY", "WHAT", "WHY"]]
        rows += [[e.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), e.group, e.actor, _describe(e), e.reason]
                 for e in entries]
        return "\n".join(_table(rows))

    obj.emit({"entries": [e.to_json() for e in entries]}, text)


# -- status extension ------------------------------------------------------------------------------


def _install_status_extension() -> None:
    try:
        from locksmith.cli import status as status_mod
    except ImportError:  # status not available (semaphore missing): nothing to extend
        return
    status_mod.register_status_extension(_policy_status)
    status_mod.register_text_section(_policy_status_lines)


async def _policy_status(etcd: Etcd, state: Any, status: dict[str, Any]) -> None:
    """Adds ``policy`` to a group's status: revision, pause, window, failures, overdue holders,
    and the stored policy's problem if it does not parse."""
    group = status["group"]
    prefix = str(status.get("prefix") or DEFAULT_PREFIX)
    now = datetime.now(UTC)
    info: dict[str, Any] = {"revision": 0, "stored": False, "error": None}
    try:
        sp = await load_policy(etcd, group, prefix=prefix)
        info.update(revision=sp.revision, stored=sp.exists)
        policy = sp.policy
    except CorruptValueError as exc:
        info["error"] = str(exc)
        policy = None
    try:
        ps = await read_pause(etcd, group, prefix=prefix)
        info["pause"] = ps.to_json() if ps else None
    except CorruptValueError as exc:
        info["pause"] = {"reason": "", "by": "", "source": "unknown", "error": str(exc)}
    info["failures"] = await budget.count_failures(etcd, group, prefix=prefix)
    if policy is not None:
        info["failure_budget"] = policy.failure_budget
        try:
            ws = policy.window_set()
            is_open = ws.is_open(now)
            end = ws.current_window_end(now) if is_open else None
            nxt = None if is_open else ws.next_open(now)
            info["window"] = {
                "always_open": not policy.windows, "open": is_open,
                "closes": _iso(end), "next_open": _iso(nxt),
            }
        except WindowError as exc:
            # e.g. time_zone = "localtime" and this machine's TZ is unusable: only the window
            # line is unknown, the rest of the status still holds.
            info["window"] = {"error": str(exc)}
    info["overdue"] = [h["id"] for h in status.get("holders", []) if h.get("overdue")]
    status["policy"] = info


def _iso(t: datetime | None) -> str | None:
    if t is None or t.year >= 9999:
        return None
    return t.astimezone(UTC).isoformat()


def _policy_status_lines(status: dict[str, Any]) -> list[str]:
    info = status.get("policy")
    if not info:
        return []
    lines = []
    if info.get("error"):
        lines.append(f"Policy: INVALID ({info['error']}); hosts keep their last good policy")
    elif info.get("stored"):
        lines.append(f"Policy: revision {info['revision']}")
    else:
        lines.append("Policy: none stored (defaults)")
    pause_info = info.get("pause")
    if pause_info:
        why = pause_info.get("error") or pause_info.get("reason") or "no reason given"
        who = f" by {pause_info['by']}" if pause_info.get("by") else ""
        lines.append(f"Paused: {pause_info.get('source', 'operator')}{who}: {why}")
    w = info.get("window")
    if w:
        if w.get("error"):
            lines.append(f"Window: unknown ({w['error']})")
        elif w["always_open"]:
            lines.append("Window: always open")
        elif w["open"]:
            lines.append(f"Window: open until {_short(w['closes']) or 'further notice'}")
        else:
            lines.append(f"Window: closed, next opens {_short(w['next_open']) or 'never'}")
    if "failure_budget" in info:
        lines.append(f"Failures: {info['failures']} of budget {info['failure_budget']}")
    else:
        lines.append(f"Failures: {info['failures']}")
    if info.get("overdue"):
        lines.append(f"Overdue: {', '.join(info['overdue'])}")
    return lines


def _short(iso: str | None) -> str | None:
    if not iso:
        return None
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_install_status_extension()
