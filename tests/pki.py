"""A throw-away PKI for TLS tests, made with ``cryptography``: a CA, a server certificate per
etcd member, and client certificates whose common name is the etcd user they log in as (etcd
takes the CN as the user name when a client presents a certificate and no token)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass
class Pki:
    dir: Path
    ca: Path
    other_ca: Path  # signed nothing the servers trust
    members: list[CertPair] = field(default_factory=list)
    clients: dict[str, CertPair] = field(default_factory=dict)  # CN -> pair, signed by ca
    expired: dict[str, CertPair] = field(default_factory=dict)  # CN -> pair whose validity has ended
    rogue: dict[str, CertPair] = field(default_factory=dict)  # CN -> pair signed by other_ca


Key = ec.EllipticCurvePrivateKey


def _write(base: Path, cert: x509.Certificate, key: Key) -> CertPair:
    crt, pem = base.with_suffix(".crt"), base.with_suffix(".key")
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    pem.chmod(0o600)
    return CertPair(crt, pem)


def _builder(cn: str, issuer: x509.Name, key: Key, *, expired: bool = False) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    start, end = (now - dt.timedelta(days=30), now - dt.timedelta(days=1)) if expired else (
        now - dt.timedelta(minutes=5), now + dt.timedelta(days=1))
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
    )


def _ca(d: Path, name: str) -> tuple[x509.Certificate, Key, Path]:
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
    return cert, key, _write(d / name, cert, key).cert


def _leaf(d: Path, file: str, cn: str, ca: x509.Certificate, ca_key: Key, *, server: bool,
          expired: bool = False) -> CertPair:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    b = _builder(cn, ca.subject, key, expired=expired).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return _write(d / file, b.sign(ca_key, hashes.SHA256()), key)


def make_pki(d: Path, *, members: int = 1, clients: tuple[str, ...] = ("root",),
             expired: tuple[str, ...] = (), rogue: tuple[str, ...] = ()) -> Pki:
    """Write every file under ``d``: ``ca.crt``, ``other-ca.crt``, ``m<i>.crt/.key`` (server,
    CN ``m<i>``, SAN 127.0.0.1 and localhost) and ``client-<cn>.crt/.key`` per client."""
    ca, ca_key, ca_path = _ca(d, "ca")
    other, other_key, other_path = _ca(d, "other-ca")
    pki = Pki(d, ca_path, other_path)
    pki.members = [_leaf(d, f"m{i}", f"m{i}", ca, ca_key, server=True) for i in range(members)]
    pki.clients = {cn: _leaf(d, f"client-{cn}", cn, ca, ca_key, server=False) for cn in clients}
    pki.expired = {cn: _leaf(d, f"expired-{cn}", cn, ca, ca_key, server=False, expired=True) for cn in expired}
    pki.rogue = {cn: _leaf(d, f"rogue-{cn}", cn, other, other_key, server=False) for cn in rogue}
    return pki
