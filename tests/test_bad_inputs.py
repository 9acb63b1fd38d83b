"""What the product refuses: every named bad input, in one place.

Each case states where the input enters (``surface``), the input, the message the refusal must
contain, and what must be unchanged afterwards; the test checks all three through the product's
own interfaces (locksmithctl in-process, the agent's config loader, the channel reader, the GPT
code, the FleetLock server over HTTP). "Unchanged" is checked, not assumed:

* etcd: every key under the test's prefix, with its value and mod_revision, is the same after;
* file: the bytes (or the special file) given as input are the same after;
* gpt: the first and last MiB of the disk image (both GPT copies) are the same after.

Cases from earlier issues (policy validation, the agent's config and state files, manifests and
signatures, GPT damage, FleetLock requests, corrupt etcd values) are here as well as issue 11's.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetlockrig import HEADERS, call, running
from gptimg import MiB, corrupt, make_disk

from locksmith.cli import main
from locksmith.errors import LocksmithError
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.keys import Layout
from updateagent import gpt
from updateagent.bootloader import read_boot_record
from updateagent.channel import load_dir
from updateagent.config import load_settings
from updateagent.errors import UpdateAgentError
from updateagent.signature import KeySet, encode_public_key, sign
from updateagent.state import StateStore

# Special inputs where a file is expected.
DEV_ZERO, FIFO, DIRECTORY, MISSING, HUGE = "<symlink to /dev/zero>", "<FIFO>", "<directory>", "<missing>", "<2 MiB>"
SPECIAL = (DEV_ZERO, FIFO, DIRECTORY, MISSING, HUGE)


@dataclass(frozen=True)
class Case:
    id: str
    surface: str  # policy | ctl | etcd | agent | channel | key | state | boot | gpt | fleetlock
    input: Any
    message: str  # the refusal contains this
    unchanged: str  # "etcd", "file" or "gpt" (see the module docstring)
    code: int = 1  # exit code, for locksmithctl surfaces
    extra: dict[str, Any] = field(default_factory=dict)


HEAD = 'format_version = 1\ngroup = "web"\n'
W = "[[windows]]\n"


def deep(n: int) -> str:
    return "[" * n + "]" * n


def windows(n: int) -> str:
    return "".join(f'{W}start = "{(i // 60) % 24:02d}:{i % 60:02d}"\nlength = "1h"\n' for i in range(n))


CASES: list[Case] = [
    # -- policy files: `locksmithctl policy apply FILE` (the group's stored policy stays as it was)
    Case("policy-slots-zero", "policy", HEAD + "slots = 0\n", "slots: must be at least 1, got 0", "etcd"),
    Case("policy-slots-1e29", "policy", HEAD + "slots = 100000000000000000000000000000\n",
         "slots: must be at most 10000, got 100000000000000000000000000000", "etcd"),
    Case("policy-slots-2^63", "policy", HEAD + "slots = 9223372036854775807\n",
         "slots: must be at most 10000, got 9223372036854775807", "etcd"),
    Case("policy-slots-string", "policy", HEAD + 'slots = "2"\n', 'slots: must be an integer, got string "2"', "etcd"),
    Case("policy-slots-float", "policy", HEAD + "slots = 2.0\n", "slots: must be an integer, got float 2.0", "etcd"),
    Case("policy-integer-5000-digits", "policy", HEAD + "slots = " + "9" * 5000 + "\n",
         "Exceeds the limit (4300 digits)", "etcd"),
    Case("policy-unknown-key", "policy", HEAD + "slot = 2\n", "unknown key 'slot' (did you mean 'slots'?)", "etcd"),
    Case("policy-zincati-key", "policy", HEAD + "start_time = \"04:00\"\n",
         "Zincati's start_time is written start = \"HH:MM\" here", "etcd"),
    Case("policy-missing-format-version", "policy", 'group = "web"\n',
         "format_version: required key is missing (add format_version = 1)", "etcd"),
    Case("policy-format-version-2", "policy", 'format_version = 2\ngroup = "web"\n',
         "unsupported format version 2", "etcd"),
    Case("policy-bad-group-name", "policy", 'format_version = 1\ngroup = "web/prod"\n',
         "invalid group name 'web/prod'", "etcd"),
    Case("policy-unknown-time-zone", "policy", HEAD + 'time_zone = "Mars/Olympus_Mons"\n',
         "unknown time zone 'Mars/Olympus_Mons'", "etcd"),
    Case("policy-time-zone-path-escape", "policy", HEAD + 'time_zone = "../../etc/passwd"\n',
         "unknown time zone '../../etc/passwd'", "etcd"),
    Case("policy-strategy-best-effort", "policy", HEAD + 'strategy = "best-effort"\n',
         "best-effort is gone: use etcd-lock", "etcd"),
    Case("policy-on-timeout-unknown", "policy", HEAD + 'on_timeout = "panic"\n',
         "on_timeout: must be one of 'hold', 'release', got 'panic'", "etcd"),
    Case("policy-reboot-timeout-zero", "policy", HEAD + 'reboot_timeout = "0s"\n',
         "reboot_timeout: must be more than zero", "etcd"),
    Case("policy-duration-without-unit", "policy", HEAD + 'cooldown = "30"\n', "missing unit", "etcd"),
    Case("policy-duration-negative", "policy", HEAD + 'cooldown = "-5m"\n', "negative durations are not allowed",
         "etcd"),
    Case("policy-duration-fullwidth-digit", "policy", HEAD + 'cooldown = "１h"\n', "invalid duration '１h'", "etcd"),
    Case("policy-failure-budget-negative", "policy", HEAD + "failure_budget = -1\n",
         "failure_budget: must be at least 0, got -1", "etcd"),
    Case("policy-failure-budget-2^64", "policy", HEAD + "failure_budget = 18446744073709551616\n",
         "failure_budget: must be at most 10000", "etcd"),
    Case("policy-101-windows", "policy", HEAD + windows(101), "windows: has 101 entries; at most 100 are allowed",
         "etcd"),
    Case("policy-10000-windows", "policy", HEAD + "windows = [" + '{start = "04:00", length = "1h"}, ' * 10000 + "]\n",
         "windows: has 10000 entries", "etcd"),
    Case("policy-too-many-starts-a-week", "policy",
         HEAD + "".join(f'{W}cron = "{i},{i + 30} * * * *"\nlength = "{i + 1}h"\n' for i in range(11)),
         "the windows start 3696 times a week (at most 1000)", "etcd"),
    Case("window-start-25h", "policy", HEAD + W + 'start = "25:00"\nlength = "1h"\n',
         "hours run 00-23 and minutes 00-59", "etcd"),
    Case("window-start-fullwidth-digits", "policy", HEAD + W + 'start = "０４:００"\nlength = "1h"\n',
         "invalid start time '０４:００'", "etcd"),
    Case("window-length-arabic-indic-digit", "policy", HEAD + W + 'start = "04:00"\nlength = "١h"\n',
         "invalid duration '١h'", "etcd"),
    Case("window-length-zero", "policy", HEAD + W + 'start = "04:00"\nlength = "0s"\n',
         "window length must be positive", "etcd"),
    Case("window-length-over-a-week", "policy", HEAD + W + 'start = "04:00"\nlength = "169h"\n',
         "is longer than 7 days (168h)", "etcd"),
    Case("window-unknown-day", "policy", HEAD + W + 'days = ["Funday"]\nstart = "04:00"\nlength = "1h"\n',
         "unknown day 'Funday'", "etcd"),
    Case("window-days-empty", "policy", HEAD + W + 'days = []\nstart = "04:00"\nlength = "1h"\n',
         "must not be empty", "etcd"),
    Case("window-missing-length", "policy", HEAD + W + 'start = "04:00"\n', "missing 'length'", "etcd"),
    Case("window-cron-six-fields", "policy", HEAD + W + 'cron = "0 0 4 * * *"\nlength = "1h"\n',
         "expected 5 fields", "etcd"),
    Case("window-cron-macro", "policy", HEAD + W + 'cron = "@daily"\nlength = "1h"\n',
         "cron macros like '@daily' are not supported", "etcd"),
    Case("window-cron-every-5-minutes", "policy", HEAD + W + 'cron = "*/5 * * * *"\nlength = "1h"\n',
         "starts a window 288 times a day (at most 48)", "etcd"),
    Case("window-cron-never-matches", "policy", HEAD + W + 'cron = "0 0 31 2 *"\nlength = "1h"\n',
         "never matches a date", "etcd"),
    Case("window-cron-non-ascii-step", "policy", HEAD + W + 'cron = "0 */٥ * * *"\nlength = "1h"\n',
         "hour field: cannot parse", "etcd"),
    Case("window-cron-and-start", "policy", HEAD + W + 'cron = "0 4 * * *"\nstart = "04:00"\nlength = "1h"\n',
         "'cron' and 'start' cannot be combined", "etcd"),
    Case("policy-min-window-remaining-too-long", "policy",
         HEAD + 'min_window_remaining = "2h"\n' + W + 'start = "04:00"\nlength = "1h"\n',
         "is not shorter than the longest window", "etcd"),
    Case("policy-paused-reason-without-paused", "policy", HEAD + 'paused_reason = "x"\n',
         "paused_reason: is only allowed with paused = true", "etcd"),
    Case("policy-duplicate-key", "policy", HEAD + "slots = 1\nslots = 2\n",
         "duplicate key (a key may be set only once)", "etcd"),
    Case("policy-nested-500-deep", "policy", HEAD + "x = " + deep(500) + "\n",
         "arrays or tables nested too deeply", "etcd"),
    Case("policy-not-utf8", "policy", b'format_version = 1\ngroup = "caf\xe9"\n', "not UTF-8 text", "etcd"),
    Case("policy-empty-file", "policy", "", "format_version: required key is missing", "etcd"),
    Case("policy-symlink-to-dev-zero", "policy", DEV_ZERO,
         "cannot read: policy file is not a regular file (a character device)", "etcd"),
    Case("policy-fifo", "policy", FIFO, "cannot read: policy file is not a regular file (a FIFO)", "etcd"),
    Case("policy-directory", "policy", DIRECTORY, "p.toml' is a directory", "etcd", code=2),
    Case("policy-missing-file", "policy", MISSING, "cannot read: policy file not found", "etcd"),
    Case("policy-over-1-MiB", "policy", HUGE, "policy file is too large", "etcd"),

    # -- locksmithctl arguments
    Case("ctl-bad-group", "ctl", ["--group", "web/prod", "status"], "group 'web/prod' is invalid", "etcd", code=2),
    Case("ctl-set-max-zero", "ctl", ["set-max", "0"], "0 is not in the range 1<=x<=10000", "etcd", code=2),
    Case("ctl-set-max-1e29", "ctl", ["set-max", "100000000000000000000000000000"],
         "100000000000000000000000000000 is not in the range 1<=x<=10000", "etcd", code=2),
    Case("ctl-lock-bad-id", "ctl", ["lock", "bad id"], "id 'bad id' is invalid", "etcd", code=2),
    Case("ctl-endpoint-bad-scheme", "ctl", ["--endpoint", "ftp://h:1", "status"],
         "endpoint 'ftp://h:1' is not http(s)://host:port", "etcd", code=2),
    Case("ctl-endpoint-port-not-a-number", "ctl", ["--endpoint", "h:port", "status"],
         "endpoint 'h:port' is not http(s)://host:port", "etcd", code=2),
    Case("ctl-endpoint-broken-ipv6", "ctl", ["--endpoint", "http://[::1:2379", "status"],
         "is not http(s)://host:port", "etcd", code=2),
    Case("ctl-log-since-garbage", "ctl", ["log", "--since", "yesterday-ish"], "yesterday-ish", "etcd", code=2),
    Case("ctl-cafile-dev-zero", "ctl", ["--etcd-cafile", DEV_ZERO, "status"],
         "TLS CA file is not a regular file (a character device)", "etcd"),
    Case("ctl-cafile-fifo", "ctl", ["--etcd-cafile", FIFO, "status"], "TLS CA file is not a regular file (a FIFO)",
         "etcd"),
    Case("ctl-certfile-without-keyfile", "ctl", ["--etcd-cafile", DEV_ZERO, "--etcd-certfile", "x.crt", "status"],
         "cannot read TLS file", "etcd"),
    Case("ctl-validate-missing-file", "ctl", ["policy", "validate", MISSING], "policy file not found", "etcd"),

    # -- values stored in etcd, as readers and writers meet them (nothing is written over them)
    Case("etcd-policy-not-json", "etcd", ("policy", b"{not json", ["policy", "get", "web"]),
         "/groups/web/policy' is invalid: not JSON", "etcd"),
    Case("etcd-policy-nested-deep", "etcd", ("policy", b'{"format_version":1,"windows":' + deep(100).encode() + b"}",
                                             ["policy", "get", "web"]), "nested more than 16 levels deep", "etcd"),
    Case("etcd-policy-slots-1e29", "etcd", ("policy", b'{"format_version":1,"slots":100000000000000000000000000000}',
                                            ["policy", "get", "web"]), "slots: must be at most 10000", "etcd"),
    Case("etcd-policy-5000-digits", "etcd", ("policy", b'{"format_version":1,"slots":' + b"9" * 5000 + b"}",
                                             ["policy", "get", "web"]), "not JSON: Exceeds the limit", "etcd"),
    Case("etcd-policy-format-version-2", "etcd", ("policy", b'{"format_version":2}', ["policy", "get", "web"]),
         "unsupported format version 2", "etcd"),
    Case("etcd-policy-other-group", "etcd", ("policy", b'{"format_version":1,"group":"db"}', ["policy", "get", "web"]),
         "is 'db', but the value is stored under group 'web'", "etcd"),
    Case("etcd-policy-not-json-blocks-lock", "etcd", ("policy", b"\xff\xfe", ["lock", "node-9"]),
         "/groups/web/policy' is invalid: not JSON", "etcd"),
    Case("etcd-holder-garbage", "etcd", ("holders/node-1", b"garbage", ["lock", "node-2"]),
         "/groups/web/holders/node-1' is invalid: not JSON", "etcd"),
    Case("etcd-holder-id-mismatch", "etcd", (
        "holders/node-1", b'{"format_version":1,"id":"node-7","since":"2027-01-01T00:00:00+00:00"}', ["status"]),
         "field 'id' is 'node-7', expected 'node-1'", "etcd"),
    Case("etcd-holder-since-without-zone", "etcd", (
        "holders/node-1", b'{"format_version":1,"id":"node-1","since":"2027-01-01T00:00:00"}', ["status"]),
         "field 'since' has no time zone", "etcd"),
    Case("etcd-holder-no-format-version", "etcd", ("holders/node-1", b'{"id":"node-1"}', ["unlock", "node-1"]),
         "no format_version", "etcd"),
    Case("etcd-waiter-garbage", "etcd", ("queue/node-2", b"[]", ["status"]), "expected a JSON object", "etcd"),
    Case("etcd-holder-key-not-an-id", "etcd", ("holders/bad id", b"{}", ["status"]), "key name is not a valid id",
         "etcd"),
    Case("etcd-pause-garbage", "etcd", ("pause", b"nope", ["status"]), "/groups/web/pause' is invalid: not JSON",
         "etcd"),

    # -- the agent's config and update.conf (the files are left as they are)
    Case("agent-unknown-section", "agent", ("[nope]\n", ""), "unknown key 'nope'", "file"),
    Case("agent-server-not-http", "agent", ('[channel]\nserver = "ftp://x"\nkeys = ["/k"]\n', ""),
         "expected an http(s):// URL", "file"),
    Case("agent-server-without-keys", "agent", ('[channel]\nserver = "http://x"\n', ""),
         "no signing keys configured", "file"),
    Case("agent-reboot-strategy-unknown", "agent", ("", "REBOOT_STRATEGY=sometimes\n"),
         "REBOOT_STRATEGY", "file"),
    Case("agent-update-conf-not-key-value", "agent", ("", "JUST A LINE\n"), "expected KEY=value", "file"),
    Case("agent-update-conf-open-quote", "agent", ("", 'SERVER="http://x\n'), "No closing quotation", "file"),
    Case("agent-toml-syntax", "agent", ("a = = 1\n", ""), "invalid TOML", "file"),
    Case("agent-toml-nested-600-deep", "agent", ("a = " + deep(600) + "\n", ""),
         "invalid TOML: arrays or tables nested too deeply", "file"),
    Case("agent-interval-1e30", "agent", ("[check]\ninterval_minutes = 1e30\n", ""), "interval_minutes", "file"),
    Case("agent-metrics-listen-without-port", "agent", ('[metrics]\nlisten = "0.0.0.0"\n', ""),
         "expected host:port", "file"),
    Case("agent-etcd-endpoint-port-not-a-number", "agent", ("", "LOCKSMITHD_ENDPOINT=0:A\n"),
         "is not http(s)://host:port", "file"),
    Case("agent-emulated-host-without-boot-record", "agent", ('[host]\nkind = "emulated"\n', ""),
         "required when host.kind = 'emulated'", "file"),
    Case("agent-config-dev-zero", "agent", (DEV_ZERO, ""), "config file is not a regular file (a character device)",
         "file"),
    Case("agent-update-conf-fifo", "agent", ("", FIFO), "update.conf is not a regular file (a FIFO)", "file"),
    Case("agent-config-missing", "agent", (MISSING, ""), "config file not found", "file"),
    Case("agent-cafile-with-nul-byte", "agent",
         ('[reboot]\nstrategy = "etcd-lock"\n[locksmith]\ncafile = "a\\u0000b"\n', ""),
         "the path contains a NUL byte", "file"),

    # -- channel directory: manifest.json and its signature (verified with the trusted key)
    Case("manifest-unknown-field", "channel", ({"color": "blue"}, "signed"), "field 'color': unknown field", "file"),
    Case("manifest-sha256-uppercase", "channel", ({"sha256": "AB" * 32}, "signed"), "expected 64 lowercase hex digits",
         "file"),
    Case("manifest-version-with-letters", "channel", ({"version": "1.2.3-rc1"}, "signed"), "is not a version",
         "file"),
    Case("manifest-size-zero", "channel", ({"size": 0, "compressed_size": 0}, "signed"), "must be positive", "file"),
    Case("manifest-payload-file-url", "channel", ({"payload": "file:///etc/shadow"}, "signed"),
         "URL scheme 'file' not allowed", "file"),
    Case("manifest-released-without-zone", "channel", ({"released": "2026-11-01T00:00:00"}, "signed"),
         "has no timezone", "file"),
    Case("manifest-html-page", "channel", (b"<html>login</html>", "signed"), "HTML/XML page", "file"),
    Case("manifest-nested-deep", "channel", (deep(5000).encode(), "signed"), "nested too deeply", "file"),
    Case("manifest-5000-digits", "channel", (b'{"size": ' + b"9" * 5000 + b"}", "signed"),
         "not valid JSON: Exceeds the limit", "file"),
    Case("manifest-fifo", "channel", (FIFO, "signed"), "cannot read: manifest is not a regular file (a FIFO)", "file"),
    Case("signature-missing", "channel", ({}, MISSING), "unsigned manifests are refused", "file"),
    Case("signature-wrong-key", "channel", ({}, "other-key"), "no signature matches a trusted key", "file"),
    Case("signature-not-ascii", "channel", ({}, b"\xff\xfe"), "signature file is not ASCII text", "file"),
    Case("signature-bad-base64", "channel", ({}, b"!!!!\n"), "signature is not valid base64", "file"),
    Case("signature-dev-zero", "channel", ({}, DEV_ZERO), "signature is not a regular file (a character device)",
         "file"),

    # -- trusted public key files
    Case("key-wrong-length", "key", b"AAAA\n", "public key decodes to 3 bytes, expected 32", "file"),
    Case("key-not-base64", "key", b"not a key\n", "public key is not valid base64", "file"),
    Case("key-rsa-pem", "key", "rsa", "not Ed25519", "file"),
    Case("key-dev-zero", "key", DEV_ZERO, "public key file is not a regular file (a character device)", "file"),
    Case("key-fifo", "key", FIFO, "public key file is not a regular file (a FIFO)", "file"),
    Case("key-too-large", "key", b"A" * 20000, "public key file is too large", "file"),

    # -- the agent's state file and the emulated boot record
    Case("state-not-json", "state", b"{", "invalid JSON", "file"),
    Case("state-format-version-2", "state", b'{"format_version": 2}', "unsupported format_version 2", "file"),
    Case("state-pending-version-not-string", "state",
         b'{"format_version": 1, "pending": {"version": 3, "slot": "B", "label": "", "partuuid": "", '
         b'"installed_at": 0}}', "field 'version': expected a string", "file"),
    Case("state-nested-deep", "state", deep(5000).encode(), "invalid JSON", "file"),
    Case("state-dev-zero", "state", DEV_ZERO, "state file is not a regular file (a character device)", "file"),
    Case("boot-record-not-json", "boot", b"nope", "boot record is not valid JSON", "file"),
    Case("boot-record-fifo", "boot", FIFO, "boot record is not a regular file (a FIFO)", "file"),
    Case("boot-record-5000-digits", "boot", b'{"format_version": ' + b"9" * 5000 + b"}", "not valid JSON", "file"),

    # -- GPT disks (both copies of the table stay as they were)
    Case("gpt-both-headers-corrupt", "gpt", "headers", "no valid GPT", "gpt"),
    Case("gpt-both-entry-arrays-corrupt", "gpt", "entries", "entry array CRC mismatch", "gpt"),
    Case("gpt-no-such-partition", "gpt", "partition-9", "no partition 9 in the GPT", "gpt"),
    Case("gpt-attributes-over-64-bits", "gpt", "overflow", "do not fit in 64 bits", "gpt"),
    Case("gpt-image-too-small", "gpt", "small", "too small to hold a GPT", "gpt"),
    Case("gpt-fifo", "gpt", FIFO, "not a regular file or block device", "gpt"),

    # -- FleetLock requests over HTTP (etcd unchanged)
    Case("fleetlock-missing-header", "fleetlock", ({}, b'{"client_params": {"id": "a", "group": "web"}}'),
         "bad_header", "etcd"),
    Case("fleetlock-body-not-json", "fleetlock", (HEADERS, b'{"client_params": '), "bad_json", "etcd"),
    Case("fleetlock-body-5000-digits", "fleetlock", (HEADERS, b"9" * 3000), "bad_json", "etcd"),
    Case("fleetlock-bad-id", "fleetlock", (HEADERS, b'{"client_params": {"id": "a b", "group": "web"}}'), "bad_id",
         "etcd"),
    Case("fleetlock-bad-group", "fleetlock", (HEADERS, b'{"client_params": {"id": "a", "group": "we_b!"}}'),
         "bad_group", "etcd"),
    Case("fleetlock-nested-deep", "fleetlock", (HEADERS, deep(1500).encode()), "bad_json", "etcd"),
]


# -- materialising inputs -------------------------------------------------------------------------------


def materialise(path: Path, content: Any) -> Path:
    """Put ``content`` at ``path``: bytes/str as a file, or one of the special files."""
    if content == DEV_ZERO:
        path.symlink_to("/dev/zero")
    elif content == FIFO:
        os.mkfifo(path)
    elif content == DIRECTORY:
        path.mkdir()
    elif content == MISSING:
        pass
    elif content == HUGE:
        path.write_bytes(b"#" * (2 * MiB))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def file_state(*paths: Path) -> list[object]:
    """What a file is, without reading a special one."""
    out: list[object] = []
    for p in paths:
        if p.is_symlink():
            out.append(("link", os.readlink(p)))
        elif not p.exists():
            out.append("absent")
        elif p.is_fifo():
            out.append("fifo")
        elif p.is_dir():
            out.append(("dir", sorted(x.name for x in p.iterdir())))
        else:
            out.append(p.read_bytes())
    return out


async def etcd_state(cfg: EtcdConfig, prefix: str) -> list[tuple[str, bytes, int]]:
    async with await Etcd.connect(cfg) as etcd:
        kvs, _ = await etcd.get_prefix(prefix)
    return [(kv.key, kv.value, kv.mod_revision) for kv in kvs]


def ctl(cfg: EtcdConfig, prefix: str, args: list[str]) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["--endpoint", cfg.endpoints[0], "--prefix", prefix, "--group", "web", *args],
                           catch_exceptions=False)
    return r.exit_code, r.stdout + r.stderr


GOOD_POLICY = HEAD + "slots = 2\n" + W + 'start = "04:00"\nlength = "2h"\n'


# -- runners: each returns (what the product said, state before, state after) ----------------------------

Result = tuple[str, object, object]


def run_policy(case: Case, tmp: Path, cfg: EtcdConfig, prefix: str) -> Result:
    good = materialise(tmp / "good.toml", GOOD_POLICY)
    assert ctl(cfg, prefix, ["policy", "apply", str(good)])[0] == 0
    before = asyncio.run(etcd_state(cfg, prefix))
    path = materialise(tmp / "p.toml", case.input)
    code, out = ctl(cfg, prefix, ["policy", "apply", str(path)])
    assert code == case.code, out
    return out, before, asyncio.run(etcd_state(cfg, prefix))


def _args(case: Case, tmp: Path) -> list[str]:
    return [str(materialise(tmp / f"arg{i}", a)) if a in SPECIAL else a for i, a in enumerate(case.input)]


def run_ctl(case: Case, tmp: Path, cfg: EtcdConfig, prefix: str) -> Result:
    assert ctl(cfg, prefix, ["lock", "node-1"])[0] == 0  # something that must survive
    before = asyncio.run(etcd_state(cfg, prefix))
    args = _args(case, tmp)
    if args[0] == "--endpoint":  # a global option that replaces the endpoint
        r = CliRunner().invoke(main, [*args[:2], "--prefix", prefix, *args[2:]], catch_exceptions=False)
        code, out = r.exit_code, r.stdout + r.stderr
    else:
        code, out = ctl(cfg, prefix, args)
    assert code == case.code, out
    return out, before, asyncio.run(etcd_state(cfg, prefix))


def run_etcd(case: Case, tmp: Path, cfg: EtcdConfig, prefix: str) -> Result:
    leaf, value, args = case.input
    key = Layout("web", prefix).base + leaf

    async def put() -> None:
        async with await Etcd.connect(cfg) as etcd:
            await etcd.put(key, value)

    asyncio.run(put())
    before = asyncio.run(etcd_state(cfg, prefix))
    code, out = ctl(cfg, prefix, args)
    assert code == case.code, out
    assert "Traceback" not in out
    return out, before, asyncio.run(etcd_state(cfg, prefix))


def _refusal(fn: Callable[[], object]) -> str:
    try:
        fn()
    except (LocksmithError, UpdateAgentError) as exc:
        return str(exc)
    raise AssertionError("accepted, but the case says it must be refused")


def run_agent(case: Case, tmp: Path, cfg: EtcdConfig, prefix: str) -> Result:
    config, update_conf = case.input
    c = materialise(tmp / "config.toml", config)
    u = materialise(tmp / "update.conf", update_conf)
    before = file_state(c, u)
    said = _refusal(lambda: load_settings(c, update_conf_paths=(u,), env={}))
    return said, before, file_state(c, u)


TRUSTED = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
MANIFEST = {"format_version": 1, "version": "3815.2.0", "payload": "usr.img", "size": 1024, "compressed_size": 1024,
            "sha256": "ab" * 32, "compression": "none", "released": "2026-11-01T00:00:00Z"}


def run_channel(case: Case, tmp: Path, cfg: EtcdConfig, prefix: str) -> Result:
    manifest, sig = case.input
    if isinstance(manifest, dict):
        manifest = json.dumps({**MANIFEST, **manifest}).encode()
    d = tmp / "channel"
    d.mkdir()
    m = materialise(d / "manifest.json", manifest)
    signed = manifest if isinstance(manifest, bytes) else b""
    if sig == "signed":
        sig = sign(TRUSTED, signed)
    elif sig == "other-key":
        sig = sign(OTHER, signed)
    s = materialise(d / "manifest.json.sig", sig)
    before = file_state(m, s)
    said = _refusal(lambda: load_dir(d, KeySet([TRUSTED.public_key()])))
    return said, before, file_state(m, s)


def run_key(case: Case, tmp: Path, cfg: EtcdConfig, prefix: str) -> Result:
    content = case.input
    if content == "rsa":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        content = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    k = materialise(tmp / "release.pub", content)
    before = file_state(k)
    said = _refusal(lambda: KeySet.from_paths([k]))
    assert encode_public_key(TRUSTED.public_key())  # the good format is the one line of base64
    return said, before, file_state(k)


def run_state(case: Case, tmp: Path, cfg: EtcdConfig, prefix: str) -> Result:
    path = materialise(tmp / "state.json", case.input)
    before = file_state(path)
    store = StateStore(path)
    said = _refusal(store.load)
    # The daemon's path: the damaged file is moved aside, never deleted, and a fresh state used.
    store.load_or_reset(1000.0)
    aside = tmp / "state.json.corrupt-1000"
    return said, before, file_state(aside)


def run_boot(case: Case, tmp: Path, cfg: EtcdConfig, prefix: str) -> Result:
    path = materialise(tmp / "boot.json", case.input)
    before = file_state(path)
    return _refusal(lambda: read_boot_record(path)), before, file_state(path)


def _gpt_regions(path: Path) -> list[bytes]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(MiB)
        f.seek(max(0, size - MiB))
        return [head, f.read(MiB)]


def run_gpt(case: Case, tmp: Path, cfg: EtcdConfig, prefix: str) -> Result:
    path = tmp / "disk.img"
    if case.input == FIFO:
        os.mkfifo(path)
        return _refusal(lambda: gpt.read_gpt(path)), "fifo", file_state(path)[0]
    if case.input == "small":
        path.write_bytes(b"\0" * 1024)
        return _refusal(lambda: gpt.read_gpt(path)), b"\0" * 1024, path.read_bytes()
    make_disk(path, slot_size=MiB)
    op: Callable[[], object] = lambda: gpt.read_gpt(path)  # noqa: E731
    if case.input == "headers":
        corrupt(path, "primary_header")
        corrupt(path, "backup_header")
    elif case.input == "entries":
        corrupt(path, "primary_entries")
        corrupt(path, "backup_entries")
    elif case.input == "partition-9":
        op = lambda: gpt.write_attributes(path, {9: 0})  # noqa: E731
    elif case.input == "overflow":
        op = lambda: gpt.write_attributes(path, {3: 1 << 64})  # noqa: E731
    before = _gpt_regions(path)
    return _refusal(op), before, _gpt_regions(path)


def run_fleetlock(case: Case, tmp: Path, cfg: EtcdConfig, prefix: str) -> Result:
    headers, body = case.input

    async def go() -> Result:
        async with await Etcd.connect(cfg) as etcd:
            from fleetlockrig import apply
            await apply(etcd, prefix, "web", "slots = 1")
        before = await etcd_state(cfg, prefix)
        async with running(cfg, prefix) as server, aiohttp.ClientSession() as session:
            reply = await call(session, server.urls[0] + "/v1/pre-reboot", data=body, headers=headers)
        assert reply.status == 400, reply
        return f"{reply.kind}: {reply.doc['value']}", before, await etcd_state(cfg, prefix)

    return asyncio.run(go())


RUNNERS: dict[str, Callable[[Case, Path, EtcdConfig, str], Result]] = {
    "policy": run_policy, "ctl": run_ctl, "etcd": run_etcd, "agent": run_agent, "channel": run_channel,
    "key": run_key, "state": run_state, "boot": run_boot, "gpt": run_gpt, "fleetlock": run_fleetlock,
}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, tmp_path: Path, etcd_config: EtcdConfig, prefix: str) -> None:
    said, before, after = RUNNERS[case.surface](case, tmp_path, etcd_config, prefix)
    assert case.message in said, (case.message, said)
    assert "Traceback" not in said
    assert before == after, f"{case.unchanged} changed"


def test_the_corpus() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids are unique"
    assert len(CASES) >= 80
    assert {c.surface for c in CASES} == set(RUNNERS)
    assert {c.unchanged for c in CASES} == {"etcd", "file", "gpt"}
