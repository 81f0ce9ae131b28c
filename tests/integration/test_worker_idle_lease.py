"""An idle worker keeps its leases, whatever CQRS_PROJECTOR_BLOCK_MS is.

Found by the soak (`python -m bench.soak` runs workers with CQRS_PROJECTOR_LEASE_MS=1000): an idle
worker waited `projector_block_ms` (default 1 s) for a wake-up before renewing, so with a
lease of 1 s or less every quiet second let every lease lapse; the slots then changed
hands (or stayed unowned) and were recovered with XAUTOCLAIM over and over.
"""

from __future__ import annotations

import threading
import time

from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.worker import Worker
from cqrs.wiring import Wiring
from tests.helpers import wait_until
from tests.integration.projector_support import drain


def test_an_idle_worker_renews_its_leases_before_they_lapse(wiring: Wiring) -> None:
    drain(wiring)  # the views exist, nothing is pending: the worker will be idle
    settings = wiring.settings.model_copy(
        update={"projector_lease_ms": 600, "projector_block_ms": 1500}
    )
    worker = Worker(wiring.redis, settings, PROJECTIONS.values(), consumer="idle")
    leases = [wiring.keys.lease(p, n) for p in PROJECTIONS for n in range(settings.partitions)]
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(
            lambda: all(wiring.redis.get(k) == "idle" for k in leases),
            timeout=15,
            what="the worker to hold every lease",
        )
        lapsed = 0
        deadline = time.monotonic() + 3 * settings.projector_block_ms / 1000
        while time.monotonic() < deadline:
            pipe = wiring.redis.pipeline(transaction=False)
            for key in leases:
                pipe.get(key)
            lapsed += sum(owner != "idle" for owner in pipe.execute())
            time.sleep(0.02)
        assert lapsed == 0, f"{lapsed} lease samples found lapsed while the worker idled"
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
