"""etcd with everything on: client TLS with a server certificate per member, client-certificate
auth, and etcd's own auth with the roles of docs/security.md. Clients identify by certificate:
etcd takes the certificate's CN as the user. One 3-member cluster for the module.

Each refused client gets one clear error line and changes nothing (the store revision, read as
root, is the same before and after)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from etcdroles import agent_cycle, fleetlock_exchange, run, setup_roles, store_revision
from pki import CertPair, Pki, make_pki

from locksmith.embedded import EmbeddedEtcd, TlsMaterial
from locksmith.errors import EtcdAuthError, EtcdUnavailableError
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.keys import DEFAULT_PREFIX, Layout
from locksmith.semaphore import Semaphore

LOCKSMITHCTL = str(Path(sys.executable).with_name("locksmithctl"))
REFUSED = "TLS handshake failed: the server refused our client certificate"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), members=3,
                    clients=("root", "agent", "operator", "intruder", "web-host"), expired=("agent",), rogue=("agent",))


@pytest.fixture(scope="module")
def cluster(pki: Pki) -> Iterator[EmbeddedEtcd]:
    root = pki.clients["root"]
    tls = TlsMaterial(pki.members[0].cert, pki.members[0].key, pki.ca, client_cert_auth=True,
                      client_cert_file=root.cert, client_key_file=root.key,
                      member_certs=tuple((m.cert, m.key) for m in pki.members))
    with EmbeddedEtcd(3, tls=tls) as server:
        setup_roles(server)
        yield server


def as_cert(server: EmbeddedEtcd, pki: Pki, pair: CertPair, *, ca: Path | None = None) -> EtcdConfig:
    """A client that logs in by certificate only (no user name): etcd uses the CN."""
    return EtcdConfig(endpoints=server.endpoints, cafile=str(ca or pki.ca), certfile=str(pair.cert),
                      keyfile=str(pair.key), timeout=5)


def ctl(server: EmbeddedEtcd, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKSMITHCTL_")}
    return subprocess.run([LOCKSMITHCTL, "--endpoint", ",".join(server.endpoints), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def cert_args(pki: Pki, pair: CertPair, ca: Path | None = None) -> list[str]:
    return ["--etcd-cafile", str(ca or pki.ca), "--etcd-certfile", str(pair.cert), "--etcd-keyfile", str(pair.key)]


def one_line(p: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert p.returncode == 1, (p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("locksmithctl: error: "), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# -- what each role can do -------------------------------------------------------------------------


def test_every_member_has_its_own_server_certificate(cluster: EmbeddedEtcd, pki: Pki) -> None:
    for i, m in enumerate(cluster.members):
        assert str(pki.members[i].cert) in m.args and str(pki.members[i].key) in m.args


def test_agent_certificate_runs_the_semaphore(cluster: EmbeddedEtcd, pki: Pki) -> None:
    async def cycle(etcd: Etcd) -> list[str]:
        sem = Semaphore(etcd, "tls-a")
        try:
            await sem.lock("node-1", reason="kernel")
            held = [h.id for h in (await sem.state()).holders]
            assert await sem.unlock("node-1")
            return held
        finally:
            await sem.close()

    assert run(as_cert(cluster, pki, pki.clients["agent"]), cycle) == ["node-1"]


def test_operator_certificate_drives_locksmithctl(cluster: EmbeddedEtcd, pki: Pki, tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('format_version = 1\ngroup = "tls-op"\nslots = 2\n')
    op = cert_args(pki, pki.clients["operator"])
    for args in (["policy", "apply", str(policy)], ["--group", "tls-op", "pause", "--reason", "audit"],
                 ["--group", "tls-op", "resume"], ["--group", "tls-op", "lock", "node-9"]):
        p = ctl(cluster, *op, *args)
        assert p.returncode == 0, (args, p.stderr)
    p = ctl(cluster, *op, "--group", "tls-op", "status")
    assert p.returncode == 0 and "Max: 2" in p.stdout and "node-9" in p.stdout, p.stderr


def test_agent_cannot_touch_keys_outside_the_prefix(cluster: EmbeddedEtcd, pki: Pki) -> None:
    before = store_revision(cluster)
    with pytest.raises(EtcdAuthError, match=r"denied permission to put 'other-app/secret'"):
        run(as_cert(cluster, pki, pki.clients["agent"]), lambda etcd: etcd.put("other-app/secret", b"x"))
    with pytest.raises(EtcdAuthError, match=r"denied permission to get 'other-app/secret'"):
        run(as_cert(cluster, pki, pki.clients["agent"]), lambda etcd: etcd.get("other-app/secret"))
    assert store_revision(cluster) == before


def test_a_per_group_role_confines_a_host_to_its_group(cluster: EmbeddedEtcd, pki: Pki) -> None:
    async def lock_in(group: str) -> list[str]:
        async with await Etcd.connect(as_cert(cluster, pki, pki.clients["web-host"])) as etcd:
            s = Semaphore(etcd, group)
            try:
                await s.lock("web-1")
                return [h.id for h in (await s.state()).holders]
            finally:
                await s.close()

    assert asyncio.run(lock_in("web")) == ["web-1"]
    before = store_revision(cluster)
    with pytest.raises(EtcdAuthError, match=f"denied permission to read '{Layout('db').base}'"):
        asyncio.run(lock_in("db"))
    assert store_revision(cluster) == before


def test_fleetlock_server_over_mtls_with_the_agent_role(cluster: EmbeddedEtcd, pki: Pki, tmp_path: Path) -> None:
    agent = pki.clients["agent"]
    toml = (f'[service]\naddress = "127.0.0.1"\nport = 0\n[fleetlock]\nany_group = true\n'
            f'[etcd3]\nendpoints = {list(cluster.endpoints)!r}\nca_file = "{pki.ca}"\n'
            f'client_cert_pub_path = "{agent.cert}"\nclient_cert_key_path = "{agent.key}"\n').replace("'", '"')
    # /-/ready reads its revision under the prefix, so the agent role (prefix only) is enough.
    # Reading it from a key outside the prefix, as the server did before, is refused.
    with pytest.raises(EtcdAuthError, match="denied permission to read the revision"):
        run(as_cert(cluster, pki, agent), lambda etcd: etcd.revision())
    assert fleetlock_exchange(toml, tmp_path, "zincati-1", "fl-tls") == (200, 200, None)
    holders = run(as_cert(cluster, pki, agent), lambda etcd: etcd.get_prefix(Layout("fl-tls").holders))[0]
    assert [kv.key.rsplit("/", 1)[1] for kv in holders] == ["zincati-1"]


def test_agent_config_over_mtls(cluster: EmbeddedEtcd, pki: Pki, tmp_path: Path) -> None:
    agent = pki.clients["agent"]
    toml = (f'[reboot]\nstrategy = "etcd-lock"\n[locksmith]\nendpoints = {list(cluster.endpoints)!r}\n'
            f'cafile = "{pki.ca}"\ncertfile = "{agent.cert}"\nkeyfile = "{agent.key}"\ngroup = "agent-tls"\n')
    assert agent_cycle(toml.replace("'", '"'), tmp_path, "agent-tls") == (["host-1"], [])


@contextlib.contextmanager
def untrusted_tls_listener(pair: CertPair) -> Iterator[str]:
    """A TLS endpoint on 127.0.0.1 whose certificate no client here trusts; yields its URL."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pair.cert, pair.key)
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(OSError), conn:
                conn.settimeout(5)
                ctx.wrap_socket(conn, server_side=True).close()  # the client gives up in the handshake

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        sock.close()


def test_one_member_refusing_the_handshake_is_failed_over(cluster: EmbeddedEtcd, pki: Pki) -> None:
    """Only when every member refuses TLS is that reported at once; one bad member is skipped."""
    agent = pki.clients["agent"]
    with untrusted_tls_listener(pki.rogue["agent"]) as bad:
        cfg = EtcdConfig(endpoints=(bad, *cluster.endpoints), cafile=str(pki.ca), certfile=str(agent.cert),
                         keyfile=str(agent.key), timeout=10)

        async def go() -> tuple[int, str]:
            async with await Etcd.connect(cfg) as etcd:
                etcd._current = 0  # start at the bad endpoint (connect picks one at random)
                rev = await etcd.revision(DEFAULT_PREFIX)
                return rev, etcd.current_endpoint

        rev, endpoint = asyncio.run(go())
        assert rev > 0 and endpoint in cluster.endpoints
        with pytest.raises(EtcdUnavailableError, match="not signed by the given CA"):
            run(replace(cfg, endpoints=(bad,)), lambda etcd: etcd.revision(DEFAULT_PREFIX))


# -- refused clients: one line, nothing changed -------------------------------------------------------


def test_wrong_ca(cluster: EmbeddedEtcd, pki: Pki) -> None:
    before = store_revision(cluster)
    p = ctl(cluster, *cert_args(pki, pki.clients["operator"], ca=pki.other_ca), "set-max", "5")
    one_line(p, cluster.endpoints[0], "TLS handshake failed: the server's certificate is not signed by the given CA")
    assert store_revision(cluster) == before


def test_expired_client_certificate(cluster: EmbeddedEtcd, pki: Pki) -> None:
    before = store_revision(cluster)
    p = ctl(cluster, *cert_args(pki, pki.expired["agent"]), "lock", "node-x")
    one_line(p, cluster.endpoints[0], REFUSED)
    with pytest.raises(EtcdUnavailableError):
        run(as_cert(cluster, pki, pki.expired["agent"]), lambda etcd: etcd.get(DEFAULT_PREFIX + "x"))
    assert store_revision(cluster) == before


def test_client_certificate_from_another_ca(cluster: EmbeddedEtcd, pki: Pki) -> None:
    before = store_revision(cluster)
    one_line(ctl(cluster, *cert_args(pki, pki.rogue["agent"]), "lock", "node-x"), cluster.endpoints[0], REFUSED)
    assert store_revision(cluster) == before


def test_no_client_certificate(cluster: EmbeddedEtcd, pki: Pki) -> None:
    before = store_revision(cluster)
    one_line(ctl(cluster, "--etcd-cafile", str(pki.ca), "lock", "node-x"), cluster.endpoints[0], REFUSED)
    assert store_revision(cluster) == before


def test_plaintext_against_the_tls_endpoint(cluster: EmbeddedEtcd) -> None:
    before = store_revision(cluster)
    plain = [ep.replace("https://", "http://") for ep in cluster.endpoints]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKSMITHCTL_")}
    p = subprocess.run([LOCKSMITHCTL, "--endpoint", ",".join(plain), "lock", "node-x"],
                       capture_output=True, text=True, env=env, timeout=60)
    one_line(p, plain[0], "Socket closed (if this endpoint speaks TLS, use https:// and --etcd-cafile)")
    assert store_revision(cluster) == before


def test_certificate_of_a_user_without_a_role(cluster: EmbeddedEtcd, pki: Pki) -> None:
    before = store_revision(cluster)
    key = Layout("default").holder("node-x")
    one_line(ctl(cluster, *cert_args(pki, pki.clients["intruder"]), "lock", "node-x"),
             f"denied permission to read '{Layout('default').base}': etcdserver: permission denied")
    with pytest.raises(EtcdAuthError, match=f"denied permission to put '{key}'"):
        run(as_cert(cluster, pki, pki.clients["intruder"]), lambda etcd: etcd.put(key, b"{}"))
    assert store_revision(cluster) == before
