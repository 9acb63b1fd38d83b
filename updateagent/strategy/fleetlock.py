"""``fleetlock``: the coordinator's slot comes from a FleetLock server (Zincati's protocol): our
own ``locksmithctl fleetlock serve``, or airlock.

- ``acquire`` is ``POST <url>/v1/pre-reboot``, repeated until a 200, with exponential backoff
  (1 s doubling to 5 min, like Zincati's tick at its slowest) and ±20 % jitter so that a fleet
  refused together does not ask again together. A ``Retry-After`` from the server (ours sends it
  for a closed window or a cooldown) lengthens the wait, up to the cap.
- ``release`` is ``POST <url>/v1/steady-state``, repeated until a 200.
- At every agent start, unless the coordinator's record says this host is inside an episode that
  holds its slot (rebooting, after the boot until healthy, failed keeping it), the backend sends
  steady-state until accepted, as Zincati does at start: a host that was reinstalled, or whose
  state was lost, frees the slot it held. A pre-reboot waits for that steady-state to finish.
- The server decides about the group (its windows, pause, cooldown, queue); the coordinator still
  applies this host's own window (``[reboot] windows``), the hooks, logged-in users and the health
  verdict, as with etcd-lock. An airlock server has no windows: the local window is the only one.
- FleetLock has no read and no failure report. Whether this host holds its slot is what the
  server last said (200 to pre-reboot: held; 200 to steady-state: not), kept in
  ``fleetlock.json`` in the state directory so that it survives a restart. A pre-reboot cut off
  mid-flight (the window closed) counts as held, so that the coordinator sends steady-state.
  A failed boot keeps the slot (the gate's ``on_timeout`` is ``hold``): with no failure budget in
  the protocol, a held slot is how a bad release stops the rollout; an operator frees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from yarl import URL

from locksmith.clock import SYSTEM_CLOCK, Clock
from locksmith.log import get_logger
from updateagent._atomic import write_atomic
from updateagent.strategy.coordinator import Gate, Grant, QueueInfo

if TYPE_CHECKING:
    from updateagent.config import AgentSettings

__all__ = ["FleetLockClient", "FleetLockRefused", "FleetLockSlot", "build_fleetlock_backend"]

log = get_logger("updateagent.fleetlock")

RETRY_INITIAL = 1.0
RETRY_MAX = 300.0
JITTER = 0.2
REQUEST_TIMEOUT = 30.0
_PLACE = re.compile(r"you are (\d+)\w\w of (\d+) in line")


class FleetLockRefused(Exception):
    """A non-200 answer: ``kind`` and ``value`` from the server's JSON, or generic ones."""

    def __init__(self, status: int, kind: str, value: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} {kind}: {value}")
        self.status = status
        self.kind = kind
        self.value = value
        self.retry_after = retry_after


class FleetLockClient:
    """The two FleetLock calls, one request each."""

    def __init__(self, url: str, node_id: str, group: str, *, timeout: float = REQUEST_TIMEOUT) -> None:
        base = URL(url)
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"FleetLock URL {url!r} is not http(s)://host[:port][/path]")
        # A base path is kept (Zincati's url join would drop its last segment without a slash).
        self.base = base if base.path.endswith("/") else base.with_path(base.path + "/")
        self.body = json.dumps({"client_params": {"id": node_id, "group": group}}).encode()
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def pre_reboot(self) -> None:
        await self._post("v1/pre-reboot")

    async def steady_state(self) -> None:
        await self._post("v1/steady-state")

    async def _post(self, path: str) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        url = self.base.join(URL(path))
        try:
            async with self._session.post(url, data=self.body, headers={"fleet-lock-protocol": "true"},
                                          allow_redirects=False) as r:
                if r.status == 200:
                    return
                raw = await r.content.read(4096)  # an error body is small; never read a huge one
                retry_after = _retry_after(r.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FleetLockRefused(0, "client_failed_request", f"{url}: {exc or type(exc).__name__}") from None
        kind, value = f"generic_http_{r.status}", "(unknown/generic server error)"
        with contextlib.suppress(ValueError, AttributeError):
            doc = json.loads(raw)
            if isinstance(doc.get("kind"), str) and isinstance(doc.get("value"), str):
                kind, value = doc["kind"][:64], doc["value"][:500]
        raise FleetLockRefused(r.status, kind, value, retry_after)


def _retry_after(header: str | None) -> float | None:
    if header is None or not header.strip().isdigit():
        return None
    return float(header.strip())


@dataclass
class _Belief:
    held: bool = False
    since: str = ""


class FleetLockSlot:
    kind = "fleetlock"

    def __init__(self, url: str, group: str, *, state_dir: Path | None = None, clock: Clock = SYSTEM_CLOCK,
                 retry_initial: float = RETRY_INITIAL, retry_max: float = RETRY_MAX,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        self.url = url
        self.group = group
        self.clock = clock
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.timeout = timeout
        self.state_path = state_dir / "fleetlock.json" if state_dir is not None else None
        self.holder_id = ""
        self.client: FleetLockClient | None = None
        self.last_refusal: FleetLockRefused | None = None
        self._belief = self._load()
        self._startup: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    # ----------------------------------------------------------------------- life

    def agent_started(self, holder_id: str, holding: bool) -> None:
        """Called by the coordinator at every agent start (see the module docstring)."""
        self.holder_id = self.holder_id or holder_id
        if holding or self._startup is not None:
            return
        self._startup = asyncio.create_task(self._startup_steady_state(), name="fleetlock-startup-steady-state")

    async def _startup_steady_state(self) -> None:
        await self._ensure_client()
        await self._until_ok("steady-state", "agent start")
        self._save(_Belief())

    async def open(self, holder_id: str) -> None:
        self.holder_id = holder_id
        await self._ensure_client()

    async def _ensure_client(self) -> FleetLockClient:
        if self.client is None:
            node_id = self.holder_id or await _machine_id()
            self.holder_id = node_id
            self.client = FleetLockClient(self.url, node_id, self.group, timeout=self.timeout)
        return self.client

    async def close(self) -> None:
        if self._startup is not None:
            self._startup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._startup
        if self.client is not None:
            await self.client.close()
            self.client = None

    # ----------------------------------------------------------------------- the gate

    def gate(self) -> Gate:
        # The server applies the group's windows, pause and cooldown by refusing pre-reboot.
        problem = ""
        if self.last_refusal is not None:
            problem = f"{self.last_refusal.kind}: {self.last_refusal.value}"
        return Gate(group=self.group, on_timeout="hold", ready=True, problem=problem)

    async def wait_changed(self) -> None:
        """Returns after the next refusal (a FleetLock server pushes nothing: what changes is what
        its last answer said, e.g. the place in line)."""
        await self._changed.wait()

    # ----------------------------------------------------------------------- the slot

    async def acquire(self, reason: str) -> Grant:
        del reason  # the protocol carries none
        if self._startup is not None:
            await asyncio.shield(self._startup)  # never let a start-up steady-state free this grant
        await self._ensure_client()
        self._save(_Belief(held=True, since=""))  # cut off mid-request: the server may have granted
        try:
            await self._until_ok("pre-reboot", "reboot needed")
        except asyncio.CancelledError:
            raise  # the belief stays "held": the coordinator's held() then release() clean up
        except BaseException:
            self._save(_Belief())
            raise
        now = self.clock.now()
        self.last_refusal = None
        self._save(_Belief(held=True, since=now.isoformat()))
        return Grant(self.holder_id, now, 0)

    async def held(self) -> Grant | None:
        if not self._belief.held:
            return None
        since = _parse(self._belief.since) or self.clock.now()
        return Grant(self.holder_id, since, 0)

    async def release(self) -> bool:
        was = self._belief.held
        await self._ensure_client()
        await self._until_ok("steady-state", "release")
        self._save(_Belief())
        return was

    async def _until_ok(self, op: str, why: str) -> None:
        client = await self._ensure_client()
        call = client.pre_reboot if op == "pre-reboot" else client.steady_state
        attempt = 0
        while True:
            try:
                await call()
                log.info("fleetlock_accepted", op=op, why=why, group=self.group, attempts=attempt + 1)
                return
            except FleetLockRefused as exc:
                if op == "pre-reboot":
                    self.last_refusal = exc
                    changed, self._changed = self._changed, asyncio.Event()
                    changed.set()
                delay = min(self.retry_initial * 2 ** min(attempt, 20), self.retry_max)
                if exc.retry_after is not None:
                    delay = min(max(delay, exc.retry_after), self.retry_max)
                delay *= random.uniform(1 - JITTER, 1 + JITTER)
                # 409 is ours saying "not now"; airlock says "slots full" with a 500 failed_lock.
                level = log.info if exc.status == 409 or exc.kind == "failed_lock" else log.warning
                level("fleetlock_refused", op=op, why=why, group=self.group, status=exc.status, kind=exc.kind,
                      value=exc.value, retry_in=round(delay, 1))
                attempt += 1
                await self.clock.sleep(delay)

    async def report_failure(self, kind: str, detail: str, incident: str) -> str:
        log.warning("fleetlock_failure_not_reported", kind=kind, detail=detail, incident=incident)
        return "FleetLock has no failure report: the slot is kept so that the rollout stops (on_timeout = hold)"

    # ----------------------------------------------------------------------- the group

    def queue(self) -> QueueInfo | None:
        r = self.last_refusal
        if r is None:
            return None
        m = _PLACE.search(r.value)  # our server says "you are 3rd of 7 in line"; airlock says nothing
        if m is None:
            return None
        return QueueInfo(position=int(m.group(1)), length=int(m.group(2)), holders=0, slots=0,
                         paused=r.kind == "paused")

    async def tend(self, now: datetime) -> datetime | None:
        return None  # the server deals with overdue holders

    def group_metrics(self) -> dict[str, float]:
        return {}

    # ----------------------------------------------------------------------- the belief

    def _load(self) -> _Belief:
        if self.state_path is None:
            return _Belief()
        from locksmith.files import InputFileError, read_text

        try:
            doc = json.loads(read_text(self.state_path, max_bytes=4096, what="FleetLock state"))
            return _Belief(held=bool(doc.get("held")), since=str(doc.get("since") or ""))
        except InputFileError:
            return _Belief()
        except (ValueError, AttributeError) as exc:
            log.error("fleetlock_state_corrupt", path=str(self.state_path), error=str(exc))
            return _Belief(held=True)  # unsure: the coordinator will send steady-state

    def _save(self, belief: _Belief) -> None:
        self._belief = belief
        if self.state_path is None:
            return
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.state_path, json.dumps({"held": belief.held, "since": belief.since,
                                                      "url": self.url, "group": self.group}).encode())
        except OSError as exc:
            log.error("fleetlock_state_save_failed", path=str(self.state_path), error=str(exc))


def _parse(text: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


async def _machine_id() -> str:
    from locksmith.machineid import machine_id

    return await asyncio.to_thread(machine_id)


def build_fleetlock_backend(settings: AgentSettings, *, clock: Clock = SYSTEM_CLOCK) -> FleetLockSlot:
    fl = settings.fleetlock
    if not fl.url:
        from updateagent.config import ConfigError

        raise ConfigError("[fleetlock] url is required when reboot.strategy = 'fleetlock'")
    try:
        FleetLockClient(fl.url, "check", fl.group)  # the URL's shape, checked at start, not at the first reboot
    except ValueError as exc:
        from updateagent.config import ConfigError

        raise ConfigError(f"[fleetlock] url: {exc}") from None
    return FleetLockSlot(fl.url, fl.group, state_dir=settings.state_dir, clock=clock)

