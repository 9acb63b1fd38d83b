"""Where the agent's update check runs: in a short-lived child process (the daemon's default), or
in a thread (the simulator's hundreds of agents in one process).

The check's network part, :func:`fetch` (the manifest and its signature over HTTP(S), verified,
parsed), is the same function in both. The caller parses the verified manifest bytes again with
``channel.parse_manifest`` and judges the release (``channel.check``) itself.

In a child process, as apt runs its http/https methods (``python -m updateagent.checker``):

- the daemon's memory stays at its floor: requests, urllib3 and cryptography (about 12 MB
  resident) are loaded by the child only, which exits after the check;
- a check stuck in C code (DNS resolution has no timeout in requests; a TLS handshake) is really
  bounded: the child's process group is killed at the fetch deadline plus :data:`GRACE`, which
  a thread cannot be.

The request goes to the child as one JSON document on stdin, the answer comes back as one JSON
document on stdout (at most :data:`MAX_ANSWER_BYTES`): the verified manifest bytes, the URL that
answered and the signing key's id, or the error, typed (``ChannelError``, ``SignatureError``...)
with its message and ``transient`` flag, so the agent sees what a check in a thread raises. The
child logs JSON lines on stderr; each is logged again through the daemon's own logger (its level,
its format). A child that dies, or answers with anything else, is a ChannelError naming that.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from locksmith.log import configure, get_logger
from updateagent import channel, errors
from updateagent.signature import KeySet

log = get_logger("updateagent.checker")

_T = TypeVar("_T")

# Past the fetch deadline, before the child is killed: its interpreter's start-up and imports
# (about 0.3 s idle, seconds on a loaded host) and the answer.
GRACE = 15.0
MAX_ANSWER_BYTES = 256 * 1024  # a manifest is at most 64 KiB, base64 in JSON
MAX_REQUEST_BYTES = 64 * 1024
MAX_LOG_LINE = 64 * 1024
# -P: never modules from the working directory (the daemon runs as root).
COMMAND = (sys.executable, "-P", "-m", "updateagent.checker")

# The errors a check raises on purpose, by the name the child reports.
_ERRORS: dict[str, type[errors.UpdateAgentError]] = {
    cls.__name__: cls for cls in (errors.ChannelError, errors.SignatureError, errors.PayloadError,
                                  errors.DownloadError, errors.PolicyRefused, channel.NoUpdate)
}


@dataclass(frozen=True)
class CheckRequest:
    """What a check fetches: a manifest URL, the trusted keys (None when ``insecure``), and the
    deadline for the manifest and its signature together, in seconds."""

    url: str
    keys: KeySet | None
    insecure: bool = False
    deadline: float = channel.DEFAULT_FETCH_DEADLINE

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "insecure": self.insecure, "deadline": self.deadline,
                "keys": None if self.keys is None else [base64.b64encode(k).decode() for k in self.keys.raw()]}

    @classmethod
    def from_json(cls, doc: Any) -> CheckRequest:
        """Raises ValueError (with what is wrong) for anything but :meth:`to_json`'s shape."""
        if not isinstance(doc, dict):
            raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
        url, insecure, deadline, keys = doc.get("url"), doc.get("insecure"), doc.get("deadline"), doc.get("keys")
        if not isinstance(url, str) or not isinstance(insecure, bool):
            raise ValueError("'url' must be a string and 'insecure' a boolean")
        if isinstance(deadline, bool) or not isinstance(deadline, int | float) or deadline <= 0:
            raise ValueError(f"'deadline' must be a positive number, got {deadline!r}")
        if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise ValueError("'keys' must be null or a list of base64 strings")
        try:
            key_set = None if keys is None else KeySet.from_raw(base64.b64decode(k, validate=True) for k in keys)
        except (binascii.Error, errors.SignatureError) as exc:
            raise ValueError(f"'keys': {exc}") from None
        return cls(url, key_set, insecure, float(deadline))


def fetch(request: CheckRequest) -> channel.ChannelRelease:
    """The check's network part, wherever it runs: ``channel.fetch`` of the request."""
    return channel.fetch(request.url, request.keys, insecure=request.insecure, deadline=request.deadline)


class CheckRunner(Protocol):
    """Runs :func:`fetch` somewhere and returns its release, or raises its error."""

    async def __call__(self, request: CheckRequest) -> channel.ChannelRelease: ...


# --------------------------------------------------------------------------- in a thread


async def in_thread(request: CheckRequest) -> channel.ChannelRelease:
    """:func:`fetch` in a daemon thread of this process (the simulator's runner)."""
    return await in_daemon_thread(lambda: fetch(request))


async def in_daemon_thread(fn: Callable[[], _T]) -> _T:
    """``fn()`` in a daemon thread of its own. Unlike ``asyncio.to_thread``, a cancelled call
    (the daemon stopping) is abandoned: a manifest fetch stuck on a server that never answers
    would otherwise hold up the process's exit until its read timeout, since the default
    executor's threads are joined when the event loop closes."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def deliver(result: _T | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result = fn()
        except BaseException as exc:
            outcome: tuple[_T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(deliver, *outcome)

    threading.Thread(target=work, name="channel-fetch", daemon=True).start()
    return await future


# --------------------------------------------------------------------------- in a child process


class InChildProcess:
    """:func:`fetch` in a child process (``command``, by default ``python -P -m updateagent.checker``),
    killed with its process group after the request's deadline plus ``grace`` seconds, or when
    the check is cancelled."""

    def __init__(self, *, grace: float = GRACE, command: Sequence[str] = COMMAND,
                 max_answer: int = MAX_ANSWER_BYTES) -> None:
        self.grace = grace
        self.command = tuple(command)
        self.max_answer = max_answer

    async def __call__(self, request: CheckRequest) -> channel.ChannelRelease:
        where = request.url
        limit = request.deadline + self.grace
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True, limit=MAX_LOG_LINE)
        except OSError as exc:
            raise errors.ChannelError(f"{where}: cannot start the check process {self.command[0]}: {exc}") from None
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        log.debug("check_process_started", pid=proc.pid, url=where)
        stderr_tail: collections.deque[str] = collections.deque(maxlen=1)
        relay = asyncio.ensure_future(_relay_log(proc.stderr, stderr_tail))
        try:
            try:
                async with asyncio.timeout(limit):
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it died: said below
                        proc.stdin.write(json.dumps(request.to_json()).encode())
                        await proc.stdin.drain()
                    proc.stdin.close()
                    answer = await _read_capped(proc.stdout, self.max_answer)
                    if answer is None:  # killed below: it may be blocked writing the rest
                        raise errors.ChannelError(f"{where}: the check process wrote more than "
                                                  f"{self.max_answer} bytes on stdout; killed it")
                    await relay
                    status = await proc.wait()
            except TimeoutError:
                raise errors.ChannelError(
                    f"{where}: the check process did not finish within {limit:g} s (fetch deadline "
                    f"{request.deadline:g} s + {self.grace:g} s); killed it", transient=True) from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                # Done at once (SIGKILL); shielded: a second cancel leaves the wait, and so the
                # reaping, running.
                await asyncio.shield(proc.wait())
            relay.cancel()
        return _release(where, answer, status, stderr_tail[0] if stderr_tail else "")


in_child_process = InChildProcess()


async def _read_capped(stream: asyncio.StreamReader, cap: int) -> bytes | None:
    """All of ``stream``, or None once it has more than ``cap`` bytes."""
    data = bytearray()
    while chunk := await stream.read(64 * 1024):
        data += chunk
        if len(data) > cap:
            return None
    return bytes(data)


async def _relay_log(stream: asyncio.StreamReader, tail: collections.deque[str]) -> None:
    """Log the child's JSON log lines again through this process's logger; any other line (a
    traceback, a warning of the interpreter) as ``check_process_output``. ``tail`` keeps the
    last other line, for the error when the child fails."""
    while True:
        try:
            raw = await stream.readline()
        except ValueError:  # a line longer than MAX_LOG_LINE: what fits of it
            raw = await stream.read(MAX_LOG_LINE)
        if not raw:
            return
        text = raw.decode("utf-8", "replace").rstrip("\n")
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
        except ValueError:
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("event"), str):
            level = logging.getLevelName(str(entry.pop("level", "info")).upper())
            event = entry.pop("event")
            entry.pop("timestamp", None)
            log.log(level if isinstance(level, int) else logging.WARNING, event, **entry)
        else:
            tail.append(text[:500])
            log.warning("check_process_output", line=text[:MAX_LOG_LINE])


def _exit_text(status: int) -> str:
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by signal {-status} ({signal.Signals(-status).name})"
        return f"was killed by signal {-status}"
    return f"exited with status {status}"


def _release(where: str, answer: bytes, status: int, last_line: str) -> channel.ChannelRelease:
    """The child's answer as the release it verified, or the error it reported, raised."""
    if not answer.strip():
        why = f": {last_line}" if last_line else ""
        raise errors.ChannelError(f"{where}: the check process {_exit_text(status)} without an answer{why}")
    try:
        doc = json.loads(answer)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        err = doc["error"]
        kind, message = err.get("kind"), err.get("message")
        if isinstance(kind, str) and isinstance(message, str):
            cls = _ERRORS.get(kind)
            if cls is None:  # a bug in the check; the child logged its traceback
                raise errors.ChannelError(f"{where}: the check failed: {kind}: {message}")
            raise cls(message, transient=err.get("transient") is True)
    if isinstance(doc, dict) and isinstance(doc.get("release"), dict):
        rel = doc["release"]
        url, key_id, data = rel.get("url"), rel.get("key_id"), rel.get("manifest")
        if isinstance(url, str) and isinstance(data, str) and (key_id is None or isinstance(key_id, str)):
            try:
                manifest = base64.b64decode(data, validate=True)
            except binascii.Error:
                pass
            else:
                return channel.ChannelRelease(channel.parse_manifest(manifest, url), url, key_id, manifest)
    shown = answer[:80].decode("utf-8", "replace")
    raise errors.ChannelError(f"{where}: the check process {_exit_text(status)} with a garbled answer "
                              f"({len(answer)} bytes, starting {shown!r})")


# --------------------------------------------------------------------------- the child


def _answer(release: channel.ChannelRelease) -> dict[str, Any]:
    return {"release": {"url": release.manifest_url, "key_id": release.key_id,
                        "manifest": base64.b64encode(release.data).decode()}}


def main() -> int:
    """``python -m updateagent.checker``: one check, request on stdin, answer on stdout."""
    # Every level: the daemon filters the relayed lines with its own.
    configure("DEBUG", json=True, stream=sys.stderr)
    try:
        raw = sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1)
        if len(raw) > MAX_REQUEST_BYTES:
            raise ValueError(f"larger than {MAX_REQUEST_BYTES} bytes")
        request = CheckRequest.from_json(json.loads(raw))
    except (ValueError, RecursionError) as exc:
        answer: dict[str, Any] = {"error": {"kind": "ChannelError", "message": f"check process: bad request: {exc}",
                                            "transient": False}}
    else:
        try:
            release = fetch(request)
        except errors.UpdateAgentError as exc:
            answer = {"error": {"kind": type(exc).__name__, "message": str(exc), "transient": exc.transient}}
        except Exception as exc:  # a bug: the daemon names it; the traceback is in the log
            log.exception("check_failed", error=str(exc))
            answer = {"error": {"kind": type(exc).__name__, "message": str(exc), "transient": False}}
        else:
            answer = _answer(release)
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
