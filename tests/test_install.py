"""End-to-end: publish with build_release, serve with a real HTTP server, fetch/check/install into a
byte range of a plain file. Every refusal must name the problem and leave the bytes outside the
slot untouched (and return no result, so the caller never marks the slot)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from httpserver import FileServer

from updateagent.channel import NoUpdate, check, fetch, parse_manifest
from updateagent.errors import ChannelError, DownloadError, PayloadError, PolicyRefused, SignatureError
from updateagent.install import (
    InstallCancelled,
    InstallResult,
    InstallTarget,
    Progress,
    install,
    install_async,
)
from updateagent.release import build_release
from updateagent.schedule import is_transient
from updateagent.signature import KeySet, sign

MiB = 1 << 20
FILE_SIZE = 16 * MiB
SLOT_OFFSET = 4 * MiB
SLOT_SIZE = 8 * MiB
IMAGE_SIZE = 2 * MiB + 12345  # not a multiple of any chunk size on purpose


def make_image(path: Path, size: int, seed: int = 7) -> bytes:
    """Compressible but not trivial: random 4 KiB blocks drawn from a small pool, and zero runs."""
    rnd = random.Random(seed)
    pool = [rnd.randbytes(4096) for _ in range(32)] + [bytes(4096)]
    data = b"".join(rnd.choice(pool) for _ in range(size // 4096 + 1))[:size]
    path.write_bytes(data)
    return data


def _pattern_file(path: Path) -> None:
    block = bytes(range(256)) * 4096  # 1 MiB of a recognisable pattern
    with path.open("wb") as f:
        for _ in range(FILE_SIZE // len(block)):
            f.write(block)


def _region_digests(path: Path) -> tuple[str, str, str]:
    data = path.read_bytes()
    return (
        hashlib.sha256(data[:SLOT_OFFSET]).hexdigest(),
        hashlib.sha256(data[SLOT_OFFSET : SLOT_OFFSET + SLOT_SIZE]).hexdigest(),
        hashlib.sha256(data[SLOT_OFFSET + SLOT_SIZE :]).hexdigest(),
    )


@dataclass
class Ctx:
    srv: FileServer
    root: Path
    chan: Path
    key: Ed25519PrivateKey
    keys: KeySet
    image: bytes
    image_path: Path
    target: InstallTarget
    current: str = "1.0.0"

    @property
    def manifest_url(self) -> str:
        return self.srv.url("stable/manifest.json")

    @property
    def payload_path(self) -> Path:
        return self.chan / json.loads((self.chan / "manifest.json").read_text())["payload"]

    @property
    def payload_url_path(self) -> str:
        return "/stable/" + self.payload_path.name

    def publish(self, version: str = "2.0.0", compression: str = "zstd", **kw: object) -> None:
        build_release(self.image_path, self.chan, version, self.key, compression=compression, **kw)  # type: ignore[arg-type]

    def resign(self, key: Ed25519PrivateKey | None = None, **changes: object) -> None:
        doc = json.loads((self.chan / "manifest.json").read_text())
        for k, v in changes.items():
            if v is _DELETE:
                doc.pop(k)
            else:
                doc[k] = v
        data = json.dumps(doc).encode()
        (self.chan / "manifest.json").write_bytes(data)
        (self.chan / "manifest.json.sig").write_bytes(sign(key or self.key, data))

    def update(self, **kw: object) -> InstallResult:
        """The agent's flow: fetch + verify, check policy, install."""
        rel = fetch(self.manifest_url, self.keys)
        offer = check(rel, self.current)
        kw.setdefault("backoff", 0.01)
        return install(offer.manifest, rel.manifest_url, self.target, **kw)  # type: ignore[arg-type]


_DELETE = object()


@pytest.fixture(scope="module")
def release_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def image_bytes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    p = tmp_path_factory.mktemp("img") / "usr.img"
    return p, make_image(p, IMAGE_SIZE)


@pytest.fixture
def ctx(tmp_path: Path, release_key: Ed25519PrivateKey, image_bytes: tuple[Path, bytes]):
    root = tmp_path / "www"
    chan = root / "stable"
    chan.mkdir(parents=True)
    disk = tmp_path / "disk.img"
    _pattern_file(disk)
    with FileServer(root) as srv:
        c = Ctx(srv, root, chan, release_key, KeySet([release_key.public_key()]), image_bytes[1],
                image_bytes[0], InstallTarget(disk, SLOT_OFFSET, SLOT_SIZE))
        c.publish()
        yield c


def _slot_bytes(c: Ctx, n: int) -> bytes:
    with open(c.target.path, "rb") as f:
        f.seek(SLOT_OFFSET)
        return f.read(n)


# --------------------------------------------------------------------------- success paths


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_install_writes_exactly_the_image_into_the_slot(ctx: Ctx, compression: str) -> None:
    ctx.publish("2.0.0", compression)
    before = _region_digests(Path(ctx.target.path))
    seen: list[Progress] = []
    result = ctx.update(progress=seen.append)
    after = _region_digests(Path(ctx.target.path))
    assert (after[0], after[2]) == (before[0], before[2])
    assert _slot_bytes(ctx, IMAGE_SIZE) == ctx.image
    # The installer writes the image only; the rest of the slot keeps its old bytes.
    with open(ctx.target.path, "rb") as f:
        f.seek(SLOT_OFFSET + IMAGE_SIZE)
        assert f.read(16) == bytes((SLOT_OFFSET + IMAGE_SIZE + i) % 256 for i in range(16))
    assert result.bytes_written == IMAGE_SIZE
    assert result.sha256 == hashlib.sha256(ctx.image).hexdigest()
    assert str(result.version) == "2.0.0"
    assert result.resumes == 0
    assert seen and seen[-1].bytes == IMAGE_SIZE and seen[-1].percent == 100.0 and seen[-1].total == IMAGE_SIZE
    assert all(p.rate > 0 for p in seen)
    assert [p.bytes for p in seen] == sorted(p.bytes for p in seen)


def test_resume_after_dropped_connection_uses_range(ctx: Ctx) -> None:
    ctx.srv.add_fault(ctx.payload_url_path, "drop", after=100_000, times=1)
    result = ctx.update()
    assert _slot_bytes(ctx, IMAGE_SIZE) == ctx.image
    reqs = ctx.srv.requests_for(ctx.payload_url_path)
    assert reqs[0].fault == "drop" and reqs[0].range is None
    assert reqs[1].range == "bytes=100000-" and reqs[1].status == 206
    assert result.resumes == 1
    assert result.downloaded == ctx.payload_path.stat().st_size


def test_resume_when_server_ignores_range(ctx: Ctx) -> None:
    ctx.srv.add_fault(ctx.payload_url_path, "drop", after=150_000, times=1)
    ctx.srv.add_fault(ctx.payload_url_path, "ignore_range", times=1)
    result = ctx.update()
    assert _slot_bytes(ctx, IMAGE_SIZE) == ctx.image
    reqs = ctx.srv.requests_for(ctx.payload_url_path)
    assert reqs[1].range == "bytes=150000-" and reqs[1].status == 200 and reqs[1].fault == "ignore_range"
    assert result.sha256 == hashlib.sha256(ctx.image).hexdigest()


def test_transient_5xx_is_retried(ctx: Ctx) -> None:
    ctx.srv.add_fault(ctx.payload_url_path, "status", value=503, times=2)
    result = ctx.update()
    assert result.resumes == 2
    assert _slot_bytes(ctx, IMAGE_SIZE) == ctx.image


def test_short_redirect_chain_is_followed(ctx: Ctx) -> None:
    ctx.srv.add_fault(ctx.payload_url_path, "redirect_loop", times=2)
    ctx.update()
    assert _slot_bytes(ctx, IMAGE_SIZE) == ctx.image


def test_deadend_release_is_offered_with_its_reason(ctx: Ctx) -> None:
    ctx.publish("2.0.0", deadend="last release of the 2.x line; switch to channel 'stable-3'")
    offer = check(fetch(ctx.manifest_url, ctx.keys), ctx.current)
    assert offer.deadend == "last release of the 2.x line; switch to channel 'stable-3'"


def test_cancel_event_stops_the_install(ctx: Ctx) -> None:
    cancel = threading.Event()
    with pytest.raises(InstallCancelled, match="cancelled"):
        ctx.update(progress=lambda p: cancel.set(), cancel=cancel)


async def test_install_async_reports_progress_on_the_loop(ctx: Ctx) -> None:
    rel = fetch(ctx.manifest_url, ctx.keys)
    loop_thread = threading.get_ident()
    threads: set[int] = set()
    result = await install_async(rel.manifest, rel.manifest_url, ctx.target,
                                 progress=lambda p: threads.add(threading.get_ident()))
    assert result.bytes_written == IMAGE_SIZE
    assert threads == {loop_thread}


async def test_install_async_cancellation_stops_the_worker(ctx: Ctx) -> None:
    ctx.srv.add_fault(ctx.payload_url_path, "status", value=503)
    rel = fetch(ctx.manifest_url, ctx.keys)
    task = asyncio.create_task(
        install_async(rel.manifest, rel.manifest_url, ctx.target, backoff=30.0, max_retries=3)
    )
    await asyncio.to_thread(ctx.srv.wait_for_requests, ctx.payload_url_path, 1)
    before = _region_digests(Path(ctx.target.path))
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 5, "the worker must notice cancellation during its backoff"
    assert len(ctx.srv.requests_for(ctx.payload_url_path)) == 1
    assert _region_digests(Path(ctx.target.path)) == before


# --------------------------------------------------------------------------- refusals

Setup = Callable[[Ctx], dict[str, object] | None]


def _truncate_payload(c: Ctx) -> None:
    p = c.payload_path
    p.write_bytes(p.read_bytes()[:-1000])


def _grow_payload(c: Ctx) -> None:
    with c.payload_path.open("ab") as f:
        f.write(b"\0" * 1000)


def _corrupt_payload(c: Ctx) -> None:
    p = c.payload_path
    p.write_bytes(b"\x5a" * p.stat().st_size)


def _other_key_signs(c: Ctx) -> None:
    c.resign(key=Ed25519PrivateKey.generate())


def _tamper_after_signing(c: Ctx) -> None:
    m = c.chan / "manifest.json"
    m.write_text(m.read_text().replace('"2.0.0"', '"2.0.1"'))


def _image_too_big_for_slot(c: Ctx) -> dict[str, object]:
    c.target = InstallTarget(c.target.path, SLOT_OFFSET, IMAGE_SIZE - 1)
    return {}


def _trailing_garbage(c: Ctx) -> None:
    p = c.payload_path
    with p.open("ab") as f:
        f.write(b"garbage!")
    c.resign(compressed_size=p.stat().st_size)


CASES: list[tuple[str, Setup, type[Exception], str, bool]] = [
    # (name, setup, error, message regex, slot may have been written)
    ("missing signature", lambda c: (c.chan / "manifest.json.sig").unlink(), SignatureError,
     r"HTTP 404 fetching the signature: the manifest is unsigned; refused", False),
    ("tampered manifest", _tamper_after_signing, SignatureError, r"no signature matches a trusted key", False),
    ("untrusted key", _other_key_signs, SignatureError, r"no signature matches a trusted key", False),
    ("garbage signature", lambda c: (c.chan / "manifest.json.sig").write_text("not base64 !!\n"),
     SignatureError, r"manifest.json.sig line 1: signature is not valid base64", False),
    ("short signature", lambda c: (c.chan / "manifest.json.sig").write_text("AAAA\n"),
     SignatureError, r"signature decodes to 3 bytes, expected 64", False),
    ("sha256 mismatch", lambda c: c.resign(sha256="0" * 64), PayloadError,
     r"sha256 mismatch: image has [0-9a-f]{64}, the manifest says 0{64}", True),
    ("size larger than image", lambda c: c.resign(size=IMAGE_SIZE + 1), PayloadError,
     rf"truncated payload: image decompresses to {IMAGE_SIZE} bytes, the manifest's size is {IMAGE_SIZE + 1}",
     True),
    ("size smaller than image", lambda c: c.resign(size=IMAGE_SIZE - 4096), PayloadError,
     r"oversize payload: image decompresses to more than the manifest's size", True),
    ("truncated payload file", _truncate_payload, DownloadError,
     r"truncated payload or wrong Content-Length: server says \d+ bytes", False),
    ("oversize payload file", _grow_payload, DownloadError,
     r"oversize payload or wrong Content-Length: server says \d+ bytes", False),
    ("payload larger than slot", _image_too_big_for_slot, PayloadError, r"payload larger than the slot", False),
    ("unknown compression", lambda c: c.resign(compression="xz"), ChannelError,
     r"field 'compression': unknown 'xz'", False),
    ("corrupt zstd", _corrupt_payload, PayloadError, r"payload is not valid zstd", True),
    ("trailing garbage after zstd frame", _trailing_garbage, PayloadError, r"not valid zstd", True),
    ("downgrade", lambda c: setattr(c, "current", "3.0.0"), PolicyRefused,
     r"channel offers 2.0.0, older than the running 3.0.0: downgrade refused", False),
    ("same version", lambda c: setattr(c, "current", "2.0"), NoUpdate, r"already runs", False),
    ("min_version above current", lambda c: c.resign(min_version="1.5.0"), PolicyRefused,
     r"requires at least 1.5.0 to be installed first, this node runs 1.0.0", False),
    ("html page for manifest", lambda c: c.srv.add_fault("/stable/manifest.json", "html"), ChannelError,
     r"HTML page \(Content-Type text/html\), not the manifest", False),
    ("html labelled json", lambda c: c.srv.add_fault("/stable/manifest.json", "html",
                                                     content_type="application/json"),
     ChannelError, r"got an HTML/XML page instead of the manifest JSON", False),
    ("html page for payload", lambda c: c.srv.add_fault(c.payload_url_path, "html"), DownloadError,
     r"HTML page \(Content-Type text/html\), not the payload", False),
    ("wrong content-length on manifest", lambda c: c.srv.add_fault("/stable/manifest.json", "content_length",
                                                                   value=5000),
     ChannelError, r"body shorter than its Content-Length", False),
    ("wrong content-length on payload", lambda c: c.srv.add_fault(c.payload_url_path, "content_length",
                                                                  value=1000),
     DownloadError, r"wrong Content-Length: server says 1000 bytes", False),
    ("redirect loop on manifest", lambda c: c.srv.add_fault("/stable/manifest.json", "redirect_loop"),
     ChannelError, r"redirect loop", False),
    ("redirect loop on payload", lambda c: c.srv.add_fault(c.payload_url_path, "redirect_loop"),
     DownloadError, r"redirect loop", False),
    ("payload 404", lambda c: c.payload_path.unlink(), DownloadError, r"HTTP 404 fetching the payload", False),
    ("persistent 503", lambda c: c.srv.add_fault(c.payload_url_path, "status", value=503), DownloadError,
     r"giving up after 5 retries without progress at byte 0 of \d+: HTTP 503", False),
    ("manifest missing field", lambda c: c.resign(sha256=_DELETE), ChannelError, r"field 'sha256': missing",
     False),
    ("manifest wrong type", lambda c: c.resign(size=str(IMAGE_SIZE)), ChannelError,
     r"field 'size': expected an integer, got str", False),
    ("manifest unknown field", lambda c: c.resign(extra=1), ChannelError, r"field 'extra': unknown field", False),
]


# The refusals a later retry may get past (the agent then backs off instead of waiting its interval):
# a server error that outlived the installer's own retries, a body cut short.
TRANSIENT = {"persistent 503", "wrong content-length on manifest"}


@pytest.mark.parametrize(("name", "setup", "error", "match", "writes"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_nothing_outside_the_slot_changes(
    ctx: Ctx, name: str, setup: Setup, error: type[Exception], match: str, writes: bool
) -> None:
    setup(ctx)
    disk = Path(ctx.target.path)
    before = _region_digests(disk)
    result: InstallResult | None = None
    with pytest.raises(error, match=match) as caught:
        result = ctx.update()
    assert result is None  # the install never returned success, so the caller never marks the slot
    assert is_transient(caught.value) is (name in TRANSIENT)
    after = _region_digests(disk)
    assert after[0] == before[0], "bytes before the slot changed"
    assert after[2] == before[2], "bytes after the slot changed"
    if not writes:
        assert after[1] == before[1], "slot written although the refusal came before any payload byte"


def test_at_least_twenty_refusal_cases() -> None:
    assert len(CASES) >= 20


def test_unknown_compression_in_a_hand_made_manifest_is_refused(ctx: Ctx) -> None:
    m = parse_manifest((ctx.chan / "manifest.json").read_bytes())
    bad = type(m)(**{**m.__dict__, "compression": "lz4"})
    before = _region_digests(Path(ctx.target.path))
    with pytest.raises(PayloadError, match="unknown compression 'lz4'"):
        install(bad, ctx.manifest_url, ctx.target)
    assert _region_digests(Path(ctx.target.path)) == before


def test_slot_range_past_end_of_target_is_refused(ctx: Ctx) -> None:
    rel = fetch(ctx.manifest_url, ctx.keys)
    target = InstallTarget(ctx.target.path, FILE_SIZE - IMAGE_SIZE, IMAGE_SIZE + 1)
    with pytest.raises(Exception, match="extends past the end"):
        install(rel.manifest, rel.manifest_url, target)
    assert Path(ctx.target.path).stat().st_size == FILE_SIZE


def _publish_raw(c: Ctx, payload: bytes, compression: str, size: int, sha: str) -> None:
    name = "payload-raw.bin"
    (c.chan / name).write_bytes(payload)
    c.resign(payload=name, compression=compression, compressed_size=len(payload), size=size, sha256=sha)


def test_multi_member_gzip_and_multi_frame_zstd_are_read_to_the_end(ctx: Ctx) -> None:
    import gzip

    import zstandard

    half = len(ctx.image) // 2
    sha = hashlib.sha256(ctx.image).hexdigest()
    for compression, payload in [
        ("gzip", gzip.compress(ctx.image[:half]) + gzip.compress(ctx.image[half:])),
        ("zstd", zstandard.ZstdCompressor().compress(ctx.image[:half])
         + zstandard.ZstdCompressor().compress(ctx.image[half:])),
    ]:
        _pattern_file(Path(ctx.target.path))
        _publish_raw(ctx, payload, compression, len(ctx.image), sha)
        assert ctx.update().sha256 == sha
        assert _slot_bytes(ctx, IMAGE_SIZE) == ctx.image


def test_zstd_window_above_the_memory_bound_is_refused(ctx: Ctx) -> None:
    import zstandard

    # Without a content size the frame header declares the full 64 MiB window (like `zstd --long=26`).
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=26, enable_ldm=True,
                                                            write_content_size=False)
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj()
    payload = cobj.compress(ctx.image) + cobj.flush()
    _publish_raw(ctx, payload, "zstd", len(ctx.image), hashlib.sha256(ctx.image).hexdigest())
    before = _region_digests(Path(ctx.target.path))
    with pytest.raises(PayloadError, match=r"zstd frame needs a window above 32 MiB"):
        ctx.update()
    assert _region_digests(Path(ctx.target.path)) == before
