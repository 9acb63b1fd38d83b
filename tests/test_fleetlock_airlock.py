"""Moving from airlock: `locksmithctl fleetlock import-airlock`, a server started with airlock's
config file, and overdue FleetLock holders under the policy's on_timeout."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from fleetlockrig import apply, changes, keys, pre_reboot, running, snapshot
from test_fleetlock_protocol import AIRLOCK_EXAMPLE

from locksmith import budget
from locksmith.embedded import EmbeddedEtcd
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.fleetlock.config import parse_settings
from locksmith.policystore import get_policy, read_pause

LOCKSMITHCTL = str(Path(sys.executable).with_name("locksmithctl"))


def ctl(etcd_server: EmbeddedEtcd, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LOCKSMITHCTL, "--endpoint", etcd_server.endpoints[0], "--prefix", prefix, *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


async def test_import_airlock_writes_equivalent_policies(etcd_server: EmbeddedEtcd, etcd: Etcd, prefix: str,
                                                         tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(AIRLOCK_EXAMPLE)
    before = await snapshot(etcd, prefix)
    dry = ctl(etcd_server, prefix, "fleetlock", "import-airlock", str(conf), "--dry-run", "-o", "json")
    assert dry.returncode == 0, dry.stderr
    assert [g["action"] for g in json.loads(dry.stdout)["groups"]] == ["created"] * 3
    assert (await changes(etcd, prefix, before)).none

    done = ctl(etcd_server, prefix, "fleetlock", "import-airlock", str(conf), "-o", "json")
    assert done.returncode == 0, done.stderr
    assert {g["group"]: (g["slots"], g["action"]) for g in json.loads(done.stdout)["groups"]} == {
        "controllers": (1, "created"), "default": (2, "created"), "workers": (2, "created")}
    for group, slots in {"controllers": 1, "default": 2, "workers": 2}.items():
        stored = await get_policy(etcd, group, prefix=prefix)
        assert stored is not None and stored.policy.slots == slots and stored.policy.windows == ()

    again = ctl(etcd_server, prefix, "fleetlock", "import-airlock", str(conf))
    assert again.returncode == 0 and again.stdout.count("unchanged") == 3

    # A policy with windows keeps them when airlock's slots change; --keep-existing changes nothing.
    await apply(etcd, prefix, "workers", 'slots = 5\n[[windows]]\nstart = "Sat 02:00"\nlength = "2h"\n')
    kept = ctl(etcd_server, prefix, "fleetlock", "import-airlock", str(conf), "--keep-existing")
    assert "kept (was 5)" in kept.stdout
    assert (await get_policy(etcd, "workers", prefix=prefix)).policy.slots == 5  # type: ignore[union-attr]
    updated = ctl(etcd_server, prefix, "fleetlock", "import-airlock", str(conf))
    assert "updated (was 5)" in updated.stdout
    workers = (await get_policy(etcd, "workers", prefix=prefix)).policy  # type: ignore[union-attr]
    assert workers.slots == 2 and len(workers.windows) == 1


def test_import_airlock_errors(etcd_server: EmbeddedEtcd, prefix: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[lock]\ndefault_slots = 0\n")
    for path, code, words in ((bad, 1, "has 0 slots"), (tmp_path / "missing.toml", 1, "not found"),
                              (tmp_path, 2, "is a directory")):
        r = ctl(etcd_server, prefix, "fleetlock", "import-airlock", str(path))
        assert r.returncode == code and words in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert r.stdout == ""
    empty = tmp_path / "nolock.toml"
    empty.write_text("[service]\nport = 1\n")
    r = ctl(etcd_server, prefix, "fleetlock", "import-airlock", str(empty))
    assert r.returncode == 1 and "no [lock] table" in r.stderr


async def test_server_started_with_airlocks_config_creates_missing_groups(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str) -> None:
    await apply(etcd, prefix, "workers", "slots = 7")
    groups = parse_settings(AIRLOCK_EXAMPLE).groups
    async with running(etcd_config, prefix, groups=groups) as server:
        async with asyncio.timeout(30):
            await server.imported.wait()
    assert (await get_policy(etcd, "default", prefix=prefix)).policy.slots == 2  # type: ignore[union-attr]
    assert (await get_policy(etcd, "controllers", prefix=prefix)).policy.slots == 1  # type: ignore[union-attr]
    assert (await get_policy(etcd, "workers", prefix=prefix)).policy.slots == 7  # type: ignore[union-attr]


class Clock:
    def __init__(self) -> None:
        self.current = datetime.now(UTC)

    def now(self) -> datetime:
        return self.current

    def monotonic(self) -> float:
        return self.current.timestamp()

    async def sleep(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)


async def test_overdue_holder_is_released_once_with_on_timeout_release(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str) -> None:
    await apply(etcd, prefix, "web", 'slots = 1\nreboot_timeout = "10m"\non_timeout = "release"\nfailure_budget = 5')
    clock = Clock()
    async with running(etcd_config, prefix, clock=clock) as server, aiohttp.ClientSession() as session:
        base = server.urls[0]
        assert (await pre_reboot(session, base, "node-a", "web")).status == 200
        assert (await pre_reboot(session, base, "node-b", "web")).kind == "no_slot"
        clock.current += timedelta(minutes=11)
        assert (await pre_reboot(session, base, "node-b", "web")).status == 200
        assert (await pre_reboot(session, base, "node-c", "web")).kind == "no_slot"
    assert [f.host for f in await budget.list_failures(etcd, "web", prefix=prefix)] == ["node-a"]
    assert "holders/node-a" not in await keys(etcd, prefix, "web")


async def test_overdue_holder_with_hold_counts_once_and_spends_the_budget(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str) -> None:
    await apply(etcd, prefix, "web", 'slots = 1\nreboot_timeout = "10m"\non_timeout = "hold"\nfailure_budget = 0')
    clock = Clock()
    async with running(etcd_config, prefix, clock=clock) as server, aiohttp.ClientSession() as session:
        base = server.urls[0]
        assert (await pre_reboot(session, base, "node-a", "web")).status == 200
        clock.current += timedelta(minutes=11)
        first = await pre_reboot(session, base, "node-b", "web")
        second = await pre_reboot(session, base, "node-b", "web")
    assert first.kind == "paused" and second.kind == "paused"  # budget 0: the first failure pauses
    assert len(await budget.list_failures(etcd, "web", prefix=prefix)) == 1
    assert (await read_pause(etcd, "web", prefix=prefix)).source == "failure-budget"  # type: ignore[union-attr]
    assert "holders/node-a" in await keys(etcd, prefix, "web")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or not Path("/usr/lib/systemd/system").is_dir(),
                    reason="needs systemd-analyze and the host's systemd units (Debian package systemd)")
def test_systemd_unit_verifies_clean(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    (root / "opt" / "coreupdate" / "bin").mkdir(parents=True)
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    (root / "lib").symlink_to("usr/lib")
    unit = Path(__file__).parent.parent / "systemd" / "fleetlock-server.service"
    shutil.copy(unit, root / "etc" / "systemd" / "system")
    shutil.copy2(LOCKSMITHCTL, root / "opt" / "coreupdate" / "bin" / "locksmithctl")
    r = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "fleetlock-server.service"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    (root / "opt" / "coreupdate" / "bin" / "locksmithctl").unlink()  # the check is real
    r = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "fleetlock-server.service"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not executable" in r.stderr


def test_serve_refuses_a_bad_config_in_one_line(etcd_server: EmbeddedEtcd, prefix: str, tmp_path: Path) -> None:
    conf = tmp_path / "fleetlock.toml"
    conf.write_text('[service]\ntls = true\n')
    r = ctl(etcd_server, prefix, "fleetlock", "serve", "--config", str(conf))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert f"{conf}: service.tls: tls = true needs tls_cert_file and tls_key_file" in r.stderr
