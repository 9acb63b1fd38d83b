"""Our agent's ``fleetlock`` strategy against our FleetLock server and against an airlock stand-in:
the slot backend over real HTTP, then full update cycles with coord's fleet rig (GPT disk, channel
over HTTP, private dbus-daemon with a stand-in logind that power-cycles the machine)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from airlock_standin import AirlockStandin
from fleetlockrig import apply, keys, running
from fleetrig import Fleet

from locksmith import audit
from locksmith.etcd import Etcd, EtcdConfig
from updateagent.strategy.coordinator import CoordState
from updateagent.strategy.fleetlock import FleetLockClient, FleetLockRefused, FleetLockSlot

GROUP = "prod"


@dataclass
class Server:
    kind: str
    url: str
    holders: Callable[[], Awaitable[list[str]]]
    standin: AirlockStandin | None = None


@contextlib.asynccontextmanager
async def server_of(kind: str, etcd: Etcd, etcd_config: EtcdConfig, prefix: str, slots: int = 1,
                    ) -> AsyncIterator[Server]:
    if kind == "ours":
        await apply(etcd, prefix, GROUP, f"slots = {slots}")
        async with running(etcd_config, prefix) as ours:

            async def held() -> list[str]:
                return sorted(k[len("holders/"):] for k in await keys(etcd, prefix, GROUP) if k.startswith("holders/"))

            yield Server(kind, ours.urls[0], held)
        return
    standin = await AirlockStandin(etcd, {GROUP: slots}, prefix=prefix).start()
    try:
        async def held_airlock() -> list[str]:
            return list((await standin.semaphore(GROUP)).get("holders", []))

        yield Server(kind, standin.url, held_airlock, standin)
    finally:
        await standin.stop()


def slot(url: str, state_dir: Path | None = None) -> FleetLockSlot:
    return FleetLockSlot(url, GROUP, state_dir=state_dir, retry_initial=0.02, retry_max=0.1, timeout=10)


@pytest.mark.parametrize("kind", ["ours", "airlock"])
async def test_backend_start_acquire_wait_release(kind: str, etcd: Etcd, etcd_config: EtcdConfig, prefix: str,
                                                  tmp_path: Path) -> None:
    async with server_of(kind, etcd, etcd_config, prefix) as srv:
        # A host that was reinstalled: the server still counts its slot, its state is gone.
        await FleetLockClient(srv.url, "node-a", GROUP).pre_reboot()
        assert await srv.holders() == ["node-a"]
        a = slot(srv.url, tmp_path / "a")
        a.agent_started("node-a", holding=False)
        await a.open("node-a")
        async with asyncio.timeout(30):
            await a.acquire("update to 2")  # waits for the start-up steady-state first
        assert await srv.holders() == ["node-a"]
        assert json.loads((tmp_path / "a" / "fleetlock.json").read_text())["held"] is True

        b = slot(srv.url, tmp_path / "b")
        b.agent_started("node-b", holding=False)
        await b.open("node-b")
        waiting = asyncio.create_task(b.acquire("update to 2"))
        async with asyncio.timeout(30):
            await b.wait_changed()  # refused: the slot is node-a's
        assert b.last_refusal is not None and b.last_refusal.kind == ("no_slot" if kind == "ours" else "failed_lock")
        assert not waiting.done()
        assert await a.release() is True
        async with asyncio.timeout(30):
            grant = await waiting
        assert grant.holder_id == "node-b" and await srv.holders() == ["node-b"]
        # A restarted agent that holds its slot mid-episode does not free it at start.
        b2 = slot(srv.url, tmp_path / "b")
        b2.agent_started("node-b", holding=True)
        assert (await b2.held()) is not None and await srv.holders() == ["node-b"]
        assert await b2.release() is True and await srv.holders() == []
        for s in (a, b, b2):
            await s.close()


@pytest.mark.parametrize("kind", ["ours", "airlock"])
async def test_a_cancelled_acquire_counts_as_held_until_released(kind: str, etcd: Etcd, etcd_config: EtcdConfig,
                                                                 prefix: str, tmp_path: Path) -> None:
    async with server_of(kind, etcd, etcd_config, prefix) as srv:
        s = slot(srv.url, tmp_path)
        await s.open("node-a")
        task = asyncio.create_task(s.acquire("x"))
        await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert await s.held() is not None  # the request may have been granted: say so
        await s.release()
        assert await s.held() is None and await srv.holders() == []
        await s.close()


async def test_client_reports_the_servers_error_and_survives_garbage(tmp_path: Path) -> None:
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        if request.path.endswith("pre-reboot"):
            return web.Response(status=503, body=b"\x00" * 10_000)
        return web.json_response({"kind": "maintenance", "value": "try later"}, status=502,
                                 headers={"Retry-After": "7"})

    app = web.Application()
    app.router.add_post("/base/v1/pre-reboot", handler)
    app.router.add_post("/base/v1/steady-state", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/base"  # type: ignore[union-attr]
    try:
        c = FleetLockClient(url, "a", GROUP)
        with pytest.raises(FleetLockRefused) as err:
            await c.pre_reboot()
        assert (err.value.status, err.value.kind) == (503, "generic_http_503")
        with pytest.raises(FleetLockRefused) as err:
            await c.steady_state()
        assert (err.value.kind, err.value.value, err.value.retry_after) == ("maintenance", "try later", 7.0)
        await c.close()
        with pytest.raises(FleetLockRefused) as err:
            await FleetLockClient("http://127.0.0.1:9", "a", GROUP, timeout=5).pre_reboot()
        assert err.value.kind == "client_failed_request"
    finally:
        await runner.cleanup()


# -- full cycles ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ours", "airlock"])
async def test_agent_full_update_cycle_with_fleetlock(kind: str, tmp_path: Path, etcd: Etcd,
                                                      etcd_config: EtcdConfig, prefix: str) -> None:
    from updateagent.agent import Phase

    async with server_of(kind, etcd, etcd_config, prefix) as srv:
        fleet = await Fleet(tmp_path, etcd_config, prefix, group=GROUP, strategy="fleetlock").open()
        try:
            fleet.publish("2.0.0")
            (m,) = fleet.add(1)
            m.configure(fleetlock={"url": srv.url, "group": GROUP})
            await m.start()
            assert m.agent is not None
            m.agent.request_check()
            async with asyncio.timeout(120):
                if srv.standin is not None:
                    await srv.standin.wait(lambda: [c.endpoint for c in srv.standin.calls].count("steady-state") == 2)
                else:
                    await fleet.watch.wait(lambda: fleet.watch.releases(m.machine_id) == 1)
            await m.wait_state(CoordState.IDLE)
            assert m.reboots() == 1 and m.agent is not None and m.agent.phase is Phase.IDLE
            assert m.agent.state.current_version == "2.0.0"
            assert m.agent.state.last_boot_outcome == "success"
            assert await srv.holders() == []
            if kind == "ours":
                assert fleet.watch.grants(m.machine_id) == 1 and fleet.watch.releases(m.machine_id) == 1
                trail = [(e.action, e.subject, e.reason) for e in await audit.read(fleet.etcd, fleet.layout)]
                assert [t[:2] for t in trail if t[0] in ("lock", "unlock")] == [("lock", m.machine_id),
                                                                                 ("unlock", m.machine_id)]
            else:
                assert srv.standin is not None
                # Zincati's sequence: steady-state at start, pre-reboot, (reboot), steady-state
                # once healthy; no steady-state at the start after the reboot (the slot is in use
                # until the health verdict).
                assert [(c.endpoint, c.id, c.status) for c in srv.standin.calls] == [
                    ("steady-state", m.machine_id, 200), ("pre-reboot", m.machine_id, 200),
                    ("steady-state", m.machine_id, 200)]
        finally:
            await fleet.close()


class RecordingClock:
    """The backend's clock: records each backoff sleep and returns at once; the test stops the
    retries after ``stop_after`` sleeps by cancelling."""

    def __init__(self, stop_after: int) -> None:
        self.sleeps: list[float] = []
        self.stop_after = stop_after
        self.enough = asyncio.Event()
        self._now = datetime(2026, 11, 28, tzinfo=UTC)

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return 0.0

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if len(self.sleeps) >= self.stop_after:
            self.enough.set()
            await asyncio.Event().wait()
        await asyncio.sleep(0)


@pytest.mark.parametrize("retry_after", [None, 3600])
async def test_pre_reboot_backs_off_with_jitter_and_a_cap(retry_after: int | None, tmp_path: Path) -> None:
    from aiohttp import web

    async def refuse(request: web.Request) -> web.Response:
        headers = {"Retry-After": str(retry_after)} if retry_after else {}
        return web.json_response({"kind": "no_slot", "value": "full"}, status=409, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/pre-reboot", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    clock = RecordingClock(stop_after=12)
    s = FleetLockSlot(url, GROUP, state_dir=tmp_path, clock=clock)  # the real 1 s .. 300 s schedule
    await s.open("node-a")
    task = asyncio.create_task(s.acquire("x"))
    try:
        async with asyncio.timeout(30):
            await clock.enough.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await s.close()
        await runner.cleanup()
    if retry_after is None:
        for i, slept in enumerate(clock.sleeps):
            nominal = min(2.0 ** i, 300.0)
            assert 0.8 * nominal <= slept <= 1.2 * nominal, (i, slept)
        assert len({round(x / min(2.0 ** i, 300.0), 3) for i, x in enumerate(clock.sleeps)}) > 1  # jittered
    else:
        assert all(240 <= slept <= 360 for slept in clock.sleeps)  # Retry-After, capped at 5 min
    assert s.last_refusal is not None and s.last_refusal.kind == "no_slot"


def test_a_bad_url_is_a_config_error_at_start(tmp_path: Path) -> None:
    from dataclasses import replace

    from updateagent.config import AgentSettings, ConfigError, FleetLockSettings
    from updateagent.strategy.fleetlock import build_fleetlock_backend

    base = replace(AgentSettings(), state_dir=tmp_path)
    for url, words in (("http://", r"is not http\(s\)://host"), (None, "url is required")):
        with pytest.raises(ConfigError, match=words):
            build_fleetlock_backend(replace(base, fleetlock=FleetLockSettings(url=url, group=GROUP)))
    ok = build_fleetlock_backend(replace(base, fleetlock=FleetLockSettings(url="https://fl.example:9090/x",
                                                                          group=GROUP)))
    assert (ok.url, ok.group, ok.state_path) == ("https://fl.example:9090/x", GROUP, tmp_path / "fleetlock.json")


async def test_a_token_in_the_url_reaches_a_server_that_wants_one(etcd: Etcd, etcd_config: EtcdConfig,
                                                                  prefix: str, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    await apply(etcd, prefix, GROUP)
    async with running(etcd_config, prefix, token_file=str(token)) as srv:
        with_token = srv.urls[0].replace("http://", "http://fleetlock:s3cret@")
        await FleetLockClient(with_token, "node-a", GROUP).pre_reboot()
        with pytest.raises(FleetLockRefused) as err:
            await FleetLockClient(srv.urls[0], "node-b", GROUP).pre_reboot()
        assert (err.value.status, err.value.kind) == (401, "unauthorized")
    assert "holders/node-a" in await keys(etcd, prefix, GROUP)
