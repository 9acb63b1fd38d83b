"""The agent's persistent state: one JSON file, written atomically, with a format version.

It holds what must survive an agent restart and a reboot: the update_engine status (so
``UPDATE_STATUS_UPDATED_NEED_REBOOT`` is still reported after a restart), the current and
booted versions, the update waiting for its first boot, the deny list and a bounded history.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from locksmith.files import InputFileError, InputFileNotFoundError, read_text
from locksmith.log import get_logger
from updateagent._atomic import write_atomic
from updateagent.errors import UpdateAgentError

FORMAT_VERSION = 1
HISTORY_LIMIT = 200
_MAX_STATE_BYTES = 4 << 20  # a full history is well under 1 MiB

log = get_logger("updateagent.state")


class StateError(UpdateAgentError):
    """A state file that cannot be read, parsed or written."""


@dataclass(frozen=True)
class PendingUpdate:
    """An update written to a slot and waiting to be booted (or a rollback waiting for its reboot)."""

    version: str
    slot: str  # "A" | "B"
    label: str
    partuuid: str
    installed_at: float
    size: int = 0
    previous_version: str = ""
    kind: str = "update"  # "update" | "rollback"
    # False from the moment the record is saved until the GPT mark of the slot is known to be on
    # disk: a kill in between leaves a record whose slot may or may not be marked, and the agent
    # looks at the GPT to tell. Files written before this field existed only held marked slots.
    marked: bool = True


@dataclass(frozen=True)
class DenyEntry:
    version: str
    reason: str
    time: float


@dataclass(frozen=True)
class HistoryEntry:
    time: float
    event: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentState:
    status: str = "UPDATE_STATUS_IDLE"
    current_version: str = ""
    booted_version: str = ""
    booted_slot: str = ""
    boot_id: str = ""  # the boot whose after-boot logic has run
    last_checked_time: int = 0
    new_version: str = ""
    new_size: int = 0
    pending: PendingUpdate | None = None
    deny_list: tuple[DenyEntry, ...] = ()
    history: tuple[HistoryEntry, ...] = ()
    last_boot_outcome: str = ""  # "" | "normal" | "success" | "health_check_failed" | "rolled_back"
    last_error: str = ""
    slot_versions: dict[str, str] = field(default_factory=dict)  # partuuid -> version

    def denied(self, version: str) -> bool:
        return any(entry.version == version for entry in self.deny_list)

    def deny(self, version: str, reason: str, now: float) -> AgentState:
        # An unknown version ("") on the deny list would refuse every later check.
        if not version or self.denied(version):
            return self
        return replace(self, deny_list=(*self.deny_list, DenyEntry(version, reason, now)))

    def record(self, event: str, now: float, **details: Any) -> AgentState:
        history = (*self.history, HistoryEntry(now, event, details))[-HISTORY_LIMIT:]
        return replace(self, history=history)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format_version"] = FORMAT_VERSION
        return data

    @classmethod
    def from_json(cls, data: Any, source: str = "<state>") -> AgentState:
        if not isinstance(data, dict):
            raise StateError(f"{source}: expected a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise StateError(f"{source}: unsupported format_version {version!r} (expected {FORMAT_VERSION})")
        try:
            pending = data.get("pending")
            if pending is not None:
                _strings(pending, ("version", "slot", "label", "partuuid", "previous_version", "kind"),
                         f"{source}: key 'pending'")
                if not isinstance(pending.get("marked", True), bool):
                    raise StateError(f"{source}: key 'pending': field 'marked': expected true or false, "
                                     f"got {pending['marked']!r}")
            for entry in _list(data, "deny_list", source):
                _strings(entry, ("version", "reason"), f"{source}: key 'deny_list'")
            return cls(
                status=_str(data, "status", source),
                current_version=_str(data, "current_version", source),
                booted_version=_str(data, "booted_version", source),
                booted_slot=_str(data, "booted_slot", source),
                boot_id=_str(data, "boot_id", source),
                last_checked_time=int(data.get("last_checked_time", 0)),
                new_version=_str(data, "new_version", source),
                new_size=int(data.get("new_size", 0)),
                pending=PendingUpdate(**pending) if pending is not None else None,
                # An empty version (an unknown one, denied by an older agent) would refuse every check.
                deny_list=tuple(DenyEntry(**entry) for entry in data.get("deny_list", []) if entry.get("version")),
                history=tuple(HistoryEntry(**entry) for entry in data.get("history", [])),
                last_boot_outcome=_str(data, "last_boot_outcome", source),
                last_error=_str(data, "last_error", source),
                slot_versions={str(k): str(v) for k, v in dict(data.get("slot_versions", {})).items()},
            )
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(1e999)
            raise StateError(f"{source}: malformed state: {exc}") from None


def _list(data: dict[str, Any], key: str, source: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise StateError(f"{source}: key {key!r}: expected a list, got {value!r}")
    return value


def _strings(entry: Any, keys: tuple[str, ...], where: str) -> None:
    # A deny entry or pending update whose version is not a string would make every later check
    # refuse (channel.check cannot parse it): refuse the file instead, so it is moved aside.
    if not isinstance(entry, dict):
        raise StateError(f"{where}: expected an object, got {entry!r}")
    for key in keys:
        if key in entry and not isinstance(entry[key], str):
            raise StateError(f"{where}: field {key!r}: expected a string, got {entry[key]!r}")


def _str(data: dict[str, Any], key: str, source: str) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise StateError(f"{source}: key {key!r}: expected a string, got {value!r}")
    return value


class StateStore:
    """Loads and saves :class:`AgentState` at one path. Saves are atomic (write, fsync, rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> AgentState:
        """The saved state, or a fresh one if there is none. Raises StateError if it is unreadable."""
        try:
            text = read_text(self.path, max_bytes=_MAX_STATE_BYTES, what="state file")
        except InputFileNotFoundError:
            return AgentState()
        except InputFileError as exc:
            raise StateError(f"{self.path}: cannot read: {exc.problem}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StateError(f"{self.path}: invalid JSON: {exc}") from None
        except (ValueError, RecursionError) as exc:  # int()'s digit limit; nesting beyond the stack
            raise StateError(f"{self.path}: invalid JSON: {str(exc).split(';')[0] or 'nested too deeply'}") from None
        return AgentState.from_json(data, str(self.path))

    def load_or_reset(self, now: float) -> AgentState:
        """Like load, but a corrupt file is moved aside (never deleted) and a fresh state is used,
        so a damaged file cannot keep the daemon from starting."""
        try:
            return self.load()
        except StateError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(now)}")
            try:
                os.replace(self.path, aside)
            except OSError:
                aside = self.path
            log.error("state_corrupt", path=str(self.path), error=str(exc), moved_to=str(aside))
            return AgentState().record("state_reset", now, error=str(exc), moved_to=str(aside))

    def save(self, state: AgentState) -> None:
        payload = json.dumps(state.to_json(), indent=1, sort_keys=True).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, payload)
        except OSError as exc:
            raise StateError(f"{self.path}: cannot write: {exc}") from None
