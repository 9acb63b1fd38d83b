"""locksmithctl as operators type it: stdout holds only the output (``-o json`` parses whatever the
library logs), logs and errors go to stderr, and global options also work after the subcommand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner
from hypothesis import given, strategies
from structlog.testing import capture_logs

from locksmith import audit
from locksmith.cli import hoist_global_options
from locksmith.cli import main as locksmithctl
from locksmith.embedded import EmbeddedEtcd
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.keys import Layout
from locksmith.log import get_logger
from locksmith.semaphore import Semaphore

LOCKSMITHCTL = str(Path(sys.executable).with_name("locksmithctl"))


def ctl(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOCKSMITHCTL_")}
    base.update(env or {})
    return subprocess.run([LOCKSMITHCTL, *args], capture_output=True, text=True, env=base, timeout=60)


async def _fill_audit_trail(etcd: Etcd, layout: Layout, n: int) -> None:
    """``n`` audit entries, oldest first, 100 per transaction (etcd allows 128 operations)."""
    start = datetime.now(UTC) - timedelta(days=1)
    ops = [audit.entry_op(layout, "set-max", "", "filler", now=start + timedelta(seconds=i)) for i in range(n)]
    for i in range(0, n, 100):
        await etcd.txn([], ops[i:i + 100])


async def test_json_output_parses_when_the_audit_trail_is_pruned(etcd: Etcd, etcd_config: EtcdConfig,
                                                                  prefix: str) -> None:
    # Defect 6: past the prune threshold, set-max's pruner logged "audit_pruned" on stdout above
    # the JSON (structlog's default logger prints there), so json.loads failed.
    layout = Layout("web", prefix)
    await Semaphore(etcd, "web", prefix=prefix).set_max(1)
    await _fill_audit_trail(etcd, layout, audit.DEFAULT_KEEP + audit.PRUNE_SLACK + 1)
    ep = ",".join(etcd_config.endpoints)
    p = ctl("--endpoint", ep, "--prefix", prefix, "--group", "web", "-o", "json", "set-max", "2")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["max"] == 2
    assert p.stderr == ""  # debug and info stay quiet without -v
    assert await etcd.count_prefix(layout.audit) <= audit.DEFAULT_KEEP + 1  # the prune did run
    # With -vv the same line appears, on stderr.
    await _fill_audit_trail(etcd, layout, audit.PRUNE_SLACK + 1)
    p = ctl("--endpoint", ep, "--prefix", prefix, "--group", "web", "set-max", "3", "-o", "json", "-vv")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["max"] == 3
    assert "audit_pruned" in p.stderr


@pytest.mark.parametrize("after", [
    ["-o", "json"], ["--output", "json"], ["--output=json"], ["-ojson"],
])
def test_output_option_after_the_subcommand(etcd_config: EtcdConfig, prefix: str, after: list[str]) -> None:
    p = ctl("status", "--endpoint", etcd_config.endpoints[0], "--prefix", prefix, *after)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["group"] == "default"


def test_every_global_option_after_the_subcommand(etcd: Etcd, etcd_config: EtcdConfig, prefix: str) -> None:
    ep = etcd_config.endpoints[0]
    p = ctl("lock", "node-1", "--endpoint", ep, "--group", "db", "--prefix", prefix, "-o", "json",
            "--reason", "kernel")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["group"] == "db"
    p = ctl("status", "--group=db", f"--endpoint={ep}", f"--prefix={prefix}", "--output", "json")
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    assert [h["id"] for h in st["holders"]] == ["node-1"] and st["holders"][0]["reason"] == "kernel"
    # A nested command, with the options between its group and its name.
    p = ctl("policy", "--endpoint", ep, "list", "--prefix", prefix, "-o", "json")
    assert p.returncode == 0, p.stderr
    json.loads(p.stdout)


def test_environment_variables_still_work(etcd_config: EtcdConfig, prefix: str) -> None:
    env = {"LOCKSMITHCTL_ENDPOINT": etcd_config.endpoints[0], "LOCKSMITHCTL_PREFIX": prefix,
           "LOCKSMITHCTL_OUTPUT": "json", "LOCKSMITHCTL_GROUP": "envgroup"}
    p = ctl("status", env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["group"] == "envgroup"
    # The command line beats the environment, before or after the subcommand.
    p = ctl("status", "-o", "text", env=env)
    assert p.returncode == 0 and p.stdout.startswith("Available:"), p.stdout + p.stderr


def test_a_subcommand_option_of_the_same_name_wins(etcd_config: EtcdConfig, prefix: str) -> None:
    # `log --group` is log's own filter; the global --group after `log` must not steal it.
    ep = etcd_config.endpoints[0]
    assert ctl("--endpoint", ep, "--prefix", prefix, "--group", "a", "set-max", "2").returncode == 0
    assert ctl("--endpoint", ep, "--prefix", prefix, "--group", "b", "set-max", "3").returncode == 0
    p = ctl("log", "--group", "b", "--endpoint", ep, "--prefix", prefix, "-o", "json")
    assert p.returncode == 0, p.stderr
    entries = json.loads(p.stdout)
    entries = entries["entries"] if isinstance(entries, dict) else entries
    assert {e["group"] for e in entries} == {"b"}


def test_an_error_is_one_line_on_stderr_and_nothing_on_stdout() -> None:
    with EmbeddedEtcd() as server:
        ep = server.endpoints[0]
    # The server is gone: its port refuses connections.
    p = ctl("status", "-o", "json", "--endpoint", ep)
    assert p.returncode == 1
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("locksmithctl: error: etcd unreachable at "), p.stderr
    assert ep in lines[0]


def test_unknown_option_after_the_subcommand_is_still_a_usage_error() -> None:
    p = ctl("status", "--no-such-option")
    assert p.returncode == 2
    assert "No such option" in p.stderr and p.stdout == ""


_GLOBALS = [["--endpoint", "http://h:1"], ["-o", "json"], ["--output=json"], ["--group", "db"], ["-v"], ["-vv"],
            ["--prefix", "p/"], ["--etcd-cafile", "/ca.pem"], ["-ojson"]]
_LOCK_ARGS = [["node-1"], ["--reason", "-o"], ["--wait"], ["--hold-for", "30m"], ["--reason=--group"]]


@given(before=strategies.lists(strategies.sampled_from(_GLOBALS), max_size=3),
       after=strategies.lists(strategies.sampled_from(_GLOBALS), max_size=4),
       own=strategies.permutations(_LOCK_ARGS), cut=strategies.integers(0, 5))
def test_hoisting_moves_exactly_the_global_options(before: list[list[str]], after: list[list[str]],
                                                   own: list[list[str]], cut: int) -> None:
    # Global options after the command move before it, in order; the command's own arguments
    # (including a --reason whose value looks like a global option) stay, in order.
    own_args = [tok for arg in own[:cut] for tok in arg]
    mixed: list[str] = []
    later = list(after)
    for arg in own[:cut]:
        if later:
            mixed += later.pop(0)
        mixed += arg
    for rest in later:
        mixed += rest
    args = [tok for opt in before for tok in opt] + ["lock", *mixed]
    with locksmithctl.make_context("locksmithctl", ["status"]) as ctx:
        out = hoist_global_options(locksmithctl, ctx, args)
    flat_after = [tok for opt in after for tok in opt]
    assert out == [tok for opt in before for tok in opt] + flat_after + ["lock", *own_args]


def test_an_option_value_after_the_double_dash_is_not_moved() -> None:
    with locksmithctl.make_context("locksmithctl", ["status"]) as ctx:
        assert hoist_global_options(locksmithctl, ctx, ["lock", "--", "-o"]) == ["lock", "--", "-o"]


def test_an_in_process_run_leaves_the_callers_logging_as_it_was() -> None:
    # The CLI configures logging for its own run only: a test process that runs it through
    # CliRunner must still capture its own info events afterwards.
    before = structlog.get_config()
    result = CliRunner().invoke(locksmithctl, ["status", "-o", "json", "--endpoint", "http://127.0.0.1:9"])
    assert result.exit_code == 1
    assert structlog.get_config() == before
    with capture_logs() as logs:
        get_logger("t").info("still_captured")
    assert [e["event"] for e in logs] == ["still_captured"]
