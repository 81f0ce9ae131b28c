"""The command write path on plain SQL: what each command leaves in PostgreSQL.

The handlers send each command's writes and events as one statement on a pooled psycopg
connection in pipeline mode (commands/uow.py). These tests pin down what that must keep:
the rows and events of every command, rejections that write nothing (the constraints now
decide duplicates, with the same messages), NOTIFY for the relay, and a pooled connection
handed back exactly as the pool's other users expect it.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from cqrs.commands import uow as uow_module
from cqrs.commands.catalog import CreateProduct, RenameProduct, RepriceProduct, RestockProduct
from cqrs.commands.customers import RegisterCustomer, RenameCustomer
from cqrs.commands.db import make_session_factory
from cqrs.commands.errors import Duplicate, InsufficientStock, InvalidTransition, NotFound
from cqrs.commands.handlers import execute
from cqrs.commands.orders import CancelOrder, OrderItem, PlaceOrder, ShipOrder
from cqrs.commands.results import CommandResult
from cqrs.events import EventEnvelope
from cqrs.urls import libpq_url
from cqrs.wiring import Wiring

WRITE_TABLES = (
    "events.event_log",
    "events.outbox",
    "catalog.products",
    "customers.customers",
    "orders.orders",
    "orders.order_lines",
)


def _query(wiring: Wiring, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(libpq_url(wiring.database_url), autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def _snapshot(wiring: Wiring) -> dict[str, list[tuple[Any, ...]]]:
    """Every write-side row, to prove a rejected command changed nothing."""
    return {t: sorted(map(repr, _query(wiring, f"SELECT * FROM {t}"))) for t in WRITE_TABLES}


def _logged(wiring: Wiring, result: CommandResult) -> list[tuple[Any, ...]]:
    return _query(
        wiring,
        "SELECT e.event_id, e.event_type, e.aggregate_type, e.aggregate_id,"
        " e.aggregate_version, e.partition_key, e.payload, e.occurred_at, e.position,"
        " o.position IS NOT NULL FROM events.event_log e"
        " LEFT JOIN events.outbox o USING (position) WHERE e.event_id = ANY(%s)"
        " ORDER BY e.position",
        [e.event_id for e in result.events],
    )


def _assert_logged_as_returned(wiring: Wiring, result: CommandResult) -> None:
    """The events the caller got are the rows in the log, in position order, each with
    an outbox row."""
    rows = _logged(wiring, result)
    assert [r[8] for r in rows] == sorted(e.position for e in result.events)
    assert [r[8] for r in rows] == [e.position for e in result.events], "recorded order"
    for e, row in zip(result.events, rows, strict=True):
        assert isinstance(e, EventEnvelope)
        assert row == (
            e.event_id,
            e.event_type,
            e.aggregate_type,
            e.aggregate_id,
            e.version,
            e.partition_key,
            e.payload,
            e.occurred_at,
            e.position,
            True,
        )
        e.typed_payload()  # the payload honours its contract


@pytest.fixture
def sf(wiring: Wiring) -> sessionmaker:
    return make_session_factory(wiring.engine)


def _shop(sf: sessionmaker) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    a = execute(CreateProduct(sku="A-1", name="Apple", price="1.25", stock=10), sf).id
    b = execute(CreateProduct(sku="B-1", name="Bread", price="2.50", stock=5), sf).id
    c = execute(RegisterCustomer(email="Eve@Example.com", name="Eve"), sf).id
    return a, b, c


def test_order_lifecycle_rows_and_events(wiring: Wiring, sf: sessionmaker) -> None:
    a, b, customer = _shop(sf)
    placed = execute(
        PlaceOrder(
            customer_id=customer,
            items=[OrderItem(product_id=b, qty=2), OrderItem(product_id=a, qty=3)],
        ),
        sf,
    )
    assert (placed.version, [e.event_type for e in placed.events]) == (
        1,
        ["OrderPlaced", "StockReserved", "StockReserved"],
    )
    _assert_logged_as_returned(wiring, placed)
    order = placed.events[0]
    assert order.partition_key == customer
    assert order.payload["customer_name"] == "Eve"
    assert order.payload["customer_version"] == 1
    assert order.payload["total"] == "8.75"
    assert [(ln["product_id"], ln["qty"], ln["line_total"]) for ln in order.payload["lines"]] == [
        (str(b), 2, "5.00"),
        (str(a), 3, "3.75"),
    ]
    assert [(e.aggregate_id, e.version, e.payload["stock"]) for e in placed.events[1:]] == [
        (b, 2, 3),
        (a, 2, 7),
    ]
    assert _query(
        wiring,
        "SELECT line_no, product_id, name, unit_price, qty, line_total FROM orders.order_lines"
        " WHERE order_id = %s ORDER BY line_no",
        placed.id,
    ) == [
        (1, b, "Bread", Decimal("2.50"), 2, Decimal("5.00")),
        (2, a, "Apple", Decimal("1.25"), 3, Decimal("3.75")),
    ]
    assert _query(wiring, "SELECT customer_id, status, total, version FROM orders.orders") == [
        (customer, "placed", Decimal("8.75"), 1)
    ]

    cancelled = execute(CancelOrder(order_id=placed.id), sf)
    assert cancelled.version == 2
    assert [e.event_type for e in cancelled.events] == [
        "OrderCancelled",
        "StockReleased",
        "StockReleased",
    ]
    _assert_logged_as_returned(wiring, cancelled)
    assert [(e.aggregate_id, e.version, e.payload["stock"]) for e in cancelled.events[1:]] == [
        (b, 3, 5),
        (a, 3, 10),
    ]
    assert _query(wiring, "SELECT id, stock, version FROM catalog.products ORDER BY sku") == [
        (a, 10, 3),
        (b, 5, 3),
    ]
    with pytest.raises(InvalidTransition, match="is already cancelled"):
        execute(CancelOrder(order_id=placed.id), sf)
    with pytest.raises(InvalidTransition, match="is cancelled and cannot be shipped"):
        execute(ShipOrder(order_id=placed.id), sf)

    second = execute(PlaceOrder(customer_id=customer, items=[{"product_id": a, "qty": 1}]), sf)
    shipped = execute(ShipOrder(order_id=second.id), sf)
    assert (shipped.version, shipped.events[0].event_type) == (2, "OrderShipped")
    _assert_logged_as_returned(wiring, shipped)
    with pytest.raises(InvalidTransition, match="is shipped and cannot be cancelled"):
        execute(CancelOrder(order_id=second.id), sf)
    with pytest.raises(InvalidTransition, match="is already shipped"):
        execute(ShipOrder(order_id=second.id), sf)


def test_product_and_customer_changes_bump_one_version_each(
    wiring: Wiring, sf: sessionmaker
) -> None:
    a, _, customer = _shop(sf)
    results = [
        execute(RenameProduct(product_id=a, name="Green apple"), sf),
        execute(RepriceProduct(product_id=a, price="1.30"), sf),
        execute(RestockProduct(product_id=a, qty=-4), sf),
        execute(RenameCustomer(customer_id=customer, name="Eve B."), sf),
    ]
    assert [r.version for r in results] == [2, 3, 4, 2]
    for r in results:
        _assert_logged_as_returned(wiring, r)
    assert results[2].events[0].payload == {"delta": -4, "stock": 6}
    assert _query(
        wiring, "SELECT name, price, stock, version FROM catalog.products WHERE id = %s", a
    ) == [("Green apple", Decimal("1.30"), 6, 4)]
    assert _query(wiring, "SELECT name, version FROM customers.customers") == [("Eve B.", 2)]


def test_rejected_commands_write_nothing(wiring: Wiring, sf: sessionmaker) -> None:
    a, b, customer = _shop(sf)
    order = execute(PlaceOrder(customer_id=customer, items=[{"product_id": a, "qty": 1}]), sf)
    before = _snapshot(wiring)
    missing = uuid.uuid4()
    rejected = [
        (
            CreateProduct(sku="A-1", name="X", price="1.00", product_id=a),
            Duplicate,
            f"product {a} already exists",
        ),
        (
            CreateProduct(sku="A-1", name="X", price="1.00"),
            Duplicate,
            "a product with SKU 'A-1' already exists",
        ),
        (
            RegisterCustomer(email="other@example.com", name="X", customer_id=customer),
            Duplicate,
            f"customer {customer} already exists",
        ),
        (
            RegisterCustomer(email="eve@EXAMPLE.com", name="X", customer_id=customer),
            Duplicate,
            f"customer {customer} already exists",
        ),
        (
            RegisterCustomer(email="eve@EXAMPLE.com", name="X"),
            Duplicate,
            "a customer with email 'eve@example.com' already exists",
        ),
        (
            PlaceOrder(
                customer_id=customer, items=[{"product_id": a, "qty": 1}], order_id=order.id
            ),
            Duplicate,
            f"order {order.id} already exists",
        ),
        (
            PlaceOrder(customer_id=missing, items=[{"product_id": a, "qty": 1}]),
            NotFound,
            f"customer {missing} not found",
        ),
        (
            PlaceOrder(
                customer_id=customer,
                items=[{"product_id": a, "qty": 1}, {"product_id": missing, "qty": 1}],
            ),
            NotFound,
            f"product {missing} not found",
        ),
        (
            PlaceOrder(
                customer_id=customer,
                items=[{"product_id": a, "qty": 2}, {"product_id": b, "qty": 6}],
            ),
            InsufficientStock,
            f"insufficient stock for product {b}: requested 6, available 5",
        ),
        (
            RestockProduct(product_id=b, qty=-6),
            InsufficientStock,
            f"insufficient stock for product {b}: cannot remove 6, only 5 in stock",
        ),
        (RenameProduct(product_id=missing, name="X"), NotFound, f"product {missing} not found"),
        (
            RenameCustomer(customer_id=missing, name="X"),
            NotFound,
            f"customer {missing} not found",
        ),
        (CancelOrder(order_id=missing), NotFound, f"order {missing} not found"),
        (ShipOrder(order_id=missing), NotFound, f"order {missing} not found"),
    ]
    for command, error, message in rejected:
        with pytest.raises(error) as caught:
            execute(command, sf)
        assert str(caught.value) == message
        assert _snapshot(wiring) == before, f"{command!r} wrote something"


def test_committed_commands_wake_the_relay(wiring: Wiring, sf: sessionmaker) -> None:
    """NOTIFY now travels inside the statement that appends the events."""
    with psycopg.connect(libpq_url(wiring.database_url), autocommit=True) as listener:
        listener.execute(f"LISTEN {uow_module.NOTIFY_CHANNEL}")
        execute(CreateProduct(sku="N-1", name="Notify", price="1.00"), sf)
        received = list(listener.notifies(timeout=10, stop_after=1))
    assert [n.channel for n in received] == [uow_module.NOTIFY_CHANNEL]


def test_pooled_connection_is_handed_back_as_the_pool_expects(
    wiring: Wiring, sf: sessionmaker
) -> None:
    """The unit of work runs the connection in autocommit + pipeline mode; whatever the
    outcome, the pool's other users must get psycopg's default transactional connection."""
    a, _, _ = _shop(sf)
    with pytest.raises(Duplicate):
        execute(CreateProduct(sku="A-1", name="X", price="1.00"), sf)
    with pytest.raises(NotFound):
        execute(RenameProduct(product_id=uuid.uuid4(), name="X"), sf)
    pool = wiring.engine.pool
    checked_out = [wiring.engine.raw_connection() for _ in range(pool.checkedin())]
    try:
        for pooled in checked_out:
            conn = pooled.driver_connection
            assert conn is not None
            assert conn.autocommit is False
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert conn.info.pipeline_status == psycopg.pq.PipelineStatus.OFF
    finally:
        for pooled in checked_out:
            pooled.close()
    # An ORM session on the same engine still gets a real transaction.
    with sf() as session:
        session.execute(
            text("UPDATE catalog.products SET name = 'Rolled back' WHERE id = :i"), {"i": a}
        )
        session.rollback()
    assert _query(wiring, "SELECT name FROM catalog.products WHERE id = %s", a) == [("Apple",)]


def test_a_connection_lost_mid_command_is_a_sqlalchemy_operational_error(
    wiring: Wiring, sf: sessionmaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI reports "cannot reach PostgreSQL" for SQLAlchemy's OperationalError; the
    write path keeps raising that, and the broken connection leaves the pool."""
    real_commit = uow_module.WriteSession.commit

    def commit_after_losing_the_server(self: uow_module.WriteSession) -> None:
        pid = self.connection.info.backend_pid
        _query(wiring, "SELECT pg_terminate_backend(%s)", pid)
        real_commit(self)

    monkeypatch.setattr(uow_module.WriteSession, "commit", commit_after_losing_the_server)
    with pytest.raises(sqlalchemy.exc.OperationalError) as caught:
        execute(CreateProduct(sku="L-1", name="Lost", price="1.00"), sf)
    assert isinstance(caught.value.orig, psycopg.OperationalError)
    monkeypatch.undo()
    assert _query(wiring, "SELECT count(*) FROM catalog.products") == [(0,)]
    created = execute(CreateProduct(sku="L-1", name="Lost", price="1.00"), sf)
    assert created.version == 1
