"""The `orders` projection's handlers: one hash per order, denormalized across the three
services, and each customer's orders newest first (layout, encoders and read model: its
contract, `projector.contracts.orders`).

A customer's events and their orders' events share a partition (the write side uses the
customer id as partition key), so they arrive here in commit order. The projection keeps
its own copy of each customer's name (`customer-name:{customer}`) and fans a rename out
to every order in the customer's index; a new order takes the newest name it knows. The
order keeps the customer version its name is from, and a fan-out never replaces it with
an older one (a worker stalled past its lease between the rename's rounds).

What may and may not find its view missing: a rename of a customer with no orders is
normal (the fan-out finds an empty index and updates nothing), but a rename of a customer
whose registration this projection never applied, an order of such a customer, and a
cancel or shipment of an order that was never placed are gaps: retried, then
dead-lettered, never a partial view or an index entry.
"""

from __future__ import annotations

from typing import Any

from cqrs.events import (
    CustomerRegistered,
    CustomerRenamed,
    EventEnvelope,
    OrderCancelled,
    OrderPlaced,
    OrderShipped,
    aggregate_text,
)
from cqrs.projector.contracts.orders import (
    CONTRACT,
    LINE_ATTRIBUTES,  # noqa: F401 (re-exported: the line encoders' old home)
    OrderKeys,
    line_field,  # noqa: F401 (re-exported: the line encoders' old home)
    line_fields,
    order_member,
    order_member_id,
)
from cqrs.projector.projection import Projection
from cqrs.projector.steps import NEED_GATE, Step, apply, command, script


def _customer_name_changed(
    event: EventEnvelope, name: str, views: OrderKeys, *, registers: bool = False
) -> list[Step]:
    customer_id = aggregate_text(event)
    key = views.order_customer(customer_id)

    def fan_out(result: list[Any]) -> list[Step]:
        current, version = result[1], result[2]

        def update_orders(members: list[str]) -> list[Step]:
            return [
                script(
                    "set_if_newer",
                    (views.order(order_member_id(m)),),
                    ("customer_version", version, "customer_name", current),
                )
                for m in members
            ]

        return [command("ZRANGE", views.customer_orders(customer_id), 0, -1, then=update_orders)]

    ops = [("set", "name", name)]
    needs = () if registers else (NEED_GATE,)
    returns = ("name", "version")
    return [apply(key, key, "version", event.version, ops, returns, fan_out, needs=needs)]


def on_customer_registered(
    event: EventEnvelope, p: CustomerRegistered, views: OrderKeys
) -> list[Step]:
    return _customer_name_changed(event, p.name, views, registers=True)


def on_customer_renamed(event: EventEnvelope, p: CustomerRenamed, views: OrderKeys) -> list[Step]:
    return _customer_name_changed(event, p.name, views)


def on_order_placed(event: EventEnvelope, p: OrderPlaced, views: OrderKeys) -> list[Step]:
    order_id = aggregate_text(event)
    customer_id = str(p.customer_id)
    order_key = views.order(order_id)
    line_ops: list[tuple[str, str, Any]] = [("set", "line_count", len(p.lines))]
    for n, line in enumerate(p.lines, start=1):
        product_id, name, unit_price, qty, line_total = line_fields(n)
        line_ops += [
            ("set", product_id, str(line.product_id)),
            ("set", name, line.name),
            ("set", unit_price, f"{line.unit_price:.2f}"),
            ("set", qty, line.qty),
            ("set", line_total, f"{line.line_total:.2f}"),
        ]

    def create(result: list[Any]) -> list[Step]:
        _status, known_name, known_version = result
        name, version = p.customer_name, p.customer_version
        if known_name is not None and int(known_version or 0) >= p.customer_version:
            name, version = known_name, int(known_version)
        ops = [
            ("set", "id", order_id),
            ("set", "customer_id", customer_id),
            ("set", "customer_name", name),
            ("set", "customer_version", version),
            ("set", "status", "placed"),
            *line_ops,
            ("set", "total", f"{p.total:.2f}"),
            ("set", "placed_at", p.placed_at.isoformat()),
        ]
        return [apply(order_key, order_key, "version", event.version, ops)]

    # Gated on the customer's name record (MISSING when the customer was never
    # registered here), but not counted: the order's own write is the apply above.
    join = script(
        "zadd_and_read",
        (views.customer_orders(customer_id), views.order_customer(customer_id)),
        (0, order_member(p.placed_at, order_id), "name", "version"),
        then=create,
    )
    join.gated, join.counted = True, False
    return [join]


def on_order_cancelled(event: EventEnvelope, p: OrderCancelled, views: OrderKeys) -> list[Step]:
    key = views.order(aggregate_text(event))
    ops = [("set", "status", "cancelled"), ("set", "cancelled_at", p.cancelled_at.isoformat())]
    return [apply(key, key, "version", event.version, ops, needs=(NEED_GATE,))]


def on_order_shipped(event: EventEnvelope, p: OrderShipped, views: OrderKeys) -> list[Step]:
    key = views.order(aggregate_text(event))
    ops = [("set", "status", "shipped"), ("set", "shipped_at", p.shipped_at.isoformat())]
    return [apply(key, key, "version", event.version, ops, needs=(NEED_GATE,))]


ORDERS = Projection(
    name="orders",
    # 2: lines as one field per attribute (was one JSON field `lines`).
    # 3: customer_version on the order (stale fan-outs refused).
    version=3,
    contract=CONTRACT,
    handlers={
        "CustomerRegistered": on_customer_registered,
        "CustomerRenamed": on_customer_renamed,
        "OrderPlaced": on_order_placed,
        "OrderCancelled": on_order_cancelled,
        "OrderShipped": on_order_shipped,
    },
)
