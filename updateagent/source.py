"""Where updates come from: the source seam the agent calls, and the real one, a signed static
channel with the streaming installer. Tests and the simulator pass their own source, or this one
pointed at a local HTTP server."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Unpack

from updateagent import channel, checker

if TYPE_CHECKING:
    # The installer (requests, urllib3, zstandard: ~6 MiB resident) loads only when an update is
    # downloaded; an idle agent never needs it.
    from updateagent.install import HttpOptions, InstallResult, InstallTarget, Progress


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

    ``run_check`` is where the check's fetch runs (``updateagent.checker``): by default in a
    child process, as the daemon runs it; the simulator passes ``checker.in_thread``. The
    download runs in a thread of this process either way. ``http`` tunes it (retries, backoff,
    timeouts; see ``install.HttpOptions``).
    """

    def __init__(self, manifest_url: str, key_paths: Iterable[Path], *, insecure: bool = False,
                 deadline: float | None = None, run_check: checker.CheckRunner | None = None,
                 **http: Unpack[HttpOptions]) -> None:
        from updateagent.signature import KeySet

        self.manifest_url = manifest_url
        self.insecure = insecure
        self.deadline = deadline  # manifest + signature, seconds; None: channel.DEFAULT_FETCH_DEADLINE
        self.keys = None if insecure else KeySet.from_paths(list(key_paths))
        self.run_check = run_check or checker.in_child_process
        self.http = http

    async def check(self, current_version: str, deny: Iterable[str], allow_downgrade: bool) -> UpdateOffer:
        deadline = channel.DEFAULT_FETCH_DEADLINE if self.deadline is None else self.deadline
        release = await self.run_check(checker.CheckRequest(self.manifest_url, self.keys, self.insecure, deadline))
        offer = channel.check(release, current_version, allow_downgrade=allow_downgrade, deny=list(deny))
        m = offer.manifest
        return UpdateOffer(str(m.version), m.size, m.sha256, offer)

    async def install(
        self, offer: UpdateOffer, target: InstallTarget, progress: Callable[[Progress], None]
    ) -> InstallResult:
        from updateagent.install import install_async

        release = offer.handle.release
        return await install_async(release.manifest, release.manifest_url, target, progress=progress, **self.http)
