"""Apply a release: one streaming pipeline from the HTTP payload into the inactive slot's byte range.

download (worker thread, bounded queue) -> decompress (zlib / zstd streaming, bounded output)
-> ``os.pwrite`` inside ``[offset, offset + size)`` -> fsync, with the sha256 of the uncompressed
image computed beside it in a thread of its own.

Memory stays flat whatever the image size: at most ``QUEUE_DEPTH`` compressed chunks are in
flight and ``HASH_QUEUE_DEPTH`` decompressed ones wait for the hash, every decompressor call
produces at most ``CHUNK_SIZE`` bytes, and zstd frames needing a
window above ``MAX_ZSTD_WINDOW`` are refused. A dropped connection resumes with an HTTP Range
request, and a connection that delivers less than ``stall_bytes`` in ``stall_seconds`` counts as
broken. The installer never touches partition tables and never writes outside its range; it calls
the target's ``prepare`` hook (the agent marks the slot unbootable there) just before its first
write, so a refusal decided earlier leaves the slot alone. The caller marks the slot bootable only
after :func:`install` returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import queue
import re
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypedDict, Unpack

import requests
import urllib3
import zstandard

from locksmith.log import get_logger
from updateagent.channel import (
    DEFAULT_TIMEOUT,
    Manifest,
    Version,
    describe_request_error,
    is_html,
    require_compression,
    session_scope,
    set_read_timeout,
    transient_request_errors,
    transient_status,
)
from updateagent.errors import DownloadError, PayloadError, UpdateAgentError

_log = get_logger(__name__)

# 64 KiB: ~2 MiB less peak RSS than 256 KiB for ~10 % less throughput, still faster than the
# `zstd | tee >(openssl dgst -sha256) | dd` pipeline (benchmarks/apply.py; numbers in docs/channel.md).
CHUNK_SIZE = 64 * 1024
QUEUE_DEPTH = 8
MAX_ZSTD_WINDOW = 32 * 1024 * 1024
PROGRESS_INTERVAL = 0.25  # seconds between progress callbacks
HASH_QUEUE_DEPTH = 2  # decompressed chunks waiting for the sha256 thread
# The stall rule's defaults: a connection must deliver DEFAULT_STALL_BYTES within every
# DEFAULT_STALL_SECONDS (about 1 KiB/s); a slower one is cut and resumed with a Range request.
DEFAULT_STALL_BYTES = 64 * 1024
DEFAULT_STALL_SECONDS = 60.0
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class InstallCancelled(UpdateAgentError):
    """The install was cancelled; the slot holds a partial image and must not be marked."""


@dataclass(frozen=True)
class InstallTarget:
    """The inactive slot: ``size`` bytes at ``offset`` of ``path`` (a block device or a file).

    ``prepare``, if given, runs once in the installer's thread just before the first byte is
    written into the range; an exception from it aborts the install with nothing written.
    """

    path: str | os.PathLike[str]
    offset: int
    size: int
    prepare: Callable[[], None] | None = None


@dataclass(frozen=True)
class Progress:
    bytes: int  # uncompressed bytes written so far
    total: int  # uncompressed image size
    percent: float
    rate: float  # uncompressed bytes per second since the start
    downloaded: int  # compressed bytes received (this run, counting resumes once)


@dataclass(frozen=True)
class InstallResult:
    version: Version
    bytes_written: int
    sha256: str
    downloaded: int
    resumes: int
    elapsed: float


ProgressCallback = Callable[[Progress], None]


class HttpOptions(TypedDict, total=False):
    """How the payload is fetched; every key is optional (defaults in brackets).

    ``session`` [a new one per install], ``max_retries`` [5] consecutive failed attempts without
    progress, ``backoff`` [0.5] seconds before the first retry (doubling, at most 30),
    ``http_timeout`` [``channel.DEFAULT_TIMEOUT``] as (connect, read) seconds, and the stall rule:
    a connection that delivers fewer than ``stall_bytes`` [64 KiB] within ``stall_seconds`` [60]
    is cut and counts as a failed attempt without progress.
    """

    session: requests.Session | None
    max_retries: int
    backoff: float
    http_timeout: tuple[float, float]
    stall_bytes: int
    stall_seconds: float


class _Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


# --------------------------------------------------------------------------- sources


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_EOF = object()


class _HttpSource:
    """Compressed payload bytes from HTTP, fetched by a worker thread into a bounded queue."""

    def __init__(
        self,
        session: requests.Session,
        url: str,
        expected: int,
        *,
        timeout: tuple[float, float],
        max_retries: int,
        backoff: float,
        chunk_size: int,
        cancel: threading.Event,
        stall_bytes: int = DEFAULT_STALL_BYTES,
        stall_seconds: float = DEFAULT_STALL_SECONDS,
    ) -> None:
        self.url = url
        self.expected = expected
        self.received = 0
        self.resumes = 0
        self._session = session
        self._timeout = timeout
        self._max_retries = max_retries
        self._backoff = backoff
        self._chunk = chunk_size
        self._cancel = cancel
        self._stall_bytes = stall_bytes
        self._stall_seconds = stall_seconds
        self._stop = threading.Event()
        self._q: queue.Queue[object] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._buf = memoryview(b"")
        self._eof = False
        self._resp: requests.Response | None = None
        self._thread = threading.Thread(target=self._run, name="payload-download", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        resp = self._resp
        if resp is not None:
            # Unblocks a worker stuck in a socket read; it then sees the stop flag and exits.
            with contextlib.suppress(Exception):
                resp.close()
        if self._thread.is_alive():
            self._thread.join(timeout=self._timeout[1] + 5)

    @property
    def eof(self) -> bool:
        return self._eof and not self._buf

    # consumer side -------------------------------------------------------------------------

    def read(self, n: int = -1, /) -> bytes:
        while not self._buf:
            if self._eof:
                return b""
            item = self._get()
            if item is _EOF:
                self._eof = True
                return b""
            if isinstance(item, _Failure):
                self._eof = True
                raise item.exc
            assert isinstance(item, bytes)
            self._buf = memoryview(item)
        if 0 <= n < len(self._buf):
            out, self._buf = self._buf[:n], self._buf[n:]
            return out.tobytes()
        out, self._buf = self._buf, memoryview(b"")
        whole = out.obj
        # Hand the downloaded chunk over as is when it was not split: no copy on the hot path.
        return whole if isinstance(whole, bytes) and len(whole) == len(out) else out.tobytes()

    def _get(self) -> object:
        while True:
            try:
                return self._q.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set() or self._cancel.is_set():
                    raise InstallCancelled("install cancelled") from None

    # worker side ---------------------------------------------------------------------------

    def _stopping(self) -> bool:
        return self._stop.is_set() or self._cancel.is_set()

    def _put(self, item: object) -> bool:
        while not self._stopping():
            try:
                self._q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            self._download()
        except BaseException as exc:
            self._put(_Failure(exc))
        else:
            self._put(_EOF)

    def _download(self) -> None:
        failures = 0
        while self.received < self.expected and not self._stopping():
            before = self.received
            try:
                self._attempt()
                if self.received < self.expected and not self._stopping():
                    raise _Retryable("body ended early (connection closed)")
            except _Retryable as exc:
                # A stalled connection's few bytes are no progress: a dripping server would
                # otherwise be retried forever.
                failures = 0 if self.received > before and not isinstance(exc, _Stalled) else failures + 1
                if failures > self._max_retries:
                    # Only transient failures get here: the agent will try again later, with backoff.
                    raise DownloadError(
                        f"{self.url}: giving up after {self._max_retries} retries without progress "
                        f"at byte {self.received} of {self.expected}: {exc}", transient=True,
                    ) from None
                delay = min(self._backoff * (2 ** max(failures - 1, 0)), 30.0)
                self.resumes += 1
                _log.warning("payload_download_retry", url=self.url, at=self.received, of=self.expected,
                             error=str(exc), delay=delay, failures=failures)
                if self._stop.wait(delay) or self._cancel.is_set():
                    return

    def _attempt(self) -> None:
        headers = {"Accept-Encoding": "identity"}
        if self.received:
            headers["Range"] = f"bytes={self.received}-"
        try:
            resp = self._session.get(self.url, stream=True, timeout=self._timeout, headers=headers)
        except transient_request_errors() as exc:
            raise _Retryable(describe_request_error(self.url, exc)) from exc
        except requests.RequestException as exc:
            raise DownloadError(describe_request_error(self.url, exc)) from exc
        self._resp = resp
        try:
            skip = self._check_response(resp)
            # The stall rule: every stall_bytes must arrive within stall_seconds of the previous ones.
            window_start, window_bytes = time.monotonic(), 0
            try:
                while True:
                    left = window_start + self._stall_seconds - time.monotonic()
                    if left <= 0:
                        raise self._stalled(window_bytes)
                    set_read_timeout(resp, min(self._timeout[1], left))
                    try:
                        chunk = resp.raw.read1(self._chunk, decode_content=False)
                    except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
                        if window_start + self._stall_seconds - time.monotonic() <= 0.05:
                            raise self._stalled(window_bytes) from None
                        raise
                    if not chunk:
                        break
                    window_bytes += len(chunk)
                    if window_bytes >= self._stall_bytes:
                        window_start, window_bytes = time.monotonic(), 0
                    if self._stopping():
                        return
                    if skip:
                        # The server ignored Range and restarted from byte 0: drop what we have.
                        if len(chunk) <= skip:
                            skip -= len(chunk)
                            continue
                        chunk, skip = chunk[skip:], 0
                    if self.received + len(chunk) > self.expected:
                        raise DownloadError(
                            f"{self.url}: oversize payload: server sends more than the manifest's "
                            f"compressed_size of {self.expected} bytes"
                        )
                    self.received += len(chunk)
                    waited = time.monotonic()
                    if not self._put(chunk):
                        return
                    # Time spent waiting for the slower disk is not the server's.
                    window_start += time.monotonic() - waited
            except (urllib3.exceptions.HTTPError, OSError, requests.RequestException) as exc:
                raise _Retryable(f"connection broke at byte {self.received}: {exc}") from exc
        finally:
            self._resp = None
            resp.close()

    def _check_response(self, resp: requests.Response) -> int:
        """Validate status and headers; return how many leading body bytes to discard."""
        code = resp.status_code
        if transient_status(code):
            raise _Retryable(f"HTTP {code}")
        if code == 416:
            raise DownloadError(
                f"{self.url}: truncated payload: server has fewer bytes than the manifest's compressed_size "
                f"of {self.expected} (HTTP 416 for a Range from byte {self.received})"
            )
        if code not in (200, 206):
            raise DownloadError(f"{self.url}: HTTP {code} fetching the payload")
        if is_html(resp):
            raise DownloadError(f"{self.url}: server answered with an HTML page (Content-Type text/html), "
                                "not the payload")
        length_hdr = resp.headers.get("Content-Length")
        length = int(length_hdr) if length_hdr and length_hdr.isdigit() else None
        if code == 206:
            m = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", ""))
            if not m:
                raise DownloadError(f"{self.url}: HTTP 206 without a valid Content-Range "
                                    f"({resp.headers.get('Content-Range')!r})")
            start, end, total = int(m.group(1)), int(m.group(2)), m.group(3)
            if start != self.received:
                raise DownloadError(f"{self.url}: asked for bytes from {self.received}, got a range from {start}")
            if total != "*" and int(total) != self.expected:
                raise DownloadError(self._size_problem(int(total), "Content-Range total"))
            if length is not None and length != end - start + 1:
                raise DownloadError(f"{self.url}: wrong Content-Length {length} for range {start}-{end}")
            return 0
        if length is not None and length != self.expected:
            raise DownloadError(self._size_problem(length, "Content-Length"))
        if self.received:
            _log.warning("payload_server_ignored_range", url=self.url, restart_skip=self.received)
        return self.received

    def _size_problem(self, served: int, header: str) -> str:
        kind = "truncated" if served < self.expected else "oversize"
        return (f"{self.url}: {kind} payload or wrong {header}: server says {served} bytes, "
                f"the manifest's compressed_size is {self.expected}")


    def _stalled(self, window_bytes: int) -> _Stalled:
        return _Stalled(f"stalled: {window_bytes} bytes in {self._stall_seconds:g}s, fewer than the "
                        f"{self._stall_bytes} the stall rule asks for (at byte {self.received})")


class _Retryable(Exception):
    pass


class _Stalled(_Retryable):
    """The connection delivers too slowly (the stall rule)."""


class _FileSource:
    """Compressed payload bytes from a local file (verifying a channel directory)."""

    def __init__(self, path: Path, expected: int) -> None:
        self.url = str(path)
        self.expected = expected
        self.received = 0
        self.resumes = 0
        try:
            actual = path.stat().st_size
            self._f = path.open("rb")
        except OSError as exc:
            raise DownloadError(f"{path}: cannot read the payload: {exc.strerror or exc}") from exc
        if actual != expected:
            self._f.close()
            kind = "truncated" if actual < expected else "oversize"
            raise DownloadError(f"{path}: {kind} payload: file has {actual} bytes, "
                                f"the manifest's compressed_size is {expected}")

    def start(self) -> None:
        pass

    def close(self) -> None:
        self._f.close()

    @property
    def eof(self) -> bool:
        return self.received >= self.expected

    def read(self, n: int = -1, /) -> bytes:
        data = self._f.read(CHUNK_SIZE if n < 0 else n)
        self.received += len(data)
        return data


# --------------------------------------------------------------------------- decompression


class _GzipReader:
    """Bounded-output gzip decompression over a reader (multi-member streams allowed)."""

    def __init__(self, src: _Reader) -> None:
        self._src = src
        self._d = zlib.decompressobj(wbits=31)
        self._pending = b""
        self._started = False

    def read(self, n: int = -1, /) -> bytes:
        n = CHUNK_SIZE if n < 0 else n
        while True:
            if self._pending:
                self._started = True
                try:
                    out = self._d.decompress(self._pending, n)
                except zlib.error as exc:
                    raise PayloadError(f"payload is not valid gzip: {exc}") from exc
                if self._d.eof:
                    # The next member starts in unused_data. unconsumed_tail may still hold those
                    # same bytes (when the member ended in a call cut short by the output limit):
                    # adding it too fed them twice ("invalid block type", "incorrect data check").
                    self._pending = self._d.unused_data
                    self._d = zlib.decompressobj(wbits=31)
                    self._started = False
                else:
                    self._pending = self._d.unconsumed_tail
                if out:
                    return out
                continue
            chunk = self._src.read(CHUNK_SIZE)
            if not chunk:
                if self._started:
                    raise PayloadError("payload is truncated or corrupt: gzip stream ends inside a member")
                return b""
            self._pending = chunk


def _decompressor(compression: str, src: _Reader) -> _Reader:
    require_compression(compression)
    if compression == "none":
        return src
    if compression == "gzip":
        return _GzipReader(src)
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
    return dctx.stream_reader(src, read_size=CHUNK_SIZE, read_across_frames=True, closefd=False)


# --------------------------------------------------------------------------- sinks


class _SlotSink:
    def __init__(self, target: InstallTarget) -> None:
        self.target = target
        if target.offset < 0 or target.size <= 0:
            raise UpdateAgentError(f"{target.path}: bad slot range offset={target.offset} size={target.size}")
        try:
            self._fd = os.open(target.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise UpdateAgentError(f"{target.path}: cannot open the install target: {exc.strerror}") from exc
        try:
            end = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as exc:  # a pipe or socket, say: not a disk
            os.close(self._fd)
            raise UpdateAgentError(f"{target.path}: cannot seek the install target: {exc.strerror}") from exc
        if target.offset + target.size > end:
            os.close(self._fd)
            raise UpdateAgentError(
                f"{target.path}: slot range {target.offset}+{target.size} extends past the end ({end} bytes)"
            )
        self._pos = 0
        self._prepared = target.prepare is None

    def write(self, data: bytes) -> None:
        if self._pos + len(data) > self.target.size:  # belt and braces: never leave the range
            raise PayloadError(f"{self.target.path}: write would leave the slot range")
        if not self._prepared:
            assert self.target.prepare is not None
            self.target.prepare()
            self._prepared = True
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, self.target.offset + self._pos)
            self._pos += n
            view = view[n:]

    def finish(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class _NullSink:
    def write(self, data: bytes) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- pipeline


class _Hasher:
    """sha256 in a thread of its own. Hashing is the slowest step by far (zstd decompresses and
    the page cache takes writes several times faster), so it overlaps both instead of following
    them; hashlib releases the GIL while it hashes a large buffer. At most ``HASH_QUEUE_DEPTH``
    chunks wait (memory stays flat)."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=HASH_QUEUE_DEPTH)
        self._thread = threading.Thread(target=self._run, name="payload-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (buf := self._q.get()) is not None:
            self._digest.update(buf)

    def update(self, buf: bytes) -> None:
        self._q.put(buf)  # blocks at most while the thread hashes what is queued: it never fails

    def hexdigest(self) -> str:
        self.close()
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()


def _pipeline(
    manifest: Manifest,
    source: _HttpSource | _FileSource,
    sink: _SlotSink | _NullSink,
    progress: ProgressCallback | None,
    cancel: threading.Event,
) -> InstallResult:
    started = time.monotonic()
    digest = _Hasher()
    written = 0
    last_report = 0.0
    total = manifest.size

    def report(now: float) -> None:
        if progress is not None:
            elapsed = max(now - started, 1e-9)
            progress(Progress(written, total, 100.0 * written / total, written / elapsed, source.received))

    try:
        reader = _decompressor(manifest.compression, source)
        source.start()
        while True:
            if cancel.is_set():
                raise InstallCancelled(f"install of {manifest.version} cancelled at byte {written}")
            try:
                buf = reader.read(CHUNK_SIZE)
            except zstandard.ZstdError as exc:
                if "too much memory" in str(exc):
                    raise PayloadError(
                        f"payload refused: its zstd frame needs a window above {MAX_ZSTD_WINDOW >> 20} MiB "
                        "(compressed with --long or --ultra?); re-publish without them"
                    ) from exc
                raise PayloadError(f"payload is not valid zstd: {exc}") from exc
            if not buf:
                break
            if written + len(buf) > total:
                raise PayloadError(
                    f"oversize payload: image decompresses to more than the manifest's size of {total} bytes"
                )
            digest.update(buf)
            sink.write(buf)
            written += len(buf)
            now = time.monotonic()
            if now - last_report >= PROGRESS_INTERVAL:
                last_report = now
                report(now)
        if not source.eof or source.received != manifest.compressed_size:
            raise PayloadError(
                f"payload has trailing data: the image ended after {source.received} of "
                f"{manifest.compressed_size} compressed bytes"
            )
        if written != total:
            raise PayloadError(
                f"truncated payload: image decompresses to {written} bytes, the manifest's size is {total}"
            )
        got = digest.hexdigest()
        if got != manifest.sha256:
            raise PayloadError(f"sha256 mismatch: image has {got}, the manifest says {manifest.sha256}")
        sink.finish()
        report(time.monotonic())
    finally:
        digest.close()
        source.close()
    return InstallResult(
        version=manifest.version,
        bytes_written=written,
        sha256=got,
        downloaded=source.received,
        resumes=source.resumes,
        elapsed=time.monotonic() - started,
    )


def _source(
    manifest: Manifest, manifest_url: str, session: requests.Session, cancel: threading.Event, http: HttpOptions
) -> _HttpSource | _FileSource:
    url = manifest.payload_url(manifest_url)
    if url.startswith(("http://", "https://")):
        return _HttpSource(session, url, manifest.compressed_size, timeout=http.get("http_timeout", DEFAULT_TIMEOUT),
                           max_retries=http.get("max_retries", 5), backoff=http.get("backoff", 0.5),
                           chunk_size=CHUNK_SIZE, cancel=cancel,
                           stall_bytes=http.get("stall_bytes", DEFAULT_STALL_BYTES),
                           stall_seconds=http.get("stall_seconds", DEFAULT_STALL_SECONDS))
    if "://" in url:
        raise DownloadError(f"{url}: only http, https and local paths are supported")
    return _FileSource(Path(url), manifest.compressed_size)


def install(
    manifest: Manifest,
    manifest_url: str,
    target: InstallTarget,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    **http: Unpack[HttpOptions],
) -> InstallResult:
    """Stream ``manifest``'s payload into ``target`` and fsync it; return only on full success.

    ``manifest_url`` resolves a relative ``payload`` (an http(s) URL, or a local manifest path).
    A dropped connection, a timeout, HTTP 5xx or 429 is retried with a Range request after an
    exponential backoff (see :class:`HttpOptions`). Setting ``cancel`` stops the install with
    InstallCancelled. Raises PayloadError (size, sha256, compression, slot too small),
    DownloadError (HTTP problems; ``transient`` when the retries ran out) or UpdateAgentError
    (bad target). On any error the slot holds garbage and must not be marked bootable.
    """
    if manifest.size > target.size:
        raise PayloadError(
            f"payload larger than the slot: image is {manifest.size} bytes, {target.path} slot holds {target.size}"
        )
    cancel = cancel or threading.Event()
    sink = _SlotSink(target)
    _log.info("install_start", version=str(manifest.version), target=str(target.path), offset=target.offset,
              size=manifest.size, compression=manifest.compression)
    try:
        with session_scope(http.get("session")) as s:
            result = _pipeline(manifest, _source(manifest, manifest_url, s, cancel, http), sink, progress, cancel)
    except BaseException as exc:
        _log.error("install_failed", version=str(manifest.version), error=str(exc), kind=type(exc).__name__)
        raise
    finally:
        sink.close()
    _log.info("install_done", version=str(manifest.version), bytes=result.bytes_written,
              seconds=round(result.elapsed, 3), resumes=result.resumes)
    return result


def verify_payload(manifest: Manifest, manifest_url: str, **http: Unpack[HttpOptions]) -> InstallResult:
    """Run the install pipeline without a target: checks sizes, compression and sha256."""
    cancel = threading.Event()
    with session_scope(http.get("session")) as s:
        return _pipeline(manifest, _source(manifest, manifest_url, s, cancel, http), _NullSink(), None, cancel)


async def install_async(
    manifest: Manifest,
    manifest_url: str,
    target: InstallTarget,
    *,
    progress: ProgressCallback | None = None,
    **http: Unpack[HttpOptions],
) -> InstallResult:
    """:func:`install` in a worker thread. ``progress`` runs on the event loop.

    Cancelling the awaiting task stops the pipeline and waits for the worker to finish, so no
    write reaches the slot after the cancellation has been delivered.
    """
    loop = asyncio.get_running_loop()
    cancel = threading.Event()

    def on_progress(p: Progress) -> None:
        if progress is not None:
            loop.call_soon_threadsafe(progress, p)

    task = asyncio.ensure_future(
        asyncio.to_thread(install, manifest, manifest_url, target, progress=on_progress, cancel=cancel, **http)
    )
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        cancel.set()
        with contextlib.suppress(BaseException):
            await task
        raise
