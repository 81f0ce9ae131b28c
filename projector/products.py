"""The `products` projection's handlers: one hash per product plus the catalog indexes
(the layout, encoders and read model are its contract, `projector.contracts.products`).

Index entries are recomputed from the view after every event, so replays and
duplicates converge instead of drifting.
"""

from __future__ import annotations

from typing import Any

from cqrs.events import (
    EventHeader,
    ProductCreated,
    ProductRenamed,
    ProductRepriced,
    ProductRestocked,
    StockReleased,
    StockReserved,
)
from cqrs.projector.contracts.products import (
    CONTRACT,
    CREATES,
    REINDEX_NAME,
    REINDEX_PRICE,
    REINDEX_TOP,
    ProductKeys,
    member_id,  # noqa: F401 (re-exported: the index encoders' old home)
    name_member,
    price_member,
)
from cqrs.projector.projection import Projection, cents
from cqrs.projector.steps import NEED_GATE, Step, apply, command, script


def _steps(event: EventHeader, views: ProductKeys, ops: list[tuple[str, str, Any]]) -> list[Step]:
    """The gated write of `ops`, then the index upkeep of the fields this event type can
    change: the by-name index (REINDEX_NAME), by-price (REINDEX_PRICE), the units_sold
    score (REINDEX_TOP).

    An index is recomputed from the view only after an event that can change its field;
    the others (a stock change, a sale for the name and price indexes) leave it as it was,
    which keeps the most frequent events (StockReserved) to two commands instead of six.
    Convergence holds: the upkeep is not gated by the event's version, so a redelivered
    event whose first attempt crashed between its write and its index upkeep recomputes
    the index again. It carries the event's version, and the index refuses anything older
    than the event it already reflects: a worker that stalled past its lease between the
    two rounds cannot put back a value another worker has since replaced.

    Only CREATES may write a view that does not exist: any other event for a missing view
    is a gap (its creation is missing), never a partial view. The index upkeep runs only
    after the apply, so a gap leaves no index entry either.
    """
    kind = event.event_type
    name, price, top = kind in REINDEX_NAME, kind in REINDEX_PRICE, kind in REINDEX_TOP
    pid = str(event.aggregate_id)
    key = views.product(pid)

    version = event.version

    def reindex_top(result: list[Any]) -> list[Step]:
        units_sold = result[1]
        if units_sold is None:
            return []
        top = (views.top_products(), views.top_products_versions())
        return [script("index", top, (pid, version, int(units_sold), pid))]

    def reindex(tracked: str, index: tuple[str, str], member: Any) -> Any:
        def follow(result: list[Any]) -> list[Step]:
            current, *known = result
            if current is None:
                return []
            stale = [v for v in known if v != current]
            args = (pid, version, 0, member(current, pid), *[member(v, pid) for v in stale])
            step = script("index", index, args)
            if stale:
                # Forget stale values only after they left the index (next round), and
                # only if this write was not refused as older than the index.
                step.then = lambda written: [command("SREM", tracked, *stale)] if written else []
            return [step]

        return follow

    names, prices = views.product_names(pid), views.product_prices(pid)
    by_name = (views.products_by_name(), views.products_by_name_versions())
    by_price = (views.products_by_price(), views.products_by_price_versions())
    trackers = [
        (tracked, field, index, member)
        for wanted, tracked, field, index, member in (
            (name, names, "name", by_name, name_member),
            (price, prices, "price", by_price, price_member),
        )
        if wanted
    ]

    def after_apply(result: list[Any]) -> list[Step]:
        # Only once the event's own write has applied (or had applied before): a step
        # that ran beside it in round 1 would read the value from before the event when
        # the apply has to wait for a predecessor (a GAP retried in the next round), and
        # index that old value under the event's version.
        steps = reindex_top(result) if top else []
        steps += [
            script("track", (key, tracked), (field,), then=reindex(tracked, index, member))
            for tracked, field, index, member in trackers
        ]
        return steps

    returns = ("units_sold",) if top else ()
    then = after_apply if top or trackers else None
    needs = () if kind == CREATES else (NEED_GATE,)
    return [apply(key, key, "version", version, ops, returns, then, needs=needs)]


def on_created(event: EventHeader, p: ProductCreated, views: ProductKeys) -> list[Step]:
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


def on_renamed(event: EventHeader, p: ProductRenamed, views: ProductKeys) -> list[Step]:
    return _steps(event, views, [("set", "name", p.name)])


def on_repriced(event: EventHeader, p: ProductRepriced, views: ProductKeys) -> list[Step]:
    return _steps(event, views, [("set", "price", f"{p.price:.2f}")])


def on_restocked(event: EventHeader, p: ProductRestocked, views: ProductKeys) -> list[Step]:
    return _steps(event, views, [("set", "stock", p.stock)])


def on_reserved(event: EventHeader, p: StockReserved, views: ProductKeys) -> list[Step]:
    return _steps(
        event,
        views,
        [
            ("set", "stock", p.stock),
            ("incr", "units_sold", p.qty),
            ("money", "revenue", cents(p.unit_price) * p.qty),
        ],
    )


def on_released(event: EventHeader, p: StockReleased, views: ProductKeys) -> list[Step]:
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
    # 2: index keys with hash tags and per-product index versions (stale-worker safe).
    version=2,
    contract=CONTRACT,
    handlers={
        "ProductCreated": on_created,
        "ProductRenamed": on_renamed,
        "ProductRepriced": on_repriced,
        "ProductRestocked": on_restocked,
        "StockReserved": on_reserved,
        "StockReleased": on_released,
    },
)
