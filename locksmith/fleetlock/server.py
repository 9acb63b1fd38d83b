"""The FleetLock HTTP server (aiohttp): routes, limits, auth, metrics, logs, TLS.

Routes on the service listener:

- ``POST /v1/pre-reboot``, ``POST /v1/steady-state``: the protocol (:mod:`.protocol`,
  :mod:`.service`); 200 with an empty body, or an error ``{"kind", "value"}``.
- ``GET /-/ready``: 200 once etcd answers a read, else 503 ``etcd_unavailable``.
- ``GET /metrics``: Prometheus text (also on the optional status listener).

Every other path is a 404 ``not_found`` and every other method a 405 ``method_not_allowed``, both
in the protocol's JSON error form. A body over ``max_body_bytes`` is a 413 ``too_large``; a
request not answered within ``request_timeout`` is a 503 ``timeout``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import hmac
import logging
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from locksmith.clock import SYSTEM_CLOCK, Clock
from locksmith.errors import CorruptValueError, EtcdError, LocksmithError
from locksmith.etcd import Etcd
from locksmith.fleetlock.airlock import import_groups
from locksmith.fleetlock.config import ServerSettings, read_token
from locksmith.fleetlock.protocol import HEADER, PRE_REBOOT, STEADY_STATE, FleetLockError, parse_request
from locksmith.fleetlock.service import FleetLockService
from locksmith.log import get_logger

__all__ = ["FleetLockServer", "Metrics", "build_app", "serve_forever"]

_log = get_logger(__name__)

_SERVICE_KEY = web.AppKey("fleetlock_service", FleetLockService)
_MAX_LINE = 8190  # aiohttp's default request-line and header-field limits, stated


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "fleetlock_requests", "FleetLock server requests by endpoint, result (ok, refused, error) and kind "
            "(what was done, or the error kind).", ["endpoint", "result", "kind"], registry=self.registry)
        self.duration = Histogram(
            "fleetlock_request_duration_seconds", "Time to answer a FleetLock request.", ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


_METRICS_KEY = web.AppKey("fleetlock_metrics", Metrics)
_READY_KEY = web.AppKey("fleetlock_ready", Callable[[], str])


@dataclass
class _Exchange:
    """What a request's handler tells the middleware that logs and counts it."""

    client: str
    params: Any = None
    answer: str = "ok"


_EXCHANGE: contextvars.ContextVar[_Exchange] = contextvars.ContextVar("fleetlock_exchange")


@dataclass(frozen=True)
class _Limits:
    request_timeout: float
    token: str | None
    trust_forwarded_for: bool


def build_app(service: FleetLockService, *, metrics: Metrics | None = None, max_body_bytes: int = 4096,
              request_timeout: float = 10.0, token: str | None = None, trust_forwarded_for: bool = False,
              protocol_routes: bool = True, base_path: str = "/",
              ready_check: Callable[[], str] | None = None) -> web.Application:
    """The aiohttp application; ``protocol_routes=False`` gives the status listener's app
    (/metrics and /-/ready only). The protocol's paths are under ``base_path``; ``ready_check``
    returns "" when ready, else why not."""
    metrics = metrics or Metrics()
    limits = _Limits(request_timeout, token, trust_forwarded_for)
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_middleware(limits, metrics)])
    app[_SERVICE_KEY] = service
    app[_METRICS_KEY] = metrics
    app[_READY_KEY] = ready_check or (lambda: "")
    if protocol_routes:
        app.router.add_post(base_path + PRE_REBOOT.lstrip("/"), _pre_reboot, name="pre-reboot")
        app.router.add_post(base_path + STEADY_STATE.lstrip("/"), _steady_state, name="steady-state")
    app.router.add_get("/-/ready", _ready, name="ready")
    app.router.add_get("/metrics", _metrics, name="metrics")
    return app


def _client_address(request: web.Request, trust_forwarded_for: bool) -> str:
    remote = request.remote or "unknown"
    if trust_forwarded_for:
        # The last entry is the one the proxy in front of us added; earlier ones are whatever the
        # client sent, and a client can send anything.
        last = request.headers.get("X-Forwarded-For", "").split(",")[-1].strip()
        if last:
            return last[:64]
    return remote


async def _protocol(request: web.Request, op: str) -> web.Response:
    service = request.app[_SERVICE_KEY]
    body = await request.read()
    params = parse_request(request.headers.get(HEADER), body)
    exchange = _EXCHANGE.get()
    exchange.params = params
    client = exchange.client
    answer = await (service.pre_reboot(params, client) if op == "pre-reboot" else service.steady_state(params, client))
    exchange.answer = answer.result
    return web.Response(status=200)


async def _pre_reboot(request: web.Request) -> web.Response:
    return await _protocol(request, "pre-reboot")


async def _steady_state(request: web.Request) -> web.Response:
    return await _protocol(request, "steady-state")


async def _ready(request: web.Request) -> web.Response:
    why = request.app[_READY_KEY]()
    if why:
        raise FleetLockError("not_ready", why)
    revision = await request.app[_SERVICE_KEY].ready()
    _EXCHANGE.get().answer = "ready"
    return web.json_response({"status": "ready", "etcd_revision": revision})


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[_METRICS_KEY]
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _error_response(err: FleetLockError) -> web.Response:
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(err.retry_after)
    if err.kind == "unauthorized":
        headers["WWW-Authenticate"] = 'Bearer realm="fleetlock"'
    return web.json_response(err.body(), status=err.status, headers=headers)


def _authorized(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, cred = header.partition(" ")
    cred = cred.strip()
    if scheme.lower() == "bearer":
        return hmac.compare_digest(cred.encode(), token.encode())
    if scheme.lower() == "basic":
        try:
            _user, _, password = base64.b64decode(cred, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), token.encode())
    return False


def _http_error(exc: web.HTTPException) -> FleetLockError:
    if exc.status == 404:
        return FleetLockError("not_found", "no such endpoint: FleetLock has POST v1/pre-reboot and "
                                           "POST v1/steady-state under the server's base path")
    if exc.status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        return FleetLockError("method_not_allowed", f"method not allowed here (allowed: {allowed or 'none'})")
    if exc.status == 413:
        return FleetLockError("too_large", f"request body too large: {exc.text or 'over the limit'}")
    return FleetLockError("internal", f"HTTP {exc.status}: {exc.reason}")


def _middleware(limits: _Limits, metrics: Metrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                         ) -> web.StreamResponse:
        started = time.monotonic()
        route = getattr(request.match_info, "route", None)
        endpoint = getattr(route, "name", None) or "other"
        client = _client_address(request, limits.trust_forwarded_for)
        exchange = _Exchange(client)
        _EXCHANGE.set(exchange)
        error: FleetLockError | None = None
        response: web.StreamResponse | None = None
        try:
            if limits.token is not None and endpoint != "ready" and not _authorized(request, limits.token):
                raise FleetLockError("unauthorized", "missing or wrong token (send 'Authorization: Bearer <token>', "
                                                     "or the token as the Basic auth password)")
            async with asyncio.timeout(limits.request_timeout):
                response = await handler(request)
        except FleetLockError as exc:
            error = exc
        except web.HTTPException as exc:
            error = _http_error(exc)
        except TimeoutError:
            error = FleetLockError("timeout", f"no answer within {limits.request_timeout:g}s (is etcd slow?)")
        except EtcdError as exc:
            error = FleetLockError("etcd_unavailable", f"etcd: {exc}")
        except CorruptValueError as exc:
            error = FleetLockError("corrupt_state", f"{exc}; an operator must fix or delete it")
        except LocksmithError as exc:
            error = FleetLockError("internal", str(exc))
        except Exception as exc:
            _log.exception("fleetlock_internal_error", path=request.path, error=repr(exc))
            error = FleetLockError("internal", f"internal error ({type(exc).__name__}); see the server's log")
        if error is not None:
            response = _error_response(error)
        assert response is not None
        elapsed = time.monotonic() - started
        if endpoint not in ("metrics",):
            result = "ok" if error is None else ("refused" if error.status == 409 else "error")
            kind = error.kind if error is not None else exchange.answer
            metrics.requests.labels(endpoint, result, kind).inc()
            metrics.duration.labels(endpoint).observe(elapsed)
            _log_request(request, exchange, endpoint, response.status, result, kind, error, elapsed)
        return response

    return middleware


def _log_request(request: web.Request, exchange: _Exchange, endpoint: str, status: int, result: str, kind: str,
                 error: FleetLockError | None, elapsed: float) -> None:
    params = exchange.params
    fields: dict[str, Any] = {
        "endpoint": endpoint, "method": request.method, "path": request.path[:200], "client": exchange.client,
        "status": status, "result": result, "kind": kind, "ms": round(elapsed * 1000, 2),
    }
    if params is not None:
        fields.update(group=params.group, id=params.id)
    if error is not None:
        fields["value"] = error.value
    if endpoint == "ready" and error is None:
        _log.debug("fleetlock_request", **fields)
    elif error is None or error.status == 409:
        _log.info("fleetlock_request", **fields)
    elif error.status < 500:
        _log.warning("fleetlock_request", **fields)
    else:
        _log.error("fleetlock_request", **fields)


class _MalformedHttpFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (a header over the limit, garbage) with a
    traceback; for a server on a network that is a client's mistake: one warning line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            first = (str(exc).strip().splitlines() or [""])[-1].strip()
            _log.warning("fleetlock_malformed_http", status=exc.code, error=first[:200])
            return False
        return True


def _quiet_malformed_http() -> None:
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedHttpFilter) for f in logger.filters):
        logger.addFilter(_MalformedHttpFilter())


def _ssl_context(settings: ServerSettings) -> ssl.SSLContext | None:
    if not settings.tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert settings.tls_cert_file and settings.tls_key_file
    try:
        ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        if settings.client_ca_file:
            ctx.load_verify_locations(cafile=settings.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise LocksmithError(f"TLS set-up failed ({settings.tls_cert_file}, {settings.tls_key_file}"
                             f"{', ' + settings.client_ca_file if settings.client_ca_file else ''}): {exc}") from None
    return ctx


class FleetLockServer:
    """One server replica: its own etcd connection, the service listener and, optionally, the
    status listener. ``start()`` binds (port 0 picks a free one: see ``urls``); ``stop()`` drains."""

    def __init__(self, settings: ServerSettings, *, clock: Clock = SYSTEM_CLOCK, etcd: Etcd | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self._etcd = etcd
        self._own_etcd = etcd is None
        self.service: FleetLockService | None = None
        self.metrics = Metrics()
        self._runners: list[web.AppRunner] = []
        self._import_task: asyncio.Task[None] | None = None
        self.imported = asyncio.Event()  # the [lock] groups are in etcd (set at once without [lock])
        self.urls: list[str] = []
        self.status_urls: list[str] = []

    async def start(self) -> None:
        s = self.settings
        _quiet_malformed_http()
        token = read_token(s.token_file) if s.token_file else None
        ctx = _ssl_context(s)
        if self._etcd is None:
            self._etcd = await Etcd.connect(s.etcd)
        self.service = FleetLockService(self._etcd, prefix=s.prefix, clock=self.clock, queue_ttl=s.queue_ttl,
                                        any_group=s.any_group)
        if s.groups:
            self._import_task = asyncio.create_task(self._import(), name="fleetlock-import")
        else:
            self.imported.set()
        try:
            app = build_app(self.service, metrics=self.metrics, max_body_bytes=s.max_body_bytes,
                            request_timeout=s.request_timeout.total_seconds(), token=token,
                            trust_forwarded_for=s.trust_forwarded_for, base_path=s.base_path,
                            ready_check=self._not_ready)
            self.urls = await self._listen(app, s.address, s.port, ctx)
            if s.status_enabled:
                status_app = build_app(self.service, metrics=self.metrics, protocol_routes=False,
                                       request_timeout=s.request_timeout.total_seconds(), token=token,
                                       ready_check=self._not_ready)
                self.status_urls = await self._listen(status_app, s.status_address, s.status_port,
                                                      ctx if s.status_tls else None)
        except BaseException:
            await self.stop()
            raise
        _log.info("fleetlock_listening", urls=self.urls, status=self.status_urls, prefix=s.prefix,
                  etcd=list(s.etcd.endpoints), tls=s.tls, client_ca=bool(s.client_ca_file), token=token is not None)

    async def _listen(self, app: web.Application, host: str, port: int, ctx: ssl.SSLContext | None) -> list[str]:
        # keepalive_timeout also bounds a connection from its start until its request's headers
        # are in (aiohttp closes a connection still waiting for a message then): a client that
        # trickles its headers is cut off like one that sends nothing.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0,
                               keepalive_timeout=self.settings.request_timeout.total_seconds(),
                               max_line_size=_MAX_LINE, max_field_size=_MAX_LINE)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, host, port, ssl_context=ctx)
        try:
            await site.start()
        except OSError as exc:
            raise LocksmithError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        scheme = "https" if ctx else "http"
        server: Any = site._server  # aiohttp keeps the bound sockets here; port 0 needs them
        out = []
        for sock in server.sockets if server is not None else []:
            addr = sock.getsockname()
            h = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
            out.append(f"{scheme}://{h}:{addr[1]}")
        return out

    def _not_ready(self) -> str:
        return "" if self.imported.is_set() else "creating the policies of the config's [lock] groups in etcd"

    async def _import(self) -> None:
        """airlock's [lock] groups that have no policy yet get one; retried until etcd answers."""
        assert self._etcd is not None
        delay = 0.5
        while True:
            try:
                results = await import_groups(self._etcd, self.settings.groups, prefix=self.settings.prefix,
                                              update=False, source="the server's [lock] config", by=self.service.by
                                              if self.service else None)
                break
            except EtcdError as exc:
                _log.warning("fleetlock_import_retry", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        for r in results:
            if r.action == "created":
                _log.info("fleetlock_group_created", group=r.group, slots=r.slots, revision=r.revision)
            elif r.action == "kept":
                _log.warning("fleetlock_group_slots_differ", group=r.group, config_slots=r.slots,
                             stored_slots=r.previous_slots, note=r.note)
            elif r.action in ("invalid", "conflict"):
                _log.error("fleetlock_group_import_failed", group=r.group, action=r.action, note=r.note)
        self.imported.set()

    async def stop(self) -> None:
        if self._import_task is not None:
            self._import_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._import_task
            self._import_task = None
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()
        if self.service is not None:
            await self.service.close()
        if self._own_etcd and self._etcd is not None:
            await self._etcd.close()
            self._etcd = None

    async def __aenter__(self) -> FleetLockServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve_forever(server: FleetLockServer) -> None:
    """Start, run until SIGTERM or SIGINT, drain and stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        await stop.wait()
        _log.info("fleetlock_stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop()
