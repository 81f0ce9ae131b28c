"""Orders service: place (reserving stock), cancel (releasing it), ship.

The services share one database here, so placing an order locks and decrements product
stock in its own transaction. A split deployment would turn this into a reservation saga
(reserve -> confirm/compensate); see docs/architecture.md.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import selectinload

from commands.catalog import Command
from commands.customers import get_customer
from commands.db import MAX_ORDER_LINES, Order, OrderLineRow, Product
from commands.errors import Duplicate, InsufficientStock, InvalidTransition, NotFound
from commands.fields import Quantity
from commands.results import CommandResult
from commands.uow import UnitOfWork
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


def _lock_products(uow: UnitOfWork, ids: list[uuid.UUID]) -> dict[uuid.UUID, Product]:
    """Lock in id order: two orders over the same products then queue instead of
    deadlocking."""
    rows = uow.session.scalars(
        select(Product).where(Product.id.in_(ids)).order_by(Product.id).with_for_update()
    ).all()
    return {p.id: p for p in rows}


def place_order(cmd: PlaceOrder, uow: UnitOfWork) -> CommandResult:
    # FOR SHARE: a concurrent rename waits for this order to commit, so the name captured
    # here is the one the event log orders before the rename.
    if uow.session.get(Order, cmd.order_id) is not None:
        raise Duplicate(f"order {cmd.order_id} already exists")
    customer = get_customer(uow, cmd.customer_id, for_share=True)
    products = _lock_products(uow, [i.product_id for i in cmd.items])
    now = datetime.now(UTC)
    lines: list[OrderLine] = []
    for item in cmd.items:
        product = products.get(item.product_id)
        if product is None:
            raise NotFound(f"product {item.product_id} not found")
        if product.stock < item.qty:
            raise InsufficientStock(
                f"insufficient stock for product {product.id}: "
                f"requested {item.qty}, available {product.stock}"
            )
        product.stock -= item.qty
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
    order = Order(
        id=cmd.order_id, customer_id=customer.id, status="placed", total=total, placed_at=now
    )
    order.lines = [
        OrderLineRow(
            line_no=n,
            product_id=line.product_id,
            name=line.name,
            unit_price=line.unit_price,
            qty=line.qty,
            line_total=line.line_total,
        )
        for n, line in enumerate(lines, start=1)
    ]
    uow.session.add(order)
    try:
        uow.session.flush()
    except IntegrityError as exc:  # the same order id raced past the check above
        raise Duplicate(f"order {cmd.order_id} already exists") from exc
    uow.record(
        "order",
        order.id,
        order.version,
        OrderPlaced(
            customer_id=customer.id,
            customer_name=customer.name,
            customer_version=customer.version,
            lines=lines,
            total=total,
            placed_at=now,
        ),
        partition_key=customer.id,
    )
    for line in lines:
        product = products[line.product_id]
        uow.record(
            "product",
            product.id,
            product.version,
            StockReserved(
                order_id=order.id, qty=line.qty, unit_price=line.unit_price, stock=product.stock
            ),
        )
    return CommandResult(order.id, order.version, uow.commit())


def _get_order(uow: UnitOfWork, order_id: uuid.UUID) -> Order:
    order = uow.session.scalars(
        select(Order)
        .where(Order.id == order_id)
        .options(selectinload(Order.lines))
        .with_for_update(of=Order)
    ).one_or_none()
    if order is None:
        raise NotFound(f"order {order_id} not found")
    return order


def cancel_order(cmd: CancelOrder, uow: UnitOfWork) -> CommandResult:
    order = _get_order(uow, cmd.order_id)
    if order.status == "shipped":
        raise InvalidTransition(f"order {order.id} is shipped and cannot be cancelled")
    if order.status == "cancelled":
        raise InvalidTransition(f"order {order.id} is already cancelled")
    products = _lock_products(uow, [line.product_id for line in order.lines])
    now = datetime.now(UTC)
    order.status = "cancelled"
    order.cancelled_at = now
    for line in order.lines:
        products[line.product_id].stock += line.qty
    uow.session.flush()
    uow.record(
        "order",
        order.id,
        order.version,
        OrderCancelled(customer_id=order.customer_id, total=order.total, cancelled_at=now),
        partition_key=order.customer_id,
    )
    for line in order.lines:
        product = products[line.product_id]
        uow.record(
            "product",
            product.id,
            product.version,
            StockReleased(
                order_id=order.id, qty=line.qty, unit_price=line.unit_price, stock=product.stock
            ),
        )
    return CommandResult(order.id, order.version, uow.commit())


def ship_order(cmd: ShipOrder, uow: UnitOfWork) -> CommandResult:
    order = _get_order(uow, cmd.order_id)
    if order.status == "cancelled":
        raise InvalidTransition(f"order {order.id} is cancelled and cannot be shipped")
    if order.status == "shipped":
        raise InvalidTransition(f"order {order.id} is already shipped")
    now = datetime.now(UTC)
    order.status = "shipped"
    order.shipped_at = now
    uow.session.flush()
    uow.record(
        "order",
        order.id,
        order.version,
        OrderShipped(customer_id=order.customer_id, shipped_at=now),
        partition_key=order.customer_id,
    )
    return CommandResult(order.id, order.version, uow.commit())
