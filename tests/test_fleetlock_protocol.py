"""The FleetLock request parser and the server's config file: property tests and the error
messages people read."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from locksmith.fleetlock.config import ConfigError, parse_settings
from locksmith.fleetlock.protocol import KINDS, ClientParams, FleetLockError, parse_request

IDS = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:@-]{0,40}\Z")
GROUPS = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9.-]{0,30}\Z")
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                    max_leaves=20)


@given(IDS, GROUPS, st.sampled_from(["true", "True", " true ", "TRUE"]))
def test_valid_requests_parse(node_id: str, group: str, header: str) -> None:
    raw = json.dumps({"client_params": {"id": node_id, "group": group}}, indent=2).encode()
    assert parse_request(header, raw) == ClientParams(node_id, group)


@given(st.binary(max_size=300))
def test_any_bytes_give_params_or_a_protocol_error(raw: bytes) -> None:
    try:
        parse_request("true", raw)
    except FleetLockError as exc:
        assert exc.kind in KINDS and 400 <= exc.status < 500 and exc.value


@given(JSON)
def test_any_json_gives_params_or_a_protocol_error(doc: object) -> None:
    for shaped in (doc, {"client_params": doc}, {"client_params": {"id": doc, "group": "g"}},
                   {"client_params": {"id": "a", "group": doc}}):
        try:
            got = parse_request("true", json.dumps(shaped).encode())
        except FleetLockError as exc:
            assert exc.kind in ("bad_json", "bad_id", "bad_group")
        else:
            assert got.id and got.group


@pytest.mark.parametrize(("header", "raw", "kind", "words"), [
    (None, b"{}", "bad_header", "missing header"),
    ("1", b"{}", "bad_header", "must be 'true'"),
    ("true", b"", "bad_json", "not JSON"),
    ("true", b"\xff\xfe", "bad_json", "not UTF-8"),
    ("true", b"[1]", "bad_json", "must be a JSON object, got an array"),
    ("true", b"{}", "bad_json", "no 'client_params'"),
    ("true", b'{"client_params": []}', "bad_json", "must be an object"),
    ("true", b'{"client_params": {"group": "g"}}', "bad_id", "id is missing"),
    ("true", b'{"client_params": {"id": 5, "group": "g"}}', "bad_id", "must be a string, got a number"),
    ("true", b'{"client_params": {"id": "a b", "group": "g"}}', "bad_id", "is invalid"),
    ("true", b'{"client_params": {"id": "a", "group": ""}}', "bad_group", "group is empty"),
    ("true", b'{"client_params": {"id": "a", "group": "a_b"}}', "bad_group", "does not match"),
    ("true", b'{"client_params": {"id": "a", "group": ".a"}}', "bad_group", "not a group name this server keeps"),
    ("true", b"[" * 100_000, "bad_json", "not JSON"),
])
def test_error_messages(header: str | None, raw: bytes, kind: str, words: str) -> None:
    with pytest.raises(FleetLockError) as err:
        parse_request(header, raw)
    assert err.value.kind == kind and words in err.value.value


AIRLOCK_EXAMPLE = """
# Status service configuration
[status]
enabled = true
address = "127.0.0.1"
port = 2222
tls = false

# Main service configuration
[service]
address = "127.0.0.1"
port = 3333
tls = false

# Etcd-v3 client configuration
[etcd3]
endpoints = [ "http://127.0.0.1:2379" ]

# Lock configuration, base reboot group
[lock]
default_group_name = "default"
default_slots = 2

# Lock configuration, additional reboot groups

[[lock.groups]]
name = "workers"

[[lock.groups]]
name = "controllers"
slots = 1
"""


def test_airlocks_example_config_reads_as_airlock_reads_it() -> None:
    s = parse_settings(AIRLOCK_EXAMPLE, source="config.toml")
    assert (s.address, s.port, s.tls) == ("127.0.0.1", 3333, False)
    assert (s.status_enabled, s.status_address, s.status_port) == (True, "127.0.0.1", 2222)
    assert s.etcd.endpoints == ("http://127.0.0.1:2379",) and s.etcd_from_file
    assert s.etcd.timeout == 3.0  # airlock's default transaction_timeout_ms
    # a group without slots takes default_slots, as in airlock's mergeLock
    assert s.groups == {"default": 2, "workers": 2, "controllers": 1}


def test_defaults_without_a_file_section() -> None:
    s = parse_settings("")
    assert (s.address, s.port, s.groups, s.any_group) == ("0.0.0.0", 9090, {}, False)


@pytest.mark.parametrize(("text", "where", "words"), [
    ("[servce]\n", "servce", "unknown section"),
    ("[service]\nprot = 1\n", "service.prot", "unknown key"),
    ("[service]\nport = 70000\n", "service.port", "between 0 and 65535"),
    ("[service]\nport = \"80\"\n", "service.port", "must be an integer, got a string"),
    ("[service]\ntls = true\n", "service.tls", "needs tls_cert_file"),
    ("[service]\nclient_ca_file = \"/ca\"\n", "service.client_ca_file", "need tls = true"),
    ("[etcd3]\nendpoints = [\"ftp://x:1\"]\n", "etcd3.endpoints", "not http(s)://host:port"),
    ("[etcd3]\nendpoints = \"http://x:1\"\n", "etcd3.endpoints", "list of strings"),
    ("[etcd3]\nclient_cert_pub_path = \"/c\"\n", "etcd3.client_cert_pub_path", "go together"),
    ("[fleetlock]\nqueue_ttl = \"15\"\n", "fleetlock.queue_ttl", "missing unit"),
    ("[fleetlock]\nrequest_timeout = \"0s\"\n", "fleetlock.request_timeout", "at least 1s"),
    ("[lock]\ndefault_slots = 0\n", "lock", "0 slots"),
    ("[lock]\ndefault_group_name = \"a_b\"\n", "lock.default_group_name", "does not match"),
    ("[[lock.groups]]\nslots = 1\n", "lock.groups[0].name", "required"),
    ("[[lock.groups]]\nname = \"x\"\nsize = 1\n", "lock.groups[0].size", "unknown key"),
    ("[service\n", "", "TOML syntax error"),
    ("[service]\nbase_path = \"fleet lock\"\n", "service.base_path", "not a URL path"),
])
def test_config_errors_name_file_key_and_problem(text: str, where: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings(text, source="/etc/fleetlock.toml")
    assert err.value.where == where and words in err.value.problem
    assert str(err.value).startswith("/etc/fleetlock.toml: ")
