"""``locksmithctl fleetlock serve | import-airlock``: the FleetLock server and the move from airlock.

``serve`` runs one replica until SIGTERM (docs/fleetlock.md); its config file is airlock's TOML
plus our keys. The etcd connection comes from the file's ``[etcd3]`` table when it has endpoints,
unless ``--endpoint`` (or LOCKSMITHCTL_ENDPOINT) is given, which then wins with the other global
etcd options.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace
from typing import Any

import click

from locksmith import log
from locksmith.cli import CliContext, fail, main
from locksmith.errors import LocksmithError
from locksmith.etcd import Etcd
from locksmith.files import InputFileError, read_text


@main.group("fleetlock")
def fleetlock() -> None:
    """The FleetLock protocol (Zincati): the server and the move from airlock."""


def _explicit(ctx: click.Context, name: str) -> bool:
    root = ctx.find_root()
    source = root.get_parameter_source(name)
    return source is not None and source != click.core.ParameterSource.DEFAULT


@fleetlock.command("serve")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Server config (airlock's TOML plus ours; see docs/fleetlock.md).")
@click.option("--listen", help="ADDRESS:PORT to serve on, over the config's [service] address and port.")
@click.option("--any-group", is_flag=True, default=None,
              help="Serve groups without a stored policy too (with the default policy).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.pass_context
def serve(ctx: click.Context, config_path: str | None, listen: str | None, any_group: bool | None,
          log_level: str) -> None:
    """Serve FleetLock's /v1/pre-reboot and /v1/steady-state from our semaphore and policies."""
    from locksmith.fleetlock.config import ServerSettings, load_settings
    from locksmith.fleetlock.server import FleetLockServer, serve_forever

    obj: CliContext = ctx.obj
    log.configure(log_level.upper(), stream=sys.stderr)
    try:
        settings = load_settings(config_path) if config_path else ServerSettings()
    except LocksmithError as exc:
        fail(str(exc))
    if not settings.etcd_from_file or _explicit(ctx, "endpoints"):
        settings = replace(settings, etcd=replace(obj.etcd_config, timeout=settings.etcd.timeout))
    if _explicit(ctx, "prefix") or not config_path:
        settings = replace(settings, prefix=obj.prefix)
    if listen:
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise click.BadParameter(f"{listen!r} is not ADDRESS:PORT", param_hint="--listen")
        settings = replace(settings, address=host.strip("[]") or "0.0.0.0", port=int(port))
    if any_group:
        settings = replace(settings, any_group=True)
    try:
        asyncio.run(serve_forever(FleetLockServer(settings)))
    except LocksmithError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


@fleetlock.command("import-airlock")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Show what would be written; write nothing.")
@click.option("--keep-existing", is_flag=True, help="Only create missing policies; never change a stored one.")
@click.pass_obj
def import_airlock(obj: CliContext, file: str, dry_run: bool, keep_existing: bool) -> None:
    """Write the policies equivalent to airlock config FILE's [lock] groups (their slots)."""
    import tomllib

    from locksmith.fleetlock.airlock import import_groups
    from locksmith.fleetlock.config import ConfigError, lock_groups

    try:
        doc = tomllib.loads(read_text(file, max_bytes=256 * 1024, what="airlock config"))
        groups = lock_groups(doc, source=file)
    except InputFileError as exc:
        fail(str(exc))
    except tomllib.TOMLDecodeError as exc:
        fail(f"{file}: TOML syntax error: {exc}")
    except ConfigError as exc:
        fail(str(exc))
    if not groups:
        fail(f"{file}: no [lock] table: nothing to import")

    async def go(etcd: Etcd) -> list[Any]:
        return await import_groups(etcd, groups, prefix=obj.prefix, update=not keep_existing, dry_run=dry_run,
                                   source=file)

    results = obj.run(go)

    def text() -> str:
        lines = [f"{'GROUP':<24} {'SLOTS':>5}  ACTION"]
        for r in results:
            was = f" (was {r.previous_slots})" if r.action in ("updated", "kept") else ""
            note = f"  {r.note}" if r.note else ""
            lines.append(f"{r.group:<24} {r.slots:>5}  {r.action}{was}{note}")
        return "\n".join(lines)

    obj.emit({"file": file, "dry_run": dry_run, "groups": [r.to_json() for r in results]}, text)
    if any(r.action in ("conflict", "invalid") for r in results):
        sys.exit(1)
