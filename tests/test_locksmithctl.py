"""locksmithctl lock/unlock/set-max/status, run as the installed CLI against the session's etcd;
the machine id lookup. (The demo is tested in test_simulate.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies

from locksmith.cli import main as locksmithctl
from locksmith.cli.status import render_status
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.keys import Layout
from locksmith.machineid import MachineIdError, machine_id
from locksmith.semaphore import Semaphore, read_state

LOCKSMITHCTL = str(Path(sys.executable).with_name("locksmithctl"))


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKSMITHCTL_")}
    env.update(extra or {})
    return env


def _args(cfg: EtcdConfig | None, prefix: str | None, args: tuple[str, ...]) -> list[str]:
    cmd = [LOCKSMITHCTL]
    if cfg is not None:
        cmd += ["--endpoint", ",".join(cfg.endpoints)]
    if prefix is not None:
        cmd += ["--prefix", prefix]
    return cmd + list(args)


def ctl(cfg: EtcdConfig | None, prefix: str | None, *args: str,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_args(cfg, prefix, args), capture_output=True, text=True, env=_env(env), timeout=60)


async def actl(cfg: EtcdConfig, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    """ctl() from inside the event loop, without blocking it."""
    cmd = _args(cfg, prefix, args)
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(cmd, proc.returncode, out.decode(), err.decode())


def cli(cfg: EtcdConfig | None, prefix: str | None, *args: str,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """ctl() in this process (click's runner): much cheaper than a new interpreter on a busy machine.
    An exception other than a clean exit is re-raised, so a would-be traceback fails the test."""
    cmd = _args(cfg, prefix, args)[1:]
    clean = {k: None for k in os.environ if k.startswith("LOCKSMITHCTL_")}
    result = CliRunner().invoke(locksmithctl, cmd, env={**clean, **(env or {})})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(cmd, result.exit_code, result.stdout, result.stderr)


async def acli(cfg: EtcdConfig, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    # The CLI runs its own event loop, so in-process it needs a thread of its own.
    return await asyncio.to_thread(cli, cfg, prefix, *args)


def assert_fails(p: subprocess.CompletedProcess[str], *needles: str, code: int = 1) -> str:
    """Exit ``code``, nothing on stdout, exactly one stderr line holding every needle."""
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def ok(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0 and p.stderr == "", (p.returncode, p.stdout, p.stderr)
    return p.stdout


def status_json(cfg: EtcdConfig, prefix: str, *args: str) -> dict:
    return json.loads(ok(cli(cfg, prefix, "--output", "json", "status", *args)))


# -- lock / unlock / set-max / status ----------------------------------------------------------------


def test_lock_unlock_set_max_and_status(etcd_config: EtcdConfig, prefix: str) -> None:
    ok(cli(etcd_config, prefix, "set-max", "2"))
    ok(cli(etcd_config, prefix, "lock", "node-a", "--reason", "kernel 6.1"))
    ok(cli(etcd_config, prefix, "lock", "node-b"))
    assert_fails(ctl(etcd_config, prefix, "lock", "node-c"), "group 'default' has no free slot: 2 of 2 held")

    text = ok(ctl(etcd_config, prefix, "status"))
    lines = text.splitlines()
    assert lines[:3] == ["Available: 0", "Max: 2", ""] or lines[:2] == ["Available: 0", "Max: 2"]
    header = next(ln for ln in lines if ln.startswith("MACHINE ID"))
    assert header.split() == ["MACHINE", "ID", "SINCE", "DEADLINE", "REASON"]
    rows = lines[lines.index(header) + 1:lines.index(header) + 3]
    assert [r.split()[0] for r in rows] == ["node-a", "node-b"]
    assert rows[0].endswith("kernel 6.1")
    # Columns line up under the header.
    assert rows[0].index("kernel 6.1") == header.index("REASON")

    st = status_json(etcd_config, prefix)
    assert (st["group"], st["max"], st["available"]) == ("default", 2, 0)
    assert [h["id"] for h in st["holders"]] == ["node-a", "node-b"]
    assert st["holders"][0]["reason"] == "kernel 6.1"
    # Without --hold-for a holder is expected back within the semaphore's default hour.
    h = st["holders"][0]
    assert datetime.fromisoformat(h["deadline"]) - datetime.fromisoformat(h["since"]) == timedelta(hours=1)
    assert st["queue"] == []

    assert "node-a released" in ok(cli(etcd_config, prefix, "unlock", "node-a"))
    st = status_json(etcd_config, prefix)
    assert (st["available"], [h["id"] for h in st["holders"]]) == (1, ["node-b"])
    ok(cli(etcd_config, prefix, "set-max", "3"))
    assert status_json(etcd_config, prefix)["available"] == 2


async def test_unlock_of_a_non_holder_fails_and_writes_nothing(
    etcd: Etcd, etcd_config: EtcdConfig, prefix: str,
) -> None:
    assert (await actl(etcd_config, prefix, "lock", "node-a")).returncode == 0
    before = await etcd.revision()
    p = await actl(etcd_config, prefix, "unlock", "node-z")
    assert assert_fails(p) == "locksmithctl: error: node-z does not hold a slot in group default"
    assert await etcd.revision() == before


def test_lock_and_unlock_default_to_the_machine_id(etcd_config: EtcdConfig, prefix: str) -> None:
    try:
        mid = machine_id()
    except MachineIdError:
        pytest.skip("this machine has no machine id")
    out = json.loads(ok(cli(etcd_config, prefix, "-o", "json", "lock", "--reason", "by hand")))
    assert out["id"] == mid
    assert [h["id"] for h in status_json(etcd_config, prefix)["holders"]] == [mid]
    ok(cli(etcd_config, prefix, "unlock"))
    assert status_json(etcd_config, prefix)["holders"] == []


def test_hold_for_sets_a_deadline(etcd_config: EtcdConfig, prefix: str) -> None:
    ok(cli(etcd_config, prefix, "lock", "node-a", "--hold-for", "30m"))
    h = status_json(etcd_config, prefix)["holders"][0]
    delta = datetime.fromisoformat(h["deadline"]) - datetime.fromisoformat(h["since"])
    assert abs(delta - timedelta(minutes=30)) < timedelta(seconds=1)
    assert not h["overdue"]
    assert "DEADLINE" in ok(cli(etcd_config, prefix, "status"))


async def test_lock_wait_queues_then_takes_the_freed_slot(
    etcd: Etcd, etcd_config: EtcdConfig, prefix: str,
) -> None:
    ok(await acli(etcd_config, prefix, "lock", "node-a"))
    layout = Layout("default", prefix)
    _, rev = await etcd.get_prefix(layout.queue)
    waiter = asyncio.create_task(actl(etcd_config, prefix, "lock", "--wait", "node-b", "--reason", "queued"))
    # Synchronise on the waiter's queue key appearing, then free the slot.
    async for batch in etcd.watch_prefix(layout.queue, start_revision=rev + 1):
        if any(e.kind == "put" and e.kv.key == layout.waiter("node-b") for e in batch.events):
            break
    assert not waiter.done()
    st = json.loads(ok(await acli(etcd_config, prefix, "-o", "json", "status")))
    assert [(w["position"], w["id"], w["reason"]) for w in st["queue"]] == [(1, "node-b", "queued")]
    ok(await acli(etcd_config, prefix, "unlock", "node-a"))
    p = await waiter
    assert p.returncode == 0, p.stderr
    st = json.loads(ok(await acli(etcd_config, prefix, "-o", "json", "status")))
    assert [h["id"] for h in st["holders"]] == ["node-b"] and st["queue"] == []


async def test_interrupted_wait_leaves_the_queue_at_once(
    etcd: Etcd, etcd_config: EtcdConfig, prefix: str,
) -> None:
    ok(await acli(etcd_config, prefix, "lock", "node-a"))
    layout = Layout("default", prefix)
    _, rev = await etcd.get_prefix(layout.queue)
    proc = await asyncio.create_subprocess_exec(
        *_args(etcd_config, prefix, ("lock", "--wait", "node-b")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
    )
    async for batch in etcd.watch_prefix(layout.queue, start_revision=rev + 1):
        if any(e.kind == "put" and e.kv.key == layout.waiter("node-b") for e in batch.events):
            break
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert_fails(subprocess.CompletedProcess([], proc.returncode or 0, out.decode(), err.decode()), "interrupted")
    # Gone now, not after the waiter lease's TTL.
    assert await etcd.get(layout.waiter("node-b")) is None
    assert [h.id for h in (await read_state(etcd, "default", prefix=prefix)).holders] == ["node-a"]


async def test_status_shows_the_queue_in_fifo_order(etcd: Etcd, etcd_config: EtcdConfig, prefix: str) -> None:
    holder = Semaphore(etcd, "default", prefix=prefix)
    await holder.set_max(1)
    await holder.try_lock("node-a")
    layout = Layout("default", prefix)
    sems: list[Semaphore] = []
    tasks: list[asyncio.Task[object]] = []
    try:
        for name in ("node-c", "node-b", "node-d"):
            _, rev = await etcd.get_prefix(layout.queue)
            sem = Semaphore(etcd, "default", prefix=prefix)
            sems.append(sem)
            tasks.append(asyncio.create_task(sem.lock(name, reason=f"wants {name}")))
            async for batch in etcd.watch_prefix(layout.queue, start_revision=rev + 1):
                if any(e.kv.key == layout.waiter(name) for e in batch.events):
                    break
        st = json.loads(ok(await acli(etcd_config, prefix, "-o", "json", "status")))
        assert [(w["position"], w["id"]) for w in st["queue"]] == [(1, "node-c"), (2, "node-b"), (3, "node-d")]
        text = ok(await acli(etcd_config, prefix, "status"))
        assert "Waiting: 3" in text
        queue_lines = text.split("Waiting: 3\n", 1)[1].splitlines()
        assert queue_lines[0].split() == ["POS", "MACHINE", "ID", "SINCE", "REASON"]
        assert [ln.split()[:2] for ln in queue_lines[1:4]] == [["1", "node-c"], ["2", "node-b"], ["3", "node-d"]]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in [*sems, holder]:
            await s.close()


def test_status_all_groups(etcd_config: EtcdConfig, prefix: str) -> None:
    ok(cli(etcd_config, prefix, "--group", "web", "lock", "w1"))
    ok(cli(etcd_config, prefix, "--group", "db", "set-max", "2"))
    text = ok(cli(etcd_config, prefix, "status", "--all"))
    assert "Group: db\nAvailable: 2\nMax: 2" in text
    assert "Group: web\nAvailable: 0\nMax: 1" in text
    st = status_json(etcd_config, prefix, "--all")
    assert sorted(g["group"] for g in st["groups"]) == ["db", "web"]
    assert next(g for g in st["groups"] if g["group"] == "web")["holders"][0]["id"] == "w1"


def test_options_from_environment(etcd_config: EtcdConfig, prefix: str) -> None:
    # A dead endpoint first in the comma list: the client must go on to the live one.
    env = {
        "LOCKSMITHCTL_ENDPOINT": "http://127.0.0.1:9," + ",".join(etcd_config.endpoints),
        "LOCKSMITHCTL_PREFIX": prefix, "LOCKSMITHCTL_GROUP": "envgroup", "LOCKSMITHCTL_OUTPUT": "json",
    }
    ok(ctl(None, None, "lock", "node-e", env=env))
    st = json.loads(ok(cli(None, None, "status", env=env)))
    assert (st["group"], [h["id"] for h in st["holders"]]) == ("envgroup", ["node-e"])
    # A command-line option beats the environment.
    st = json.loads(ok(cli(None, None, "--group", "other", "status", env=env)))
    assert (st["group"], st["holders"]) == ("other", [])


def test_unreachable_etcd_names_the_endpoints_tried(prefix: str) -> None:
    p = ctl(None, prefix, "status", env={"LOCKSMITHCTL_ENDPOINT": "http://127.0.0.1:9,127.0.0.1:10"})
    assert_fails(p, "127.0.0.1:9", "127.0.0.1:10", "unreachable")
    p = cli(None, prefix, "--endpoint", "http://127.0.0.1:9", "unlock", "node-a")
    assert_fails(p, "127.0.0.1:9")


async def test_corrupt_stored_value_is_named_and_nothing_changes(
    etcd: Etcd, etcd_config: EtcdConfig, prefix: str,
) -> None:
    layout = Layout("default", prefix)
    await etcd.put(layout.holder("node-x"), b"{not json")
    before = await etcd.revision()
    for i, args in enumerate([("status",), ("lock", "node-a"), ("unlock", "node-x"), ("set-max", "2")]):
        p = await (actl if i == 0 else acli)(etcd_config, prefix, *args)
        assert_fails(p, layout.holder("node-x"))
    assert await etcd.revision() == before

    await etcd.delete(layout.holder("node-x"))
    await etcd.put(layout.policy, b"[1, 2")
    before = await etcd.revision()
    for i, args in enumerate([("lock", "node-a"), ("status",), ("set-max", "2")]):
        p = await (actl if i == 0 else acli)(etcd_config, prefix, *args)
        assert_fails(p, layout.policy)
    assert await etcd.revision() == before


@pytest.mark.parametrize("args", [
    ("set-max", "0"),
    ("set-max", "many"),
    ("--group", "bad group", "status"),
    ("lock", "bad id!"),
    ("lock", "node-a", "--hold-for", "soon"),
    ("--output", "yaml", "status"),
    ("--endpoint", "ftp://127.0.0.1:1", "status"),
    ("frobnicate",),
])
def test_usage_errors_exit_2(prefix: str, args: tuple[str, ...]) -> None:
    # Usage errors are caught before any connection: the endpoint is deliberately dead.
    p = cli(None, prefix, "--endpoint", "http://127.0.0.1:9", *args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Error" in p.stderr


def test_usage_error_of_the_real_cli() -> None:
    p = ctl(None, None, "--endpoint", "http://127.0.0.1:9", "set-max", "0")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    assert p.stderr.splitlines()[-1] == "Error: Invalid value for 'N': 0 is not in the range 1<=x<=10000."


# -- rendering -----------------------------------------------------------------------------------------


def test_render_status_shortens_a_long_queue() -> None:
    st = {
        "group": "g", "max": 1, "available": 0, "paused": False,
        "holders": [{"id": "a", "since": "2026-01-02T03:04:05+00:00", "deadline": None, "reason": "",
                     "overdue": False},
                    {"id": "late-node", "since": "2026-01-02T03:04:05+00:00",
                     "deadline": "2026-01-02T04:04:05+00:00", "reason": "r", "overdue": True}],
        "queue": [{"position": i, "id": f"n{i}", "since": "2026-01-02T03:04:05+00:00", "reason": ""}
                  for i in range(1, 8)],
    }
    text = render_status(st, max_queue=2)
    assert text.splitlines()[:2] == ["Available: 0", "Max: 1"]
    assert "\na           2026-01-02T03:04:05Z  -\n" in text
    assert "\nlate-node   2026-01-02T03:04:05Z  2026-01-02T04:04:05Z OVERDUE  r\n" in text
    assert "Waiting: 7" in text and "n2" in text and "n3" not in text
    assert text.endswith("... and 5 more")
    assert all(ln == ln.rstrip() for ln in text.splitlines())


# -- machine id ----------------------------------------------------------------------------------------


def test_machine_id_prefers_etc_then_falls_back(tmp_path: Path) -> None:
    etc, dbus = tmp_path / "etc-machine-id", tmp_path / "dbus-machine-id"
    dbus.write_text("0123456789ABCDEF0123456789abcdef\n")
    assert machine_id([etc, dbus]) == "0123456789abcdef0123456789abcdef"
    etc.write_text("")  # systemd's "not yet initialised"
    assert machine_id([etc, dbus]) == "0123456789abcdef0123456789abcdef"
    etc.write_text("fedcba9876543210fedcba9876543210\n")
    assert machine_id([etc, dbus]) == "fedcba9876543210fedcba9876543210"


def test_machine_id_missing_everywhere_names_each_path(tmp_path: Path) -> None:
    etc, dbus = tmp_path / "nope", tmp_path / "garbage"
    dbus.write_text("not-an-id\n")
    with pytest.raises(MachineIdError) as exc:
        machine_id([etc, dbus])
    msg = str(exc.value)
    assert f"{etc}: missing" in msg and f"{dbus}: not 32 hex digits" in msg


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(text=strategies.text(max_size=40))
def test_machine_id_accepts_exactly_32_hex_digits(tmp_path: Path, text: str) -> None:
    f = tmp_path / "machine-id"
    f.write_text(text + "\n", encoding="utf-8")
    stripped = (text + "\n").encode("utf-8").decode("ascii", errors="replace").strip()
    valid = len(stripped) == 32 and all(c in "0123456789abcdefABCDEF" for c in stripped)
    if valid:
        assert machine_id([f]) == stripped.lower()
    else:
        with pytest.raises(MachineIdError, match="machine-id"):
            machine_id([f])
