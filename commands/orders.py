"""Orders service: place (reserving stock), cancel (releasing it), ship.

The services share one database here, so placing an order locks and decrements product
stock in its own transaction. A split deployment would turn this into a reservation saga
(reserve -> confirm/compensate); see docs/architecture.md.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cqrs.commands.catalog import Command
from cqrs.commands.db import MAX_ORDER_LINES
from cqrs.commands.errors import Duplicate, InsufficientStock, InvalidTransition, NotFound
from cqrs.commands.fields import Quantity
from cqrs.commands.results import CommandResult
from cqrs.commands.uow import UnitOfWork, json_text, uuid_array
from cqrs.events import (
    OrderCancelled,
    OrderLine,
    OrderPlaced,
    OrderShipped,
    StockReleased,
    StockReserved,
)


class OrderItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    product_id: uuid.UUID
    qty: Quantity


class PlaceOrder(Command):
    customer_id: uuid.UUID
    items: list[OrderItem] = Field(min_length=1, max_length=MAX_ORDER_LINES)
    order_id: uuid.UUID = Field(default_factory=uuid.uuid4)

    @field_validator("items")
    @classmethod
    def _distinct_products(cls, items: list[OrderItem]) -> list[OrderItem]:
        seen: set[uuid.UUID] = set()
        for item in items:
            if item.product_id in seen:
                raise ValueError(f"product {item.product_id} appears in more than one line")
            seen.add(item.product_id)
        return items


class CancelOrder(Command):
    order_id: uuid.UUID


class ShipOrder(Command):
    order_id: uuid.UUID


# Products are locked in id order: two orders over the same products then queue instead of
# deadlocking. The ids travel as an array literal (`uuid_array`).
_LOCK_PRODUCTS = (
    "SELECT id, name, price, stock, version FROM catalog.products"
    " WHERE id = ANY(%s::uuid[]) ORDER BY id FOR UPDATE"
)
# Everything an order placement reads, in one statement: whether the order id is taken,
# the customer (FOR SHARE: a concurrent rename waits for this order to commit, so the
# name captured here is the one the event log orders before the rename) and the products
# (locked as above). One row per product found, at least one row.
_READ_FOR_PLACING = (
    "WITH customer AS MATERIALIZED ("
    "SELECT name, version FROM customers.customers WHERE id = %s FOR SHARE),"
    f" locked AS MATERIALIZED ({_LOCK_PRODUCTS})"
    " SELECT EXISTS (SELECT FROM orders.orders WHERE id = %s), c.name, c.version,"
    " l.id, l.name, l.price, l.stock, l.version"
    " FROM (SELECT) AS one LEFT JOIN customer AS c ON true LEFT JOIN locked AS l ON true"
)
_INSERT_ORDER = (
    "INSERT INTO orders.orders (id, customer_id, status, total, placed_at, version)"
    " VALUES (%s, %s, 'placed', %s, %s, 1)"
)
# Lines and stock changes travel as one JSON array each, whatever the number of lines.
_INSERT_LINES = (
    "INSERT INTO orders.order_lines (order_id, line_no, product_id, name, unit_price, qty,"
    " line_total) SELECT order_id, line_no, product_id, name, unit_price, qty, line_total"
    " FROM jsonb_populate_recordset(NULL::orders.order_lines, %s::jsonb)"
)
# Each product row is guarded by the version it was read (and locked) at. `p.id = ANY`
# lets the planner reach the products through their index: it cannot count the JSON rows
# (it assumes 100) and would otherwise scan the whole table once per order.
_UPDATE_STOCK = (
    "UPDATE catalog.products AS p SET stock = v.stock, version = v.version + 1"
    " FROM jsonb_populate_recordset(NULL::catalog.products, %s::jsonb) AS v"
    " WHERE p.id = ANY(%s::uuid[]) AND p.id = v.id AND p.version = v.version"
)
_READ_ORDER = (
    "SELECT customer_id, status, total, version FROM orders.orders WHERE id = %s FOR UPDATE"
)
_READ_LINES = (
    "SELECT product_id, unit_price, qty FROM orders.order_lines WHERE order_id = %s"
    " ORDER BY line_no"
)
_CANCEL = (
    "UPDATE orders.orders SET status = 'cancelled', cancelled_at = %s, version = %s"
    " WHERE id = %s AND version = %s"
)
_SHIP = (
    "UPDATE orders.orders SET status = 'shipped', shipped_at = %s, version = %s"
    " WHERE id = %s AND version = %s"
)


class _Locked:
    """A product row locked FOR UPDATE."""

    __slots__ = ("id", "name", "price", "stock", "version")

    def __init__(self, row: Sequence[Any]) -> None:
        self.id, self.name, self.price, self.stock, self.version = row


def _update_stock(uow: UnitOfWork, changes: list[tuple[_Locked, int]]) -> None:
    """Write the new stock of locked products; each gets version + 1."""
    rows = [{"id": p.id, "version": p.version, "stock": stock} for p, stock in changes]
    uow.write(
        _UPDATE_STOCK,
        (json_text(rows), uuid_array([p.id for p, _ in changes])),
        expect_rows=len(rows),
        what="a product of this order",
    )


def place_order(cmd: PlaceOrder, uow: UnitOfWork) -> CommandResult:
    read = uow.send(
        _READ_FOR_PLACING,
        (cmd.customer_id, uuid_array([i.product_id for i in cmd.items]), cmd.order_id),
    ).fetchall()
    order_exists, customer_name, customer_version = read[0][:3]
    if order_exists:
        raise Duplicate(f"order {cmd.order_id} already exists")
    if customer_name is None:
        raise NotFound(f"customer {cmd.customer_id} not found")
    products = {row[3]: _Locked(row[3:]) for row in read if row[3] is not None}
    now = datetime.now(UTC)
    lines: list[OrderLine] = []
    taken_from: list[tuple[_Locked, int]] = []
    for item in cmd.items:
        product = products.get(item.product_id)
        if product is None:
            raise NotFound(f"product {item.product_id} not found")
        if product.stock < item.qty:
            raise InsufficientStock(
                f"insufficient stock for product {product.id}: "
                f"requested {item.qty}, available {product.stock}"
            )
        taken_from.append((product, product.stock - item.qty))
        lines.append(
            OrderLine(
                product_id=product.id,
                name=product.name,
                unit_price=product.price,
                qty=item.qty,
                line_total=product.price * item.qty,
            )
        )
    total = sum((line.line_total for line in lines), Decimal("0.00"))
    placed = OrderPlaced(
        customer_id=cmd.customer_id,
        customer_name=customer_name,
        customer_version=customer_version,
        lines=lines,
        total=total,
        placed_at=now,
    )
    # The same order id racing past the check above fails on the primary key.
    taken = Duplicate(f"order {cmd.order_id} already exists")
    uow.reject_if_exists(taken, cmd.order_id, "pk_orders")
    uow.write(_INSERT_ORDER, (cmd.order_id, cmd.customer_id, total, now))
    _update_stock(uow, taken_from)
    stored = uow.record("order", cmd.order_id, 1, placed, partition_key=cmd.customer_id)
    # The event's lines (JSON form) are exactly the order_lines rows, plus their numbers.
    line_rows = [
        {"order_id": cmd.order_id, "line_no": n, **line}
        for n, line in enumerate(stored["lines"], start=1)
    ]
    uow.write(_INSERT_LINES, (json_text(line_rows),))
    for (product, stock), line in zip(taken_from, lines, strict=True):
        uow.record(
            "product",
            product.id,
            product.version + 1,
            StockReserved(
                order_id=cmd.order_id, qty=line.qty, unit_price=line.unit_price, stock=stock
            ),
        )
    return CommandResult(cmd.order_id, 1, uow.commit())


def _read_order(
    uow: UnitOfWork, order_id: uuid.UUID
) -> tuple[uuid.UUID, str, Decimal, int, list[tuple[uuid.UUID, Decimal, int]]]:
    """The order, locked, and its lines (written once with the order, never changed),
    in one round trip."""
    order = uow.send(_READ_ORDER, (order_id,))
    lines = uow.send(_READ_LINES, (order_id,))
    row = order.fetchone()
    if row is None:
        raise NotFound(f"order {order_id} not found")
    customer_id, status, total, version = row
    return customer_id, status, total, version, lines.fetchall()


def cancel_order(cmd: CancelOrder, uow: UnitOfWork) -> CommandResult:
    customer_id, status, total, read, lines = _read_order(uow, cmd.order_id)
    if status == "shipped":
        raise InvalidTransition(f"order {cmd.order_id} is shipped and cannot be cancelled")
    if status == "cancelled":
        raise InvalidTransition(f"order {cmd.order_id} is already cancelled")
    locked = uow.send(_LOCK_PRODUCTS, (uuid_array([pid for pid, _, _ in lines]),)).fetchall()
    products = {row[0]: _Locked(row) for row in locked}
    now = datetime.now(UTC)
    version = read + 1
    uow.write(
        _CANCEL, (now, version, cmd.order_id, read), expect_rows=1, what=f"order {cmd.order_id}"
    )
    released = [(products[pid], products[pid].stock + qty) for pid, _, qty in lines]
    _update_stock(uow, released)
    uow.record(
        "order",
        cmd.order_id,
        version,
        OrderCancelled(customer_id=customer_id, total=total, cancelled_at=now),
        partition_key=customer_id,
    )
    for (product, stock), (_, unit_price, qty) in zip(released, lines, strict=True):
        uow.record(
            "product",
            product.id,
            product.version + 1,
            StockReleased(order_id=cmd.order_id, qty=qty, unit_price=unit_price, stock=stock),
        )
    return CommandResult(cmd.order_id, version, uow.commit())


def ship_order(cmd: ShipOrder, uow: UnitOfWork) -> CommandResult:
    customer_id, status, _, read, _ = _read_order(uow, cmd.order_id)
    if status == "cancelled":
        raise InvalidTransition(f"order {cmd.order_id} is cancelled and cannot be shipped")
    if status == "shipped":
        raise InvalidTransition(f"order {cmd.order_id} is already shipped")
    now = datetime.now(UTC)
    version = read + 1
    uow.write(
        _SHIP, (now, version, cmd.order_id, read), expect_rows=1, what=f"order {cmd.order_id}"
    )
    uow.record(
        "order",
        cmd.order_id,
        version,
        OrderShipped(customer_id=customer_id, shipped_at=now),
        partition_key=customer_id,
    )
    return CommandResult(cmd.order_id, version, uow.commit())
