"""Manifest parsing, versions, the offer policy, and fetching over a real HTTP server."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from httpserver import FileServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from updateagent.channel import (
    MAX_MANIFEST_BYTES,
    ChannelRelease,
    Manifest,
    NoUpdate,
    Version,
    check,
    fetch,
    load_dir,
    manifest_url,
    parse_manifest,
)
from updateagent.errors import ChannelError, PolicyRefused, SignatureError
from updateagent.signature import KeySet, sign

GOOD: dict[str, Any] = {
    "format_version": 1,
    "version": "3815.2.0",
    "payload": "payload-3815.2.0.img.zst",
    "size": 1048576,
    "compressed_size": 4096,
    "sha256": "ab" * 32,
    "compression": "zstd",
    "released": "2026-11-27T03:00:00Z",
}


def _doc(**changes: Any) -> bytes:
    d = dict(GOOD)
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return json.dumps(d).encode()


# --------------------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("a", "b"),
    [("3815.2.0", "3815.10.0"), ("3815.2.0", "3816.0.0"), ("9", "10"), ("1.2.3", "1.2.3.1"), ("0.9", "1")],
)
def test_versions_compare_numerically(a: str, b: str) -> None:
    assert Version(a) < Version(b)
    assert Version(b) > Version(a)


def test_trailing_zero_components_are_equal() -> None:
    assert Version("3815.2") == Version("3815.2.0") == Version("3815.2.0.0")
    assert hash(Version("3815.2")) == hash(Version("3815.2.0"))
    assert str(Version("3815.2")) == "3815.2"


@pytest.mark.parametrize("bad", ["", "v1.2", "1..2", "1.2.", ".1", "1.2-rc1", "1.2+build", " 1.2", "1.2.x"])
def test_non_versions_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="is not a version"):
        Version(bad)


_versions = st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=5)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_versions, _versions)
def test_version_order_matches_padded_integer_tuples(a: list[int], b: list[int]) -> None:
    n = max(len(a), len(b))
    pa, pb = tuple(a + [0] * (n - len(a))), tuple(b + [0] * (n - len(b)))
    va, vb = Version(".".join(map(str, a))), Version(".".join(map(str, b)))
    assert (va < vb) == (pa < pb)
    assert (va == vb) == (pa == pb)


# --------------------------------------------------------------------------- parsing


def test_good_manifest_parses_and_round_trips() -> None:
    m = parse_manifest(_doc(min_version="3800.0.0", deadend="switch to stable-2"))
    assert m.version == Version("3815.2.0") and m.size == 1048576 and m.compressed_size == 4096
    assert m.released == datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
    assert m.min_version == Version("3800.0.0") and m.deadend == "switch to stable-2"
    assert parse_manifest(m.to_bytes()) == m
    assert m.payload_url("http://h/stable/manifest.json") == "http://h/stable/payload-3815.2.0.img.zst"
    assert parse_manifest(_doc(payload="https://cdn/x.zst")).payload_url("http://h/s/manifest.json") == \
        "https://cdn/x.zst"


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"sha256": None}, r"field 'sha256': missing"),
        ({"compressed_size": None}, r"field 'compressed_size': missing"),
        ({"bogus": 1}, r"field 'bogus': unknown field"),
        ({"format_version": 2}, r"field 'format_version': unsupported 2"),
        ({"format_version": "1"}, r"field 'format_version': expected an integer, got str"),
        ({"version": 3815}, r"field 'version': expected a string, got int"),
        ({"version": "3815.2.0-rc1"}, r"field 'version': '3815.2.0-rc1' is not a version"),
        ({"size": True}, r"field 'size': expected an integer, got bool"),
        ({"size": 1.5}, r"field 'size': expected an integer, got float"),
        ({"size": 0}, r"field 'size': must be positive"),
        ({"compressed_size": -1}, r"field 'compressed_size': must be positive"),
        ({"sha256": "AB" * 32}, r"field 'sha256': expected 64 lowercase hex digits"),
        ({"sha256": "ab" * 31}, r"field 'sha256': expected 64 lowercase hex digits"),
        ({"compression": "xz"}, r"field 'compression': unknown 'xz'"),
        ({"compression": "none"}, r"field 'compressed_size': 4096 != size 1048576 for compression 'none'"),
        ({"released": "yesterday"}, r"field 'released': not an RFC 3339 time"),
        ({"released": "2026-11-27T03:00:00"}, r"field 'released': .* has no timezone"),
        ({"payload": ""}, r"field 'payload': must not be empty"),
        ({"payload": "a b.zst"}, r"field 'payload': must not contain whitespace"),
        ({"payload": "file:///etc/shadow"}, r"field 'payload': URL scheme 'file' not allowed"),
        ({"min_version": None, "deadend": ""}, r"field 'deadend': must not be empty"),
        ({"deadend": None, "min_version": 3}, r"field 'min_version': expected a string"),
    ],
)
def test_malformed_fields_are_named(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ChannelError, match=match) as ei:
        parse_manifest(_doc(**changes), "stable/manifest.json")
    assert str(ei.value).startswith("stable/manifest.json: ")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"<!DOCTYPE html><html>502</html>", "HTML/XML page instead of the manifest JSON"),
        (b"  <html>", "HTML/XML page"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"a": ', "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_not_a_manifest(data: bytes, match: str) -> None:
    with pytest.raises(ChannelError, match=match):
        parse_manifest(data)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_parser_raises_only_channel_error(data: bytes) -> None:
    try:
        parse_manifest(data)
    except ChannelError:
        pass


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from([*GOOD, "min_version", "deadend", "x"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10),
                                 st.lists(st.integers(), max_size=2))))
def test_parser_on_arbitrary_json_objects(doc: dict[str, Any]) -> None:
    try:
        m = parse_manifest(json.dumps({**GOOD, **doc}).encode())
    except ChannelError as exc:
        assert "field '" in str(exc)
    else:
        assert isinstance(m, Manifest)


def test_manifest_url() -> None:
    assert manifest_url("https://updates.example/", "stable") == "https://updates.example/stable/manifest.json"
    with pytest.raises(ChannelError, match="not a single path component"):
        manifest_url("https://u", "a/b")


# --------------------------------------------------------------------------- policy


def _rel(**changes: Any) -> ChannelRelease:
    return ChannelRelease(parse_manifest(_doc(**changes)), "http://h/stable/manifest.json", "k")


def test_newer_version_is_offered() -> None:
    offer = check(_rel(), "3760.1.0")
    assert offer.version == Version("3815.2.0") and not offer.downgrade and offer.deadend is None
    assert offer.release.payload_url == "http://h/stable/payload-3815.2.0.img.zst"


def test_same_version_is_no_update_even_with_allow_downgrade() -> None:
    with pytest.raises(NoUpdate, match="already runs"):
        check(_rel(), "3815.2", allow_downgrade=True)


def test_downgrade_refused_unless_allowed() -> None:
    with pytest.raises(PolicyRefused, match=r"older than the running 3900.0.0: downgrade refused"):
        check(_rel(), "3900.0.0")
    offer = check(_rel(), "3900.0.0", allow_downgrade=True)
    assert offer.downgrade


def test_deny_list_wins_over_everything() -> None:
    with pytest.raises(PolicyRefused, match=r"3815\.2\.0 is on this node.s deny list"):
        check(_rel(), "1.0.0", deny=["3815.2"], allow_downgrade=True)


def test_min_version() -> None:
    with pytest.raises(PolicyRefused, match=r"requires at least 3800.0.0 .* this node runs 3700.0.0"):
        check(_rel(min_version="3800.0.0"), "3700.0.0")
    assert check(_rel(min_version="3800.0.0"), "3800.0.0").version == Version("3815.2.0")


def test_deadend_is_reported() -> None:
    offer = check(_rel(deadend="last 3815 release; move to channel beta"), "3700.0.0")
    assert offer.deadend == "last 3815 release; move to channel beta"


def test_bad_configured_version_is_a_policy_error() -> None:
    with pytest.raises(PolicyRefused, match="bad version in agent configuration"):
        check(_rel(), "current")


# --------------------------------------------------------------------------- fetching


@pytest.fixture
def served(tmp_path: Path):
    key = Ed25519PrivateKey.generate()
    chan = tmp_path / "stable"
    chan.mkdir()
    data = _doc()
    (chan / "manifest.json").write_bytes(data)
    (chan / "manifest.json.sig").write_bytes(sign(key, data))
    with FileServer(tmp_path) as srv:
        yield srv, KeySet([key.public_key()]), chan


def test_fetch_verifies_and_parses(served: tuple[FileServer, KeySet, Path]) -> None:
    srv, keys, _ = served
    rel = fetch(manifest_url(srv.base_url, "stable"), keys)
    assert rel.key_id == keys.key_ids[0] and rel.manifest.version == Version("3815.2.0")
    assert [r.path for r in srv.requests] == ["/stable/manifest.json", "/stable/manifest.json.sig"]


def test_unsigned_refused_by_default_and_accepted_loudly_when_insecure(
    served: tuple[FileServer, KeySet, Path],
) -> None:
    srv, keys, chan = served
    (chan / "manifest.json.sig").unlink()
    url = srv.url("stable/manifest.json")
    with pytest.raises(SignatureError, match="unsigned; refused"):
        fetch(url, keys)
    with structlog.testing.capture_logs() as logs:
        rel = fetch(url, None, insecure=True)
    assert rel.key_id is None
    assert any(e["event"] == "MANIFEST_SIGNATURE_NOT_CHECKED" and e["log_level"] == "warning" for e in logs)


def test_fetch_without_keys_refuses(served: tuple[FileServer, KeySet, Path]) -> None:
    srv, _, _ = served
    with pytest.raises(SignatureError, match="no key set configured"):
        fetch(srv.url("stable/manifest.json"), None)


def test_oversized_manifest_refused(served: tuple[FileServer, KeySet, Path]) -> None:
    srv, keys, chan = served
    (chan / "manifest.json").write_bytes(b" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(ChannelError, match=f"manifest is larger than {MAX_MANIFEST_BYTES} bytes"):
        fetch(srv.url("stable/manifest.json"), keys)


@pytest.mark.parametrize(
    ("path", "kind", "value", "match", "transient"),
    [
        ("/stable/manifest.json", "status", 500, r"HTTP 500 fetching the manifest", True),
        ("/stable/manifest.json", "status", 503, r"HTTP 503 fetching the manifest", True),
        ("/stable/manifest.json", "status", 429, r"HTTP 429 fetching the manifest", True),
        ("/stable/manifest.json", "status", 404, r"HTTP 404 fetching the manifest", False),
        ("/stable/manifest.json.sig", "status", 403, r"HTTP 403 fetching the signature", False),
        ("/stable/manifest.json.sig", "html", None, r"HTML page .* not the signature", False),
        ("/stable/manifest.json.sig", "redirect_loop", None, r"redirect loop", False),
        ("/stable/manifest.json", "content_length", 100000, r"body shorter than its Content-Length", True),
        ("/stable/manifest.json", "drop", None, r"connection broke mid-body", True),
    ],
)
def test_server_faults_on_manifest_and_signature(
    served: tuple[FileServer, KeySet, Path], path: str, kind: str, value: int | None, match: str, transient: bool
) -> None:
    srv, keys, _ = served
    srv.add_fault(path, kind, value=value, after=10)
    with pytest.raises(ChannelError, match=match) as caught:
        fetch(srv.url("stable/manifest.json"), keys)
    assert caught.value.transient is transient


def test_unreachable_server_is_transient() -> None:
    with pytest.raises(ChannelError, match="cannot connect") as caught:
        fetch("http://127.0.0.1:9/stable/manifest.json", None, timeout=(1.0, 1.0))
    assert caught.value.transient


def test_bad_signature_and_bad_manifest_are_not_transient(served: tuple[FileServer, KeySet, Path]) -> None:
    srv, keys, chan = served
    (chan / "manifest.json.sig").write_text("AAAA\n")
    with pytest.raises(SignatureError) as bad_sig:
        fetch(srv.url("stable/manifest.json"), keys)
    (chan / "manifest.json").write_bytes(b"{}")
    with pytest.raises(ChannelError, match="missing") as bad_doc:
        fetch(srv.url("stable/manifest.json"), None, insecure=True)
    assert not bad_sig.value.transient and not bad_doc.value.transient


def test_load_dir(served: tuple[FileServer, KeySet, Path]) -> None:
    _, keys, chan = served
    rel = load_dir(chan, keys)
    assert rel.payload_url == str(chan / "payload-3815.2.0.img.zst")
    (chan / "manifest.json.sig").unlink()
    with pytest.raises(SignatureError, match="missing; unsigned manifests are refused"):
        load_dir(chan, keys)
    with pytest.raises(ChannelError, match="cannot read"):
        load_dir(chan / "nope", keys)
