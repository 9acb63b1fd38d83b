"""``locksmithctl simulate``: run a rollout of a simulated fleet and report what it did.

Exit status: 0 when the run was safe, 3 when a safety property was violated (more holders than
slots, a reboot outside a window, more hosts booted into a bad release than failure_budget +
slots), 1 on an error, 2 on a usage error (with ``--compare``: ours decides; the models are
baselines, expected to boot a bad release everywhere). ``--output json`` prints one JSON document on stdout;
the progress bar and logs go to stderr.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from locksmith.errors import InvalidArgumentError, LocksmithError
from locksmith.etcd import EtcdConfig
from locksmith.windows import parse_duration

EXIT_UNSAFE = 3
_DIST_RE = re.compile(r"^(fixed|uniform|normal|lognormal):(.+)$")


def parse_distribution(text: str) -> tuple[str, tuple[float, ...]]:
    """``fixed:4m``, ``uniform:3m,5m``, ``normal:4m,30s``, ``lognormal:4m,0.3`` (median, sigma);
    a bare duration means fixed. Durations are Go-style (``90s``, ``4m``, ``1h30m``)."""
    m = _DIST_RE.match(text.strip())
    kind, args = (m.group(1), m.group(2)) if m else ("fixed", text.strip())
    parts = [p.strip() for p in args.split(",")]
    want = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2}[kind]
    if len(parts) != want:
        raise InvalidArgumentError(f"--reboot-duration {text!r}: {kind} takes {want} value(s)")
    values: list[float] = []
    for i, part in enumerate(parts):
        if kind == "lognormal" and i == 1:
            try:
                values.append(float(part))
            except ValueError:
                raise InvalidArgumentError(f"--reboot-duration {text!r}: sigma {part!r} is not a number") from None
            continue
        values.append(parse_duration(part, where="--reboot-duration").total_seconds())
    if values[0] <= 0 or (kind == "uniform" and values[1] < values[0]):
        raise InvalidArgumentError(f"--reboot-duration {text!r}: durations must be positive and min <= max")
    return kind, tuple(values)


def _checked(fn: Any) -> Any:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return fn(value)
        except (InvalidArgumentError, ValueError) as exc:
            raise click.BadParameter(str(exc)) from exc

    return callback


def _faults(value: tuple[str, ...]) -> frozenset[str]:
    from rollout.engine import FAULTS

    out: set[str] = set()
    for item in value:
        for f in (x.strip() for x in item.split(",")):
            if not f:
                continue
            if f not in FAULTS:
                raise InvalidArgumentError(f"unknown fault {f!r} (choose from {', '.join(FAULTS)})")
            out.add(f)
    return frozenset(out)


def _start(value: str) -> datetime:
    t = datetime.fromisoformat(value)
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


@click.command("simulate", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--hosts", type=click.IntRange(1, 5000), default=20, show_default=True, help="Fleet size.")
@click.option("--policy", "policy_files", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Policy file (TOML) of a group; repeat for several groups. Hosts are spread over them.")
@click.option("--release", type=click.Choice(["good", "bad", "flaky"]), default="good", show_default=True,
              help="bad: the new slot fails its health check on every host; flaky: on a fraction.")
@click.option("--flaky-fraction", type=click.FloatRange(0, 1), default=0.25, show_default=True)
@click.option("--reboot-duration", default="uniform:3m,5m", show_default=True,
              callback=_checked(parse_distribution), help="fixed:D | uniform:MIN,MAX | normal:MEAN,SD | "
              "lognormal:MEDIAN,SIGMA (Go durations).")
@click.option("--faults", "faults", multiple=True, callback=_checked(_faults),
              help="Comma-separated: member-kill (needs --members 3), agent-kill, never-returns.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--members", type=click.Choice(["1", "3"]), default="1", show_default=True,
              help="Embedded etcd cluster size.")
@click.option("--endpoint", "sim_endpoints", multiple=True,
              help="Use this etcd cluster instead of an embedded one (repeat or comma-separate), reached with "
              "the global --etcd-cafile/--etcd-certfile/--etcd-keyfile (mTLS) and "
              "--etcd-username/--etcd-password.")
@click.option("--coordinator", type=click.Choice(["ours", "locksmith-model", "kured-model"]), default="ours",
              show_default=True, help="The models are models of those tools' waiting behaviour, not the tools.")
@click.option("--compare", is_flag=True, help="Run ours and both models on the same fleet and seed.")
@click.option("--output", "-o", "sim_output", type=click.Choice(["text", "json"]), default=None,
              help="Report format (default: the global --output).")
@click.option("--chart", type=click.Path(dir_okay=False, path_type=Path), help="Write a chart (.png or .svg).")
@click.option("--rate", type=click.FloatRange(0.1, 10000), default=10.0, show_default=True,
              help="Virtual seconds per real second while hosts work (time jumps while all are parked).")
@click.option("--start", callback=_checked(_start), help="Virtual start time, ISO 8601 (default 2026-03-23T12:00Z).")
@click.option("--horizon", default="14d", show_default=False, help="Give up after this much virtual time "
              "(default 14 days; Go duration or Nd).")
@click.option("--check-interval", type=click.FloatRange(1, 10000), default=240.0, show_default=True,
              help="Agents' update check interval, virtual minutes.")
@click.option("--kured-period", default="1h", show_default=True, help="kured-model's retry period.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), help="Keep the hosts' files here.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--log-level", default="CRITICAL", show_default=True,
              help="The simulated agents' log level on stderr (they log every reboot and failure).")
@click.pass_context
def simulate_cmd(ctx: click.Context, hosts: int, policy_files: tuple[Path, ...], release: str, flaky_fraction: float,
                 reboot_duration: tuple[str, tuple[float, ...]], faults: frozenset[str], seed: int, members: str,
                 sim_endpoints: tuple[str, ...], coordinator: str, compare: bool, sim_output: str | None,
                 chart: Path | None, rate: float, start: datetime | None, horizon: str, check_interval: float,
                 kured_period: str, workdir: Path | None, no_progress: bool, log_level: str) -> None:
    """Simulate a rolling reboot of HOSTS hosts running the real agent and coordinator against a
    real etcd, in virtual time, and report makespan, safety and etcd load."""
    from locksmith.log import configure

    obj = ctx.find_object(object)
    output = sim_output or getattr(obj, "output", "text")
    etcd = _existing_etcd(ctx, sim_endpoints)
    if "member-kill" in faults and members != "3" and etcd is None:
        raise click.UsageError("--faults member-kill needs --members 3")
    if chart is not None and chart.suffix.lower() not in (".png", ".svg"):
        raise click.BadParameter("name the chart *.png or *.svg", param_hint="--chart")
    try:
        horizon_s = _horizon(horizon)
        kured_s = parse_duration(kured_period, where="--kured-period").total_seconds()
    except InvalidArgumentError as exc:
        raise click.UsageError(str(exc)) from exc
    configure(log_level)
    try:
        policies = tuple(_load_policy(p) for p in policy_files)
    except LocksmithError as exc:
        click.echo(f"locksmithctl: error: {exc}", err=True)
        sys.exit(1)
    seen: dict[str, Path] = {}
    for path, pol in zip(policy_files, policies, strict=True):
        if pol.group in seen:
            raise click.BadParameter(f"{path} and {seen[pol.group]} are both for group {pol.group!r}; "
                                     "one policy per group", param_hint="--policy")
        seen[pol.group] = path
    from rollout.engine import Interrupted, Scenario, simulate
    from rollout.report import render_compare, render_text

    base = Scenario(hosts=hosts, policies=policies, release=release, flaky_fraction=flaky_fraction,
                    reboot_duration=reboot_duration, faults=faults, seed=seed, members=int(members),
                    etcd=etcd, coordinator=coordinator, rate=rate, horizon=horizon_s,
                    check_interval_minutes=check_interval, kured_period=kured_s, workdir=workdir,
                    **({"start": start} if start is not None else {}))
    coordinators = ("ours", "locksmith-model", "kured-model") if compare else (coordinator,)
    progress = None if no_progress else sys.stderr
    reports = []
    try:
        for c in coordinators:
            reports.append(simulate(replace(base, coordinator=c, label=c if compare else ""), progress=progress))
    except LocksmithError as exc:
        click.echo(f"locksmithctl: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("locksmithctl: error: interrupted", err=True)
        sys.exit(130)
    except Interrupted:
        click.echo("locksmithctl: error: terminated", err=True)
        sys.exit(143)
    if chart is not None:
        from rollout.chart import ChartError, draw_chart

        try:
            draw_chart(reports[0], chart)
        except ChartError as exc:
            click.echo(f"locksmithctl: error: {exc}", err=True)
            sys.exit(1)
    if output == "json":
        doc: Any = [r.to_json() for r in reports] if compare else reports[0].to_json()
        click.echo(json.dumps(doc, indent=2, default=str))
    else:
        if compare:
            click.echo(render_compare(reports))
            click.echo("")
        click.echo("\n\n".join(render_text(r) for r in reports[:1]))
        if chart is not None:
            click.echo(f"\nchart: {chart}")
    # With --compare the exit status is ours: the models are expected to break the bad-release bound.
    if not reports[0].safe:
        sys.exit(EXIT_UNSAFE)


def _existing_etcd(ctx: click.Context, sim_endpoints: tuple[str, ...]) -> EtcdConfig | None:
    """The etcd named by ``--endpoint`` (the command's or the global one), with the global TLS and
    auth options (--etcd-cafile, --etcd-certfile, --etcd-keyfile, --etcd-username,
    --etcd-password); None for an embedded one, which ignores those options."""
    obj = ctx.find_object(object)
    base: EtcdConfig | None = getattr(obj, "etcd_config", None)
    parent = ctx.parent
    if sim_endpoints:
        from locksmith.cli import _split_endpoints

        endpoints = _split_endpoints(sim_endpoints)
        cfg = replace(base, endpoints=endpoints) if base is not None else EtcdConfig(endpoints=endpoints)
        try:
            cfg.host_ports()
        except InvalidArgumentError as exc:
            raise click.BadParameter(str(exc), param_hint="--endpoint") from exc
        return cfg
    if base is not None and parent is not None and parent.get_parameter_source("endpoints") not in (
            None, click.core.ParameterSource.DEFAULT):
        return base
    return None


def _horizon(text: str) -> float:
    t = text.strip()
    if t.endswith("d") and t[:-1].replace(".", "", 1).isdigit():
        return float(t[:-1]) * 86400
    return parse_duration(t, where="--horizon").total_seconds()


def _load_policy(path: Path) -> Any:
    from locksmith.files import read_text
    from locksmith.policy import parse_policy_text

    text = read_text(path, what="policy file")
    policy = parse_policy_text(text, source=str(path))
    if policy.group is None:
        raise InvalidArgumentError(f"{path}: the policy names no group (add group = \"...\")")
    return policy
