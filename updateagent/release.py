"""Publishing side of a channel: key pairs, building a signed release, verifying a channel.

A channel directory holds ``manifest.json``, ``manifest.json.sig`` and the payload files; copy
it to any static HTTP(S) server. See docs/channel.md.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import requests
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from locksmith.log import get_logger
from updateagent._atomic import write_atomic
from updateagent.channel import (
    MANIFEST_NAME,
    SIGNATURE_SUFFIX,
    ChannelRelease,
    Manifest,
    Version,
    fetch,
    load_dir,
    require_compression,
)
from updateagent.errors import ChannelError, PayloadError, SignatureError
from updateagent.install import InstallResult, verify_payload
from updateagent.signature import KeyFiles, KeySet, generate_keypair, key_id, load_private_key, sign

_log = get_logger(__name__)

_CHUNK = 1024 * 1024
_SUFFIX = {"none": ".img", "gzip": ".img.gz", "zstd": ".img.zst"}

__all__ = ["BuildResult", "VerifyReport", "build_release", "keygen", "verify_release"]


def keygen(out_dir: str | os.PathLike[str], name: str = "release") -> KeyFiles:
    """Create a release key pair (``<name>.key`` private, ``<name>.pub`` public) in ``out_dir``."""
    return generate_keypair(out_dir, name)


@dataclass(frozen=True)
class BuildResult:
    manifest: Manifest
    manifest_path: Path
    signature_path: Path
    payload_path: Path
    key_id: str


def _compress(src: BinaryIO, dst: BinaryIO, compression: str, level: int | None, size: int) -> str:
    """Copy ``src`` into ``dst`` compressed; return the sha256 of the uncompressed bytes."""
    h = hashlib.sha256()
    if compression == "zstd":
        cctx = zstandard.ZstdCompressor(level=3 if level is None else level, threads=-1, write_content_size=True)
        with cctx.stream_writer(dst, size=size, closefd=False) as w:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                w.write(chunk)
    elif compression == "gzip":
        c = zlib.compressobj(6 if level is None else level, zlib.DEFLATED, 31)
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            dst.write(c.compress(chunk))
        dst.write(c.flush())
    else:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            dst.write(chunk)
    return h.hexdigest()


def _check_level(compression: str, level: int | None) -> None:
    """Refuse a level the compressor would reject with a bare ValueError halfway through."""
    if level is None or compression == "none":
        return
    low, high = (-(1 << 17), zstandard.MAX_COMPRESSION_LEVEL) if compression == "zstd" else (0, 9)
    if not low <= level <= high:
        raise ChannelError(f"compression level {level} out of range for {compression} ({low}..{high})")


def build_release(
    image: str | os.PathLike[str],
    channel_dir: str | os.PathLike[str],
    version: str | Version,
    key: str | os.PathLike[str] | Ed25519PrivateKey,
    *,
    compression: str = "zstd",
    min_version: str | Version | None = None,
    deadend: str | None = None,
    level: int | None = None,
    released: datetime | None = None,
) -> BuildResult:
    """Compress ``image`` into ``channel_dir``, write its manifest and sign it.

    The payload is written first, then ``manifest.json``, then ``manifest.json.sig`` (each
    atomically, by rename). A client polling in between sees a signature mismatch, refuses, and
    succeeds on its next poll.
    """
    require_compression(compression)
    try:
        ver = Version.coerce(version)
        minv = Version.coerce(min_version) if min_version is not None else None
    except ValueError as exc:
        raise ChannelError(str(exc)) from exc
    if deadend is not None and not deadend.strip():
        raise ChannelError("deadend reason must not be empty")
    _check_level(compression, level)
    private = key if isinstance(key, Ed25519PrivateKey) else load_private_key(key)
    src_path = Path(image)
    try:
        size = src_path.stat().st_size
    except OSError as exc:
        raise PayloadError(f"{src_path}: cannot read the image: {exc.strerror or exc}") from exc
    if size == 0 or not src_path.is_file():
        raise PayloadError(f"{src_path}: not a non-empty regular file")
    out = Path(channel_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload_name = f"payload-{ver}{_SUFFIX[compression]}"
    payload_path = out / payload_name
    tmp = out / f".{payload_name}.tmp"
    try:
        with src_path.open("rb") as fin, tmp.open("wb") as fout:
            sha = _compress(fin, fout, compression, level, size)
            fout.flush()
            os.fsync(fout.fileno())
        compressed_size = tmp.stat().st_size
        tmp.replace(payload_path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written payload left in the channel directory
        raise
    manifest = Manifest(
        version=ver,
        payload=payload_name,
        size=size,
        compressed_size=compressed_size,
        sha256=sha,
        compression=compression,
        released=(released or datetime.now(UTC)).replace(microsecond=0),
        min_version=minv,
        deadend=deadend,
    )
    data = manifest.to_bytes()
    manifest_path = out / MANIFEST_NAME
    sig_path = out / (MANIFEST_NAME + SIGNATURE_SUFFIX)
    # Published: a web server running as another user must be able to read them.
    write_atomic(manifest_path, data, private=False)
    write_atomic(sig_path, sign(private, data), private=False)
    kid = key_id(private.public_key())
    _log.info("release_built", version=str(ver), channel_dir=str(out), payload=payload_name, size=size,
              compressed_size=compressed_size, key_id=kid)
    return BuildResult(manifest, manifest_path, sig_path, payload_path, kid)


@dataclass(frozen=True)
class VerifyReport:
    release: ChannelRelease
    payload: InstallResult | None  # None when the payload was not checked


def verify_release(
    source: str | os.PathLike[str],
    keys: KeySet,
    *,
    check_payload: bool = True,
    session: requests.Session | None = None,
) -> VerifyReport:
    """Verify a channel (a local directory, or an http(s) URL of the channel or its manifest).

    Checks the signature against ``keys``, parses the manifest strictly and, unless
    ``check_payload`` is false, streams the payload through the install pipeline (no target) to
    check its sizes, compression and sha256.
    """
    if len(keys) == 0:
        raise SignatureError("no trusted keys given; cannot verify")
    text = str(source)
    if text.startswith(("http://", "https://")):
        url = text if text.endswith(".json") else text.rstrip("/") + "/" + MANIFEST_NAME
        release = fetch(url, keys, session=session)
    else:
        release = load_dir(text, keys)
    payload = verify_payload(release.manifest, release.manifest_url, session=session) if check_payload else None
    return VerifyReport(release, payload)
