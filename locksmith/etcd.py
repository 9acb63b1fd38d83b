"""The one module that talks to etcd. Everything else uses this small interface, so the client
library (etcd3aio today) can be swapped without touching the semaphore, policies or agent.

It speaks in plain Python values: keys are ``str``, values ``bytes``, compares and operations are
small frozen dataclasses, and every failure is one of ``locksmith.errors``' etcd errors that names
the endpoints tried.

The transport is built for a cluster in which a member may die, freeze (SIGSTOP, a stuck disk, a
full GC pause) or lose its leader while quorum is intact:

- one gRPC channel per endpoint, and every call sticks to one *current* member;
- each attempt has its own deadline (``attempt_timeout``), shorter than the call's (``timeout``);
  an attempt that fails or runs past it marks its member down for a while and the call goes on
  with the next member, so a frozen member costs one attempt deadline, not the whole call;
- every request carries etcd's "require leader" metadata (``hasleader``), so a member cut off
  from the leader refuses at once instead of holding the request;
- gRPC keepalive pings with a timeout close a dead connection within seconds;
- a watch asks for a progress notification whenever its stream has been quiet for a while; a
  stream that answers neither with events nor with progress is stalled, and the watch moves to
  another member from the revision after its last event.

Writes are retried on another member after an attempt whose outcome is unknown (its reply was
lost or late); ``TxnResult.uncertain`` then tells the caller that a failed compare may be its own
earlier commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random

# gRPC's C core logs TLS handshake failures itself on stderr unless told otherwise, which would put
# a second, raw line above our one-line errors. It reads this when grpc is first imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal
from urllib.parse import urlsplit

import etcd3aio
import grpc
import grpc.aio
from etcd3aio._protobuf import AuthenticateRequest as _AuthenticateRequest
from etcd3aio._protobuf import AuthStub as _AuthStub
from etcd3aio._protobuf import CompactionRequest as _CompactionRequest
from etcd3aio._protobuf import Compare as _PbCompare
from etcd3aio._protobuf import DeleteRangeRequest as _DeleteRangeRequest
from etcd3aio._protobuf import KVStub as _KVStub
from etcd3aio._protobuf import LeaseGrantRequest as _LeaseGrantRequest
from etcd3aio._protobuf import LeaseKeepAliveRequest as _LeaseKeepAliveRequest
from etcd3aio._protobuf import LeaseRevokeRequest as _LeaseRevokeRequest
from etcd3aio._protobuf import LeaseStub as _LeaseStub
from etcd3aio._protobuf import PutRequest as _PutRequest
from etcd3aio._protobuf import RangeRequest as _RangeRequest
from etcd3aio._protobuf import TxnRequest as _TxnRequest
from etcd3aio._protobuf import WatchCreateRequest as _WatchCreateRequest
from etcd3aio._protobuf import WatchRequest as _WatchRequest
from etcd3aio._protobuf import WatchStub as _WatchStub
from etcd3aio._protobuf import rpc_pb2 as _rpc_pb2

from locksmith.errors import (
    EtcdAuthError,
    EtcdError,
    EtcdUnavailableError,
    InvalidArgumentError,
    WatchCompactedError,
)
from locksmith.files import InputFileError, read_bytes
from locksmith.log import get_logger

_log = get_logger(__name__)

DEFAULT_ENDPOINT = "http://127.0.0.1:2379"

# etcd's "require leader" metadata (clientv3.WithRequireLeader): a member without a leader
# refuses the request (and ends such watch streams) with "etcdserver: no leader".
_REQUIRE_LEADER = ("hasleader", "true")
# UNAVAILABLE details that prove the request never reached etcd's state machine.
_NOT_SENT = ("failed to connect", "connection refused", "no leader", "not capable", "dns resolution failed")
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class EtcdConfig:
    """How to reach etcd. Endpoints are URLs (``http://h:p``, ``https://h:p``) or ``h:p``.

    ``timeout`` bounds a whole call, ``attempt_timeout`` one attempt on one member: past it the
    call moves to the next member. ``keepalive_time`` is the gRPC ping interval on an idle
    connection (etcd's server refuses pings more often than its ``--grpc-keepalive-min-time``,
    5 s by default), ``keepalive_timeout`` how long a ping may go unanswered before the
    connection counts as dead. ``member_cooldown`` is how long a member that failed an attempt
    is passed over while others answer.
    """

    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    username: str | None = None
    password: str | None = None
    timeout: float = 5.0
    attempt_timeout: float = 2.0
    keepalive_time: float = 5.0
    keepalive_timeout: float = 2.0
    member_cooldown: float = 5.0

    def host_ports(self) -> list[str]:
        out = []
        for ep in self.endpoints:
            ep = ep.strip()
            if not ep:
                continue
            try:
                parts = urlsplit(ep if "://" in ep else f"http://{ep}")
                port = parts.port  # raises ValueError for a port that is not a number
            except ValueError:  # also an unbalanced or invalid [IPv6] host
                port = None
            if port is None or parts.scheme not in ("http", "https") or not parts.hostname or not port:
                raise InvalidArgumentError(f"endpoint {ep[:100]!r} is not http(s)://host:port or host:port")
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            out.append(f"{host}:{parts.port}")
        if not out:
            raise InvalidArgumentError("no etcd endpoint given")
        return out

    @property
    def uses_tls(self) -> bool:
        return self.cafile is not None or any(ep.startswith("https://") for ep in self.endpoints)


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


class Target(Enum):
    VERSION = _PbCompare.VERSION
    CREATE = _PbCompare.CREATE
    MOD = _PbCompare.MOD
    VALUE = _PbCompare.VALUE


_RESULTS = {
    "==": _PbCompare.EQUAL,
    "!=": _PbCompare.NOT_EQUAL,
    "<": _PbCompare.LESS,
    ">": _PbCompare.GREATER,
}


@dataclass(frozen=True)
class Compare:
    """One transaction guard. With ``prefix=True`` it covers every key under ``key``: etcd then
    requires the condition of *each* existing key in the range (deleted keys don't count)."""

    key: str
    target: Target
    op: Literal["==", "!=", "<", ">"]
    value: int | bytes
    prefix: bool = False


def version_is(key: str, version: int) -> Compare:
    return Compare(key, Target.VERSION, "==", version)


def absent(key: str) -> Compare:
    return Compare(key, Target.VERSION, "==", 0)


def present(key: str) -> Compare:
    return Compare(key, Target.VERSION, ">", 0)


def mod_revision_is(key: str, revision: int) -> Compare:
    return Compare(key, Target.MOD, "==", revision)


def unchanged_since(prefix: str, revision: int) -> Compare:
    """No key under ``prefix`` was created or modified after ``revision``."""
    return Compare(prefix, Target.MOD, "<", revision + 1, prefix=True)


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False
    range_end: str | None = None


@dataclass(frozen=True)
class Get:
    key: str
    prefix: bool = False


Op = Put | Delete | Get


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    # One entry per operation of the branch that ran: a list of KeyValue for a Get, the number of
    # deleted keys for a Delete, None for a Put.
    results: list[Any] = field(default_factory=list)
    # An earlier attempt of this call may have committed (its reply was lost or came too late):
    # a failed compare can then be the caller's own earlier write.
    uncertain: bool = False


@dataclass(frozen=True)
class Event:
    kind: Literal["put", "delete"]
    kv: KeyValue


@dataclass(frozen=True)
class WatchBatch:
    """Events that etcd delivered together; ``revision`` is the store revision they bring us to.
    A batch with no events and ``created`` set means the watch is established."""

    revision: int
    events: list[Event]
    created: bool = False


def prefix_end(prefix: str) -> str:
    return etcd3aio.prefix_range_end(prefix.encode()).decode("latin-1")


def _b(s: str) -> bytes:
    return s.encode()


def _kv(pb: Any) -> KeyValue:
    return KeyValue(
        key=pb.key.decode(errors="replace"),
        value=bytes(pb.value),
        create_revision=pb.create_revision,
        mod_revision=pb.mod_revision,
        version=pb.version,
        lease=pb.lease,
    )



@dataclass
class LostReply:
    """Test-only fault: the next ``count`` attempts of ``method`` ("Txn", "Put", "DeleteRange",
    "Range", "LeaseGrant") for which ``match(request)`` holds reach etcd and take effect, and then
    fail as UNAVAILABLE, as when the member that forwarded them dies before replying. The call's
    own failover and retry then run exactly as after a real lost reply."""

    method: str = "Txn"
    count: int = 1
    match: Callable[[Any], bool] | None = None
    dropped: int = 0


class _Member:
    """One endpoint: its own channel and stubs, and when it may be tried again after a failure."""

    def __init__(self, url: str, target: str, channel: grpc.aio.Channel) -> None:
        self.url = url
        self.target = target
        self.channel = channel
        self.kv = _KVStub(channel)
        self.lease = _LeaseStub(channel)
        self.watch = _WatchStub(channel)
        self.auth = _AuthStub(channel)
        self.down_until = 0.0
        self.last_error = ""


class _Lost(Exception):
    """An attempt that took effect but whose reply is lost (LostReply)."""


class _Stalled(Exception):
    """A watch stream that delivered neither events nor progress in time."""


class Etcd:
    """An open connection to an etcd cluster. Use ``async with await Etcd.connect(cfg)`` or
    call ``close()``."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self._members: list[_Member] = []
        self._current = 0
        self._metadata: tuple[tuple[str, str], ...] = (_REQUIRE_LEADER,)
        self._client: etcd3aio.Etcd3Client | None = None
        self._token_task: asyncio.Task[None] | None = None
        self._closed = False
        # Test-only fault switch; empty in production.
        self.lost_replies: list[LostReply] = []

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    async def connect(cls, config: EtcdConfig | None = None) -> Etcd:
        self = cls(config or EtcdConfig())
        cfg = self.config
        tls = _tls_material(cfg)
        host_ports = cfg.host_ports()
        urls = [ep.strip() for ep in cfg.endpoints if ep.strip()]
        options = [
            ("grpc.keepalive_time_ms", int(cfg.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout * 1000)),
            # etcd's server allows pings only while a stream is open (PermitWithoutStream=false).
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
            # We retry ourselves, on another member; gRPC's transparent retries would stay on this one.
            ("grpc.enable_retries", 0),
            # A restarted member is found again within seconds, not after gRPC's 2-minute backoff cap.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        creds = None
        if tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=tls.get("ca_cert"), private_key=tls.get("cert_key"),
                certificate_chain=tls.get("cert_chain"),
            )
        for url, target in zip(urls, host_ports, strict=True):
            channel = (grpc.aio.secure_channel(target, creds, options=options) if creds is not None
                       else grpc.aio.insecure_channel(target, options=options))
            self._members.append(_Member(url, target, channel))
        # Clients start on different members, so a fleet spreads its load over the cluster.
        self._current = random.randrange(len(self._members))
        if cfg.username is not None:
            try:
                await self._authenticate()
            except BaseException:
                await self.close()
                raise
        return self

    async def _authenticate(self) -> None:
        cfg = self.config

        async def login() -> None:
            req = _AuthenticateRequest(name=cfg.username or "", password=cfg.password or "")
            resp, _ = await self._unary("auth", "Authenticate", req, what="authenticate")
            self._metadata = (_REQUIRE_LEADER, ("token", resp.token))

        await login()

        async def refresh() -> None:
            while True:
                await asyncio.sleep(240)
                with contextlib.suppress(EtcdError):
                    await login()

        self._token_task = asyncio.create_task(refresh(), name="etcd-token-refresh")

    async def close(self) -> None:
        self._closed = True
        if self._token_task is not None:
            self._token_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._token_task
            self._token_task = None
        members, self._members = self._members, []
        for m in members:
            await m.channel.close()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> Etcd:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _c(self) -> etcd3aio.Etcd3Client:
        """etcd3aio's own client, for tests that reach past this module (compaction, say).
        Its channel connects on first use; production calls never go through it."""
        if self._closed or not self._members:
            raise EtcdError("etcd connection is closed")
        if self._client is None:
            tls = _tls_material(self.config)
            self._client = etcd3aio.Etcd3Client(self.config.host_ports(), rpc_max_attempts=3, **tls)
            channel = self._client._manager.get_channel(**tls)  # connect() without awaiting: it does no I/O
            self._client._channel = channel
            self._client.kv = etcd3aio.kv.KVService(channel)
            self._client.lease = etcd3aio.lease.LeaseService(channel)
            self._client.watch = etcd3aio.watch.WatchService(channel)
            self._client.maintenance = etcd3aio.maintenance.MaintenanceService(channel)
            if self.config.username is not None:
                token = dict(self._metadata).get("token")
                for svc in (self._client.kv, self._client.lease, self._client.watch, self._client.maintenance):
                    svc.set_token(token)
        return self._client

    def _where(self) -> str:
        return ", ".join(self.config.endpoints)

    @property
    def current_endpoint(self) -> str:
        """The member this connection sends its calls to now."""
        if not self._members:
            raise EtcdError("etcd connection is closed")
        return self._members[self._current].url

    # -- choosing a member ---------------------------------------------------------------------

    def _pick(self) -> _Member:
        """The current member if it is not marked down, else the next one that is not; with every
        member down, the one that has been down longest."""
        members = self._members
        if not members:
            raise EtcdError("etcd connection is closed")
        now = asyncio.get_running_loop().time()
        n = len(members)
        for i in range(n):
            idx = (self._current + i) % n
            if members[idx].down_until <= now:
                self._current = idx
                return members[idx]
        idx = min(range(n), key=lambda j: members[j].down_until)
        self._current = idx
        return members[idx]

    def _all_down(self) -> bool:
        now = asyncio.get_running_loop().time()
        return all(m.down_until > now for m in self._members)

    def _mark_down(self, member: _Member, why: str) -> None:
        member.down_until = asyncio.get_running_loop().time() + self.config.member_cooldown
        member.last_error = why
        if len(self._members) > 1:
            _log.info("etcd_member_failover", endpoint=member.url, error=why)

    def _mark_up(self, member: _Member) -> None:
        member.down_until = 0.0
        member.last_error = ""

    # -- one call, attempt by attempt ------------------------------------------------------------

    async def _attempts(
        self, attempt: Callable[[_Member, float], Awaitable[Any]], *, what: str, method: str = "",
        request: Any = None,
    ) -> tuple[Any, bool]:
        """Run ``attempt(member, deadline)`` until one succeeds, moving to the next member after a
        transport failure or a missed attempt deadline, within the call's ``timeout``.
        Returns the response and whether an earlier attempt's outcome is unknown."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.timeout
        uncertain = False
        last = ""
        pause = 0.05
        tls_refused: set[str] = set()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0.001:
                if self._closed:
                    raise EtcdError("etcd connection is closed")
                raise EtcdUnavailableError(
                    f"etcd unreachable at {self._where()}: no answer to {what} within {cfg.timeout:g}s"
                    + (f" (last: {last})" if last else "")
                )
            if self._all_down():
                # Every member failed recently (an election, or the cluster restarting): back off
                # a little, then try the one that has been down longest.
                await asyncio.sleep(min(pause, remaining))
                pause = min(pause * 2, 0.5)
                remaining = deadline - loop.time()
                if remaining <= 0.001:
                    continue
            member = self._pick()
            try:
                resp = await attempt(member, min(cfg.attempt_timeout, remaining))
                if self.lost_replies and self._lose(method, request):
                    raise _Lost
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                # "Internal error from Core" is gRPC's own failure of a call on a broken connection.
                if code not in _TRANSIENT and "internal error from core" not in (exc.details() or "").lower():
                    raise self._error(exc, what) from exc
                details = exc.details() or code.name
                if _looks_like_tls(details):
                    # Trust is configuration: once every member has refused the handshake, retrying
                    # until the timeout cannot help, so say so at once. One member alone refusing
                    # (its certificate, say) is failed over like any other fault.
                    tls_refused.add(member.url)
                    if len(tls_refused) == len(self._members):
                        raise EtcdUnavailableError(
                            f"etcd unreachable at {self._where()}: {_short_text(details)}") from exc
                if code == grpc.StatusCode.DEADLINE_EXCEEDED or not any(
                    s in details.lower() for s in _NOT_SENT
                ):
                    uncertain = True
                last = f"{member.url}: {_short_text(details)}"
                self._mark_down(member, _short_text(details))
                continue
            except TimeoutError:
                uncertain = True
                last = f"{member.url}: no answer within {cfg.attempt_timeout:g}s"
                self._mark_down(member, "attempt deadline passed")
                continue
            except _Lost:
                uncertain = True
                last = f"{member.url}: reply lost (injected)"
                self._mark_down(member, "reply lost (injected)")
                continue
            self._mark_up(member)
            return resp, uncertain

    def _lose(self, method: str, request: Any) -> bool:
        for f in self.lost_replies:
            if f.method == method and f.dropped < f.count and (f.match is None or f.match(request)):
                f.dropped += 1
                return True
        return False

    async def _unary(self, service: str, method: str, request: Any, *, what: str) -> tuple[Any, bool]:
        async def attempt(member: _Member, limit: float) -> Any:
            rpc = getattr(getattr(member, service), method)
            return await rpc(request, metadata=self._metadata, timeout=limit)

        return await self._attempts(attempt, what=what, method=method, request=request)

    def _error(self, exc: grpc.aio.AioRpcError, what: str = "") -> EtcdError:
        """A non-transient gRPC status as one of our errors."""
        code = exc.code()
        details = exc.details() or ""
        if code == grpc.StatusCode.PERMISSION_DENIED and what:
            # etcd does not say which key it refused; the caller knows (what = "get 'k'", ...).
            return EtcdAuthError(f"etcd at {self._where()} denied permission to {what}: {details}")
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            verb = "refused authentication" if code == grpc.StatusCode.UNAUTHENTICATED else "denied permission"
            return EtcdAuthError(f"etcd at {self._where()} {verb}: {details}")
        if code == grpc.StatusCode.INVALID_ARGUMENT and "authentication failed" in details:
            return EtcdAuthError(f"etcd at {self._where()} refused authentication: wrong user or password")
        if code == grpc.StatusCode.UNKNOWN and _looks_like_tls(details):
            return EtcdUnavailableError(f"etcd unreachable at {self._where()}: {_short_text(details)}")
        return EtcdError(f"etcd at {self._where()}: {code.name}: {details}")

    # -- KV ------------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        resp, _ = await self._unary("kv", "Range", _RangeRequest(key=_b(key)), what=f"get {key!r}")
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(self, prefix: str, *, revision: int = 0) -> tuple[list[KeyValue], int]:
        """All keys under ``prefix`` sorted by key, and the store revision of the read."""
        req = _RangeRequest(key=_b(prefix), range_end=prefix_end(prefix).encode("latin-1"), revision=revision)
        resp, _ = await self._unary("kv", "Range", req, what=f"read {prefix!r}")
        return [_kv(k) for k in resp.kvs], resp.header.revision

    async def count_prefix(self, prefix: str) -> int:
        req = _RangeRequest(key=_b(prefix), range_end=prefix_end(prefix).encode("latin-1"), count_only=True)
        resp, _ = await self._unary("kv", "Range", req, what=f"count {prefix!r}")
        return int(resp.count)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        resp, _ = await self._unary("kv", "Put", _PutRequest(key=_b(key), value=value, lease=lease),
                                    what=f"put {key!r}")
        return int(resp.header.revision)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        req = _DeleteRangeRequest(key=_b(key))
        if prefix:
            req.range_end = prefix_end(key).encode("latin-1")
        resp, _ = await self._unary("kv", "DeleteRange", req, what=f"delete {key!r}")
        return int(resp.deleted)

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        req = _TxnRequest(
            compare=[self._compare(c) for c in compare], success=[self._op(o) for o in success],
            failure=[self._op(o) for o in failure],
        )
        keys = sorted({c.key for c in compare} | {o.key for o in (*success, *failure)})
        shown = ", ".join(repr(k) for k in keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        resp, uncertain = await self._unary("kv", "Txn", req, what=f"a transaction on {shown}")
        ops = success if resp.succeeded else failure
        results: list[Any] = []
        for op, r in zip(ops, resp.responses, strict=False):
            if isinstance(op, Get):
                results.append([_kv(k) for k in r.response_range.kvs])
            elif isinstance(op, Delete):
                results.append(int(r.response_delete_range.deleted))
            else:
                results.append(None)
        return TxnResult(bool(resp.succeeded), int(resp.header.revision), results, uncertain)

    async def revision(self, key: str = "\0") -> int:
        """The current store revision (a cheap linearizable read). ``key`` is the key read for it:
        a client whose etcd role covers only a prefix must name a key under that prefix."""
        resp, _ = await self._unary("kv", "Range", _RangeRequest(key=_b(key)), what="read the revision")
        return int(resp.header.revision)

    async def compact(self, revision: int) -> None:
        """Compact the store's history up to ``revision`` (watches from before it then fail)."""
        await self._unary("kv", "Compact", _CompactionRequest(revision=revision, physical=True),
                          what=f"compact to {revision}")

    @staticmethod
    def _compare(c: Compare) -> Any:
        kv = etcd3aio.kv.KVService
        end = prefix_end(c.key) if c.prefix else None
        result = _RESULTS[c.op]
        if c.target is Target.VERSION:
            return kv.txn_compare_version(c.key, int(c.value), result=result, range_end=end)  # type: ignore[arg-type]
        if c.target is Target.CREATE:
            return kv.txn_compare_create_revision(c.key, int(c.value), result=result, range_end=end)  # type: ignore[arg-type]
        if c.target is Target.VALUE:
            return kv.txn_compare_value(c.key, c.value, result=result, range_end=end)  # type: ignore[arg-type]
        pb = _PbCompare(key=_b(c.key), target=_PbCompare.MOD, result=result, mod_revision=int(c.value))  # type: ignore[arg-type]
        if end is not None:
            pb.range_end = end.encode("latin-1")
        return pb

    @staticmethod
    def _op(o: Op) -> Any:
        kv = etcd3aio.kv.KVService
        if isinstance(o, Put):
            return kv.txn_op_put(o.key, o.value, lease=o.lease)
        if isinstance(o, Delete):
            end = o.range_end if o.range_end is not None else (prefix_end(o.key) if o.prefix else None)
            return kv.txn_op_delete(o.key, range_end=end.encode("latin-1") if end else None)
        return kv.txn_op_get(o.key, range_end=prefix_end(o.key).encode("latin-1") if o.prefix else None)

    # -- watch ---------------------------------------------------------------------------------

    async def watch_prefix(
        self, prefix: str, *, start_revision: int, max_backoff: float = 5.0,
        urgent: Callable[[], bool] | None = None,
    ) -> AsyncIterator[WatchBatch]:
        """Events under ``prefix`` from ``start_revision`` on, for as long as the caller iterates.

        A dropped or stalled stream is re-created, on the next member, from the revision after
        the last *event* delivered. (A response header's revision can be past events not yet sent
        during a catch-up, and etcd 3.5's progress notifications have the same flaw: resuming from
        either would lose events.) Progress notifications are used only to tell a quiet stream
        from a stalled one and are not yielded. Raises WatchCompactedError if the revision was
        compacted: re-read, then watch again.

        ``urgent`` (None: always) says whether a quiet stream is worth probing now. While it is
        False the stream is left alone: no progress requests, so a fleet of idle followers costs
        etcd nothing beyond the stream itself, and a dead or frozen member is still found by the
        channel's gRPC keepalive (``keepalive_time`` + ``keepalive_timeout``), which ends the
        stream. Only a stream that someone is waiting on pays for the faster stall detection.
        """
        loop = asyncio.get_running_loop()
        cfg = self.config
        # A stream quiet for ``probe_after`` gets a progress request; one that then stays silent
        # for ``stall_after`` in all (or is not created in time) is stalled.
        probe_after = max(cfg.attempt_timeout / 2, 0.2)
        stall_after = probe_after + cfg.attempt_timeout
        key, end = _b(prefix), prefix_end(prefix).encode("latin-1")
        next_rev = start_revision
        backoff = 0.05
        while True:
            if self._all_down():
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, max_backoff)
            member = self._pick()
            call = member.watch.Watch(metadata=self._metadata)
            read: asyncio.Future[Any] | None = None
            try:
                create = _WatchCreateRequest(key=key, range_end=end, start_revision=next_rev, progress_notify=True)
                async with asyncio.timeout(cfg.attempt_timeout):
                    await call.write(_WatchRequest(create_request=create))
                created = False
                probed = False
                last_rx = loop.time()
                while True:
                    read = asyncio.ensure_future(call.read())
                    while not read.done():
                        if created and not probed and urgent is not None and not urgent():
                            # Relaxed: quiet is not silence; look again at urgency now and then.
                            await asyncio.wait({read}, timeout=probe_after)
                            last_rx = loop.time()
                            continue
                        idle = loop.time() - last_rx
                        limit = stall_after if (probed or not created) else probe_after
                        if idle >= limit:
                            if probed or not created:
                                raise _Stalled(f"no answer from {member.url} for {idle:.1f}s")
                            async with asyncio.timeout(cfg.attempt_timeout):
                                await call.write(_WatchRequest(progress_request=_rpc_pb2.WatchProgressRequest()))
                            probed = True
                            continue
                        await asyncio.wait({read}, timeout=limit - idle)
                    resp = read.result()
                    read = None
                    if resp is grpc.aio.EOF:
                        raise _Stalled(f"{member.url} ended the watch stream")
                    last_rx = loop.time()
                    probed = False
                    if resp.compact_revision > 0:
                        raise WatchCompactedError(resp.compact_revision)
                    if resp.canceled:
                        if "no leader" in resp.cancel_reason:
                            raise _Stalled(f"{member.url}: {resp.cancel_reason}")
                        raise EtcdError(f"etcd cancelled the watch on {prefix!r}: {resp.cancel_reason}")
                    events = [Event("delete" if ev.type == 1 else "put", _kv(ev.kv)) for ev in resp.events]
                    if resp.created:
                        created = True
                        self._mark_up(member)
                        backoff = 0.05
                    elif not events:
                        continue  # a progress notification: the stream is alive
                    if events:
                        next_rev = events[-1].kv.mod_revision + 1
                    yield WatchBatch(int(resp.header.revision), events, bool(resp.created))
                    # The caller's time with the batch is not the stream's silence.
                    last_rx = loop.time()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (*_TRANSIENT, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED):
                    raise self._error(exc, f"watch {prefix!r}") from exc
                if exc.code() == grpc.StatusCode.CANCELLED and self._closed:
                    raise EtcdError("etcd connection is closed") from exc
                self._watch_moved(member, prefix, next_rev, _short_text(exc.details() or exc.code().name))
            except (_Stalled, TimeoutError, asyncio.InvalidStateError) as exc:
                self._watch_moved(member, prefix, next_rev, str(exc) or "stream write timed out")
            finally:
                call.cancel()
                if read is not None:
                    read.cancel()
                    # Let the read finish here, so no task is left pending for the garbage collector.
                    await asyncio.wait({read})
                    if not read.cancelled():
                        read.exception()

    def _watch_moved(self, member: _Member, prefix: str, next_rev: int, why: str) -> None:
        if self._closed:
            raise EtcdError("etcd connection is closed")
        self._mark_down(member, why)
        _log.info("etcd_watch_reconnect", prefix=prefix, from_revision=next_rev, endpoint=member.url, error=why)

    # -- leases --------------------------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> int:
        resp, _ = await self._unary("lease", "LeaseGrant", _LeaseGrantRequest(TTL=ttl), what="a lease grant")
        return int(resp.ID)

    async def lease_revoke(self, lease_id: int) -> None:
        with contextlib.suppress(EtcdError):
            await self._unary("lease", "LeaseRevoke", _LeaseRevokeRequest(ID=lease_id), what="a lease revoke")

    async def lease_keepalive_once(self, lease_id: int) -> int:
        """Refresh a lease; returns the remaining TTL (<= 0: the lease is gone)."""

        async def attempt(member: _Member, limit: float) -> Any:
            call = member.lease.LeaseKeepAlive(metadata=self._metadata)
            try:
                async with asyncio.timeout(limit):
                    await call.write(_LeaseKeepAliveRequest(ID=lease_id))
                    resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                               grpc.aio.Metadata(), "keep-alive stream ended")
                return resp
            finally:
                call.cancel()

        resp, _ = await self._attempts(attempt, what="a lease keep-alive")
        return int(resp.TTL)


def _short_text(text: str) -> str:
    text = text.splitlines()[0] if text else ""
    if "connection refused" in text.lower():
        return "connection refused"
    if _looks_like_tls(text):
        low = text.lower()
        if "certificate_verify_failed" in low or "certificate verify failed" in low:
            return "TLS handshake failed: the server's certificate is not signed by the given CA (--etcd-cafile)"
        if "bad_certificate" in low or "certificate_required" in low or "certificate_expired" in low:
            return ("TLS handshake failed: the server refused our client certificate (missing, expired, "
                    "or not signed by a CA it trusts)")
        return (
            "TLS handshake failed (server certificate not trusted by the given CA,"
            " or a client certificate is missing or refused)"
        )
    if text.lower().endswith("socket closed"):
        return f"{text} (if this endpoint speaks TLS, use https:// and --etcd-cafile)"
    if len(text) > 300:
        text = text[:300].rsplit(" ", 1)[0] + " ..."
    return text


def _looks_like_tls(text: str) -> bool:
    low = text.lower()
    return "certificate verify failed" in low or ("ssl" in low and "handshake" in low)


def _tls_material(cfg: EtcdConfig) -> dict[str, bytes | None]:
    if not cfg.uses_tls:
        return {}
    tls: dict[str, bytes | None] = {}
    try:
        # Bounded reads of regular files only: a CA path pointing at a FIFO or /dev/zero must not hang.
        tls["ca_cert"] = read_bytes(cfg.cafile, what="TLS CA file") if cfg.cafile else _system_ca_bundle()
        if cfg.certfile or cfg.keyfile:
            if not (cfg.certfile and cfg.keyfile):
                raise InvalidArgumentError("a client certificate needs both --etcd-certfile and --etcd-keyfile")
            tls["cert_chain"] = read_bytes(cfg.certfile, what="TLS certificate file")
            tls["cert_key"] = read_bytes(cfg.keyfile, what="TLS key file")
    except InputFileError as exc:
        raise InvalidArgumentError(f"cannot read TLS file {exc}") from exc
    return tls


def _system_ca_bundle() -> bytes | None:
    for p in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"):
        with contextlib.suppress(InputFileError):
            return read_bytes(p, max_bytes=8 << 20, what="CA bundle")
    return None


class Lease:
    """A lease kept alive by a background task until ``revoke()``; the semaphore uses one per
    process for its waiters, so a process that dies leaves every queue within the TTL."""

    def __init__(self, etcd: Etcd, lease_id: int, ttl: int) -> None:
        self.etcd = etcd
        self.id = lease_id
        self.ttl = ttl
        self.lost = asyncio.Event()
        self._task = asyncio.create_task(self._keepalive(), name=f"lease-{lease_id:x}")

    @classmethod
    async def grant(cls, etcd: Etcd, ttl: int) -> Lease:
        return cls(etcd, await etcd.lease_grant(ttl), ttl)

    async def _keepalive(self) -> None:
        interval = max(self.ttl / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                remaining = await self.etcd.lease_keepalive_once(self.id)
            except EtcdError as exc:
                _log.warning("lease_keepalive_failed", lease=f"{self.id:x}", error=str(exc))
                continue
            if remaining <= 0:
                _log.error("lease_expired", lease=f"{self.id:x}")
                self.lost.set()
                return

    async def revoke(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.etcd.lease_revoke(self.id)
