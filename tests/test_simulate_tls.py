"""``locksmithctl simulate --endpoint`` against an existing etcd with TLS and etcd's auth on (the
roles of docs/security.md, granted on the simulator's key prefix): every client the run makes
(each host's agent, the watcher, the history recorder, the /metrics reader) gets the global
--etcd-* options. The hosts only finish if their agents reached etcd with those credentials.

One single-member etcd per way in: mTLS (client-certificate auth, the CN is the user) and
server TLS with user name and password."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from etcdroles import PASSWORDS, setup_roles
from pki import Pki, make_pki

from locksmith.cli import main as locksmithctl
from locksmith.embedded import EmbeddedEtcd, TlsMaterial
from locksmith.etcd import Etcd

pytestmark = pytest.mark.timeout(120)

SIM_PREFIX = "locksmith-sim/"  # every run's keys live under it (rollout.engine.Simulation.prefix)
RUN = ["simulate", "--hosts", "4", "--no-progress", "--output", "json", "--reboot-duration", "fixed:2m"]
LOCKSMITHCTL = str(Path(sys.executable).with_name("locksmithctl"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), clients=("root", "agent"))


@pytest.fixture(scope="module")
def mtls(pki: Pki) -> Iterator[EmbeddedEtcd]:
    root = pki.clients["root"]
    tls = TlsMaterial(pki.members[0].cert, pki.members[0].key, pki.ca, client_cert_auth=True,
                      client_cert_file=root.cert, client_key_file=root.key)
    with EmbeddedEtcd(tls=tls) as server:
        setup_roles(server, prefix=SIM_PREFIX)
        yield server


@pytest.fixture(scope="module")
def password(pki: Pki) -> Iterator[EmbeddedEtcd]:
    with EmbeddedEtcd(tls=TlsMaterial(pki.members[0].cert, pki.members[0].key, pki.ca)) as server:
        setup_roles(server, prefix=SIM_PREFIX)
        yield server


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LOCKSMITHCTL_")}


def completed(res: object) -> dict[str, object]:
    exit_code, stdout, stderr = (getattr(res, n) for n in ("exit_code", "stdout", "stderr"))
    assert exit_code == 0, (stdout, stderr)
    doc = json.loads(stdout)
    assert doc["outcome"] == "complete" and doc["safe"] is True, doc
    assert [r["status"] for r in doc["rows"]] == ["updated"] * 4
    assert 1 <= doc["max_holders"] <= doc["slot_limit"]
    assert doc["etcd_writes"] > 0  # /metrics read over TLS, with the client certificate when asked
    return doc


def test_simulate_over_mtls_as_the_agent_role(mtls: EmbeddedEtcd, pki: Pki) -> None:
    agent = pki.clients["agent"]
    # The global --endpoint before the subcommand names the existing etcd too.
    res = CliRunner(env=clean_env()).invoke(locksmithctl, [
        "--endpoint", mtls.endpoints[0], *RUN,
        "--etcd-cafile", str(pki.ca), "--etcd-certfile", str(agent.cert), "--etcd-keyfile", str(agent.key)])
    completed(res)


def test_simulate_over_password_auth_as_the_agent_role(password: EmbeddedEtcd, pki: Pki, tmp_path: Path) -> None:
    # Global options in the environment, the endpoint on the command: as an operator's profile would.
    env = {**clean_env(), "LOCKSMITHCTL_ETCD_CAFILE": str(pki.ca), "LOCKSMITHCTL_ETCD_USERNAME": "agent",
           "LOCKSMITHCTL_ETCD_PASSWORD": PASSWORDS["agent"]}
    res = CliRunner(env=env).invoke(locksmithctl, [*RUN, "--endpoint", password.endpoints[0],
                                                   "--workdir", str(tmp_path)])
    completed(res)
    configs = sorted(tmp_path.glob("h*/config.toml"))
    assert len(configs) == 4
    for path in configs:  # each host's agent logged in as the agent user; only its owner reads the password
        table = tomllib.loads(path.read_text())["locksmith"]
        assert (table["username"], table["password"], table["cafile"]) == ("agent", PASSWORDS["agent"], str(pki.ca))
        assert path.stat().st_mode & 0o777 == 0o600


def store_revision(server: EmbeddedEtcd) -> int:
    """The store's revision, read as root: unchanged when a refused client changed nothing."""

    async def go() -> int:
        async with await Etcd.connect(server.config()) as etcd:
            return await etcd.revision()

    return asyncio.run(go())


def refused(p: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("locksmithctl: error: "), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_a_wrong_ca_is_one_error_line_and_exit_1(mtls: EmbeddedEtcd, pki: Pki) -> None:
    agent = pki.clients["agent"]
    before = store_revision(mtls)
    p = subprocess.run([LOCKSMITHCTL, "simulate", "--hosts", "2", "--no-progress", "--endpoint", mtls.endpoints[0],
                        "--etcd-cafile", str(pki.other_ca), "--etcd-certfile", str(agent.cert),
                        "--etcd-keyfile", str(agent.key)], capture_output=True, text=True, env=clean_env(),
                       timeout=90)
    refused(p, "not signed by the given CA (--etcd-cafile)")
    assert store_revision(mtls) == before


def test_a_wrong_password_is_one_error_line_and_exit_1(password: EmbeddedEtcd, pki: Pki) -> None:
    before = store_revision(password)
    p = subprocess.run([LOCKSMITHCTL, "simulate", "--hosts", "2", "--no-progress", "--endpoint",
                        password.endpoints[0], "--etcd-cafile", str(pki.ca), "--etcd-username", "agent",
                        "--etcd-password", "not-the-password"], capture_output=True, text=True, env=clean_env(),
                       timeout=90)
    refused(p, "wrong user or password")
    assert store_revision(password) == before
