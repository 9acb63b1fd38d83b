"""locksmithctl: the operators' CLI. Global options here; command groups in sibling modules.

Every option can also come from ``LOCKSMITHCTL_<OPTION>`` (e.g. LOCKSMITHCTL_ENDPOINT,
LOCKSMITHCTL_ETCD_CAFILE, LOCKSMITHCTL_GROUP), as in locksmith. Global options may also follow the
subcommand (``locksmithctl status -o json``), as etcdctl and kubectl users type them, unless the
subcommand has an option of the same name (``log --group``), which then wins. Exit codes: 0
success, 1 failure, 2 usage. stdout carries only the output; logs go to stderr (warnings and
errors, more with ``-v``), and a failure is one line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click

from locksmith import log
from locksmith.errors import InvalidArgumentError, LocksmithError
from locksmith.etcd import DEFAULT_ENDPOINT, Etcd, EtcdConfig
from locksmith.keys import DEFAULT_PREFIX, check_group

T = TypeVar("T")


@dataclass
class CliContext:
    etcd_config: EtcdConfig
    group: str
    prefix: str
    output: str

    @property
    def json(self) -> bool:
        return self.output == "json"

    def run(self, fn: Callable[[Etcd], Awaitable[T]]) -> T:
        """Connect, run ``fn`` and close, mapping every locksmith error to one line and exit 1."""

        async def go() -> T:
            etcd = await Etcd.connect(self.etcd_config)
            try:
                return await fn(etcd)
            finally:
                await etcd.close()

        try:
            return asyncio.run(go())
        except LocksmithError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted")

    def emit(self, data: Any, text: str | Callable[[], str]) -> None:
        """Print ``data`` as JSON with --output json, else the text form."""
        if self.json:
            click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        else:
            click.echo(text() if callable(text) else text)


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"locksmithctl: error: {message}", err=True)
    sys.exit(code)


def checked(validate: Callable[[str], T]) -> Callable[[click.Context, click.Parameter, str | None], T | None]:
    """A click callback running ``validate`` on an option's value; its InvalidArgumentError becomes a
    usage error (exit 2) that names the option."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> T | None:
        if value is None:
            return None
        try:
            return validate(value)
        except InvalidArgumentError as exc:
            raise click.BadParameter(str(exc)) from exc

    return callback


def _split_endpoints(values: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for v in values:
        out.extend(p.strip() for p in v.replace(" ", ",").split(",") if p.strip())
    return tuple(out) or (DEFAULT_ENDPOINT,)


class _Cli(click.Group):
    """The top-level group: global options found after the subcommand are moved before it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(self, ctx, args))


def _option_names(params: list[click.Parameter]) -> dict[str, bool]:
    """Each option string of ``params`` and whether it takes a value."""
    out: dict[str, bool] = {}
    for p in params:
        if isinstance(p, click.Option):
            for name in (*p.opts, *p.secondary_opts):
                out[name] = not (p.is_flag or p.count)
    return out


def _match(token: str, names: dict[str, bool]) -> tuple[str, bool] | None:
    """The option ``token`` names (``--output``, ``--output=json``, ``-o``, ``-ojson``) and whether
    its value is in the token itself."""
    if token in names:
        return token, False
    if token.startswith("--") and "=" in token:
        name = token.split("=", 1)[0]
        return (name, True) if name in names else None
    if len(token) > 2 and token[0] == "-" and token[1] != "-" and token[:2] in names:
        if names[token[:2]]:
            return token[:2], True
        if all(names.get(f"-{c}") is False for c in token[1:]):  # -vv: flags run together
            return token[:2], True
    return None


def hoist_global_options(group: click.Group, ctx: click.Context, args: list[str]) -> list[str]:
    """``args`` with the group's own options that follow the (sub)command moved before it."""
    globals_ = _option_names(group.params)
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "--":
        m = _match(args[i], globals_)
        i += 2 if m is not None and globals_[m[0]] and not m[1] else 1
    head, rest = args[:i], args[i:]
    path: list[str] = []
    cmd: click.Command | None = group
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        sub = cmd.get_command(ctx, rest[0])
        if sub is None:
            break
        path.append(rest.pop(0))
        cmd = sub
    if not path or cmd is None:
        return args
    local = _option_names(cmd.params)
    hoisted: list[str] = []
    kept: list[str] = []
    j = 0
    while j < len(rest):
        tok = rest[j]
        if tok == "--":
            kept += rest[j:]
            break
        own = _match(tok, local)
        if own is not None:
            take = 2 if local[own[0]] and not own[1] else 1
            kept += rest[j:j + take]
            j += take
            continue
        m = _match(tok, globals_)
        if m is not None:
            take = 2 if globals_[m[0]] and not m[1] else 1
            hoisted += rest[j:j + take]
            j += take
            continue
        kept.append(tok)
        j += 1
    return head + hoisted + path + kept


@click.group(cls=_Cli,
             context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "LOCKSMITHCTL"})
# auto_envvar_prefix would derive LOCKSMITHCTL_ENDPOINTS from the parameter name; locksmith's is _ENDPOINT.
@click.option("--endpoint", "endpoints", multiple=True, default=(DEFAULT_ENDPOINT,), show_default=True,
              envvar="LOCKSMITHCTL_ENDPOINT", show_envvar=True,
              help="etcd endpoint URL; repeat or comma-separate for several.")
@click.option("--etcd-cafile", type=click.Path(dir_okay=False), help="CA bundle for etcd's TLS certificate.")
@click.option("--etcd-certfile", type=click.Path(dir_okay=False), help="Client certificate (mTLS).")
@click.option("--etcd-keyfile", type=click.Path(dir_okay=False), help="Client key (mTLS).")
@click.option("--etcd-username", help="etcd user (etcd auth).")
@click.option("--etcd-password", help="etcd password.")
@click.option("--group", default="default", show_default=True, help="Reboot group.")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="etcd key prefix.")
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--verbose", "-v", count=True, help="Log more on stderr: -v info, -vv debug (default: warnings).")
@click.pass_context
def main(ctx: click.Context, endpoints: tuple[str, ...], etcd_cafile: str | None, etcd_certfile: str | None,
         etcd_keyfile: str | None, etcd_username: str | None, etcd_password: str | None, group: str,
         prefix: str, output: str, verbose: int) -> None:
    """Operate the cluster's reboot coordination in etcd v3."""
    # stdout is for the output alone (``-o json`` must parse): every log line goes to stderr.
    restore = log.configure_for_command("DEBUG" if verbose >= 2 else "INFO" if verbose == 1 else "WARNING",
                                        stream=sys.stderr)
    ctx.call_on_close(restore)
    try:
        check_group(group)
        cfg = EtcdConfig(
            endpoints=_split_endpoints(endpoints), cafile=etcd_cafile, certfile=etcd_certfile,
            keyfile=etcd_keyfile, username=etcd_username, password=etcd_password,
        )
        cfg.host_ports()
    except InvalidArgumentError as exc:
        raise click.UsageError(str(exc)) from exc
    ctx.obj = CliContext(cfg, group, prefix, output)


for _name in ("slots", "status", "policycmds", "simulate", "fleetlock"):
    try:
        importlib.import_module(f"locksmith.cli.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"locksmith.cli.{_name}":
            raise
