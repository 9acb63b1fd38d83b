"""Reading files that come from outside: only regular files, never more than a cap.

Every file the product reads (policies, agent config, update.conf, keys, manifests, state files)
goes through here, so that a symlink to /dev/zero, a FIFO or a directory gets a clear error
instead of a hang or a gigabyte read.
"""

from __future__ import annotations

import os
import stat

from locksmith.errors import LocksmithError

DEFAULT_MAX_BYTES = 1 << 20  # 1 MiB: far above any config, policy or manifest we write


class InputFileError(LocksmithError):
    """A file that cannot be read as input: missing, not a regular file, too large, not text."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path = os.fspath(path)
        self.problem = problem


class InputFileNotFoundError(InputFileError):
    """The file does not exist (or is a dangling symlink): for callers to whom that is normal."""


def read_bytes(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES, what: str = "file") -> bytes:
    """The whole content of the regular file at ``path`` (symlinks followed), at most ``max_bytes``.

    Opened with O_NONBLOCK so that a FIFO cannot block the open itself; the type is checked on
    the open descriptor (not the name), so a swap between the check and the read cannot fool it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise InputFileNotFoundError(path, f"{what} not found") from None
    except IsADirectoryError:
        raise InputFileError(path, f"{what} is a directory, not a regular file") from None
    except PermissionError:
        raise InputFileError(path, f"permission denied reading {what}") from None
    except OSError as exc:
        raise InputFileError(path, f"cannot open {what}: {exc.strerror or exc}") from None
    except ValueError:  # a NUL byte in the path: no file can have that name
        raise InputFileError(repr(os.fspath(path))[1:-1], f"{what}: the path contains a NUL byte") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputFileError(path, f"{what} is not a regular file ({_kind(st.st_mode)})")
        if st.st_size > max_bytes:
            raise InputFileError(path, f"{what} is too large ({st.st_size} bytes; the limit is {max_bytes})")
        chunks: list[bytes] = []
        total = 0
        while True:
            # A file that grows while we read is still capped.
            chunk = os.read(fd, min(1 << 16, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise InputFileError(path, f"{what} is too large (over {max_bytes} bytes)")
        return b"".join(chunks)
    except OSError as exc:
        raise InputFileError(path, f"cannot read {what}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def read_text(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES, what: str = "file") -> str:
    """Like :func:`read_bytes`, decoded as UTF-8 (a leading byte-order mark is accepted and dropped)."""
    data = read_bytes(path, max_bytes=max_bytes, what=what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(path, f"{what} is not UTF-8 text (bad byte at offset {exc.start})") from None
    return text.removeprefix("\ufeff")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


__all__ = ["DEFAULT_MAX_BYTES", "InputFileError", "InputFileNotFoundError", "read_bytes", "read_text"]
