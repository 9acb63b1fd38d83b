"""The agent's Prometheus metrics, scraped over real HTTP while the agent checks, applies and reboots
on the test rig (real GPT image, real channel server), and the ``[metrics]`` configuration."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from agentrig import Rig, wait_for_log
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from updateagent.agent import UPDATE_ENGINE_STATUSES, Phase, StatusSnapshot
from updateagent.config import ConfigError, load_settings, parse_listen
from updateagent.metrics import AgentMetrics, MetricsError, MetricsServer

AGENT = str(Path(sys.executable).parent / "update-agent")


class Scrape:
    """One scrape of the endpoint, parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        assert key in self.samples, f"no sample {name}{labels} in:\n{self.text}"
        return self.samples[key]

    def info(self) -> dict[str, str]:
        found = [dict(labels) for (name, labels) in self.samples if name == "update_agent_info"]
        assert len(found) == 1, self.text
        return found[0]

    def state(self) -> str:
        on = [dict(labels)["state"] for (name, labels), v in self.samples.items()
              if name == "update_agent_state" and v == 1]
        assert len(on) == 1, f"exactly one state must be 1:\n{self.text}"
        return on[0]


def scrape(url: str) -> Scrape:
    response = requests.get(url, timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return Scrape(response.text)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    assert got is not None, f"no sample {name}{labels}"
    return got


# ------------------------------------------------------------------------------- over HTTP


async def test_scrapes_follow_a_check_an_apply_and_the_reboot(rig: Rig) -> None:
    build = rig.publish("2.0.0")
    agent = rig.agent()
    metrics = AgentMetrics(agent)
    with MetricsServer(metrics.registry, "127.0.0.1", 0) as server:
        await agent.start()
        assert await agent.run_until_settled() is Phase.IDLE

        idle = scrape(server.url)
        assert idle.state() == "UPDATE_STATUS_IDLE"
        assert {dict(labels)["state"] for (name, labels) in idle.samples if name == "update_agent_state"} == set(
            UPDATE_ENGINE_STATUSES)
        assert idle.info() == {"current_version": "1.0.0", "booted_version": "1.0.0", "booted_slot": "A"}
        assert idle("update_agent_boot_outcomes_total", outcome="normal") == 1
        assert idle("update_agent_boot_outcomes_total", outcome="success") == 0
        assert all(idle("update_agent_checks_total", result=r) == 0 for r in ("ok", "no_update", "refused", "error"))
        assert idle("update_agent_last_check_timestamp_seconds") == 0
        assert idle("update_agent_downloaded_bytes_total") == 0
        assert agent.next_check is not None
        assert idle("update_agent_next_check_timestamp_seconds") == pytest.approx(agent.next_check.timestamp())
        assert idle("update_agent_next_check_timestamp_seconds") > time.time() + 30 * 60  # rig: on_start = false

        # Scrape from inside the agent's own status updates: the endpoint answers mid-check.
        during: dict[Phase, Scrape] = {}

        def on_status(s: StatusSnapshot) -> None:
            if s.phase in (Phase.CHECKING_FOR_UPDATE, Phase.DOWNLOADING) and s.phase not in during:
                during[s.phase] = scrape(server.url)

        agent.subscribe(on_status)
        started = time.time()
        assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT, agent.state.last_error

        checking = during[Phase.CHECKING_FOR_UPDATE]
        assert checking.state() == "UPDATE_STATUS_CHECKING_FOR_UPDATE"
        assert checking("update_agent_checks_total", result="ok") == 0
        assert checking("update_agent_next_check_timestamp_seconds") == 0  # none pending while one runs
        downloading = during[Phase.DOWNLOADING]
        assert downloading.state() == "UPDATE_STATUS_DOWNLOADING"
        assert downloading("update_agent_checks_total", result="ok") == 1
        assert downloading("update_agent_apply_duration_seconds_count") == 0

        done = scrape(server.url)
        assert done.state() == "UPDATE_STATUS_UPDATED_NEED_REBOOT"
        assert done("update_agent_checks_total", result="ok") == 1
        assert done("update_agent_checks_total", result="error") == 0
        assert done("update_agent_downloaded_bytes_total") == build.manifest.compressed_size
        assert done("update_agent_applies_total", result="success") == 1
        assert done("update_agent_apply_duration_seconds_count") == 1
        assert 0 < done("update_agent_apply_duration_seconds_sum") < time.time() - started + 1
        assert started - 1 <= done("update_agent_last_check_timestamp_seconds") <= time.time()
        assert done("update_agent_next_check_timestamp_seconds") == 0  # checks wait for the reboot
        assert done.info()["current_version"] == "1.0.0"  # until the new slot has booted

        # The reboot: a new agent registers its metrics in the same registry, as the daemon does.
        metrics.close()
        assert "update_agent_state" not in scrape(server.url).text
        rig.boot()
        rebooted = rig.agent()
        AgentMetrics(rebooted, metrics.registry)
        await rebooted.start()
        assert await rebooted.run_until_settled() is Phase.IDLE, rebooted.state.last_error
        after = scrape(server.url)
        assert after.state() == "UPDATE_STATUS_IDLE"
        assert after.info() == {"current_version": "2.0.0", "booted_version": "2.0.0", "booted_slot": "B"}
        assert after("update_agent_boot_outcomes_total", outcome="success") == 1
        assert after("update_agent_boot_outcomes_total", outcome="normal") == 0
        assert after("update_agent_downloaded_bytes_total") == 0  # a new boot, new counters
        assert after("update_agent_deny_list_size") == 0
        # last_checked_time is persisted state, so it survives the reboot.
        assert after("update_agent_last_check_timestamp_seconds") == done("update_agent_last_check_timestamp_seconds")


def test_the_daemon_serves_metrics_and_stops_cleanly(rig: Rig, tmp_path: Path) -> None:
    config = rig.write_config(extra='\n[metrics]\nlisten = "127.0.0.1:0"\n')
    log_path = tmp_path / "agent.log"
    with log_path.open("w") as out:
        proc = subprocess.Popen([AGENT, "--config", str(config), "--update-conf", "/nonexistent", "--no-dbus"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        listening = wait_for_log(proc, log_path, "metrics_listening")
        wait_for_log(proc, log_path, "transition", to=Phase.IDLE.value)
        s = scrape(str(listening["url"]))
        assert s.state() == "UPDATE_STATUS_IDLE"
        assert s("update_agent_boot_outcomes_total", outcome="normal") == 1
        assert s.info()["booted_slot"] == "A"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_for_log(proc, log_path, "metrics_stopped")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(listening["port"])), timeout=2).close()


# ------------------------------------------------------------------------------- counters


async def test_check_results_and_failed_applies_are_counted(rig: Rig) -> None:
    agent = rig.agent()
    metrics = AgentMetrics(agent)
    r = metrics.registry
    await agent.start()
    await agent.run_until_settled()

    rig.publish("1.0.0")  # what the node runs
    assert await agent.run_until_settled(check=True) is Phase.IDLE
    assert value(r, "update_agent_checks_total", result="no_update") == 1

    rig.publish("0.9.0")  # a downgrade
    assert await agent.run_until_settled(check=True) is Phase.IDLE
    assert value(r, "update_agent_checks_total", result="refused") == 1

    (rig.channel_root / rig.group / "manifest.json").unlink()  # HTTP 404: a permanent error
    assert await agent.run_until_settled(check=True) is Phase.IDLE
    assert value(r, "update_agent_checks_total", result="error") == 1
    assert value(r, "update_agent_applies_total", result="error") == 0

    build = rig.publish("2.0.0")
    build.payload_path.write_bytes(b"\x00" * build.manifest.compressed_size)  # not zstd: the apply fails
    assert await agent.run_until_settled(check=True) is Phase.IDLE
    assert "zstd" in agent.state.last_error
    assert value(r, "update_agent_checks_total", result="ok") == 1
    assert value(r, "update_agent_applies_total", result="error") == 1
    assert value(r, "update_agent_applies_total", result="success") == 0
    assert value(r, "update_agent_apply_duration_seconds_count") == 0
    assert value(r, "update_agent_checks_total", result="error") == 1  # apply errors are not check errors
    assert value(r, "update_agent_state", state="UPDATE_STATUS_IDLE") == 1


async def test_health_check_failure_rollback_and_deny_list(rig: Rig) -> None:
    rig.publish("2.0.0")
    first = rig.agent()
    await first.start()
    assert await first.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT

    rig.boot()  # into B, whose health check fails
    failing = rig.agent(health=[{"command": ["false"], "name": "app"}])
    m = AgentMetrics(failing)
    await failing.start()
    assert await failing.run_until_settled() is Phase.UPDATED_NEED_REBOOT
    assert value(m.registry, "update_agent_boot_outcomes_total", outcome="health_check_failed") == 1
    assert value(m.registry, "update_agent_deny_list_size") == 1
    assert value(m.registry, "update_agent_state", state="UPDATE_STATUS_UPDATED_NEED_REBOOT") == 1

    rig.boot()  # back into A
    back = rig.agent()
    m = AgentMetrics(back)
    await back.start()
    assert await back.run_until_settled() is Phase.IDLE
    assert value(m.registry, "update_agent_boot_outcomes_total", outcome="rolled_back") == 1
    assert value(m.registry, "update_agent_boot_outcomes_total", outcome="health_check_failed") == 0
    assert value(m.registry, "update_agent_deny_list_size") == 1
    assert m.registry.get_sample_value("update_agent_info", {"current_version": "1.0.0", "booted_version": "1.0.0",
                                                               "booted_slot": "A"}) == 1


def test_each_agent_has_a_registry_of_its_own(rig: Rig) -> None:
    one, two = AgentMetrics(rig.agent()), AgentMetrics(rig.agent())
    assert one.registry is not two.registry
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        AgentMetrics(rig.agent(), one.registry)
    assert value(one.registry, "update_agent_deny_list_size") == 0  # the failed one left nothing behind
    one.close()
    AgentMetrics(rig.agent(), one.registry)


# ------------------------------------------------------------------------------- server


def test_server_refuses_an_address_in_use_and_closes_its_port() -> None:
    registry = CollectorRegistry()
    with MetricsServer(registry, "127.0.0.1", 0) as first:
        assert first.url == f"http://127.0.0.1:{first.port}/metrics"
        with pytest.raises(MetricsError, match=rf"metrics endpoint 127\.0\.0\.1:{first.port}: cannot listen"):
            MetricsServer(registry, "127.0.0.1", first.port).start()
        assert requests.get(first.url, timeout=5).status_code == 200
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", first.port), timeout=2).close()
    first.stop()  # twice is fine


# ------------------------------------------------------------------------------- config


def _settings(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_settings(path, update_conf_paths=(), env={})


@pytest.mark.parametrize(("text", "expected"), [
    ("", ("127.0.0.1", 9657)),
    ("[metrics]\n", ("127.0.0.1", 9657)),
    ('[metrics]\nlisten = "0.0.0.0:9100"\n', ("0.0.0.0", 9100)),
    ('[metrics]\nlisten = "[::1]:9657"\n', ("::1", 9657)),
    ('[metrics]\nlisten = "localhost:0"\n', ("localhost", 0)),
    ('[metrics]\nlisten = ""\n', None),
    ("[metrics]\nenabled = false\n", None),
    ('[metrics]\nenabled = false\nlisten = "not checked when disabled"\n', None),
])
def test_metrics_listen_setting(tmp_path: Path, text: str, expected: tuple[str, int] | None) -> None:
    assert _settings(tmp_path, text).metrics_listen == expected


@pytest.mark.parametrize(("text", "problem"), [
    ('listen = "127.0.0.1"', "key 'metrics.listen': expected host:port (e.g. 127.0.0.1:9657), got '127.0.0.1'"),
    ('listen = ":9657"', "key 'metrics.listen': expected host:port"),
    ('listen = "[::1]"', "key 'metrics.listen': expected host:port"),
    ('listen = "127.0.0.1:70000"', "key 'metrics.listen': port must be a number from 0 to 65535, got '70000'"),
    ('listen = "127.0.0.1:http"', "key 'metrics.listen': port must be a number from 0 to 65535, got 'http'"),
    ('listen = "127.0.0.1:-1"', "key 'metrics.listen': port must be a number"),
    ('listen = "::1:9657"', "key 'metrics.listen': an IPv6 address needs brackets"),
    ('listen = "metrics.example:9657"', "key 'metrics.listen': host must be an IP address or localhost, "
                                        "got 'metrics.example'"),
    ("listen = 9657", "key 'metrics.listen': expected a \"host:port\" string (or \"\" to disable), got 9657"),
    ('enabled = "yes"', "key 'metrics.enabled': expected true or false, got 'yes'"),
    ('port = 9657', "unknown key 'metrics.port'"),
])
def test_bad_metrics_settings_name_the_key(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        _settings(tmp_path, f"[metrics]\n{text}\n")
    assert str(err.value).startswith(f"{tmp_path / 'config.toml'}: {problem}")


@given(host=st.ip_addresses(), port=st.integers(0, 65535))
def test_parse_listen_round_trips(host: object, port: int) -> None:
    text = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    assert parse_listen(text) == (str(host), port)
