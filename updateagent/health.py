"""After-boot health checks: commands that must exit 0, systemd units that must be active,
HTTP URLs that must answer 2xx. Each has its own timeout; a run retries failing checks until a
deadline so that services still starting after boot get a fair chance."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from locksmith.log import get_logger
from updateagent.config import HealthCheckSpec

log = get_logger("updateagent.health")

_OUTPUT_LIMIT = 400


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    duration: float


@dataclass(frozen=True)
class HealthReport:
    ok: bool
    results: tuple[CheckResult, ...]
    attempts: int

    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.ok]

    def summary(self) -> str:
        if self.ok:
            return f"{len(self.results)} check(s) passed"
        return "; ".join(f"{r.name}: {r.detail}" for r in self.failures())


async def _run_argv(argv: Sequence[str], limit: float) -> tuple[bool, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        return False, f"cannot run {argv[0]!r}: {exc.strerror or exc}"
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False, f"timed out after {limit:g}s"
    except asyncio.CancelledError:
        # MarkGood or the daemon stopping: the check must not outlive its cancellation.
        if proc.returncode is None:
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
    text = output.decode(errors="replace").strip()[-_OUTPUT_LIMIT:]
    if proc.returncode == 0:
        return True, text or "exit 0"
    return False, f"exit {proc.returncode}" + (f": {text}" if text else "")


def _http_get(url: str, timeout: float) -> tuple[bool, str]:
    request = urllib.request.Request(url, headers={"User-Agent": "coreupdate-agent-health/0.1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"cannot fetch: {reason}"
    if 200 <= status < 300:
        return True, f"HTTP {status}"
    return False, f"HTTP {status}"


class HealthChecker:
    """Runs a fixed list of checks. ``systemctl`` is a parameter so a host without systemd can
    point it elsewhere; what it must do is exit 0 for an active unit."""

    def __init__(
        self,
        checks: Sequence[HealthCheckSpec],
        *,
        deadline: float = 120.0,
        retry_interval: float = 5.0,
        systemctl: str = "systemctl",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.checks = tuple(checks)
        self.deadline = deadline
        self.retry_interval = retry_interval
        self.systemctl = systemctl
        self._monotonic = monotonic

    async def run_one(self, spec: HealthCheckSpec) -> CheckResult:
        started = time.monotonic()
        if spec.kind == "command":
            assert isinstance(spec.target, tuple)
            ok, detail = await _run_argv(spec.target, spec.timeout)
        elif spec.kind == "unit":
            ok, detail = await _run_argv([self.systemctl, "is-active", str(spec.target)], spec.timeout)
            if not ok:
                detail = f"unit {spec.target} not active ({detail})"
        else:
            try:
                ok, detail = await asyncio.wait_for(
                    asyncio.to_thread(_http_get, str(spec.target), spec.timeout), spec.timeout + 1
                )
            except TimeoutError:
                ok, detail = False, f"timed out after {spec.timeout:g}s"
        return CheckResult(spec.label(), ok, detail, time.monotonic() - started)

    async def run(self) -> HealthReport:
        """Run every check; retry the failing ones until all pass or the deadline passes."""
        end = self._monotonic() + self.deadline
        attempts = 0
        results: dict[int, CheckResult] = {}
        pending = list(range(len(self.checks)))
        while True:
            attempts += 1
            outcome = await asyncio.gather(*(self.run_one(self.checks[i]) for i in pending))
            for index, result in zip(pending, outcome, strict=True):
                results[index] = result
            pending = [index for index, result in zip(pending, outcome, strict=True) if not result.ok]
            for result in outcome:
                log.info("health_check", check=result.name, ok=result.ok, detail=result.detail,
                         attempt=attempts, duration=round(result.duration, 3))
            if not pending or self._monotonic() + self.retry_interval > end:
                break
            await asyncio.sleep(self.retry_interval)
        ordered = tuple(results[i] for i in range(len(self.checks)))
        return HealthReport(ok=not pending, results=ordered, attempts=attempts)
