"""Every parser of outside data, fuzzed: it accepts the input or raises our own typed error.
Nothing else may escape (IndexError, KeyError, UnicodeDecodeError, RecursionError, struct.error,
MemoryError, OverflowError, ...). 1,000 examples each.

Inputs mix raw random bytes/text with near-valid documents whose fields are replaced by random
JSON or TOML values, so the parsers are driven past their first checks."""

from __future__ import annotations

import asyncio
import json
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locksmith import audit, budget, policystore
from locksmith import semaphore as sem
from locksmith.errors import LocksmithError
from locksmith.etcd import KeyValue
from locksmith.fleetlock.config import parse_settings
from locksmith.fleetlock.protocol import FleetLockError, parse_request
from locksmith.keys import Layout
from locksmith.policy import parse_policy_text, policy_from_json
from locksmith.windows import WindowSet, parse_duration, parse_windows
from updateagent import config as agentconfig
from updateagent import gpt
from updateagent.bootloader import read_boot_record
from updateagent.channel import parse_manifest
from updateagent.errors import UpdateAgentError
from updateagent.signature import KeySet, parse_public_key
from updateagent.state import AgentState, StateStore

OURS = (LocksmithError, UpdateAgentError, FleetLockError)
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
NOW = datetime(2027, 3, 28, 0, 30, tzinfo=UTC)


def ours(fn: Callable[[], object]) -> object:
    """Run ``fn``; our typed errors are an answer, anything else fails the test."""
    try:
        return fn()
    except OURS as exc:
        assert str(exc), "an error must say what is wrong"
        return exc


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """One directory for the file fuzzers (a new one per example would cost more than the parse)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as d:
        yield Path(d)


# -- strategies ------------------------------------------------------------------------------------

texts = st.text(st.characters(codec="utf-8"), max_size=40)
big_ints = st.one_of(st.integers(-10, 10_000), st.integers(), st.sampled_from([2**63, 2**64, 10**29, -(2**63) - 1]))
scalars = st.one_of(st.none(), st.booleans(), big_ints, st.floats(allow_nan=True), texts)
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(texts, kids, max_size=4),
                           max_leaves=12)


def deep(n: int, open_: str = "[", close: str = "]") -> str:
    return open_ * n + close * n


# Hypothesis raises the recursion limit while a test runs, so nesting that overflows the stack
# outside it (a few hundred levels) must be far deeper here.
DEPTH = 20_000
DEEP = deep(DEPTH)


nasty_text = st.one_of(
    texts,
    st.sampled_from(["０４:００", "١h", "²", "\ufeff", "\x00", "\ud7ff", "9" * 5000, DEEP,
                     deep(DEPTH, '{"a":', "}")]),
)
times = st.one_of(
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()),
    st.builds(lambda d, m: d.replace(tzinfo=timezone(timedelta(minutes=m))).isoformat(),
              st.sampled_from([datetime.min, datetime.max, datetime(2027, 1, 1)]), st.integers(-1439, 1439)),
    texts,
)


def near(valid: dict[str, Any], values: st.SearchStrategy[Any] = json_values) -> st.SearchStrategy[dict[str, Any]]:
    """``valid`` with some fields replaced, dropped or added."""
    keys = st.sampled_from(sorted(valid)) | texts
    return st.builds(
        lambda changes, dropped: {**{k: v for k, v in valid.items() if k not in dropped}, **changes},
        st.dictionaries(keys, values | times, max_size=3),
        st.sets(st.sampled_from(sorted(valid)), max_size=2),
    )


def as_bytes(docs: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    def enc(d: Any) -> bytes:
        try:
            return json.dumps(d).encode()
        except (ValueError, RecursionError):
            return b"{}"
    return st.one_of(docs.map(enc), st.binary(max_size=200), nasty_text.map(lambda t: t.encode("utf-8", "replace")))


# -- policies and windows --------------------------------------------------------------------------

WINDOW = {"days": ["Sat"], "start": "23:30", "length": "1h"}
windows_raw = st.lists(st.one_of(near(WINDOW, json_values | nasty_text),
                                 near({"cron": "30 23 * * 6,0", "length": "90m"}, json_values | nasty_text),
                                 json_values), max_size=4)
POLICY = {"format_version": 1, "group": "web", "slots": 2, "time_zone": "Europe/Berlin", "windows": [WINDOW],
          "strategy": "etcd-lock", "reboot_timeout": "1h", "on_timeout": "hold", "failure_budget": 1,
          "cooldown": "5m", "min_window_remaining": "10m", "paused": False}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return ("inf" if v > 0 else "-inf") if v in (float("inf"), float("-inf")) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return '""'


def to_toml(doc: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in doc.items() if v is not None)


latin1 = st.binary(max_size=300).map(lambda b: b.decode("latin-1"))
policy_texts = st.one_of(near(POLICY).map(to_toml), nasty_text, latin1,
                         st.builds(lambda d, w: to_toml({**d, "windows": w}), near(POLICY), windows_raw))


@FUZZ
@given(policy_texts)
def test_fuzz_policy_text(text: str) -> None:
    result = ours(lambda: parse_policy_text(text))
    if not isinstance(result, Exception):
        ours(lambda: result.window_set().is_open(NOW))  # type: ignore[attr-defined]


@FUZZ
@given(st.one_of(as_bytes(near(POLICY)),
                 as_bytes(st.builds(lambda d, w: {**d, "windows": w}, near(POLICY), windows_raw))))
def test_fuzz_stored_policy(value: bytes) -> None:
    ours(lambda: policy_from_json(value, key="p/groups/web/policy"))
    ours(lambda: policystore.parse_stored_policy(KeyValue("p/groups/web/policy", value, 1, 1, 1), "web"))


@FUZZ
@given(windows_raw,
       st.one_of(st.sampled_from(["UTC", "Europe/Berlin", "Australia/Lord_Howe", "localtime"]), json_values))
def test_fuzz_window_specs(raw: Any, tz: Any) -> None:
    ws = ours(lambda: parse_windows(raw, tz))
    if isinstance(ws, WindowSet):
        ours(lambda: (ws.is_open(NOW), ws.next_open(NOW), ws.current_window_end(NOW), ws.remaining(NOW)))
        assert ours(lambda: WindowSet.from_json(ws.to_json())) == ws
    ours(lambda: WindowSet.from_json({"time_zone": tz, "windows": raw}))


@FUZZ
@given(st.one_of(nasty_text, json_values))
def test_fuzz_durations(value: Any) -> None:
    ours(lambda: parse_duration(value))


# -- agent config and update.conf -----------------------------------------------------------------

SECTIONS = {
    "channel": ["server", "keys", "insecure", "allow_downgrade", "group", "deadline_seconds", "stall_bytes",
                "stall_seconds"],
    "check": ["interval_minutes", "jitter", "retry_initial_seconds", "max_backoff_hours", "on_start"],
    "health": ["check", "deadline_seconds", "retry_interval_seconds"],
    "host": ["kind", "boot_record", "machine_id_file", "os_release", "cmdline", "versions", "reboot_via"],
    "reboot": ["strategy", "windows", "time_zone", "pre_reboot_dir", "post_boot_dir", "hook_timeout_seconds",
               "max_session_wait_minutes", "reboot_required_file", "locksmithd_unit", "coordinator_conf"],
    "locksmith": ["endpoints", "cafile", "certfile", "keyfile", "username", "password", "group", "prefix",
                  "lease_ttl_seconds"],
    "fleetlock": ["url", "group"], "metrics": ["listen", "enabled"], "dbus": ["address"], "disk": ["path"],
    "state": ["dir"],
}
UC_KEYS = ["SERVER", "GROUP", "REBOOT_STRATEGY", "LOCKSMITHD_ENDPOINT", "LOCKSMITHD_ETCD_CAFILE",
           "LOCKSMITHD_GROUP", "LOCKSMITHD_REBOOT_WINDOW_START", "LOCKSMITHD_REBOOT_WINDOW_LENGTH",
           "REBOOT_WINDOW_START", "REBOOT_WINDOW_LENGTH", "LOCKSMITHD_ETCD_USERNAME"]
config_values = st.one_of(json_values, nasty_text, windows_raw, st.sampled_from(
    ["http://h/", "etcd-lock", "fleetlock", "emulated", "127.0.0.1:0", "[::1]:9", "Thu 04:00", "1h"]))
config_docs = st.dictionaries(
    st.sampled_from(sorted(SECTIONS)) | texts,
    st.one_of(st.dictionaries(st.sampled_from(sorted({k for v in SECTIONS.values() for k in v})) | texts,
                              config_values, max_size=5), json_values),
    max_size=5,
)
update_confs = st.dictionaries(st.sampled_from(UC_KEYS) | texts, nasty_text | st.sampled_from(["etcd-lock", "04:00"]),
                               max_size=5)


@FUZZ
@given(config_docs, update_confs)
def test_fuzz_agent_config(doc: dict[str, Any], uc: dict[str, str]) -> None:
    raw = agentconfig.RawConfig(doc, "<fuzz config>", uc, "<fuzz update.conf>")
    ours(lambda: agentconfig.validate(raw, env={}))


def update_conf_text(pairs: dict[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in pairs.items())


@FUZZ
@given(st.one_of(update_confs.map(update_conf_text), nasty_text, latin1),
       st.one_of(config_docs.map(lambda d: to_toml({k: v for k, v in d.items()})), nasty_text,
                 st.just("[a]\nb = " + DEEP)))
def test_fuzz_config_files(scratch: Path, uc_text: str, toml_text: str) -> None:
    cfg, uc = scratch / "config.toml", scratch / "update.conf"
    cfg.write_text(toml_text, encoding="utf-8")
    uc.write_text(uc_text, encoding="utf-8")
    ours(lambda: agentconfig.parse_update_conf(uc_text, "update.conf"))
    ours(lambda: agentconfig.load_settings(cfg, update_conf_paths=(uc,), env={}))


# -- channel manifests, signatures, keys -----------------------------------------------------------

MANIFEST = {"format_version": 1, "version": "3815.2.0", "payload": "usr.img.zst", "size": 1024,
            "compressed_size": 512, "sha256": "ab" * 32, "compression": "zstd", "released": "2026-11-01T00:00:00Z",
            "min_version": "3800.0.0", "deadend": "x"}


@FUZZ
@given(as_bytes(near(MANIFEST)))
def test_fuzz_manifest(data: bytes) -> None:
    ours(lambda: parse_manifest(data))


KEYS = KeySet([parse_public_key(b"11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=")])


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.lists(st.binary(min_size=60, max_size=70).map(
    lambda b: __import__("base64").b64encode(b)), max_size=3).map(b"\n".join), nasty_text.map(str.encode)))
def test_fuzz_signature_and_key_files(data: bytes) -> None:
    ours(lambda: KEYS.verify(b"manifest", data))
    ours(lambda: parse_public_key(data))


# -- agent state and boot record files -------------------------------------------------------------

STATE = {"format_version": 1, "status": "UPDATE_STATUS_IDLE", "current_version": "1.0", "last_checked_time": 5,
         "pending": {"version": "2.0", "slot": "B", "label": "USR-B", "partuuid": "x", "installed_at": 1.0},
         "deny_list": [{"version": "3", "reason": "r", "time": 1.0}], "history": [{"time": 1.0, "event": "e"}],
         "slot_versions": {"a": "1"}, "new_size": 3}


@FUZZ
@given(as_bytes(near(STATE)))
def test_fuzz_state_file(scratch: Path, data: bytes) -> None:
    path = scratch / "state" / "state.json"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    store = StateStore(path)
    ours(store.load)
    state = store.load_or_reset(1000.0)  # never raises: a bad file is moved aside
    assert isinstance(state, AgentState)
    for aside in path.parent.glob("state.json.corrupt-*"):
        assert aside.read_bytes() == data  # moved aside, never lost
        aside.unlink()
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        return
    ours(lambda: AgentState.from_json(parsed))


BOOT = {"format_version": 1, "boot_id": "b", "slot": "A", "partuuid": "p", "booted_at": 1.0}


@FUZZ
@given(as_bytes(near(BOOT)))
def test_fuzz_boot_record(scratch: Path, data: bytes) -> None:
    path = scratch / "boot.json"
    path.write_bytes(data)
    ours(lambda: read_boot_record(path))


# -- GPT from random bytes ------------------------------------------------------------------------

SECTOR = 512
_HDR = struct.Struct("<8sIIIIQQQQ16sQIII")


def _valid_gpt(sectors: int = 128, entries: int = 16) -> bytearray:
    """A small valid GPT: ``entries`` entries of 128 bytes, one partition, both copies."""
    img = bytearray(sectors * SECTOR)
    array = bytearray(entries * 128)
    struct.pack_into("<16s16sQQQ72s", array, 0, b"\x11" * 16, b"\x22" * 16, 40, 60, 1 << 48,
                     "USR-A".encode("utf-16-le"))
    asect = -(-len(array) // SECTOR)
    last_usable = sectors - 2 - asect
    for my, alt, entry_lba in ((1, sectors - 1, 2), (sectors - 1, 1, sectors - 1 - asect)):
        img[entry_lba * SECTOR:entry_lba * SECTOR + len(array)] = array
        _write_header(img, my, alt, 2 + asect, last_usable, entry_lba, entries, 128, zlib.crc32(array))
    return img


def _write_header(img: bytearray, my: int, alt: int, first: int, last: int, entry_lba: int, count: int,
                  esize: int, ecrc: int, hsize: int = 92) -> None:
    hdr = bytearray(_HDR.pack(b"EFI PART", 0x10000, hsize, 0, 0, my, alt, first, last, b"\x33" * 16,
                              entry_lba, count, esize, ecrc))
    hdr += bytes(max(0, hsize - len(hdr)))
    struct.pack_into("<I", hdr, 16, zlib.crc32(hdr[:hsize]))
    off = my * SECTOR
    if 0 <= off and off + min(len(hdr), SECTOR) <= len(img):
        img[off:off + min(len(hdr), SECTOR)] = hdr[:SECTOR]


header_fields = st.fixed_dictionaries({
    "my": st.sampled_from([1]) | st.integers(0, 2**64 - 1), "alt": st.integers(0, 200) | st.integers(0, 2**64 - 1),
    "first": st.integers(0, 200), "last": st.integers(0, 200) | st.integers(0, 2**64 - 1),
    "entry_lba": st.integers(0, 200) | st.integers(0, 2**64 - 1),
    "count": st.integers(0, 300) | st.integers(0, 2**32 - 1),
    "esize": st.sampled_from([128, 0, 8, 92, 256, 4096]) | st.integers(0, 2**32 - 1),
    "hsize": st.sampled_from([92, 0, 91, 512, 513]) | st.integers(0, 2**32 - 1),
})




@FUZZ
@given(st.one_of(
    st.binary(min_size=0, max_size=64 * SECTOR),
    st.tuples(header_fields, st.booleans(), st.binary(max_size=64), st.integers(0, 128 * SECTOR)),
))
def test_fuzz_gpt(scratch: Path, case: Any) -> None:
    if isinstance(case, bytes):
        img = bytearray(case)
    else:
        fields, fix_crc, junk, at = case
        img = _valid_gpt()
        ecrc = zlib.crc32(bytes(img[2 * SECTOR:2 * SECTOR + 16 * 128]))
        if fix_crc:  # random bytes inside the entry array, with its CRC kept right
            img[2 * SECTOR + at % (16 * 128):2 * SECTOR + at % (16 * 128) + len(junk)] = junk
            img = img[:128 * SECTOR]
            ecrc = zlib.crc32(bytes(img[2 * SECTOR:2 * SECTOR + 16 * 128]))
        f = fields
        _write_header(img, 1, f["alt"], f["first"], f["last"], f["entry_lba"], f["count"], f["esize"], ecrc,
                      hsize=min(f["hsize"], SECTOR))
    path = scratch / "disk.img"
    path.write_bytes(bytes(img))
    table = ours(lambda: gpt.read_gpt(path))
    if isinstance(table, gpt.GptTable):
        before = path.read_bytes()
        result = ours(lambda: gpt.repair_gpt(path))
        if isinstance(result, Exception):
            assert path.read_bytes() == before, "a refused repair must leave the disk as it was"


# -- FleetLock request bodies ----------------------------------------------------------------------

FL_BODY = {"client_params": {"id": "node-1", "group": "default"}}


@FUZZ
@given(st.one_of(st.none(), st.sampled_from(["true", "True ", "false", ""]), texts),
       st.one_of(as_bytes(near(FL_BODY)), as_bytes(st.builds(lambda p: {"client_params": p},
                                                            near(FL_BODY["client_params"], json_values | nasty_text)))))
def test_fuzz_fleetlock_request(header: str | None, body: bytes) -> None:
    ours(lambda: parse_request(header, body))


FL_SECTIONS = {
    "service": ["address", "port", "tls", "tls_cert_file", "tls_key_file", "client_ca_file", "token_file",
                "trust_forwarded_for", "base_path"],
    "status": ["enabled", "address", "port", "tls"],
    "etcd3": ["endpoints", "transaction_timeout_ms", "client_cert_pub_path", "client_cert_key_path", "ca_file",
              "username", "password_file", "prefix"],
    "lock": ["default_group_name", "default_slots", "groups"],
    "fleetlock": ["max_body_bytes", "request_timeout", "queue_ttl", "any_group"],
}
fl_configs = st.dictionaries(
    st.sampled_from(sorted(FL_SECTIONS)) | texts,
    st.dictionaries(st.sampled_from(sorted({k for v in FL_SECTIONS.values() for k in v})) | texts,
                    config_values | st.lists(st.fixed_dictionaries({"name": texts, "slots": big_ints}), max_size=2),
                    max_size=5) | json_values,
    max_size=4,
)


@FUZZ
@given(st.one_of(fl_configs.map(to_toml), nasty_text))
def test_fuzz_fleetlock_server_config(text: str) -> None:
    ours(lambda: parse_settings(text, source="fleetlock.toml"))


# -- the values at every etcd key we read ----------------------------------------------------------

LAYOUT = Layout("web", "fz/")
HOLDER = {"format_version": 1, "id": "node-1", "since": "2027-01-01T00:00:00+00:00",
          "deadline": "2027-01-01T01:00:00+00:00", "reason": "r", "by": "b", "nonce": "n"}
PAUSE = {"format_version": 1, "reason": "r", "by": "b", "at": "2027-01-01T00:00:00+00:00", "source": "operator"}
AUDIT = {"format_version": 1, "at": "2027-01-01T00:00:00+00:00", "by": "b", "action": "pause", "subject": "s",
         "reason": "r", "detail": {"x": 1}}
FAILURE = {"format_version": 1, "host": "node-1", "kind": "unhealthy", "detail": "d", "at": "2027-01-01T00:00:00+00:00",
           "by": "b"}
group_keys = st.one_of(
    st.just(LAYOUT.policy), st.just(LAYOUT.pause),
    st.sampled_from(["node-1", "node-2", "bad id", ""]).map(LAYOUT.holder),
    st.sampled_from(["node-1", "node-3", "-x"]).map(LAYOUT.waiter),
    st.sampled_from(["node-1/unhealthy/1", "x"]).map(lambda s: LAYOUT.failures + s),
    texts.map(lambda s: LAYOUT.base + s),
)
group_values = st.one_of(as_bytes(near(HOLDER)), as_bytes(near(PAUSE)),
                         as_bytes(near({k: v for k, v in POLICY.items() if k != "group"})), as_bytes(near(FAILURE)))


@FUZZ
@given(st.lists(st.tuples(group_keys, group_values), max_size=6))
def test_fuzz_group_keys(items: list[tuple[str, bytes]]) -> None:
    kvs = [KeyValue(k, v, i + 1, i + 1, 1) for i, (k, v) in enumerate(items)]
    view = sem._View(LAYOUT)
    ours(lambda: view.load(kvs, len(kvs) + 1))
    state = ours(view.state)
    if isinstance(state, sem.SemaphoreState):
        for h in state.holders:
            ours(lambda h=h: h.overdue(NOW))  # type: ignore[misc]
    for kv in kvs:
        ours(lambda kv=kv: policystore.parse_pause(kv))  # type: ignore[misc]
        ours(lambda kv=kv: policystore.parse_stored_policy(kv, "web"))  # type: ignore[misc]

    class Values:  # what list_failures reads, without a server round trip per example
        async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
            return [kv for kv in kvs if kv.key.startswith(prefix)], 1

    if any(kv.key.startswith(LAYOUT.failures) for kv in kvs):
        ours(lambda: asyncio.run(budget.list_failures(Values(), "web", prefix="fz/")))  # type: ignore[arg-type]


@FUZZ
@given(as_bytes(near(AUDIT)))
def test_fuzz_audit_entries(value: bytes) -> None:
    entry = ours(lambda: audit.parse_entry("web", LAYOUT.audit + "1-a", value))
    if isinstance(entry, audit.AuditEntry):
        json.dumps(entry.to_json(), default=str)
        ours(lambda: entry.at < NOW)


def test_fuzzers_run_1000_examples_each() -> None:
    fuzzers = [v for k, v in globals().items() if k.startswith("test_fuzz_")]
    assert len(fuzzers) >= 14
    for f in fuzzers:
        assert f.hypothesis.inner_test is not None  # type: ignore[attr-defined]
        assert f._hypothesis_internal_use_settings.max_examples >= 1000, f.__name__  # type: ignore[attr-defined]

