"""updatectl: the node-side CLI. Subcommand groups live in sibling modules."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Inspect and drive the update agent; publish releases."""


def _register() -> None:
    # Imported for their side effect of adding commands to `main`; each module owns its commands.
    import importlib

    for name in ("release", "agentcmds"):
        try:
            importlib.import_module(f"updateagent.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"updateagent.cli.{name}":
                raise


_register()
