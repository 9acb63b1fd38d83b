"""Ed25519 release keys, key sets and detached manifest signatures.

Formats (see docs/channel.md):

- Public key file (``*.pub``): one line, standard base64 of the raw 32-byte Ed25519 public key.
  A PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo) is accepted too.
- Private key file (``*.key``): PEM ``PRIVATE KEY`` (unencrypted PKCS#8), mode 0600, only.
- Signature file (``manifest.json.sig``): one or more lines, each the standard base64 of a raw
  64-byte Ed25519 signature over the exact bytes of ``manifest.json``. Blank lines and lines
  starting with ``#`` are ignored. The manifest is trusted when ANY line verifies with ANY key of
  the key set, which lets a publisher sign with the old and the new key while rotating.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from locksmith.files import InputFileError, read_bytes
from locksmith.log import get_logger
from updateagent.errors import SignatureError

# cryptography (~6 MiB resident) is imported where a key is made, parsed from PEM, or used: an
# agent loads its raw public keys at start but verifies only when a release is offered.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

_log = get_logger(__name__)

_MAX_KEY_FILE = 16 * 1024
_MAX_SIG_FILE = 16 * 1024


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short stable name of a public key: the first 8 bytes of sha256(raw key), in hex."""
    return _raw_key_id(_raw_public(public_key))


def _raw_key_id(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def encode_public_key(public_key: Ed25519PublicKey) -> str:
    """The ``.pub`` file content: base64 of the raw 32-byte key and a newline."""
    return base64.b64encode(_raw_public(public_key)).decode("ascii") + "\n"


def encode_private_key(private_key: Ed25519PrivateKey) -> bytes:
    """The ``.key`` file content: unencrypted PKCS#8 PEM."""
    from cryptography.hazmat.primitives import serialization

    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class KeyFiles:
    private_path: Path
    public_path: Path
    key_id: str


def generate_keypair(out_dir: str | os.PathLike[str], name: str = "release") -> KeyFiles:
    """Create ``<name>.key`` (0600) and ``<name>.pub`` in ``out_dir``; refuse to overwrite."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise SignatureError(f"{p}: already exists; refusing to overwrite a key")
    private_key = Ed25519PrivateKey.generate()
    # O_EXCL + 0600 from the start: the private key is never world-readable, not even briefly.
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(encode_private_key(private_key))
    pub_path.write_text(encode_public_key(private_key.public_key()))
    kid = key_id(private_key.public_key())
    _log.info("release_key_generated", private=str(priv_path), public=str(pub_path), key_id=kid)
    return KeyFiles(priv_path, pub_path, kid)


def _read_small(path: Path, what: str) -> bytes:
    try:
        return read_bytes(path, max_bytes=_MAX_KEY_FILE, what=f"{what} file")
    except InputFileError as exc:
        raise SignatureError(str(exc)) from None


def _b64_exact(text: str, length: int, where: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{where}: {what} is not valid base64") from exc
    if len(raw) != length:
        raise SignatureError(f"{where}: {what} decodes to {len(raw)} bytes, expected {length}")
    return raw


def parse_public_key(data: bytes, where: str = "<public key>") -> Ed25519PublicKey:
    """Parse a public key in either accepted encoding (raw base64 or PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    text = data.decode("ascii", errors="replace").strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise SignatureError(f"{where}: not a valid PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureError(f"{where}: PEM public key is {type(key).__name__}, not Ed25519")
        return key
    return Ed25519PublicKey.from_public_bytes(_b64_exact(text, 32, where, "public key"))


def _parse_public_raw(data: bytes, where: str) -> bytes:
    """The raw 32 bytes of a public key, as :func:`parse_public_key` accepts it. The raw base64
    form needs no cryptography: Ed25519 takes any 32 bytes as a public key."""
    text = data.decode("ascii", errors="replace").strip()
    if text.startswith("-----BEGIN"):
        return _raw_public(parse_public_key(data, where))
    return _b64_exact(text, 32, where, "public key")


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    p = Path(path)
    return parse_public_key(_read_small(p, "public key"), str(p))


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load a PKCS#8 PEM private key.

    Only PEM: a raw base64 seed would look exactly like a public key file, and signing with a
    ``.pub`` by mistake must fail rather than publish under an unknown key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    p = Path(path)
    data = _read_small(p, "private key")
    if not data.lstrip().startswith(b"-----BEGIN"):
        raise SignatureError(f"{p}: not a PEM private key (is this the public key?)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{p}: not a valid unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{p}: PEM private key is {type(key).__name__}, not Ed25519")
    return key


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The detached signature file content for ``data`` (one base64 line)."""
    return base64.b64encode(private_key.sign(data)) + b"\n"


class KeySet:
    """The public keys an agent trusts. Empty key sets trust nothing.

    Held as raw 32-byte keys, by key id: the key objects are made when a signature is verified.
    """

    def __init__(self, keys: Iterable[Ed25519PublicKey] = ()) -> None:
        self._keys: dict[str, bytes] = {}
        for k in keys:
            self._add(_raw_public(k))

    def _add(self, raw: bytes) -> None:
        self._keys[_raw_key_id(raw)] = raw

    @classmethod
    def from_paths(cls, paths: Iterable[str | os.PathLike[str]]) -> KeySet:
        """Load keys from files and directories (a directory contributes every ``*.pub`` in it)."""
        key_set = cls()
        for path in paths:
            p = Path(path)
            if p.is_dir():
                found = sorted(p.glob("*.pub"))
                if not found:
                    raise SignatureError(f"{p}: key directory holds no *.pub file")
            elif p.exists():
                found = [p]
            else:
                raise SignatureError(f"{p}: no such key file or directory")
            for f in found:
                key_set._add(_parse_public_raw(_read_small(f, "public key"), str(f)))
        return key_set

    @classmethod
    def from_raw(cls, keys: Iterable[bytes]) -> KeySet:
        """The key set :meth:`raw` describes (how the agent hands its keys to its check process)."""
        key_set = cls()
        for raw in keys:
            if len(raw) != 32:
                raise SignatureError(f"raw Ed25519 public key has {len(raw)} bytes, not 32")
            key_set._add(raw)
        return key_set

    def raw(self) -> list[bytes]:
        """The trusted keys as raw 32-byte Ed25519 public keys."""
        return list(self._keys.values())

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, data: bytes, signature_file: bytes, where: str = "manifest.json.sig") -> str:
        """Return the id of the trusted key that signed ``data``; raise SignatureError otherwise."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if not self._keys:
            raise SignatureError(f"{where}: no trusted keys configured; cannot verify")
        if len(signature_file) > _MAX_SIG_FILE:
            raise SignatureError(f"{where}: signature file is larger than {_MAX_SIG_FILE} bytes")
        try:
            text = signature_file.decode("ascii")
        except UnicodeDecodeError as exc:
            raise SignatureError(f"{where}: signature file is not ASCII text") from exc
        lines = [ln.strip() for ln in text.splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        if not lines:
            raise SignatureError(f"{where}: signature file is empty")
        for n, line in enumerate(lines, 1):
            sig = _b64_exact(line, 64, f"{where} line {n}", "signature")
            for kid, raw in self._keys.items():
                try:
                    Ed25519PublicKey.from_public_bytes(raw).verify(sig, data)
                except InvalidSignature:
                    continue
                return kid
        raise SignatureError(
            f"{where}: no signature matches a trusted key (trusted: {', '.join(self.key_ids)}); "
            "the manifest was altered or signed by an untrusted key"
        )
