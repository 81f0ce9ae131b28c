"""`cqrs verify`: recompute every key the projections keep from PostgreSQL and compare.

PostgreSQL is the source of truth; this is the check that Redis converged to it. It reads
the write side's tables and the event log with plain SQL (the projector knows the write
side only through its schema, never through `commands`) and builds the expected content
of every key of the live generations: the views, the indexes, and the bookkeeping the
projections rely on for exactly-once effects (per-order applied versions next to each
customer, the orders projection's copy of each customer's name and version, the
per-product version records of the catalog indexes, the sets of indexed values kept for
crash-safe index cleanup). It reports every field or member that differs, every key that
is missing or of the wrong type, and every key of those generations that should not
exist (a phantom view, an orphaned record).
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
from cqrs.projector.orders import LINE_ATTRIBUTES, line_field, order_member
from cqrs.projector.products import (
    REINDEX_NAME,
    REINDEX_PRICE,
    REINDEX_TOP,
    name_member,
    price_member,
)
from cqrs.urls import libpq_url


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


@dataclass(frozen=True)
class Expected:
    """The content one key should have. `kind` is its Redis type: a hash compares field by
    field, a sorted set member by member (the score), a set as a whole. Empty content
    means the key must not exist (Redis drops empty containers)."""

    view: str  # the label differences carry
    kind: str  # "hash", "zset" or "set"
    content: dict[str, Any] | set[str]


VIEW_KINDS = {"product", "customer", "order"}  # a missing or extra one is a "view"


def _index_versions(conn: psycopg.Connection) -> dict[str, dict[str, str]]:
    """Per catalog index, {product id: version of the last event that recomputed it}: what
    the index's version record holds (projector.products: the REINDEX_* sets)."""
    wanted = {"name": REINDEX_NAME, "price": REINDEX_PRICE, "top": REINDEX_TOP}
    versions: dict[str, dict[str, str]] = {index: {} for index in wanted}
    types = sorted(set().union(*wanted.values()))
    for pid, event_type, version in conn.execute(
        "SELECT aggregate_id, event_type, max(aggregate_version) FROM events.event_log"
        " WHERE aggregate_type = 'product' AND event_type = ANY(%s)"
        " GROUP BY aggregate_id, event_type",
        (types,),
    ):
        for index, event_types in wanted.items():
            if event_type in event_types:
                held = versions[index].get(str(pid))
                if held is None or int(held) < version:
                    versions[index][str(pid)] = str(version)
    return versions


def expected_keys(
    conn: psycopg.Connection, keys: KeyMap, generations: dict[str, int]
) -> dict[str, Expected]:
    """Every key of the live generations with the content PostgreSQL implies for it."""
    views = expected_views(conn)
    products: ViewKeys = keys.views("products", generations["products"])
    customers = keys.views("customers", generations["customers"])
    orders = keys.views("orders", generations["orders"])
    out: dict[str, Expected] = {}

    prods = views["product"]
    for pid, view in prods.items():
        out[products.product(pid)] = Expected("product", "hash", view)
        # The values that may still be in an index: once converged, only the current one.
        out[products.product_names(pid)] = Expected("product-names", "set", {view["name"]})
        out[products.product_prices(pid)] = Expected("product-prices", "set", {view["price"]})
    index_versions = _index_versions(conn)
    for view, key, content in (
        ("products-by-name", products.products_by_name(),
         {name_member(p["name"], p["id"]): 0.0 for p in prods.values()}),
        ("products-by-price", products.products_by_price(),
         {price_member(p["price"], p["id"]): 0.0 for p in prods.values()}),
        ("top-products", products.top_products(),
         {p["id"]: float(p["units_sold"]) for p in prods.values()}),
    ):  # fmt: skip
        out[key] = Expected(view, "zset", content)
    for view, key, index in (
        ("products-by-name-versions", products.products_by_name_versions(), "name"),
        ("products-by-price-versions", products.products_by_price_versions(), "price"),
        ("top-products-versions", products.top_products_versions(), "top"),
    ):
        out[key] = Expected(view, "hash", index_versions[index])

    for cid, view in views["customer"].items():
        out[customers.customer(cid)] = Expected("customer", "hash", view)
        out[orders.order_customer(cid)] = Expected(
            "customer-name", "hash", {"name": view["name"], "version": view["version"]}
        )
    applied: dict[str, dict[str, str]] = {}
    members: dict[str, dict[str, float]] = {}
    for oid, cid, placed_at, version in conn.execute(
        "SELECT id, customer_id, placed_at, version FROM orders.orders"
    ):
        # Every order event is counted on the customer (placed, cancelled, shipped), so
        # the exactly-once record of an order holds the order's current version.
        applied.setdefault(str(cid), {})[str(oid)] = str(version)
        members.setdefault(str(cid), {})[order_member(placed_at, oid)] = 0.0
    for cid, content in applied.items():
        out[customers.customer_order_state(cid)] = Expected(
            "customer-orders-applied", "hash", content
        )
    for cid, content in members.items():
        out[orders.customer_orders(cid)] = Expected("customer-orders", "zset", content)
    for oid, view in views["order"].items():
        out[orders.order(oid)] = Expected("order", "hash", view)
    return out


def _read_many(client: redis.Redis, wanted: list[tuple[str, str]]) -> Iterator[Any]:
    """The content of (key, kind) pairs, 500 per pipeline; an error (a key of another
    type) comes back as the exception instead of being raised."""
    for start in range(0, len(wanted), 500):
        pipe = client.pipeline(transaction=False)
        for key, kind in wanted[start : start + 500]:
            if kind == "hash":
                pipe.hgetall(key)
            elif kind == "zset":
                pipe.zrange(key, 0, -1, withscores=True)
            else:
                pipe.smembers(key)
        yield from pipe.execute(raise_on_error=False)


def _compare_key(key: str, want: Expected, actual: Any) -> list[Difference]:
    if isinstance(actual, Exception):
        return [Difference(want.view, key, "*", want.kind, f"error: {actual}")]
    if want.kind == "zset":
        actual = dict(actual)
    if not actual and want.content:
        missing = "view" if want.view in VIEW_KINDS else want.kind
        return [Difference(want.view, key, "*", missing, None)]
    if want.kind == "set":
        if set(actual) == want.content:
            return []
        return [Difference(want.view, key, "members", sorted(want.content), sorted(actual))]
    diffs = []
    content: dict[str, Any] = want.content  # type: ignore[assignment]
    for name in sorted(set(content) | set(actual)):
        if content.get(name) != actual.get(name):
            diffs.append(Difference(want.view, key, name, content.get(name), actual.get(name)))
    return diffs


def _label(key: str, prefix: str) -> str:
    """The kind of key a projection key is, from its name: `product`, `customer-orders`,
    `products:by-name`..."""
    rest = key[len(prefix) + 1 :]
    return rest.split(":{", 1)[0]


def _extra_keys(
    client: redis.Redis,
    keys: KeyMap,
    generations: dict[str, int],
    expected: dict[str, Expected],
) -> list[Difference]:
    """Keys of the live generations that nothing in PostgreSQL accounts for."""
    diffs = []
    for name, generation in sorted(generations.items()):
        views = keys.views(name, generation)
        prefix = views.prefix
        for key in sorted(client.scan_iter(match=views.pattern(), count=1000)):
            if key not in expected:
                label = _label(key, prefix)
                kind = "view" if label in VIEW_KINDS else "key"
                diffs.append(Difference(label, key, "*", None, kind))
    return diffs


def verify(
    database_url: str, client: redis.Redis, keys: KeyMap, generations: dict[str, int]
) -> list[Difference]:
    """Every difference between what PostgreSQL implies and what the live generations of
    `generations` ({projection: generation}) hold, views and bookkeeping alike."""
    with psycopg.connect(libpq_url(database_url)) as conn:
        expected = expected_keys(conn, keys, generations)
    wanted = list(expected.items())
    diffs: list[Difference] = []
    for (key, want), actual in zip(
        wanted, _read_many(client, [(k, w.kind) for k, w in wanted]), strict=True
    ):
        diffs += _compare_key(key, want, actual)
    return diffs + _extra_keys(client, keys, generations, expected)
