"""Graceful stop for long-running loops (relay, projector, server).

The first SIGTERM/SIGINT sets a flag the loop checks between batches, so the batch in
hand is finished and acknowledged; a second signal means "now" and exits at once.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType


def install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
