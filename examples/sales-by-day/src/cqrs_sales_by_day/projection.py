"""The `sales-by-day` handlers: order events become steps on the day's view.

Exactly once in effect, as the built-in projections are, with the steps they use
(`cqrs.projector.steps.apply`: a version gate and the writes it guards in one script call):

1. the order's record in its customer's hash (`customer:{customer}`, gated by the order's
   version) notes the day the order counts on; a cancellation or shipment reads that day
   back from it, since its event does not say when the order was placed. The customer's
   registration must have been seen here first (as in the built-in projections, an order
   of a customer never registered is a gap, never counted);
2. the day's counters change in one step with the day's per-order record (`day-orders`,
   same hash tag), gated by the order's version: a redelivered event finds its version
   there and changes nothing;
3. the order's `applied` mark moves to the event's version (refusing to go back), which
   is what read-your-writes waits on: only after the counters are done.

A redelivery that finds step 1 already applied still runs steps 2 and 3 (a gate answers
"duplicate" and its follow-up runs), so a crash between the steps converges. A cancel or
shipment whose placement was never seen is a gap too: retried, then dead-lettered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cqrs.contracts import cents
from cqrs.events import (
    CustomerRegistered,
    EventHeader,
    OrderCancelled,
    OrderPlaced,
    OrderShipped,
)
from cqrs.keys import ViewKeys
from cqrs.projector.projection import Projection
from cqrs.projector.steps import NEED_GATE, NEED_TARGET, Step, apply, script
from cqrs_sales_by_day.contract import (
    CONTRACT,
    NAME,
    applied_field,
    customer_key,
    day_field,
    day_key,
    day_of,
    day_orders_key,
)

Ops = list[tuple[str, str, Any]]


def on_customer_registered(
    event: EventHeader, _p: CustomerRegistered, views: ViewKeys
) -> list[Step]:
    """The customer's record: its orders may be counted from now on."""
    key = customer_key(views, event.aggregate_id)
    return [apply(key, key, "version", event.version)]


def _on_day(
    event: EventHeader, customer: Any, day: str, ops: Ops, views: ViewKeys, *, placed: bool
) -> Step:
    """Steps 2 and 3: the day's counters once per order version, then the mark."""
    mark = script(
        "set_if_newer",
        (customer_key(views, customer),),
        (applied_field(event.aggregate_id), event.version),
    )
    return apply(
        day_orders_key(views, day),
        day_key(views, day),
        str(event.aggregate_id),
        event.version,
        ops,
        then=lambda _result: [mark],
        needs=() if placed else (NEED_GATE,),
    )


def _record(
    event: EventHeader,
    customer: Any,
    views: ViewKeys,
    ops: Ops,
    then: Callable[[Any], list[Step]],
    *,
    placed: bool,
) -> Step:
    """Step 1: the order's record in its customer's hash, gated by the order's version.
    A placement needs the customer's record (its registration); a later event needs its
    placement (the gate). It is bookkeeping, not the event's effect, so it is not
    counted (one counted write per event: the day's)."""
    key = customer_key(views, customer)
    oid = event.aggregate_id
    returns, needs = ((), (NEED_TARGET,)) if placed else ((day_field(oid),), (NEED_GATE,))
    step = apply(key, key, str(oid), event.version, ops, returns, then, needs=needs)
    step.counted = False
    return step


def on_order_placed(event: EventHeader, p: OrderPlaced, views: ViewKeys) -> list[Step]:
    day = day_of(p.placed_at)
    counters: Ops = [
        ("set", "date", day),
        ("incr", "order_count", 1),
        ("money", "revenue", cents(p.total)),
    ]

    def count(_result: list[Any]) -> list[Step]:
        return [_on_day(event, p.customer_id, day, counters, views, placed=True)]

    ops: Ops = [("set", day_field(event.aggregate_id), day)]
    return [_record(event, p.customer_id, views, ops, count, placed=True)]


def _later_event(event: EventHeader, customer: Any, views: ViewKeys, counters: Ops) -> list[Step]:
    def on_its_day(result: list[Any]) -> list[Step]:
        day = result[1]
        if not day:
            raise ValueError(f"order {event.aggregate_id} has no day recorded")
        return [_on_day(event, customer, day, counters, views, placed=False)]

    return [_record(event, customer, views, [], on_its_day, placed=False)]


def on_order_cancelled(event: EventHeader, p: OrderCancelled, views: ViewKeys) -> list[Step]:
    counters: Ops = [("incr", "order_count", -1), ("money", "revenue", -cents(p.total))]
    return _later_event(event, p.customer_id, views, counters)


def on_order_shipped(event: EventHeader, p: OrderShipped, views: ViewKeys) -> list[Step]:
    # Nothing to count, but the order's version must advance so its later events apply.
    return _later_event(event, p.customer_id, views, [])


SALES_BY_DAY = Projection(
    name=NAME,
    version=1,
    contract=CONTRACT,
    handlers={
        "CustomerRegistered": on_customer_registered,
        "OrderPlaced": on_order_placed,
        "OrderCancelled": on_order_cancelled,
        "OrderShipped": on_order_shipped,
    },
)
