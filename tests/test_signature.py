"""Keys, key files, key sets and detached signatures."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from updateagent.errors import SignatureError
from updateagent.signature import (
    KeySet,
    encode_public_key,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign,
)

DATA = b'{"version": "3815.2.0"}\n'


def test_generated_key_files_round_trip(tmp_path: Path) -> None:
    kf = generate_keypair(tmp_path / "keys")
    assert stat.S_IMODE(kf.private_path.stat().st_mode) == 0o600
    assert kf.private_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    pub_text = kf.public_path.read_text()
    assert len(base64.b64decode(pub_text.strip())) == 32 and pub_text.endswith("\n")
    priv = load_private_key(kf.private_path)
    pub = load_public_key(kf.public_path)
    assert key_id(pub) == kf.key_id == key_id(priv.public_key())
    ks = KeySet.from_paths([kf.public_path])
    assert ks.verify(DATA, sign(priv, DATA)) == kf.key_id


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_keypair(tmp_path)
    with pytest.raises(SignatureError, match=r"release\.key: already exists"):
        generate_keypair(tmp_path)


def test_pem_public_key_is_accepted(tmp_path: Path) -> None:
    priv = Ed25519PrivateKey.generate()
    pem = priv.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "a.pub").write_bytes(pem)
    assert KeySet.from_paths([tmp_path / "a.pub"]).verify(DATA, sign(priv, DATA)) == key_id(priv.public_key())


def test_a_public_key_or_raw_seed_is_not_a_private_key(tmp_path: Path) -> None:
    kf = generate_keypair(tmp_path)
    with pytest.raises(SignatureError, match=r"release\.pub: not a PEM private key \(is this the public key\?\)"):
        load_private_key(kf.public_path)
    (tmp_path / "enc.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SignatureError, match="not a valid unencrypted PEM private key"):
        load_private_key(tmp_path / "enc.key")


def test_key_directory_and_rotation(tmp_path: Path) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    (tmp_path / "old.pub").write_text(encode_public_key(old.public_key()))
    (tmp_path / "new.pub").write_text(encode_public_key(new.public_key()))
    (tmp_path / "README").write_text("not a key, ignored")
    ks = KeySet.from_paths([tmp_path])
    assert len(ks) == 2
    # A signature file carrying both signatures verifies under either key alone.
    both = b"# rotating keys\n" + sign(old, DATA) + b"\n" + sign(new, DATA)
    assert KeySet([new.public_key()]).verify(DATA, both) == key_id(new.public_key())
    assert KeySet([old.public_key()]).verify(DATA, both) == key_id(old.public_key())


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", r"public key decodes to 0 bytes, expected 32"),
        (b"%%%%\n", r"public key is not valid base64"),
        (base64.b64encode(b"x" * 31), r"decodes to 31 bytes, expected 32"),
        (b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", r"not a valid PEM public key"),
    ],
)
def test_bad_public_key_files_name_the_file(tmp_path: Path, content: bytes, match: str) -> None:
    p = tmp_path / "bad.pub"
    p.write_bytes(content)
    with pytest.raises(SignatureError, match=match) as ei:
        load_public_key(p)
    assert str(p) in str(ei.value)


def test_rsa_key_is_refused(tmp_path: Path) -> None:
    rsa = generate_private_key(public_exponent=65537, key_size=1024)
    p = tmp_path / "rsa.pub"
    p.write_bytes(rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(SignatureError, match="not Ed25519"):
        load_public_key(p)


def test_missing_key_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match="no such key file or directory"):
        KeySet.from_paths([tmp_path / "nope.pub"])
    with pytest.raises(SignatureError, match=r"holds no \*\.pub file"):
        KeySet.from_paths([tmp_path])


def test_empty_key_set_trusts_nothing() -> None:
    priv = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError, match="no trusted keys configured"):
        KeySet().verify(DATA, sign(priv, DATA))


@pytest.mark.parametrize(
    ("sig", "match"),
    [
        (b"", r"signature file is empty"),
        (b"# only a comment\n\n", r"signature file is empty"),
        (b"\xff\xfe", r"not ASCII text"),
        (b"A" * 20000, r"larger than 16384 bytes"),
        (base64.b64encode(b"\0" * 64), r"no signature matches a trusted key"),
    ],
)
def test_bad_signature_files(sig: bytes, match: str) -> None:
    ks = KeySet([Ed25519PrivateKey.generate().public_key()])
    with pytest.raises(SignatureError, match=match):
        ks.verify(DATA, sig)


_KEY = Ed25519PrivateKey.generate()
_KEYSET = KeySet([_KEY.public_key()])


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.integers(min_value=0), st.integers(min_value=0, max_value=7))
def test_any_single_bit_flip_in_the_data_is_detected(data: bytes, pos: int, bit: int) -> None:
    sig = sign(_KEY, data)
    assert _KEYSET.verify(data, sig)
    if data:
        i = pos % len(data)
        flipped = data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]
        with pytest.raises(SignatureError):
            _KEYSET.verify(flipped, sig)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_verify_never_raises_anything_but_signature_error(sig: bytes) -> None:
    with pytest.raises(SignatureError):
        _KEYSET.verify(DATA, sig)
