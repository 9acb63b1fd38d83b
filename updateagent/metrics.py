"""Prometheus metrics for the update agent (see docs/agent.md, "Metrics").

:class:`AgentMetrics` follows one agent through its ``subscribe`` hook: counters move on the
agent's events, and the gauges are a snapshot taken at every status change or event, so a scrape
never sees half an update (two states at 1, say). Each instance has its own
``CollectorRegistry`` unless given one, never the process-wide default: the tests and the
simulator run many agents in one process. :class:`MetricsServer` serves one registry over HTTP.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector

from locksmith.log import get_logger
from updateagent.agent import UPDATE_ENGINE_STATUSES, Agent, AgentEvent, Phase, StatusSnapshot
from updateagent.errors import UpdateAgentError

log = get_logger("updateagent.metrics")

CHECK_RESULTS = ("ok", "no_update", "refused", "error")
APPLY_RESULTS = ("success", "error")
BOOT_OUTCOMES = ("normal", "success", "health_check_failed", "rolled_back")
# An apply streams a /usr image (hundreds of MiB) over the network: seconds on a LAN, up to an hour
# on a slow link.
APPLY_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)

# No check is scheduled while one runs, an update is applied, or an applied one waits for its reboot.
_NO_PENDING_CHECK = frozenset({Phase.CHECKING_FOR_UPDATE, Phase.UPDATE_AVAILABLE, Phase.DOWNLOADING,
                               Phase.VERIFYING, Phase.FINALIZING, Phase.UPDATED_NEED_REBOOT})
_APPLY_PHASES = frozenset({Phase.UPDATE_AVAILABLE.value, Phase.DOWNLOADING.value, Phase.VERIFYING.value,
                           Phase.FINALIZING.value})


class MetricsError(UpdateAgentError):
    """The metrics endpoint cannot be served (address in use, not an address of this host)."""


@dataclass(frozen=True)
class _Snapshot:
    status: str = Phase.IDLE.value
    info: dict[str, str] = field(default_factory=dict)
    last_check: float = 0.0
    next_check: float = 0.0
    deny_list: int = 0


class _Gauges(Collector):
    """The gauges, built at scrape time from the last snapshot (swapped atomically by the agent's loop)."""

    def __init__(self) -> None:
        self.snapshot = _Snapshot()

    def describe(self) -> Iterator[Metric]:
        return self._families(_Snapshot(), samples=False)

    def collect(self) -> Iterator[Metric]:
        return self._families(self.snapshot, samples=True)

    @staticmethod
    def _families(s: _Snapshot, *, samples: bool) -> Iterator[Metric]:
        info = InfoMetricFamily("update_agent", "Versions and slot of this node (always 1).",
                                labels=("current_version", "booted_version", "booted_slot"))
        state = GaugeMetricFamily("update_agent_state", "1 for the update_engine status the agent is in, else 0.",
                                  labels=("state",))
        last = GaugeMetricFamily("update_agent_last_check_timestamp_seconds",
                                 "When the agent last checked for an update (0: never).")
        nxt = GaugeMetricFamily("update_agent_next_check_timestamp_seconds",
                                "When the next check is due (0: none scheduled, e.g. waiting for a reboot).")
        deny = GaugeMetricFamily("update_agent_deny_list_size",
                                 "Versions this node refuses (rolled back or failed their health checks).")
        if samples:
            info.add_metric([], {k: s.info.get(k, "") for k in ("current_version", "booted_version", "booted_slot")})
            for status in UPDATE_ENGINE_STATUSES:
                state.add_metric([status], 1.0 if status == s.status else 0.0)
            last.add_metric([], s.last_check)
            nxt.add_metric([], s.next_check)
            deny.add_metric([], float(s.deny_list))
        yield from (info, state, last, nxt, deny)


class _CoordinatorMetrics(Collector):
    """The reboot coordinator (docs/coordinator.md): read at scrape time from the strategy's
    ``metrics()``; the group's numbers come from its semaphore mirror, never from etcd."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def describe(self) -> Iterator[Metric]:
        return self._families({}, samples=False)

    def collect(self) -> Iterator[Metric]:
        read = getattr(self.agent.reboot_strategy, "metrics", None)
        m: dict[str, Any] = {}
        if callable(read):
            try:
                m = read()
            except Exception as exc:  # a scrape must never fail on the coordinator's account
                log.warning("coordinator_metrics_failed", error=str(exc))
        return self._families(m, samples=True)

    @staticmethod
    def _families(m: dict[str, Any], *, samples: bool) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        from updateagent.strategy.coordinator import COORDINATOR_STATES

        state = GaugeMetricFamily("update_agent_coordinator_state",
                                  "1 for the reboot coordinator's state, else 0.", labels=("state",))
        waits = CounterMetricFamily("update_agent_coordinator_wait_seconds",
                                    "Seconds spent waiting for a window and for a slot.", labels=("for",))
        reboots = CounterMetricFamily("update_agent_coordinator_reboots", "Reboots the coordinator asked for, "
                                      "by reason (update, rollback, reboot-required).", labels=("reason",))
        failures = CounterMetricFamily("update_agent_coordinator_failures_reported",
                                       "Failures this host reported against its group's budget.")
        group = GaugeMetricFamily("update_agent_group", "The agent's own group, from the semaphore mirror: "
                                  "holders, queue_length, slots, paused, failures.", labels=("what",))
        if samples and m:
            for name in COORDINATOR_STATES:
                state.add_metric([name], 1.0 if name == m.get("state") else 0.0)
            waits.add_metric(["window"], float(m.get("window_wait_seconds", 0.0)))
            waits.add_metric(["slot"], float(m.get("slot_wait_seconds", 0.0)))
            for reason in sorted({"update", "rollback", "reboot-required", *m.get("reboots", {})}):
                reboots.add_metric([reason], float(m.get("reboots", {}).get(reason, 0)))
            failures.add_metric([], float(m.get("failures_reported", 0)))
            for what, value in sorted(m.get("group", {}).items()):
                group.add_metric([what], float(value))
        yield from (state, waits, reboots, failures, group)


class AgentMetrics:
    """The metrics of one agent. ``close()`` unregisters them, so that the next agent (after an
    emulated reboot, in the daemon) can register the same names in the same registry."""

    def __init__(self, agent: Agent, registry: CollectorRegistry | None = None) -> None:
        self.agent = agent
        self.registry = registry if registry is not None else CollectorRegistry()
        self._gauges = _Gauges()
        self._checks = Counter("update_agent_checks", "Update checks by result: ok (an update was offered), "
                               "no_update, refused (by policy or the deny list), error.", ("result",),
                               registry=None)
        self._downloaded = Counter("update_agent_downloaded_bytes",
                                   "Compressed payload bytes received, failed downloads included.", registry=None)
        self._applies = Counter("update_agent_applies", "Update applies that ended, by result (success, error).",
                                ("result",), registry=None)
        self._apply_duration = Histogram("update_agent_apply_duration_seconds",
                                         "From an offered update to the slot marked to boot next (successful "
                                         "applies).", buckets=APPLY_BUCKETS, registry=None)
        self._boots = Counter("update_agent_boot_outcomes", "After-boot outcomes: normal, success, "
                              "health_check_failed, rolled_back.", ("outcome",), registry=None)
        for result in CHECK_RESULTS:
            self._checks.labels(result)
        for result in APPLY_RESULTS:
            self._applies.labels(result)
        for outcome in BOOT_OUTCOMES:
            self._boots.labels(outcome)
        self._collectors: tuple[Collector, ...] = (self._gauges, self._checks, self._downloaded, self._applies,
                                                   self._apply_duration, self._boots, _CoordinatorMetrics(agent))
        registered: list[Collector] = []
        try:
            for collector in self._collectors:
                self.registry.register(collector)
                registered.append(collector)
        except ValueError:
            for collector in registered:
                self.registry.unregister(collector)
            raise
        self._downloaded_seen = agent.downloaded_bytes
        self._apply_started: float | None = None
        self._closed = False
        agent.subscribe(self._on_status, self._on_event)
        self.refresh()

    def close(self) -> None:
        """Stop following the agent and take the metrics out of the registry."""
        if self._closed:
            return
        self._closed = True
        for collector in self._collectors:
            self.registry.unregister(collector)

    def refresh(self) -> None:
        """Take a new snapshot of the agent for the gauges (the subscription does this on every change)."""
        agent = self.agent
        s = agent.state
        next_check = agent.next_check
        self._gauges.snapshot = _Snapshot(
            status=agent.phase.operation,
            info={"current_version": s.current_version, "booted_version": s.booted_version,
                  "booted_slot": s.booted_slot},
            last_check=float(s.last_checked_time),
            next_check=next_check.timestamp() if next_check is not None and agent.phase not in _NO_PENDING_CHECK
            else 0.0,
            deny_list=len(s.deny_list),
        )
        received = agent.downloaded_bytes - self._downloaded_seen
        if received > 0:
            self._downloaded.inc(received)
            self._downloaded_seen = agent.downloaded_bytes

    def _on_status(self, _: StatusSnapshot) -> None:
        if not self._closed:
            self.refresh()

    def _on_event(self, event: AgentEvent) -> None:
        if self._closed:
            return
        name, details = event.event, event.details
        if name == "update_available":
            self._checks.labels("ok").inc()
            self._apply_started = self.agent.clock.monotonic()
        elif name == "check_done":
            self._checks.labels("no_update").inc()
        elif name == "update_refused":
            self._checks.labels("refused").inc()
        elif name == "error":
            phase = details.get("phase")
            if phase == Phase.CHECKING_FOR_UPDATE.value:
                self._checks.labels("error").inc()
            elif phase in _APPLY_PHASES:
                self._applies.labels("error").inc()
                self._apply_started = None
        elif name == "update_applied":
            self._applies.labels("success").inc()
            if self._apply_started is not None:
                self._apply_duration.observe(max(self.agent.clock.monotonic() - self._apply_started, 0.0))
                self._apply_started = None
        elif name == "boot_outcome":
            self._boots.labels(str(details.get("outcome", ""))).inc()
        self.refresh()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow scraper must not hold up the agent's shutdown

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks for the fully qualified name of the address (a DNS lookup
        # that can hang on a node whose resolver is down); nothing here needs that name.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """``registry`` in Prometheus' text format over HTTP, from a thread of its own.

    Any path answers (``/metrics`` by convention). ``port`` 0 picks a free port; ``port`` tells
    which. ``stop`` closes the socket and joins the thread."""

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 9657) -> None:
        self.registry = registry
        self.host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server is not None else self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        server_class = _Server6 if ":" in self.host else _Server
        try:
            server = server_class((self.host, self._port), MetricsHandler.factory(self.registry))
        except OSError as exc:
            raise MetricsError(f"metrics endpoint {self.host}:{self._port}: cannot listen: "
                               f"{exc.strerror or exc}") from None
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="update-agent-metrics", daemon=True)
        self._thread.start()
        log.info("metrics_listening", host=self.host, port=self.port, url=self.url)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        server.server_close()
        thread.join(5)
        self._thread = None
        log.info("metrics_stopped", host=self.host, port=server.server_address[1])

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
