"""locksmithctl against etcd with TLS, with client-certificate auth (mTLS) and with etcd's own
user/password auth: real servers, certificates made here with ``cryptography``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pki import make_pki

from locksmith.embedded import EmbeddedEtcd, TlsMaterial

LOCKSMITHCTL = str(Path(sys.executable).with_name("locksmithctl"))


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path  # a CA that signed nothing etcd presents
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from other_ca
    rogue_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    made = make_pki(tmp_path_factory.mktemp("pki"), clients=("client",), rogue=("rogue",))
    server, client, rogue = made.members[0], made.clients["client"], made.rogue["rogue"]
    return Pki(made.ca, made.other_ca, server.cert, server.key, client.cert, client.key, rogue.cert, rogue.key)


@pytest.fixture(scope="module")
def tls_etcd(pki: Pki) -> Iterator[EmbeddedEtcd]:
    with EmbeddedEtcd(tls=TlsMaterial(pki.server_cert, pki.server_key, pki.ca)) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_etcd(pki: Pki) -> Iterator[EmbeddedEtcd]:
    tls = TlsMaterial(pki.server_cert, pki.server_key, pki.ca, client_cert_auth=True,
                      client_cert_file=pki.client_cert, client_key_file=pki.client_key)
    with EmbeddedEtcd(tls=tls) as server:
        yield server


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[EmbeddedEtcd]:
    with EmbeddedEtcd() as server:
        server.enable_auth("correct horse")
        yield server


def ctl(server: EmbeddedEtcd, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOCKSMITHCTL_")}
    return subprocess.run(
        [LOCKSMITHCTL, "--endpoint", ",".join(server.endpoints), *args],
        capture_output=True, text=True, env={**base, **(env or {})}, timeout=60,
    )


def assert_one_line_failure(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert p.returncode == 1, (p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("locksmithctl: error: ") and "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


# -- TLS -------------------------------------------------------------------------------------------


def test_tls_with_the_right_ca(tls_etcd: EmbeddedEtcd, pki: Pki) -> None:
    assert tls_etcd.endpoints[0].startswith("https://")
    # /metrics stays reachable over plain HTTP for tests that count etcd's operations.
    assert tls_etcd.metrics()["etcd_server_has_leader"] == 1
    p = ctl(tls_etcd, "--etcd-cafile", str(pki.ca), "lock", "node-t")
    assert p.returncode == 0, p.stderr
    # The CA from the environment, as locksmith's LOCKSMITHCTL_ETCD_CAFILE.
    p = ctl(tls_etcd, "status", env={"LOCKSMITHCTL_ETCD_CAFILE": str(pki.ca)})
    assert p.returncode == 0, p.stderr
    assert "node-t" in p.stdout


def test_tls_with_an_untrusted_ca_fails_in_one_line(tls_etcd: EmbeddedEtcd, pki: Pki) -> None:
    p = ctl(tls_etcd, "--etcd-cafile", str(pki.other_ca), "status")
    assert_one_line_failure(p, tls_etcd.endpoints[0], "TLS handshake failed")


def test_tls_with_an_unreadable_ca_file(tls_etcd: EmbeddedEtcd, tmp_path: Path) -> None:
    p = ctl(tls_etcd, "--etcd-cafile", str(tmp_path / "missing.crt"), "status")
    assert_one_line_failure(p, str(tmp_path / "missing.crt"))


def test_mtls_with_a_client_certificate(mtls_etcd: EmbeddedEtcd, pki: Pki) -> None:
    env = {
        "LOCKSMITHCTL_ETCD_CAFILE": str(pki.ca), "LOCKSMITHCTL_ETCD_CERTFILE": str(pki.client_cert),
        "LOCKSMITHCTL_ETCD_KEYFILE": str(pki.client_key),
    }
    p = ctl(mtls_etcd, "set-max", "2", env=env)
    assert p.returncode == 0, p.stderr
    p = ctl(mtls_etcd, "--output", "json", "status", env=env)
    assert p.returncode == 0, p.stderr
    assert '"max": 2' in p.stdout


def test_mtls_without_or_with_a_foreign_client_certificate_fails(mtls_etcd: EmbeddedEtcd, pki: Pki) -> None:
    assert_one_line_failure(ctl(mtls_etcd, "--etcd-cafile", str(pki.ca), "status"), mtls_etcd.endpoints[0])
    p = ctl(mtls_etcd, "--etcd-cafile", str(pki.ca), "--etcd-certfile", str(pki.rogue_cert),
            "--etcd-keyfile", str(pki.rogue_key), "status")
    assert_one_line_failure(p, mtls_etcd.endpoints[0])


# -- etcd auth -------------------------------------------------------------------------------------


def test_auth_with_the_right_password(auth_etcd: EmbeddedEtcd) -> None:
    p = ctl(auth_etcd, "--etcd-username", "root", "--etcd-password", "correct horse", "lock", "node-u")
    assert p.returncode == 0, p.stderr
    env = {"LOCKSMITHCTL_ETCD_USERNAME": "root", "LOCKSMITHCTL_ETCD_PASSWORD": "correct horse"}
    p = ctl(auth_etcd, "status", env=env)
    assert p.returncode == 0, p.stderr
    assert "node-u" in p.stdout


def test_auth_with_a_wrong_password_fails_in_one_line(auth_etcd: EmbeddedEtcd) -> None:
    p = ctl(auth_etcd, "--etcd-username", "root", "--etcd-password", "battery-staple-9", "status")
    assert_one_line_failure(p, "refused authentication: wrong user or password", auth_etcd.endpoints[0])
    assert "battery-staple-9" not in p.stderr


def test_auth_without_credentials_fails_in_one_line(auth_etcd: EmbeddedEtcd) -> None:
    assert_one_line_failure(ctl(auth_etcd, "status"), auth_etcd.endpoints[0])
