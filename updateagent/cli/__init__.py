"""updatectl: the node-side CLI. Subcommand groups live in sibling modules."""

from __future__ import annotations

import sys

import click

from locksmith.log import configure


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Inspect and drive the update agent; publish releases."""
    # Log lines go to stderr so that `--output json` leaves stdout parseable.
    configure("WARNING", stream=sys.stderr)


# Imported for their side effect of adding their commands to `main`.
from updateagent.cli import agentcmds, release  # noqa: E402

__all__ = ["agentcmds", "main", "release"]
