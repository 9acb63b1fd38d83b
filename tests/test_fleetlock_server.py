"""The FleetLock server against the protocol's curl cases: real HTTP requests to a real server on
127.0.0.1 over the embedded etcd. Each case checks the status, the JSON kind, and what was written
to etcd: every key under the test's prefix with its mod revision, read before and after (the
server writes nowhere else; the global revision would also count other tests' expiring leases).
Nothing changes, except where the request must write (a grant, a release, a place in line)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from fleetlockrig import HEADERS, apply, body, call, changes, keys, pre_reboot, running, snapshot, steady_state

from locksmith import audit
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.keys import Layout
from locksmith.policystore import pause

GROUP = "workers"


@pytest.fixture
async def session() -> aiohttp.ClientSession:
    async with aiohttp.ClientSession() as s:
        yield s


async def _unchanged(etcd: Etcd, prefix: str, before: dict[str, int]) -> None:
    assert (await changes(etcd, prefix, before)).none


@pytest.mark.parametrize(("case", "path", "method", "headers", "data", "status", "kind"), [
    ("missing header", "/v1/pre-reboot", "POST", {}, body("a", GROUP), 400, "bad_header"),
    ("wrong header value", "/v1/pre-reboot", "POST", {"fleet-lock-protocol": "yes"}, body("a", GROUP), 400,
     "bad_header"),
    ("invalid JSON", "/v1/pre-reboot", "POST", HEADERS, b'{"client_params": {"id": "a",', 400, "bad_json"),
    ("empty id", "/v1/pre-reboot", "POST", HEADERS, body("", GROUP), 400, "bad_id"),
    ("bad group name", "/v1/pre-reboot", "POST", HEADERS, body("a", "work_ers!"), 400, "bad_group"),
    ("body over the size limit", "/v1/pre-reboot", "POST", HEADERS,
     json.dumps({"client_params": {"id": "a", "group": GROUP}, "pad": "x" * 5000}).encode(), 413, "too_large"),
    ("unknown path", "/v1/pre-rebooot", "POST", HEADERS, body("a", GROUP), 404, "not_found"),
    ("GET instead of POST", "/v1/pre-reboot", "GET", HEADERS, b"", 405, "method_not_allowed"),
    ("steady-state without header", "/v1/steady-state", "POST", {}, body("a", GROUP), 400, "bad_header"),
], ids=lambda v: v if isinstance(v, str) and " " in v else "")
async def test_bad_requests_are_refused_and_write_nothing(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str, session: aiohttp.ClientSession, case: str, path: str,
        method: str, headers: dict[str, str], data: bytes, status: int, kind: str) -> None:
    await apply(etcd, prefix, GROUP, "slots = 1")
    async with running(etcd_config, prefix) as server:
        before = await snapshot(etcd, prefix)
        reply = await call(session, server.urls[0] + path, method=method, data=data, headers=headers)
        assert (reply.status, reply.kind) == (status, kind), case
        assert reply.doc["value"], case
        await _unchanged(etcd, prefix, before)


async def test_recursive_lock_is_200_and_writes_once(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str, session: aiohttp.ClientSession) -> None:
    await apply(etcd, prefix, GROUP, "slots = 1")
    async with running(etcd_config, prefix) as server:
        base = server.urls[0]
        before = await snapshot(etcd, prefix)
        first = await pre_reboot(session, base, "node-a", GROUP)
        assert (first.status, first.doc) == (200, None)
        wrote = await changes(etcd, prefix, before)
        # holder key and audit entry, in one transaction
        assert wrote.keys("groups/") == {f"groups/{GROUP}/holders/node-a"} and len(wrote.keys("audit/")) == 1
        assert len(wrote.revisions) == 1 and not wrote.deleted
        before = await snapshot(etcd, prefix)
        again = await pre_reboot(session, base, "node-a", GROUP)
        assert again.status == 200
        await _unchanged(etcd, prefix, before)
        held = json.loads((await keys(etcd, prefix, GROUP))["holders/node-a"])
        assert held["reason"].startswith("via fleetlock from 127.0.0.1")
        entries = await audit.read(etcd, Layout(GROUP, prefix))
        assert [(e.action, e.subject) for e in entries][-1] == ("lock", "node-a")
        assert "via fleetlock" in entries[-1].reason and entries[-1].detail["client"] == "127.0.0.1"


async def test_unlock_of_a_non_holder_is_200_and_writes_nothing(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str, session: aiohttp.ClientSession) -> None:
    await apply(etcd, prefix, GROUP, "slots = 1")
    async with running(etcd_config, prefix) as server:
        base = server.urls[0]
        assert (await pre_reboot(session, base, "node-a", GROUP)).status == 200
        before = await snapshot(etcd, prefix)
        reply = await steady_state(session, base, "node-b", GROUP)
        assert (reply.status, reply.doc) == (200, None)
        await _unchanged(etcd, prefix, before)
        # and the holder's own steady-state releases, audited with the client's address
        assert (await steady_state(session, base, "node-a", GROUP)).status == 200
        wrote = await changes(etcd, prefix, before)
        assert wrote.deleted == {f"groups/{GROUP}/holders/node-a"} and set(wrote.put) == wrote.keys("audit/")
        assert len(wrote.revisions) == 1
        assert "holders/node-a" not in await keys(etcd, prefix, GROUP)
        last = (await audit.read(etcd, Layout(GROUP, prefix)))[-1]
        assert (last.action, last.subject) == ("unlock", "node-a")
        assert last.reason == "via fleetlock from 127.0.0.1"


async def test_full_group_refuses_with_no_slot_and_keeps_the_place(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str, session: aiohttp.ClientSession) -> None:
    await apply(etcd, prefix, GROUP, "slots = 1")
    async with running(etcd_config, prefix) as server:
        base = server.urls[0]
        assert (await pre_reboot(session, base, "node-a", GROUP)).status == 200
        before = await snapshot(etcd, prefix)
        reply = await pre_reboot(session, base, "node-b", GROUP)
        assert (reply.status, reply.kind) == (409, "no_slot")
        assert "node-a" in reply.doc["value"] and "1st of 1 in line" in reply.doc["value"]
        # the one write: node-b's place in line
        wrote = await changes(etcd, prefix, before)
        assert set(wrote.put) == {f"groups/{GROUP}/queue/node-b"} and not wrote.deleted
        before = await snapshot(etcd, prefix)
        again = await pre_reboot(session, base, "node-b", GROUP)
        assert (again.status, again.kind) == (409, "no_slot")
        await _unchanged(etcd, prefix, before)  # asking again only keeps the lease alive
        # a later host is behind node-b even once the slot is free
        assert (await pre_reboot(session, base, "node-c", GROUP)).kind == "no_slot"
        assert (await steady_state(session, base, "node-a", GROUP)).status == 200
        late = await pre_reboot(session, base, "node-c", GROUP)
        assert (late.status, late.kind) == (409, "no_slot")
        assert "2nd of 2" in late.doc["value"]
        assert (await pre_reboot(session, base, "node-b", GROUP)).status == 200
        assert "queue/node-b" not in await keys(etcd, prefix, GROUP)


async def test_closed_window_refuses_with_outside_window(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str, session: aiohttp.ClientSession) -> None:
    opens = (datetime.now(UTC) + timedelta(hours=6)).replace(second=0, microsecond=0)
    await apply(etcd, prefix, GROUP, f'slots = 2\n[[windows]]\nstart = "{opens:%H:%M}"\nlength = "1h"\n')
    async with running(etcd_config, prefix) as server:
        before = await snapshot(etcd, prefix)
        reply = await pre_reboot(session, server.urls[0], "node-a", GROUP)
        assert (reply.status, reply.kind) == (409, "outside_window")
        assert f"{opens:%H:%M} UTC" in reply.doc["value"]
        assert 5 * 3600 < int(reply.headers["Retry-After"]) <= 6 * 3600 + 60
        wrote = await changes(etcd, prefix, before)  # its place in line, nothing else
        assert set(wrote.put) == {f"groups/{GROUP}/queue/node-a"} and not wrote.deleted


async def test_paused_group_refuses_with_paused(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str, session: aiohttp.ClientSession) -> None:
    await apply(etcd, prefix, GROUP, "slots = 3")
    await pause(etcd, GROUP, "bad release 1.2.3", prefix=prefix)
    async with running(etcd_config, prefix) as server:
        before = await snapshot(etcd, prefix)
        reply = await pre_reboot(session, server.urls[0], "node-a", GROUP)
        assert (reply.status, reply.kind) == (409, "paused")
        assert "bad release 1.2.3" in reply.doc["value"]
        wrote = await changes(etcd, prefix, before)  # its place in line, nothing else
        assert set(wrote.put) == {f"groups/{GROUP}/queue/node-a"} and not wrote.deleted


async def test_unknown_group_is_refused_on_both_endpoints(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str, session: aiohttp.ClientSession) -> None:
    async with running(etcd_config, prefix) as server:
        before = await snapshot(etcd, prefix)
        for reply in (await pre_reboot(session, server.urls[0], "a", "nosuch"),
                      await steady_state(session, server.urls[0], "a", "nosuch")):
            assert (reply.status, reply.kind) == (400, "unknown_group")
        await _unchanged(etcd, prefix, before)
    async with running(etcd_config, prefix, any_group=True) as server:
        assert (await pre_reboot(session, server.urls[0], "a", "nosuch")).status == 200


async def test_cooldown_refuses_until_the_freed_slot_cools(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str, session: aiohttp.ClientSession) -> None:
    await apply(etcd, prefix, GROUP, 'slots = 1\ncooldown = "1h"')
    async with running(etcd_config, prefix) as server:
        base = server.urls[0]
        assert (await pre_reboot(session, base, "node-a", GROUP)).status == 200
        assert (await steady_state(session, base, "node-a", GROUP)).status == 200
        reply = await pre_reboot(session, base, "node-b", GROUP)
        assert (reply.status, reply.kind) == (409, "cooldown")
        assert "1h cooldown" in reply.doc["value"]
        assert 3500 < int(reply.headers["Retry-After"]) <= 3602


async def test_strategy_off_refuses_without_queueing(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str, session: aiohttp.ClientSession) -> None:
    await apply(etcd, prefix, GROUP, 'strategy = "off"')
    async with running(etcd_config, prefix) as server:
        before = await snapshot(etcd, prefix)
        reply = await pre_reboot(session, server.urls[0], "node-a", GROUP)
        assert (reply.status, reply.kind) == (409, "reboots_off")
        await _unchanged(etcd, prefix, before)


async def test_steady_state_of_a_queued_host_gives_up_its_place(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str, session: aiohttp.ClientSession) -> None:
    await apply(etcd, prefix, GROUP, "slots = 1")
    async with running(etcd_config, prefix) as server:
        base = server.urls[0]
        await pre_reboot(session, base, "node-a", GROUP)
        assert (await pre_reboot(session, base, "node-b", GROUP)).kind == "no_slot"
        assert (await steady_state(session, base, "node-b", GROUP)).status == 200
        assert "queue/node-b" not in await keys(etcd, prefix, GROUP)


async def test_token_ready_and_metrics(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str, session: aiohttp.ClientSession, tmp_path: Path) -> None:
    await apply(etcd, prefix, GROUP)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    async with running(etcd_config, prefix, token_file=str(token)) as server:
        base = server.urls[0]
        before = await snapshot(etcd, prefix)
        revision = await etcd.revision()
        denied = await pre_reboot(session, base, "a", GROUP)
        assert (denied.status, denied.kind) == (401, "unauthorized")
        wrong = await call(session, f"{base}/v1/pre-reboot", data=body("a", GROUP),
                           headers={**HEADERS, "Authorization": "Bearer nope"})
        assert wrong.kind == "unauthorized"
        await _unchanged(etcd, prefix, before)
        ok = await call(session, f"{base}/v1/pre-reboot", data=body("a", GROUP),
                        headers={**HEADERS, "Authorization": "Bearer s3cret"})
        assert ok.status == 200
        basic = "Basic " + base64.b64encode(b"fleetlock:s3cret").decode()
        assert (await call(session, f"{base}/v1/steady-state", data=body("a", GROUP),
                           headers={**HEADERS, "Authorization": basic})).status == 200
        ready = await call(session, f"{base}/-/ready", method="GET", headers={})
        assert ready.status == 200 and ready.doc["etcd_revision"] > revision
        assert (await call(session, f"{base}/metrics", method="GET", headers={})).kind == "unauthorized"
        async with session.get(f"{base}/metrics", headers={"Authorization": "Bearer s3cret"}) as r:
            text = await r.text()
        assert 'fleetlock_requests_total{endpoint="pre-reboot",kind="unauthorized",result="error"} 2.0' in text
        assert 'fleetlock_requests_total{endpoint="pre-reboot",kind="granted",result="ok"} 1.0' in text
        assert 'fleetlock_requests_total{endpoint="steady-state",kind="released",result="ok"} 1.0' in text


async def test_ready_reports_etcd_down(prefix: str, session: aiohttp.ClientSession) -> None:
    from locksmith.embedded import _free_ports

    dead = EtcdConfig(endpoints=(f"http://127.0.0.1:{_free_ports(1)[0]}",), timeout=1.0, attempt_timeout=0.5)
    async with running(dead, prefix, any_group=True) as server:
        ready = await call(session, f"{server.urls[0]}/-/ready", method="GET", headers={})
        assert (ready.status, ready.kind) == (503, "etcd_unavailable")
        reply = await pre_reboot(session, server.urls[0], "a", GROUP)
        assert (reply.status, reply.kind) == (503, "etcd_unavailable")
    # With airlock's [lock] groups still to be written, the replica is not ready.
    async with running(dead, prefix, groups={"default": 2}) as server:
        ready = await call(session, f"{server.urls[0]}/-/ready", method="GET", headers={})
        assert (ready.status, ready.kind) == (503, "not_ready")


async def test_base_path_serves_zincati_style_urls(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str, session: aiohttp.ClientSession) -> None:
    from locksmith.fleetlock.config import parse_settings

    assert parse_settings('[service]\nbase_path = "/fleet_lock"\n').base_path == "/fleet_lock/"
    await apply(etcd, prefix, GROUP)
    async with running(etcd_config, prefix, base_path="/fleet_lock/") as server:
        base = server.urls[0]
        assert (await pre_reboot(session, f"{base}/fleet_lock", "a", GROUP)).status == 200
        assert (await pre_reboot(session, base, "a", GROUP)).kind == "not_found"


async def test_mutual_tls(etcd: Etcd, etcd_config: EtcdConfig, prefix: str, tmp_path: Path) -> None:
    from pki import make_pki  # the suite's one test CA

    pki = make_pki(tmp_path, clients=("client",), rogue=("rogue",))
    ca_path = pki.ca
    server_cert, server_key = pki.members[0].cert, pki.members[0].key
    client_cert, client_key = pki.clients["client"].cert, pki.clients["client"].key
    rogue_cert, rogue_key = pki.rogue["rogue"].cert, pki.rogue["rogue"].key
    await apply(etcd, prefix, GROUP)
    async with running(etcd_config, prefix, tls=True, tls_cert_file=str(server_cert), tls_key_file=str(server_key),
                       client_ca_file=str(ca_path)) as server:
        base = server.urls[0]
        assert base.startswith("https://")
        for cert in (None, (rogue_cert, rogue_key)):
            ctx = ssl.create_default_context(cafile=str(ca_path))
            if cert is not None:
                ctx.load_cert_chain(str(cert[0]), str(cert[1]))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as refused:
                with pytest.raises(aiohttp.ClientError):
                    await pre_reboot(refused, base, "a", GROUP)
        ctx = ssl.create_default_context(cafile=str(ca_path))
        ctx.load_cert_chain(str(client_cert), str(client_key))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as with_cert:
            assert (await pre_reboot(with_cert, base, "a", GROUP)).status == 200


async def _stopped(pid: int) -> None:
    """Until the child ``pid`` has stopped: kill(SIGSTOP) returns before the kernel has stopped
    every thread of a busy process; waitid(WSTOPPED) reports the completed stop (WNOWAIT leaves
    the state for Popen)."""
    async with asyncio.timeout(10):
        await asyncio.to_thread(os.waitid, os.P_PID, pid, os.WSTOPPED | os.WNOWAIT)


async def test_a_slow_client_and_a_frozen_etcd_get_a_timeout_not_a_hang(prefix: str) -> None:
    from locksmith.embedded import EmbeddedEtcd

    with EmbeddedEtcd() as own:
        etcd = await Etcd.connect(own.config())
        try:
            await apply(etcd, prefix, GROUP)
            async with running(own.config(timeout=30.0), prefix, request_timeout=timedelta(seconds=1)) as server, \
                    aiohttp.ClientSession() as session:
                host, port = server.urls[0].removeprefix("http://").rsplit(":", 1)
                # A client that sends its headers and half its body, then nothing.
                reader, writer = await asyncio.open_connection(host, int(port))
                raw = body("a", GROUP)
                writer.write(b"POST /v1/pre-reboot HTTP/1.1\r\nHost: x\r\nfleet-lock-protocol: true\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(raw) + raw[: len(raw) // 2])
                await writer.drain()
                async with asyncio.timeout(20):
                    status_line = await reader.readline()
                assert status_line.startswith(b"HTTP/1.1 503"), status_line
                writer.close()
                # A client that trickles its headers and never ends them is cut off too.
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"POST /v1/pre-reboot HTTP/1.1\r\nHost: x\r\n")
                async with asyncio.timeout(20):
                    with contextlib.suppress(ConnectionError):
                        for _ in range(100):
                            writer.write(b"X-Slow: 1\r\n")
                            await writer.drain()
                            if reader.at_eof():
                                break
                            with contextlib.suppress(TimeoutError):
                                async with asyncio.timeout(0.2):
                                    await reader.read(1)
                    try:
                        rest = await reader.read()
                    except ConnectionError:  # reset rather than closed: cut off all the same
                        rest = b""
                    assert rest == b""
                writer.close()
                # etcd frozen (SIGSTOP): the request ends at request_timeout with kind "timeout".
                own.members[0].pause()
                await _stopped(own.members[0].proc.pid)  # type: ignore[union-attr]
                try:
                    async with asyncio.timeout(20):
                        reply = await pre_reboot(session, server.urls[0], "b", GROUP)
                finally:
                    own.members[0].resume()
                assert (reply.status, reply.kind) == (503, "timeout")
        finally:
            await etcd.close()


async def test_forwarded_for_is_the_audited_address_only_when_trusted(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str, session: aiohttp.ClientSession) -> None:
    await apply(etcd, prefix, GROUP, "slots = 2")
    fwd = {**HEADERS, "X-Forwarded-For": "10.1.2.3, 10.0.0.1"}
    async with running(etcd_config, prefix) as server:
        await call(session, f"{server.urls[0]}/v1/pre-reboot", data=body("a", GROUP), headers=fwd)
    async with running(etcd_config, prefix, trust_forwarded_for=True) as server:
        await call(session, f"{server.urls[0]}/v1/pre-reboot", data=body("b", GROUP), headers=fwd)
    locks = {e.subject: e.detail["client"] for e in await audit.read(etcd, Layout(GROUP, prefix))
             if e.action == "lock"}
    assert locks == {"a": "127.0.0.1", "b": "10.0.0.1"}  # the proxy's entry, not the client's claim


async def test_a_corrupt_stored_value_is_a_500_naming_the_key(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str, session: aiohttp.ClientSession) -> None:
    await apply(etcd, prefix, GROUP, "slots = 2")
    await etcd.put(Layout(GROUP, prefix).holder("node-x"), b"not json")
    async with running(etcd_config, prefix) as server:
        before = await snapshot(etcd, prefix)
        for reply in (await pre_reboot(session, server.urls[0], "node-a", GROUP),
                      await steady_state(session, server.urls[0], "node-x", GROUP)):
            assert (reply.status, reply.kind) == (500, "corrupt_state"), reply
            assert "holders/node-x" in reply.doc["value"]
        await _unchanged(etcd, prefix, before)


async def test_a_host_keeps_its_place_while_it_asks_and_loses_it_when_it_stops(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str, session: aiohttp.ClientSession) -> None:
    layout = Layout(GROUP, prefix)
    await apply(etcd, prefix, GROUP, "slots = 1")
    async with running(etcd_config, prefix, queue_ttl=timedelta(seconds=2)) as server:
        base = server.urls[0]
        assert (await pre_reboot(session, base, "node-a", GROUP)).status == 200
        assert (await pre_reboot(session, base, "node-b", GROUP)).kind == "no_slot"
        place = await etcd.get(layout.waiter("node-b"))
        assert place is not None and place.lease
        # Asking every 0.3 s for three TTLs: the same key (same place) all along.
        loop = asyncio.get_running_loop()
        end = loop.time() + 6
        while loop.time() < end:
            assert (await pre_reboot(session, base, "node-b", GROUP)).kind == "no_slot"
            now = await etcd.get(layout.waiter("node-b"))
            assert now is not None and now.create_revision == place.create_revision
            await asyncio.sleep(0.3)
        # Silent from now on: the lease runs out and the place goes (etcd's delete event).
        _, rev = await etcd.get_prefix(layout.queue)
        async with asyncio.timeout(30):
            async for batch in etcd.watch_prefix(layout.queue, start_revision=rev + 1):
                if any(ev.kind == "delete" and ev.kv.key == layout.waiter("node-b") for ev in batch.events):
                    break
        late = await pre_reboot(session, base, "node-c", GROUP)
        assert "1st of 1 in line" in late.doc["value"]


async def test_unparseable_http_is_a_400_and_one_log_line(
        etcd: Etcd, etcd_config: EtcdConfig, prefix: str, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    async with running(etcd_config, prefix) as server:
        host, port = server.urls[0].removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/pre-reboot HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(20):
            answer = await reader.read()
        writer.close()
    assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer[:100]
    out = capsys.readouterr()
    assert "fleetlock_malformed_http" in out.out + out.err
    # aiohttp's own record (with its traceback) never reaches a handler
    assert [r for r in caplog.records if r.name == "aiohttp.server"] == []
