"""After-boot health checks: real processes, a real HTTP server, systemctl as it is on this host."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from httpserver import FileServer

from updateagent.config import HealthCheckSpec
from updateagent.health import HealthChecker


@pytest.fixture
def www(tmp_path: Path) -> Iterator[FileServer]:
    (tmp_path / "ok").write_text("fine\n")
    with FileServer(tmp_path) as srv:
        yield srv


def cmd(*argv: str, timeout: float = 10.0, name: str = "") -> HealthCheckSpec:
    return HealthCheckSpec("command", tuple(argv), timeout, name)


async def test_all_kinds_pass(www: FileServer) -> None:
    checker = HealthChecker([cmd("true"), HealthCheckSpec("http", www.url("ok"))], deadline=0)
    report = await checker.run()
    assert report.ok and report.attempts == 1
    assert [r.detail for r in report.results] == ["exit 0", "HTTP 200"]
    assert report.summary() == "2 check(s) passed"


async def test_failures_name_the_check_and_the_reason(www: FileServer) -> None:
    www.add_fault("/ok", "status", value=503)
    checker = HealthChecker([
        cmd("sh", "-c", "echo disk full >&2; exit 4", name="app"),
        HealthCheckSpec("http", www.url("missing")),
        HealthCheckSpec("http", www.url("ok")),
        HealthCheckSpec("http", "http://127.0.0.1:9/"),
        cmd("/nonexistent/check"),
    ], deadline=0)
    report = await checker.run()
    assert not report.ok
    details = {r.name: r.detail for r in report.results}
    assert details["app"] == "exit 4: disk full"
    assert details[f"http:{www.url('missing')}"] == "HTTP 404"
    assert details[f"http:{www.url('ok')}"] == "HTTP 503"
    assert details["http:http://127.0.0.1:9/"].startswith("cannot fetch:")
    assert "cannot run '/nonexistent/check'" in details["command:/nonexistent/check"]
    assert report.summary().startswith("app: exit 4: disk full; ")


async def test_timeouts_are_enforced() -> None:
    checker = HealthChecker([cmd("sleep", "30", timeout=0.3)], deadline=0)
    started = time.monotonic()
    report = await checker.run()
    assert time.monotonic() - started < 5
    assert not report.ok and report.results[0].detail == "timed out after 0.3s"


async def test_failing_checks_are_retried_until_the_deadline(tmp_path: Path) -> None:
    flag = tmp_path / "second-time"
    # Fails the first time (a service still starting), passes from the second attempt on.
    flaky = cmd("sh", "-c", f"test -e {flag} || {{ touch {flag}; exit 1; }}", name="flaky")
    report = await HealthChecker([flaky, cmd("true")], deadline=10, retry_interval=0.05).run()
    assert report.ok and report.attempts == 2

    always = await HealthChecker([cmd("false")], deadline=0.3, retry_interval=0.05).run()
    assert not always.ok and always.attempts >= 2


async def test_unit_check_uses_systemctl_is_active(tmp_path: Path) -> None:
    # A unit that does not exist is never active, whether or not this host runs systemd.
    report = await HealthChecker([HealthCheckSpec("unit", "no-such-unit-4711.service", 5)], deadline=0).run()
    assert not report.ok and report.results[0].detail.startswith("unit no-such-unit-4711.service not active")

    # A host without systemctl where it is expected: the check fails and says why.
    missing = await HealthChecker([HealthCheckSpec("unit", "x.service")], deadline=0,
                                  systemctl=str(tmp_path / "no-systemctl")).run()
    assert "cannot run" in missing.results[0].detail


async def test_no_checks_is_healthy() -> None:
    report = await HealthChecker([]).run()
    assert report.ok and report.results == ()
