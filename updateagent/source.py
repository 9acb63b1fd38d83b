"""Where updates come from: the source seam the agent calls, and the real one, a signed static
channel with the streaming installer. Tests and the simulator pass their own source, or this one
pointed at a local HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, Unpack

if TYPE_CHECKING:
    # The installer (requests, urllib3, zstandard: ~6 MiB resident) loads only when an update is
    # downloaded; an idle agent never needs it.
    from updateagent.install import HttpOptions, InstallResult, InstallTarget, Progress

_T = TypeVar("_T")


@dataclass(frozen=True)
class UpdateOffer:
    """A release the source says may be applied. ``handle`` is the source's own object."""

    version: str
    size: int
    sha256: str
    handle: Any


class UpdateSource(Protocol):
    async def check(self, current_version: str, deny: Iterable[str], allow_downgrade: bool) -> UpdateOffer:
        """Raise ``channel.NoUpdate`` when there is nothing new, PolicyRefused when refused."""
        ...

    async def install(
        self, offer: UpdateOffer, target: InstallTarget, progress: Callable[[Progress], None]
    ) -> InstallResult: ...


class ChannelSource:
    """The real source: a signed static channel (updateagent.channel) and the streaming installer.

    ``http`` tunes the payload download (retries, backoff, timeouts; see ``install.HttpOptions``).
    """

    def __init__(self, manifest_url: str, key_paths: Iterable[Path], *, insecure: bool = False,
                 deadline: float | None = None, **http: Unpack[HttpOptions]) -> None:
        from updateagent.signature import KeySet

        self.manifest_url = manifest_url
        self.insecure = insecure
        self.deadline = deadline  # manifest + signature, seconds; None: channel.DEFAULT_FETCH_DEADLINE
        self.keys = None if insecure else KeySet.from_paths(list(key_paths))
        self.http = http

    async def check(self, current_version: str, deny: Iterable[str], allow_downgrade: bool) -> UpdateOffer:
        from updateagent import channel

        deadline = channel.DEFAULT_FETCH_DEADLINE if self.deadline is None else self.deadline
        release = await in_daemon_thread(
            lambda: channel.fetch(self.manifest_url, self.keys, insecure=self.insecure, deadline=deadline)
        )
        offer = channel.check(release, current_version, allow_downgrade=allow_downgrade, deny=list(deny))
        m = offer.manifest
        return UpdateOffer(str(m.version), m.size, m.sha256, offer)

    async def install(
        self, offer: UpdateOffer, target: InstallTarget, progress: Callable[[Progress], None]
    ) -> InstallResult:
        from updateagent.install import install_async

        release = offer.handle.release
        return await install_async(release.manifest, release.manifest_url, target, progress=progress, **self.http)


async def in_daemon_thread(fn: Callable[[], _T]) -> _T:
    """``fn()`` in a daemon thread of its own. Unlike ``asyncio.to_thread``, a cancelled call
    (the daemon stopping) is abandoned: a manifest fetch stuck on a server that never answers
    would otherwise hold up the process's exit until its read timeout, since the default
    executor's threads are joined when the event loop closes."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def deliver(result: _T | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result = fn()
        except BaseException as exc:
            outcome: tuple[_T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(deliver, *outcome)

    threading.Thread(target=work, name="channel-fetch", daemon=True).start()
    return await future
