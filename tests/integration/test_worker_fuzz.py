"""A property of the worker's read loop on a real Redis: whatever the interleaving of
failing entries, worker deaths, lease losses and vanished consumer groups,

- no entry is delivered more than `max deliveries + 1` times by one consumer group
  (a group recreated after NOGROUP starts counting afresh, as Redis does), and
- new entries are never stopped: once the chaos ends, one worker drains everything,
  every good entry applied and every bad one dead-lettered.

Workers run in this process, one read at a time, so the interleaving is the example's;
Redis is real and so are the worker's commands. A worker "dies" by being dropped with
its leases deleted (as their expiry would), and "loses a lease" by the key vanishing
while it still believes it holds the slot (as a long pause past its TTL would).
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cqrs.projector.deadletters import list_dead_letters
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.worker import Entry, Worker
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.conftest import delete_namespace
from tests.integration.projector_support import drain, malformed, product_created

PRODUCTS = PROJECTIONS["products"]
MAX_DELIVERIES = 3
PARTITIONS = 2
_examples = itertools.count()


class CountingWorker(Worker):
    """Records every delivery it processes, per consumer-group incarnation."""

    def __init__(self, *args: Any, seen: Counter[tuple[str, str, int]], epoch: dict[str, int],
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.seen, self.epoch = seen, epoch

    def process(self, entries: list[Entry]) -> None:
        for entry in entries:
            stream = entry.slot.stream
            self.seen[(stream, entry.entry_id, self.epoch[stream])] += 1
        super().process(entries)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("good"), st.integers(0, PARTITIONS - 1), st.integers(1, 4)),
        st.tuples(st.just("bad"), st.integers(0, PARTITIONS - 1), st.integers(1, 3)),
        st.tuples(st.just("read"), st.integers(0, 2)),
        st.tuples(st.just("read"), st.integers(0, 2)),
        st.tuples(st.just("read"), st.integers(0, 2)),
        st.tuples(st.just("kill"), st.integers(0, 2)),
        st.tuples(st.just("lose_lease"), st.integers(0, 2)),
        st.tuples(st.just("nogroup"), st.integers(0, PARTITIONS - 1)),
    ),
    min_size=5,
    max_size=40,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(program=operations)
def test_redeliveries_are_bounded_and_new_entries_never_stop(
    settings: Settings, program: list[tuple[Any, ...]]
) -> None:
    example = settings.model_copy(
        update={
            "namespace": f"{settings.namespace}x{next(_examples)}",
            "partitions": PARTITIONS,
            "projector_max_deliveries": MAX_DELIVERIES,
            # No waiting between deliveries: the example's steps are the clock.
            "projector_retry_delay_ms": 0,
            "projector_batch_size": 3,
        }
    )
    wiring = Wiring(example)
    try:
        drain(wiring, [PRODUCTS])
        seen: Counter[tuple[str, str, int]] = Counter()
        epoch = dict.fromkeys((wiring.keys.stream(n) for n in range(PARTITIONS)), 0)
        consumers = itertools.count()

        def new_worker() -> CountingWorker:
            return CountingWorker(
                wiring.redis, example, [PRODUCTS], consumer=f"w{next(consumers)}",
                seen=seen, epoch=epoch,
            )  # fmt: skip

        workers = [new_worker() for _ in range(3)]
        good: list[uuid.UUID] = []
        bad: set[str] = set()
        for op in program:
            kind = op[0]
            if kind == "good":
                for _ in range(op[2]):
                    product = uuid.uuid4()
                    good.append(product)
                    wiring.redis.xadd(wiring.keys.stream(op[1]), product_created(product, "ok"))
            elif kind == "bad":
                for _ in range(op[2]):
                    bad.add(wiring.redis.xadd(wiring.keys.stream(op[1]), malformed()))
            elif kind == "read":
                workers[op[1]].run_once()
            elif kind == "kill":
                dead = workers[op[1]]
                leases = [s.lease for s in dead.owned.values()]
                if leases:
                    wiring.redis.delete(*leases)
                wiring.redis.zrem(wiring.keys.workers("products"), dead.consumer)
                workers[op[1]] = new_worker()
            elif kind == "lose_lease":
                owned = list(workers[op[1]].owned.values())
                if owned:
                    wiring.redis.delete(owned[0].lease)
            elif kind == "nogroup":
                stream = wiring.keys.stream(op[1])
                if wiring.redis.exists(stream) and wiring.redis.xgroup_destroy(stream, "products"):
                    epoch[stream] += 1

        # The chaos ends: the workers die, one more drains.
        for dead in workers:
            leases = [s.lease for s in dead.owned.values()]
            if leases:
                wiring.redis.delete(*leases)
        finisher = new_worker()
        stop = threading.Event()
        thread = threading.Thread(target=finisher.run, args=(stop,), kwargs={"drain": True})
        thread.start()
        thread.join(60)
        stop.set()
        thread.join(10)
        assert not thread.is_alive(), "the final drain did not finish"

        worst = max(seen.values(), default=0)
        assert worst <= MAX_DELIVERIES + 1, seen.most_common(3)
        view = wiring.keys.views("products", 1)
        missing = [p for p in good if not wiring.redis.exists(view.product(p))]
        assert missing == []
        lettered = {d.entry_id for d in list_dead_letters(wiring.redis, wiring.keys, "products")}
        assert bad <= lettered
        for n in range(PARTITIONS):
            assert wiring.redis.xpending(wiring.keys.stream(n), "products")["pending"] == 0
    finally:
        delete_namespace(example.redis_url or "", example.namespace)
        wiring.close()
