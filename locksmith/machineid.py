"""The machine id, which locksmith uses as a node's default holder id (as CoreOS locksmith did).

systemd's ``/etc/machine-id`` first, then D-Bus's ``/var/lib/dbus/machine-id`` (older or minimal
systems have only that one).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from locksmith.errors import LocksmithError
from locksmith.files import InputFileError, InputFileNotFoundError, read_bytes

MACHINE_ID_PATHS: tuple[Path, ...] = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))

# systemd writes 32 lowercase hex digits; an empty file means "not yet initialised" (first boot).
_ID_RE = re.compile(r"^[0-9a-fA-F]{32}$")


class MachineIdError(LocksmithError):
    """No usable machine id was found."""


def machine_id(paths: Sequence[Path | str] = MACHINE_ID_PATHS) -> str:
    """The first valid machine id among ``paths``; raises MachineIdError naming every path tried."""
    problems: list[str] = []
    for p in map(Path, paths):
        try:
            text = read_bytes(p, max_bytes=4096, what="machine id file").decode("ascii", errors="replace").strip()
        except InputFileNotFoundError:
            problems.append(f"{p}: missing")
            continue
        except InputFileError as exc:
            problems.append(f"{p}: {exc.problem}")
            continue
        if not text:
            problems.append(f"{p}: empty")
        elif not _ID_RE.match(text):
            problems.append(f"{p}: not 32 hex digits")
        else:
            return text.lower()
    raise MachineIdError(
        "no machine id (" + "; ".join(problems) + "); pass the id explicitly"
    )
