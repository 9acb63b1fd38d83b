"""`updatectl release keygen|build|verify` and the build_release/verify_release API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from httpserver import FileServer

from updateagent.channel import load_dir
from updateagent.cli import main
from updateagent.errors import PayloadError, SignatureError
from updateagent.install import InstallTarget, install
from updateagent.release import build_release, keygen, verify_release
from updateagent.signature import KeySet

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "usr.img"
    block = bytes(range(256)) * 16 + bytes(4096)
    p.write_bytes(block * 200 + b"tail")
    return p


def _run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def _one_line_error(code: int, out: str, err: str, match: str) -> None:
    assert code == 1, (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert "Traceback" not in err + out


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_keygen_build_verify(tmp_path: Path, image: Path, compression: str) -> None:
    code, out, _ = _run("release", "keygen", "--out", str(tmp_path / "keys"), "--output", "json")
    assert code == 0
    k = json.loads(out)
    assert Path(k["private_key"]).exists() and Path(k["public_key"]).exists() and len(k["key_id"]) == 16

    chan = tmp_path / "www" / "stable"
    code, out, _ = _run("release", "build", str(image), "--channel-dir", str(chan), "--version", "3815.2.0",
                        "--key", k["private_key"], "--compression", compression, "--min-version", "3800.0.0",
                        "--deadend", "move to stable-2", "-o", "json")
    assert code == 0, out
    b = json.loads(out)
    assert b["version"] == "3815.2.0" and b["compression"] == compression and b["size"] == image.stat().st_size
    assert b["min_version"] == "3800.0.0" and b["deadend"] == "move to stable-2" and b["key_id"] == k["key_id"]
    assert Path(b["payload_path"]).stat().st_size == b["compressed_size"]
    assert Path(b["payload_path"]).name == b["payload"]

    code, out, _ = _run("release", "verify", str(chan), "--keys", k["public_key"], "-o", "json")
    assert code == 0
    v = json.loads(out)
    assert v["ok"] and v["payload_checked"] and v["sha256"] == b["sha256"] and v["key_id"] == k["key_id"]

    code, out, _ = _run("release", "verify", str(chan), "--keys", str(tmp_path / "keys"))
    assert code == 0 and out.startswith("ok: 3815.2.0 signed by ") and "sha256 matches" in out


def test_verify_over_http_and_install_what_was_built(tmp_path: Path, image: Path) -> None:
    kf = keygen(tmp_path / "keys")
    build_release(image, tmp_path / "www" / "beta", "2.0.0", kf.private_path)
    with FileServer(tmp_path / "www") as srv:
        code, out, _ = _run("release", "verify", srv.url("beta"), "--keys", str(kf.public_path), "-o", "json")
        assert code == 0 and json.loads(out)["manifest_url"] == srv.url("beta/manifest.json")
        report = verify_release(srv.url("beta/manifest.json"), KeySet.from_paths([kf.public_path]))
        assert report.payload is not None and report.payload.bytes_written == image.stat().st_size
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(4 * MiB))
    rel = load_dir(tmp_path / "www" / "beta", KeySet.from_paths([kf.public_path]))
    install(rel.manifest, rel.manifest_url, InstallTarget(disk, MiB, 2 * MiB))
    assert disk.read_bytes()[MiB : MiB + image.stat().st_size] == image.read_bytes()


def test_verify_with_the_wrong_key_fails_in_one_line(tmp_path: Path, image: Path) -> None:
    a, b = keygen(tmp_path / "a"), keygen(tmp_path / "b")
    build_release(image, tmp_path / "ch", "1.0.0", a.private_path)
    _one_line_error(*_run("release", "verify", str(tmp_path / "ch"), "--keys", str(b.public_path)),
                    "no signature matches a trusted key")
    with pytest.raises(SignatureError):
        verify_release(tmp_path / "ch", KeySet.from_paths([b.public_path]))


def test_verify_detects_a_corrupted_payload(tmp_path: Path, image: Path) -> None:
    kf = keygen(tmp_path / "k")
    r = build_release(image, tmp_path / "ch", "1.0.0", kf.private_path, compression="gzip")
    data = bytearray(r.payload_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    r.payload_path.write_bytes(bytes(data))
    _one_line_error(*_run("release", "verify", str(tmp_path / "ch"), "--keys", str(kf.public_path)),
                    "truncated or corrupt: gzip stream ends inside a member")
    with pytest.raises(PayloadError):
        verify_release(tmp_path / "ch", KeySet.from_paths([kf.public_path]))
    # --no-payload checks the signed manifest only.
    assert _run("release", "verify", str(tmp_path / "ch"), "--keys", str(kf.public_path), "--no-payload")[0] == 0


def test_verify_detects_a_truncated_payload_file(tmp_path: Path, image: Path) -> None:
    kf = keygen(tmp_path / "k")
    r = build_release(image, tmp_path / "ch", "1.0.0", kf.private_path)
    r.payload_path.write_bytes(r.payload_path.read_bytes()[:-10])
    _one_line_error(*_run("release", "verify", str(tmp_path / "ch"), "--keys", str(kf.public_path)),
                    "truncated payload: file has")


def test_build_errors(tmp_path: Path, image: Path) -> None:
    kf = keygen(tmp_path / "k")
    ch = str(tmp_path / "ch")
    _one_line_error(*_run("release", "build", str(image), "--channel-dir", ch, "--version", "v2",
                          "--key", str(kf.private_path)), "'v2' is not a version")
    _one_line_error(*_run("release", "build", str(tmp_path / "nope.img"), "--channel-dir", ch, "--version", "2",
                          "--key", str(kf.private_path)), "nope.img: cannot read the image")
    _one_line_error(*_run("release", "build", str(image), "--channel-dir", ch, "--version", "2",
                          "--key", str(kf.public_path)), "private key")
    _one_line_error(*_run("release", "keygen", "--out", str(tmp_path / "k")), "already exists")
    code, _, err = _run("release", "build", str(image), "--channel-dir", ch, "--version", "2",
                        "--key", str(kf.private_path), "--compression", "xz")
    assert code == 2 and "Invalid value for '--compression'" in err
    assert _run("release", "verify", ch)[0] == 2  # --keys is required


def test_updatectl_entry_point_keeps_stdout_json(tmp_path: Path, image: Path) -> None:
    exe = Path(sys.executable).with_name("updatectl")
    out = subprocess.run([str(exe), "release", "keygen", "--out", str(tmp_path / "k"), "-o", "json"],
                         capture_output=True, text=True, check=True)
    kid = json.loads(out.stdout)["key_id"]
    out = subprocess.run([str(exe), "release", "build", str(image), "--channel-dir", str(tmp_path / "ch"),
                          "--version", "5.0.0", "--key", str(tmp_path / "k" / "release.key"), "-o", "json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["key_id"] == kid
    bad = subprocess.run([str(exe), "release", "verify", str(tmp_path / "nowhere"), "--keys",
                          str(tmp_path / "k")], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere' / 'manifest.json'}: cannot read: "
                                               "manifest not found"]
