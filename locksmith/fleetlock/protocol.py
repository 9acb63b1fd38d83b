"""The FleetLock wire protocol (Zincati's, see docs/fleetlock.md): what a request must carry and
what an error looks like. No I/O here: the HTTP server hands in the header value and the body
bytes, the parser answers with the client's parameters or a :class:`FleetLockError`.

- ``POST <base>/v1/pre-reboot`` and ``POST <base>/v1/steady-state``;
- header ``fleet-lock-protocol: true`` (anything else is refused, so a redirected or cross-site
  request never takes or frees a slot);
- body ``{"client_params": {"id": "<node id>", "group": "<group>"}}``, both non-empty strings,
  the group matching ``^[a-zA-Z0-9.-]+$``;
- 200 for success; every error a 4xx or 5xx with ``{"kind": <short id>, "value": <text>}``, the
  kinds a small fixed set (Zincati counts them in a metric label).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from locksmith.errors import InvalidArgumentError
from locksmith.keys import check_group, check_id

__all__ = [
    "HEADER",
    "KINDS",
    "PRE_REBOOT",
    "STEADY_STATE",
    "ClientParams",
    "FleetLockError",
    "parse_request",
]

HEADER = "fleet-lock-protocol"
PRE_REBOOT = "/v1/pre-reboot"
STEADY_STATE = "/v1/steady-state"

# The protocol's own rule for groups; ours (locksmith.keys) is stricter about the first character
# and the length, and also allows '_'. A group must pass both.
_PROTOCOL_GROUP = re.compile(r"^[a-zA-Z0-9.-]+$")

# Every kind this server can answer with, and its HTTP status. Bounded on purpose.
KINDS: dict[str, int] = {
    # the request
    "bad_header": 400,
    "bad_json": 400,
    "bad_id": 400,
    "bad_group": 400,
    "unknown_group": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "too_large": 413,
    # the answer to a well-formed pre-reboot that is refused now (ask again later)
    "no_slot": 409,
    "paused": 409,
    "outside_window": 409,
    "cooldown": 409,
    "reboots_off": 409,
    # the server's side
    "corrupt_state": 500,
    "internal": 500,
    "etcd_unavailable": 503,
    "not_ready": 503,
    "contended": 503,
    "timeout": 503,
}


class FleetLockError(Exception):
    """An answer other than 200: ``kind`` (one of :data:`KINDS`) and a ``value`` a person reads.
    ``retry_after`` (seconds), when set, becomes a ``Retry-After`` header."""

    def __init__(self, kind: str, value: str, *, retry_after: int | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown FleetLock error kind {kind!r}")
        super().__init__(f"{kind}: {value}")
        self.kind = kind
        self.value = value or kind
        self.status = KINDS[kind]
        self.retry_after = retry_after

    def body(self) -> dict[str, str]:
        return {"kind": self.kind, "value": self.value}


@dataclass(frozen=True)
class ClientParams:
    id: str
    group: str


def parse_request(header: str | None, body: bytes) -> ClientParams:
    """The client's parameters from the ``fleet-lock-protocol`` header value and the body, or a
    :class:`FleetLockError` naming the first thing wrong (header, then JSON, then id, then group)."""
    if header is None:
        raise FleetLockError("bad_header", f"missing header '{HEADER}: true'")
    if header.strip().lower() != "true":
        raise FleetLockError("bad_header", f"header '{HEADER}' must be 'true', got {_short(header)}")
    try:
        # UTF-8 explicitly: json.loads(bytes) would also guess UTF-16 and UTF-32.
        doc: Any = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FleetLockError("bad_json", f"body is not UTF-8 (bad byte at offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise FleetLockError("bad_json", f"body is not JSON: {exc.msg} ({where})") from None
    except RecursionError:
        raise FleetLockError("bad_json", "body is not JSON: nested too deeply") from None
    except ValueError as exc:  # an integer beyond int()'s digit limit
        raise FleetLockError("bad_json", f"body is not JSON: {str(exc).split(';')[0]}") from None
    if not isinstance(doc, dict):
        raise FleetLockError("bad_json", f"body must be a JSON object, got {_json_type(doc)}")
    params = doc.get("client_params")
    if params is None:
        raise FleetLockError("bad_json", "body has no 'client_params' object")
    if not isinstance(params, dict):
        raise FleetLockError("bad_json", f"'client_params' must be an object, got {_json_type(params)}")
    node_id = params.get("id")
    if not isinstance(node_id, str):
        what = "is missing" if node_id is None else f"must be a string, got {_json_type(node_id)}"
        raise FleetLockError("bad_id", f"client_params.id {what}")
    if not node_id:
        raise FleetLockError("bad_id", "client_params.id is empty")
    try:
        check_id(node_id)
    except InvalidArgumentError:
        raise FleetLockError(
            "bad_id", f"client_params.id {_short(node_id)} is invalid: use 1-128 letters, digits, "
                      "'.', '_', ':', '@' or '-', starting with a letter or digit") from None
    group = params.get("group")
    if not isinstance(group, str):
        what = "is missing" if group is None else f"must be a string, got {_json_type(group)}"
        raise FleetLockError("bad_group", f"client_params.group {what}")
    if not group:
        raise FleetLockError("bad_group", "client_params.group is empty")
    if not _PROTOCOL_GROUP.match(group):
        raise FleetLockError("bad_group", f"client_params.group {_short(group)} does not match ^[a-zA-Z0-9.-]+$")
    try:
        check_group(group)
    except InvalidArgumentError:
        raise FleetLockError(
            "bad_group", f"client_params.group {_short(group)} is not a group name this server keeps: "
                         "use 1-63 letters, digits, '.' or '-', starting with a letter or digit") from None
    return ClientParams(id=node_id, group=group)


def _short(text: str, limit: int = 80) -> str:
    """A client's value quoted for an error message, cut so that an error stays one short line."""
    shown = json.dumps(text[:limit])
    return shown + ("..." if len(text) > limit else "")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
