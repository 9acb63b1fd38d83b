"""A static update channel: ``<server>/<channel>/manifest.json`` plus its detached signature.

Any HTTP(S) file server can host a channel (see docs/channel.md). This module fetches the
manifest and ``manifest.json.sig``, verifies the signature against the agent's key set, parses the
manifest strictly and decides with :func:`check` whether its release may be offered to this node.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import total_ordering
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

from locksmith.files import InputFileError, InputFileNotFoundError, read_bytes
from locksmith.log import get_logger
from updateagent.errors import ChannelError, PayloadError, PolicyRefused, SignatureError

if TYPE_CHECKING:
    # requests + urllib3 (~5 MiB resident) are imported by the HTTP functions below, when they
    # run: the daemon parses and judges a manifest fetched by its check process
    # (updateagent.checker) and never loads them.
    import requests

    from updateagent.signature import KeySet

_log = get_logger(__name__)

FORMAT_VERSION = 1
COMPRESSIONS = ("none", "gzip", "zstd")
MANIFEST_NAME = "manifest.json"
SIGNATURE_SUFFIX = ".sig"
MAX_MANIFEST_BYTES = 64 * 1024
MAX_REDIRECTS = 5
DEFAULT_TIMEOUT = (10.0, 30.0)  # (connect, read) seconds
# The per-read timeout restarts with every byte: a server dripping one byte every few seconds
# would hold a check forever. The manifest and its signature must both arrive within this.
DEFAULT_FETCH_DEADLINE = 60.0
USER_AGENT = "coreupdate-agent/0.1"

# Used with fullmatch: `$` would also match before a trailing newline ("2.0.0\n").
_VERSION_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# The agent's config key that accepts unsigned manifests: named in every refusal.
INSECURE_HINT = "set channel.insecure = true in the agent config to accept"


class NoUpdate(PolicyRefused):
    """The channel offers the version the node already runs: nothing to do (not a fault)."""


@total_ordering
class Version:
    """An update_engine/Flatcar style version: dotted non-negative integers, e.g. ``3815.2.0``.

    Components compare numerically from the left; missing trailing components count as 0,
    so ``3815.2`` == ``3815.2.0`` < ``3815.10.0``. Anything else (letters, ``-rc1``, ``+build``,
    empty components) is not a version.
    """

    __slots__ = ("_key", "text")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not _VERSION_RE.fullmatch(text):
            raise ValueError(f"{text!r} is not a version (dotted numbers such as 3815.2.0)")
        self.text = text
        parts = [int(p) for p in text.split(".")]
        while len(parts) > 1 and parts[-1] == 0:
            parts.pop()
        self._key = tuple(parts)

    @classmethod
    def coerce(cls, value: Version | str) -> Version:
        return value if isinstance(value, Version) else cls(value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key == other._key

    def __lt__(self, other: Version) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key < other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Version({self.text!r})"


@dataclass(frozen=True)
class Manifest:
    """One release as a channel describes it. ``payload`` is as written (maybe relative).

    There is no format_version field: the parser accepts only ``FORMAT_VERSION``.
    """

    version: Version
    payload: str
    size: int  # uncompressed image bytes: what lands in the slot
    compressed_size: int  # bytes of the payload file as served
    sha256: str  # of the uncompressed image, lowercase hex
    compression: str
    released: datetime
    min_version: Version | None = None
    deadend: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "version": str(self.version),
            "payload": self.payload,
            "size": self.size,
            "compressed_size": self.compressed_size,
            "sha256": self.sha256,
            "compression": self.compression,
            "released": self.released.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if self.min_version is not None:
            out["min_version"] = str(self.min_version)
        if self.deadend is not None:
            out["deadend"] = self.deadend
        return out

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()

    def payload_url(self, manifest_url: str) -> str:
        """Resolve ``payload`` against the manifest's URL (relative references allowed). For a
        fetched manifest that is the URL that answered, after redirects (``ChannelRelease``)."""
        return urljoin(manifest_url, self.payload)


def require_compression(name: str) -> None:
    """Refuse (PayloadError) a compression this agent cannot read, before any byte is moved."""
    if name not in COMPRESSIONS:
        raise PayloadError(f"unknown compression {name!r} (known: {', '.join(COMPRESSIONS)})")


_REQUIRED = ("format_version", "version", "payload", "size", "compressed_size", "sha256", "compression",
             "released")
_OPTIONAL = ("min_version", "deadend")


def _field_error(where: str, field: str, problem: str) -> ChannelError:
    return ChannelError(f"{where}: field {field!r}: {problem}")


def _want_int(doc: dict[str, Any], field: str, where: str) -> int:
    v = doc[field]
    if isinstance(v, bool) or not isinstance(v, int):
        raise _field_error(where, field, f"expected an integer, got {type(v).__name__} {v!r}")
    if v <= 0:
        raise _field_error(where, field, f"must be positive, got {v}")
    return v


def _want_str(doc: dict[str, Any], field: str, where: str) -> str:
    v = doc[field]
    if not isinstance(v, str):
        raise _field_error(where, field, f"expected a string, got {type(v).__name__} {v!r}")
    if not v.strip():
        raise _field_error(where, field, "must not be empty")
    return v


def _want_version(doc: dict[str, Any], field: str, where: str) -> Version:
    text = _want_str(doc, field, where)
    try:
        return Version(text)
    except ValueError as exc:
        raise _field_error(where, field, str(exc)) from exc


def _refuse_markup(data: bytes, where: str) -> None:
    # A captive portal or proxy error page, whatever Content-Type it claims.
    if data.lstrip()[:1] == b"<":
        raise ChannelError(f"{where}: got an HTML/XML page instead of the manifest JSON")


def parse_manifest(data: bytes, where: str = MANIFEST_NAME) -> Manifest:
    """Parse and validate manifest bytes. Any problem raises ChannelError naming the field."""
    _refuse_markup(data, where)
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ChannelError(f"{where}: not UTF-8 text (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise ChannelError(f"{where}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError:
        raise ChannelError(f"{where}: not valid JSON: nested too deeply") from None
    except ValueError as exc:  # an integer beyond int()'s digit limit
        raise ChannelError(f"{where}: not valid JSON: {str(exc).split(';')[0]}") from None
    if not isinstance(doc, dict):
        raise ChannelError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    unknown = sorted(set(doc) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise _field_error(where, unknown[0], "unknown field")
    missing = [f for f in _REQUIRED if f not in doc]
    if missing:
        raise _field_error(where, missing[0], "missing")

    fv = doc["format_version"]
    if isinstance(fv, bool) or not isinstance(fv, int):
        raise _field_error(where, "format_version", f"expected an integer, got {type(fv).__name__} {fv!r}")
    if fv != FORMAT_VERSION:
        raise _field_error(where, "format_version", f"unsupported {fv} (this agent reads {FORMAT_VERSION})")
    version = _want_version(doc, "version", where)
    payload = _want_str(doc, "payload", where)
    if any(c.isspace() for c in payload):
        raise _field_error(where, "payload", "must not contain whitespace")
    scheme = urlsplit(payload).scheme
    if scheme and scheme not in ("http", "https"):
        raise _field_error(where, "payload", f"URL scheme {scheme!r} not allowed (http, https or relative)")
    size = _want_int(doc, "size", where)
    compressed_size = _want_int(doc, "compressed_size", where)
    sha256 = _want_str(doc, "sha256", where)
    if not _SHA256_RE.fullmatch(sha256):
        raise _field_error(where, "sha256", "expected 64 lowercase hex digits")
    compression = _want_str(doc, "compression", where)
    if compression not in COMPRESSIONS:
        raise _field_error(where, "compression", f"unknown {compression!r} (known: {', '.join(COMPRESSIONS)})")
    if compression == "none" and compressed_size != size:
        raise _field_error(where, "compressed_size", f"{compressed_size} != size {size} for compression 'none'")
    released_text = _want_str(doc, "released", where)
    try:
        released = datetime.fromisoformat(released_text)
    except ValueError as exc:
        raise _field_error(where, "released", f"not an RFC 3339 time: {released_text!r}") from exc
    if released.tzinfo is None:
        raise _field_error(where, "released", f"time {released_text!r} has no timezone (use Z)")
    min_version = _want_version(doc, "min_version", where) if "min_version" in doc else None
    deadend = _want_str(doc, "deadend", where) if "deadend" in doc else None
    return Manifest(
        version=version,
        payload=payload,
        size=size,
        compressed_size=compressed_size,
        sha256=sha256,
        compression=compression,
        released=released,
        min_version=min_version,
        deadend=deadend,
    )


# --------------------------------------------------------------------------- HTTP


def new_session(max_redirects: int = MAX_REDIRECTS) -> requests.Session:
    """A session with a bounded redirect count (a redirect loop fails fast, with a clear error)."""
    import requests

    s = requests.Session()
    s.max_redirects = max_redirects
    s.headers["User-Agent"] = USER_AGENT
    return s


def transient_request_errors() -> tuple[type[Exception], ...]:
    """The requests failures worth retrying: a connection that failed or broke off may work on
    the next try; a redirect loop or a bad URL will not."""
    import requests

    return (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


def transient_status(code: int) -> bool:
    """HTTP answers worth retrying later: server errors (5xx) and rate limiting (429)."""
    return code >= 500 or code == 429


@contextlib.contextmanager
def session_scope(session: requests.Session | None) -> Iterator[requests.Session]:
    """``session`` as given, or a new one (see :func:`new_session`) closed on the way out."""
    if session is not None:
        yield session
        return
    with new_session() as own:
        yield own


def describe_request_error(url: str, exc: requests.RequestException) -> str:
    """One clear line for a requests failure, shared by the channel and the installer."""
    import requests

    if isinstance(exc, requests.TooManyRedirects):
        return f"{url}: redirect loop (gave up after too many redirects)"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f"{url}: connection broke mid-body (body shorter than its Content-Length?): {exc}"
    if isinstance(exc, requests.Timeout):
        return f"{url}: timed out: {exc}"
    if isinstance(exc, requests.ConnectionError):
        return f"{url}: cannot connect: {exc}"
    return f"{url}: request failed: {exc}"


def is_html(resp: requests.Response) -> bool:
    ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    return ctype in ("text/html", "application/xhtml+xml")


def set_read_timeout(resp: requests.Response, seconds: float) -> None:
    """Bound the next socket read of ``resp``'s body by ``seconds`` (the deadlines and the stall
    rule shorten the read timeout fixed when the request was sent)."""
    conn = getattr(resp.raw, "connection", None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.settimeout(max(seconds, 0.001))


def _fetch_small(
    session: requests.Session, url: str, what: str, timeout: tuple[float, float], deadline: float,
    *, missing_is_signature: bool,
) -> tuple[bytes, str]:
    """GET ``url``: (body, the URL that answered after redirects). ``deadline`` is a
    ``time.monotonic()`` instant the whole body must have arrived by."""
    import requests
    import urllib3

    limit = f"{what} did not arrive within the fetch deadline"
    try:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ChannelError(f"{url}: {limit}", transient=True)
        with session.get(url, timeout=(min(timeout[0], left), min(timeout[1], left)), stream=True,
                         headers={"Accept-Encoding": "identity"}) as resp:
            final = resp.url or url
            if resp.status_code != 200:
                msg = f"{final}: HTTP {resp.status_code} fetching the {what}"
                if missing_is_signature and resp.status_code == 404:
                    raise SignatureError(f"{msg}: the manifest is unsigned; refused ({INSECURE_HINT})")
                raise ChannelError(msg, transient=transient_status(resp.status_code))
            if is_html(resp):
                raise ChannelError(f"{final}: server answered with an HTML page (Content-Type text/html), "
                                   f"not the {what}")
            declared = resp.headers.get("Content-Length")
            body = bytearray()
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChannelError(f"{final}: {limit} ({len(body)} bytes so far)", transient=True)
                set_read_timeout(resp, min(timeout[1], left))
                try:
                    chunk = resp.raw.read1(16 * 1024, decode_content=False)
                except (urllib3.exceptions.ReadTimeoutError, TimeoutError) as exc:
                    if deadline - time.monotonic() <= 0:
                        raise ChannelError(f"{final}: {limit} ({len(body)} bytes so far)", transient=True) from exc
                    raise requests.exceptions.ReadTimeout(str(exc)) from exc
                except urllib3.exceptions.ProtocolError as exc:
                    raise requests.exceptions.ChunkedEncodingError(str(exc)) from exc
                if not chunk:
                    break
                body += chunk
                if len(body) > MAX_MANIFEST_BYTES:
                    raise ChannelError(f"{final}: {what} is larger than {MAX_MANIFEST_BYTES} bytes")
    except requests.RequestException as exc:
        raise ChannelError(describe_request_error(url, exc),
                           transient=isinstance(exc, transient_request_errors())) from exc
    if declared is not None and declared.isdigit() and int(declared) != len(body):
        # What a connection cut short looks like when the transport did not notice.
        raise ChannelError(f"{final}: wrong Content-Length: header says {declared}, body has {len(body)} bytes",
                           transient=True)
    return bytes(body), final


@dataclass(frozen=True)
class ChannelRelease:
    """A manifest that passed signature verification and parsing, with where it came from."""

    manifest: Manifest
    manifest_url: str  # the URL that answered (after redirects), or a local path for a channel directory
    key_id: str | None  # None only when accepted unsigned under channel.insecure
    # The manifest's bytes as verified: how a check process hands the release to the daemon.
    data: bytes = field(default=b"", repr=False, compare=False)

    @property
    def payload_url(self) -> str:
        return self.manifest.payload_url(self.manifest_url)


def manifest_url(server: str, channel: str) -> str:
    """``<server>/<channel>/manifest.json``."""
    if not channel or "/" in channel.strip("/") or channel in (".", ".."):
        raise ChannelError(f"channel name {channel!r} is not a single path component")
    return f"{server.rstrip('/')}/{channel.strip('/')}/{MANIFEST_NAME}"


def _verify(data: bytes, sig: bytes | None, keys: KeySet | None, where: str, insecure: bool) -> str | None:
    if insecure:
        _log.warning(
            "MANIFEST_SIGNATURE_NOT_CHECKED",
            manifest=where,
            reason="channel.insecure is set: any server or network attacker can push any image",
        )
        return None
    if sig is None:
        raise SignatureError(f"{where}{SIGNATURE_SUFFIX}: missing; unsigned manifests are refused ({INSECURE_HINT})")
    if keys is None:
        raise SignatureError(f"{where}: no key set configured; cannot verify the signature")
    return keys.verify(data, sig, where + SIGNATURE_SUFFIX)


def fetch(
    url: str,
    keys: KeySet | None,
    *,
    session: requests.Session | None = None,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
    deadline: float = DEFAULT_FETCH_DEADLINE,
    insecure: bool = False,
) -> ChannelRelease:
    """Fetch ``url`` (a manifest.json URL) and its ``.sig``, verify, parse.

    Redirects are followed (at most ``MAX_REDIRECTS``), and, as browsers and curl do, what the
    manifest refers to is resolved against the URL that answered: the signature is fetched from
    that URL plus ``.sig`` and a relative ``payload`` is resolved against it. Both files must
    arrive within ``deadline`` seconds together, however the server spaces its bytes.

    Raises SignatureError (bad, missing or untrusted signature) or ChannelError (unreachable,
    HTML page, wrong Content-Length, redirect loop, deadline passed, malformed manifest);
    ``transient`` is set on the errors worth retrying soon.
    """
    until = time.monotonic() + deadline
    with session_scope(session) as s:
        data, final = _fetch_small(s, url, "manifest", timeout, until, missing_is_signature=False)
        sig = None
        if not insecure:
            sig, _ = _fetch_small(s, final + SIGNATURE_SUFFIX, "signature", timeout, until,
                                  missing_is_signature=True)
    _refuse_markup(data, final)  # before the signature check, which would blame the signature
    kid = _verify(data, sig, keys, final, insecure)
    manifest = parse_manifest(data, final)
    if final != url:
        _log.info("manifest_redirected", url=url, final_url=final)
    _log.info("manifest_fetched", url=final, version=str(manifest.version), key_id=kid)
    return ChannelRelease(manifest, final, kid, data)


def load_dir(
    channel_dir: str | os.PathLike[str], keys: KeySet | None, *, insecure: bool = False
) -> ChannelRelease:
    """Like :func:`fetch`, for a channel directory on local disk (publishing, verification)."""
    path = Path(channel_dir) / MANIFEST_NAME
    where = str(path)
    try:
        data = read_bytes(path, max_bytes=MAX_MANIFEST_BYTES, what="manifest")
    except InputFileError as exc:
        raise ChannelError(f"{where}: cannot read: {exc.problem}") from None
    sig: bytes | None = None
    if not insecure:
        try:
            sig = read_bytes(where + SIGNATURE_SUFFIX, max_bytes=MAX_MANIFEST_BYTES, what="signature")
        except InputFileNotFoundError:
            sig = None  # _verify names the missing signature
        except InputFileError as exc:
            raise SignatureError(str(exc)) from None
    kid = _verify(data, sig, keys, where, insecure)
    return ChannelRelease(parse_manifest(data, where), where, kid, data)


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Offer:
    """A release that passed :func:`check`: the agent may download and apply it."""

    release: ChannelRelease
    current_version: Version
    downgrade: bool
    deadend: str | None

    @property
    def manifest(self) -> Manifest:
        return self.release.manifest

    @property
    def version(self) -> Version:
        return self.release.manifest.version


def check(
    release: ChannelRelease,
    current_version: Version | str,
    *,
    allow_downgrade: bool = False,
    deny: Iterable[Version | str] = (),
) -> Offer:
    """Decide whether ``release`` may be offered to a node running ``current_version``.

    Raises NoUpdate (a PolicyRefused) when the channel offers the running version, and
    PolicyRefused for a denied version, a downgrade (unless ``allow_downgrade``) or a release
    whose ``min_version`` is above the running version. A dead-end release is offered, with its
    reason reported in ``Offer.deadend``.
    """
    m = release.manifest
    try:
        current = Version.coerce(current_version)
        denied = {Version.coerce(v) for v in deny}
    except ValueError as exc:
        raise PolicyRefused(f"bad version in agent configuration: {exc}") from exc
    if m.version in denied:
        raise PolicyRefused(f"version {m.version} is on this node's deny list; refused")
    if m.version == current:
        raise NoUpdate(f"channel offers {m.version}, which this node already runs; nothing to do")
    downgrade = m.version < current
    if downgrade and not allow_downgrade:
        raise PolicyRefused(
            f"channel offers {m.version}, older than the running {current}: downgrade refused "
            "(anti-rollback; set allow_downgrade to permit)"
        )
    if m.min_version is not None and m.min_version > current:
        raise PolicyRefused(
            f"release {m.version} requires at least {m.min_version} to be installed first, "
            f"this node runs {current}; install an intermediate release"
        )
    if m.deadend is not None:
        _log.warning("release_is_deadend", version=str(m.version), reason=m.deadend)
    return Offer(release, current, downgrade, m.deadend)
