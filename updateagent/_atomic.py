"""Durable file replacement, shared by the state file, the boot record and the channel publisher."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    """The process umask, read without changing it (os.umask sets it for every thread)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def write_atomic(path: str | os.PathLike[str], data: bytes, *, private: bool = True) -> None:
    """Replace ``path`` with ``data``: after a crash it holds the old content or the new, never a mix.

    Writes a temporary file next to it, fsyncs it, renames it over ``path`` and fsyncs the
    directory. ``private`` files (state) are 0600; the others (what a web server publishes) get
    the mode the umask gives any new file, 0644 under umask 022. Raises OSError; the temporary
    file never outlives a failure.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        if not private:
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename is only durable once the directory entry is on disk.
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
