"""The `products` projection: one hash per product plus the catalog indexes.

View `product:{id}`: id, sku, name, price, stock, units_sold, revenue, version.
Indexes: by name (lexicographic, member `<casefolded name>\\x00<id>`), by price (score in
cents), top products (score units_sold). Index entries are absolute values recomputed from
the view after every event, so replays and duplicates converge instead of drifting.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from cqrs.events import (
    EventEnvelope,
    ProductCreated,
    ProductRenamed,
    ProductRepriced,
    ProductRestocked,
    StockReleased,
    StockReserved,
)
from cqrs.keys import ViewKeys
from projector.projection import Projection, cents
from projector.steps import Step, apply, command, script

NAME_SEPARATOR = "\x00"


def name_member(name: str, product_id: UUID | str) -> str:
    return f"{name.casefold()}{NAME_SEPARATOR}{name}{NAME_SEPARATOR}{product_id}"


def _steps(event: EventEnvelope, views: ViewKeys, ops: list[tuple[str, str, Any]]) -> list[Step]:
    pid = event.aggregate_id
    key = views.product(pid)

    def reindex_scores(result: list[Any]) -> list[Step]:
        _, price, units_sold = result
        steps = []
        if price is not None:
            steps.append(command("ZADD", views.products_by_price(), cents(price), str(pid)))
        if units_sold is not None:
            steps.append(command("ZADD", views.top_products(), int(units_sold), str(pid)))
        return steps

    def reindex_name(result: list[Any]) -> list[Step]:
        current, *known = result
        if current is None:
            return []
        stale = [n for n in known if n != current]
        steps = [command("ZADD", views.products_by_name(), 0, name_member(current, pid))]
        steps += [command("ZREM", views.products_by_name(), name_member(n, pid)) for n in stale]
        if stale:
            # Forget stale names only after they left the index (next round).
            steps[-1].then = lambda _r: [command("SREM", views.product_names(pid), *stale)]
        return steps

    return [
        apply(key, key, "version", event.version, ops, ("price", "units_sold"), reindex_scores),
        script("track", (key, views.product_names(pid)), ("name",), then=reindex_name),
    ]


def on_created(event: EventEnvelope, p: ProductCreated, views: ViewKeys) -> list[Step]:
    return _steps(
        event,
        views,
        [
            ("set", "id", str(event.aggregate_id)),
            ("set", "sku", p.sku),
            ("set", "name", p.name),
            ("set", "price", f"{p.price:.2f}"),
            ("set", "stock", p.stock),
            ("set", "units_sold", 0),
            ("set", "revenue", "0.00"),
        ],
    )


def on_renamed(event: EventEnvelope, p: ProductRenamed, views: ViewKeys) -> list[Step]:
    return _steps(event, views, [("set", "name", p.name)])


def on_repriced(event: EventEnvelope, p: ProductRepriced, views: ViewKeys) -> list[Step]:
    return _steps(event, views, [("set", "price", f"{p.price:.2f}")])


def on_restocked(event: EventEnvelope, p: ProductRestocked, views: ViewKeys) -> list[Step]:
    return _steps(event, views, [("set", "stock", p.stock)])


def on_reserved(event: EventEnvelope, p: StockReserved, views: ViewKeys) -> list[Step]:
    return _steps(
        event,
        views,
        [
            ("set", "stock", p.stock),
            ("incr", "units_sold", p.qty),
            ("money", "revenue", cents(p.unit_price) * p.qty),
        ],
    )


def on_released(event: EventEnvelope, p: StockReleased, views: ViewKeys) -> list[Step]:
    return _steps(
        event,
        views,
        [
            ("set", "stock", p.stock),
            ("incr", "units_sold", -p.qty),
            ("money", "revenue", -cents(p.unit_price) * p.qty),
        ],
    )


PRODUCTS = Projection(
    name="products",
    version=1,
    handlers={
        "ProductCreated": on_created,
        "ProductRenamed": on_renamed,
        "ProductRepriced": on_repriced,
        "ProductRestocked": on_restocked,
        "StockReserved": on_reserved,
        "StockReleased": on_released,
    },
)
