"""``update-agent``: the node daemon. Reads the config, runs the agent and serves it on D-Bus.

``--once`` runs the after-boot logic and one check (with apply), then exits: 0 when nothing
failed, 1 otherwise. The power-cut test kills this mode at random points.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from dataclasses import replace
from pathlib import Path

import click
from prometheus_client import CollectorRegistry

from locksmith.clock import SYSTEM_CLOCK, Clock
from locksmith.log import configure, get_logger
from updateagent.agent import (
    Agent,
    ChannelSource,
    ImmediateRebootStrategy,
    RebootStrategy,
    ReportOnlyStrategy,
    Schedule,
)
from updateagent.cli._common import fail_cleanly
from updateagent.config import AgentSettings, ConfigError, load_settings
from updateagent.health import HealthChecker
from updateagent.host import EmulatedHost, Host, SystemHost
from updateagent.metrics import AgentMetrics, MetricsError, MetricsServer
from updateagent.slots import SlotTable
from updateagent.state import StateStore

log = get_logger("updateagent.daemon")


def build_host(settings: AgentSettings) -> Host:
    if settings.host_kind == "emulated":
        if settings.disk is None or settings.boot_record is None:
            raise ConfigError("host.kind = 'emulated' needs disk.path and host.boot_record")
        # Several emulated machines share one real host: never fall back to its /etc/machine-id.
        return EmulatedHost(settings.disk, settings.boot_record, machine_id_file=settings.machine_id_file)
    return SystemHost(cmdline=settings.cmdline, os_release=settings.os_release,
                      machine_id_file=settings.machine_id_file or Path("/etc/machine-id"))


def build_reboot_strategy(settings: AgentSettings, host: Host) -> RebootStrategy:
    if settings.reboot_strategy == "reboot":
        return ImmediateRebootStrategy(host)
    if settings.reboot_strategy == "etcd-lock":
        log.warning("reboot_strategy_pending", strategy="etcd-lock",
                    detail="coordinated reboots are not in this version; reporting only")
    return ReportOnlyStrategy()


def build_agent(
    settings: AgentSettings,
    *,
    host: Host | None = None,
    clock: Clock = SYSTEM_CLOCK,
    reboot_strategy: RebootStrategy | None = None,
) -> Agent:
    """The agent the daemon runs, wired from settings. Tests and the simulator call this too."""
    host = host or build_host(settings)
    manifest_url = settings.manifest_url()
    source = (
        ChannelSource(manifest_url, settings.keys, insecure=settings.insecure) if manifest_url is not None else None
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
        reboot_strategy=reboot_strategy or build_reboot_strategy(settings, host),
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


async def run_once(settings: AgentSettings) -> int:
    agent = build_agent(settings)
    await agent.start()
    phase = await agent.run_until_settled(check=True)
    log.info("once_done", phase=phase.value, errors=agent.errors, last_error=agent.state.last_error)
    return 0 if agent.errors == 0 else 1


async def serve(settings: AgentSettings, *, use_dbus: bool = True) -> int:
    """Run until SIGTERM/SIGINT. An emulated host's reboot restarts the agent in-process."""
    from updateagent.dbus import AgentService

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
            metrics.close()
            if runner.done() and not runner.cancelled() and runner.exception() is not None:
                raise runner.exception()  # type: ignore[misc]
            if not stop.is_set():
                log.info("agent_restart_after_emulated_reboot")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if exporter is not None:
            await asyncio.to_thread(exporter.stop)
    return 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Agent config (TOML). Default: /etc/update-agent/config.toml if present.")
@click.option("--update-conf", "update_conf", type=click.Path(path_type=Path), multiple=True,
              help="locksmith-style update.conf to read (default: /etc/flatcar/update.conf, /etc/coreos/...).")
@click.option("--bus-address", envvar="UPDATE_AGENT_BUS_ADDRESS", default=None,
              help="D-Bus address to serve on (default: the system bus).")
@click.option("--no-dbus", is_flag=True, help="Do not serve on D-Bus.")
@click.option("--once", is_flag=True, help="Run the after-boot logic and one check/apply, then exit.")
@click.option("--log-level", default="INFO", show_default=True)
@fail_cleanly("update-agent", usage_errors=(ConfigError,))
def main(config_path: Path | None, update_conf: tuple[Path, ...], bus_address: str | None, no_dbus: bool,
         once: bool, log_level: str) -> None:
    """The update agent daemon."""
    configure(log_level)
    settings = load_settings(config_path, update_conf_paths=update_conf or None)
    if bus_address:
        settings = replace(settings, bus_address=bus_address)
    sys.exit(asyncio.run(run_once(settings) if once else serve(settings, use_dbus=not no_dbus)))


if __name__ == "__main__":
    main()
