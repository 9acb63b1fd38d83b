"""The one module that talks to etcd. Everything else uses this small interface, so the client
library (etcd3aio today) can be swapped without touching the semaphore, policies or agent.

It speaks in plain Python values: keys are ``str``, values ``bytes``, compares and operations are
small frozen dataclasses, and every failure is one of ``locksmith.errors``' etcd errors that names
the endpoints tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

# gRPC's C core logs TLS handshake failures itself on stderr unless told otherwise, which would put
# a second, raw line above our one-line errors. It reads this when grpc is first imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import etcd3aio
import grpc
import grpc.aio
from etcd3aio._protobuf import Compare as _PbCompare
from etcd3aio._protobuf import WatchCreateRequest as _WatchCreateRequest
from etcd3aio._protobuf import WatchRequest as _WatchRequest
from etcd3aio._protobuf import WatchStub as _WatchStub

from locksmith.errors import (
    EtcdAuthError,
    EtcdError,
    EtcdUnavailableError,
    InvalidArgumentError,
    WatchCompactedError,
)
from locksmith.log import get_logger

_log = get_logger(__name__)

DEFAULT_ENDPOINT = "http://127.0.0.1:2379"


@dataclass(frozen=True)
class EtcdConfig:
    """How to reach etcd. Endpoints are URLs (``http://h:p``, ``https://h:p``) or ``h:p``."""

    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    username: str | None = None
    password: str | None = None
    timeout: float = 5.0

    def host_ports(self) -> list[str]:
        out = []
        for ep in self.endpoints:
            ep = ep.strip()
            if not ep:
                continue
            parts = urlsplit(ep if "://" in ep else f"http://{ep}")
            if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
                raise InvalidArgumentError(f"endpoint {ep!r} is not http(s)://host:port or host:port")
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


class Etcd:
    """An open connection to an etcd cluster. Use ``async with await Etcd.connect(cfg)`` or
    call ``close()``."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self._client: etcd3aio.Etcd3Client | None = None
        self._token_task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    async def connect(cls, config: EtcdConfig | None = None) -> Etcd:
        self = cls(config or EtcdConfig())
        cfg = self.config
        tls = _tls_material(cfg)
        host_ports = cfg.host_ports()
        server_name = None
        if tls and len(host_ports) > 1:
            server_name = urlsplit(
                cfg.endpoints[0] if "://" in cfg.endpoints[0] else f"https://{cfg.endpoints[0]}"
            ).hostname
        self._client = etcd3aio.Etcd3Client(
            host_ports, rpc_max_attempts=3, tls_server_name=server_name, **tls
        )
        await self._client.connect()
        if cfg.username is not None:
            try:
                await self._authenticate()
            except BaseException:
                await self.close()
                raise
        return self

    async def _authenticate(self) -> None:
        assert self._client is not None and self._client.auth is not None
        cfg = self.config
        resp = await self._call(self._client.auth.authenticate(cfg.username or "", cfg.password or ""))
        self._client.set_token(resp.token)

        async def refresh() -> None:
            while True:
                await asyncio.sleep(240)
                with contextlib.suppress(EtcdError):
                    assert self._client is not None and self._client.auth is not None
                    r = await self._call(self._client.auth.authenticate(cfg.username or "", cfg.password or ""))
                    self._client.set_token(r.token)

        self._token_task = asyncio.create_task(refresh(), name="etcd-token-refresh")

    async def close(self) -> None:
        if self._token_task is not None:
            self._token_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._token_task
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> Etcd:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _c(self) -> etcd3aio.Etcd3Client:
        if self._client is None:
            raise EtcdError("etcd connection is closed")
        return self._client

    def _where(self) -> str:
        return ", ".join(self.config.endpoints)

    async def _call(self, aw: Any) -> Any:
        """Await one RPC, turning every transport and auth failure into our errors."""
        try:
            async with asyncio.timeout(self.config.timeout * 3):
                return await aw
        except etcd3aio.EtcdUnauthenticatedError as exc:
            raise EtcdAuthError(f"etcd at {self._where()} refused authentication: {exc}") from exc
        except etcd3aio.EtcdPermissionDeniedError as exc:
            raise EtcdAuthError(f"etcd at {self._where()} denied permission: {exc}") from exc
        except (etcd3aio.EtcdConnectionError, etcd3aio.EtcdTransientError) as exc:
            raise EtcdUnavailableError(f"etcd unreachable at {self._where()}: {_short(exc)}") from exc
        except TimeoutError as exc:
            raise EtcdUnavailableError(f"etcd at {self._where()} did not answer in time") from exc
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAUTHENTICATED or code == grpc.StatusCode.PERMISSION_DENIED:
                raise EtcdAuthError(f"etcd at {self._where()}: {exc.details()}") from exc
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise EtcdUnavailableError(f"etcd unreachable at {self._where()}: {exc.details()}") from exc
            if code == grpc.StatusCode.INVALID_ARGUMENT and "authentication failed" in (exc.details() or ""):
                raise EtcdAuthError(f"etcd at {self._where()} refused authentication: wrong user or password") from exc
            raise EtcdError(f"etcd at {self._where()}: {code.name}: {exc.details()}") from exc

    # -- KV ------------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        resp = await self._call(self._c.kv.get(key, timeout=self.config.timeout))  # type: ignore[union-attr]
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(self, prefix: str, *, revision: int = 0) -> tuple[list[KeyValue], int]:
        """All keys under ``prefix`` sorted by key, and the store revision of the read."""
        kv = self._c.kv
        assert kv is not None
        resp = await self._call(
            kv.get(prefix, range_end=prefix_end(prefix).encode("latin-1"), revision=revision,
                   timeout=self.config.timeout)
        )
        return [_kv(k) for k in resp.kvs], resp.header.revision

    async def count_prefix(self, prefix: str) -> int:
        kv = self._c.kv
        assert kv is not None
        resp = await self._call(
            kv.get(prefix, range_end=prefix_end(prefix).encode("latin-1"), count_only=True,
                   timeout=self.config.timeout)
        )
        return int(resp.count)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        resp = await self._call(self._c.kv.put(key, value, lease=lease, timeout=self.config.timeout))  # type: ignore[union-attr]
        return int(resp.header.revision)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        kv = self._c.kv
        assert kv is not None
        end = prefix_end(key).encode("latin-1") if prefix else None
        resp = await self._call(kv.delete(key, range_end=end, timeout=self.config.timeout))
        return int(resp.deleted)

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        kv = self._c.kv
        assert kv is not None
        resp = await self._call(
            kv.txn([self._compare(c) for c in compare], [self._op(o) for o in success],
                   [self._op(o) for o in failure], timeout=self.config.timeout)
        )
        ops = success if resp.succeeded else failure
        results: list[Any] = []
        for op, r in zip(ops, resp.responses, strict=False):
            if isinstance(op, Get):
                results.append([_kv(k) for k in r.response_range.kvs])
            elif isinstance(op, Delete):
                results.append(int(r.response_delete_range.deleted))
            else:
                results.append(None)
        return TxnResult(bool(resp.succeeded), int(resp.header.revision), results)

    async def revision(self) -> int:
        """The current store revision (a cheap linearizable read)."""
        resp = await self._call(self._c.kv.get("\0", timeout=self.config.timeout))  # type: ignore[union-attr]
        return int(resp.header.revision)

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
        self, prefix: str, *, start_revision: int, max_backoff: float = 5.0
    ) -> AsyncIterator[WatchBatch]:
        """Events under ``prefix`` from ``start_revision`` on, for as long as the caller iterates.

        A dropped stream is re-created from the revision after the last *event* delivered.
        (etcd3aio's own reconnect resumes after the response header's revision, which during a
        catch-up can be past events not yet sent: that would lose them.) Raises
        WatchCompactedError if the revision was compacted: re-read, then watch again.
        """
        channel = self._c._channel
        assert channel is not None
        stub = _WatchStub(channel)
        key, end = prefix.encode(), prefix_end(prefix).encode("latin-1")
        next_rev = start_revision
        backoff = 0.1
        while True:
            create = _WatchCreateRequest(key=key, range_end=end, start_revision=next_rev)

            async def requests(create: Any = create) -> AsyncIterator[Any]:
                yield _WatchRequest(create_request=create)
                await asyncio.Future()  # keep the request side open for the stream's lifetime

            metadata = self._c.watch._metadata if self._c.watch is not None else ()
            stream = stub.Watch(requests(), metadata=metadata or None)
            try:
                async for resp in stream:
                    if resp.compact_revision > 0:
                        raise WatchCompactedError(resp.compact_revision)
                    if resp.canceled:
                        raise EtcdError(f"etcd cancelled the watch on {prefix!r}: {resp.cancel_reason}")
                    events = [Event("delete" if ev.type == 1 else "put", _kv(ev.kv)) for ev in resp.events]
                    if events:
                        next_rev = events[-1].kv.mod_revision + 1
                    backoff = 0.1
                    yield WatchBatch(int(resp.header.revision), events, bool(resp.created))
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           "watch stream ended")
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.INTERNAL):
                    await self._call(_reraise(exc))
                _log.info("etcd_watch_reconnect", prefix=prefix, from_revision=next_rev, retry_in=backoff,
                          error=exc.details())
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, max_backoff)
            finally:
                stream.cancel()

    # -- leases --------------------------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> int:
        resp = await self._call(self._c.lease.grant(ttl, timeout=self.config.timeout))  # type: ignore[union-attr]
        return int(resp.ID)

    async def lease_revoke(self, lease_id: int) -> None:
        with contextlib.suppress(EtcdError, grpc.aio.AioRpcError):
            await self._call(self._c.lease.revoke(lease_id, timeout=self.config.timeout))  # type: ignore[union-attr]

    async def lease_keepalive_once(self, lease_id: int) -> int:
        """Refresh a lease; returns the remaining TTL (<= 0: the lease is gone)."""
        lease = self._c.lease
        assert lease is not None
        call = lease.keep_alive(lease_id)
        try:
            async with asyncio.timeout(self.config.timeout):
                async for resp in call:
                    return int(resp.TTL)
        except grpc.aio.AioRpcError as exc:
            await self._call(_reraise(exc))
        except TimeoutError as exc:
            raise EtcdUnavailableError(f"etcd at {self._where()} did not answer a lease keep-alive") from exc
        finally:
            call.cancel()
        return 0


async def _reraise(exc: BaseException) -> Any:
    raise exc


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    low = text.lower()
    if "certificate verify failed" in low or ("ssl" in low and "handshake" in low):
        return (
            "TLS handshake failed (server certificate not trusted by the given CA,"
            " or a client certificate is missing or refused)"
        )
    if len(text) > 300:
        text = text[:300].rsplit(" ", 1)[0] + " ..."
    return text


def _tls_material(cfg: EtcdConfig) -> dict[str, bytes | None]:
    if not cfg.uses_tls:
        return {}
    tls: dict[str, bytes | None] = {}
    try:
        tls["ca_cert"] = Path(cfg.cafile).read_bytes() if cfg.cafile else _system_ca_bundle()
        if cfg.certfile or cfg.keyfile:
            if not (cfg.certfile and cfg.keyfile):
                raise InvalidArgumentError("a client certificate needs both --etcd-certfile and --etcd-keyfile")
            tls["cert_chain"] = Path(cfg.certfile).read_bytes()
            tls["cert_key"] = Path(cfg.keyfile).read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from exc
    return tls


def _system_ca_bundle() -> bytes | None:
    for p in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"):
        with contextlib.suppress(OSError):
            return Path(p).read_bytes()
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
