"""Plumbing shared by ``updatectl`` and ``update-agent``: one-line failures, ``--output``, results."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn, TypeVar

import click

from updateagent.errors import UpdateAgentError

F = TypeVar("F", bound=Callable[..., Any])

OUTPUTS = ("text", "json")


def inherited(name: str, default: Any = None) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """An option callback: the value given after the subcommand wins, else the same option given
    before it (on the command group), else ``default``. So ``updatectl status -o json`` and
    ``updatectl -o json status`` mean the same, as kubectl and etcdctl users expect."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            return value
        parent = ctx.parent
        while parent is not None:
            if parent.params.get(name) is not None:
                return parent.params[name]
            parent = parent.parent
        return default

    return callback


output_option = click.option(
    "--output", "-o", type=click.Choice(OUTPUTS), default=None, callback=inherited("output", "text"),
    help="Result format: text (default) or json.",
)


def fail_cleanly(prefix: str, *, usage_errors: tuple[type[Exception], ...] = ()) -> Callable[[F], F]:
    """One clear line on stderr (``<prefix>: <problem>``) and no traceback for every error raised
    on purpose: exit status 2 for ``usage_errors`` (e.g. a bad config file), 1 for the rest (an
    UpdateAgentError, a timeout, an OS error)."""

    def fail(problem: str, status: int) -> NoReturn:
        click.echo(f"{prefix}: {problem}", err=True)
        sys.exit(status)

    def decorate(fn: F) -> F:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except usage_errors as exc:
                fail(str(exc), 2)
            except UpdateAgentError as exc:
                fail(str(exc), 1)
            except TimeoutError as exc:  # an OSError too: before the general case
                fail(str(exc) or "timed out", 1)
            except OSError as exc:
                fail(f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc), 1)

        return wrapper  # type: ignore[return-value]

    return decorate


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


def emit(output: str, doc: Any, text: str) -> None:
    """The result: ``doc`` as JSON for ``--output json``, else ``text``."""
    if output == "json":
        emit_json(doc)
    else:
        click.echo(text)
