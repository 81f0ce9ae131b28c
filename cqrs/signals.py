"""Graceful stop for long-running loops (relay, projector, server).

The first SIGTERM/SIGINT sets a flag the loop checks between batches, so the batch in
hand is finished and acknowledged; a second signal means "now" and exits at once.

A process is told to stop while it is still importing, too (a supervisor restarting a
worker and stopping it again seconds later, on a loaded machine): the entry point defers
SIGTERM before the imports (`defer_early_stop`), and a long-running command picks the
deferred signal up when it installs its handlers, so it stops cleanly (exit 0) before it
took anything; any other command gets the default behaviour back (`end_early_stop`).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

_early: list[int] = []  # SIGTERMs received while deferred


def _remember(signum: int, frame: FrameType | None) -> None:
    _early.append(signum)


def defer_early_stop() -> None:
    """Hold a SIGTERM that arrives before the command's own handlers exist."""
    signal.signal(signal.SIGTERM, _remember)


def end_early_stop() -> None:
    """For commands without a stop handler: the default SIGTERM again, and one that
    arrived meanwhile ends the process now, as it would have then."""
    if signal.getsignal(signal.SIGTERM) is _remember:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if _early:
            os._exit(128 + _early[0])


def install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if _early:
        stop.set()  # told to stop while starting: stop before taking anything
