"""The views, built by the real projector from events of the real command handlers."""

from __future__ import annotations

from decimal import Decimal

from cqrs.commands.catalog import CreateProduct, RenameProduct, RepriceProduct, RestockProduct
from cqrs.commands.customers import RegisterCustomer, RenameCustomer
from cqrs.commands.orders import CancelOrder, PlaceOrder, ShipOrder
from cqrs.projector.products import name_member
from cqrs.wiring import Wiring
from tests.integration.projector_support import differences, drain, run


def test_denormalized_views_follow_every_service(wiring: Wiring) -> None:
    views = {p: wiring.keys.views(p, 1) for p in ("products", "customers", "orders")}
    widget = run(wiring, CreateProduct(sku="W-1", name="Widget", price="2.50", stock=10)).id
    gadget = run(wiring, CreateProduct(sku="G-1", name="Gadget", price="10.00", stock=5)).id
    ann = run(wiring, RegisterCustomer(email="ann@example.com", name="Ann")).id
    orders = [
        run(wiring, PlaceOrder(customer_id=ann, items=[{"product_id": widget, "qty": 2}])).id,
        run(
            wiring,
            PlaceOrder(
                customer_id=ann,
                items=[{"product_id": widget, "qty": 1}, {"product_id": gadget, "qty": 3}],
            ),
        ).id,
        run(wiring, PlaceOrder(customer_id=ann, items=[{"product_id": gadget, "qty": 1}])).id,
    ]
    run(wiring, RenameProduct(product_id=widget, name="Widget Pro"))
    run(wiring, RepriceProduct(product_id=widget, price="3.00"))
    run(wiring, RestockProduct(product_id=gadget, qty=4))
    run(wiring, CancelOrder(order_id=orders[2]))
    run(wiring, ShipOrder(order_id=orders[0]))
    run(wiring, RenameCustomer(customer_id=ann, name="Ann Smith"))

    worker = drain(wiring)
    assert worker.stats.dead_lettered == 0

    r = wiring.redis
    product = r.hgetall(views["products"].product(widget))
    assert product["name"] == "Widget Pro"
    assert product["price"] == "3.00"
    assert product["stock"] == "7"
    assert product["units_sold"] == "3"
    assert product["revenue"] == "7.50"  # sold at 2.50 before the reprice
    gadget_view = r.hgetall(views["products"].product(gadget))
    assert (gadget_view["stock"], gadget_view["units_sold"], gadget_view["revenue"]) == (
        "6",
        "3",
        "30.00",
    )  # 5 - 3 - 1 + 1 (cancel) + 4 (restock); the cancelled unit is no sale

    customer = r.hgetall(views["customers"].customer(ann))
    assert customer["name"] == "Ann Smith"
    assert customer["order_count"] == "2"
    assert Decimal(customer["lifetime_value"]) == Decimal("5.00") + Decimal("32.50")

    # A rename after 3 orders: every order view shows the new name; the lines keep the
    # product names and prices as they were when the order was placed.
    for order_id in orders:
        assert r.hget(views["orders"].order(order_id), "customer_name") == "Ann Smith"
    second = r.hgetall(views["orders"].order(orders[1]))
    assert second["line_count"] == "2"
    lines = [tuple(second[f"line:{n}:{a}"] for a in ("name", "unit_price", "qty")) for n in (1, 2)]
    assert lines == [("Widget", "2.50", "1"), ("Gadget", "10.00", "3")]
    assert second["line:2:product_id"] == str(gadget) and second["line:2:line_total"] == "30.00"
    assert "lines" not in second
    assert second["total"] == "32.50"
    assert r.hget(views["orders"].order(orders[0]), "status") == "shipped"
    assert r.hget(views["orders"].order(orders[2]), "status") == "cancelled"
    members = r.zrange(views["orders"].customer_orders(ann), 0, -1)
    assert [m.rsplit(":", 1)[1] for m in members] == [str(o) for o in orders]

    by_name = r.zrange(views["products"].products_by_name(), 0, -1)
    assert by_name == [name_member("Gadget", gadget), name_member("Widget Pro", widget)]
    top = dict(r.zrange(views["products"].top_products(), 0, -1, withscores=True))
    assert top == {str(widget): 3.0, str(gadget): 3.0}
    assert differences(wiring) == []


def test_verify_reports_a_tampered_view(wiring: Wiring) -> None:
    product = run(wiring, CreateProduct(sku="T-1", name="Thing", price="1.00", stock=1)).id
    drain(wiring)
    assert differences(wiring) == []
    wiring.redis.hset(wiring.keys.views("products", 1).product(product), "stock", "99")
    diffs = differences(wiring)
    assert [(d.field, d.expected, d.actual) for d in diffs] == [("stock", "1", "99")]


def test_order_views_stay_listpack_encoded_up_to_the_largest_order(wiring: Wiring) -> None:
    """One field per line attribute keeps every value short: an order of 100 lines (the
    most a command accepts) stays a compact listpack. A name longer than the server's
    `hash-max-listpack-value` converts just that view, which still reads back whole."""
    r = wiring.redis
    limit = int(r.config_get("hash-max-listpack-value")["hash-max-listpack-value"])
    products = [
        run(wiring, CreateProduct(sku=f"L-{n}", name=f"Line item {n}", price="1.25", stock=5)).id
        for n in range(100)
    ]
    long_name = "Ünïcode long name" * 10  # 170 characters, > 64 bytes
    special = run(wiring, CreateProduct(sku="L-LONG", name=long_name, price="2.00", stock=5)).id
    ann = run(wiring, RegisterCustomer(email="lines@example.com", name="Ann")).id
    items = [{"product_id": p, "qty": 1 + n % 3} for n, p in enumerate(products)]
    big = run(wiring, PlaceOrder(customer_id=ann, items=items)).id
    long = run(wiring, PlaceOrder(customer_id=ann, items=[{"product_id": special, "qty": 2}])).id
    drain(wiring)

    views = wiring.keys.views("orders", 1)
    big_view = r.hgetall(views.order(big))
    assert big_view["line_count"] == "100" and len(big_view) == 509  # 9 + 5 x 100
    assert r.object("encoding", views.order(big)) == "listpack"
    assert [big_view[f"line:{n + 1}:product_id"] for n in range(100)] == [str(p) for p in products]
    expected = "hashtable" if len(long_name.encode()) > limit else "listpack"
    assert r.object("encoding", views.order(long)) == expected
    assert r.hget(views.order(long), "line:1:name") == long_name
    assert differences(wiring) == []
