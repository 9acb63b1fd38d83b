"""structlog set-up shared by the daemons and CLIs.

JSON lines under systemd (journald or a unit's stdout), human-readable on a terminal.
Library code only ever calls ``get_logger``; the entry points call ``configure``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import structlog


def _under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def configure(level: str | int = "INFO", *, json: bool | None = None, stream: Any = None) -> None:
    """Configure structlog and the stdlib root logger once per process."""
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    stream = stream or sys.stderr
    if json is None:
        json = _under_systemd() or not stream.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=stream)


def configure_for_command(level: str | int = "WARNING", *, stream: Any = None) -> Callable[[], None]:
    """``configure`` for one CLI invocation. Returns a function that puts the previous
    configuration back, so that a caller running the command in-process (click's CliRunner in
    the tests) is left as it was: its log level, its captured logs, its streams."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    configure(level, stream=stream)

    def restore() -> None:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(root_level)

    return restore


def get_logger(name: str, **bound: Any) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name, **bound)
