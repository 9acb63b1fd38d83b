"""updatectl: the node-side CLI. Subcommand groups live in sibling modules."""

from __future__ import annotations

import sys

import click

from locksmith.log import configure
from updateagent.cli._common import OUTPUTS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bus-address", envvar="UPDATECTL_BUS_ADDRESS", default=None, metavar="ADDRESS",
              help="D-Bus address of the agent's bus (default: the system bus; env UPDATECTL_BUS_ADDRESS). "
                   "Also accepted after the subcommand.")
@click.option("--output", "-o", type=click.Choice(OUTPUTS), default=None,
              help="Result format: text (default) or json. Also accepted after the subcommand.")
def main(bus_address: str | None, output: str | None) -> None:
    """Inspect and drive the update agent; publish releases."""
    # Log lines go to stderr so that `--output json` leaves stdout parseable.
    configure("WARNING", stream=sys.stderr)


# Imported for their side effect of adding their commands to `main`.
from updateagent.cli import agentcmds, dev, release  # noqa: E402

__all__ = ["agentcmds", "dev", "main", "release"]
