"""etcd over TLS (server certificate only) with etcd's own auth and the roles of
docs/security.md; clients log in with user name and password. One member for the module.

Refused clients get one clear error line and change nothing (the store revision, read as root,
is the same before and after)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from etcdroles import PASSWORDS, agent_cycle, fleetlock_exchange, run, setup_roles, store_revision
from pki import Pki, make_pki

from locksmith.cli import main
from locksmith.embedded import EmbeddedEtcd, TlsMaterial
from locksmith.errors import EtcdAuthError
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.keys import Layout
from locksmith.semaphore import Semaphore

LOCKSMITHCTL = str(Path(sys.executable).with_name("locksmithctl"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[EmbeddedEtcd]:
    with EmbeddedEtcd(tls=TlsMaterial(pki.members[0].cert, pki.members[0].key, pki.ca)) as s:
        setup_roles(s)
        yield s


def as_user(server: EmbeddedEtcd, user: str, password: str | None = None) -> EtcdConfig:
    return server.config(username=user, password=password or PASSWORDS[user])


def ctl_env(server: EmbeddedEtcd, pki: Pki, user: str, password: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOCKSMITHCTL_")}
    return {**base, "LOCKSMITHCTL_ENDPOINT": server.endpoints[0], "LOCKSMITHCTL_ETCD_CAFILE": str(pki.ca),
            "LOCKSMITHCTL_ETCD_USERNAME": user, "LOCKSMITHCTL_ETCD_PASSWORD": password}


def one_line(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert p.returncode == 1, (p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("locksmithctl: error: "), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_operator_password_drives_locksmithctl(server: EmbeddedEtcd, pki: Pki, tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('format_version = 1\ngroup = "pw-op"\nslots = 3\n')
    env = ctl_env(server, pki, "operator", PASSWORDS["operator"])
    runner = CliRunner(env=env)
    for args in (["policy", "apply", str(policy)], ["--group", "pw-op", "pause"], ["--group", "pw-op", "resume"]):
        r = runner.invoke(main, args, catch_exceptions=False)
        assert r.exit_code == 0, (args, r.stderr)
    r = runner.invoke(main, ["--group", "pw-op", "--output", "json", "status"], catch_exceptions=False)
    assert r.exit_code == 0 and '"max": 3' in r.stdout, r.stderr
    r = runner.invoke(main, ["--group", "pw-op", "log"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert [ln.split()[3] for ln in r.stdout.splitlines()[1:]] == ["policy-apply", "pause", "resume"]


def test_agent_password_runs_the_semaphore(server: EmbeddedEtcd) -> None:
    async def cycle(etcd: Etcd) -> list[str]:
        sem = Semaphore(etcd, "pw-a")
        try:
            await sem.lock("node-1")
            held = [h.id for h in (await sem.state()).holders]
            assert await sem.unlock("node-1")
            return held
        finally:
            await sem.close()

    assert run(as_user(server, "agent"), cycle) == ["node-1"]


def test_agent_password_cannot_touch_keys_outside_the_prefix(server: EmbeddedEtcd) -> None:
    before = store_revision(server)
    with pytest.raises(EtcdAuthError, match="denied permission to delete 'other-app/'"):
        run(as_user(server, "agent"), lambda etcd: etcd.delete("other-app/", prefix=True))
    assert store_revision(server) == before


def test_wrong_password(server: EmbeddedEtcd, pki: Pki) -> None:
    before = store_revision(server)
    p = subprocess.run([LOCKSMITHCTL, "set-max", "7"], capture_output=True, text=True, timeout=60,
                       env=ctl_env(server, pki, "operator", "not-the-password"))
    one_line(p, server.endpoints[0], "refused authentication: wrong user or password")
    assert "not-the-password" not in p.stderr
    assert store_revision(server) == before


def test_user_without_the_role(server: EmbeddedEtcd, pki: Pki) -> None:
    before = store_revision(server)
    p = subprocess.run([LOCKSMITHCTL, "--group", "pw-i", "unlock", "node-1"], capture_output=True, text=True,
                       timeout=60, env=ctl_env(server, pki, "intruder", PASSWORDS["intruder"]))
    one_line(p, "denied permission to", "etcdserver: permission denied", "pw-i")
    key = Layout("pw-i").holder("node-1")
    with pytest.raises(EtcdAuthError, match=f"denied permission to put '{key}'"):
        run(as_user(server, "intruder"), lambda etcd: etcd.put(key, b"{}"))
    assert store_revision(server) == before


def test_agent_config_with_a_password(server: EmbeddedEtcd, pki: Pki, tmp_path: Path) -> None:
    toml = (f'[reboot]\nstrategy = "etcd-lock"\n[locksmith]\nendpoints = ["{server.endpoints[0]}"]\n'
            f'cafile = "{pki.ca}"\nusername = "agent"\npassword = "{PASSWORDS["agent"]}"\ngroup = "pw-agent"\n')
    assert agent_cycle(toml, tmp_path, "pw-agent") == (["host-1"], [])


def test_fleetlock_server_with_a_password_file(server: EmbeddedEtcd, pki: Pki, tmp_path: Path) -> None:
    secret = tmp_path / "etcd-password"
    secret.write_text(PASSWORDS["agent"] + "\n")
    toml = (f'[service]\naddress = "127.0.0.1"\nport = 0\n[fleetlock]\nany_group = true\n'
            f'[etcd3]\nendpoints = ["{server.endpoints[0]}"]\nca_file = "{pki.ca}"\n'
            f'username = "agent"\npassword_file = "{secret}"\n')
    assert fleetlock_exchange(toml, tmp_path, "zincati-2", "pw-fl") == (200, 200, None)
