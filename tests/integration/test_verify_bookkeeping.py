"""`cqrs verify` checks everything the projections keep, bookkeeping included (issue 12).

A corrupted `customer-orders-applied` record (the exactly-once record behind a customer's
order counters) went unnoticed by verify: the views still matched, but the next event of
that order would have been counted twice or refused. Each kind of bookkeeping is corrupted
here in turn, on a converged system, and `cqrs verify` must exit 1 naming the key.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import pytest

from cqrs.commands.catalog import CreateProduct, RenameProduct, RepriceProduct
from cqrs.commands.customers import RegisterCustomer, RenameCustomer
from cqrs.commands.orders import OrderItem, PlaceOrder, ShipOrder
from cqrs.keys import ViewKeys
from cqrs.wiring import Wiring
from tests.helpers import run_cli
from tests.integration.projector_support import differences, drain, run


def _world(wiring: Wiring) -> dict[str, uuid.UUID]:
    """A converged system with every kind of key: products renamed and repriced, customers
    renamed, orders placed and shipped."""
    product = run(wiring, CreateProduct(sku="V-1", name="Vase", price="4.00", stock=20)).id
    other = run(wiring, CreateProduct(sku="V-2", name="Bowl", price="2.00", stock=20)).id
    run(wiring, RenameProduct(product_id=product, name="Big vase"))
    run(wiring, RepriceProduct(product_id=product, price="5.00"))
    customer = run(wiring, RegisterCustomer(email="v@example.com", name="Vera")).id
    order = run(
        wiring,
        PlaceOrder(
            customer_id=customer,
            items=[OrderItem(product_id=product, qty=2), OrderItem(product_id=other, qty=1)],
        ),
    ).id
    run(wiring, ShipOrder(order_id=order))
    run(wiring, RenameCustomer(customer_id=customer, name="Vera V."))
    drain(wiring)
    assert differences(wiring) == []
    return {"product": product, "other": other, "customer": customer, "order": order}


def _views(wiring: Wiring, projection: str) -> ViewKeys:
    return wiring.keys.views(projection, 1)


# (what is corrupted, how, the key verify must name, the field/member it must name or None)
Corruption = Callable[[Wiring, dict[str, uuid.UUID]], tuple[str, str | None]]


def _applied_record_rewound(w: Wiring, ids: dict[str, uuid.UUID]) -> tuple[str, str | None]:
    key = _views(w, "customers").customer_order_state(ids["customer"])
    w.redis.hset(key, str(ids["order"]), "1")  # shipped (v2) recorded as only placed
    return key, str(ids["order"])


def _applied_record_deleted(w: Wiring, ids: dict[str, uuid.UUID]) -> tuple[str, str | None]:
    key = _views(w, "customers").customer_order_state(ids["customer"])
    w.redis.delete(key)
    return key, None


def _applied_record_of_a_phantom_order(
    w: Wiring, ids: dict[str, uuid.UUID]
) -> tuple[str, str | None]:
    key = _views(w, "customers").customer_order_state(ids["customer"])
    ghost = str(uuid.uuid4())
    w.redis.hset(key, ghost, "1")
    return key, ghost


def _applied_record_of_an_unknown_customer(
    w: Wiring, ids: dict[str, uuid.UUID]
) -> tuple[str, str | None]:
    key = _views(w, "customers").customer_order_state(uuid.uuid4())
    w.redis.hset(key, str(ids["order"]), "1")
    return key, None


def _name_index_version(w: Wiring, ids: dict[str, uuid.UUID]) -> tuple[str, str | None]:
    key = _views(w, "products").products_by_name_versions()
    w.redis.hset(key, str(ids["product"]), "1")  # renamed at v2: the record says v2
    return key, str(ids["product"])


def _price_index_version_gone(w: Wiring, ids: dict[str, uuid.UUID]) -> tuple[str, str | None]:
    key = _views(w, "products").products_by_price_versions()
    w.redis.hdel(key, str(ids["other"]))
    return key, str(ids["other"])


def _top_index_version_ahead(w: Wiring, ids: dict[str, uuid.UUID]) -> tuple[str, str | None]:
    key = _views(w, "products").top_products_versions()
    w.redis.hset(key, str(ids["product"]), "99")  # would refuse every later sale's score
    return key, str(ids["product"])


def _tracked_names_lost(w: Wiring, ids: dict[str, uuid.UUID]) -> tuple[str, str | None]:
    key = _views(w, "products").product_names(ids["product"])
    w.redis.sadd(key, "Vase")  # a stale name nobody removed
    return key, "members"


def _customer_name_copy(w: Wiring, ids: dict[str, uuid.UUID]) -> tuple[str, str | None]:
    key = _views(w, "orders").order_customer(ids["customer"])
    w.redis.hset(key, "version", "1")  # renamed at v2: fan-outs would go backwards
    return key, "version"


def _customer_orders_member(w: Wiring, ids: dict[str, uuid.UUID]) -> tuple[str, str | None]:
    key = _views(w, "orders").customer_orders(ids["customer"])
    stray = f"{0:015d}:{uuid.uuid4()}"
    w.redis.zadd(key, {stray: 0})
    return key, stray


def _phantom_product_view(w: Wiring, ids: dict[str, uuid.UUID]) -> tuple[str, str | None]:
    key = _views(w, "products").product(uuid.uuid4())
    w.redis.hset(key, mapping={"name": "Phantom", "version": "1"})
    return key, None


CASES: dict[str, Corruption] = {
    "applied-record-rewound": _applied_record_rewound,
    "applied-record-deleted": _applied_record_deleted,
    "applied-record-of-a-phantom-order": _applied_record_of_a_phantom_order,
    "applied-record-of-an-unknown-customer": _applied_record_of_an_unknown_customer,
    "name-index-version": _name_index_version,
    "price-index-version-gone": _price_index_version_gone,
    "top-index-version-ahead": _top_index_version_ahead,
    "tracked-names": _tracked_names_lost,
    "customer-name-copy": _customer_name_copy,
    "customer-orders-member": _customer_orders_member,
    "phantom-product-view": _phantom_product_view,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_reports_corrupted_bookkeeping(wiring: Wiring, case: str) -> None:
    ids = _world(wiring)
    key, detail = CASES[case](wiring, ids)
    diffs = differences(wiring)
    assert diffs, case
    assert {d.key for d in diffs} == {key}, [str(d) for d in diffs]
    if detail is not None:
        assert detail in {d.field for d in diffs}, [str(d) for d in diffs]


def test_the_cli_exits_1_and_names_the_corrupted_record(
    wiring: Wiring, cli_env: dict[str, str]
) -> None:
    ids = _world(wiring)
    applied, order = _applied_record_rewound(wiring, ids)
    versions, product = _name_index_version(wiring, ids)

    result = run_cli("verify", "--json", env=cli_env, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["differences"] == 2
    shown = {(d["view"], d["key"], d["field"]): (d["expected"], d["actual"]) for d in data["shown"]}
    assert shown == {
        ("customer-orders-applied", applied, order): ("2", "1"),
        ("products-by-name-versions", versions, product): ("2", "1"),
    }
    text = run_cli("verify", env=cli_env | {"COLUMNS": "400"}, timeout=120)
    assert text.returncode == 1
    assert applied in text.stdout and versions in text.stdout, text.stdout
