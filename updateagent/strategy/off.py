"""``off``: apply, report that a reboot is needed, never reboot (an operator or locksmithd does)."""

from __future__ import annotations

from typing import Any

from locksmith.log import get_logger
from updateagent.strategy import RebootRequest, StatusListener, tell

log = get_logger("updateagent.strategy")


class ReportOnlyStrategy:
    """REBOOT_STRATEGY=off: only report."""

    def __init__(self) -> None:
        self._needed: RebootRequest | None = None
        self._listeners: list[StatusListener] = []

    async def start(self) -> None:
        return None

    async def reboot_needed(self, request: RebootRequest) -> None:
        self._needed = request
        log.info("reboot_needed", reason=request.reason, version=request.version, slot=request.slot,
                 strategy="off")
        self._tell()

    async def boot_settled(self, outcome: str, version: str) -> None:
        self._needed = None
        log.info("boot_settled", outcome=outcome, version=version, strategy="off")
        self._tell()

    async def close(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        r = self._needed
        return {"format_version": 1, "strategy": "off", "state": "off", "status": self.status_text(),
                "request": {"reason": r.reason, "version": r.version, "slot": r.slot} if r else None}

    def status_text(self) -> str:
        r = self._needed
        if r is None:
            return "reboot strategy off"
        return f"reboot strategy off: a reboot is needed ({r.reason}{' to ' + r.version if r.version else ''})"

    def subscribe(self, listener: StatusListener) -> None:
        self._listeners.append(listener)

    def _tell(self) -> None:
        tell(self._listeners, self.status_text())
