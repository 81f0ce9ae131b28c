"""The `sales-by-day` handlers: order events become steps on the day's view.

Exactly once in effect, as the built-in projections are, with the steps they use
(`cqrs.projector.steps.apply`: a version gate and the writes it guards in one script call):

1. the order's own record (`order:{id}`, gated by the order's version) notes the day the
   order counts on; a cancellation or shipment reads that day back from it, since its
   event does not say when the order was placed;
2. the day's counters change in one step with the day's per-order record (`day-orders`,
   same hash tag), gated by the order's version: a redelivered event finds its version
   there and changes nothing;
3. the order's `applied` mark moves to the event's version (refusing to go back), which
   is what read-your-writes waits on: only after the counters are done.

A redelivery that finds step 1 already applied still runs steps 2 and 3 (a gate answers
"duplicate" and its follow-up runs), so a crash between the steps converges. A cancel
or shipment whose placement was never seen is a gap: retried, then dead-lettered.
"""

from __future__ import annotations

from typing import Any

from cqrs.contracts import cents
from cqrs.events import EventHeader, OrderCancelled, OrderPlaced, OrderShipped
from cqrs.keys import ViewKeys
from cqrs.projector.projection import Projection
from cqrs.projector.steps import NEED_GATE, Step, apply, script
from cqrs_sales_by_day.contract import (
    CONTRACT,
    NAME,
    day_key,
    day_of,
    day_orders_key,
    order_key,
)

Ops = list[tuple[str, str, Any]]


def _on_day(event: EventHeader, views: ViewKeys, day: str, ops: Ops, *, placed: bool) -> Step:
    """Steps 2 and 3: the day's counters once per order version, then the mark."""
    record = order_key(views, event.aggregate_id)
    mark = script("set_if_newer", (record,), ("applied", event.version))
    return apply(
        day_orders_key(views, day),
        day_key(views, day),
        str(event.aggregate_id),
        event.version,
        ops,
        then=lambda _result: [mark],
        needs=() if placed else (NEED_GATE,),
    )


def _record(event: EventHeader, views: ViewKeys, ops: Ops, then: Any, *, placed: bool) -> Step:
    """Step 1: the order's record, gated by its version. It is bookkeeping, not the
    event's effect, so it is not counted (one counted write per event, the day's)."""
    key = order_key(views, event.aggregate_id)
    returns = () if placed else ("day",)
    step = apply(
        key, key, "version", event.version, ops, returns, then, needs=() if placed else (NEED_GATE,)
    )
    step.counted = False
    return step


def on_order_placed(event: EventHeader, p: OrderPlaced, views: ViewKeys) -> list[Step]:
    day = day_of(p.placed_at)
    counters: Ops = [
        ("set", "date", day),
        ("incr", "order_count", 1),
        ("money", "revenue", cents(p.total)),
    ]
    return [
        _record(
            event,
            views,
            [("set", "day", day)],
            lambda _result: [_on_day(event, views, day, counters, placed=True)],
            placed=True,
        )
    ]


def _later_event(event: EventHeader, views: ViewKeys, counters: Ops) -> list[Step]:
    def counted_on_its_day(result: list[Any]) -> list[Step]:
        day = result[1]
        if not day:
            raise ValueError(f"order {event.aggregate_id} has no day recorded")
        return [_on_day(event, views, day, counters, placed=False)]

    return [_record(event, views, [], counted_on_its_day, placed=False)]


def on_order_cancelled(event: EventHeader, p: OrderCancelled, views: ViewKeys) -> list[Step]:
    return _later_event(
        event, views, [("incr", "order_count", -1), ("money", "revenue", -cents(p.total))]
    )


def on_order_shipped(event: EventHeader, _p: OrderShipped, views: ViewKeys) -> list[Step]:
    # Nothing to count, but the order's version must advance so its later events apply.
    return _later_event(event, views, [])


SALES_BY_DAY = Projection(
    name=NAME,
    version=1,
    contract=CONTRACT,
    handlers={
        "OrderPlaced": on_order_placed,
        "OrderCancelled": on_order_cancelled,
        "OrderShipped": on_order_shipped,
    },
)
