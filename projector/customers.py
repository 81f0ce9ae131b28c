"""The `customers` projection: one hash per customer with their order counters.

View `customer:{id}`: id, email, name, order_count, lifetime_value, version. The counters
are fed by order events; the version of each order already counted is recorded beside
the view (same hash tag), so a redelivered OrderPlaced never counts twice and a cancel
reverts exactly what was counted.

Only CustomerRegistered creates a view. A rename of a customer this projection never
registered, and an order event of such a customer, is a gap (the registration is
missing): not applied, retried, then dead-lettered, never a partial customer view. So is
a cancel or shipment of an order whose placement was never counted.
"""

from __future__ import annotations

from cqrs.events import (
    CustomerRegistered,
    CustomerRenamed,
    EventHeader,
    OrderCancelled,
    OrderPlaced,
    OrderShipped,
    aggregate_text,
)
from cqrs.projector.contracts.customers import CONTRACT, CustomerKeys
from cqrs.projector.projection import Projection, cents
from cqrs.projector.steps import NEED_GATE, NEED_TARGET, Step, apply


def on_registered(event: EventHeader, p: CustomerRegistered, views: CustomerKeys) -> list[Step]:
    customer_id = aggregate_text(event)
    key = views.customer(customer_id)
    ops = [
        ("set", "id", customer_id),
        ("set", "email", p.email),
        ("set", "name", p.name),
        ("incr", "order_count", 0),
        ("money", "lifetime_value", 0),
    ]
    return [apply(key, key, "version", event.version, ops)]


def on_renamed(event: EventHeader, p: CustomerRenamed, views: CustomerKeys) -> list[Step]:
    key = views.customer(aggregate_text(event))
    ops = [("set", "name", p.name)]
    return [apply(key, key, "version", event.version, ops, needs=(NEED_GATE,))]


def _order_step(
    event: EventHeader, customer_id: object, views: CustomerKeys, ops: list, *, placed: bool = False
) -> Step:
    """The counters of one order event on its customer's view: the customer view must
    exist, and every event but the placement needs the placement counted first."""
    customer = str(customer_id)  # formatted once for both keys
    return apply(
        views.customer_order_state(customer),
        views.customer(customer),
        aggregate_text(event),
        event.version,
        ops,
        needs=(NEED_TARGET,) if placed else (NEED_GATE, NEED_TARGET),
    )


def on_order_placed(event: EventHeader, p: OrderPlaced, views: CustomerKeys) -> list[Step]:
    ops = [("incr", "order_count", 1), ("money", "lifetime_value", cents(p.total))]
    return [_order_step(event, p.customer_id, views, ops, placed=True)]


def on_order_cancelled(event: EventHeader, p: OrderCancelled, views: CustomerKeys) -> list[Step]:
    ops = [("incr", "order_count", -1), ("money", "lifetime_value", -cents(p.total))]
    return [_order_step(event, p.customer_id, views, ops)]


def on_order_shipped(event: EventHeader, p: OrderShipped, views: CustomerKeys) -> list[Step]:
    # Nothing to count, but the order's version must advance so its later events apply.
    return [_order_step(event, p.customer_id, views, [])]


CUSTOMERS = Projection(
    name="customers",
    version=1,
    contract=CONTRACT,
    handlers={
        "CustomerRegistered": on_registered,
        "CustomerRenamed": on_renamed,
        "OrderPlaced": on_order_placed,
        "OrderCancelled": on_order_cancelled,
        "OrderShipped": on_order_shipped,
    },
)
