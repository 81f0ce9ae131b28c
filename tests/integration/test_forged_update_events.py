"""Update events for views that do not exist: gaps, never phantom views (issue 12).

A well-formed update event (a rename, a reprice, an order's cancel...) with version 1 for
an aggregate whose creation no projection ever saw used to pass the version gate (0 + 1)
and build a partial view plus index entries. Such an event is a gap: it is not applied,
fails, is retried and is dead-lettered after `CQRS_PROJECTOR_MAX_DELIVERIES`, and the
partition goes on. What is legitimately "no view yet" still applies: a rename of a
customer with no orders (the orders projection's fan-out finds an empty list).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from cqrs.commands.catalog import CreateProduct, RenameProduct
from cqrs.commands.customers import RegisterCustomer, RenameCustomer
from cqrs.commands.orders import CancelOrder, OrderItem, PlaceOrder
from cqrs.contracts import builtin_contracts
from cqrs.events import EventEnvelope
from cqrs.keys import partition_of
from cqrs.projector.deadletters import list_dead_letters
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.scripts import Scripts
from cqrs.projector.steps import GAP, MISSING, run_steps
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.integration.projector_support import differences, drain, run

MAX_DELIVERIES = 2


@pytest.fixture
def forged_wiring(settings: Settings) -> Iterator[Wiring]:
    wiring = Wiring(settings.model_copy(update={"projector_max_deliveries": MAX_DELIVERIES}))
    yield wiring
    wiring.close()


def _entry(
    event_type: str, aggregate_type: str, aggregate_id: uuid.UUID, partition_key: uuid.UUID,
    payload: dict, version: int = 1,
) -> EventEnvelope:  # fmt: skip
    return EventEnvelope(
        event_id=uuid.uuid4(),
        event_type=event_type,
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        version=version,
        partition_key=partition_key,
        occurred_at=datetime.now(UTC),
        payload=payload,
    )


def _xadd(wiring: Wiring, event: EventEnvelope) -> str:
    partition = partition_of(event.partition_key, wiring.settings.partitions)
    return wiring.redis.xadd(wiring.keys.stream(partition), event.to_stream_fields())


def _keys_naming(wiring: Wiring, ident: uuid.UUID) -> list[str]:
    """Every view key of the namespace whose name carries `ident`."""
    return sorted(wiring.redis.scan_iter(match=f"{wiring.keys.ns}:*{ident}*", count=1000))


def _index_mentions(wiring: Wiring, ident: uuid.UUID) -> list[str]:
    """Catalog index members and index version records that name `ident`."""
    views = wiring.keys.views("products", 1)
    found = []
    for key in (views.products_by_name(), views.products_by_price(), views.top_products()):
        found += [m for m in wiring.redis.zrange(key, 0, -1) if str(ident) in m]
    for key in (
        views.products_by_name_versions(),
        views.products_by_price_versions(),
        views.top_products_versions(),
    ):
        found += [f for f in wiring.redis.hkeys(key) if f == str(ident)]
    return found


def _letters(wiring: Wiring, projection: str) -> dict[str, object]:
    return {d.entry_id: d for d in list_dead_letters(wiring.redis, wiring.keys, projection)}


def test_a_forged_product_rename_is_a_gap_dead_lettered_and_the_partition_goes_on(
    forged_wiring: Wiring,
) -> None:
    wiring = forged_wiring
    before = run(wiring, CreateProduct(sku="F-0", name="Before", price="1.00", stock=1)).id
    drain(wiring)  # views exist: what follows is live projection, not a first build
    ghost = uuid.uuid4()
    forged = _entry("ProductRenamed", "product", ghost, ghost, {"name": "Phantom"})
    entry_id = _xadd(wiring, forged)

    worker = drain(wiring)

    assert _keys_naming(wiring, ghost) == []  # no view, no name/price trackers
    assert _index_mentions(wiring, ghost) == []
    letters = _letters(wiring, "products")
    assert set(letters) == {entry_id}
    letter = letters[entry_id]
    assert letter.deliveries >= MAX_DELIVERIES
    assert "does not exist" in letter.error and str(ghost) in letter.error
    assert worker.stats.dead_lettered == 1
    partition = partition_of(ghost, wiring.settings.partitions)
    assert wiring.redis.xpending(wiring.keys.stream(partition), "products")["pending"] == 0
    # The other projections skip a ProductRenamed: nothing filed there.
    assert _letters(wiring, "customers") == {} and _letters(wiring, "orders") == {}

    # A real product created afterwards (in any partition) is projected, and so is an
    # update of a real one, created then renamed in order.
    after = run(wiring, CreateProduct(sku="F-1", name="After", price="2.00", stock=2)).id
    run(wiring, RenameProduct(product_id=before, name="Renamed"))
    drain(wiring)
    views = wiring.keys.views("products", 1)
    assert wiring.redis.hget(views.product(after), "name") == "After"
    assert wiring.redis.hget(views.product(before), "name") == "Renamed"
    assert differences(wiring) == []


def test_every_update_handler_refuses_a_missing_view(forged_wiring: Wiring) -> None:
    """One forged version-1 update per update event type, each for an aggregate nobody
    created, plus an order placed for a customer nobody registered: each is dead-lettered
    by every projection that handles its type, and none leaves a key naming its ids."""
    wiring = forged_wiring
    customer = run(wiring, RegisterCustomer(email="real@example.com", name="Real")).id
    drain(wiring)
    now = datetime.now(UTC).isoformat()
    product, order, stranger = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    line = {"product_id": str(product), "name": "L", "unit_price": "1.00", "qty": 1,
            "line_total": "1.00"}  # fmt: skip
    sale = {"order_id": str(order), "qty": 1, "unit_price": "1.00", "stock": 1}
    forged = {
        "ProductRepriced": (_entry("ProductRepriced", "product", product, product,
                                   {"price": "9.99"}), {"products"}),
        "ProductRestocked": (_entry("ProductRestocked", "product", product, product,
                                    {"delta": 5, "stock": 5}), {"products"}),
        "StockReserved": (_entry("StockReserved", "product", product, product, sale),
                          {"products"}),
        "StockReleased": (_entry("StockReleased", "product", product, product, sale),
                          {"products"}),
        "CustomerRenamed": (_entry("CustomerRenamed", "customer", stranger, stranger,
                                   {"name": "Ghost"}), {"customers", "orders"}),
        # An order of an unknown customer: its creation is fine, but the customer's
        # registration is missing (customers: the counters' view; orders: the name).
        "OrderPlaced": (_entry("OrderPlaced", "order", order, stranger, {
            "customer_id": str(stranger), "customer_name": "Ghost", "customer_version": 1,
            "lines": [line], "total": "1.00", "placed_at": now}), {"customers", "orders"}),
        # A cancel and a shipment of an order never placed, of a real customer.
        "OrderCancelled": (_entry("OrderCancelled", "order", order, customer, {
            "customer_id": str(customer), "total": "1.00", "cancelled_at": now}),
            {"customers", "orders"}),
        "OrderShipped": (_entry("OrderShipped", "order", order, customer, {
            "customer_id": str(customer), "shipped_at": now}), {"customers", "orders"}),
    }  # fmt: skip
    ids = {why: _xadd(wiring, event) for why, (event, _who) in forged.items()}

    drain(wiring)

    for ident in (product, order, stranger):
        assert _keys_naming(wiring, ident) == [], ident
    assert _index_mentions(wiring, product) == []
    # The real customer's counters and orders list are untouched.
    customers, orders = wiring.keys.views("customers", 1), wiring.keys.views("orders", 1)
    assert wiring.redis.hget(customers.customer(customer), "order_count") == "0"
    assert wiring.redis.hgetall(customers.customer_order_state(customer)) == {}
    assert wiring.redis.exists(orders.customer_orders(customer)) == 0
    for projection in builtin_contracts():  # which built-in refuses what (a plugin: its own)
        letters = _letters(wiring, projection)
        wanted = {ids[why] for why, (_e, who) in forged.items() if projection in who}
        assert set(letters) == wanted, projection
        for entry_id in wanted:
            assert "does not exist" in letters[entry_id].error, letters[entry_id].error
    assert differences(wiring) == []


def test_a_rename_of_a_customer_without_orders_applies_and_fans_out_later(
    forged_wiring: Wiring,
) -> None:
    """A customer with no orders has no order views: a legitimate "nothing to fan out to",
    not a gap. Their later orders take the newest name; a later rename reaches them."""
    wiring = forged_wiring
    customer = run(wiring, RegisterCustomer(email="c@example.com", name="First")).id
    product = run(wiring, CreateProduct(sku="C-1", name="Thing", price="3.00", stock=9)).id
    drain(wiring)
    run(wiring, RenameCustomer(customer_id=customer, name="Second"))
    drain(wiring)
    placed = run(
        wiring, PlaceOrder(customer_id=customer, items=[OrderItem(product_id=product, qty=1)])
    ).id
    drain(wiring)
    orders = wiring.keys.views("orders", 1)
    assert wiring.redis.hget(orders.order(placed), "customer_name") == "Second"
    run(wiring, RenameCustomer(customer_id=customer, name="Third"))
    run(wiring, CancelOrder(order_id=placed))
    drain(wiring)
    assert wiring.redis.hget(orders.order(placed), "customer_name") == "Third"
    assert wiring.redis.hget(orders.order(placed), "status") == "cancelled"
    for projection in PROJECTIONS:
        assert _letters(wiring, projection) == {}, projection
    assert differences(wiring) == []


def test_gap_and_missing_view_are_told_apart_and_a_late_creation_still_applies(
    forged_wiring: Wiring,
) -> None:
    """Steps straight against Redis: an update of version 2 before its creation is a GAP
    (as before: a predecessor is missing), a version-1 update of no view is MISSING; in one
    batch, the creation first and then the update both apply."""
    wiring = forged_wiring
    drain(wiring)
    views = wiring.keys.views("products", 1)
    products = PROJECTIONS["products"]
    scripts = Scripts(wiring.redis)
    pid = uuid.uuid4()

    def event(event_type: str, version: int, payload: dict) -> list:
        e = _entry(event_type, "product", pid, pid, payload, version=version)
        return products.steps(e, views)

    created = {"sku": "L-1", "name": "Late", "price": "1.00", "stock": 1}
    early = run_steps(wiring.redis, scripts, [event("ProductRenamed", 2, {"name": "Two"})])
    assert early.errors[0] is not None and "predecessor" in early.errors[0]
    forged = run_steps(wiring.redis, scripts, [event("ProductRenamed", 1, {"name": "One"})])
    assert forged.errors[0] is not None and "does not exist" in forged.errors[0]
    assert wiring.redis.exists(views.product(pid)) == 0
    both = run_steps(
        wiring.redis,
        scripts,
        [event("ProductCreated", 1, created), event("ProductRenamed", 2, {"name": "Two"})],
    )
    assert both.errors == [None, None] and both.applied == 2
    assert wiring.redis.hget(views.product(pid), "name") == "Two"
    assert [m.split("\x00")[1] for m in wiring.redis.zrange(views.products_by_name(), 0, -1)] == [
        "Two"
    ]
    # The script's statuses themselves.
    key = f"{wiring.keys.ns}:scratch:{{{uuid.uuid4()}}}"
    need = ["need", "gate", ""]
    assert scripts["apply"](keys=[key, key], args=["v", 2, 1, *need])[0] == GAP
    assert scripts["apply"](keys=[key, key], args=["v", 1, 1, *need])[0] == MISSING
    assert wiring.redis.exists(key) == 0
    assert json.dumps(scripts["apply"](keys=[key, key], args=["v", 1, 0])) == "[1]"
    assert scripts["apply"](keys=[key, key], args=["v", 2, 1, *need])[0] == 1
    wiring.redis.delete(key)
