"""Regression tests for defects found in review of the update agent: each failed before its fix."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from agentrig import ManualClock, Rig
from dbusbus import PrivateBus
from gptimg import cgpt_attr, gptprio_bits

from updateagent.agent import ImmediateRebootStrategy, Phase
from updateagent.channel import parse_manifest
from updateagent.config import ConfigError, HealthCheckSpec, RawConfig, validate
from updateagent.daemon import build_agent
from updateagent.errors import ChannelError
from updateagent.health import HealthChecker
from updateagent.host import SystemHost
from updateagent.schedule import Schedule
from updateagent.state import StateError, StateStore

UPDATECTL = str(Path(sys.executable).parent / "updatectl")
INTERVAL = 45 * 60


# ------------------------------------------------------------------------------- scheduling


async def test_reset_after_an_agent_restart_schedules_the_next_check(rig: Rig) -> None:
    """An agent restarted while an update waits for its reboot, then ResetStatus: the periodic
    checks must resume (they used to stop for good: IDLE with no next check)."""
    clock = ManualClock()
    rig.publish("2.0.0")
    agent = build_agent(rig.settings(), host=rig.host(), clock=clock)
    await agent.start()
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT

    again = build_agent(rig.settings(), host=rig.host(), clock=clock)  # same boot
    await again.start()
    assert await again.run_until_settled() is Phase.UPDATED_NEED_REBOOT
    await again.reset_status()
    assert again.phase is Phase.IDLE
    assert again.next_check is not None
    clock.advance(INTERVAL * 1.2)
    assert not again.settled()  # the check is due and will run
    assert await again.run_until_settled() is Phase.UPDATED_NEED_REBOOT


def test_backoff_after_very_many_transient_failures_stays_capped() -> None:
    """A channel down for months: 2 ** failures used to overflow a float and kill the daemon."""
    s = Schedule(retry_initial=300.0, jitter=0.1, max_backoff=4 * 3600.0)  # floats, as from the config
    for failures in (1024, 1025, 5000, 10**6):
        assert 4 * 3600 * 0.9 - 1e-6 <= s.retry_after(failures) <= 4 * 3600


# ------------------------------------------------------------------------------- reboot hook


async def test_a_failing_reboot_keeps_the_update_waiting_for_its_reboot(rig: Rig, bus: PrivateBus) -> None:
    """REBOOT_STRATEGY=reboot and logind refuses (here: absent from the bus). The applied update
    must keep being reported as UPDATED_NEED_REBOOT (not be turned into an error that sends the
    agent back to IDLE, where the next check overwrites the pending slot)."""
    host = SystemHost(bus_address=bus.address)
    agent = build_agent(rig.settings(), host=rig.host(), reboot_strategy=ImmediateRebootStrategy(host))
    rig.publish("2.0.0")
    await agent.start()
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT
    assert agent.status().new_version == "2.0.0"
    assert agent.state.pending is not None and agent.state.pending.version == "2.0.0"
    assert "Reboot" in agent.state.last_error
    assert cgpt_attr(rig.disk, 4) == gptprio_bits(2, 1, False)
    # The next request does not re-download over the pending slot.
    assert not agent.request_check()
    assert await agent.run_until_settled() is Phase.UPDATED_NEED_REBOOT
    assert len(rig.server.requests_for(rig.payload_path("2.0.0"))) == 1


# ------------------------------------------------------------------------------- bad input


def test_state_file_with_an_out_of_range_number_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"format_version": 1, "last_checked_time": 1e999}')
    with pytest.raises(StateError, match="malformed state"):
        StateStore(path).load()
    state = StateStore(path).load_or_reset(1.0)  # used to raise OverflowError: the daemon died
    assert state.history[0].event == "state_reset"
    assert not path.exists()


def test_state_file_with_a_non_string_deny_entry_is_refused(tmp_path: Path) -> None:
    """A deny entry that is not a version string would make every later check refuse."""
    path = tmp_path / "state.json"
    path.write_text('{"format_version": 1, "deny_list": [{"version": 2, "reason": "x", "time": 0}]}')
    with pytest.raises(StateError, match="deny_list"):
        StateStore(path).load()


def _settings(toml: dict[str, object]) -> None:
    validate(RawConfig(toml, "/etc/update-agent/config.toml", {}, "<none>"), env={})


def test_health_command_with_unbalanced_quotes_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"health\.check\[0\]\.command"):
        _settings({"health": {"check": [{"command": "echo 'oops"}]}})


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("check", "interval_minutes", 1e10), ("check", "retry_initial_seconds", 1e15),
     ("check", "max_backoff_hours", 1e13)],
)
def test_absurd_schedule_numbers_are_config_errors(section: str, key: str, value: float) -> None:
    """They used to pass validation, then crash the running daemon (datetime overflow)."""
    with pytest.raises(ConfigError, match=f"{section}.{key}"):
        _settings({section: {key: value}})


async def test_daemon_survives_the_largest_accepted_interval(rig: Rig) -> None:
    s = rig.settings(interval_minutes=366 * 24 * 60, retry_initial_seconds=366 * 86400,
                     max_backoff_hours=366 * 24)
    agent = build_agent(s, host=rig.host())
    await agent.start()
    assert await agent.run_until_settled() is Phase.IDLE
    agent.source = None  # the check fails: rescheduling after an error must not overflow either
    assert await agent.run_until_settled(check=True) is Phase.IDLE


_MANIFEST = {
    "format_version": 1, "version": "2.0.0", "payload": "payload.img", "size": 4, "compressed_size": 4,
    "sha256": "a" * 64, "compression": "none", "released": "2026-11-27T03:00:00Z",
}


@pytest.mark.parametrize(("field", "value"), [("version", "2.0.0\n"), ("sha256", "a" * 64 + "\n"),
                                              ("min_version", "1.0\n")])
def test_manifest_fields_with_a_trailing_newline_are_refused(field: str, value: str) -> None:
    parse_manifest(json.dumps(_MANIFEST).encode())  # the base document is fine
    with pytest.raises(ChannelError, match=f"field '{field}'"):
        parse_manifest(json.dumps({**_MANIFEST, field: value}).encode())


def test_updatectl_history_limit_out_of_range_is_a_usage_error(bus: PrivateBus) -> None:
    r = subprocess.run([UPDATECTL, "history", "--limit", str(2**32), "--bus-address", bus.address],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------------- leaks


async def test_cancelled_health_check_kills_its_process(tmp_path: Path) -> None:
    """MarkGood (or the daemon stopping) cancels running checks; their processes must not outlive it."""
    pipe = tmp_path / "pid"
    os.mkfifo(pipe)  # the check hands over its pid through a FIFO: the read returns when it has started
    spec = HealthCheckSpec("command", ("sh", "-c", f"echo $$ > {pipe}; exec sleep 60"), 120.0)
    task = asyncio.ensure_future(HealthChecker([spec], deadline=0).run())
    pid = int(await asyncio.wait_for(asyncio.to_thread(pipe.read_text), 10))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped, not left running (nor a zombie)



# ------------------------------------------------------------------------------- daemon


def test_daemon_stops_cleanly_while_a_check_hangs(rig: Rig, tmp_path: Path) -> None:
    """SIGTERM while the manifest fetch waits on a server that never answers: the agent cannot
    finish its tick within the daemon's 10 s grace, which used to end in exit status 1."""
    import socket

    from agentrig import wait_for_log

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the backlog; nothing ever answers
    try:
        config = rig.write_config(on_start=True, extra="[metrics]\nenabled = false\n")
        text = config.read_text().replace(rig.server.base_url, f"http://127.0.0.1:{silent.getsockname()[1]}")
        config.write_text(text)
        log = tmp_path / "agent.log"
        with log.open("w") as out:
            proc = subprocess.Popen([str(Path(sys.executable).parent / "update-agent"), "--no-dbus", "--config",
                                     str(config), "--update-conf", "/nonexistent"],
                                    stdout=out, stderr=subprocess.STDOUT)
            try:
                wait_for_log(proc, log, "transition", to="UPDATE_STATUS_CHECKING_FOR_UPDATE")
                proc.terminate()
                assert proc.wait(timeout=20) == 0, log.read_text()[-2000:]
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    finally:
        silent.close()


# ------------------------------------------------------------------------------- release CLI


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_release_build_with_a_bad_level_is_one_error_line(tmp_path: Path, compression: str) -> None:
    image = tmp_path / "image.img"
    image.write_bytes(os.urandom(4096))
    assert subprocess.run([UPDATECTL, "release", "keygen", "--out", str(tmp_path / "k")],
                          capture_output=True, timeout=30).returncode == 0
    channel = tmp_path / "channel"
    r = subprocess.run([UPDATECTL, "release", "build", str(image), "--channel-dir", str(channel), "--version",
                        "1.0.0", "--key", str(tmp_path / "k" / "release.key"), "--compression", compression,
                        "--level", "99"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: compression level 99"), r.stderr
    assert not channel.exists() or list(channel.iterdir()) == []  # no temp payload left behind
