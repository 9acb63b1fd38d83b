"""The simulated fleet's update channel: a real release, published with ``updatectl release``
into a directory that a real HTTP server on 127.0.0.1 serves, plus each host's health endpoint.

The health endpoint (``/health/<host>``) is what every simulated host's ``[[health.check]]``
fetches after its boot. It answers from what the host really booted: a host running the bad
release (or a flaky host on the new release) gets HTTP 500, so the agent's own health check fails,
it rolls back, and the coordinator reports the failure against the group's budget.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from locksmith.files import InputFileError, read_bytes

CHANNEL_GROUP = "stable"
OLD_VERSION = "1.0.0"
NEW_VERSION = "2.0.0"
PAYLOAD_BYTES = 64 * 1024  # small on purpose: the run is about coordination, not disk speed
_MAX_SERVED = 16 * 1024 * 1024

HealthVerdict = Callable[[str], bool]


class ChannelError(RuntimeError):
    """Publishing the release failed."""


def _updatectl() -> list[str]:
    """``updatectl`` as installed next to this interpreter, else the same CLI through ``-c``."""
    script = Path(sys.executable).with_name("updatectl")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from updateagent.cli import main; main()"]


def publish_release(root: Path, version: str = NEW_VERSION, *, size: int = PAYLOAD_BYTES) -> Path:
    """Make a key pair and publish ``version`` into ``root/www/<group>`` with ``updatectl release``.
    Returns the public key's path. The image is half pseudo-random, half zeros."""
    keys = root / "keys"
    image = root / f"image-{version}.img"
    image.write_bytes(os.urandom(size // 2) + bytes(size - size // 2))
    channel_dir = root / "www" / CHANNEL_GROUP
    commands = [
        ["release", "keygen", "--out", str(keys)],
        ["release", "build", str(image), "--channel-dir", str(channel_dir), "--version", version,
         "--key", str(keys / "release.key")],
    ]
    for args in commands:
        proc = subprocess.run([*_updatectl(), *args], capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise ChannelError(f"updatectl {' '.join(args[:2])} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return keys / "release.pub"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle and the client's delayed
    # ACK hold the body back for 40 ms, which a fleet of checking agents would pay in virtual time.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/octet-stream") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(self.path).path))
        if path.startswith("/health/"):
            healthy = self.server.verdict(path.removeprefix("/health/"))
            self._send(200 if healthy else 500, b"ok\n" if healthy else b"unhealthy\n", "text/plain")
            return
        target = (self.server.root / path.lstrip("/")).resolve()
        if self.server.root not in target.parents:
            self._send(404, b"not found\n", "text/plain")
            return
        try:
            body = read_bytes(target, max_bytes=_MAX_SERVED)
        except InputFileError:
            self._send(404, b"not found\n", "text/plain")
            return
        self._send(200, body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # A thousand agents check at once; the default backlog of 5 would drop their SYNs (retried
    # after 1 s, 3 s, ... of real time, which is minutes of virtual time).
    request_queue_size = 1024
    root: Path
    verdict: HealthVerdict


class ChannelServer:
    """Serves ``root`` (the channel directories) and the health endpoints on 127.0.0.1."""

    def __init__(self, root: Path, verdict: HealthVerdict) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.root = root.resolve()
        self._server.verdict = verdict
        self._thread = threading.Thread(target=self._server.serve_forever, name="sim-channel", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ChannelServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
