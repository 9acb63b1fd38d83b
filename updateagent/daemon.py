"""``update-agent``: the node daemon. Reads the config, runs the agent and serves it on D-Bus.

``--once`` runs the after-boot logic and one check (with apply), then exits: 0 when nothing
failed, 1 otherwise. The power-cut test kills this mode at random points.
``update-agent check-config`` prints the effective settings and where each came from.

Under systemd (``Type=notify``) the daemon reports ``READY=1`` once it serves D-Bus and the
after-boot logic has started, keeps ``STATUS=`` current, and pings the watchdog from its event
loop (:mod:`updateagent.sdnotify`). A bad config, or a locksmithd that still coordinates this
host's reboots, ends it with status 2 and one line per problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from prometheus_client import CollectorRegistry

from locksmith.clock import SYSTEM_CLOCK, Clock
from locksmith.log import configure, get_logger
from updateagent.agent import Agent, Phase
from updateagent.checker import CheckRunner
from updateagent.cli._common import fail_cleanly
from updateagent.config import AgentSettings, ConfigError, effective_settings, format_effective, load_settings
from updateagent.health import HealthChecker
from updateagent.host import EmulatedHost, Host, SystemHost
from updateagent.locksmithd import SystemdUnits, UnitStates, refuse_beside_locksmithd
from updateagent.metrics import AgentMetrics, MetricsError, MetricsServer
from updateagent.schedule import Schedule
from updateagent.sdnotify import Notifier
from updateagent.slots import SlotTable
from updateagent.source import ChannelSource
from updateagent.state import StateStore
from updateagent.strategy import RebootStrategy, build_reboot_strategy

log = get_logger("updateagent.daemon")

F = TypeVar("F", bound=Callable[..., Any])


def build_host(settings: AgentSettings) -> Host:
    if settings.host_kind == "emulated":
        if settings.disk is None or settings.boot_record is None:
            raise ConfigError("host.kind = 'emulated' needs disk.path and host.boot_record")
        # Several emulated machines share one real host: never fall back to its /etc/machine-id.
        return EmulatedHost(settings.disk, settings.boot_record, machine_id_file=settings.machine_id_file,
                            logind=settings.host_reboot_via == "logind", bus_address=settings.bus_address)
    return SystemHost(cmdline=settings.cmdline, os_release=settings.os_release,
                      machine_id_file=settings.machine_id_file or Path("/etc/machine-id"))


def build_agent(
    settings: AgentSettings,
    *,
    host: Host | None = None,
    clock: Clock = SYSTEM_CLOCK,
    reboot_strategy: RebootStrategy | None = None,
    run_check: CheckRunner | None = None,
) -> Agent:
    """The agent the daemon runs, wired from settings. Tests and the simulator call this too.

    ``run_check``: where update checks run (``updateagent.checker``); by default in a child
    process, as the daemon runs them; ``checker.in_thread`` in this process."""
    host = host or build_host(settings)
    manifest_url = settings.manifest_url()
    source = (
        ChannelSource(manifest_url, settings.keys, insecure=settings.insecure, deadline=settings.fetch_deadline,
                      run_check=run_check, stall_bytes=settings.stall_bytes, stall_seconds=settings.stall_seconds)
        if manifest_url is not None else None
    )
    return Agent(
        store=StateStore(settings.state_file),
        host=host,
        slots=SlotTable(settings.disk) if settings.disk is not None else None,
        source=source,
        health=HealthChecker(settings.health_checks, deadline=settings.health_deadline,
                             retry_interval=settings.health_retry_interval),
        clock=clock,
        schedule=Schedule(settings.check_interval, settings.check_jitter, settings.retry_initial,
                          settings.max_backoff),
        reboot_strategy=reboot_strategy or build_reboot_strategy(settings, host, clock=clock),
        allow_downgrade=settings.allow_downgrade,
        check_on_start=settings.check_on_start,
        initial_versions=settings.host_versions,
    )


def start_metrics_server(settings: AgentSettings, registry: CollectorRegistry) -> MetricsServer | None:
    """The metrics endpoint, or None when disabled or when it cannot listen: metrics are not worth
    keeping a node from updating, so that is logged and the daemon carries on."""
    if settings.metrics_listen is None:
        return None
    host, port = settings.metrics_listen
    try:
        return MetricsServer(registry, host, port).start()
    except MetricsError as exc:
        log.error("metrics_unavailable", error=str(exc))
        return None


def unit_states(settings: AgentSettings) -> UnitStates:
    """Where systemd's unit states are read (the system bus, or the configured D-Bus address)."""
    return SystemdUnits(settings.bus_address)


async def check_coordination(settings: AgentSettings, units: UnitStates | None) -> None:
    """Refuse to run (CoordinatorConflict, exit status 2) when locksmithd still coordinates this
    host's reboots and our strategy would reboot it too."""
    origin = settings.origins.get("reboot.strategy", "default")
    await refuse_beside_locksmithd(settings.reboot, units, origin=origin)


_PHASE_WORDS = {
    Phase.STARTING: "starting",
    Phase.BOOT_HEALTH_CHECK: "checking the health of the booted slot",
    Phase.IDLE: "idle",
    Phase.CHECKING_FOR_UPDATE: "checking for an update",
    Phase.UPDATE_AVAILABLE: "update {version} available",
    Phase.DOWNLOADING: "downloading {version} ({progress:.0%})",
    Phase.VERIFYING: "verifying {version}",
    Phase.FINALIZING: "finalizing {version}",
    Phase.UPDATED_NEED_REBOOT: "{version} applied, reboot needed",
    Phase.REPORTING_ERROR_EVENT: "reporting an error",
}


def status_line(agent: Agent) -> str:
    """What ``systemctl status`` shows: the agent's phase in words, the running version, then the
    reboot coordinator's own status text."""
    snapshot = agent.status()
    words = _PHASE_WORDS.get(snapshot.phase, snapshot.phase.value)
    line = words.format(version=snapshot.new_version or "?", progress=snapshot.progress)
    if agent.state.current_version:
        line += f"; running {agent.state.current_version}"
    describe = getattr(agent.reboot_strategy, "status_text", None)
    if callable(describe):
        with contextlib.suppress(Exception):  # a status text must never take the daemon down
            coordinator = describe()
            if coordinator:
                line += f"; reboot: {coordinator}"
    return line


async def run_once(settings: AgentSettings, *, units: UnitStates | None = None) -> int:
    await check_coordination(settings, units if units is not None else unit_states(settings))
    agent = build_agent(settings)
    await agent.start()
    phase = await agent.run_until_settled(check=True)
    log.info("once_done", phase=phase.value, errors=agent.errors, last_error=agent.state.last_error)
    return 0 if agent.errors == 0 else 1


async def serve(settings: AgentSettings, *, use_dbus: bool = True, notifier: Notifier | None = None,
                units: UnitStates | None = None) -> int:
    """Run until SIGTERM/SIGINT. An emulated host's reboot restarts the agent in-process."""
    from updateagent.dbus import AgentService

    await check_coordination(settings, units if units is not None else unit_states(settings))
    notifier = notifier or Notifier(None)
    # The watchdog is fed by a task on this loop, so a loop that hangs stops feeding it.
    keep_alive = asyncio.ensure_future(notifier.keep_alive())
    ready = False
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    host = build_host(settings)
    # One endpoint for the daemon's life; each agent (a new one after an emulated reboot, whose
    # counters start over as a real reboot's would) registers its metrics in the same registry.
    registry = CollectorRegistry()
    exporter = start_metrics_server(settings, registry)
    try:
        while not stop.is_set():
            agent = build_agent(settings, host=host)
            metrics = AgentMetrics(agent, registry)
            await agent.start()
            service = AgentService(agent, settings.bus_address) if use_dbus else None
            if service is not None:
                await service.start()
            runner = asyncio.ensure_future(agent.run())
            _follow_status(agent, notifier)
            if not ready:
                await asyncio.sleep(0)  # let the run task begin the after-boot logic
                notifier.ready(status_line(agent))
                ready = True
                log.info("ready", notify=notifier.enabled, watchdog_seconds=notifier.watchdog_interval)
            waits = [asyncio.ensure_future(stop.wait()), runner]
            rebooted = getattr(host, "rebooted", None)
            if isinstance(rebooted, asyncio.Event):
                rebooted.clear()
                waits.append(asyncio.ensure_future(rebooted.wait()))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            agent.stop()
            for task in waits:
                if task is not runner:
                    task.cancel()
            # TimeoutError: a tick (a hung fetch) outlived the grace period; wait_for cancelled it.
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(runner, 10)
            if service is not None:
                await service.stop()
            close = getattr(agent.reboot_strategy, "close", None)
            if close is not None:
                await close()  # leaves a queue, stops the coordinator's task
            metrics.close()
            if runner.done() and not runner.cancelled() and runner.exception() is not None:
                raise runner.exception()  # type: ignore[misc]
            if not stop.is_set():
                log.info("agent_restart_after_emulated_reboot")
    finally:
        notifier.stopping()
        keep_alive.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if exporter is not None:
            await asyncio.to_thread(exporter.stop)
        notifier.close()
    return 0


def _follow_status(agent: Agent, notifier: Notifier) -> None:
    """Keep STATUS= current: on every agent status change and every coordinator status change."""
    if not notifier.enabled:
        return

    def update(*_: object) -> None:
        notifier.status(status_line(agent))

    agent.subscribe(on_status=update)
    subscribe = getattr(agent.reboot_strategy, "subscribe", None)
    if callable(subscribe):
        subscribe(update)


def _config_errors(prefix: str) -> Callable[[F], F]:
    """Every config problem on a line of its own (``<prefix>: <file>: key '<key>': <why>``),
    exit status 2; fail_cleanly would put all of them behind one prefix."""

    def decorate(fn: F) -> F:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ConfigError as exc:
                for line in exc.problems:
                    click.echo(f"{prefix}: {line}", err=True)
                sys.exit(2)

        return wrapper  # type: ignore[return-value]

    return decorate


def _file_options(fn: F) -> F:
    """Options both the daemon and check-config take (before or after the subcommand)."""
    for option in reversed((
        click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
                     help="Agent config (TOML). Default: /etc/update-agent/config.toml if present."),
        click.option("--update-conf", "update_conf", type=click.Path(path_type=Path), multiple=True,
                     help="locksmith-style update.conf to read (default: /etc/flatcar/update.conf, "
                          "/etc/coreos/update.conf)."),
        click.option("--bus-address", envvar="UPDATE_AGENT_BUS_ADDRESS", default=None,
                     help="D-Bus address to serve on and to ask systemd on (default: the system bus)."),
        click.option("--log-level", default=None, help="Log level (default INFO)."),
    )):
        fn = option(fn)
    return fn


def _load(config_path: Path | None, update_conf: tuple[Path, ...], bus_address: str | None) -> AgentSettings:
    settings = load_settings(config_path, update_conf_paths=update_conf or None)
    if bus_address:
        settings = replace(settings, bus_address=bus_address)
    return settings


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_file_options
@click.option("--no-dbus", is_flag=True, help="Do not serve on D-Bus.")
@click.option("--once", is_flag=True, help="Run the after-boot logic and one check/apply, then exit.")
@click.pass_context
@fail_cleanly("update-agent")
@_config_errors("update-agent")
def main(ctx: click.Context, config_path: Path | None, update_conf: tuple[Path, ...], bus_address: str | None,
         log_level: str | None, no_dbus: bool, once: bool) -> None:
    """The update agent daemon (no subcommand), or a subcommand."""
    ctx.obj = {"config_path": config_path, "update_conf": update_conf, "bus_address": bus_address,
               "log_level": log_level}
    if ctx.invoked_subcommand is not None:
        return
    configure(log_level or "INFO")
    settings = _load(config_path, update_conf, bus_address)
    if once:
        sys.exit(asyncio.run(run_once(settings)))
    notifier = Notifier.from_environ()
    sys.exit(asyncio.run(serve(settings, use_dbus=not no_dbus, notifier=notifier)))


@main.command("check-config")
@_file_options
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Result format.")
@click.option("--no-locksmithd-check", is_flag=True,
              help="Do not look for a running locksmithd (systemd and coordinator.conf).")
@click.pass_context
@fail_cleanly("update-agent check-config")
@_config_errors("update-agent check-config")
def check_config(ctx: click.Context, config_path: Path | None, update_conf: tuple[Path, ...],
                 bus_address: str | None, log_level: str | None, output: str, no_locksmithd_check: bool) -> None:
    """Print the effective settings and the file and key each came from. Exit status 2 with one
    line per problem (on stderr) when the config cannot be used."""
    parent = ctx.obj or {}
    configure(log_level or parent.get("log_level") or "WARNING")
    try:
        settings = _load(config_path or parent.get("config_path"), update_conf or parent.get("update_conf", ()),
                         bus_address or parent.get("bus_address"))
        if not no_locksmithd_check:
            asyncio.run(check_coordination(settings, unit_states(settings)))
    except ConfigError as exc:
        if output == "json":
            click.echo(json.dumps({"valid": False, "problems": list(exc.problems)}, indent=2, sort_keys=True))
        raise
    rows = effective_settings(settings)
    if output == "json":
        doc = {"valid": True, "sources": list(settings.sources),
               "settings": [{"key": k, "value": _json_value(v), "origin": o} for k, v, o in rows]}
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo(format_effective(rows))


def _json_value(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    to_json = getattr(value, "to_json", None)
    return to_json() if callable(to_json) else str(value)


if __name__ == "__main__":
    main()
