"""Where the update check runs (updateagent.checker): in a child process, the daemon's way, or in
a thread, the simulator's. Both run the same fetch against a real HTTP server on 127.0.0.1 and
must give the agent the same release, or the same error (type, message, transient flag); the
child is bounded by its deadline, and a child that dies, garbles its answer or is cancelled is
a clear ChannelError, killed and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentrig import Rig
from structlog.testing import capture_logs

from updateagent import checker
from updateagent.channel import ChannelRelease
from updateagent.errors import ChannelError, SignatureError
from updateagent.signature import KeySet

RUNNERS = {"child": checker.in_child_process, "thread": checker.in_thread}


def _request(rig: Rig, url: str | None = None, deadline: float = 30.0) -> checker.CheckRequest:
    return checker.CheckRequest(url or rig.server.url(f"{rig.group}/manifest.json"),
                                KeySet.from_paths([rig.keys.public_path]), deadline=deadline)


async def _outcome(runner: checker.CheckRunner, request: checker.CheckRequest) -> ChannelRelease | tuple:
    try:
        return await runner(request)
    except ChannelError as exc:  # timings in a message (a read timeout's seconds) vary from run to run
        return type(exc), re.sub(r"[0-9]+\.[0-9]+", "<n>", str(exc)), exc.transient


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """A TCP server on 127.0.0.1 that accepts connections (the kernel's backlog) and never answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=8) as srv:
        yield srv


async def test_both_runners_give_the_same_verified_release(rig: Rig) -> None:
    rig.publish("2.0.0", size=64 * 1024)
    with capture_logs() as logs:
        child = await checker.in_child_process(_request(rig))
    thread = await checker.in_thread(_request(rig))
    assert child == thread and child.data == thread.data
    assert str(child.manifest.version) == "2.0.0" and child.key_id is not None
    # The child's own log lines are logged again by this process.
    assert any(e["event"] == "manifest_fetched" and e["version"] == "2.0.0" for e in logs)


@pytest.mark.parametrize("fault", ["bad signature", "HTTP 503", "HTML page", "never answers"])
async def test_both_runners_raise_the_same_error(rig: Rig, silent_server: socket.socket, fault: str) -> None:
    rig.publish("2.0.0", size=64 * 1024)
    manifest = f"/{rig.group}/manifest.json"
    url, deadline = None, 30.0
    if fault == "bad signature":
        # The manifest altered after signing.
        path = rig.channel_root / rig.group / "manifest.json"
        path.write_bytes(path.read_bytes().replace(b"2.0.0", b"2.0.1"))
    elif fault == "HTTP 503":
        rig.server.add_fault(manifest, "status", value=503)
    elif fault == "HTML page":
        rig.server.add_fault(manifest, "html")
    else:
        host, port = silent_server.getsockname()
        url, deadline = f"http://{host}:{port}/stable/manifest.json", 1.0
    outcomes = {name: await _outcome(runner, _request(rig, url, deadline)) for name, runner in RUNNERS.items()}
    assert isinstance(outcomes["child"], tuple), outcomes
    assert outcomes["child"] == outcomes["thread"]
    kind, message, transient = outcomes["child"]
    expected = {"bad signature": (SignatureError, "no signature matches a trusted key", False),
                "HTTP 503": (ChannelError, "HTTP 503 fetching the manifest", True),
                "HTML page": (ChannelError, "HTML page", False),
                "never answers": (ChannelError, "timed out", True)}[fault]
    assert (kind, transient) == (expected[0], expected[2]) and expected[1] in message, message


def _standin(code: str, **kwargs: float) -> checker.InChildProcess:
    """The child runner with a stand-in for ``python -m updateagent.checker``."""
    return checker.InChildProcess(command=[sys.executable, "-c", code], **kwargs)


@pytest.mark.parametrize("code, problem", [
    ("import sys; sys.stderr.write('Traceback (most recent call last):\\nRuntimeError: boom\\n'); sys.exit(3)",
     "the check process exited with status 3 without an answer: RuntimeError: boom"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
     "the check process was killed by signal 9 (SIGKILL) without an answer"),
    ("print('hello')", "the check process exited with status 0 with a garbled answer (6 bytes, starting 'hello\\n')"),
    ("print('{\"release\": {\"url\": 1}}')", "with a garbled answer"),
    ("import sys, time; sys.stdout.write('x' * 10_000_000); time.sleep(600)",
     "the check process wrote more than 262144 bytes on stdout; killed it"),
    ("", "the check process exited with status 0 without an answer"),
])
async def test_a_child_that_dies_or_garbles_its_answer_is_a_channel_error(rig: Rig, code: str, problem: str) -> None:
    with pytest.raises(ChannelError) as caught:
        await _standin(code)(_request(rig))
    assert type(caught.value) is ChannelError and problem in str(caught.value), str(caught.value)
    assert str(caught.value).startswith(rig.server.url(f"{rig.group}/manifest.json"))


async def test_a_check_process_that_cannot_start_is_a_channel_error(rig: Rig, tmp_path: Path) -> None:
    with pytest.raises(ChannelError, match=r"cannot start the check process .*/no-such-python"):
        await checker.InChildProcess(command=[str(tmp_path / "no-such-python")])(_request(rig))


def _children(marker: str) -> list[int]:
    """This process's children whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == os.getpid() and marker in (entry / "cmdline").read_text():
                    found.append(int(entry.name))
    return found


async def test_a_child_stuck_past_its_deadline_is_killed(rig: Rig, tmp_path: Path) -> None:
    """As a check stuck in C code (DNS, a TLS handshake) would be: only killing it ends it."""
    started = tmp_path / "started"
    code = f"import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
           f"pathlib.Path({str(started)!r}).touch(); time.sleep(600)"
    with pytest.raises(ChannelError) as caught:
        await _standin(code, grace=2.0)(_request(rig, deadline=0.5))
    assert "the check process did not finish within 2.5 s (fetch deadline 0.5 s + 2 s); killed it" in str(
        caught.value)
    assert caught.value.transient
    assert started.exists() and not _children("signal.SIG_IGN")  # killed and reaped: no zombie


async def test_cancelling_the_check_kills_the_child(rig: Rig, silent_server: socket.socket) -> None:
    host, port = silent_server.getsockname()
    request = _request(rig, f"http://{host}:{port}/stable/manifest.json", deadline=60)
    task = asyncio.ensure_future(checker.in_child_process(request))
    silent_server.settimeout(30)  # the accepting thread ends even when no check connects
    connection, _ = await asyncio.to_thread(silent_server.accept)
    with connection:
        (pid,) = _children("updateagent.checker")  # the real check process, waiting for an answer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pid not in _children("updateagent.checker")  # killed and reaped: no zombie
