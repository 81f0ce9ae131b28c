"""The views, built by the real projector from events of the real command handlers."""

from __future__ import annotations

import json
from decimal import Decimal

from commands.catalog import CreateProduct, RenameProduct, RepriceProduct, RestockProduct
from commands.customers import RegisterCustomer, RenameCustomer
from commands.orders import CancelOrder, PlaceOrder, ShipOrder
from cqrs.wiring import Wiring
from projector.products import name_member
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
    lines = json.loads(second["lines"])
    assert [(line["name"], line["unit_price"], line["qty"]) for line in lines] == [
        ("Widget", "2.50", 1),
        ("Gadget", "10.00", 3),
    ]
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
