"""locksmithctl against etcd with TLS, with client-certificate auth (mTLS) and with etcd's own
user/password auth: real servers, certificates made here with ``cryptography``."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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


def _write(base: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    crt, pem = base.with_suffix(".crt"), base.with_suffix(".key")
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    pem.chmod(0o600)
    return crt, pem


def _builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
    )


def _ca(d: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key, _write(d / name, cert, key)[0]


def _leaf(d: Path, name: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
          *, server: bool) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    b = _builder(name, ca.subject, key).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return _write(d / name, b.sign(ca_key, hashes.SHA256()), key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key, ca_path = _ca(d, "ca")
    other, other_key, other_path = _ca(d, "other-ca")
    server = _leaf(d, "server", ca, ca_key, server=True)
    client = _leaf(d, "client", ca, ca_key, server=False)
    rogue = _leaf(d, "rogue", other, other_key, server=False)
    return Pki(ca_path, other_path, *server, *client, *rogue)


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
