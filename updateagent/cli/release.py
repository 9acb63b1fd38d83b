"""``updatectl release``: make keys, publish a signed release into a channel directory, verify one."""

from __future__ import annotations

from typing import Any

import click

from updateagent.cli import main
from updateagent.cli._common import emit, fail_cleanly, output_option

# "error:" rather than "updatectl:": the prefix these commands have always printed.
_fail_cleanly = fail_cleanly("error")


@main.group("release")
def release() -> None:
    """Publish releases to a static channel and check them."""


@release.command("keygen")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory for the keys.")
@click.option("--name", default="release", show_default=True, help="Base name of the key files.")
@output_option
@_fail_cleanly
def keygen_cmd(out_dir: str, name: str, output: str) -> None:
    """Create an Ed25519 key pair: NAME.key (private, 0600) and NAME.pub (public)."""
    from updateagent.release import keygen

    kf = keygen(out_dir, name)
    doc = {"private_key": str(kf.private_path), "public_key": str(kf.public_path), "key_id": kf.key_id}
    emit(output, doc, f"private key {kf.private_path}\npublic key  {kf.public_path}\nkey id      {kf.key_id}")


@release.command("build")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--channel-dir", required=True, type=click.Path(file_okay=False), help="Channel directory to write.")
@click.option("--version", "version", required=True, help="Release version, e.g. 3815.2.0.")
@click.option("--key", required=True, type=click.Path(dir_okay=False), help="Private key file.")
@click.option("--compression", type=click.Choice(["zstd", "gzip", "none"]), default="zstd", show_default=True)
@click.option("--level", type=int, default=None, help="Compression level (default: zstd 3, gzip 6).")
@click.option("--min-version", default=None, help="Refuse nodes older than this version.")
@click.option("--deadend", default=None, metavar="REASON", help="Mark the release a dead end, with a reason.")
@output_option
@_fail_cleanly
def build_cmd(
    image: str,
    channel_dir: str,
    version: str,
    key: str,
    compression: str,
    level: int | None,
    min_version: str | None,
    deadend: str | None,
    output: str,
) -> None:
    """Compress IMAGE into the channel directory, write manifest.json and sign it."""
    from updateagent.release import build_release

    r = build_release(image, channel_dir, version, key, compression=compression, level=level,
                      min_version=min_version, deadend=deadend)
    doc = {
        **r.manifest.to_json(),
        "manifest_path": str(r.manifest_path),
        "signature_path": str(r.signature_path),
        "payload_path": str(r.payload_path),
        "key_id": r.key_id,
    }
    m = r.manifest
    emit(output, doc, f"published {m.version} to {r.manifest_path} ({m.size} bytes, {m.compression} "
                       f"{m.compressed_size} bytes, sha256 {m.sha256}, key {r.key_id})")


@release.command("verify")
@click.argument("source")
@click.option("--keys", "keys", multiple=True, required=True, type=click.Path(),
              help="Trusted public key file or directory of *.pub files (repeatable).")
@click.option("--no-payload", is_flag=True, help="Check the manifest and signature only.")
@output_option
@_fail_cleanly
def verify_cmd(source: str, keys: tuple[str, ...], no_payload: bool, output: str) -> None:
    """Verify SOURCE (a channel directory or its http(s) URL): signature, manifest, payload."""
    from updateagent.release import verify_release
    from updateagent.signature import KeySet

    report = verify_release(source, KeySet.from_paths(keys), check_payload=not no_payload)
    m = report.release.manifest
    doc: dict[str, Any] = {
        "ok": True,
        "manifest_url": report.release.manifest_url,
        "key_id": report.release.key_id,
        "payload_checked": report.payload is not None,
        **m.to_json(),
    }
    text = f"ok: {m.version} signed by {report.release.key_id}"
    if report.payload is not None:
        text += f"; payload {report.payload.bytes_written} bytes, sha256 matches"
    emit(output, doc, text)
