"""Pre-reboot and post-boot hooks, run-parts style.

Every executable regular file of the directory whose name is made of letters, digits, ``_`` and
``-`` (run-parts' rule, so ``foo.dpkg-old``, ``README.md`` and hidden files are skipped) runs in
name order (bytewise), one at a time, each in a session of its own with a timeout, stdin from
/dev/null and stdout and stderr captured together into the log. The first hook that fails (exits
non-zero, is killed by a signal, or outlives its timeout: its whole process group is killed) stops
the run; the caller decides what that means. A missing directory has no hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from locksmith.log import get_logger

log = get_logger("updateagent.hooks")

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
OUTPUT_CAP = 64 * 1024  # bytes of a hook's output kept for the log


@dataclass(frozen=True)
class HookResult:
    name: str
    returncode: int | None  # None: killed after its timeout
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def summary(self) -> str:
        if self.returncode is None:
            return f"{self.name}: timed out after {self.seconds:.0f}s"
        if self.returncode < 0:
            return f"{self.name}: killed by signal {-self.returncode}"
        last = self.output.strip().splitlines()[-1:] if self.output.strip() else []
        return f"{self.name}: exit {self.returncode}" + (f": {last[0][:200]}" if last and self.returncode else "")


@dataclass(frozen=True)
class HookRun:
    phase: str  # "pre-reboot" | "post-boot"
    results: tuple[HookResult, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def failure(self) -> str:
        bad = [r.summary() for r in self.results if not r.ok]
        return bad[0] if bad else ""


def list_hooks(directory: Path) -> list[Path]:
    """The hooks of ``directory`` in the order they run."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name.encode())
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        log.error("hook_dir_invalid", dir=str(directory), problem="not a directory")
        return []
    except OSError as exc:
        log.error("hook_dir_invalid", dir=str(directory), problem=exc.strerror or str(exc))
        return []
    out = []
    for entry in entries:
        if not _NAME.match(entry.name):
            continue
        try:
            st = entry.stat()  # follows symlinks, as run-parts does
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(entry.path, os.X_OK):
            out.append(Path(entry.path))
    return out


async def run_hooks(directory: Path, phase: str, env: Mapping[str, str], *, per_hook: float) -> HookRun:
    """Run the hooks of ``directory`` until the first failure. ``env`` is added to the agent's."""
    results: list[HookResult] = []
    full_env = {**os.environ, **env, "UPDATE_AGENT_HOOK_PHASE": phase}
    for path in list_hooks(directory):
        result = await _run_one(path, full_env, per_hook)
        results.append(result)
        level = log.info if result.ok else log.error
        level("hook_done", phase=phase, hook=result.name, returncode=result.returncode,
              seconds=round(result.seconds, 3), output=result.output)
        if not result.ok:
            break
    return HookRun(phase, tuple(results))


async def _run_one(path: Path, env: Mapping[str, str], limit: float) -> HookResult:
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            str(path), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=dict(env), start_new_session=True,
        )
    except OSError as exc:
        return HookResult(path.name, 127, f"cannot execute: {exc.strerror or exc}", time.monotonic() - started)
    assert proc.stdout is not None
    chunks: list[bytes] = []
    kept = 0

    async def drain() -> None:
        nonlocal kept
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            if kept < OUTPUT_CAP:
                chunks.append(chunk[: OUTPUT_CAP - kept])
                kept += len(chunks[-1])

    reader = asyncio.ensure_future(drain())
    returncode: int | None
    try:
        async with asyncio.timeout(limit):
            await reader
            returncode = await proc.wait()
    except TimeoutError:
        returncode = None
    finally:
        if proc.returncode is None:
            # The whole session: a hook's children (kubectl behind a shell) must not outlive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 5)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
    output = b"".join(chunks).decode("utf-8", "replace")
    return HookResult(path.name, returncode, output, time.monotonic() - started)
