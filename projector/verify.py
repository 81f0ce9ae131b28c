"""`cqrs verify`: recompute every view from PostgreSQL and compare it with Redis.

PostgreSQL is the source of truth; this is the check that the views converged to it. It
reads the write side's tables with plain SQL (the projector knows the write side only
through its schema, never through `commands`), builds the expected hashes and index
entries, and reports every field that differs, every view that is missing and every view
that should not exist.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import redis

from cqrs.keys import KeyMap, ViewKeys
from cqrs.urls import libpq_url
from projector.orders import LINE_ATTRIBUTES, line_field, order_member_id
from projector.products import name_member, price_member


@dataclass(frozen=True)
class Difference:
    view: str
    key: str
    field: str
    expected: Any
    actual: Any

    def __str__(self) -> str:
        return (
            f"{self.view} {self.key} {self.field}: expected {self.expected!r}, got {self.actual!r}"
        )


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


def _money(value: Decimal) -> str:
    return f"{value:.2f}"


def expected_views(conn: psycopg.Connection) -> dict[str, dict[str, dict[str, Any]]]:
    """{projection view kind: {id: fields}} as the projections should have built them."""
    sales = {
        str(pid): (int(qty), Decimal(total))
        for pid, qty, total in conn.execute(
            "SELECT l.product_id, sum(l.qty), sum(l.line_total) FROM orders.order_lines l"
            " JOIN orders.orders o ON o.id = l.order_id WHERE o.status <> 'cancelled'"
            " GROUP BY l.product_id"
        )
    }
    products = {}
    for pid, sku, name, price, stock, version in conn.execute(
        "SELECT id, sku, name, price, stock, version FROM catalog.products"
    ):
        sold, revenue = sales.get(str(pid), (0, Decimal("0")))
        products[str(pid)] = {
            "id": str(pid),
            "sku": sku,
            "name": name,
            "price": _money(price),
            "stock": str(stock),
            "units_sold": str(sold),
            "revenue": _money(revenue),
            "version": str(version),
        }
    counters = {
        str(cid): (int(n), Decimal(total))
        for cid, n, total in conn.execute(
            "SELECT customer_id, count(*), sum(total) FROM orders.orders"
            " WHERE status <> 'cancelled' GROUP BY customer_id"
        )
    }
    customers = {}
    names = {}
    name_versions = {}  # the customer version an order's copy of the name is from
    for cid, email, name, version in conn.execute(
        "SELECT id, email, name, version FROM customers.customers"
    ):
        n, total = counters.get(str(cid), (0, Decimal("0")))
        names[str(cid)] = name
        name_versions[str(cid)] = str(version)
        customers[str(cid)] = {
            "id": str(cid),
            "email": email,
            "name": name,
            "order_count": str(n),
            "lifetime_value": _money(total),
            "version": str(version),
        }
    # Order lines as the view keeps them: one field per line attribute (projector.orders).
    lines: dict[str, dict[str, str]] = {}
    for oid, pid, name, unit_price, qty, line_total in conn.execute(
        "SELECT order_id, product_id, name, unit_price, qty, line_total FROM orders.order_lines"
        " ORDER BY order_id, line_no"
    ):
        fields = lines.setdefault(str(oid), {})
        n = len(fields) // len(LINE_ATTRIBUTES) + 1
        values = (str(pid), name, _money(unit_price), str(qty), _money(line_total))
        fields.update({line_field(n, a): v for a, v in zip(LINE_ATTRIBUTES, values, strict=True)})
    orders = {}
    for oid, cid, status, total, placed, shipped, cancelled, version in conn.execute(
        "SELECT id, customer_id, status, total, placed_at, shipped_at, cancelled_at, version"
        " FROM orders.orders"
    ):
        view = {
            "id": str(oid),
            "customer_id": str(cid),
            "customer_name": names.get(str(cid)),
            "customer_version": name_versions.get(str(cid)),
            "status": status,
            "line_count": str(len(lines.get(str(oid), {})) // len(LINE_ATTRIBUTES)),
            **lines.get(str(oid), {}),
            "total": _money(total),
            "placed_at": _iso(placed),
            "version": str(version),
        }
        if shipped:
            view["shipped_at"] = _iso(shipped)
        if cancelled:
            view["cancelled_at"] = _iso(cancelled)
        orders[str(oid)] = view
    return {"product": products, "customer": customers, "order": orders}


def _hgetall_many(client: redis.Redis, keys: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        pipe = client.pipeline(transaction=False)
        for key in chunk:
            pipe.hgetall(key)
        yield from zip(chunk, pipe.execute(), strict=True)


def _ids_in_redis(client: redis.Redis, pattern: str) -> set[str]:
    ids = set()
    for key in client.scan_iter(match=pattern, count=1000):
        ids.add(key.rsplit("{", 1)[-1].rstrip("}"))
    return ids


def _compare(
    kind: str, expected: dict[str, dict[str, Any]], key_of: Any, client: redis.Redis, pattern: str
) -> list[Difference]:
    diffs = []
    ids = sorted(expected)
    for oid, (key, actual) in zip(
        ids, _hgetall_many(client, [key_of(i) for i in ids]), strict=True
    ):
        want = expected[oid]
        if not actual:
            diffs.append(Difference(kind, key, "*", "view", None))
            continue
        for field in sorted(set(want) | set(actual)):
            got = actual.get(field)
            if want.get(field) != got:
                diffs.append(Difference(kind, key, field, want.get(field), got))
    for extra in sorted(_ids_in_redis(client, pattern) - set(expected)):
        diffs.append(Difference(kind, key_of(extra), "*", None, "view"))
    return diffs


def _compare_zset(
    client: redis.Redis, key: str, expected: dict[str, float], view: str
) -> list[Difference]:
    actual = dict(client.zrange(key, 0, -1, withscores=True))
    diffs = []
    for member in sorted(set(expected) | set(actual)):
        if expected.get(member) != actual.get(member):
            diffs.append(Difference(view, key, member, expected.get(member), actual.get(member)))
    return diffs


def verify(
    database_url: str, client: redis.Redis, keys: KeyMap, generations: dict[str, int]
) -> list[Difference]:
    with psycopg.connect(libpq_url(database_url)) as conn:
        expected = expected_views(conn)
        customer_orders: dict[str, set[str]] = {}
        for oid, cid in conn.execute("SELECT id, customer_id FROM orders.orders"):
            customer_orders.setdefault(str(cid), set()).add(str(oid))
    products: ViewKeys = keys.views("products", generations["products"])
    customers = keys.views("customers", generations["customers"])
    orders = keys.views("orders", generations["orders"])
    diffs = _compare(
        "product", expected["product"], products.product, client, products.product("*")
    )
    diffs += _compare(
        "customer", expected["customer"], customers.customer, client, customers.customer("*")
    )
    diffs += _compare("order", expected["order"], orders.order, client, orders.order("*"))
    prods = expected["product"].values()
    diffs += _compare_zset(
        client,
        products.products_by_name(),
        {name_member(p["name"], p["id"]): 0.0 for p in prods},
        "products-by-name",
    )
    diffs += _compare_zset(
        client,
        products.products_by_price(),
        {price_member(p["price"], p["id"]): 0.0 for p in prods},
        "products-by-price",
    )
    diffs += _compare_zset(
        client,
        products.top_products(),
        {p["id"]: float(p["units_sold"]) for p in prods},
        "top-products",
    )
    for cid in expected["customer"]:
        actual = {order_member_id(m) for m in client.zrange(orders.customer_orders(cid), 0, -1)}
        want = customer_orders.get(cid, set())
        if actual != want:
            diffs.append(
                Difference(
                    "customer-orders",
                    orders.customer_orders(cid),
                    "members",
                    sorted(want),
                    sorted(actual),
                )
            )
    return diffs
