"""The `cqrs` console entry point, kept apart from the CLI so that a SIGTERM arriving
while the CLI's modules import (seconds on a loaded machine) is deferred, not fatal: a
command with a graceful stop (relay, project, run, replay, repartition) then stops cleanly,
before it took anything (`cqrs.signals`). Every other command (`serve` included: uvicorn
installs its own handlers) gets the default SIGTERM back once the imports are done, and
one received meanwhile ends it then."""

from __future__ import annotations

import sys

from cqrs.signals import defer_early_stop, end_early_stop

# The commands that install stop handlers (and so pick a deferred SIGTERM up).
_LONG_RUNNING = frozenset({"relay", "project", "run", "replay", "repartition"})


def main() -> None:
    defer_early_stop()
    from cqrs.app import cli

    if not (set(sys.argv[1:2]) & _LONG_RUNNING):
        end_early_stop()
    cli.main()
