"""Defects a careful operator hit when trying the agent from the outside (issue 10).

Real parts only: HTTP servers on 127.0.0.1 that drip or redirect, GPT images checked with cgpt
and sgdisk, a private dbus-daemon (with our policy file and an unprivileged client), and the
installed ``update-agent`` / ``updatectl`` entry points. Each test failed before its fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import structlog
from agentrig import Rig, wait_for_log
from dbusbus import PrivateBus
from gptimg import MiB, cgpt_attr, gptprio_bits, sgdisk_verify
from httpserver import FileServer
from hypothesis import example, given, settings
from hypothesis import strategies as st

from updateagent.agent import Agent, Phase, StatusSnapshot
from updateagent.channel import fetch
from updateagent.config import ConfigError, RawConfig, validate
from updateagent.daemon import build_agent
from updateagent.dbus import MANAGER_INTERFACE, AgentClient, AgentService
from updateagent.errors import DownloadError, SignatureError
from updateagent.install import InstallTarget, install
from updateagent.signature import KeySet
from updateagent.state import AgentState, StateStore

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
UPDATECTL = str(BIN / "updatectl")
AGENT = str(BIN / "update-agent")
POLICY = ROOT / "systemd" / "com.coreos.update1.conf"


def sgdisk_attr(disk: Path, index: int) -> int:
    """The gptprio field (bits 48-63) of partition ``index`` as sgdisk reads it."""
    out = subprocess.run(["sgdisk", "-i", str(index), str(disk)], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    m = re.search(r"Attribute flags: ([0-9A-Fa-f]{16})", out)
    assert m, out
    return int(m.group(1), 16) >> 48


def assert_bits(disk: Path, index: int, bits: int) -> None:
    assert cgpt_attr(disk, index) == bits, f"cgpt: partition {index} is {cgpt_attr(disk, index):#x}"
    assert sgdisk_attr(disk, index) == bits, f"sgdisk: partition {index} is {sgdisk_attr(disk, index):#x}"


async def updated_to_b(rig: Rig) -> None:
    """The issue's setup: 2.0.0 applied to B, booted and marked good; A keeps 1.0.0 at P=1 S=1."""
    rig.publish("2.0.0")
    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT
    assert rig.boot().slot == "B"
    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled() is Phase.IDLE
    assert agent.state.current_version == "2.0.0"
    assert_bits(rig.disk.path, 3, gptprio_bits(1, 0, True))
    assert_bits(rig.disk.path, 4, gptprio_bits(2, 0, True))


# ------------------------------------------------------------------------ 1: slow servers


async def test_a_dripped_manifest_ends_at_the_deadline_as_a_transient_error(rig: Rig) -> None:
    rig.publish("2.0.0")
    rig.server.add_fault("/stable/manifest.json", "drip", value=1, interval=0.2)  # ~60 s for the whole file
    agent = build_agent(replace(rig.settings(), fetch_deadline=1.0), host=rig.host())
    await agent.start()
    assert await agent.run_until_settled() is Phase.IDLE
    started = time.monotonic()
    assert await agent.run_until_settled(check=True) is Phase.IDLE
    assert time.monotonic() - started < 15
    assert "manifest did not arrive within the fetch deadline" in agent.state.last_error
    assert agent.failures == 1  # transient: the usual backoff, not the normal interval
    # The next check can start (it used to stay in CHECKING_FOR_UPDATE for as long as the drip lasted).
    rig.server.clear_faults()
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT


def test_the_fetch_deadline_covers_the_signature_too(rig: Rig) -> None:
    rig.publish("2.0.0")
    rig.server.add_fault("/stable/manifest.json.sig", "drip", value=1, interval=0.2)
    started = time.monotonic()
    with pytest.raises(Exception, match="signature did not arrive within the fetch deadline") as info:
        fetch(rig.server.url("stable/manifest.json"), KeySet.from_paths([rig.keys.public_path]), deadline=1.0)
    assert getattr(info.value, "transient", False)
    assert time.monotonic() - started < 10


def test_a_dripped_payload_trips_the_stall_rule(rig: Rig, tmp_path: Path) -> None:
    build = rig.publish("2.0.0")
    rig.server.add_fault(rig.payload_path("2.0.0"), "drip", value=100, interval=0.2)  # 500 B/s
    rel = fetch(rig.server.url("stable/manifest.json"), KeySet.from_paths([rig.keys.public_path]))
    target = tmp_path / "slot.img"
    target.write_bytes(bytes(build.manifest.size))
    started = time.monotonic()
    with pytest.raises(DownloadError, match="stalled") as info:
        install(rel.manifest, rel.manifest_url, InstallTarget(target, 0, build.manifest.size),
                stall_bytes=4096, stall_seconds=1.0, max_retries=1, backoff=0.05)
    assert info.value.transient
    assert time.monotonic() - started < 20
    assert len(rig.server.requests_for(rig.payload_path("2.0.0"))) == 2  # tried again once, then gave up


async def test_a_dripped_payload_ends_the_agent_cycle_with_backoff(rig: Rig) -> None:
    rig.publish("2.0.0")
    rig.server.add_fault(rig.payload_path("2.0.0"), "drip", value=10, interval=0.2)
    agent = build_agent(replace(rig.settings(), stall_bytes=4096, stall_seconds=1.0), host=rig.host())
    assert isinstance(agent.source, object) and hasattr(agent.source, "http")
    agent.source.http.update(max_retries=0, backoff=0.05)  # type: ignore[union-attr]
    await agent.start()
    assert await agent.run_until_settled(check=True) is Phase.IDLE
    assert "stalled" in agent.state.last_error
    assert agent.failures == 1


def test_deadline_and_stall_settings_are_read_and_checked() -> None:
    def settings(channel: dict[str, object]) -> object:
        return validate(RawConfig({"channel": channel}, "/etc/update-agent/config.toml", {}, "<none>"), env={})

    s = settings({"deadline_seconds": 20, "stall_bytes": 1000, "stall_seconds": 30})
    assert (s.fetch_deadline, s.stall_bytes, s.stall_seconds) == (20.0, 1000, 30.0)  # type: ignore[attr-defined]
    for key, bad in (("deadline_seconds", 0), ("stall_bytes", 0), ("stall_seconds", "soon")):
        with pytest.raises(ConfigError, match=f"channel.{key}"):
            settings({key: bad})


# ------------------------------------------------------------------------ 2: file modes


@pytest.mark.parametrize(("umask", "published"), [(0o022, 0o644), (0o027, 0o640)])
def test_release_build_publishes_files_with_the_umask_mode(tmp_path: Path, umask: int, published: int) -> None:
    image = tmp_path / "usr.img"
    image.write_bytes(os.urandom(64 * 1024))

    def run(*args: str) -> None:
        r = subprocess.run([UPDATECTL, "release", *args], capture_output=True, text=True, timeout=60,
                           preexec_fn=lambda: os.umask(umask))
        assert r.returncode == 0, r.stderr

    run("keygen", "--out", str(tmp_path / "keys"))
    run("build", str(image), "--channel-dir", str(tmp_path / "www"), "--version", "2.0.0",
        "--key", str(tmp_path / "keys" / "release.key"))
    for name in ("manifest.json", "manifest.json.sig", "payload-2.0.0.img.zst"):
        assert stat.S_IMODE((tmp_path / "www" / name).stat().st_mode) == published, name
    assert stat.S_IMODE((tmp_path / "keys" / "release.key").stat().st_mode) == 0o600


def test_state_files_stay_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        StateStore(tmp_path / "state.json").save(AgentState())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o600


# ------------------------------------------------------------------------ 3: refusals leave the slot alone


async def test_a_payload_larger_than_the_slot_is_refused_while_checking(rig: Rig) -> None:
    await updated_to_b(rig)
    rig.publish("3.0.0", size=rig.slot_size + MiB)
    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled() is Phase.IDLE
    phases: list[Phase] = []
    agent.subscribe(lambda s: phases.append(s.phase))
    assert await agent.run_until_settled(check=True) is Phase.IDLE
    assert "payload larger than the slot" in agent.state.last_error
    assert Phase.UPDATE_AVAILABLE not in phases and Phase.DOWNLOADING not in phases
    assert rig.server.requests_for("/stable/payload-3.0.0.img.zst") == []
    # The rollback slot keeps its bits: no GPT write at all.
    assert_bits(rig.disk.path, 3, gptprio_bits(1, 0, True))
    assert_bits(rig.disk.path, 4, gptprio_bits(2, 0, True))
    sgdisk_verify(rig.disk.path)


@pytest.mark.parametrize("fault", ["http_404", "http_503", "content_length"])
async def test_a_refusal_before_the_first_write_leaves_the_slot_bits_alone(rig: Rig, fault: str) -> None:
    await updated_to_b(rig)
    build = rig.publish("3.0.0")
    path = rig.payload_path("3.0.0")
    if fault == "content_length":
        rig.server.add_fault(path, "content_length", value=build.manifest.compressed_size + 10)
    else:
        rig.server.add_fault(path, "status", value=int(fault.removeprefix("http_")))
    agent = rig.agent()
    agent.source.http.update(max_retries=0, backoff=0.01)  # type: ignore[union-attr]
    await agent.start()
    assert await agent.run_until_settled(check=True) is Phase.IDLE
    assert agent.state.last_error
    assert_bits(rig.disk.path, 3, gptprio_bits(1, 0, True))
    sgdisk_verify(rig.disk.path)
    # Once the server is fixed, the same slot is written and marked as usual.
    rig.server.clear_faults()
    assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT
    assert_bits(rig.disk.path, 3, gptprio_bits(2, 1, False))


# ------------------------------------------------------------------------ 4: severities


async def test_events_are_logged_at_their_severity(rig: Rig) -> None:
    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled() is Phase.IDLE
    saved = structlog.get_config()
    # Whatever level an earlier test (an in-process CLI) left configured: see every event here.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with structlog.testing.capture_logs() as logs:
            rig.server.add_fault("/stable/manifest.json", "status", value=500, times=1)
            await agent.run_until_settled(check=True)  # error
            rig.publish("0.9.0")
            await agent.run_until_settled(check=True)  # refused: a downgrade
    finally:
        structlog.configure(**saved)
    levels = {e["event"]: e["log_level"] for e in logs}
    assert levels["error"] == "error"
    assert levels["update_refused"] == "warning"
    assert levels["transition"] == "info"


# ------------------------------------------------------------------------ 5, 7, 11, 12: D-Bus and updatectl


async def _serve(rig: Rig, bus: PrivateBus) -> tuple[Agent, AgentService, asyncio.Task[None]]:
    agent = rig.agent()
    await agent.start()
    service = AgentService(agent, bus.address)
    await service.start()
    ready = asyncio.Event()
    agent.subscribe(lambda s: ready.set() if agent.settled() else None)
    task = asyncio.create_task(agent.run())
    await asyncio.wait_for(ready.wait(), 10)
    return agent, service, task


async def _stop(agent: Agent, service: AgentService, task: asyncio.Task[None]) -> None:
    agent.stop()
    await asyncio.wait_for(task, 10)
    await service.stop()


async def _run(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_updatectl_check_says_what_was_refused_and_why(rig: Rig, bus: PrivateBus) -> None:
    rig.publish("0.9.0")
    served = await _serve(rig, bus)
    try:
        rc, out, err = await _run(UPDATECTL, "check", "--bus-address", bus.address, "-o", "json")
        assert rc == 0, err
        doc = json.loads(out)
        assert doc["result"] == "refused"
        assert "downgrade refused" in doc["reason"] and "0.9.0" in doc["reason"]
        rc, out, err = await _run(UPDATECTL, "check", "--bus-address", bus.address)
        assert rc == 0, err
        assert out.splitlines()[-1].startswith("update refused: ") and "downgrade refused" in out, out
    finally:
        await _stop(*served)


async def test_global_options_work_before_and_after_the_subcommand(rig: Rig, bus: PrivateBus) -> None:
    served = await _serve(rig, bus)
    try:
        for argv in (["status", "--output", "json", "--bus-address", bus.address],
                     ["--output", "json", "--bus-address", bus.address, "status"],
                     ["-o", "json", "status", "--bus-address", bus.address]):
            rc, out, err = await _run(UPDATECTL, *argv)
            assert rc == 0, (argv, err)
            assert json.loads(out)["status"]["current_operation"] == "UPDATE_STATUS_IDLE"
        rc, out, _ = await _run(UPDATECTL, "--bus-address", bus.address, "status", "-o", "text")
        assert rc == 0 and out.startswith("State:")
    finally:
        await _stop(*served)


async def test_last_error_is_cleared_by_the_next_good_check(rig: Rig, bus: PrivateBus) -> None:
    rig.publish("1.0.0")  # what the machine runs: a good check finds nothing to do
    rig.server.add_fault("/stable/manifest.json", "status", value=503, times=1)
    served = await _serve(rig, bus)
    try:
        rc, out, _ = await _run(UPDATECTL, "check", "--bus-address", bus.address, "-o", "json")
        assert rc == 1 and "HTTP 503" in json.loads(out)["error"]
        rc, out, _ = await _run(UPDATECTL, "status", "--bus-address", bus.address)
        assert "Last error:       " in out and "HTTP 503" in out
        rc, out, err = await _run(UPDATECTL, "check", "--bus-address", bus.address, "-o", "json")
        assert rc == 0 and json.loads(out)["result"] == "no_update", err
        rc, out, _ = await _run(UPDATECTL, "status", "--bus-address", bus.address, "-o", "json")
        assert json.loads(out)["details"]["last_error"] == ""
        rc, out, _ = await _run(UPDATECTL, "history", "--bus-address", bus.address, "-o", "json")
        assert any("HTTP 503" in str(e["details"]) for e in json.loads(out))  # still in the history
    finally:
        await _stop(*served)


def test_a_malformed_bus_address_is_one_error_line() -> None:
    r = subprocess.run([UPDATECTL, "status", "--bus-address", "nonsense"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("updatectl: cannot connect to nonsense"), r.stderr


async def test_the_first_checking_signal_carries_the_check_time(rig: Rig) -> None:
    agent = rig.agent()
    await agent.start()
    assert await agent.run_until_settled() is Phase.IDLE
    seen: list[StatusSnapshot] = []
    agent.subscribe(seen.append)
    await agent.run_until_settled(check=True)
    checking = [s for s in seen if s.phase is Phase.CHECKING_FOR_UPDATE]
    assert checking and checking[0].last_checked_time > 0


@pytest.fixture
def system_like_bus() -> Iterator[PrivateBus]:
    """System-bus defaults plus our policy fragment, reachable by an unprivileged user."""
    directory = Path(tempfile.mkdtemp(prefix="bus-", dir="/tmp"))
    directory.chmod(0o755)
    try:
        with PrivateBus(directory, includes=(POLICY,), open_policy=False) as bus:
            yield bus
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to call as an unprivileged user")
async def test_reset_status_is_root_only_like_mark_good(rig: Rig, system_like_bus: PrivateBus) -> None:
    """ResetStatus reverts an applied update (clears the new slot's boot bits): only root may."""
    bus = system_like_bus
    rig.publish("2.0.0")
    served = await _serve(rig, bus)
    try:
        applied = asyncio.Event()
        served[0].subscribe(lambda s: applied.set() if s.phase is Phase.UPDATED_NEED_REBOOT else None)
        async with AgentClient(bus.address) as client:
            await client.check()
        await asyncio.wait_for(applied.wait(), 60)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        send = [*nobody, "dbus-send", f"--bus={bus.address}", "--print-reply", "--dest=com.coreos.update1",
                "/com/coreos/update1"]
        rc, out, err = await _run(*send, f"{MANAGER_INTERFACE}.ResetStatus")
        assert rc != 0 and "AccessDenied" in err, (out, err)
        assert_bits(rig.disk.path, 4, gptprio_bits(2, 1, False))  # the update still waits for its reboot
        rc, out, err = await _run(*send, f"{MANAGER_INTERFACE}.GetStatus")
        assert rc == 0 and "UPDATE_STATUS_UPDATED_NEED_REBOOT" in out, err
        rc, out, err = await _run(*send, f"{MANAGER_INTERFACE}.AttemptUpdate")
        assert rc == 0, err
        async with AgentClient(bus.address) as client:  # root may
            await client.reset_status()
        assert_bits(rig.disk.path, 4, gptprio_bits(0, 0, False))
    finally:
        await _stop(*served)


# ------------------------------------------------------------------------ 8: the bus goes away


def _wait_for_log_after(proc: subprocess.Popen[bytes], path: Path, offset: int, event: str) -> None:
    """wait_for_log, counting only the lines written after byte ``offset`` of the log."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with path.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
        for line in lines:
            with contextlib.suppress(ValueError):
                if json.loads(line).get("event") == event:
                    return
        if proc.poll() is not None:
            break
        time.sleep(0.05)  # no inotify here: a short wait for more output
    tail = path.read_bytes()[offset:].decode(errors="replace")
    raise AssertionError(f"no {event} in the agent's log after byte {offset}:\n{tail}")


def test_the_agent_serves_again_after_the_bus_restarts(rig: Rig, tmp_path: Path) -> None:
    directory = tmp_path / "bus"
    bus = PrivateBus(directory).start()
    address = f"unix:path={directory / 'bus.sock'}"  # without the guid: the restarted bus has another
    log = tmp_path / "agent.log"
    config = rig.write_config(extra="[metrics]\nenabled = false\n")
    with log.open("w") as out:
        proc = subprocess.Popen([AGENT, "--config", str(config), "--update-conf", "/nonexistent", "--bus-address",
                                 address], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_log(proc, log, "dbus_ready")
        bus.stop()
        lost = wait_for_log(proc, log, "dbus_connection_lost")
        assert lost["level"] == "error"
        bus = PrivateBus(directory).start()
        wait_for_log(proc, log, "dbus_reconnected")
        r = subprocess.run([UPDATECTL, "status", "--bus-address", address, "-o", "json"], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["details"]["booted_slot"] == "A"
        # Only what follows the second outage counts: a slow restart above may already have logged
        # a failed attempt, and waiting for that one would send SIGTERM before this loss is seen.
        second = log.stat().st_size
        bus.stop()
        _wait_for_log_after(proc, log, second, "dbus_connection_lost")
        _wait_for_log_after(proc, log, second, "dbus_reconnect_failed")
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        bus.stop()
    text = log.read_text()
    assert "Future exception was never retrieved" not in text and "Traceback" not in text, text[-3000:]


async def test_signals_sent_as_the_bus_dies_leave_no_unretrieved_errors(rig: Rig, tmp_path: Path) -> None:
    """Status changes while the bus goes away: no exception reaches the agent and asyncio reports
    no "Future exception was never retrieved" (what the daemon printed on SIGTERM)."""
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(str(context.get("message"))))
    bus = PrivateBus(tmp_path / "bus").start()
    agent = rig.agent()
    await agent.start()
    service = AgentService(agent, bus.address)
    try:
        await service.start()
        assert bus.proc is not None
        bus.proc.kill()
        bus.proc.wait()
        with structlog.testing.capture_logs() as logs:
            for n in range(100):  # signals queued and sent while the connection breaks
                service._on_status(replace(agent.status(), last_checked_time=n + 1))
                await asyncio.sleep(0)
        assert not [e for e in logs if e["event"].endswith("listener_failed")]
    finally:
        await service.stop()
        bus.stop()
        gc.collect()
        await asyncio.sleep(0)
        loop.set_exception_handler(previous)
    assert reported == []


# ------------------------------------------------------------------------ 9: redirects


async def test_a_redirected_channel_is_read_from_where_it_was_redirected_to(rig: Rig, tmp_path: Path) -> None:
    """A channel behind a redirect to a CDN: signature and payload come from the CDN."""
    rig.publish("2.0.0")
    (tmp_path / "origin").mkdir()
    with FileServer(tmp_path / "origin") as origin:
        origin.add_fault("/stable/manifest.json", "redirect", location=rig.server.url("stable/manifest.json"))
        settings = replace(rig.settings(), server=origin.base_url)
        agent = build_agent(settings, host=rig.host())
        await agent.start()
        assert await agent.run_until_settled(check=True) is Phase.UPDATED_NEED_REBOOT, agent.state.last_error
        assert [r.path for r in origin.requests] == ["/stable/manifest.json"]
    assert len(rig.server.requests_for("/stable/manifest.json.sig")) == 1
    assert len(rig.server.requests_for(rig.payload_path("2.0.0"))) == 1


def test_the_redirect_limit_still_holds(rig: Rig) -> None:
    rig.publish("2.0.0")
    rig.server.add_fault("/stable/manifest.json", "redirect_loop")
    with pytest.raises(Exception, match="redirect loop"):
        fetch(rig.server.url("stable/manifest.json"), KeySet.from_paths([rig.keys.public_path]))
    assert len(rig.server.requests_for("/stable/manifest.json")) <= 6


# ------------------------------------------------------------------------ 10: one name for the switch


def test_the_unsigned_refusal_names_the_config_key(rig: Rig) -> None:
    rig.publish("2.0.0")
    (rig.channel_root / "stable" / "manifest.json.sig").unlink()
    with pytest.raises(SignatureError, match=r"channel\.insecure = true"):
        fetch(rig.server.url("stable/manifest.json"), KeySet.from_paths([rig.keys.public_path]))
    for doc in ("channel.md", "agent.md", "dbus.md", "install.md"):
        assert "insecure_allow_unsigned" not in (ROOT / "docs" / doc).read_text(), doc


# ------------------------------------------------------------------------ gzip members across any chunking


class _Chunks:
    """A payload source that hands out the bytes in the given chunk sizes (the network decides them)."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self._data, self._sizes, self._pos, self._i = data, sizes, 0, 0

    def read(self, n: int = -1, /) -> bytes:
        step = self._sizes[self._i % len(self._sizes)]
        self._i += 1
        out = self._data[self._pos:self._pos + min(n, step)]
        self._pos += len(out)
        return out


# 4 KiB blocks that compress well: one network chunk can hold a member that decompresses to more
# than the reader's output limit, which is where members used to get mixed up.
_POOL = [bytes([i]) * 4032 + os.urandom(64) for i in range(8)]


@settings(max_examples=60, deadline=None)
@example(members=[(0, 100), (1, 10)], sizes=[300_000])  # 400 KiB then more, in one read: the old failure
@given(members=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 160)), min_size=2, max_size=4),
       sizes=st.lists(st.integers(1, 300_000), min_size=1, max_size=8))
def test_multi_member_gzip_decompresses_whatever_the_chunking(members: list[tuple[int, int]],
                                                              sizes: list[int]) -> None:
    """The installer reads the payload as the connection delivers it (read1): a member that ended
    in a call cut short by the output limit used to have its successor's first bytes fed twice."""
    from updateagent import install as installer

    parts = [_POOL[block] * count for block, count in members]
    payload = b"".join(gzip.compress(p, compresslevel=1) for p in parts)
    reader = installer._GzipReader(_Chunks(payload, sizes))
    out = bytearray()
    while chunk := reader.read(installer.CHUNK_SIZE):
        out += chunk
    assert bytes(out) == b"".join(parts)


class _BusThatDiesOnRequestName:
    """A D-Bus peer on a unix socket that authenticates a client and answers its Hello, then
    drops the connection when the next message (RequestName) arrives: a bus that goes away while
    the service is attaching. ``connections`` counts clients that got that far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connections = 0
        self.again = asyncio.Event()  # set at the second connection: the service tried again
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from dbus_fast import Message, MessageType
        from dbus_fast.aio.message_bus import HELLO_1_SERIALIZED

        try:
            async with asyncio.timeout(30):
                await reader.readexactly(1)  # the credentials byte
                await reader.readuntil(b"\r\n")  # AUTH EXTERNAL <uid>
                writer.write(b"OK " + b"0" * 32 + b"\r\n")
                assert (await reader.readuntil(b"\r\n")) == b"BEGIN\r\n"
                assert (await reader.readexactly(len(HELLO_1_SERIALIZED))) == HELLO_1_SERIALIZED
                reply = Message(message_type=MessageType.METHOD_RETURN, reply_serial=1, signature="s",
                                body=[f":1.{self.connections + 1}"])
                writer.write(reply._marshall(False))
                await writer.drain()
                await reader.read(1)  # RequestName: the bus dies before answering
                self.connections += 1
                if self.connections >= 2:
                    self.again.set()
        finally:
            writer.transport.abort()


async def test_a_bus_dying_while_the_service_attaches_is_retried(rig: Rig, tmp_path: Path) -> None:
    """The bus goes away between Hello and the RequestName reply. start() reports it as a
    DBusServiceError; after a loss, the watcher logs a failed attempt and tries again (it used to
    die with the raw EOFError/ConnectionResetError: no more reconnects, the connection left open)."""
    from updateagent.dbus import DBusServiceError

    loop = asyncio.get_running_loop()
    reported: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(str(context.get("message"))))
    sock = tmp_path / "bus" / "bus.sock"
    sock.parent.mkdir()
    dying = _BusThatDiesOnRequestName(sock)
    agent = rig.agent()
    await agent.start()
    try:
        await dying.start()
        with pytest.raises(DBusServiceError, match=r"cannot own com\.coreos\.update1"):
            await AgentService(agent, f"unix:path={sock}").start()
        await dying.close()
        sock.unlink()

        bus = PrivateBus(sock.parent).start()
        service = AgentService(agent, f"unix:path={sock}")
        service.RECONNECT_INITIAL = 0.01
        try:
            await service.start()
            bus.stop()  # the service reconnects, and meets the dying bus on the same socket
            dying = _BusThatDiesOnRequestName(sock)
            with structlog.testing.capture_logs() as logs:
                await dying.start()
                async with asyncio.timeout(30):
                    await dying.again.wait()
            assert any(e["event"] == "dbus_reconnect_failed" and "cannot own" in e["error"] for e in logs), logs
        finally:
            await service.stop()
            await dying.close()
            bus.stop()
    finally:
        gc.collect()
        await asyncio.sleep(0)
        loop.set_exception_handler(previous)
    assert reported == []
