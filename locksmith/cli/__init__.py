"""locksmithctl: the operators' CLI. Global options here; command groups in sibling modules.

Every option can also come from ``LOCKSMITHCTL_<OPTION>`` (e.g. LOCKSMITHCTL_ENDPOINT,
LOCKSMITHCTL_ETCD_CAFILE, LOCKSMITHCTL_GROUP), as in locksmith. Exit codes: 0 success, 1 failure,
2 usage. Failures are one line on stderr, never a traceback.
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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "LOCKSMITHCTL"})
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
@click.pass_context
def main(ctx: click.Context, endpoints: tuple[str, ...], etcd_cafile: str | None, etcd_certfile: str | None,
         etcd_keyfile: str | None, etcd_username: str | None, etcd_password: str | None, group: str,
         prefix: str, output: str) -> None:
    """Operate the cluster's reboot coordination in etcd v3."""
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


for _name in ("slots", "status", "policycmds", "simulate"):
    try:
        importlib.import_module(f"locksmith.cli.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"locksmith.cli.{_name}":
            raise
