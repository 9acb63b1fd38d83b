"""A real HTTP/1.1 file server on 127.0.0.1 for tests, with fault injection.

Serves a directory (GET/HEAD, Range requests answered with 206) and records every request.
Faults are attached to a URL path and can be limited to the first N matching requests::

    with FileServer(tmp_path) as srv:
        srv.add_fault("/stable/payload.zst", "drop", after=4096, times=1)
        url = srv.url("stable/manifest.json")
        ...
        assert any(r.range for r in srv.requests_for("/stable/payload.zst"))

Fault kinds (``after``/``value`` meanings):

- ``drop``: send headers and the first ``after`` body bytes, then cut the connection.
- ``content_length``: declare ``value`` as Content-Length, send the real body, close.
- ``html``: answer with an HTML error page, status ``value`` (default 200) and
  Content-Type ``content_type`` (default text/html).
- ``redirect_loop``: 302 to the same path, forever (or ``times`` requests).
- ``status``: answer with status ``value`` (e.g. 503) and a short text body.
- ``ignore_range``: answer 200 with the whole file even when a Range was asked.
- ``drip``: correct headers, then the body ``value`` bytes (default 1) every ``interval``
  seconds: a slow or stuck server that never trips a per-read timeout.
- ``redirect``: 302 to ``location`` (an absolute URL, e.g. on another FileServer).

Run it standalone (``python tests/httpserver.py DIR``) to get a server in another process: it
prints its base URL on the first line of stdout and serves until stdin closes.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import socket
import sys
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")
FAULT_KINDS = ("drop", "content_length", "html", "redirect_loop", "status", "ignore_range", "drip", "redirect")


@dataclass
class Fault:
    kind: str
    value: int | None = None
    after: int = 0
    times: int | None = None  # None: every request
    content_type: str = "text/html; charset=utf-8"
    interval: float = 1.0  # drip
    location: str = ""  # redirect


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    headers: dict[str, str]
    status: int
    fault: str | None

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass
class _State:
    root: Path
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    requests: list[RequestRecord] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr access logs
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    # ------------------------------------------------------------------------------------

    def _record(self, status: int, fault: str | None) -> None:
        st = self.server.state
        path = urllib.parse.urlsplit(self.path).path
        rec = RequestRecord(self.command, path, {k.lower(): v for k, v in self.headers.items()}, status, fault)
        with st.cond:
            st.requests.append(rec)
            st.cond.notify_all()

    def _take_fault(self, path: str) -> Fault | None:
        st = self.server.state
        with st.cond:
            for f in st.faults.get(path, []):
                if f.times is None:
                    return f
                if f.times > 0:
                    f.times -= 1
                    return f
        return None

    def _simple(self, status: int, body: bytes, ctype: str, fault: str | None, extra: dict[str, str] | None = None,
                head: bool = False) -> None:
        self._record(status, fault)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _cut(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

    def _drip(self, file: Path, start: int, count: int, step: int, interval: float) -> None:
        stop = self.server.stopping
        with file.open("rb") as f:
            f.seek(start)
            while count > 0 and not stop.is_set():
                data = f.read(min(step, count))
                try:
                    self.wfile.write(data)
                    self.wfile.flush()
                except OSError:  # the client gave up: what a drip test waits for
                    return
                count -= len(data)
                stop.wait(interval)
        self._cut()

    def _serve(self, head: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        fault = self._take_fault(path)
        kind = fault.kind if fault else None
        if fault and fault.kind == "redirect_loop":
            self._simple(302, b"", "text/plain", kind, {"Location": self.path}, head)
            return
        if fault and fault.kind == "redirect":
            self._simple(302, b"", "text/plain", kind, {"Location": fault.location}, head)
            return
        if fault and fault.kind == "status":
            code = fault.value or 503
            self._simple(code, f"error {code}\n".encode(), "text/plain", kind, None, head)
            return
        if fault and fault.kind == "html":
            page = b"<!DOCTYPE html><html><head><title>Error</title></head><body><h1>Bad Gateway</h1></body></html>"
            self._simple(fault.value or 200, page, fault.content_type, kind, None, head)
            return

        rel = posixpath.normpath(path).lstrip("/")
        file = (self.server.state.root / rel).resolve()
        if rel.startswith("..") or not file.is_file() or self.server.state.root.resolve() not in file.parents:
            self._simple(404, b"not found\n", "text/plain", kind, None, head)
            return
        size = file.stat().st_size
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and kind != "ignore_range":
            m = _RANGE_RE.match(rng.strip())
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else size - 1
                end = min(end, size - 1)
                if start >= size or start > end:
                    self._simple(416, b"", "text/plain", kind, {"Content-Range": f"bytes */{size}"}, head)
                    return
                status = 206
        count = end - start + 1 if size else 0
        ctype = "application/json" if file.suffix == ".json" else "application/octet-stream"
        declared = fault.value if fault and fault.kind == "content_length" and fault.value is not None else count

        self._record(status, kind)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(declared))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head:
            return
        send = min(count, fault.after) if fault and fault.kind == "drop" else count
        self.wfile.flush()
        if fault and fault.kind == "drip":
            self._drip(file, start, count, max(fault.value or 1, 1), fault.interval)
            return
        with file.open("rb") as f:
            if send:
                self.connection.sendfile(f, start, send)
        if fault and fault.kind in ("drop", "content_length"):
            self._cut()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, state: _State) -> None:
        self.state = state
        self.stopping = threading.Event()  # ends dripping responses when the server stops
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-body (cancelled downloads) is normal here; stay quiet.
        pass


class FileServer:
    """A threaded HTTP server serving ``root`` on 127.0.0.1 (a free port), with fault injection."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.state = _State(Path(root))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FileServer:
        self._server = _Server(self.state)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="test-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stopping.set()
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, rel: str = "") -> str:
        return f"{self.base_url}/{rel.lstrip('/')}"

    def add_fault(
        self,
        path: str,
        kind: str,
        *,
        value: int | None = None,
        after: int = 0,
        times: int | None = None,
        content_type: str = "text/html; charset=utf-8",
        interval: float = 1.0,
        location: str = "",
    ) -> Fault:
        """Attach a fault to URL ``path`` (e.g. ``/stable/manifest.json``)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {FAULT_KINDS}")
        f = Fault(kind, value, after, times, content_type, interval, location)
        with self.state.cond:
            self.state.faults.setdefault("/" + path.lstrip("/"), []).append(f)
        return f

    def clear_faults(self) -> None:
        with self.state.cond:
            self.state.faults.clear()

    @property
    def requests(self) -> list[RequestRecord]:
        with self.state.cond:
            return list(self.state.requests)

    def requests_for(self, path: str) -> list[RequestRecord]:
        p = "/" + path.lstrip("/")
        return [r for r in self.requests if r.path == p]

    def wait_for_requests(self, path: str, n: int, timeout: float = 10.0) -> list[RequestRecord]:
        """Block until ``n`` requests for ``path`` were answered (or raise TimeoutError)."""
        p = "/" + path.lstrip("/")
        with self.state.cond:
            ok = self.state.cond.wait_for(
                lambda: sum(r.path == p for r in self.state.requests) >= n, timeout=timeout
            )
            if not ok:
                raise TimeoutError(f"fewer than {n} requests for {p} within {timeout}s")
            return [r for r in self.state.requests if r.path == p]


def _main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: httpserver.py DIR\n")
        return 2
    with FileServer(argv[0]) as srv:
        sys.stdout.write(srv.base_url + "\n")
        sys.stdout.flush()
        sys.stdin.read()  # serve until the parent closes our stdin
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
