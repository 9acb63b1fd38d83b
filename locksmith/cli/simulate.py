"""``locksmithctl simulate``: registered here, implemented in the ``rollout`` package.

The simulator runs the update agent (``updateagent``), which depends on ``locksmith``; so this
module imports it only when the command runs, and ``locksmithctl`` keeps starting without it.
"""

from __future__ import annotations

from typing import Any

import click

from locksmith.cli import main


class _LazySimulate(click.Command):
    """Loads ``rollout.cli.simulate_cmd`` for help and for running it."""

    def _real(self) -> click.Command:
        from rollout.cli import simulate_cmd

        return simulate_cmd

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        return self._real().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        return self._real().invoke(ctx)

    def get_short_help_str(self, limit: int = 45) -> str:
        return "Simulate a rolling reboot of a fleet in virtual time."


main.add_command(_LazySimulate("simulate", help="Simulate a rolling reboot of a fleet in virtual time."))
